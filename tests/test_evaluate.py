"""Evaluation: tasks equal to lm-eval's stock tasks, scoring, tiny model end to end, errors, CLI.

The scoring tests use small lm-eval ``LM`` subclasses that answer requests by rule (a scripted
generation per question, a constant letter) and run through lm-eval's real evaluator, filters
and metrics: the scoring is what is under test, not the model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from plora_ray.config import EvalConfig, ModelConfig, TinyModelConfig
from plora_ray.eval_sharding import shard_lm
from plora_ray.evaluate import evaluate_model, objectives_from_results, run_tasks
from plora_ray.proxy import proxy_nll
from plora_ray.tasks import (
    DataError,
    build_leaf_task,
    build_tasks,
    fixed_subsample,
    mmlu_subject_categories,
    stock_tasks_dir,
)
from plora_ray.tasks.local_data import BUNDLED_DATA_DIR

TINY = ModelConfig(tiny=TinyModelConfig(), dtype="float32")


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    from plora_ray.model import load_model, load_tokenizer

    return load_model(TINY, seed=0), load_tokenizer(TINY)


# --------------------------------------------------------------------------- rule-based LMs


def _lm_base() -> type:
    from lm_eval.api.model import LM

    return LM


class _Rules:
    """Holds the lm-eval LM subclasses, created lazily so importing this file stays cheap."""

    @staticmethod
    def scripted(answers: dict[str, str]) -> Any:
        """generate_until returns answers[question] for the question the context ends with."""

        class ScriptedLM(_lm_base()):  # type: ignore[misc]
            def generate_until(self, requests, disable_tqdm=False):
                out = []
                for r in requests:
                    ctx = r.args[0]
                    q = next(q for q in answers if ctx.endswith(f"Question: {q}\nAnswer:"))
                    out.append(answers[q])
                return out

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return ScriptedLM()

    @staticmethod
    def constant_letter(letter: str) -> Any:
        """Every multiple-choice request: the continuation ' <letter>' is the most likely."""

        class ConstantLetterLM(_lm_base()):  # type: ignore[misc]
            def loglikelihood(self, requests, disable_tqdm=False):
                return [
                    (0.0, True) if r.args[1] == f" {letter}" else (-5.0, False) for r in requests
                ]

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return ConstantLetterLM()

    @staticmethod
    def hashing(seen: list[int] | None = None) -> Any:
        """Answers that depend only on the request text, never on batching or order."""

        def h(*parts: str) -> int:
            return int(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:8], 16)

        class HashLM(_lm_base()):  # type: ignore[misc]
            def loglikelihood(self, requests, disable_tqdm=False):
                if seen is not None:
                    seen.append(len(requests))
                return [(-(h(*r.args) % 1000) / 100.0, False) for r in requests]

            def generate_until(self, requests, disable_tqdm=False):
                if seen is not None:
                    seen.append(len(requests))
                return [f"#### {h(r.args[0]) % 7}" for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return HashLM()


# --------------------------------------------------------------------------- equivalence


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stock_task(tmp: Path, stock_rel: str, task: str, data_files: dict[str, str]) -> Any:
    """The stock task loaded by lm-eval's own TaskManager from a YAML that includes the stock
    config and points only its dataset fields at local JSON files in the hub schema."""
    from lm_eval.tasks import TaskManager

    folder = tmp / f"stock_{task}"
    folder.mkdir()
    (folder / f"{task}.yaml").write_text(
        yaml.safe_dump(
            {
                "include": str(stock_tasks_dir() / stock_rel),
                "task": task,
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": data_files, "cache_dir": str(tmp / "hf_cache")},
            }
        )
    )
    loaded = TaskManager(include_path=str(folder), include_defaults=False).load([task])
    return loaded["tasks"][task]


def _requests(task: Any, num_fewshot: int, chat: Any = None) -> list[tuple[Any, ...]]:
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(
        apply_chat_template=chat is not None, fewshot_as_multiturn=True, chat_template=chat
    )
    return [(i.request_type, i.args, i.doc_id, i.idx) for i in task.instances]


def _same_scoring_setup(ours: Any, stock: Any) -> None:
    for key in (
        "output_type",
        "generation_kwargs",
        "filter_list",
        "metric_list",
        "target_delimiter",
        "fewshot_delimiter",
        "doc_to_choice",
        "description",
    ):
        assert ours.config[key] == stock.config[key], key
    assert [f.name for f in ours._filters] == [f.name for f in stock._filters]
    assert ours.aggregation().keys() == stock.aggregation().keys()


def test_local_tasks_build_the_same_requests_as_the_stock_tasks(tmp_path: Path) -> None:
    """Same documents -> identical contexts, continuations, generation args, filters, metrics."""
    from lm_eval.models.huggingface import HFLM

    from plora_ray.model import load_tokenizer

    local = tmp_path / "local"
    hub = tmp_path / "hub"
    # GSM8K: the local files already are the hub schema; a 30-problem few-shot pool.
    gsm = {
        s: [
            json.loads(x)
            for x in (BUNDLED_DATA_DIR / "gsm8k" / f"{s}.jsonl").read_text().splitlines()
        ][:n]
        for s, n in (("train", 30), ("test", 4))
    }
    for split, rows in gsm.items():
        _write_jsonl(local / "gsm8k" / f"{split}.jsonl", rows)
        _write_jsonl(hub / f"gsm8k_{split}.jsonl", rows)
    # MMLU anatomy: bundled rows plus a hand-made one whose cells a CSV/pandas reader would
    # mangle ("None", "1.50", an empty cell, quotes, commas); hub rows written by hand.
    tests, devs = [], []
    for split, out in (("test", tests), ("dev", devs)):
        with open(BUNDLED_DATA_DIR / "mmlu" / split / f"anatomy_{split}.csv", newline="") as fh:
            rows = list(csv.reader(fh))[1:4]
        out.extend(
            {"question": r[0], "subject": "anatomy", "choices": r[1:5], "answer": int(r[5])}
            for r in rows
        )
    tests.append(
        {
            "question": ' Which, of "these" ',
            "subject": "anatomy",
            "choices": ["None", "1.50", "", "NA"],
            "answer": 2,
        }
    )
    for split, rows in (("test", tests), ("dev", devs)):
        path = local / "mmlu" / split / f"anatomy_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
            w.writerows([r["question"], *r["choices"], r["answer"]] for r in rows)
        _write_jsonl(hub / f"mmlu_{split}.jsonl", rows)
    # ARC: local {query, choices, gold} vs hub {question, choices{text,label}, answerKey}.
    arc_local = [
        {
            "query": "Question: Which is a gas?",
            "choices": ["ice", "steam", "rock", "wood"],
            "gold": 1,
        },
        {"query": "Question: 2+2?", "choices": ["3", "4", "5", "4"], "gold": 1},
    ]
    arc_hub = [
        {
            "id": "a",
            "question": "Which is a gas?",
            "choices": {"text": ["ice", "steam", "rock", "wood"], "label": list("ABCD")},
            "answerKey": "B",
        },
        {
            "id": "b",
            "question": "2+2?",
            "choices": {"text": ["3", "4", "5", "4"], "label": list("ABCD")},
            "answerKey": "B",
        },
    ]
    for name in ("arc_easy", "arc_challenge"):
        _write_jsonl(local / "arc" / f"{name}.jsonl", arc_local)
        _write_jsonl(hub / f"{name}.jsonl", arc_hub)

    tok = load_tokenizer(TINY)
    chat = HFLM(pretrained=_TinyForChat.model(), tokenizer=tok).apply_chat_template

    stock = _stock_task(
        tmp_path,
        "gsm8k/gsm8k.yaml",
        "gsm8k",
        {"train": str(hub / "gsm8k_train.jsonl"), "test": str(hub / "gsm8k_test.jsonl")},
    )
    ours = build_leaf_task("gsm8k", local)
    _same_scoring_setup(ours, stock)
    for shots, template in ((0, None), (5, None), (5, chat)):
        assert _requests(ours, shots, template) == _requests(stock, shots, template)
    assert ours.instances[0].args[1]["until"] == ["Question:", "</s>", "<|im_end|>"]

    stock = _stock_task(
        tmp_path,
        "mmlu/default/mmlu_anatomy.yaml",
        "mmlu_anatomy",
        {"test": str(hub / "mmlu_test.jsonl"), "dev": str(hub / "mmlu_dev.jsonl")},
    )
    ours = build_leaf_task("mmlu_anatomy", local)
    _same_scoring_setup(ours, stock)
    for shots, template in ((0, None), (3, None), (3, chat)):
        assert _requests(ours, shots, template) == _requests(stock, shots, template)
    assert "A. None\nB. 1.50\nC. \nD. NA\nAnswer:" in ours.instances[-1].args[0]
    assert [ours.doc_to_target(d) for d in ours.eval_docs] == [
        stock.doc_to_target(d) for d in stock.eval_docs
    ]

    for name in ("arc_easy", "arc_challenge"):
        f = str(hub / f"{name}.jsonl")
        stock = _stock_task(
            tmp_path, f"arc/{name}.yaml", name, {"train": f, "validation": f, "test": f}
        )
        ours = build_leaf_task(name, local)
        _same_scoring_setup(ours, stock)
        assert _requests(ours, 0) == _requests(stock, 0)
        assert [ours.doc_to_target(d) for d in ours.eval_docs] == [1, 1]


class _TinyForChat:
    _m: Any = None

    @classmethod
    def model(cls) -> Any:
        if cls._m is None:
            from plora_ray.model import load_model

            cls._m = load_model(TINY, seed=0)
        return cls._m


def test_mmlu_group_tree_matches_the_stock_group_configs() -> None:
    """mmlu -> four categories (weight_by_size) -> the 57 subjects, as lm-eval indexes them."""
    from lm_eval.tasks._index import TaskIndex

    index = TaskIndex.build([stock_tasks_dir() / "mmlu" / "default"])
    tasks = build_tasks(["mmlu"], num_fewshot={"mmlu": 0})
    mmlu = tasks["mmlu"]
    assert mmlu.child_names == [
        "mmlu_stem",
        "mmlu_other",
        "mmlu_social_sciences",
        "mmlu_humanities",
    ]
    for group in mmlu:
        stock_tag = index[group.name].cfg["task"][0]
        assert sorted(group.child_names) == sorted(index[stock_tag].tags)
        aggregate = [(a.metric, a.weight_by_size) for a in group.aggregate_metric_list]
        assert aggregate == [("acc", True)]
    assert [(a.metric, a.weight_by_size) for a in mmlu.aggregate_metric_list] == [("acc", True)]
    assert len(mmlu.get_all_tasks()) == 57
    categories = mmlu_subject_categories()
    assert categories["anatomy"] == "mmlu_stem" and categories["philosophy"] == "mmlu_humanities"


# --------------------------------------------------------------------------- scoring


def test_gsm8k_strict_match_scores_outputs_with_the_right_final_number(tmp_path: Path) -> None:
    rows = [
        json.loads(x) for x in (BUNDLED_DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()
    ][:4]
    gold = [r["answer"].split("#### ")[-1].strip() for r in rows]
    answers = {
        rows[0]["question"]: f"Some steps.\n#### {gold[0]}",  # strict 1, flexible 1
        rows[1]["question"]: f"So the answer is {gold[1]}.",  # strict 0, flexible 1
        rows[2]["question"]: "Wrong.\n#### 123456789",  # strict 0, flexible 0
        rows[3]["question"]: f"#### {gold[3]}\nThen more text.",  # strict 1, flexible 1
    }
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    ev = EvalConfig(tasks=["gsm8k"], num_fewshot={"gsm8k": 0}, data_dir=str(tmp_path))
    results, _ = run_tasks(_Rules.scripted(answers), ev)
    obj = objectives_from_results(results)
    assert obj["gsm8k"] == pytest.approx(0.5)
    assert obj["gsm8k_flexible"] == pytest.approx(0.75)


def test_constant_mmlu_answer_scores_the_fraction_of_its_letter_in_the_gold_labels() -> None:
    ev = EvalConfig(tasks=["mmlu"], num_fewshot={"mmlu": 0}, limit=6, limit_seed=7)
    results, _ = run_tasks(_Rules.constant_letter("A"), ev)
    obj = objectives_from_results(results)
    # The expected fractions, read straight from the CSVs for the same fixed-seed subsample.
    categories = mmlu_subject_categories()
    hits: dict[str, list[int]] = {}
    for subject, group in categories.items():
        with open(BUNDLED_DATA_DIR / "mmlu" / "test" / f"{subject}_test.csv", newline="") as fh:
            answers = [int(r["answer"]) for r in csv.DictReader(fh)]
        idx = fixed_subsample(f"mmlu_{subject}", len(answers), 6, 7)
        assert idx is not None and len(idx) == 6
        picked = [answers[i] == 0 for i in idx]
        assert results["results"][f"mmlu_{subject}"]["acc,none"] == pytest.approx(sum(picked) / 6)
        hits.setdefault(group, []).extend(picked)
    every = [h for group in hits.values() for h in group]
    assert obj["mmlu"] == pytest.approx(sum(every) / len(every))
    for group, h in hits.items():
        assert obj[group] == pytest.approx(sum(h) / len(h))
    assert results["n-samples"]["mmlu_anatomy"]["effective"] == 6


def test_mmlu_groups_weight_subjects_by_their_size(tmp_path: Path) -> None:
    """Subjects of 1-4 questions: each group's acc is the pooled (size-weighted) fraction of 'B',
    which differs from the plain mean over subjects."""
    import shutil

    shutil.copytree(BUNDLED_DATA_DIR / "mmlu" / "dev", tmp_path / "mmlu" / "dev")
    (tmp_path / "mmlu" / "test").mkdir()
    rng = random.Random(3)
    per_group: dict[str, list[list[bool]]] = {}
    for subject, group in sorted(mmlu_subject_categories().items()):
        n = rng.randint(1, 4)
        rows = [["q", "a", "b", "c", "d", str(rng.randint(0, 3))] for _ in range(n)]
        with open(tmp_path / "mmlu" / "test" / f"{subject}_test.csv", "w", newline="") as fh:
            csv.writer(fh).writerows(
                [["question", "choice0", "choice1", "choice2", "choice3", "answer"], *rows]
            )
        per_group.setdefault(group, []).append([r[5] == "1" for r in rows])
    ev = EvalConfig(tasks=["mmlu"], num_fewshot={"mmlu": 0}, data_dir=str(tmp_path))
    obj = objectives_from_results(run_tasks(_Rules.constant_letter("B"), ev)[0])
    pooled = [h for subjects in per_group.values() for s in subjects for h in s]
    macro = [sum(s) / len(s) for subjects in per_group.values() for s in subjects]
    assert obj["mmlu"] == pytest.approx(sum(pooled) / len(pooled))
    assert obj["mmlu"] != pytest.approx(sum(macro) / len(macro))
    for group, subjects in per_group.items():
        flat = [h for s in subjects for h in s]
        assert obj[group] == pytest.approx(sum(flat) / len(flat))


def test_fixed_subsample_is_seeded_sorted_and_not_the_first_documents() -> None:
    a = fixed_subsample("gsm8k", 1319, 10, 1234)
    assert a == fixed_subsample("gsm8k", 1319, 10, 1234)
    assert a is not None and a == sorted(a) and len(set(a)) == 10
    assert a != list(range(10))
    assert a != fixed_subsample("gsm8k", 1319, 10, 1235)
    assert a != fixed_subsample("arc_easy", 1319, 10, 1234)
    assert fixed_subsample("gsm8k", 5, 10, 1) is None and fixed_subsample("x", 5, None, 1) is None


def test_shard_assignment_keeps_documents_whole_and_alternates_ranks() -> None:
    from lm_eval.api.instance import Instance

    from plora_ray.eval_sharding import _shard_of

    reqs = [
        Instance("loglikelihood", {}, ("c", f" {k}"), k, ("t", doc, 1))
        for doc in range(5)
        for k in range(4)
    ]
    owners = _shard_of(reqs, 2)
    assert owners == [doc % 2 for doc in range(5) for _ in range(4)]


# --------------------------------------------------------------------------- tiny model


@pytest.mark.slow
def test_every_task_runs_end_to_end_on_the_tiny_model(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    model.train()
    state = torch.get_rng_state()
    py_state = random.getstate()
    ev = EvalConfig(
        tasks=["gsm8k", "mmlu", "arc_easy", "arc_challenge"],
        num_fewshot={"gsm8k": 0, "mmlu": 0},
        limit=2,
        max_gen_toks=16,
        proxy_samples=4,
        batch_size=16,
    )
    res = evaluate_model(model, tok, ev)
    expected = {
        "gsm8k",
        "gsm8k_flexible",
        "mmlu",
        "mmlu_humanities",
        "mmlu_stem",
        "mmlu_social_sciences",
        "mmlu_other",
        "arc_easy",
        "arc_easy_norm",
        "arc_challenge",
        "arc_challenge_norm",
        "gsm8k_nll",
        "mmlu_nll",
    }
    assert set(res.objectives) == expected
    assert all(type(v) is float for v in res.objectives.values())
    assert all(0.0 <= res.objectives[k] <= 1.0 for k in expected - {"gsm8k_nll", "mmlu_nll"})
    # A random model over a 2,048-token vocabulary: NLL near ln(2048) = 7.6 per token.
    assert 5.0 < res.objectives["gsm8k_nll"] < 10.0 and 3.0 < res.objectives["mmlu_nll"] < 12.0
    assert res.results["n-samples"]["gsm8k"]["effective"] == 2
    assert res.results["n-samples"]["mmlu_virology"]["effective"] == 2
    assert res.results["groups"]["mmlu"]["sample_len"] == 114
    assert set(res.seconds_per_task) == {"gsm8k", "mmlu", "arc_easy", "arc_challenge", "proxy_nll"}
    assert res.seconds >= sum(res.seconds_per_task.values()) * 0.99
    json.dumps(res.as_dict(), default=str)
    # The trainer gets its training mode and RNG streams back.
    assert model.training
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state


def test_proxy_nll_matches_a_direct_computation(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    ev = EvalConfig(tasks=["gsm8k"], proxy_samples=3, limit_seed=5, batch_size=2)
    got = proxy_nll(model, tok, ev)
    rows = [
        json.loads(x) for x in (BUNDLED_DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()
    ]
    idx = fixed_subsample("gsm8k_nll", len(rows), 3, 5)
    assert idx is not None
    total, count = 0.0, 0
    with torch.no_grad():
        for i in idx:
            ctx = tok(f"Question: {rows[i]['question']}\nAnswer:")["input_ids"]
            cont = tok(" " + rows[i]["answer"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ctx + cont])).logits[0].float()
            logp = torch.log_softmax(logits, -1)[len(ctx) - 1 : -1]
            total -= float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())
            count += len(cont)
    assert got["gsm8k_nll"] == pytest.approx(total / count, rel=1e-4)
    chat = proxy_nll(model, tok, EvalConfig(tasks=["gsm8k"], proxy_samples=3, chat_format=True))
    assert chat["gsm8k_nll"] != pytest.approx(got["gsm8k_nll"], rel=1e-3)


# --------------------------------------------------------------------------- bad input


def test_unknown_task_is_named_before_any_model_work() -> None:
    ev = EvalConfig(tasks=["gsm8k", "hellaswag"])
    with pytest.raises(ValueError, match="unknown task 'hellaswag'.*gsm8k, mmlu, arc_easy"):
        evaluate_model(None, None, ev)  # type: ignore[arg-type]


def test_missing_column_names_the_file_line_and_column(tmp_path: Path) -> None:
    _write_jsonl(
        tmp_path / "gsm8k" / "test.jsonl",
        [{"question": "q", "answer": "#### 1"}, {"question": "q2"}],
    )
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": "q", "answer": "#### 1"}])
    ev = EvalConfig(tasks=["gsm8k"], data_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl:2: missing column 'answer'"):
        evaluate_model(None, None, ev)  # type: ignore[arg-type]

    csv_path = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text("question,choice0,choice1,choice2,answer\nq,a,b,c,0\n")
    with pytest.raises(DataError, match=r"anatomy_test\.csv:1: missing column 'choice3'"):
        build_leaf_task("mmlu_anatomy", tmp_path)

    _write_jsonl(
        tmp_path / "arc" / "arc_easy.jsonl",
        [{"query": "Question: x", "choices": ["a", "b", "c", "d"], "gold": 4}],
    )
    with pytest.raises(
        DataError, match=r"arc_easy\.jsonl:1: column 'gold': expected an integer 0-3"
    ):
        build_leaf_task("arc_easy", tmp_path)
    with pytest.raises(DataError, match="arc_challenge.jsonl: expected the arc_challenge file"):
        build_leaf_task("arc_challenge", tmp_path)


def test_arc_few_shot_is_refused_because_no_train_split_ships() -> None:
    with pytest.raises(ValueError, match="eval.num_fewshot.arc_easy: expected 0"):
        build_tasks(["arc_easy"], num_fewshot={"arc_easy": 3})


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[Any, Any]) -> Path:
    model, tok = tiny
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_cli_eval_on_an_exported_model_writes_results_and_objectives(
    exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plora_ray.cli import main

    out = tmp_path / "res" / "eval.json"
    # Loglikelihood tasks only: generation (256 tokens by default) is covered in-process above.
    rc = main(
        [
            "eval",
            "--model",
            str(exported),
            "--tasks",
            "arc_easy,arc_challenge",
            "--limit",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["objectives"]) == {
        "arc_easy",
        "arc_easy_norm",
        "arc_challenge",
        "arc_challenge_norm",
    }
    assert data["results"]["arc_easy"]["sample_len"] == 3
    assert data["n-shot"]["arc_challenge"] == 0
    assert set(data["seconds_per_task"]) == {"arc_easy", "arc_challenge"} and data["seconds"] > 0
    assert "local data for arc_easy" in data["configs"]["arc_easy"]["custom_dataset"]
    # The same model in memory scores the same.
    from plora_ray.model import load_model, load_tokenizer

    again = evaluate_model(
        load_model(ModelConfig(path=str(exported), dtype="float32")),
        load_tokenizer(ModelConfig(path=str(exported))),
        EvalConfig(tasks=["arc_easy", "arc_challenge"], limit=3),
    )
    assert again.objectives == data["objectives"]
    assert "objectives:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("model.safetensors", "expected weights"),
        ("tokenizer.json", "expected a tokenizer"),
    ],
)
def test_cli_names_what_the_model_directory_lacks(
    exported: Path, tmp_path: Path, remove: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from plora_ray.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / remove).unlink()
    assert main(["eval", "--model", str(broken), "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(broken) in err


def test_cli_rejects_unknown_task_and_missing_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from plora_ray.cli import main

    assert main(["eval", "--model", str(tmp_path), "--tasks", "gsm8k,boolq"]) == 2
    assert "unknown task 'boolq'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "gsm8k"]) == 2
    assert "no directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- sharded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sharded_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from plora_ray.model import load_model, load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        seen: list[int] = []
        ev = EvalConfig(tasks=["gsm8k", "arc_easy"], num_fewshot={"gsm8k": 5}, limit=6)
        results, _ = run_tasks(shard_lm(_Rules.hashing(seen), rank, 2), ev)
        model, tok = load_model(TINY, seed=0), load_tokenizer(TINY)
        ev2 = EvalConfig(tasks=["arc_challenge"], limit=6, proxy_samples=5)
        res = evaluate_model(model, tok, ev2, rank=rank, world_size=2)
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps(
                {"results": results["results"], "seen": seen, "objectives": res.objectives},
                default=float,
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_evaluation_on_two_ranks_equals_the_single_process_result(
    tmp_path: Path, tiny: tuple[Any, Any]
) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_sharded_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    seen: list[int] = []
    ev = EvalConfig(tasks=["gsm8k", "arc_easy"], num_fewshot={"gsm8k": 5}, limit=6)
    single, _ = run_tasks(_Rules.hashing(seen), ev)
    expected = json.loads(json.dumps(single["results"], default=float))
    # Every rank holds the full result, equal to one process scoring everything (5-shot GSM8K
    # contexts included), while each rank scored half of the requests.
    assert ranks[0]["results"] == expected and ranks[1]["results"] == expected
    assert [a + b for a, b in zip(ranks[0]["seen"], ranks[1]["seen"], strict=True)] == seen
    assert all(s > 0 for s in ranks[0]["seen"] + ranks[1]["seen"])
    # The real HFLM path: the same objectives on both ranks and as a single process.
    model, tok = tiny
    alone = evaluate_model(
        model, tok, EvalConfig(tasks=["arc_challenge"], limit=6, proxy_samples=5)
    )
    assert ranks[0]["objectives"] == ranks[1]["objectives"]
    for k, v in alone.objectives.items():
        assert ranks[0]["objectives"][k] == pytest.approx(v, rel=1e-4), k
