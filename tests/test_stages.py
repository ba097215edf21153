"""Per-stage settings (``plora.stages``): validation names the entry and key, PLoRA takes each
stage's momentum, interval and optimizer settings at the unload that starts it, and a staged run
(real DeepSpeed and PLoRA on a tiny LLaMA, in a subprocess) logs them and resumes exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from plora_ray import cli
from plora_ray.config import (
    STAGE_KEYS,
    ConfigError,
    LoraConfig,
    ModelConfig,
    TinyModelConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from plora_ray.config.stages import StageSchedule
from plora_ray.lr_schedule import make_lr_scheduler
from plora_ray.model import load_model
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora, lora_pairs

VOCAB = 256
SMALL = TinyModelConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
)


def problems_of(plora: dict, **top: object) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict({**top, "plora": plora}, "run.yaml")
    return err.value.problems


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("entry", "key", "expected"),
    [
        ({"at": 1, "lora.rank": 4}, "plora.stages[1].lora.rank", "adapters' shapes"),
        ({"at": 1, "lora.alpha": 4}, "plora.stages[1].lora.alpha", "adapters' shapes"),
        ({"at": 1, "batch.global_batch": 8}, "plora.stages[1].batch.global_batch", "engine"),
        ({"at": 1, "deepspeed.zero_stage": 3}, "plora.stages[1].deepspeed.zero_stage", "engine"),
        ({"at": 1, "model.dtype": "float32"}, "plora.stages[1].model.dtype", "model is loaded"),
        ({"at": 1, "data.max_length": 64}, "plora.stages[1].data.max_length", "data pipeline"),
        ({"at": 1, "optim.grad_clip": 2.0}, "plora.stages[1].optim.grad_clip", "clipping"),
        ({"at": 1, "plora.unload_unit": "steps"}, "plora.stages[1].plora.unload_unit", "unit"),
    ],
)
def test_a_setting_that_needs_a_new_engine_or_adapter_is_refused_with_why(
    entry: dict, key: str, expected: str
) -> None:
    stages = [{"at": 1, "optim.lr": 1e-4}, {**entry, "at": 2}]
    (problem,) = problems_of({"stages": stages})
    assert problem.startswith(f"run.yaml: {key}: expected a setting that can change at an unload")
    assert "optim.lr" in problem and f"found {key.split('].', 1)[1]!r}" in problem
    assert expected in problem


def test_an_unknown_stage_key_gets_a_did_you_mean() -> None:
    (problem,) = problems_of({"stages": [{"at": 2, "optim.lrr": 1e-4}]})
    assert problem.startswith("run.yaml: plora.stages[0].optim.lrr: unknown key")
    assert "(did you mean 'plora.stages[0].optim.lr'?)" in problem and "expected at or" in problem


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ([{"at": 0, "optim.lr": 1e-4}], "plora.stages[0].at: expected an integer >= 1, found 0"),
        ([{"at": "two", "optim.lr": 1e-4}], "plora.stages[0].at: expected an integer >= 1"),
        ([{"at": True, "optim.lr": 1e-4}], "plora.stages[0].at: expected an integer >= 1"),
        ([{"at": 1.5, "optim.lr": 1e-4}], "plora.stages[0].at: expected an integer >= 1"),
        (
            [{"at": 3, "optim.lr": 1e-4}, {"at": 3, "optim.lr": 2e-4}],
            "plora.stages[1].at: expected an integer > 3 (the entry before starts at stage 3",
        ),
        (
            [{"at": 3, "optim.lr": 1e-4}, {"at": 2, "optim.lr": 2e-4}],
            "plora.stages[1].at: expected an integer > 3",
        ),
        ([{"optim.lr": 1e-4}], "plora.stages[0]: expected an 'at' key"),
        ([{"at": 2}], "plora.stages[0]: expected at least one setting besides at"),
        ([3], "plora.stages[0]: expected a mapping, found 3"),
    ],
)
def test_a_bad_at_or_entry_is_named_with_expected_and_found(stages: list, expected: str) -> None:
    problems = problems_of({"stages": stages})
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("plora.momentum", 1.5, "plora.stages[0].plora.momentum: expected a number in [0, 1)"),
        ("plora.unload_every", 0, "plora.stages[0].plora.unload_every: expected an integer >= 1"),
        ("optim.lr", -1.0, "plora.stages[0].optim.lr: expected a number > 0, found -1.0"),
        ("optim.lr", "fast", "plora.stages[0].optim.lr: expected a number, found 'fast'"),
        ("optim.betas", [0.9, 1.2], "plora.stages[0].optim.betas: expected two numbers in [0, 1)"),
        ("optim.schedule", "cosine", "(did you mean 'cosine_restart'?)"),
        ("optim.min_lr_ratio", 2.0, "plora.stages[0].optim.min_lr_ratio: expected a number in"),
    ],
)
def test_a_value_out_of_range_is_named_by_its_sections_own_check(
    setting: str, value: object, expected: str
) -> None:
    problems = problems_of({"stages": [{"at": 2, setting: value}]})
    assert len(problems) == 1 and expected in problems[0], problems


def test_stages_are_refused_for_a_method_without_unloads() -> None:
    (problem,) = problems_of({"stages": [{"at": 1, "optim.lr": 1e-4}]}, method="lora")
    assert "plora.stages: expected no stages with method 'lora'" in problem
    assert "found 1 entries" in problem


def test_validate_and_train_name_the_bad_entry_before_anything_starts(tmp_path, capsys) -> None:
    f = tmp_path / "staged.yaml"
    stages = [{"at": 2, "optim.lr": 5e-5}, {"at": 2, "lora.rank": 4, "plora.momentum": 2}]
    f.write_text(yaml.safe_dump({"plora": {"unload_every": 600, "stages": stages}}))
    assert cli.main(["validate", str(f)]) == 1
    err = capsys.readouterr().err
    assert "plora.stages[1].at: expected an integer > 2" in err
    assert "plora.stages[1].lora.rank: expected a setting that can change" in err
    assert "plora.stages[1].plora.momentum: expected a number in [0, 1), found 2" in err
    assert "Traceback" not in err
    # train refuses the file the same way, before Ray starts or the output directory is made.
    assert cli.main(["train", str(f), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(f) in err and "plora.stages[1].lora.rank" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_valid_schedule_loads_round_trips_and_gives_each_stage_its_settings(tmp_path) -> None:
    f = tmp_path / "staged.yaml"
    f.write_text(
        "plora:\n  unload_every: 600\n  momentum: 0.1\n  stages:\n"
        "    - {at: 2, optim.lr: 5e-5, plora.momentum: 0.3}\n"  # 5e-5: a string to YAML 1.1
        "    - {at: 4, optim.schedule: cosine_restart, plora.unload_every: 1200}\n"
    )
    cfg = load_config(f)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    schedule = StageSchedule(cfg)
    got = [schedule.settings(s).as_dict() for s in range(6)]
    assert [g["optim.lr"] for g in got] == [1e-4, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5]
    assert [g["plora.momentum"] for g in got] == [0.1, 0.1, 0.3, 0.3, 0.3, 0.3]
    assert [g["optim.schedule"] for g in got][3:5] == ["constant", "cosine_restart"]
    assert [g["plora.unload_every"] for g in got] == [600] * 4 + [1200] * 2
    assert set(got[0]) == set(STAGE_KEYS)
    assert not StageSchedule(config_from_dict({}))


# --------------------------------------------------------------------------- PLoRA with stages


def tiny_lora() -> torch.nn.Module:
    model = load_model(ModelConfig(tiny=SMALL, dtype="float32"), seed=0, vocab_size=VOCAB)
    torch.manual_seed(0)
    return attach_lora(model, LoraConfig(rank=4))


def randomise_B(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_pairs(model):
            p.B.copy_(torch.randn(p.B.shape, generator=g) * 0.02)


def staged(plora: dict, optim: dict | None = None):
    return config_from_dict({"plora": plora, "optim": optim or {}})


def test_the_unload_ending_a_stage_keeps_that_stages_momentum_times_B() -> None:
    cfg = staged({"momentum": 0.1, "stages": [{"at": 1, "plora.momentum": 0.6}]})
    model = tiny_lora()
    plora = PLoRA(model, cfg.plora, 4, 0, TorchParamAccess(None), stages=StageSchedule(cfg))
    for unload, m in enumerate([0.1, 0.6, 0.6]):  # unload k ends stage k
        randomise_B(model, seed=unload)
        before = {
            p.name: (p.base.detach().clone(), p.B.detach().clone()) for p in lora_pairs(model)
        }
        plora.unload(unload + 1, 4 * (unload + 1))
        for p in lora_pairs(model):
            w0, b0 = before[p.name]
            torch.testing.assert_close(p.B.detach(), m * b0, rtol=0, atol=0)
            delta = p.scaling * b0 @ p.A.detach()
            torch.testing.assert_close(p.base.detach() - w0, (1 - m) * delta, atol=1e-6, rtol=1e-4)


def unload_points(plora: PLoRA, first: int, last: int, batch: int) -> list[int]:
    """The sample counts at which ``plora`` unloads over steps ``first``..``last`` of ``batch``
    samples each."""
    out = []
    for step in range(first, last + 1):
        if plora.due(step, step * batch):
            plora.unload(step, step * batch)
            out.append(step * batch)
    return out


def test_a_new_unload_every_counts_points_from_the_point_that_ended_the_stage() -> None:
    # Samples, every 10 at 4 per step: points 10, 20, 30, 40 fire at 12, 20, 32, 40. With every 6
    # in stages 1-2, counted from the point that ended stage 0 (10): points 16, 22 fire at 16,
    # 24; stage 3 is back to 10 from point 22: points 32, 42 fire at 32, 44.
    base = {"unload_every": 10, "unload_unit": "samples"}
    plain = PLoRA(tiny_lora(), staged(base).plora, 4, 0, TorchParamAccess(None))
    assert unload_points(plain, 1, 12, 4) == [12, 20, 32, 40]
    stages = [{"at": 1, "plora.unload_every": 6}, {"at": 3, "plora.unload_every": 10}]
    cfg = staged({**base, "stages": stages})

    def build() -> PLoRA:
        return PLoRA(
            tiny_lora(), cfg.plora, 4, 0, TorchParamAccess(None), stages=StageSchedule(cfg)
        )

    whole = build()
    assert unload_points(whole, 1, 12, 4) == [12, 16, 24, 32, 44]
    # A PLoRA resumed from the state after the third unload continues on the same points.
    first = build()
    assert unload_points(first, 1, 6, 4) == [12, 16, 24]
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    assert resumed.cfg.unload_every == 10 and resumed.point_origin == 22
    assert unload_points(resumed, 7, 12, 4) == [32, 44]


def test_each_stage_restarts_the_lr_schedule_with_its_own_lr_and_optimizer_settings() -> None:
    cfg = staged(
        {"unload_every": 2, "unload_unit": "steps", "stages": [{"at": 2, "optim.lr": 5e-3}]},
        {"lr": 1e-3, "schedule": "warmup_restart", "warmup_steps": 2},
    )
    model = tiny_lora()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = make_lr_scheduler(opt, cfg.optim, 2)
    plora = PLoRA(
        model, cfg.plora, 4, 0, TorchParamAccess(opt), scheduler=sched, stages=StageSchedule(cfg)
    )
    later = staged(
        {
            "unload_every": 2,
            "unload_unit": "steps",
            "stages": [{"at": 1, "optim.betas": [0.5, 0.9], "optim.weight_decay": 0.1}],
        }
    )
    lrs = []
    for step in range(1, 9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if plora.due(step, 4 * step):
            plora.unload(step, 4 * step)
    # Stages 0 and 1 (steps 1-4) at 1e-3 with a 2-step warmup, stages 2 and 3 at 5e-3.
    assert lrs == pytest.approx([5e-4, 1e-3, 5e-4, 1e-3, 2.5e-3, 5e-3, 2.5e-3, 5e-3])
    assert opt.param_groups[0]["initial_lr"] == 5e-3
    # betas and weight decay reach the param groups AdamW reads at each step.
    opt2 = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched2 = make_lr_scheduler(opt2, later.optim, 2)
    p2 = PLoRA(
        model,
        later.plora,
        4,
        0,
        TorchParamAccess(opt2),
        scheduler=sched2,
        stages=StageSchedule(later),
    )
    p2.unload(2, 8)
    assert opt2.param_groups[0]["betas"] == (0.5, 0.9)
    assert opt2.param_groups[0]["weight_decay"] == 0.1


# --------------------------------------------------------------------------- a staged run

STAGED_YAML = """\
seed: 0
method: plora
model:
  tiny: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2,
         num_key_value_heads: 2}
  dtype: bfloat16
data:
  sources: [{path: "bundled:gsm8k"}]
  max_length: 96
  held_out: 0
  max_samples: 64
lora: {rank: 4, alpha: 8}
plora:
  unload_every: 2
  unload_unit: steps
  momentum: 0.1
  merge_rounding: stochastic
  stages:
    - {at: 1, plora.momentum: 0.5}
    - {at: 2, optim.lr: 3.0e-3, plora.unload_every: 3}
optim: {lr: 1.0e-3}
batch: {global_batch: 4, micro_batch: 2}
train: {epochs: 2, max_steps: 10, log_every: 1}
deepspeed: {enabled: true, zero_stage: 2, bf16: true}
resources: {num_workers: 1, cpus_per_worker: 1}
eval: {tasks: [gsm8k], at_end: false, proxy_samples: 0}
checkpoint: {at_unload: true, keep: 5, export_model: false}
"""

# An uninterrupted run, then the same run failing after step 5 and resumed from its newest
# checkpoint (step 4, the unload that starts stage 2), in a fresh process: run_in_process
# initialises torch.distributed for DeepSpeed.
RUNS = """\
import os, sys
from plora_ray.config import load_config
from plora_ray.executors import run_in_process
from plora_ray.preflight import FAULT_ENV
cfg, out = load_config(sys.argv[1]), sys.argv[2]
assert run_in_process(cfg, out + "/a").status == "completed"
os.environ[FAULT_ENV] = "5"
try:
    print("fault:", run_in_process(cfg, out + "/b"))
except Exception as exc:
    print("fault:", exc)
del os.environ[FAULT_ENV]
assert run_in_process(cfg, out + "/b", resume=True).status == "completed"
"""


@pytest.fixture(scope="module")
def staged_runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    d = tmp_path_factory.mktemp("staged")
    (d / "staged.yaml").write_text(STAGED_YAML)
    proc = subprocess.run(
        [sys.executable, "-c", RUNS, str(d / "staged.yaml"), str(d)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "injected fault" in proc.stdout, proc.stdout[-2000:]

    def rows(run: str) -> list[dict]:
        lines = (d / run / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("status") == "running"]

    return rows("a"), rows("b")


@pytest.mark.slow
def test_a_staged_run_logs_each_stages_lr_momentum_and_unload_points(staged_runs) -> None:
    a, _ = staged_runs
    assert [r["step"] for r in a] == list(range(1, 11))
    # Stage 1 starts at step 3, stage 2 (lr 3e-3, every 3 steps) at step 5: unloads at 2, 4,
    # then 4 + 3 = 7 and 10 (without the stage: 6, 8, 10).
    assert [r["step"] for r in a if r["unload"]] == [2, 4, 7, 10]
    assert [r["lr"] for r in a] == pytest.approx([1e-3] * 4 + [3e-3] * 6)
    assert [r["stage"] for r in a] == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    settings = {r["stage"]: r["stage_settings"] for r in a}
    assert [settings[s]["plora.momentum"] for s in range(5)] == [0.1, 0.5, 0.5, 0.5, 0.5]
    assert [settings[s]["optim.lr"] for s in range(5)] == [1e-3, 1e-3, 3e-3, 3e-3, 3e-3]
    assert [settings[s]["plora.unload_every"] for s in range(5)] == [2, 2, 3, 3, 3]


@pytest.mark.slow
def test_a_staged_run_resumed_mid_schedule_matches_the_uninterrupted_run(staged_runs) -> None:
    a, b = staged_runs
    keys = ("step", "loss", "lr", "stage", "unload", "stage_settings", "merge_rel_error")
    assert [{k: r[k] for k in keys} for r in b] == [{k: r[k] for k in keys} for r in a]
