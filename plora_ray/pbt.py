"""Population-based training at PLoRA unloads (``search.scheduler.type: pbt_unload``): the
explore step and the lineage, no Ray (``pbt_scheduler`` runs them inside Ray Tune's PBT).

An unload merges the adapter into the backbone and restarts the adapter, its optimizer state and
the LR schedule, so it is a natural fork point: the next stage can start from any trial's
backbone with other settings at no extra cost. At each unload a trial in the bottom
``quantile_fraction`` (by the proxy) takes a top trial's unload checkpoint (a copy of its
directory: the backbone's change as low-rank factors, the adapter, the optimizer and data state,
megabytes, not the backbone) and perturbs the settings of the stage that begins there.

A trial's config (Tune's ``trial.config``) is its dotted params, as in every search, plus
``PBT_KEY`` once it has forked: ``{"fork": {...}, "lineage": [...]}``. Its per-stage schedule is
the ``plora.stages`` param (``config.stages``): the parent's entries before the fork stage and an
entry at the fork stage with the perturbed settings, so the winner's params replay with
``plora-ray train`` like any run config.

Lineage entries (``TrialRecord.lineage``), one per stage whose settings were set::

    {"stage": 2, "step": 16, "samples": 128, "trial": "e5f6", "parent": "a1b2",
     "parent_proxy": 3.41, "proxy": 3.87, "settings": {"optim.lr": 3.6e-3},
     "changes": {"optim.lr": "* 1.2"}}

Stage 0's entry is the trial's start (``parent`` null, ``settings`` its sampled params). A forked
trial inherits its parent's entries before the fork stage (they name the ancestor in ``trial``).
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from typing import Any

import optuna

from plora_ray.config.stages import STAGE_KEYS
from plora_ray.search_params import ParamSpec, suggest
from plora_ray.search_scheduler import SchedulerSpec

__all__ = [
    "PBT_KEY",
    "fork_config",
    "perturb_value",
    "perturbed_keys",
    "split_trial_config",
    "stage_value",
    "start_entry",
    "trial_lineage",
]

# The trial-config key (beside the dotted params) of a forked trial's fork and lineage. Not a run
# config key: the trial driver takes it out before building the run config.
PBT_KEY = "_pbt"
STAGES_PARAM = "plora.stages"


def split_trial_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A trial's config as (its dotted params, its PBT state or None)."""
    params = {k: v for k, v in config.items() if k != PBT_KEY}
    state = config.get(PBT_KEY)
    return params, dict(state) if isinstance(state, dict) else None


def start_entry(trial_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """The lineage entry of a trial's start: its sampled params."""
    return {
        "stage": 0,
        "step": 0,
        "samples": 0,
        "trial": trial_id,
        "parent": None,
        "parent_proxy": None,
        "proxy": None,
        "settings": {k: v for k, v in params.items() if k != STAGES_PARAM},
        "changes": {},
    }


def trial_lineage(trial_id: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's lineage from its config: its forks' entries, or its start when it never forked."""
    params, state = split_trial_config(config)
    if state and isinstance(state.get("lineage"), list):
        return copy.deepcopy(state["lineage"])
    return [start_entry(trial_id, params)]


def perturbed_keys(spec: SchedulerSpec, params: list[ParamSpec]) -> list[str]:
    """The settings a fork perturbs: ``perturb``, else every searched per-stage setting."""
    if spec.perturb:
        return list(spec.perturb)
    return [p.key for p in params if p.key in STAGE_KEYS]


def stage_value(params: dict[str, Any], key: str, stage: int) -> Any:
    """The value of ``key`` in force at ``stage`` under ``params`` (its base value, then each
    ``plora.stages`` entry at or before the stage)."""
    value = params.get(key)
    for entry in params.get(STAGES_PARAM) or []:
        if isinstance(entry, dict) and int(entry.get("at", 0)) <= stage and key in entry:
            value = entry[key]
    return value


def _resample(p: ParamSpec, rng: random.Random) -> Any:
    """A fresh value from the param's own distribution (the search's sampling code, seeded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=rng.randrange(2**31))
        )
    return suggest(study.ask(), p)


def _clip(p: ParamSpec, value: float) -> Any:
    """A perturbed number put back inside the param's range and grid."""
    assert p.low is not None and p.high is not None
    v = min(max(value, p.low), p.high)
    if p.distribution == "int":
        step = p.step or 1
        v = p.low + round((v - p.low) / step) * step
        return int(min(max(v, p.low), p.high))
    if p.distribution == "qloguniform" and p.q is not None:
        v = min(max(round(v / p.q) * p.q, p.low), p.high)
        return int(round(v)) if p.is_int else v
    return float(v)


def perturb_value(
    p: ParamSpec, value: Any, spec: SchedulerSpec, rng: random.Random
) -> tuple[Any, str]:
    """Ray Tune PBT's explore for one setting, within the param's declared distribution: with
    ``resample_probability`` a fresh sample; else a number times one of
    ``perturbation_factors`` (clipped to the range and grid), a choice its neighbour in the
    list. Returns the value and what was done (for the lineage)."""
    if value is None or rng.random() < spec.resample_probability:
        return _resample(p, rng), "resample"
    if p.distribution == "choice":
        values = p.values or [value]
        i = values.index(value) if value in values else 0
        j = min(max(i + rng.choice((-1, 1)), 0), len(values) - 1)
        return values[j], "shift left" if j < i else "shift right" if j > i else "keep"
    factor = rng.choice(spec.perturbation_factors)
    out = _clip(p, float(value) * factor)
    if isinstance(out, float) and math.isfinite(out):
        out = float(f"{out:.6g}")
    return out, f"* {factor:g}"


def fork_config(
    parent_config: dict[str, Any],
    *,
    parent_id: str,
    child_id: str,
    stage: int,
    step: int,
    samples: int,
    parent_proxy: float | None,
    own_proxy: float | None,
    checkpoint: str,
    spec: SchedulerSpec,
    params: list[ParamSpec],
    rng: random.Random,
) -> dict[str, Any]:
    """The config of a trial that forks from ``parent_config`` at the unload that begins
    ``stage``: the parent's params with a ``plora.stages`` entry at ``stage`` holding the
    perturbed settings, and the fork (checkpoint to start from) and lineage under ``PBT_KEY``.

    Args:
        parent_config: the parent trial's config (params, maybe its own ``PBT_KEY``).
        parent_id: the parent's trial id.
        child_id: the id of the trial that forks (it keeps its id, Tune's trial object).
        stage: the stage that begins at the fork (the parent's number of unloads).
        step: the parent's optimizer step at the unload.
        samples: training samples the parent had seen at the unload.
        parent_proxy: the parent's proxy at the unload.
        own_proxy: the forking trial's last proxy (why it was replaced).
        checkpoint: where the copy of the parent's unload checkpoint is.
        spec: the pbt_unload scheduler settings.
        params: the search's params (the distributions to perturb within).
        rng: the scheduler's seeded random source.
    """
    parent_params, _ = split_trial_config(parent_config)
    by_key = {p.key: p for p in params}
    settings: dict[str, Any] = {}
    changes: dict[str, str] = {}
    for key in perturbed_keys(spec, params):
        if key not in by_key or key not in parent_params:
            continue  # inactive under the parent's params (a 'when' that does not hold)
        value, op = perturb_value(by_key[key], stage_value(parent_params, key, stage), spec, rng)
        settings[key], changes[key] = value, op
    entries = [dict(e) for e in parent_params.get(STAGES_PARAM) or [] if isinstance(e, dict)]
    at_stage = next((e for e in entries if int(e.get("at", 0)) == stage), {})
    entry = {**at_stage, "at": stage, **settings}
    new_entries = [e for e in entries if int(e.get("at", 0)) < stage]
    new_entries.append(entry)
    new_entries += [e for e in entries if int(e.get("at", 0)) > stage]
    child = dict(parent_params)
    child[STAGES_PARAM] = new_entries
    lineage = [e for e in trial_lineage(parent_id, parent_config) if int(e["stage"]) < stage]
    lineage.append(
        {
            "stage": stage,
            "step": step,
            "samples": samples,
            "trial": child_id,
            "parent": parent_id,
            "parent_proxy": parent_proxy,
            "proxy": own_proxy,
            "settings": settings,
            "changes": changes,
        }
    )
    fork = {"from": parent_id, "stage": stage, "step": step, "checkpoint": checkpoint}
    child[PBT_KEY] = {"fork": fork, "lineage": lineage}
    return child
