"""Search: the search block's validation and sampling (pure, fast), and real searches on a local
Ray with the real trainer (slow): records, ASHA, failures told to Optuna, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from plora_ray.config import ConfigError, load_yaml
from plora_ray.search_space import (
    apply_search_overrides,
    grid_points,
    parse_search_block,
    resolve_trial_executor,
    sample_params,
    validate_search_block,
)
from plora_ray.store import SearchDir, read_metrics
from plora_ray.validate import validate_file

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


def _space(search: dict, **run: object) -> dict:
    return {"model": {"tiny": {}}, **run, "search": search}


def _base_search(**extra: object) -> dict:
    s = {
        "objective": {"metric": "gsm8k", "direction": "maximize"},
        "params": {
            "method": {"distribution": "choice", "values": ["plora", "lora"]},
            "optim.lr": {"distribution": "loguniform", "low": 1e-5, "high": 1e-3},
            "plora.momentum": {
                "distribution": "uniform",
                "low": 0.0,
                "high": 0.5,
                "when": {"method": "plora"},
            },
        },
    }
    s.update(extra)
    return s


def _problems(search: dict, **run: object) -> list[str]:
    return validate_search_block(_space(search, **run), "space.yaml")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_search_space_validates_and_opens_with_its_command(path: Path) -> None:
    data = load_yaml(path)
    assert "search" in data, f"{path.name} has no search block"
    problems = validate_search_block(data, str(path))
    # paper_table1 / llama7b point at a user's model directory: only that may be missing here.
    problems = [p for p in problems if "model.path" not in p]
    assert problems == []
    head = path.read_text().splitlines()[:12]
    assert any("plora-ray search search_spaces/" + path.name in line for line in head), head


def test_valid_block_parses_with_conditions_and_points() -> None:
    spec = parse_search_block(
        _space(_base_search(points=[{"method": "plora", "optim.lr": 1e-4, "plora.momentum": 0.1}])),
        "s.yaml",
    )
    assert [p.key for p in spec.params] == ["method", "optim.lr", "plora.momentum"]
    assert spec.params[2].when == {"method": ["plora"]}
    assert spec.points == [{"method": "plora", "optim.lr": 1e-4, "plora.momentum": 0.1}]
    assert spec.objective.tune_metric == "objective" and spec.objective.tune_mode == "max"


def test_unknown_dotted_key_names_file_key_and_suggestion() -> None:
    s = _base_search()
    s["params"]["lora.rnak"] = {"distribution": "choice", "values": [1, 8]}
    (msg,) = _problems(s)
    assert msg.startswith("space.yaml: search.params.lora.rnak: unknown run-config key")
    assert "did you mean 'lora.rank'" in msg


def test_section_key_is_rejected_with_leaf_examples() -> None:
    s = _base_search()
    s["params"]["lora"] = {"distribution": "choice", "values": [1]}
    (msg,) = _problems(s)
    assert "search.params.lora: a section" in msg and "lora.rank" in msg


def test_low_above_high_is_reported_with_both_values() -> None:
    s = _base_search()
    s["params"]["optim.lr"] = {"distribution": "loguniform", "low": 1e-3, "high": 1e-5}
    (msg,) = _problems(s)
    assert "search.params.optim.lr: expected low <= high" in msg and "0.001" in msg


def test_bad_distribution_and_missing_fields() -> None:
    s = _base_search()
    s["params"]["lora.rank"] = {"distribution": "gaussian", "mean": 8}
    s["params"]["lora.alpha"] = {"distribution": "uniform", "low": 8}
    probs = _problems(s)
    assert any(
        "search.params.lora.rank.distribution: expected one of choice" in p and "'gaussian'" in p
        for p in probs
    )
    assert any(
        "search.params.lora.alpha.high: required for distribution 'uniform'" in p for p in probs
    )


def test_integer_key_rejects_float_distribution() -> None:
    s = _base_search()
    s["params"]["lora.rank"] = {"distribution": "uniform", "low": 1, "high": 8}
    (msg,) = _problems(s)
    assert "lora.rank is an integer" in msg and "'uniform'" in msg


def test_conditional_on_missing_key_is_reported() -> None:
    s = _base_search()
    s["params"]["plora.momentum"]["when"] = {"methd": "plora"}
    (msg,) = _problems(s)
    assert "search.params.plora.momentum.when.methd" in msg and "did you mean 'method'" in msg


def test_condition_value_that_can_never_hold_and_order() -> None:
    s = _base_search()
    s["params"]["plora.momentum"]["when"] = {"method": "plorra"}
    assert any("the condition could never hold" in p for p in _problems(s))
    s = _base_search()
    s["params"] = {"plora.momentum": s["params"]["plora.momentum"], "method": s["params"]["method"]}
    assert any("must be listed before plora.momentum" in p for p in _problems(s))


def test_bound_outside_run_config_range_uses_the_run_config_message() -> None:
    s = _base_search()
    s["params"]["plora.momentum"]["high"] = 1.5
    (msg,) = _problems(s)
    assert "search.params.plora.momentum: value 1.5 makes an invalid run config" in msg
    assert "plora.momentum: expected a number in [0, 1), found 1.5" in msg


def test_point_outside_distribution_or_inactive_param() -> None:
    s = _base_search(
        points=[{"method": "lora", "plora.momentum": 0.1}, {"method": "plora", "optim.lr": 0.5}]
    )
    probs = _problems(s)
    assert any("search.points[0].plora.momentum: the parameter is inactive" in p for p in probs)
    assert any(
        "search.points[1].optim.lr: expected a value of the distribution" in p for p in probs
    )


def test_point_numbers_yaml_reads_as_strings_are_numbers() -> None:
    # YAML 1.1 reads 1.0e10 (no exponent sign) as the string '1.0e10'.
    s = _base_search(
        points=yaml.safe_load("[{method: plora, optim.lr: 1.0e-4, plora.momentum: 1e-1}]")
    )
    s["params"]["optim.lr"]["high"] = "1.0e10"
    s["points"].append(yaml.safe_load("{method: lora, optim.lr: 1.0e10}"))
    assert s["points"][1]["optim.lr"] == "1.0e10"
    spec = parse_search_block(_space(s))
    assert spec.points[1] == {"method": "lora", "optim.lr": 1.0e10}
    assert spec.points[0]["plora.momentum"] == 0.1
    s["points"].append({"method": "lora", "optim.lr": "fast"})
    (msg,) = _problems(s)
    assert "search.points[2].optim.lr: expected a value of the distribution" in msg


def test_objective_scheduler_and_algorithm_errors_all_at_once() -> None:
    s = _base_search(
        algorithm="nsga2", scheduler={"type": "asha", "metric": "gsm8k", "grace_period": 0}
    )
    s["objective"] = {"metric": "gsm8kk", "direction": "maximize"}
    probs = _problems(s)
    assert any("search.objective.metric" in p and "did you mean 'gsm8k'" in p for p in probs)
    assert any("search.scheduler.metric: expected a metric the trainer reports" in p for p in probs)
    assert any(
        "search.scheduler.grace_period: expected an integer >= 1, found 0" in p for p in probs
    )
    s = _base_search(algorithm="nsga2")
    assert any("nsga2 is multi-objective" in p for p in _problems(s))


def test_trial_executor_auto_picks_actor_for_single_worker_trials_only() -> None:
    def executor(search: dict, **run: object) -> str:
        data = _space(search, **run)
        return resolve_trial_executor(parse_search_block(data), data)

    assert executor(_base_search()) == "actor"  # the run config's default: one worker
    assert executor(_base_search(), resources={"num_workers": 1}) == "actor"
    assert executor(_base_search(), resources={"num_workers": 4}) == "train"
    searched = _base_search()
    searched["params"]["resources.cpus_per_worker"] = {"distribution": "choice", "values": [1, 2]}
    assert executor(searched) == "train"
    assert executor(_base_search(trial_executor="train")) == "train"


def test_trial_executor_actor_needs_one_fixed_worker() -> None:
    probs = _problems(_base_search(trial_executor="actor"), resources={"num_workers": 2})
    assert any(
        "search.trial_executor: actor" in p and "expected resources.num_workers 1, found 2" in p
        for p in probs
    ), probs
    searched = _base_search(trial_executor="actor")
    searched["params"]["resources.gpus_per_worker"] = {"distribution": "choice", "values": [0, 1]}
    assert any(
        "search.params.resources.gpus_per_worker: with search.trial_executor actor" in p
        for p in _problems(searched)
    )
    probs = _problems(_base_search(trial_executor="ray"))
    assert probs == [
        "space.yaml: search.trial_executor: expected one of auto, train, actor, found 'ray'"
    ]


def test_pareto_and_weighted_objectives() -> None:
    spec = parse_search_block(
        _space(
            _base_search(
                algorithm="nsga2", objective={"pareto": {"gsm8k": "maximize", "mmlu": "maximize"}}
            )
        )
    )
    assert spec.objective.tune_metric == ["gsm8k", "mmlu"]
    assert spec.objective.tune_mode == ["max", "max"]
    spec = parse_search_block(
        _space(
            _base_search(
                objective={"weighted": {"gsm8k": 0.75, "mmlu": 0.25}, "direction": "maximize"}
            )
        )
    )
    assert spec.objective.value({"gsm8k": 0.4, "mmlu": 0.8}) == pytest.approx(0.5)
    assert spec.objective.value({"gsm8k": 0.4}) is None


def test_validate_command_reports_search_problems(tmp_path: Path) -> None:
    s = _base_search()
    s["params"]["lora.rnak"] = {"distribution": "choice", "values": [1]}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_space(s)))
    probs = validate_file(str(f))
    assert len(probs) == 1 and str(f) in probs[0] and "lora.rnak" in probs[0]
    out = subprocess.run(
        [sys.executable, "-m", "plora_ray.cli", "validate", str(f)], capture_output=True, text=True
    )
    assert out.returncode == 1 and "lora.rnak" in out.stderr
    # validate answers without importing Ray (it must be quick and work before Ray starts).
    code = (
        "import sys, plora_ray.validate as v; v.validate_file(sys.argv[1]); "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("field", "text"), [("low", ".inf"), ("high", ".nan"), ("low", "-.inf"), ("high", "inf")]
)
def test_non_finite_distribution_bounds_are_refused(field: str, text: str) -> None:
    s = _base_search()
    s["params"]["plora.momentum"][field] = yaml.safe_load(text) if text != "inf" else text
    probs = _problems(s)
    assert any(
        p.startswith(f"space.yaml: search.params.plora.momentum.{field}: expected a finite number")
        for p in probs
    ), probs


def test_non_finite_search_settings_are_refused() -> None:
    probs = _problems(_base_search(time_budget_s=float("inf")))
    assert probs == [
        "space.yaml: search.time_budget_s: expected a finite number > 0 or null, found inf"
    ]
    probs = _problems(_base_search(driver_cpus=float("nan")))
    want = (
        "space.yaml: search.driver_cpus: expected a finite number > 0 (Tune refuses a trial with "
        "an empty resource bundle; e.g. 0.01), found {}"
    )
    assert probs == [want.format("nan")]
    # 0 passed validation and then failed inside Tune (an empty bundle) once Ray had started.
    assert _problems(_base_search(driver_cpus=0)) == [want.format(0)]
    s = _base_search()
    s["params"]["optim.lr"] = {"distribution": "choice", "values": [1e-4, float("inf")]}
    assert any("optim.lr: expected a finite number, found inf" in p for p in _problems(s))


def _asha(objective: dict, metric: str, direction: str) -> list[str]:
    scheduler = {"type": "asha", "metric": metric, "direction": direction}
    return _problems(_base_search(objective=objective, scheduler=scheduler))


@pytest.mark.parametrize(
    ("objective", "metric", "direction"),
    [
        ({"metric": "gsm8k", "direction": "maximize"}, "gsm8k_nll", "maximize"),
        ({"metric": "gsm8k_nll", "direction": "minimize"}, "gsm8k_nll", "maximize"),
        ({"metric": "mmlu_stem", "direction": "maximize"}, "mmlu_nll", "maximize"),
        ({"metric": "final_loss", "direction": "minimize"}, "loss", "maximize"),
        (
            {"weighted": {"gsm8k": 0.7, "mmlu": 0.3}, "direction": "maximize"},
            "mmlu_nll",
            "maximize",
        ),
        ({"pareto": {"gsm8k": "maximize", "final_loss": "minimize"}}, "gsm8k_nll", "maximize"),
    ],
)
def test_asha_direction_that_contradicts_the_objective_is_refused(
    objective: dict, metric: str, direction: str
) -> None:
    probs = _asha(objective, metric, direction)
    assert len(probs) == 1, probs
    assert probs[0].startswith(
        f"space.yaml: search.scheduler.direction: ASHA ranks trials by {metric}"
    )
    assert probs[0].endswith(f"expected minimize, found {direction!r}")


@pytest.mark.parametrize(
    ("objective", "metric", "direction"),
    [
        # The proxy gsm8k_nll falls as gsm8k rises: minimised while gsm8k is maximised.
        ({"metric": "gsm8k", "direction": "maximize"}, "gsm8k_nll", "minimize"),
        ({"metric": "gsm8k_nll", "direction": "minimize"}, "gsm8k_nll", "minimize"),
        ({"metric": "final_loss", "direction": "minimize"}, "loss", "minimize"),
        # A proxy of a metric the objective does not use: nothing to compare.
        ({"metric": "arc_easy", "direction": "maximize"}, "mmlu_nll", "maximize"),
        # A negative weight turns the sense round: maximising -gsm8k means minimising gsm8k.
        ({"weighted": {"gsm8k": -1.0}, "direction": "maximize"}, "gsm8k_nll", "maximize"),
    ],
)
def test_asha_direction_consistent_with_the_objective_is_accepted(
    objective: dict, metric: str, direction: str
) -> None:
    assert _asha(objective, metric, direction) == []


@pytest.mark.parametrize("name", ["../../x", "..", ".", "/tmp/elsewhere", "a/b", "a\\b"])
@pytest.mark.parametrize("given_by", ["--name", "search.name"])
def test_a_search_name_that_leaves_the_storage_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, given_by: str
) -> None:
    from plora_ray import cli

    storage = tmp_path / "deep" / "storage"
    storage.mkdir(parents=True)
    argv = ["search", str(SPACES / "smoke.yaml"), "--storage", str(storage)]
    argv += ["--name", name] if given_by == "--name" else ["--set", f"search.name={name!r}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "search.name: expected a plain directory name" in err or (
        "search name: expected one directory name inside the storage" in err
    ), err
    assert list(tmp_path.rglob("*")) == [tmp_path / "deep", storage]
    # validate agrees on search.name.
    if given_by == "search.name":
        assert validate_file(str(SPACES / "smoke.yaml"), {"search.name": name}) != []


def test_validate_and_search_read_a_space_the_same_way(tmp_path: Path) -> None:
    from plora_ray.search_space import load_search_space

    overrides = {"search.algorithm": "cmaes", "lora.rank": 0, "search.params.optim.lr.low": 0}
    with pytest.raises(ConfigError) as err:
        load_search_space(str(SPACES / "smoke.yaml"), overrides)
    assert validate_file(str(SPACES / "smoke.yaml"), overrides) == err.value.problems
    assert any("search.algorithm" in p for p in err.value.problems)
    assert any("lora.rank" in p for p in err.value.problems)
    assert any("search.params.optim.lr.low" in p for p in err.value.problems)


# --------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_conditional_and_typed() -> None:
    s = _base_search()
    s["params"]["plora.unload_every"] = {
        "distribution": "qloguniform",
        "low": 24,
        "high": 480,
        "q": 24,
        "when": {"method": "plora"},
    }
    s["params"]["lora.rank"] = {"distribution": "int", "low": 2, "high": 16, "step": 2}
    spec = parse_search_block(_space(s))

    def run(seed: int) -> list[dict]:
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for i in range(12):
            t = study.ask()
            v = sample_params(spec, t, {})
            study.tell(t, float(i % 3))
            out.append(v)
        return out

    a, b = run(3), run(3)
    assert a == b and a != run(4)
    for v in a:
        assert ("plora.momentum" in v) == (v["method"] == "plora")
        assert ("plora.unload_every" in v) == (v["method"] == "plora")
        if "plora.unload_every" in v:
            assert isinstance(v["plora.unload_every"], int) and v["plora.unload_every"] % 24 == 0
            assert 24 <= v["plora.unload_every"] <= 480
        assert v["lora.rank"] % 2 == 0 and 2 <= v["lora.rank"] <= 16
        assert 1e-5 <= v["optim.lr"] <= 1e-3
    assert {v["method"] for v in a} == {"plora", "lora"}


def test_grid_drops_inactive_params_so_full_runs_once() -> None:
    s = {
        "algorithm": "grid",
        "objective": {"metric": "gsm8k", "direction": "maximize"},
        "params": {
            "method": {"distribution": "choice", "values": ["full", "lora", "plora"]},
            "lora.rank": {
                "distribution": "choice",
                "values": [1, 8],
                "when": {"method": ["lora", "plora"]},
            },
        },
    }
    spec = parse_search_block(_space(s))
    pts = grid_points(spec, {})
    assert pts == [
        {"method": "full"},
        {"method": "lora", "lora.rank": 1},
        {"method": "lora", "lora.rank": 8},
        {"method": "plora", "lora.rank": 1},
        {"method": "plora", "lora.rank": 8},
    ]
    assert spec.num_samples == 5


def test_set_overrides_reach_dotted_params_and_run_config() -> None:
    data = _space(_base_search(num_samples=8))
    out = apply_search_overrides(
        data,
        {"search.params.plora.momentum.high": 0.3, "search.num_samples": 2, "train.max_steps": 4},
    )
    assert out["search"]["params"]["plora.momentum"]["high"] == 0.3
    assert out["search"]["num_samples"] == 2 and out["train"]["max_steps"] == 4
    assert data["search"]["num_samples"] == 8  # the input is not modified


def test_search_dir_writes_records_atomically(tmp_path: Path) -> None:
    sdir = SearchDir(str(tmp_path), "s")
    sdir.write_json("trials/abc.json", {"trial_id": "abc", "status": "completed"})
    rec = sdir.trial_record("abc")
    assert rec is not None and (rec.trial_id, rec.status) == ("abc", "completed")
    assert [p.name for p in (tmp_path / "s" / "trials").iterdir()] == ["abc.json"]
    sdir.write_json("trials/run.json", {"status": "running"})
    assert sdir.trial_record("run") is None and sdir.trial_record("nope") is None


# --------------------------------------------------------------------------- end to end


def _records(sdir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted((sdir / "trials").glob("*.json")):
        rec = json.loads(p.read_text())
        out[rec["trial_id"]] = rec
    return out


@pytest.mark.slow
# The Train executor's variant is in the full suite only (-m full): its driver kill and resume
# take ~5 min here, and the default run covers the Train executor's trials elsewhere (a killed
# Train worker retried, Train runs on URI storage, the jobs and rehearsal paths).
@pytest.mark.parametrize("executor", ["actor", pytest.param("train", marks=pytest.mark.full)])
def test_search_survives_sigkill_of_its_driver_and_resume_loses_nothing(
    tmp_path: Path, executor: str
) -> None:
    """A real search (real trainer, tiny model) on a loopback head: a point that diverges is
    recorded as diverged and told to Optuna as FAIL; the driver is SIGKILLed after the first
    finished trial; --resume finishes the search without re-running or losing a finished trial.
    Once with trials in their own reused Tune actors, once with a Ray Train run per trial."""
    import ray_helpers as helpers  # tests/ is on sys.path (rootdir conftest-less layout)

    storage = tmp_path / "st"
    sets = [
        "search.num_samples=3",
        "train.max_steps=4",
        "eval.limit=2",
        # GSM8K only (the objective): MMLU's 57 subjects would cost more than the training.
        "eval.tasks=[gsm8k]",
        "eval.num_fewshot={gsm8k: 0}",
        "eval.max_gen_toks=8",
        "data.max_samples=64",
        "plora.unload_every=16",
        # ASHA's first rung beyond these 32-sample trials: whether the LoRA point completes
        # must not depend on which concurrent trial reaches a rung first (ASHA's stopping has
        # its own test below).
        "search.scheduler.grace_period=64",
        "search.max_concurrent=2",
        f"search.trial_executor={executor}",
        # A reliable divergence under the real engine: the tiny model's loss is bounded
        # (RMSNorm before a frozen head) and DeepSpeed's bf16 step keeps even lr=1e10 finite,
        # but a decoupled weight decay of 1e30 blows the LoRA weights up to inf in one step,
        # so step 2's loss is NaN (seeded; checked with build_engine outside Ray).
        "search.params.optim.weight_decay={distribution: choice, values: [0.0, 1.0e+30]}",
        "search.params.plora.unload_every={distribution: choice, values: [16, 32], "
        "when: {method: plora}}",
        "search.points=[{method: plora, optim.lr: 1.0e-3, lora.rank: 8, plora.momentum: 0.1, "
        "plora.unload_every: 16, optim.weight_decay: 1.0e+30}, "
        "{method: lora, optim.lr: 0.001, lora.rank: 4, optim.weight_decay: 0.0}]",
    ]
    # A relative --storage, run from tmp_path: what users get by default (runs/search). Tune runs
    # each trial in a working directory of its own, so the search must make it absolute first.
    cmd = [
        sys.executable,
        "-m",
        "plora_ray.cli",
        "search",
        str(SPACES / "smoke.yaml"),
        "--storage",
        storage.name,
        "--name",
        "r",
        "--set",
        *sets,
    ]
    sdir = storage / "r"
    with helpers.ray_head(num_cpus=4) as head:
        # Ray sends the token to an explicit address (RAY_ADDRESS) only in token mode.
        env = {**helpers.ray_defaults_env(), "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token"}
        log1 = tmp_path / "run1.log"
        with open(log1, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                if (sdir / "trials").is_dir() and list((sdir / "trials").glob("*.json")):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, (
                "the search ended before it could be killed:\n" + log1.read_text()[-3000:]
            )
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        before = _records(sdir)
        assert before, log1.read_text()[-3000:]
        # What a re-run would rewrite: the trainer's metrics of each finished trial.
        stamps = {
            tid: os.stat(Path(r["run_dir"]) / "metrics.jsonl").st_mtime_ns
            for tid, r in before.items()
            if (Path(r["run_dir"]) / "metrics.jsonl").exists()
        }
        time.sleep(2)
        out = subprocess.run(
            cmd + ["--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    after = _records(sdir)
    # Every trial of the budget finished exactly once; the records of before are untouched.
    assert len(after) == 3, sorted(after)
    # Each trained trial's run (metrics, checkpoints) lives under the search directory.
    for rec in after.values():
        if rec["status"] in ("completed", "diverged"):
            assert (Path(rec["run_dir"]) / "metrics.jsonl").is_file(), rec["run_dir"]
            assert Path(rec["run_dir"]).is_relative_to(sdir), rec["run_dir"]
    for tid, rec in before.items():
        assert after[tid] == rec
    # ... and none of them trained again after --resume.
    for tid, ns in stamps.items():
        assert os.stat(Path(before[tid]["run_dir"]) / "metrics.jsonl").st_mtime_ns == ns, tid
    # Each record is one Tune trial; a trial the killed driver had launched after its last
    # snapshot leaves a directory without a record (it never finished, so nothing is lost).
    tune_trials = {p.name[len("trial_") :] for p in sdir.iterdir() if p.name.startswith("trial_")}
    assert set(after) <= tune_trials and len(tune_trials) <= 3 + 2, tune_trials
    statuses = {r["status"] for r in after.values()}
    assert statuses <= {"completed", "early_stopped", "diverged", "failed"}
    # The weight-decay-1e30 point diverges (NaN loss) at step 2: recorded with its step and
    # reason, no objective, and told to Optuna as FAIL.
    diverged = [
        r
        for r in after.values()
        if r["params"]
        == {
            "method": "plora",
            "optim.lr": 1.0e-3,
            "lora.rank": 8,
            "plora.momentum": 0.1,
            "plora.unload_every": 16,
            "optim.weight_decay": 1.0e30,
        }
    ]
    assert len(diverged) == 1, [r["params"] for r in after.values()]
    div = diverged[0]
    assert div["status"] == "diverged", div
    assert div["diverged_step"] == 2 and "not finite" in div["reason"], div
    assert div["objective_value"] is None and div["objectives"] == {}
    lora = [
        r
        for r in after.values()
        if r["params"]
        == {"method": "lora", "optim.lr": 0.001, "lora.rank": 4, "optim.weight_decay": 0.0}
    ]
    assert len(lora) == 1 and lora[0]["status"] == "completed"
    assert lora[0]["objectives"]["gsm8k_nll"] == pytest.approx(lora[0]["objective_value"])
    # The study kept every trial; the diverged one is FAIL, the finished ones COMPLETE/PRUNED.
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{sdir / 'study.db'}")
    by_tune = {
        t.user_attrs.get("tune_trial_id"): t
        for t in study.trials
        if t.user_attrs.get("status") != "orphaned"
    }
    assert set(after) <= set(by_tune), (sorted(after), sorted(k for k in by_tune if k))
    assert by_tune[div["trial_id"]].state == optuna.trial.TrialState.FAIL
    assert by_tune[div["trial_id"]].user_attrs["status"] == "diverged"
    assert by_tune[lora[0]["trial_id"]].state == optuna.trial.TrialState.COMPLETE
    assert by_tune[lora[0]["trial_id"]].value == pytest.approx(lora[0]["objective_value"])
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # Every record's study trial is in the state its status implies, with its value.
    state_of = {
        "completed": optuna.trial.TrialState.COMPLETE,
        "early_stopped": optuna.trial.TrialState.PRUNED,
        "diverged": optuna.trial.TrialState.FAIL,
        "failed": optuna.trial.TrialState.FAIL,
    }
    for tid, rec in after.items():
        assert by_tune[tid].state == state_of[rec["status"]], (rec["status"], by_tune[tid])
        if rec["status"] == "completed":
            assert by_tune[tid].value == pytest.approx(rec["objective_value"])
    # Orphans (asked by the killed driver after its last snapshot) are at most the trials that
    # driver could have had in flight, and every sampled config the study holds is accounted for.
    orphans = [t for t in study.trials if t.user_attrs.get("status") == "orphaned"]
    assert len(orphans) <= 2 and len(study.trials) == len(by_tune) + len(orphans)
    # One summary line per trial finished by the resumed driver.
    for tid in set(after) - set(before):
        assert f"[trial {tid}]" in out.stdout


@pytest.mark.slow
def test_asha_stops_the_trial_behind_its_peer_at_the_first_rung(tmp_path: Path) -> None:
    """Two LoRA trials one after the other (one slot, so the order is fixed): LR 3e-3 reaches
    ASHA's rung at 16 samples first and goes on; LR 1e-7 has barely moved from the initial
    model's NLL when it reaches the rung, is behind, and is stopped there: recorded as
    early_stopped, PRUNED in the study, its run cut at the rung."""
    import ray_helpers as helpers

    sets = [
        "search.num_samples=2",
        "search.max_concurrent=1",
        "train.max_steps=4",
        "eval.limit=2",
        # GSM8K only (the objective): MMLU's 57 subjects would cost more than the training.
        "eval.tasks=[gsm8k]",
        "eval.num_fewshot={gsm8k: 0}",
        "eval.max_gen_toks=8",
        "data.max_samples=64",
        "plora.unload_every=16",
        "search.scheduler.grace_period=16",
        "search.params.optim.lr={distribution: loguniform, low: 1.0e-8, high: 3.0e-3}",
        "search.points=[{method: lora, optim.lr: 3.0e-3, lora.rank: 8}, "
        "{method: lora, optim.lr: 1.0e-7, lora.rank: 8}]",
    ]
    cmd = [
        sys.executable,
        "-m",
        "plora_ray.cli",
        "search",
        str(SPACES / "smoke.yaml"),
        "--storage",
        str(tmp_path / "st"),
        "--name",
        "asha",
        "--set",
        *sets,
    ]
    with helpers.ray_head(num_cpus=2) as head:
        # Ray sends the token to an explicit address (RAY_ADDRESS) only in token mode.
        env = {**helpers.ray_defaults_env(), "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    sdir = tmp_path / "st" / "asha"
    by_lr = {r["params"]["optim.lr"]: r for r in _records(sdir).values()}
    good, bad = by_lr[3.0e-3], by_lr[1.0e-7]
    assert good["status"] == "completed", good["reason"]
    assert bad["status"] == "early_stopped", (bad["status"], bad["reason"])
    assert bad["reason"] == "stopped by ASHA on gsm8k_nll"
    assert bad["objective_value"] is None
    # Stopped at the rung (16 samples = step 2 of 4): no step after it, no final report.
    steps = [
        m["step"]
        for m in read_metrics(Path(bad["run_dir"]) / "metrics.jsonl")
        if m.get("status") == "running"
    ]
    assert steps and max(steps) == 2, steps
    assert not (Path(bad["run_dir"]) / "model").exists()
    study = optuna.load_study(study_name="asha", storage=f"sqlite:///{sdir / 'study.db'}")
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    assert by_tune[good["trial_id"]].state == optuna.trial.TrialState.COMPLETE
    pruned = by_tune[bad["trial_id"]]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    # The stopped trial's study entry says what its record says: status, reason, proxy, cost,
    # run directory; its proxy at the rung (step 2) is its intermediate value, and Optuna keeps
    # that last value as the pruned trial's value.
    assert pruned.user_attrs["status"] == "early_stopped"
    assert pruned.user_attrs["reason"] == bad["reason"]
    assert pruned.user_attrs["run_dir"] == bad["run_dir"]
    assert pruned.user_attrs["objectives"] == {} and pruned.user_attrs["model_path"] is None
    assert pruned.user_attrs["wall_time_s"] == pytest.approx(bad["wall_time_s"], abs=1.0)
    assert pruned.intermediate_values == {2: pytest.approx(bad["proxy"])}
    assert pruned.value == pytest.approx(bad["proxy"])
    assert f"[trial {bad['trial_id']}] early_stopped" in out.stdout


@pytest.mark.slow
def test_an_interrupted_search_prints_the_resume_command_that_finishes_it(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) of the search driver while a trial trains: the driver ends with exit 130
    and the exact --resume command (with the --set overrides the file is read with again); that
    command, run as printed, finishes the search."""
    import shlex

    import ray_helpers as helpers

    sets = [
        "search.num_samples=1",
        "train.max_steps=4",
        "eval.limit=2",
        # GSM8K only (the objective): MMLU's 57 subjects would cost more than the training.
        "eval.tasks=[gsm8k]",
        "eval.num_fewshot={gsm8k: 0}",
        "eval.max_gen_toks=8",
        "data.max_samples=64",
        "plora.unload_every=16",
        "search.points=[{method: lora, optim.lr: 1.0e-3, lora.rank: 8}]",
    ]
    storage = tmp_path / "st"
    cmd = ["search", str(SPACES / "smoke.yaml"), "--storage", str(storage), "--name", "int"]
    cmd += ["--set", *sets]
    cli = [sys.executable, "-m", "plora_ray.cli"]
    sdir = storage / "int"
    with helpers.ray_head(num_cpus=2) as head:
        env = {**helpers.ray_defaults_env(), "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token"}
        proc = subprocess.Popen(
            cli + cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        deadline = time.time() + 240
        # The trial is training once its run directory has metrics.
        while time.time() < deadline and proc.poll() is None:
            if list(sdir.glob("trial_*")) and list(sdir.glob("runs/*/metrics.jsonl")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        printed, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, printed
        lines = printed.splitlines()
        at = lines.index("interrupted; continue with:")
        resume = shlex.split(lines[at + 1])
        assert resume[:2] == ["plora-ray", "search"] and "--resume" in resume, resume
        out = subprocess.run(cli + resume[1:], capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    (rec,) = _records(sdir).values()
    assert rec["status"] == "completed", rec
    assert f"[trial {rec['trial_id']}] completed" in out.stdout


@pytest.mark.slow
def test_resume_extend_num_samples_runs_the_extra_trials_and_refuses_other_keys(
    tmp_path: Path,
) -> None:
    """A finished 2-sample search resumed with --extend search.num_samples=3 runs exactly one
    more trial (Tune restores its old sample count unless told), records the extension in
    search.json and shows it on the board; --extend of any other key is refused before Ray."""
    import ray_helpers as helpers

    sets = [
        "search.num_samples=2",
        "search.max_concurrent=1",
        "search.scheduler=none",
        "train.max_steps=2",
        "eval.limit=2",
        # GSM8K only (the objective): MMLU's 57 subjects would cost more than the training.
        "eval.tasks=[gsm8k]",
        "eval.num_fewshot={gsm8k: 0}",
        "eval.max_gen_toks=8",
        "data.max_samples=64",
    ]
    storage = tmp_path / "st"
    cli = [sys.executable, "-m", "plora_ray.cli", "search", str(SPACES / "smoke.yaml")]
    cmd = [*cli, "--storage", str(storage), "--name", "x", "--set", *sets]
    sdir = storage / "x"
    with helpers.ray_head(num_cpus=2) as head:
        env = {**helpers.ray_defaults_env(), "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert len(_records(sdir)) == 2
        refused = subprocess.run(
            [*cmd, "--resume", "--extend", "lora.rank=16"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "--extend lora.rank: expected one of search.num_samples" in refused.stderr
        out = subprocess.run(
            [*cmd, "--resume", "--extend", "search.num_samples=3"],
            capture_output=True,
            text=True,
            env=env,
            timeout=400,
        )
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert len(_records(sdir)) == 3
    meta = json.loads((sdir / "search.json").read_text())
    (ext,) = meta["extensions"]
    assert (ext["key"], ext["old"], ext["new"]) == ("search.num_samples", 2, 3)
    assert "search.num_samples 2 -&gt; 3" in (sdir / "leaderboard" / "index.html").read_text()
