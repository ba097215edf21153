"""The pre-flight check of a run's inputs (plora_ray.inputs_check): bad data and model inputs are
messages naming the file and line or the key, found before Ray starts by validate, train and
search. Fast: no Ray, no model is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest
import ray
import yaml

from plora_ray import cli
from plora_ray.config import ConfigError, DataSource, config_from_dict
from plora_ray.data import sources
from plora_ray.data.sources import load_source
from plora_ray.inputs_check import HUB_TIMEOUT_S, check_inputs

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def config(tmp_path: Path, **sections) -> object:
    return config_from_dict(sections, str(tmp_path / "run.yaml"))


def problems_of(cfg) -> list[str]:
    with pytest.raises(ConfigError) as info:
        check_inputs(cfg, "run.yaml")
    return info.value.problems


def one_source(tmp_path: Path, name: str, lines: list[bytes]) -> object:
    path = write_lines(tmp_path / name, lines)
    return config(tmp_path, data={"sources": [{"path": str(path)}]})


GOOD_LINE = json.dumps(GOOD).encode()


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([GOOD_LINE, b"{bad"], "bad.jsonl:2: expected a JSON object, found invalid JSON"),
        ([], "bad.jsonl: expected at least one valid record, found none"),
        (
            [GOOD_LINE, json.dumps({"text": "x"}).encode()],
            "bad.jsonl:2: expected a record with 'messages', 'conversations', or 'question' and "
            "'answer', found keys ['text']",
        ),
        (
            [json.dumps({"messages": [{"role": "human", "content": "a"}]}).encode()],
            "bad.jsonl:1: expected messages[0].role to be one of assistant, system, user, "
            "found 'human'",
        ),
        (
            [GOOD_LINE, GOOD_LINE.replace(b"hi", b"h\xffi")],
            "bad.jsonl:2: expected UTF-8 text, found the byte 0xff",
        ),
    ],
    ids=["corrupt-line", "empty-file", "no-messages", "wrong-role", "not-utf8"],
)
def test_a_bad_jsonl_source_is_refused_naming_file_line_expected_and_found(
    tmp_path, lines, expected
) -> None:
    problems = problems_of(one_source(tmp_path, "bad.jsonl", lines))
    assert len(problems) == 1
    assert problems[0].startswith("run.yaml: data.sources[0]: ")
    assert expected in problems[0]


def test_skip_invalid_lets_bad_lines_pass_but_not_a_source_without_a_valid_one(tmp_path) -> None:
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD_LINE, b"{bad"])
    empty = write_lines(tmp_path / "none.jsonl", [b"{bad"])
    cfg = config(tmp_path, data={"sources": [{"path": str(path)}], "skip_invalid": True})
    check_inputs(cfg)
    cfg = config(tmp_path, data={"sources": [{"path": str(empty)}], "skip_invalid": True})
    assert "none.jsonl: expected at least one valid record" in problems_of(cfg)[0]


def test_only_the_head_of_a_big_file_is_read(tmp_path, monkeypatch) -> None:
    path = write_lines(tmp_path / "big.jsonl", [GOOD_LINE] * 10 + [b"{bad"])
    monkeypatch.setattr(sources, "SAMPLE_BYTES", 3 * len(GOOD_LINE))
    check_inputs(config(tmp_path, data={"sources": [{"path": str(path)}]}))
    with pytest.raises(ValueError, match="big.jsonl:11: expected a JSON object"):
        load_source(DataSource(path=str(path)))  # the run itself reads every line


def test_a_directory_that_is_not_a_dataset_is_refused(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = config(tmp_path, data={"sources": [{"dataset": str(tmp_path / "empty")}]})
    (problem,) = problems_of(cfg)
    assert "data.sources[0]: " in problem
    assert (
        f"{tmp_path / 'empty'}: expected a directory written by datasets' save_to_disk" in problem
    )


def test_a_saved_dataset_with_bad_rows_names_the_row(tmp_path) -> None:
    rows = [GOOD, {"messages": [{"role": "bot", "content": "a"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = config(tmp_path, data={"sources": [{"dataset": str(tmp_path / "ds")}]})
    (problem,) = problems_of(cfg)
    assert "ds[train] row 1: expected messages[0].role to be one of" in problem


def model_dir(tmp_path: Path, *files: str) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    for name in files:
        (d / name).write_text("{}")
    return d


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            ["model.safetensors", "tokenizer.json"],
            "model.path: expected config.json in",
        ),
        (
            ["config.json", "tokenizer.json"],
            "model.path: expected weights in",
        ),
        (
            ["config.json", "model.safetensors"],
            "model.path (model.tokenizer unset): expected tokenizer files",
        ),
    ],
    ids=["no-config", "no-weights", "no-tokenizer"],
)
def test_a_model_directory_lacking_a_part_is_refused(tmp_path, files, expected) -> None:
    d = model_dir(tmp_path, *files)
    problems = problems_of(config(tmp_path, model={"path": str(d)}))
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_sharded_model_needs_every_shard_its_index_names(tmp_path) -> None:
    d = model_dir(tmp_path, "config.json", "tokenizer.json", "model-00001-of-00002.safetensors")
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    (problem,) = problems_of(config(tmp_path, model={"path": str(d)}))
    assert "model.safetensors.index.json: expected each shard" in problem
    assert "1 of 2 missing: model-00002-of-00002.safetensors" in problem
    (d / "model-00002-of-00002.safetensors").write_text("{}")
    check_inputs(config(tmp_path, model={"path": str(d)}))


def test_the_tiny_model_and_bundled_data_need_no_files(tmp_path) -> None:
    check_inputs(config(tmp_path))


def test_a_hub_id_is_refused_at_once_when_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    (problem,) = problems_of(config(tmp_path, model={"path": "no-such-org/no-such-model"}))
    assert time.perf_counter() - t0 < 2
    assert "found hub id 'no-such-org/no-such-model', which is not cached" in problem
    assert "download it (hf download no-such-org/no-such-model --local-dir DIR)" in problem


def test_an_unreachable_hub_is_refused_within_the_timeout(tmp_path, monkeypatch) -> None:
    # Online mode, with the hub endpoint a loopback port nothing listens on.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.perf_counter()
    (problem,) = problems_of(config(tmp_path, model={"path": "no-such-org/no-such-model"}))
    assert time.perf_counter() - t0 < HUB_TIMEOUT_S + 2
    assert f"no answer from the hub within {HUB_TIMEOUT_S:.0f} s" in problem


def bad_yaml(tmp_path: Path, search: bool) -> Path:
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD_LINE, b"{bad"])
    data: dict = {"data": {"sources": [{"path": str(bad)}]}}
    if search:
        data["search"] = {
            "num_samples": 1,
            "objective": {"metric": "gsm8k_nll", "direction": "minimize"},
            "params": {"lora.rank": {"distribution": "choice", "values": [4, 8]}},
        }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["validate", "train", "search"])
def test_each_command_refuses_bad_data_before_ray_starts(tmp_path, capsys, command) -> None:
    f = bad_yaml(tmp_path, search=command == "search")
    argv = {
        "validate": ["validate", str(f)],
        "train": ["train", str(f), "--output", str(tmp_path / "out")],
        "search": ["search", str(f), "--storage", str(tmp_path / "storage")],
    }[command]
    t0 = time.perf_counter()
    code = cli.main(argv)
    assert time.perf_counter() - t0 < 30  # Ray is not started (a start alone takes longer here)
    assert code == (1 if command == "validate" else 2)
    err = capsys.readouterr().err
    assert "data.sources[0]: " in err and "bad.jsonl:2: expected a JSON object" in err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists() and not (tmp_path / "storage").exists()
