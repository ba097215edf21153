"""Hyperparameter search: a YAML search space -> Ray Tune + OptunaSearch (+ ASHA), one trainer run
per trial, a search directory the leaderboard reads.

A search space is a run config plus a ``search:`` block::

    search:
      algorithm: tpe            # tpe (default) | nsga2 | motpe | random | grid
      seed: 0                   # seeds the Optuna sampler, so a search is repeatable
      num_samples: 6            # trials (grid: default = grid size)
      max_concurrent: 2         # trials at once (default: what the cluster's CPUs/GPUs fit)
      time_budget_s: 900        # stop starting new trials after this many seconds (null: none)
      trial_executor: auto      # auto | train | actor: where a trial trains (see below)
      driver_cpus: 1            # train: CPUs of a trial's driver (the Tune trial); workers on top
      max_retries: 0            # Ray FailureConfig(max_failures): re-runs of a crashed trial
      storage: runs/search      # local path or s3:// / gs:// URI (Tune RunConfig.storage_path)
      study_storage: null       # null: SQLite file <search dir>/study.db; or a database URL
      objective:                # one of: metric+direction | weighted+direction | pareto
        metric: gsm8k
        direction: maximize
      scheduler:                # ASHA on the cheap proxy at the trainer's report points, or none
        type: asha
        metric: gsm8k_nll
        direction: minimize
        time_attr: samples
        grace_period: 96
        reduction_factor: 2
      params:                   # dotted keys of the run config -> distribution
        method: {distribution: choice, values: [plora, lora]}
        optim.lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}
        plora.momentum: {distribution: uniform, low: 0.0, high: 0.5, when: {method: plora}}
        plora.unload_every: {distribution: int, low: 48, high: 480, step: 48}
      points:                   # tried first, in order (the paper's configuration)
        - {method: plora, optim.lr: 1.0e-4, plora.momentum: 0.1}

Where a trial trains (``trial_executor``):

* ``train``: the Tune trial drives a Ray Train run of its own (``train.run_training``: a
  ``TorchTrainer`` with ``resources.num_workers`` workers, Train inside Tune). Any number of
  workers; every trial starts a Train controller and its worker processes afresh, a fixed cost of
  ~10-25 s per trial on a small CPU machine (``benchmarks/search_overhead.py``), nothing beside a
  GPU trial of hours.
* ``actor``: single-worker trials train inside the Tune trial actor itself
  (``train.run_in_process``: the same worker loop, world size 1), and Tune reuses the actor for
  the next trial (``reuse_actors``), so the process, its imports and its process group are paid
  once per concurrent slot instead of once per trial. A trial takes ``resources.cpus_per_worker``
  CPUs and ``gpus_per_worker`` GPUs (no separate driver CPU).
* ``auto`` (default): ``actor`` when every trial has one worker (``resources.num_workers`` 1 and
  no ``resources.*`` parameter), else ``train``.

Every problem of the block is reported at once, naming the file, the key, what was expected and
what was found, before Ray is imported (``plora-ray validate`` runs ``validate_search_block``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import importlib
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from plora_ray.config import ConfigError, RunConfig, config_from_dict

__all__ = [
    "OBJECTIVE_METRICS",
    "ObjectiveSpec",
    "ParamSpec",
    "SchedulerSpec",
    "SearchSpec",
    "grid_points",
    "parse_search_block",
    "sample_params",
    "search_command",
    "validate_search_block",
]

# Metrics a trial can be judged on: the evaluation's objectives (plora_ray.evaluate) plus the
# training loss at the end. *_nll and final_loss are naturally minimised, the rest maximised.
OBJECTIVE_METRICS = (
    "gsm8k",
    "gsm8k_flexible",
    "mmlu",
    "mmlu_humanities",
    "mmlu_stem",
    "mmlu_social_sciences",
    "mmlu_other",
    "arc_easy",
    "arc_challenge",
    "gsm8k_nll",
    "mmlu_nll",
    "final_loss",
)
# Metrics the trainer reports *during* training, usable by the early-stopping scheduler.
PROXY_METRICS = ("gsm8k_nll", "mmlu_nll", "loss")
# Progress counters in the trainer's reports, usable as ASHA's time axis.
TIME_ATTRS = ("samples", "step", "training_iteration")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "qloguniform")
ALGORITHMS = ("tpe", "nsga2", "motpe", "random", "grid")
TRIAL_EXECUTORS = ("auto", "train", "actor")
DIRECTIONS = ("maximize", "minimize")

# Fields allowed per distribution (besides `distribution` and `when`), and the ones required.
_DIST_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "choice": ({"values"}, {"values"}),
    "uniform": ({"low", "high"}, {"low", "high"}),
    "loguniform": ({"low", "high"}, {"low", "high"}),
    "int": ({"low", "high", "step", "log"}, {"low", "high"}),
    "qloguniform": ({"low", "high", "q"}, {"low", "high", "q"}),
}


# --------------------------------------------------------------------------- spec objects


@dataclass
class ParamSpec:
    """One searched dotted key of the run config."""

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    q: float | None = None
    log: bool = False
    values: list[Any] | None = None
    # Sampled only when every listed key has one of the listed values (other params or run-config
    # keys); a condition on a param refers to its sampled value.
    when: dict[str, list[Any]] = field(default_factory=dict)
    # The run-config field's type: an int field rounds qloguniform samples to int.
    is_int: bool = False

    def contains(self, value: Any) -> bool:
        """Whether ``value`` can come out of this distribution (fixed points are checked so)."""
        if self.distribution == "choice":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.distribution == "int":
            return (
                float(value).is_integer() and (int(value) - int(self.low)) % (self.step or 1) == 0
            )
        return True


@dataclass
class ObjectiveSpec:
    """What a trial is judged by: one metric, a weighted sum, or several for a Pareto front."""

    kind: Literal["single", "weighted", "pareto"]
    metrics: list[str]
    directions: list[str]
    weights: dict[str, float] | None = None

    @property
    def tune_metric(self) -> str | list[str]:
        # Single and weighted searches tell Optuna one scalar, reported as `objective`.
        return list(self.metrics) if self.kind == "pareto" else "objective"

    @property
    def tune_mode(self) -> str | list[str]:
        modes = ["max" if d == "maximize" else "min" for d in self.directions]
        return modes if self.kind == "pareto" else modes[0]

    def value(self, objectives: dict[str, float]) -> float | None:
        """The scalar objective of a finished trial (None for Pareto or a missing metric)."""
        if self.kind == "pareto":
            return None
        if any(objectives.get(m) is None for m in self.metrics):
            return None
        if self.kind == "single":
            return float(objectives[self.metrics[0]])
        assert self.weights is not None
        return float(sum(w * float(objectives[m]) for m, w in self.weights.items()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "metrics": self.metrics,
            "directions": self.directions,
            "weights": self.weights,
            "pareto": self.kind == "pareto",
        }


@dataclass
class SchedulerSpec:
    type: Literal["asha", "none"] = "none"
    metric: str = "gsm8k_nll"
    direction: str = "minimize"
    time_attr: str = "samples"
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_t: int = 10**12


@dataclass
class SearchSpec:
    """The parsed, validated ``search:`` block."""

    objective: ObjectiveSpec
    params: list[ParamSpec]
    points: list[dict[str, Any]] = field(default_factory=list)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    algorithm: str = "tpe"
    seed: int = 0
    num_samples: int = 8
    max_concurrent: int | None = None
    time_budget_s: float | None = None
    driver_cpus: float = 1.0
    trial_executor: str = "auto"
    max_retries: int = 0
    storage: str = "runs/search"
    study_storage: str | None = None
    name: str | None = None


# --------------------------------------------------------------------------- run-config keys


def _leaf_types(cls: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the run-config schema -> its type (sections are walked into)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "search":
            continue
        key = f"{prefix}{f.name}"
        tp = get_type_hints(cls)[f.name]
        inner = (
            [a for a in get_args(tp) if a is not type(None)]
            if get_origin(tp) in (Union, getattr(__import__("types"), "UnionType"))
            else [tp]
        )
        section = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if section is not None:
            out.update(_leaf_types(section, key + "."))
        elif item is not None and dataclasses.is_dataclass(item):
            # A list of sections (data.sources): searchable per index, data.sources[0].weight.
            out.update(_leaf_types(item, key + "[]."))
        else:
            out[key] = tp
    return out


_LEAVES = _leaf_types()


def _is_int_type(tp: Any) -> bool:
    if get_origin(tp) in (Union, getattr(__import__("types"), "UnionType")):
        return any(_is_int_type(a) for a in get_args(tp) if a is not type(None))
    return tp is int


def _is_numeric_type(tp: Any) -> bool:
    if get_origin(tp) in (Union, getattr(__import__("types"), "UnionType")):
        return any(_is_numeric_type(a) for a in get_args(tp) if a is not type(None))
    return tp in (int, float)


def _schema_key(key: str) -> str:
    """``data.sources[0].weight`` / ``data.sources.0.weight`` -> ``data.sources[].weight``."""
    return re.sub(r"(\[\d+\]|\.\d+(?=\.|$))", "[]", key)


def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a searchable run-config key, or None when it is one."""
    key = _schema_key(key)
    if key in _LEAVES:
        return None
    sections = {k.rsplit(".", 1)[0] for k in _LEAVES if "." in k}
    if key in sections:
        leaves = sorted(k for k in _LEAVES if k.startswith(key + "."))[:4]
        return f"a section, expected a leaf key such as {', '.join(leaves)}"
    hint = difflib.get_close_matches(key, list(_LEAVES), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown run-config key{extra}"


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------- parsing


_TOP_KEYS = {
    "algorithm",
    "seed",
    "num_samples",
    "max_concurrent",
    "time_budget_s",
    "driver_cpus",
    "max_retries",
    "storage",
    "study_storage",
    "objective",
    "scheduler",
    "params",
    "points",
    "name",
    "trial_executor",
}


def _number(v: Any) -> float | None:
    """A YAML number (YAML 1.1 reads 1e-4 without a dot as a string: accept it)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _flatten_params(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Params may be written dotted (``lora.rank:``) or nested (``lora: {rank: ...}``)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if (
            isinstance(v, dict)
            and "distribution" not in v
            and v
            and all(isinstance(x, dict) for x in v.values())
        ):
            out.update(_flatten_params(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_param(key: str, raw: Any, where: str, problems: list[str]) -> ParamSpec | None:
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: expected a mapping with a 'distribution' (one of "
            f"{', '.join(DISTRIBUTIONS)}), found {raw!r}"
        )
        return None
    dist = raw.get("distribution")
    if dist not in DISTRIBUTIONS:
        hint = difflib.get_close_matches(str(dist), DISTRIBUTIONS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(
            f"{where}.distribution: expected one of {', '.join(DISTRIBUTIONS)}, "
            f"found {dist!r}{extra}"
        )
        return None
    allowed, required = _DIST_FIELDS[dist]
    before = len(problems)
    for k in raw:
        if k not in allowed | {"distribution", "when"}:
            problems.append(
                f"{where}.{k}: unknown field for distribution {dist!r}; expected "
                f"{', '.join(sorted(allowed | {'when'}))}"
            )
    for k in sorted(required - set(raw)):
        problems.append(f"{where}.{k}: required for distribution {dist!r}, found nothing")
    if len(problems) > before:
        return None
    tp = _LEAVES.get(_schema_key(key))
    spec = ParamSpec(key=key, distribution=dist, is_int=_is_int_type(tp))
    if dist == "choice":
        values = raw["values"]
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.values: expected a non-empty list, found {values!r}")
            return None
        if len({repr(v) for v in values}) != len(values):
            problems.append(f"{where}.values: expected distinct values, found {values!r}")
        spec.values = values
    else:
        if not _is_numeric_type(tp):
            problems.append(
                f"{where}.distribution: {dist!r} samples numbers but {key} expects "
                f"a non-numeric value; use distribution: choice"
            )
            return None
        if dist != "int" and spec.is_int and dist != "qloguniform":
            problems.append(
                f"{where}.distribution: {key} is an integer; expected int, choice or "
                f"qloguniform, found {dist!r}"
            )
            return None
        lo, hi = _number(raw["low"]), _number(raw["high"])
        if lo is None:
            problems.append(f"{where}.low: expected a number, found {raw['low']!r}")
        if hi is None:
            problems.append(f"{where}.high: expected a number, found {raw['high']!r}")
        if lo is None or hi is None:
            return None
        if lo > hi:
            problems.append(
                f"{where}: expected low <= high, found low={raw['low']!r} > high={raw['high']!r}"
            )
            return None
        if dist in ("loguniform", "qloguniform") or (dist == "int" and raw.get("log")):
            if lo <= 0:
                problems.append(
                    f"{where}.low: expected a number > 0 for a log scale, found {raw['low']!r}"
                )
                return None
        spec.low, spec.high = lo, hi
        if dist == "int":
            if not (lo.is_integer() and hi.is_integer()):
                problems.append(
                    f"{where}: expected integer low and high, found low={raw['low']!r}, "
                    f"high={raw['high']!r}"
                )
                return None
            spec.low, spec.high = int(lo), int(hi)
            step = raw.get("step", 1)
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                problems.append(f"{where}.step: expected an integer >= 1, found {step!r}")
                return None
            log = raw.get("log", False)
            if not isinstance(log, bool):
                problems.append(f"{where}.log: expected true or false, found {log!r}")
                return None
            if log and step != 1:
                problems.append(
                    f"{where}: expected step 1 with log: true (Optuna cannot combine "
                    f"them), found step={step!r}"
                )
                return None
            if (spec.high - spec.low) % step:
                problems.append(
                    f"{where}: expected high - low to be a multiple of step, found "
                    f"low={spec.low}, high={spec.high}, step={step}"
                )
                return None
            spec.step, spec.log = step, log
        if dist == "qloguniform":
            q = _number(raw["q"])
            if q is None or q <= 0:
                problems.append(f"{where}.q: expected a number > 0, found {raw['q']!r}")
                return None
            spec.q = q
    return spec


def _parse_objective(raw: Any, problems: list[str]) -> ObjectiveSpec | None:
    where = "search.objective"
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: expected a mapping with metric+direction, weighted+direction or "
            f"pareto, found {raw!r}"
        )
        return None
    kinds = [k for k in ("metric", "weighted", "pareto") if k in raw]
    unknown = [k for k in raw if k not in ("metric", "weighted", "pareto", "direction")]
    for k in unknown:
        hint = difflib.get_close_matches(str(k), ["metric", "weighted", "pareto", "direction"], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(
            f"{where}.{k}: unknown key{extra}; expected metric, weighted, pareto, direction"
        )
    if len(kinds) != 1:
        problems.append(
            f"{where}: expected exactly one of metric, weighted, pareto, found {kinds or 'none'}"
        )
        return None

    def metric_ok(m: Any, key: str) -> bool:
        if m in OBJECTIVE_METRICS:
            return True
        hint = difflib.get_close_matches(str(m), OBJECTIVE_METRICS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(
            f"{key}: expected one of {', '.join(OBJECTIVE_METRICS)}, found {m!r}{extra}"
        )
        return False

    def direction_ok(d: Any, key: str) -> bool:
        if d in DIRECTIONS:
            return True
        problems.append(f"{key}: expected maximize or minimize, found {d!r}")
        return False

    kind = kinds[0]
    if kind == "pareto":
        if "direction" in raw:
            problems.append(
                f"{where}.direction: a Pareto objective gives a direction per metric "
                f"(pareto: {{gsm8k: maximize, mmlu: maximize}}), found direction: "
                f"{raw['direction']!r}"
            )
        p = raw["pareto"]
        if not isinstance(p, dict) or len(p) < 2:
            problems.append(
                f"{where}.pareto: expected a mapping of two or more metrics to "
                f"maximize/minimize, found {p!r}"
            )
            return None
        ok = all(
            [
                metric_ok(m, f"{where}.pareto.{m}") and direction_ok(d, f"{where}.pareto.{m}")
                for m, d in p.items()
            ]
        )
        return ObjectiveSpec("pareto", list(p), list(p.values())) if ok else None
    direction = raw.get("direction")
    if kind == "metric" and not metric_ok(raw["metric"], f"{where}.metric"):
        return None
    if direction is None:
        problems.append(f"{where}.direction: expected maximize or minimize, found nothing")
        return None
    if not direction_ok(direction, f"{where}.direction"):
        return None
    if kind == "metric":
        return ObjectiveSpec("single", [raw["metric"]], [direction])
    w = raw["weighted"]
    if not isinstance(w, dict) or not w:
        problems.append(f"{where}.weighted: expected a mapping of metric -> weight, found {w!r}")
        return None
    weights: dict[str, float] = {}
    for m, v in w.items():
        num = _number(v)
        if metric_ok(m, f"{where}.weighted.{m}"):
            if num is None:
                problems.append(f"{where}.weighted.{m}: expected a number, found {v!r}")
            else:
                weights[str(m)] = num
    if len(weights) != len(w):
        return None
    return ObjectiveSpec("weighted", list(weights), [direction] * len(weights), weights)


def _parse_scheduler(raw: Any, problems: list[str]) -> SchedulerSpec:
    where = "search.scheduler"
    if raw is None or raw == "none":
        return SchedulerSpec(type="none")
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping (type: asha | none), found {raw!r}")
        return SchedulerSpec(type="none")
    names = [f.name for f in dataclasses.fields(SchedulerSpec)]
    for k in raw:
        if k not in names:
            hint = difflib.get_close_matches(str(k), names, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{where}.{k}: unknown key{extra}; expected one of {', '.join(names)}")
    spec = SchedulerSpec(type=raw.get("type", "asha"))
    if spec.type not in ("asha", "none"):
        problems.append(f"{where}.type: expected asha or none, found {spec.type!r}")
        return SchedulerSpec(type="none")
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
    rf = _number(raw.get("reduction_factor", spec.reduction_factor))
    if rf is None or rf < 2:
        problems.append(
            f"{where}.reduction_factor: expected a number >= 2, found "
            f"{raw.get('reduction_factor')!r}"
        )
    else:
        spec.reduction_factor = rf
    if spec.grace_period > spec.max_t:
        problems.append(
            f"{where}: expected grace_period <= max_t, found grace_period="
            f"{spec.grace_period} > max_t={spec.max_t}"
        )
    return spec


def _check_conditions(
    params: list[ParamSpec], base: dict[str, Any], raw_params: dict[str, Any], problems: list[str]
) -> None:
    seen: dict[str, ParamSpec] = {}
    for p in params:
        where = f"search.params.{p.key}.when"
        raw = raw_params[p.key].get("when")
        if raw is None:
            seen[p.key] = p
            continue
        if not isinstance(raw, dict) or not raw:
            problems.append(
                f"{where}: expected a mapping of key -> value or list of values, found {raw!r}"
            )
            seen[p.key] = p
            continue
        for ck, cv in raw.items():
            allowed = cv if isinstance(cv, list) else [cv]
            if ck == p.key:
                problems.append(f"{where}.{ck}: a parameter cannot depend on itself")
            elif ck in seen:
                dep = seen[ck]
                if dep.distribution == "choice":
                    bad = [v for v in allowed if v not in (dep.values or [])]
                    if bad:
                        problems.append(
                            f"{where}.{ck}: expected values among {dep.values}, found "
                            f"{bad!r} (the condition could never hold)"
                        )
            elif any(q.key == ck for q in params):
                problems.append(
                    f"{where}.{ck}: the condition's parameter must be listed before "
                    f"{p.key} in search.params (it is sampled first)"
                )
            else:
                why = _key_problem(ck)
                if why is not None:
                    problems.append(
                        f"{where}.{ck}: expected a search parameter or run-config key, "
                        f"found {ck!r}: {why}"
                    )
            p.when[ck] = allowed
        seen[p.key] = p


def _check_values_against_schema(
    spec: SearchSpec, base: dict[str, Any], source: str | None, problems: list[str]
) -> None:
    """Build the run config with each param's extreme values, so an out-of-range bound (momentum
    1.5) fails here with the run config's own message instead of in trial 7 on the cluster."""

    def run_problems(overrides: dict[str, Any]) -> list[str]:
        try:
            config_from_dict(base, None, overrides=overrides)
        except ConfigError as exc:
            return exc.problems
        return []

    # Problems of the base config itself (a model.path on another machine) are the run config's
    # to report; only problems a value adds are the param's.
    known = set(run_problems({}))
    for p in spec.params:
        where = f"search.params.{p.key}"
        if p.distribution == "choice":
            probes = list(p.values or [])
        else:
            probes = [p.low, p.high]
            if p.is_int:
                probes = [int(round(x)) for x in probes if x is not None]
        for v in probes:
            new = [m for m in run_problems({p.key: v}) if m not in known]
            if new:
                mine = [m for m in new if m.startswith(p.key)] or new
                problems.append(f"{where}: value {v!r} makes an invalid run config: {mine[0]}")
                break


def _check_points(
    spec: SearchSpec, base: dict[str, Any], raw: Any, declared: set[str], problems: list[str]
) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        problems.append(
            f"search.points: expected a list of mappings (param -> value), found {raw!r}"
        )
        return
    by_key = {p.key: p for p in spec.params}
    for i, point in enumerate(raw):
        where = f"search.points[{i}]"
        if not isinstance(point, dict):
            problems.append(f"{where}: expected a mapping of param -> value, found {point!r}")
            continue
        point = (
            _flatten_params(point) if any(isinstance(v, dict) for v in point.values()) else point
        )
        point = dict(point)
        ok = True
        for k, v in list(point.items()):
            p = by_key.get(k)
            if p is not None and p.distribution != "choice" and isinstance(v, str):
                # YAML 1.1 reads 1.0e10 (no exponent sign) as a string, as for low/high.
                num = _number(v)
                if num is not None:
                    v = point[k] = int(num) if p.is_int and num.is_integer() else num
            if p is None and k in declared:
                ok = False  # the param's own problem is already reported
            elif p is None:
                hint = difflib.get_close_matches(str(k), list(by_key), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                problems.append(
                    f"{where}.{k}: not a search parameter{extra}; expected one of "
                    f"{', '.join(by_key)}"
                )
                ok = False
            elif not p.contains(v):
                rng = p.values if p.distribution == "choice" else f"[{p.low}, {p.high}]"
                problems.append(
                    f"{where}.{k}: expected a value of the distribution ({rng}), found {v!r}"
                )
                ok = False
        if not ok:
            continue
        active = _active_keys(spec, point, base)
        for k in point:
            if k not in active:
                problems.append(
                    f"{where}.{k}: the parameter is inactive at this point (its "
                    f"'when' condition does not hold); remove it"
                )
        spec.points.append(dict(point))


def _active_keys(spec: SearchSpec, values: dict[str, Any], base: dict[str, Any]) -> set[str]:
    """Params whose conditions hold given sampled ``values`` (run-config keys read from base)."""
    active: set[str] = set()
    for p in spec.params:
        ok = True
        for ck, allowed in p.when.items():
            cur = values.get(ck) if ck in {q.key for q in spec.params} else _get_dotted(base, ck)
            if ck in {q.key for q in spec.params} and ck not in active:
                ok = False
            elif cur not in allowed:
                ok = False
        if ok:
            active.add(p.key)
    return active


def parse_search_block(data: dict[str, Any], source: str | None = None) -> SearchSpec:
    """Parse and validate the ``search:`` block of a search-space YAML mapping.

    Args:
        data: the whole parsed YAML mapping (run config + ``search:``).
        source: the file name, for error messages.

    Raises:
        ConfigError: listing every problem, each naming the key, expected and found value.
    """
    problems: list[str] = []
    raw = data.get("search")
    if not isinstance(raw, dict):
        raise ConfigError([f"search: expected a mapping (the search block), found {raw!r}"], source)
    base = {k: v for k, v in data.items() if k != "search"}
    for k in raw:
        if k not in _TOP_KEYS:
            hint = difflib.get_close_matches(str(k), sorted(_TOP_KEYS), n=1)
            extra = f" (did you mean {'search.' + hint[0]!r}?)" if hint else ""
            problems.append(
                f"search.{k}: unknown key{extra}; expected one of {', '.join(sorted(_TOP_KEYS))}"
            )

    objective = _parse_objective(raw.get("objective"), problems)
    scheduler = _parse_scheduler(raw.get("scheduler"), problems)

    raw_params = raw.get("params")
    params: list[ParamSpec] = []
    flat: dict[str, Any] = {}
    if not isinstance(raw_params, dict) or not raw_params:
        problems.append(
            f"search.params: expected a mapping of dotted run-config keys to "
            f"distributions, found {raw_params!r}"
        )
    else:
        flat = _flatten_params(raw_params)
        for key, spec_raw in flat.items():
            where = f"search.params.{key}"
            why = _key_problem(key)
            if why is not None:
                problems.append(f"{where}: {why}")
                continue
            p = _parse_param(key, spec_raw, where, problems)
            if p is not None:
                params.append(p)

    spec = SearchSpec(
        objective=objective or ObjectiveSpec("single", ["gsm8k"], ["maximize"]),
        params=params,
        scheduler=scheduler,
    )
    _check_conditions(params, base, flat, problems)

    def get(key: str, kind: str, default: Any, ok: Any, expected: str) -> Any:
        v = raw.get(key, default)
        if v is None and default is None:
            return None
        num = _number(v) if kind in ("int", "float") else v
        if kind == "int" and (num is None or not float(num).is_integer()):
            num = None
        if num is None or not ok(num):
            problems.append(f"search.{key}: expected {expected}, found {v!r}")
            return default
        return int(num) if kind == "int" else num

    spec.algorithm = get(
        "algorithm", "str", "tpe", lambda v: v in ALGORITHMS, "one of " + ", ".join(ALGORITHMS)
    )
    spec.seed = get("seed", "int", 0, lambda v: v >= 0, "an integer >= 0")
    spec.max_concurrent = get(
        "max_concurrent", "int", None, lambda v: v >= 1, "an integer >= 1 or null"
    )
    spec.time_budget_s = get(
        "time_budget_s", "float", None, lambda v: v > 0, "a number > 0 or null"
    )
    spec.driver_cpus = get("driver_cpus", "float", 1.0, lambda v: v >= 0, "a number >= 0")
    spec.trial_executor = get(
        "trial_executor",
        "str",
        "auto",
        lambda v: v in TRIAL_EXECUTORS,
        "one of " + ", ".join(TRIAL_EXECUTORS),
    )
    if spec.trial_executor == "actor":
        workers = _get_dotted(base, "resources.num_workers")
        if workers is not None and workers != 1:
            problems.append(
                f"search.trial_executor: actor trains each trial in its Tune actor, "
                f"one worker; expected resources.num_workers 1, found {workers!r} "
                "(use trial_executor: train for multi-worker trials)"
            )
        for p in params:
            if p.key.startswith("resources."):
                problems.append(
                    f"search.params.{p.key}: with search.trial_executor actor every "
                    "trial's actor takes the same resources; expected a fixed "
                    "value, found a searched parameter (use trial_executor: train)"
                )
    spec.max_retries = get("max_retries", "int", 0, lambda v: v >= 0, "an integer >= 0")
    spec.storage = get(
        "storage",
        "str",
        "runs/search",
        lambda v: isinstance(v, str) and v,
        "a local path or s3:// / gs:// URI",
    )
    spec.study_storage = get(
        "study_storage",
        "str",
        None,
        lambda v: isinstance(v, str) and "://" in v,
        "null (SQLite in the search directory) or a database URL such as postgresql://user@host/db",
    )
    spec.name = get(
        "name",
        "str",
        None,
        lambda v: isinstance(v, str) and v and "/" not in v,
        "a name without '/'",
    )

    # Algorithm vs objective: Pareto needs a multi-objective sampler, NSGA-II/MOTPE a Pareto.
    if objective is not None:
        pareto = objective.kind == "pareto"
        if spec.algorithm in ("nsga2", "motpe") and not pareto:
            problems.append(
                f"search.algorithm: {spec.algorithm} is multi-objective; expected "
                f"objective.pareto with it, found a {objective.kind} objective"
            )
    if spec.algorithm == "grid":
        for p in params:
            if p.distribution not in ("choice", "int"):
                problems.append(
                    f"search.params.{p.key}.distribution: grid search enumerates "
                    f"values; expected choice or int, found {p.distribution!r}"
                )

    _check_points(spec, base, raw.get("points"), set(flat), problems)
    if not problems:
        _check_values_against_schema(spec, base, source, problems)

    n_default = len(grid_points(spec, base)) if spec.algorithm == "grid" and not problems else 8
    spec.num_samples = get("num_samples", "int", n_default, lambda v: v >= 1, "an integer >= 1")
    if spec.points and spec.num_samples < len(spec.points):
        problems.append(
            f"search.num_samples: expected at least the {len(spec.points)} fixed "
            f"points, found {spec.num_samples}"
        )
    if problems:
        raise ConfigError(problems, source)
    return spec


def resolve_trial_executor(spec: SearchSpec, base: dict[str, Any]) -> str:
    """``train`` or ``actor``: ``search.trial_executor`` with ``auto`` decided (see the module
    docstring) from the run config ``base`` (the YAML mapping without ``search``)."""
    if spec.trial_executor != "auto":
        return spec.trial_executor
    workers = _get_dotted(base, "resources.num_workers")
    single = workers is None or workers == 1  # the run config's default is 1 worker
    if single and not any(p.key.startswith("resources.") for p in spec.params):
        return "actor"
    return "train"


def validate_search_block(data: dict[str, Any], source: str | None = None) -> list[str]:
    """Every problem of the search block of ``data`` ([] when it is valid).

    Args:
        data: the whole parsed YAML mapping (run config + ``search:``).
        source: the file name, for error messages.
    """
    try:
        parse_search_block(data, source)
    except ConfigError as exc:
        return exc.problems
    return []


# --------------------------------------------------------------------------- sampling


def _suggest(trial: Any, p: ParamSpec) -> Any:
    """Ask an Optuna trial for one param. qloguniform: Optuna samples log-uniformly and the value
    is rounded to a multiple of q here (Optuna cannot combine log and step); the study keeps the
    unrounded value, the run gets the rounded one."""
    if p.distribution == "choice":
        return trial.suggest_categorical(p.key, p.values)
    if p.distribution == "uniform":
        return trial.suggest_float(p.key, p.low, p.high)
    if p.distribution == "loguniform":
        return trial.suggest_float(p.key, p.low, p.high, log=True)
    if p.distribution == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=p.step or 1, log=p.log)
    raw = trial.suggest_float(p.key, p.low, p.high, log=True)
    assert p.q is not None and p.low is not None and p.high is not None
    v = min(max(round(raw / p.q) * p.q, p.low), p.high)
    return int(round(v)) if p.is_int else v


def sample_params(spec: SearchSpec, trial: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Define-by-run sampling: each active param in YAML order (conditions on earlier ones).

    Args:
        spec: the parsed search block.
        trial: an Optuna trial (or Ray's wrapper of one).
        base: the run-config mapping, for conditions on fixed run-config keys.
    """
    values: dict[str, Any] = {}
    keys = {p.key for p in spec.params}
    for p in spec.params:
        ok = all(
            (values.get(ck) if ck in keys else _get_dotted(base, ck)) in allowed
            and (ck not in keys or ck in values)
            for ck, allowed in p.when.items()
        )
        if ok:
            values[p.key] = _suggest(trial, p)
    return values


def grid_points(spec: SearchSpec, base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every distinct combination of the params' values, inactive params dropped (so a grid over
    method x rank runs full fine-tuning once, not once per rank)."""
    axes: list[list[Any]] = []
    for p in spec.params:
        if p.distribution == "choice":
            axes.append(list(p.values or []))
        elif p.distribution == "int":
            axes.append(list(range(int(p.low or 0), int(p.high or 0) + 1, p.step or 1)))
        else:
            return []
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for combo in itertools.product(*axes):
        full = dict(zip([p.key for p in spec.params], combo))
        active = _active_keys(spec, full, base)
        point = {k: v for k, v in full.items() if k in active}
        sig = repr(sorted(point.items()))
        if sig not in seen:
            seen.add(sig)
            out.append(point)
    return out


# --------------------------------------------------------------------------- search directory

TERMINAL_STATUSES = ("completed", "early_stopped", "diverged", "failed")


class SearchDir:
    """The search directory ``<storage>/<name>/`` (CONTRACTS.md): ``search.json``, one
    ``trials/<trial_id>.json`` per finished trial, written atomically (readers never see half a
    file), on a local path or a cloud URI (through pyarrow's filesystems)."""

    def __init__(self, storage: str, name: str) -> None:
        self.uri = f"{storage.rstrip('/')}/{name}"
        self.is_local = "://" not in storage
        if self.is_local:
            self.path = os.path.abspath(os.path.expanduser(self.uri))
            self.uri = self.path

    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs

        return pyarrow.fs.FileSystem.from_uri(self.uri)

    def write_json(self, rel: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=False, default=str)
        if self.is_local:
            target = os.path.join(self.path, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)  # atomic on POSIX: a reader sees the old or the new file
            return
        fs, root = self._fs()
        # An object-store PUT is atomic: the object appears whole or not at all.
        with fs.open_output_stream(f"{root}/{rel}") as out:
            out.write(text.encode())

    def read_json(self, rel: str) -> Any | None:
        try:
            if self.is_local:
                with open(os.path.join(self.path, rel)) as fh:
                    return json.load(fh)
            fs, root = self._fs()
            with fs.open_input_stream(f"{root}/{rel}") as inp:
                return json.loads(inp.read().decode())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def trial_record(self, trial_id: str) -> dict[str, Any] | None:
        rec = self.read_json(f"trials/{trial_id}.json")
        return rec if isinstance(rec, dict) and rec.get("status") in TERMINAL_STATUSES else None

    def exists(self) -> bool:
        if self.is_local:
            return os.path.isfile(os.path.join(self.path, "search.json"))
        return self.read_json("search.json") is not None

    def run_dir(self, trial_id: str) -> str:
        """Where a trial's trainer writes metrics, checkpoints and the exported model. Local
        storage: inside the search directory; cloud storage: a local scratch directory."""
        if self.is_local:
            return os.path.join(self.path, "runs", trial_id)
        base = os.environ.get("PLORA_SCRATCH", os.path.join(tempfile.gettempdir(), "plora-ray"))
        return os.path.join(base, self.uri.split("://", 1)[1].replace("/", "_"), trial_id)


def default_study_storage(sdir: SearchDir) -> str:
    """SQLite inside the search directory, so optuna-dashboard and ``--resume`` find it there.
    With cloud storage the file lives in the driver's local scratch (SQLite needs a real file
    system); use a database URL (study_storage) for a study that outlives the driver machine."""
    if sdir.is_local:
        return f"sqlite:///{os.path.join(sdir.path, 'study.db')}"
    base = os.environ.get("PLORA_SCRATCH", os.path.join(tempfile.gettempdir(), "plora-ray"))
    local = os.path.join(base, sdir.uri.split("://", 1)[1].replace("/", "_"))
    os.makedirs(local, exist_ok=True)
    return f"sqlite:///{os.path.join(local, 'study.db')}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- trial driver


# Ray Train settings every trial driver puts in its environment, unless the job's environment sets
# them already. Ray Train forwards them to the trial's Train controller and workers.
# benchmarks/search_overhead.py measures them against Ray's defaults.
TRIAL_TRAIN_ENV = {
    # Train v2 workers hand each report over a queue of size 1 that the controller drains once
    # per poll (Ray's default 2 s): every report could stall training that long, and the end of
    # the run is noticed up to that late.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # A worker group that is slow to start on a loaded machine (imports, placement) waits longer
    # instead of being torn down and started again after Ray's 60 s.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600",
    # One actor process less per trial: node preemption is a Tune-level failure for a search
    # (search.max_retries re-runs the trial from its checkpoint).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@dataclass
class TrialContext:
    """What every trial driver needs besides its sampled params (shipped once via the object
    store by tune.with_parameters)."""

    base: dict[str, Any]
    source: str
    storage: str
    name: str
    objective: ObjectiveSpec
    proxy_metric: str
    # "module:function" of the trainer: run_training (trial_executor train) or run_in_process
    # (actor), unless a test or benchmark swaps it.
    runner: str = "plora_ray.train:run_training"
    # Ray Train settings for the trial's training run (see TRIAL_TRAIN_ENV).
    train_env: dict[str, str] = field(default_factory=lambda: dict(TRIAL_TRAIN_ENV))


def _load_runner(path: str) -> Any:
    mod, fn = path.split(":")
    return getattr(importlib.import_module(mod), fn)


def _read_metrics(run_dir: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a killed writer
    except OSError:
        pass
    return out


def _result_dict(result: Any) -> dict[str, Any]:
    """The trainer's RunResult as a plain dict (a dataclass, an object with as_dict, or a dict)."""
    if result is None:
        return {}
    if isinstance(result, dict):
        return dict(result)
    if hasattr(result, "as_dict"):
        return dict(result.as_dict())
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)  # type: ignore[arg-type]
    return dict(vars(result))


def build_record(
    *,
    trial_id: str,
    ctx: TrialContext,
    params: dict[str, Any],
    config: dict[str, Any] | None,
    status: str,
    reason: str | None,
    run_dir: str,
    started: float,
    last: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``trials/<id>.json`` record (CONTRACTS.md), from the trainer's result when the trial
    ran to its end, else from its last report and its metrics.jsonl."""
    result = result or {}
    last = last or {}
    metrics = _read_metrics(run_dir)
    cfg = config or {}
    objectives = dict(result.get("objectives") or {})
    if not objectives:
        # Only the trainer's final report holds objectives; step reports carry the proxy only.
        for rec in reversed(metrics):
            if rec.get("final") and isinstance(rec.get("objectives"), dict):
                objectives = dict(rec["objectives"])
                break
    curve = [[m["step"], m["loss"]] for m in metrics if "step" in m and m.get("loss") is not None]
    final_loss = result.get("final_loss")
    if final_loss is None and curve:
        final_loss = curve[-1][1]
    if final_loss is None:
        final_loss = last.get("loss")
    if final_loss is not None and "final_loss" not in objectives and status == "completed":
        objectives["final_loss"] = final_loss
    proxy = objectives.get(ctx.proxy_metric)
    if proxy is None:
        proxy = result.get(ctx.proxy_metric, last.get(ctx.proxy_metric))
        if proxy is None:
            for m in reversed(metrics):
                if m.get(ctx.proxy_metric) is not None:
                    proxy = m[ctx.proxy_metric]
                    break
    ranks = [m["effective_rank"] for m in metrics if isinstance(m.get("effective_rank"), dict)]
    delta_rank = result.get("delta_effective_rank")
    if delta_rank is None and ranks:
        delta_rank = ranks[-1]
    num_unloads = result.get("num_unloads")
    if num_unloads is None:
        num_unloads = sum(1 for m in metrics if m.get("unload"))
    ended = time.time()
    res = cfg.get("resources") or {}
    # Accelerator-hours: GPU-hours on GPU trials, CPU-core-hours of the workers on CPU trials.
    per_worker = res.get("gpus_per_worker") or res.get("cpus_per_worker") or 1.0
    wall = float(result.get("wall_time_s") or (ended - started))
    objective_value = ctx.objective.value(objectives) if status == "completed" else None
    return {
        "trial_id": trial_id,
        "search": ctx.name,
        "status": status,
        "reason": reason,
        "params": params,
        "config": cfg,
        "method": cfg.get("method"),
        "lora_rank": None if cfg.get("method") == "full" else (cfg.get("lora") or {}).get("rank"),
        "objectives": objectives,
        "objective_value": objective_value,
        "proxy": proxy,
        "final_loss": final_loss,
        "num_unloads": num_unloads,
        "delta_effective_rank": delta_rank,
        "wall_time_s": round(wall, 3),
        "accelerator_hours": wall / 3600.0 * float(res.get("num_workers") or 1) * float(per_worker),
        "checkpoint_path": result.get("checkpoint_path"),
        "model_path": result.get("model_path"),
        "started_at": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "ended_at": _now(),
        "loss_curve": curve,
        "diverged_step": result.get("diverged_step"),
        "run_dir": run_dir,
    }


def _final_metrics(record: dict[str, Any], objective: ObjectiveSpec) -> dict[str, Any]:
    """The last Tune result of a trial: objectives flat (for Pareto searches), `objective` (for
    single/weighted), status and cost (for the summary line)."""
    out: dict[str, Any] = {
        "status": record["status"],
        "wall_time_s": record["wall_time_s"],
        "trial_done": True,
    }
    if record["status"] == "completed":
        for m, v in record["objectives"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[m] = float(v)
        if record.get("objective_value") is not None:
            out["objective"] = record["objective_value"]
    return out


def trial_driver(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: the run config with the sampled dotted keys, trained by the trainer.

    The record goes to ``trials/<id>.json`` *before* the final report, so a driver killed after it
    and resumed finds the trial done (the re-run returns the record instead of training again).
    """
    from ray import tune

    driver_started = time.time()
    for key, value in getattr(ctx, "train_env", TRIAL_TRAIN_ENV).items():
        os.environ.setdefault(key, value)
    trial_id = tune.get_context().get_trial_id()
    sdir = SearchDir(ctx.storage, ctx.name)
    done = sdir.trial_record(trial_id)
    if done is not None:
        tune.report(_final_metrics(done, ctx.objective))
        return
    started = time.time()
    run_dir = sdir.run_dir(trial_id)
    try:
        cfg = config_from_dict(ctx.base, ctx.source, overrides=params)
    except ConfigError as exc:
        # Validation probed each value alone; a combination can still be invalid (batch sizes).
        rec = build_record(
            trial_id=trial_id,
            ctx=ctx,
            params=params,
            config=None,
            status="failed",
            reason=str(exc),
            run_dir=run_dir,
            started=started,
        )
        sdir.write_json(f"trials/{trial_id}.json", rec)
        tune.report(_final_metrics(rec, ctx.objective))
        return
    runner = _load_runner(ctx.runner)
    # A retried or resumed trial continues from its own newest checkpoint (Ray Train's snapshot
    # in <run_dir>/ray); the trainer forwards its reports to this Tune trial by itself
    # (TuneReportCallback when it runs inside a Tune session).
    # (run_in_process keeps its checkpoints in the same place, without Ray Train's snapshot).
    from plora_ray.train import holds_run

    resume = holds_run(run_dir)
    # Wall-clock times of the trainer's reports as they land (metrics.jsonl carries only the
    # run's own elapsed seconds): the timeline benchmarks/search_overhead.py splits into fixed
    # overhead and work.
    seen: dict[str, float] = {}

    def on_report(m: dict[str, Any]) -> None:
        now = time.time()
        if m.get("final"):
            seen["final_report_at"] = now
            return
        if "first_report_at" not in seen and m.get("elapsed_s") is not None:
            seen["first_report_at"] = now
            seen["first_report_elapsed_s"] = float(m["elapsed_s"])
        seen["last_step_at"] = now

    result = _result_dict(runner(cfg, run_dir, report=on_report, resume=resume))
    status = str(result.get("status") or "completed")
    if status not in TERMINAL_STATUSES:
        status = "failed"
    reason = result.get("reason")
    if status == "diverged" and not reason:
        reason = f"diverged at step {result.get('diverged_step')}"
    rec = build_record(
        trial_id=trial_id,
        ctx=ctx,
        params=params,
        config=cfg.to_dict(),
        status=status,
        reason=reason,
        run_dir=run_dir,
        started=started,
        result=result,
    )
    final = result.get("metrics") or {}
    rec["timeline"] = {
        "driver_started_at": driver_started,
        "driver_pid": os.getpid(),
        # The training loop's start: the first report's arrival minus the loop time it reports.
        "loop_started_at": (
            seen["first_report_at"] - seen["first_report_elapsed_s"]
            if "first_report_at" in seen
            else None
        ),
        "last_step_at": seen.get("last_step_at"),
        "final_report_at": seen.get("final_report_at"),
        "driver_ended_at": time.time(),
        "loop_s": final.get("elapsed_s"),
        "eval_s": final.get("eval_seconds"),
        "setup_s": final.get("setup_seconds"),
        "num_workers": cfg.resources.num_workers,
        "cpus_per_worker": cfg.resources.cpus_per_worker,
    }
    if sdir.trial_record(trial_id) is not None:
        # Stopped by the scheduler while training: Tune killed this trial's actors (so the run
        # "failed" on a dead controller) and the search driver has recorded it as early_stopped.
        return
    sdir.write_json(f"trials/{trial_id}.json", rec)
    tune.report(_final_metrics(rec, ctx.objective))


# --------------------------------------------------------------------------- Tune glue


def _build_ray_classes() -> None:
    """Define the classes that subclass Ray's on first use, so ``import plora_ray.search`` (and
    ``plora-ray validate``) does not import Ray. They are registered as module attributes under
    their own names, so pickle (Tune's tuner.pkl, searcher snapshots) finds them on restore."""
    from ray.tune import Callback
    from ray.tune.search.optuna import OptunaSearch

    class PLoRAOptunaSearch(OptunaSearch):
        """OptunaSearch that (1) ignores intermediate results without the objective (the proxy
        reports), (2) tells Optuna FAIL for diverged/failed trials, with the reason, instead of
        PRUNED, and (3) tags each Optuna trial with its Tune trial id for the dashboard."""

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            import optuna

            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            if all(m in result for m in metrics):
                try:
                    super().on_trial_result(trial_id, result)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # A trial that finished after the driver's last snapshot and was told to the
                    # study then: after --resume it replays its record; the study has it already.
                    pass

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
            ot_trial = self._ot_trials.get(trial_id)
            status = (result or {}).get("status")
            if ot_trial is not None and trial_id not in self._completed_trials:
                try:
                    ot_trial.set_user_attr("tune_trial_id", trial_id)
                    ot_trial.set_user_attr(
                        "status", status or ("failed" if error else "early_stopped")
                    )
                except Exception:  # noqa: BLE001 - a finished study trial refuses attrs
                    pass
            if status in ("diverged", "failed"):
                error, result = True, None
            super().on_trial_complete(trial_id, result=result, error=error)

    class SearchReporter(Callback):
        """Tune callback in the search driver: one summary line per finished trial, a record for
        trials the trial driver could not write itself (stopped by ASHA, crashed), and a
        leaderboard refresh."""

        def __init__(self, ctx: TrialContext, spec: SearchSpec) -> None:
            self.ctx, self.spec = ctx, spec
            self.sdir = SearchDir(ctx.storage, ctx.name)
            self.finished = 0

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            # A stopped trial's worker placement group outlives it (see
            # remove_orphaned_placement_groups); sweep every few seconds of the event loop.
            now = time.monotonic()
            if now - getattr(self, "_last_sweep", 0.0) >= 2.0:
                self._last_sweep = now
                try:
                    n = remove_orphaned_placement_groups()
                except Exception as exc:  # noqa: BLE001 - an internal Ray API may move
                    n = 0
                    if not getattr(self, "_sweep_warned", False):
                        self._sweep_warned = True
                        print(
                            f"warning: cannot sweep orphaned placement groups: {exc}",
                            file=sys.stderr,
                        )
                self.orphaned_pgs_removed = getattr(self, "orphaned_pgs_removed", 0) + n

        def _finish(self, trial: Any, status: str, reason: str | None) -> None:
            rec = self.sdir.trial_record(trial.trial_id)
            last = dict(trial.last_result or {})
            if (
                rec is not None
                and status == "early_stopped"
                and not last.get("trial_done")
                and rec.get("status") == "failed"
            ):
                # The trial driver, cut off by the stop (its Train controller killed under it),
                # wrote "failed" first; the trial never sent its final report, so the stop is
                # what happened (and Optuna was told PRUNED).
                rec = None
            if rec is None and self.sdir.is_local:
                # Stopped before the trainer's own cleanup ran: DeepSpeed /dev/shm names its
                # worker groups left behind (usually none: the trainer unlinks them early).
                try:
                    from plora_ray.train import cleanup_run_shm

                    cleanup_run_shm(self.sdir.run_dir(trial.trial_id))
                except Exception as exc:  # noqa: BLE001 - cleanup must not stop the search
                    print(
                        f"warning: /dev/shm cleanup of trial {trial.trial_id}: {exc}",
                        file=sys.stderr,
                    )
            if rec is None:
                params = {k: v for k, v in (trial.config or {}).items()}
                try:
                    cfg = config_from_dict(
                        self.ctx.base, self.ctx.source, overrides=params
                    ).to_dict()
                except ConfigError:
                    cfg = None
                started = float(last.get("timestamp", time.time())) - float(
                    last.get("time_total_s", 0.0)
                )
                rec = build_record(
                    trial_id=trial.trial_id,
                    ctx=self.ctx,
                    params=params,
                    config=cfg,
                    status=status,
                    reason=reason,
                    run_dir=self.sdir.run_dir(trial.trial_id),
                    started=started,
                    last=last,
                )
                self.sdir.write_json(f"trials/{trial.trial_id}.json", rec)
            launched = self.__dict__.get("launched", {}).get(trial.trial_id)
            tl = rec.get("timeline")
            if (
                launched is not None
                and isinstance(tl, dict)
                and "launched_at" not in tl
                and float(tl.get("driver_started_at") or 0.0) >= launched
            ):
                # Tune's view: when it launched the trial and saw it end. Not for a record a
                # killed driver's trial wrote before --resume replayed it: that launch is not its
                # own, and a finished trial's record is never changed.
                tl.update(launched_at=launched, tune_ended_at=time.time())
                self.sdir.write_json(f"trials/{trial.trial_id}.json", rec)
            self.finished += 1
            print(summary_line(rec, self.ctx.objective), flush=True)
            publish_leaderboard(self.sdir.uri)

        def on_trial_start(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            self.__dict__.setdefault("launched", {})[trial.trial_id] = time.time()

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            self._finish(
                trial,
                "early_stopped",
                f"stopped by ASHA on {self.spec.scheduler.metric}"
                if self.spec.scheduler.type == "asha"
                else "stopped by the time budget",
            )

        def on_trial_error(
            self, iteration: int, trials: list[Any], trial: Any, **info: Any
        ) -> None:
            reason = "trial crashed"
            err = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
            try:
                if err and os.path.isfile(err) and err.endswith(".txt"):
                    with open(err) as fh:
                        lines = [ln for ln in fh.read().strip().splitlines() if ln.strip()]
                    reason = lines[-1][:500] if lines else reason
            except OSError:
                pass
            self._finish(trial, "failed", reason)

    for cls in (PLoRAOptunaSearch, SearchReporter):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> Any:
    if name in ("PLoRAOptunaSearch", "SearchReporter"):
        _build_ray_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def remove_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead; returns how many.

    When Tune stops a trial (ASHA, time budget) it kills the trial actor, and with it the Ray
    Train controller that created the workers' placement group; in Ray 2.60 that group stays
    CREATED (GCS marks ``creator_actor_dead`` but keeps it; Train's PlacementGroupCleaner needs
    the state API, which is missing without a dashboard or when several Ray instances share a
    machine), so its CPUs/GPUs are held until the cluster stops and the next trial's workers wait
    forever. A non-detached group whose creator actor is dead can never be used again: removing
    it is what Ray's fate-sharing promises.
    """
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    accessor = ray._private.state.state._connect_and_get_accessor()
    removed = 0
    for raw in accessor.get_placement_group_table():
        d = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # A group made by a driver (Tune's trial groups) has the nil actor id (all 0xff bytes)
        # and reads as "creator actor dead": only groups made by an actor qualify.
        made_by_actor = bool(d.creator_actor_id) and d.creator_actor_id.strip(b"\xff") != b""
        dead_creator = made_by_actor and d.creator_actor_dead and not d.is_detached
        if dead_creator and d.state in (
            gcs_pb2.PlacementGroupTableData.CREATED,
            gcs_pb2.PlacementGroupTableData.PENDING,
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(d.placement_group_id)))
            removed += 1
    return removed


def _make_sampler(spec: SearchSpec) -> Any:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    seed = spec.seed
    if spec.algorithm == "tpe" or spec.algorithm == "motpe":
        # multivariate+group model the conditional space jointly (momentum only under plora);
        # constant_liar keeps parallel trials from being handed the same point.
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        )
    if spec.algorithm == "nsga2":
        # A generation no larger than half the budget, so small searches still evolve.
        pop = max(2, min(50, spec.num_samples // 2))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
    # random, and grid (whose points are all enqueued; the sampler only fills gaps).
    return optuna.samplers.RandomSampler(seed=seed)


def summary_line(rec: dict[str, Any], objective: ObjectiveSpec) -> str:
    """``[trial 1a2b] completed  gsm8k=0.031 mmlu=0.25  proxy=2.41  loss=2.10  41.3 s  ...``"""
    objs = " ".join(
        f"{m}={rec['objectives'][m]:.4g}"
        for m in objective.metrics
        if isinstance(rec.get("objectives", {}).get(m), (int, float))
    )
    val = rec.get("objective_value")
    parts = [
        f"[trial {rec['trial_id']}] {rec['status']:<13}",
        " ".join(f"{k}={v}" for k, v in rec.get("params", {}).items()),
        objs or "-",
    ]
    if val is not None and objective.kind == "weighted":
        parts.append(f"objective={val:.4g}")
    if rec.get("proxy") is not None:
        parts.append(f"proxy={rec['proxy']:.4g}")
    if rec.get("final_loss") is not None:
        parts.append(f"loss={rec['final_loss']:.4g}")
    parts.append(
        f"{rec.get('wall_time_s', 0):.1f} s, {rec.get('accelerator_hours', 0):.4f} accel-h"
    )
    if rec.get("reason"):
        parts.append(f"({rec['reason'][:120]})")
    return "  ".join(parts)


def publish_leaderboard(search_dir: str) -> None:
    """Refresh ``<search dir>/leaderboard/`` when the leaderboard module provides ``publish``; a
    leaderboard problem is reported but never stops the search."""
    try:
        from plora_ray import leaderboard
    except ImportError:
        return
    publish = getattr(leaderboard, "publish", None)
    if publish is None:
        return
    try:
        publish(search_dir)
    except Exception as exc:  # noqa: BLE001 - the search matters more than its report
        print(f"warning: leaderboard publish failed for {search_dir}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- running a search


@dataclass
class SearchOutcome:
    search_dir: str
    records: list[dict[str, Any]]
    study_storage: str
    study_name: str
    wall_time_s: float


def _split_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``--set`` overrides: ``search.params.<dotted key>.<field>`` addresses a param by its
    dotted key (which itself contains dots); other keys go through the run-config overrides."""
    from plora_ray.config import apply_overrides

    data = copy.deepcopy(data)
    plain: dict[str, Any] = {}
    params = (data.get("search") or {}).get("params") or {}
    for key, value in overrides.items():
        if key.startswith("search.params.") and isinstance(params, dict):
            rest = key[len("search.params.") :]
            match = max(
                (k for k in params if rest == k or rest.startswith(k + ".")), key=len, default=None
            )
            if match is not None:
                field_name = rest[len(match) + 1 :]
                if field_name:
                    params[match][field_name] = value
                else:
                    params[match] = value
                continue
        plain[key] = value
    return apply_overrides(data, plain) if plain else data


def _trial_cpus_gpus(spec: SearchSpec, cfg: RunConfig, executor: str) -> tuple[float, float]:
    """CPUs and GPUs one trial holds: its driver plus its Ray Train workers (train), or the one
    worker that is the trial actor itself (actor)."""
    r = cfg.resources
    if executor == "actor":
        return r.cpus_per_worker, r.gpus_per_worker
    return spec.driver_cpus + r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker


def run_search(
    file: str,
    *,
    storage: str | None = None,
    name: str | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    runner: str | None = None,
    verbose: int = 1,
    train_env: dict[str, str] | None = None,
) -> SearchOutcome:
    """Run (or resume) the search of a search-space YAML on the current Ray cluster.

    Attaches to a running Ray (``RAY_ADDRESS``, a ``ray job submit`` entrypoint, or an
    ``ray.init`` done by the caller) or starts a local one.

    Args:
        file: the search-space YAML.
        storage: overrides ``search.storage`` (local path or s3:// / gs:// URI).
        name: the search's name (default ``search.name``, else the file's stem).
        resume: continue the search stored at ``<storage>/<name>`` (finished trials, searcher
            state and the Optuna study are kept; unfinished trials restart from their own
            checkpoints).
        overrides: ``--set`` dotted keys, run config and ``search.*``.
        runner: ``module:function`` of the trainer (default ``plora_ray.train:run_training``,
            or ``plora_ray.train:run_in_process`` with ``search.trial_executor`` actor).
        train_env: Ray Train settings for the trials (default ``TRIAL_TRAIN_ENV``; ``{}``: Ray's
            own defaults).
        verbose: Tune's verbosity (progress table).

    Raises:
        ConfigError: problems in the file (all of them), before Ray starts; or ``--resume`` of a
            search that does not exist, or a new search over an existing one.
    """
    from plora_ray.config import load_yaml

    t0 = time.time()
    data = _split_overrides(load_yaml(file), overrides or {})
    cfg = config_from_dict({k: v for k, v in data.items() if k != "search"}, file)
    spec = parse_search_block(data, file)
    name = name or spec.name or Path(file).stem
    storage = storage or spec.storage
    if "://" not in storage:
        # Absolute before it reaches the trials: Tune runs each trial function in a working
        # directory of its own, where a relative storage (the default runs/search) would put the
        # trial's record and run directory out of the search driver's sight.
        storage = os.path.abspath(os.path.expanduser(storage))
    sdir = SearchDir(storage, name)
    if resume and not sdir.exists():
        raise ConfigError(
            [f"--resume: expected a search at {sdir.uri} (search.json), found none"], file
        )
    if not resume and sdir.exists():
        raise ConfigError(
            [
                f"--name {name}: a search already exists at {sdir.uri}; pass --resume "
                "to continue it or choose another --name / --storage"
            ],
            file,
        )
    base = {k: v for k, v in data.items() if k != "search"}
    executor = resolve_trial_executor(spec, base)
    if resume:
        # A resumed search trains the way it started (searches from before the setting: train).
        executor = (sdir.read_json("search.json") or {}).get("trial_executor", "train")
    default_runner = (
        "plora_ray.train:run_in_process" if executor == "actor" else "plora_ray.train:run_training"
    )
    ctx = TrialContext(
        base=base,
        source=str(file),
        storage=storage,
        name=name,
        objective=spec.objective,
        proxy_metric=spec.scheduler.metric if spec.scheduler.type == "asha" else "gsm8k_nll",
        runner=runner or default_runner,
    )
    if train_env is not None:
        ctx.train_env = dict(train_env)
    study_storage = spec.study_storage or default_study_storage(sdir)
    if not resume:
        sdir.write_json(
            "search.json",
            {
                "name": name,
                "objective": spec.objective.as_dict(),
                "metrics": spec.objective.metrics,
                "directions": spec.objective.directions,
                "weights": spec.objective.weights,
                "pareto": spec.objective.kind == "pareto",
                "algorithm": spec.algorithm,
                "seed": spec.seed,
                "num_samples": spec.num_samples,
                "trial_executor": executor,
                "scheduler": dataclasses.asdict(spec.scheduler),
                "params": [dataclasses.asdict(p) for p in spec.params],
                "points": spec.points,
                "source_file": str(file),
                "source_yaml": Path(file).read_text(),
                "overrides": overrides or {},
                "optuna_storage": _redact(study_storage),
                "study_name": name,
                "storage": storage,
                "created_at": _now(),
            },
        )

    import ray
    from ray import tune

    # Intermediate reports carry the proxy, not the objectives; the searcher wrapper and ASHA
    # skip such results, so Tune's strict check (every metric in every result) must be off.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Snapshot the experiment often: the window in which a killed driver loses searcher state is
    # this long (records of finished trials survive it anyway, see trial_driver).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    per_cpu, per_gpu = _trial_cpus_gpus(spec, cfg, executor)
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        # A local Ray gets at least one trial's worth of CPUs even on a 2-core machine.
        ray.init(
            address=address,
            include_dashboard=False,
            logging_level="WARNING",
            num_cpus=None if address else max(os.cpu_count() or 1, math.ceil(per_cpu)),
        )

    max_concurrent = spec.max_concurrent
    if max_concurrent is None:
        # What is free now (the job's own entrypoint excluded), not the cluster's total.
        res = ray.available_resources()
        fits = [int(res.get("CPU", 1) // per_cpu) if per_cpu > 0 else 10**6]
        if per_gpu > 0:
            fits.append(int(res.get("GPU", 0) // per_gpu))
        max_concurrent = max(1, min(fits))
    if not resume:
        # What the search ran with (the benchmark's occupancy counts these slots).
        meta = sdir.read_json("search.json") or {}
        sdir.write_json("search.json", {**meta, "max_concurrent_used": max_concurrent})

    if executor == "actor":
        # The trial actor is the worker: it holds the worker's CPUs (and GPUs) itself.
        trial_resources = {"cpu": per_cpu, "gpu": per_gpu}
    else:
        # The trial's workers are requested by Ray Train itself (its own placement group); Tune
        # only schedules the driver. max_concurrent keeps drivers from taking CPUs their workers
        # need.
        trial_resources = {"cpu": spec.driver_cpus}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), trial_resources)
    _build_ray_classes()
    callbacks = [globals()["SearchReporter"](ctx, spec)]
    if resume:
        tuner = tune.Tuner.restore(
            sdir.uri,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        import optuna

        searcher_cls = globals()["PLoRAOptunaSearch"]
        points = list(spec.points)
        if spec.algorithm == "grid":
            points += [p for p in grid_points(spec, base) if p not in points]
        searcher = searcher_cls(
            space=functools.partial(_define_by_run, spec=spec, base=base),
            metric=spec.objective.tune_metric,
            mode=spec.objective.tune_mode,
            points_to_evaluate=points or None,
            sampler=_make_sampler(spec),
            study_name=name,
            storage=optuna.storages.RDBStorage(study_storage),
        )
        scheduler = None
        if spec.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            s = spec.scheduler
            scheduler = ASHAScheduler(
                time_attr=s.time_attr,
                metric=s.metric,
                mode="max" if s.direction == "maximize" else "min",
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
                max_t=s.max_t,
                # A trial reaching max_t still runs its final evaluation.
                stop_last_trials=False,
            )
        from ray.tune.search import ConcurrencyLimiter

        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                scheduler=scheduler,
                num_samples=spec.num_samples,
                time_budget_s=spec.time_budget_s,
                # actor: the next trial runs in a finished trial's actor (FunctionTrainable's
                # reset_config ends the old trial's thread first); train: the Train workers are
                # new actors per trial anyway, so a reused driver would save little.
                reuse_actors=executor == "actor",
                trial_dirname_creator=_trial_dirname,
                trial_name_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=sdir.uri.rsplit("/", 1)[0] if sdir.is_local else storage,
                failure_config=tune.FailureConfig(max_failures=spec.max_retries),
                callbacks=callbacks,
                verbose=verbose,
            ),
        )
    tuner.fit()
    _close_orphans(study_storage, name)
    records = list_records(sdir)
    publish_leaderboard(sdir.uri)
    return SearchOutcome(
        search_dir=sdir.uri,
        records=records,
        study_storage=study_storage,
        study_name=name,
        wall_time_s=time.time() - t0,
    )


def _define_by_run(trial: Any, *, spec: SearchSpec, base: dict[str, Any]) -> dict[str, Any]:
    return sample_params(spec, trial, base)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _redact(url: str) -> str:
    """A database URL without its password (search.json is shared with the leaderboard)."""
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)


def _close_orphans(study_storage: str, name: str) -> None:
    """Study trials left RUNNING by a killed driver (asked after its last snapshot) are marked
    FAIL, so the study's history (and optuna-dashboard) matches what actually ran."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=study_storage)
    except Exception:  # noqa: BLE001
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "status", "orphaned")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def list_records(sdir: SearchDir) -> list[dict[str, Any]]:
    """All finished-trial records of a search directory (local), oldest first."""
    if not sdir.is_local:
        import pyarrow.fs

        fs, root = sdir._fs()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/trials", allow_not_found=True))
        names = [os.path.basename(i.path) for i in infos if i.path.endswith(".json")]
    else:
        d = os.path.join(sdir.path, "trials")
        names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    recs = [sdir.read_json(f"trials/{n}") for n in names if n.endswith(".json")]
    out = [r for r in recs if isinstance(r, dict)]
    return sorted(out, key=lambda r: (r.get("ended_at") or "", r.get("trial_id") or ""))


def search_command(
    file: str,
    storage: str | None = None,
    name: str | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
) -> int:
    """``plora-ray search FILE [--storage] [--name] [--resume] [--set k=v ...]``.

    Raises:
        ConfigError: problems in the file or the storage (printed by the CLI, exit 2).
    """
    out = run_search(file, storage=storage, name=name, resume=resume, overrides=overrides)
    by_status: dict[str, int] = {}
    for r in out.records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    print(
        f"search {out.search_dir}: {len(out.records)} finished trial(s) "
        f"({', '.join(f'{n} {s}' for s, n in sorted(by_status.items())) or 'none'}) in "
        f"{out.wall_time_s:.0f} s; study {out.study_name} at {_redact(out.study_storage)}",
        flush=True,
    )
    return 0 if out.records else 1
