"""The ``search.scheduler`` block: ASHA, population-based training at unloads, or none. No Ray.

::

    scheduler:                # ASHA on the cheap proxy at the trainer's report points
      type: asha
      metric: gsm8k_nll       # a metric the trainer reports during training (PROXY_METRICS)
      direction: minimize
      time_attr: samples
      grace_period: 96
      reduction_factor: 2

    scheduler:                # population-based training at PLoRA unloads (plora_ray.pbt)
      type: pbt_unload
      metric: gsm8k_nll
      direction: minimize
      quantile_fraction: 0.25 # the bottom quarter forks from the top quarter at each unload
      resample_probability: 0.25
      perturbation_factors: [1.2, 0.8]
      perturb: [optim.lr, plora.momentum]   # default: every searched per-stage setting
      burn_in_stages: 1       # no fork before this many unloads

The direction must favour the trials the objective favours (``check_scheduler_direction``), and
``pbt_unload`` needs what ``check_pbt`` lists of the rest of the search space.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal

from plora_ray.config.conversion import yaml_number
from plora_ray.config.stages import STAGE_KEYS
from plora_ray.objective import DIRECTIONS, ObjectiveSpec
from plora_ray.search_params import ParamSpec

__all__ = [
    "PROXY_METRICS",
    "SCHEDULER_TYPES",
    "TIME_ATTRS",
    "SchedulerSpec",
    "check_pbt",
    "check_scheduler_direction",
    "parse_scheduler",
]

# Metrics the trainer reports *during* training, usable by a scheduler.
PROXY_METRICS = ("gsm8k_nll", "mmlu_nll", "loss")
# Progress counters in the trainer's reports, usable as ASHA's time axis.
TIME_ATTRS = ("samples", "step", "training_iteration")
SCHEDULER_TYPES = ("asha", "pbt_unload", "none")


@dataclass
class SchedulerSpec:
    """The trial scheduler: ASHA or population-based training at unloads on a proxy metric the
    trainer reports, or none."""

    type: Literal["asha", "pbt_unload", "none"] = "none"
    metric: str = "gsm8k_nll"
    direction: str = "minimize"
    # asha
    time_attr: str = "samples"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 10**12
    # pbt_unload
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: tuple[float, float] = (1.2, 0.8)
    perturb: tuple[str, ...] = ()  # empty: every searched per-stage setting
    burn_in_stages: int = 1

    @property
    def ranks_trials(self) -> bool:
        """Whether the scheduler ranks trials by ``metric`` (ASHA and pbt_unload do)."""
        return self.type in ("asha", "pbt_unload")


_COMMON_KEYS = ("type", "metric", "direction")
_TYPE_KEYS = {
    "asha": ("time_attr", "grace_period", "reduction_factor", "max_t"),
    "pbt_unload": (
        "quantile_fraction",
        "resample_probability",
        "perturbation_factors",
        "perturb",
        "burn_in_stages",
    ),
    "none": (),
}


def parse_scheduler(raw: Any, problems: list[str]) -> SchedulerSpec:
    where = "search.scheduler"
    if raw is None or raw == "none":
        return SchedulerSpec(type="none")
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: expected a mapping (type: asha | pbt_unload | none), found {raw!r}"
        )
        return SchedulerSpec(type="none")
    spec = SchedulerSpec(type=raw.get("type", "asha"))
    if spec.type not in _TYPE_KEYS:
        problems.append(f"{where}.type: expected asha, pbt_unload or none, found {spec.type!r}")
        return SchedulerSpec(type="none")
    names = [f.name for f in dataclasses.fields(SchedulerSpec)]
    own = (*_COMMON_KEYS, *_TYPE_KEYS[spec.type])
    for k in raw:
        if k in own:
            continue
        if k in names:
            problems.append(
                f"{where}.{k}: not a setting of scheduler type {spec.type}; expected one of "
                f"{', '.join(own)}"
            )
            continue
        hint = difflib.get_close_matches(str(k), names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(f"{where}.{k}: unknown key{extra}; expected one of {', '.join(own)}")
    if spec.type == "none":
        return spec
    spec.metric = raw.get("metric", spec.metric)
    if spec.metric not in PROXY_METRICS:
        problems.append(
            f"{where}.metric: expected a metric the trainer reports during training "
            f"({', '.join(PROXY_METRICS)}), found {spec.metric!r}"
        )
    spec.direction = raw.get("direction", spec.direction)
    if spec.direction not in DIRECTIONS:
        problems.append(
            f"{where}.direction: expected maximize or minimize, found {spec.direction!r}"
        )
    if spec.type == "asha":
        _parse_asha(spec, raw, where, problems)
    else:
        _parse_pbt(spec, raw, where, problems)
    return spec


def _parse_asha(spec: SchedulerSpec, raw: dict[str, Any], where: str, problems: list[str]) -> None:
    spec.time_attr = raw.get("time_attr", spec.time_attr)
    if spec.time_attr not in TIME_ATTRS:
        problems.append(
            f"{where}.time_attr: expected one of {', '.join(TIME_ATTRS)}, found {spec.time_attr!r}"
        )
    for k, lo in (("grace_period", 1), ("max_t", 1)):
        v = raw.get(k, getattr(spec, k))
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            problems.append(f"{where}.{k}: expected an integer >= {lo}, found {v!r}")
        else:
            setattr(spec, k, v)
    rf = yaml_number(raw.get("reduction_factor", spec.reduction_factor))
    if rf is None or rf < 2:
        problems.append(
            f"{where}.reduction_factor: expected a finite number >= 2, found "
            f"{raw.get('reduction_factor')!r}"
        )
    else:
        spec.reduction_factor = rf
    if spec.grace_period > spec.max_t:
        problems.append(
            f"{where}: expected grace_period <= max_t, found grace_period="
            f"{spec.grace_period} > max_t={spec.max_t}"
        )


def _parse_pbt(spec: SchedulerSpec, raw: dict[str, Any], where: str, problems: list[str]) -> None:
    q = yaml_number(raw.get("quantile_fraction", spec.quantile_fraction))
    if q is None or not 0 < q <= 0.5:
        problems.append(
            f"{where}.quantile_fraction: expected a number in (0, 0.5] (the share of the "
            f"population that forks, and that is forked from), found "
            f"{raw.get('quantile_fraction')!r}"
        )
    else:
        spec.quantile_fraction = q
    r = yaml_number(raw.get("resample_probability", spec.resample_probability))
    if r is None or not 0 <= r <= 1:
        problems.append(
            f"{where}.resample_probability: expected a number in [0, 1], found "
            f"{raw.get('resample_probability')!r}"
        )
    else:
        spec.resample_probability = r
    factors = raw.get("perturbation_factors", list(spec.perturbation_factors))
    nums = [yaml_number(f) for f in factors] if isinstance(factors, list) else []
    if len(nums) != 2 or any(f is None or f <= 0 for f in nums):
        problems.append(
            f"{where}.perturbation_factors: expected a list of two positive numbers (e.g. "
            f"[1.2, 0.8]), found {factors!r}"
        )
    else:
        spec.perturbation_factors = (float(nums[0] or 0), float(nums[1] or 0))
    perturb = raw.get("perturb", [])
    if not isinstance(perturb, list) or not all(isinstance(k, str) for k in perturb):
        problems.append(
            f"{where}.perturb: expected a list of dotted keys of searched per-stage settings, "
            f"found {perturb!r}"
        )
    else:
        spec.perturb = tuple(perturb)
    b = raw.get("burn_in_stages", spec.burn_in_stages)
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        problems.append(f"{where}.burn_in_stages: expected an integer >= 1, found {b!r}")
    else:
        spec.burn_in_stages = b


def _section(base: dict[str, Any], name: str) -> dict[str, Any]:
    section = base.get(name)
    return section if isinstance(section, dict) else {}


def check_pbt(
    scheduler: SchedulerSpec,
    params: list[ParamSpec],
    base: dict[str, Any],
    num_samples: int,
    problems: list[str],
) -> None:
    """What ``pbt_unload`` needs of the rest of the search space: every trial a PLoRA run (a
    fork happens at an unload), per-stage settings to perturb among the searched params, a
    checkpoint and a proxy at every unload, and a population of at least two."""
    if scheduler.type != "pbt_unload":
        return
    where = "search.scheduler"
    searched = {p.key: p for p in params}
    method = searched.get("method")
    methods = set(method.values or []) if method is not None else {base.get("method", "plora")}
    if methods != {"plora"}:
        problems.append(
            f"{where}.type: pbt_unload forks trials at PLoRA unloads, so every trial must be "
            f"method plora; found method {sorted(map(str, methods))}"
        )
    if scheduler.perturb:
        for key in scheduler.perturb:
            if key not in STAGE_KEYS:
                problems.append(
                    f"{where}.perturb: expected settings that can change at an unload "
                    f"({', '.join(STAGE_KEYS)}), found {key!r}"
                )
            elif key not in searched:
                problems.append(
                    f"{where}.perturb: {key!r} has no distribution to perturb within; expected "
                    f"a key of search.params ({', '.join(searched) or 'none'})"
                )
    elif not [k for k in searched if k in STAGE_KEYS]:
        problems.append(
            f"{where}.perturb: pbt_unload perturbs per-stage settings searched in "
            f"search.params ({', '.join(STAGE_KEYS)}); found none among "
            f"{', '.join(searched) or 'no params'}"
        )
    ckpt = _section(base, "checkpoint")
    if ckpt.get("at_unload") is False:
        problems.append(
            "checkpoint.at_unload: pbt_unload forks from the checkpoint each unload writes; "
            "expected true, found false"
        )
    keep = ckpt.get("keep")
    if isinstance(keep, int) and not isinstance(keep, bool) and keep < 2:
        problems.append(
            "checkpoint.keep: pbt_unload copies a trial's unload checkpoint while it trains on; "
            f"expected an integer >= 2, found {keep}"
        )
    ev = _section(base, "eval")
    if ev.get("proxy_samples") == 0:
        problems.append(
            f"eval.proxy_samples: pbt_unload ranks trials by {scheduler.metric} at each unload; "
            "expected an integer >= 1, found 0"
        )
    if num_samples < 2:
        problems.append(
            f"search.num_samples: pbt_unload needs a population of at least 2, found {num_samples}"
        )


# The objective metrics each proxy tracks: those it rises and falls with, and those it moves
# against (an NLL falls as the accuracy it stands for rises).
_PROXY_TRACKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gsm8k_nll": (("gsm8k_nll",), ("gsm8k", "gsm8k_flexible")),
    "mmlu_nll": (
        ("mmlu_nll",),
        ("mmlu", "mmlu_humanities", "mmlu_stem", "mmlu_social_sciences", "mmlu_other"),
    ),
    "loss": (("final_loss",), ()),
}


def _opposite(direction: str) -> str:
    return "minimize" if direction == "maximize" else "maximize"


def check_scheduler_direction(
    scheduler: SchedulerSpec, objective: ObjectiveSpec | None, problems: list[str]
) -> None:
    """ASHA and pbt_unload must favour the trials the objective favours: a scheduler metric that
    tracks an objective metric needs the direction that metric implies (maximizing gsm8k means
    minimizing gsm8k_nll); otherwise ASHA stops the best trials and PBT forks the worst."""
    if objective is None or not scheduler.ranks_trials or scheduler.direction not in DIRECTIONS:
        return
    same, against = _PROXY_TRACKS.get(scheduler.metric, ((), ()))
    weights = objective.weights or (1.0,) * len(objective.metrics)
    implied: dict[str, tuple[str, str]] = {}  # objective metric -> (its direction, ASHA's)
    for metric, direction, weight in zip(objective.metrics, objective.directions, weights):
        if weight == 0:
            continue
        sense = direction if weight > 0 else _opposite(direction)
        if metric in same:
            implied[metric] = (sense, sense)
        elif metric in against:
            implied[metric] = (sense, _opposite(sense))
    wanted = {asha for _, asha in implied.values()}
    if len(wanted) == 1 and scheduler.direction not in wanted:
        (expected,) = wanted
        label, harm = (
            ("ASHA", "stop the best trials")
            if scheduler.type == "asha"
            else ("pbt_unload", "fork the worst trials")
        )
        tracked = ", ".join(f"{m} ({d})" for m, (d, _) in implied.items())
        problems.append(
            f"search.scheduler.direction: {label} ranks trials by {scheduler.metric}, which "
            f"tracks the objective's {tracked}, so it would {harm}; expected "
            f"{expected}, found {scheduler.direction!r}"
        )
