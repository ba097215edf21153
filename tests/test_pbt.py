"""pbt_unload: the scheduler block's checks, the explore step and the lineage (pure functions), and
a fork's run-directory seeding."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from plora_ray.config import ConfigError, config_from_dict
from plora_ray.config.stages import StageSchedule
from plora_ray.pbt import (
    PBT_KEY,
    fork_config,
    perturb_value,
    split_trial_config,
    stage_value,
    start_entry,
    trial_lineage,
)
from plora_ray.search_params import ParamSpec
from plora_ray.search_scheduler import SchedulerSpec
from plora_ray.search_space import load_search_space, parse_search_block
from plora_ray.trial_driver import FORK_FILE, seed_fork

ROOT = Path(__file__).resolve().parents[1]
SMOKE_PBT = ROOT / "search_spaces" / "smoke_pbt.yaml"

LR = ParamSpec(key="optim.lr", distribution="loguniform", low=1e-4, high=1e-2)
MOM = ParamSpec(key="plora.momentum", distribution="uniform", low=0.0, high=0.5)
EVERY = ParamSpec(key="plora.unload_every", distribution="int", low=16, high=64, step=16)
SCHED = ParamSpec(key="optim.schedule", distribution="choice", values=["constant", "cosine"])


def _pbt_block(**scheduler: Any) -> dict[str, Any]:
    return {
        "method": "plora",
        "search": {
            "num_samples": 4,
            "objective": {"metric": "gsm8k_nll", "direction": "minimize"},
            "scheduler": {"type": "pbt_unload", **scheduler},
            "params": {
                "optim.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
                "lora.rank": {"distribution": "choice", "values": [4, 8]},
            },
        },
    }


def _problems(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_search_block(data, "space.yaml")
    return str(err.value)


def test_shipped_smoke_pbt_validates() -> None:
    space = load_search_space(str(SMOKE_PBT))
    s = space.spec.scheduler
    assert s.type == "pbt_unload" and s.metric == "gsm8k_nll"
    assert space.spec.proxy_metric == "gsm8k_nll"
    cfg = space.config
    # Enough stages to fork in: an unload every 4 steps over the run.
    steps_per_stage = cfg.plora.unload_every // cfg.batch.global_batch
    assert cfg.train.max_steps // steps_per_stage >= 6


def test_pbt_block_defaults_and_settings() -> None:
    spec = parse_search_block(_pbt_block(quantile_fraction=0.5, perturbation_factors=[1.5, 0.5]))
    s = spec.scheduler
    assert (s.quantile_fraction, s.perturbation_factors, s.burn_in_stages) == (0.5, (1.5, 0.5), 1)


@pytest.mark.parametrize(
    ("scheduler", "data_change", "expected"),
    [
        ({"grace_period": 4}, {}, "grace_period: not a setting of scheduler type pbt_unload"),
        ({"quantile_fraction": 0.7}, {}, "quantile_fraction: expected a number in (0, 0.5]"),
        ({"perturbation_factors": [1.2]}, {}, "perturbation_factors: expected a list of two"),
        ({"burn_in_stages": 0}, {}, "burn_in_stages: expected an integer >= 1"),
        ({"perturb": ["lora.rank"]}, {}, "perturb: expected settings that can change"),
        ({"perturb": ["plora.momentum"]}, {}, "'plora.momentum' has no distribution"),
        ({"direction": "maximize"}, {}, "pbt_unload ranks trials by gsm8k_nll"),
        ({}, {"method": "lora"}, "every trial must be method plora"),
        ({}, {"checkpoint": {"at_unload": False}}, "checkpoint.at_unload: pbt_unload forks"),
        ({}, {"eval": {"proxy_samples": 0}}, "eval.proxy_samples: pbt_unload ranks"),
    ],
)
def test_pbt_block_problems(
    scheduler: dict[str, Any], data_change: dict[str, Any], expected: str
) -> None:
    data = _pbt_block(**scheduler)
    data.update(data_change)
    assert expected in _problems(data)


def test_pbt_needs_stage_settings_and_a_population_and_shared_storage() -> None:
    data = _pbt_block()
    data["search"]["params"] = {"lora.rank": {"distribution": "choice", "values": [4, 8]}}
    data["search"]["num_samples"] = 1
    data["search"]["storage"] = "s3://bucket/searches"
    msg = _problems(data)
    assert "pbt_unload perturbs per-stage settings" in msg
    assert "population of at least 2, found 1" in msg
    assert "search.storage: pbt_unload copies unload checkpoints" in msg


def test_perturb_numbers_stay_in_range_and_on_grid() -> None:
    spec = SchedulerSpec(type="pbt_unload", resample_probability=0.0)
    rng = random.Random(0)
    for _ in range(50):
        v, op = perturb_value(LR, 9e-3, spec, rng)
        assert 1e-4 <= v <= 1e-2 and op in ("* 1.2", "* 0.8")
        assert v in (pytest.approx(1e-2), pytest.approx(9e-3 * 0.8))
        n, _ = perturb_value(EVERY, 32, spec, rng)
        assert n in (32, 48) or n == 32  # 38.4 -> 32 or 48 on the step-16 grid; 25.6 -> 32
        assert (n - 16) % 16 == 0
    c, op = perturb_value(SCHED, "constant", spec, random.Random(1))
    assert c in ("constant", "cosine") and op in ("keep", "shift right")


def test_resample_draws_from_the_declared_distribution() -> None:
    spec = SchedulerSpec(type="pbt_unload", resample_probability=1.0)
    rng = random.Random(3)
    draws = [perturb_value(MOM, 0.1, spec, rng) for _ in range(20)]
    assert all(op == "resample" and 0.0 <= v <= 0.5 for v, op in draws)
    assert len({v for v, _ in draws}) > 10


def test_fork_config_appends_a_stage_and_inherits_the_lineage() -> None:
    spec = SchedulerSpec(type="pbt_unload", resample_probability=0.0)
    parent = {"optim.lr": 1e-3, "plora.momentum": 0.2}
    child = fork_config(
        parent,
        parent_id="p1",
        child_id="c1",
        stage=2,
        step=8,
        samples=64,
        parent_proxy=3.2,
        own_proxy=3.9,
        checkpoint="/s/forks/c1-0001/step_000008",
        spec=spec,
        params=[LR, MOM],
        rng=random.Random(0),
    )
    params, state = split_trial_config(child)
    assert state is not None and state["fork"]["from"] == "p1"
    assert state["fork"]["checkpoint"].endswith("step_000008")
    (entry,) = params["plora.stages"]
    assert entry["at"] == 2 and set(entry) == {"at", "optim.lr", "plora.momentum"}
    assert entry["optim.lr"] == pytest.approx(1e-3 * 1.2) or entry["optim.lr"] == pytest.approx(
        1e-3 * 0.8
    )
    # Stage 0 and 1 keep the parent's params; the new entry holds from stage 2.
    assert stage_value(params, "optim.lr", 1) == 1e-3
    assert stage_value(params, "optim.lr", 2) == entry["optim.lr"]
    lineage = state["lineage"]
    assert [e["stage"] for e in lineage] == [0, 2]
    assert lineage[0]["trial"] == "p1" and lineage[0]["parent"] is None
    assert lineage[1] | {"settings": None, "changes": None} == {
        "stage": 2,
        "step": 8,
        "samples": 64,
        "trial": "c1",
        "parent": "p1",
        "parent_proxy": 3.2,
        "proxy": 3.9,
        "settings": None,
        "changes": None,
    }
    # The child's params are a run config that validates and replays the schedule.
    cfg = config_from_dict({"method": "plora", "plora": {"unload_every": 32}}, overrides=params)
    assert StageSchedule(cfg).settings(2).optim.lr == pytest.approx(entry["optim.lr"])
    assert StageSchedule(cfg).settings(1).optim.lr == pytest.approx(1e-3)

    # A fork of the fork at stage 4 keeps stage 2's entry and its lineage; one at stage 2
    # again replaces stage 2's entry, keeping its other keys.
    grandchild = fork_config(
        child,
        parent_id="c1",
        child_id="g1",
        stage=4,
        step=16,
        samples=128,
        parent_proxy=3.0,
        own_proxy=3.5,
        checkpoint="/s/forks/g1-0002/step_000016",
        spec=spec,
        params=[LR],
        rng=random.Random(1),
    )
    gparams, gstate = split_trial_config(grandchild)
    assert [e["at"] for e in gparams["plora.stages"]] == [2, 4]
    assert gparams["plora.stages"][1]["optim.lr"] in (
        pytest.approx(entry["optim.lr"] * 1.2),
        pytest.approx(entry["optim.lr"] * 0.8),
    )
    assert gstate is not None
    assert [(e["stage"], e["trial"]) for e in gstate["lineage"]] == [
        (0, "p1"),
        (2, "c1"),
        (4, "g1"),
    ]
    again = fork_config(
        child,
        parent_id="c1",
        child_id="h1",
        stage=2,
        step=8,
        samples=64,
        parent_proxy=3.0,
        own_proxy=3.5,
        checkpoint="/x",
        spec=spec,
        params=[LR],
        rng=random.Random(2),
    )
    (e2,) = split_trial_config(again)[0]["plora.stages"]
    assert e2["plora.momentum"] == entry["plora.momentum"] and e2["at"] == 2


def test_lineage_of_a_trial_that_never_forked_is_its_start() -> None:
    config = {"optim.lr": 2e-3, "plora.momentum": 0.1}
    assert trial_lineage("t0", config) == [start_entry("t0", config)]
    assert PBT_KEY not in split_trial_config(config)[0]


def test_seed_fork_moves_the_old_run_aside_once(tmp_path: Path) -> None:
    fork_dir = tmp_path / "forks" / "c1-0001"
    ckpt = fork_dir / "step_000008"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    (fork_dir / "metrics.jsonl").write_text('{"step": 4}\n{"step": 8}\n')
    run = tmp_path / "runs" / "c1"
    (run / "ray" / "step_000004").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 4, "own": true}\n')
    fork = {"from": "p1", "stage": 2, "step": 8, "checkpoint": str(ckpt)}
    assert seed_fork(str(run), fork)
    assert (run / "ray" / "step_000008" / "state.json").is_file()
    assert not (run / "ray" / "step_000004").exists()
    assert not (run / "before_fork_1" / "ray").exists()  # checkpoints it never returns to
    assert (run / "before_fork_1" / "metrics.jsonl").read_text().startswith('{"step": 4, "own"')
    assert (run / "metrics.jsonl").read_text() == '{"step": 4}\n{"step": 8}\n'
    assert json.loads((run / FORK_FILE).read_text())["from"] == "p1"
    # Restarted (a pause, a retry, --resume) under the same fork: its own checkpoints stay.
    (run / "ray" / "step_000012").mkdir()
    assert not seed_fork(str(run), fork)
    assert (run / "ray" / "step_000012").is_dir()
    with pytest.raises(FileNotFoundError, match="checkpoint copy"):
        seed_fork(str(run), {**fork, "checkpoint": str(tmp_path / "gone")})
