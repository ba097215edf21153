"""The ``search:`` block of a search space: parse, validate, sample. No Ray here.

A search space is a run config plus a ``search:`` block::

    search:
      algorithm: tpe            # tpe (default) | nsga2 | motpe | random | grid
      seed: 0                   # seeds the Optuna sampler, so a search is repeatable
      num_samples: 6            # trials (grid: default = grid size)
      max_concurrent: 2         # trials at once (default: what the cluster's CPUs/GPUs fit)
      time_budget_s: 900        # stop starting new trials after this many seconds (null: none)
      trial_executor: auto      # auto | train | actor: where a trial trains (see below)
      driver_cpus: 1            # train: CPUs of a trial's driver (the Tune trial); workers on top
      max_retries: 0            # re-runs after lost infrastructure (worker, node, driver)
      storage: runs/search      # local path or s3:// / gs:// URI (Tune RunConfig.storage_path)
      study_storage: null       # null: SQLite file <search dir>/study.db; or a database URL
      objective:                # one of: metric+direction | weighted+direction | pareto
        metric: gsm8k
        direction: maximize
      scheduler:                # ASHA, pbt_unload or none: see plora_ray.search_scheduler
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

* ``train``: the Tune trial drives a Ray Train run of its own (``run_training``: a
  ``TorchTrainer`` with ``resources.num_workers`` workers, Train inside Tune). Any number of
  workers; every trial starts a Train controller and its worker processes afresh, a fixed cost
  per trial that ``benchmarks/search_overhead.py`` measures.
* ``actor``: single-worker trials train inside the Tune trial actor itself (``run_in_process``:
  the same worker loop, world size 1), and Tune reuses the actor for the next trial
  (``reuse_actors``), so the process, its imports and its process group are paid once per
  concurrent slot instead of once per trial. A trial takes ``resources.cpus_per_worker`` CPUs and
  ``gpus_per_worker`` GPUs (no separate driver CPU).
* ``auto`` (default): ``actor`` when every trial has one worker (``resources.num_workers`` 1 and
  no ``resources.*`` parameter), else ``train``.

Every problem of the block is reported at once, naming the file, the key, what was expected and
what was found, before Ray is imported (``plora-ray validate`` runs ``validate_search_block``).
"""

from __future__ import annotations

import copy
import difflib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plora_ray.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    load_yaml,
    resolve_relative_paths,
)
from plora_ray.config.conversion import yaml_number
from plora_ray.objective import ObjectiveSpec, parse_objective_block
from plora_ray.search_params import (
    ParamSpec,
    dotted_value,
    flatten_params,
    parse_params,
    read_conditions,
    suggest,
)
from plora_ray.search_scheduler import (
    PROXY_METRICS,
    TIME_ATTRS,
    SchedulerSpec,
    check_pbt,
    check_scheduler_direction,
    parse_scheduler,
)

__all__ = [
    "ALGORITHMS",
    "PROXY_METRICS",
    "TIME_ATTRS",
    "TRIAL_EXECUTORS",
    "SchedulerSpec",
    "SearchSpace",
    "SearchSpec",
    "TrialExecutor",
    "apply_search_overrides",
    "grid_points",
    "load_search_space",
    "parse_search_block",
    "resolve_trial_executor",
    "run_config_part",
    "sample_params",
    "search_name_problem",
    "trial_resources",
    "validate_search_block",
]

ALGORITHMS = ("tpe", "nsga2", "motpe", "random", "grid")
TRIAL_EXECUTORS = ("auto", "train", "actor")
TrialExecutor = Literal["train", "actor"]

# Stands in for an objective with problems, so the rest of the block is still checked.
_PLACEHOLDER_OBJECTIVE = ObjectiveSpec("single", ("gsm8k",), ("maximize",))


# --------------------------------------------------------------------------- spec objects


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

    @property
    def proxy_metric(self) -> str:
        """The cheap metric a trial's record keeps as ``proxy`` (ASHA's, else the GSM8K NLL)."""
        return self.scheduler.metric if self.scheduler.ranks_trials else "gsm8k_nll"


def run_config_part(data: dict[str, Any]) -> dict[str, Any]:
    """The run config of a search-space mapping: everything but its ``search:`` block."""
    return {k: v for k, v in data.items() if k != "search"}


# --------------------------------------------------------------------------- parsing: params


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


# --------------------------------------------------------------------------- parsing: the rest


@dataclass(frozen=True)
class _Setting:
    """A scalar setting of the block: read as ``kind``, checked by ``ok``, the default (and a
    problem) when it is not usable. A ``null`` is accepted where the default is None."""

    key: str
    kind: Literal["int", "float", "str"]
    default: Any
    ok: Callable[[Any], Any]
    expected: str

    def read(self, raw: dict[str, Any], problems: list[str]) -> Any:
        v = raw.get(self.key, self.default)
        if v is None and self.default is None:
            return None
        num = yaml_number(v) if self.kind in ("int", "float") else v
        if self.kind == "int" and (num is None or not float(num).is_integer()):
            num = None
        if num is None or not self.ok(num):
            problems.append(f"search.{self.key}: expected {self.expected}, found {v!r}")
            return self.default
        return int(num) if self.kind == "int" else num


# Every scalar setting but num_samples (whose default depends on the rest), in reading order.
_SETTINGS = (
    _Setting(
        "algorithm", "str", "tpe", lambda v: v in ALGORITHMS, "one of " + ", ".join(ALGORITHMS)
    ),
    _Setting("seed", "int", 0, lambda v: v >= 0, "an integer >= 0"),
    _Setting("max_concurrent", "int", None, lambda v: v >= 1, "an integer >= 1 or null"),
    _Setting("time_budget_s", "float", None, lambda v: v > 0, "a finite number > 0 or null"),
    _Setting(
        "driver_cpus",
        "float",
        1.0,
        lambda v: v > 0,
        "a finite number > 0 (Tune refuses a trial with an empty resource bundle; e.g. 0.01)",
    ),
    _Setting(
        "trial_executor",
        "str",
        "auto",
        lambda v: v in TRIAL_EXECUTORS,
        "one of " + ", ".join(TRIAL_EXECUTORS),
    ),
    _Setting("max_retries", "int", 0, lambda v: v >= 0, "an integer >= 0"),
    _Setting(
        "storage",
        "str",
        "runs/search",
        lambda v: isinstance(v, str) and v,
        "a local path or s3:// / gs:// URI",
    ),
    _Setting(
        "study_storage",
        "str",
        None,
        lambda v: isinstance(v, str) and "://" in v,
        "null (SQLite in the search directory) or a database URL such as postgresql://user@host/db",
    ),
    _Setting(
        "name",
        "str",
        None,
        lambda v: search_name_problem(v) is None,
        "a plain directory name (no '/', not '.' or '..'): the search lives in <storage>/<name>",
    ),
)


def search_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot name a search directory inside the storage, or None when it can.

    The search directory is ``<storage>/<name>``: a name with a path separator, ``.``, ``..`` or
    an absolute path would put (or overwrite) it outside the storage the user chose.
    """
    if not isinstance(name, str) or not name.strip():
        return "an empty name"
    if name in (".", ".."):
        return f"{name!r}, which names the storage or its parent, not a directory inside it"
    if "/" in name or "\\" in name or "\0" in name:
        return f"{name!r}, a path (with a separator), not one directory name"
    return None


def _check_trial_executor(spec: SearchSpec, base: dict[str, Any], problems: list[str]) -> None:
    """``actor`` trains a trial in its Tune actor: one worker, the same resources every trial."""
    if spec.trial_executor != "actor":
        return
    workers = dotted_value(base, "resources.num_workers")
    if workers is not None and workers != 1:
        problems.append(
            f"search.trial_executor: actor trains each trial in its Tune actor, "
            f"one worker; expected resources.num_workers 1, found {workers!r} "
            "(use trial_executor: train for multi-worker trials)"
        )
    for p in spec.params:
        if p.key.startswith("resources."):
            problems.append(
                f"search.params.{p.key}: with search.trial_executor actor every "
                "trial's actor takes the same resources; expected a fixed "
                "value, found a searched parameter (use trial_executor: train)"
            )


def _check_algorithm(
    spec: SearchSpec, objective: ObjectiveSpec | None, problems: list[str]
) -> None:
    """NSGA-II/MOTPE need a Pareto objective; a grid enumerates, so only choice and int params."""
    if objective is not None and spec.algorithm in ("nsga2", "motpe") and not objective.pareto:
        problems.append(
            f"search.algorithm: {spec.algorithm} is multi-objective; expected "
            f"objective.pareto with it, found a {objective.kind} objective"
        )
    if spec.algorithm == "grid":
        for p in spec.params:
            if p.distribution not in ("choice", "int"):
                problems.append(
                    f"search.params.{p.key}.distribution: grid search enumerates "
                    f"values; expected choice or int, found {p.distribution!r}"
                )


def _check_values_against_schema(
    spec: SearchSpec, base: dict[str, Any], problems: list[str]
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
        probes: list[Any]
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


def _point_value_problem(p: ParamSpec | None, k: str, v: Any, by_key: dict[str, ParamSpec]) -> str:
    """Why value ``v`` of key ``k`` cannot be in a point ('' when it can)."""
    if p is None:
        hint = difflib.get_close_matches(str(k), list(by_key), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"not a search parameter{extra}; expected one of {', '.join(by_key)}"
    if not p.contains(v):
        rng = p.values if p.distribution == "choice" else f"[{p.low}, {p.high}]"
        return f"expected a value of the distribution ({rng}), found {v!r}"
    return ""


def _check_points(
    spec: SearchSpec, base: dict[str, Any], raw: Any, declared: set[str], problems: list[str]
) -> None:
    """Each fixed point: known params, values their distributions can give, only active params.
    The valid ones are appended to ``spec.points``."""
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
        if any(isinstance(v, dict) for v in point.values()):
            point = flatten_params(point)
        point = dict(point)
        ok = True
        for k, v in list(point.items()):
            p = by_key.get(k)
            if p is not None and p.distribution != "choice" and isinstance(v, str):
                # YAML 1.1 reads 1.0e10 (no exponent sign) as a string, as for low/high.
                num = yaml_number(v)
                if num is not None:
                    v = point[k] = int(num) if p.is_int and num.is_integer() else num
            if p is None and k in declared:
                ok = False  # the param's own problem is already reported
                continue
            why = _point_value_problem(p, k, v, by_key)
            if why:
                problems.append(f"{where}.{k}: {why}")
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
    keys = {q.key for q in spec.params}
    active: set[str] = set()
    for p in spec.params:
        ok = True
        for ck, allowed in p.when.items():
            cur = values.get(ck) if ck in keys else dotted_value(base, ck)
            if (ck in keys and ck not in active) or cur not in allowed:
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
    raw = data.get("search")
    if not isinstance(raw, dict):
        raise ConfigError([f"search: expected a mapping (the search block), found {raw!r}"], source)
    problems: list[str] = []
    base = run_config_part(data)
    for k in raw:
        if k not in _TOP_KEYS:
            hint = difflib.get_close_matches(str(k), sorted(_TOP_KEYS), n=1)
            extra = f" (did you mean {'search.' + hint[0]!r}?)" if hint else ""
            problems.append(
                f"search.{k}: unknown key{extra}; expected one of {', '.join(sorted(_TOP_KEYS))}"
            )

    objective = parse_objective_block(raw.get("objective"), problems)
    scheduler = parse_scheduler(raw.get("scheduler"), problems)
    check_scheduler_direction(scheduler, objective, problems)
    params, flat = parse_params(raw.get("params"), problems)
    spec = SearchSpec(
        objective=objective or _PLACEHOLDER_OBJECTIVE, params=params, scheduler=scheduler
    )
    read_conditions(params, flat, problems)
    for setting in _SETTINGS:
        setattr(spec, setting.key, setting.read(raw, problems))
    _check_trial_executor(spec, base, problems)
    _check_algorithm(spec, objective, problems)
    _check_points(spec, base, raw.get("points"), set(flat), problems)
    if not problems:
        _check_values_against_schema(spec, base, problems)

    n_default = len(grid_points(spec, base)) if spec.algorithm == "grid" and not problems else 8
    num_samples = _Setting("num_samples", "int", n_default, lambda v: v >= 1, "an integer >= 1")
    spec.num_samples = num_samples.read(raw, problems)
    if spec.points and spec.num_samples < len(spec.points):
        problems.append(
            f"search.num_samples: expected at least the {len(spec.points)} fixed "
            f"points, found {spec.num_samples}"
        )
    check_pbt(scheduler, params, base, spec.num_samples, problems)
    if (
        scheduler.type == "pbt_unload"
        and spec.max_concurrent is not None
        and spec.max_concurrent < spec.num_samples
    ):
        problems.append(
            f"search.max_concurrent: pbt_unload starts its whole population at once (the "
            f"cluster's free CPUs/GPUs decide how many train together; Tune's PBT pauses and "
            f"resumes the rest in turn); expected null or at least search.num_samples "
            f"({spec.num_samples}), found {spec.max_concurrent}"
        )
    if scheduler.type == "pbt_unload" and "://" in spec.storage:
        problems.append(
            f"search.storage: pbt_unload copies unload checkpoints between trials' run "
            f"directories, which needs storage every node sees as a filesystem path (a shared "
            f"filesystem); found {spec.storage!r}"
        )
    if problems:
        raise ConfigError(problems, source)
    return spec


@dataclass
class SearchSpace:
    """A search-space file read, overridden and checked: what ``search`` runs and what
    ``validate`` checks, so the two agree on every key."""

    data: dict[str, Any]  # the whole mapping: overrides applied, relative paths resolved
    base: dict[str, Any]  # its run config (the mapping without ``search``)
    config: RunConfig
    spec: SearchSpec


def load_search_space(file: str, overrides: dict[str, Any] | None = None) -> SearchSpace:
    """Read a search-space YAML, apply ``--set`` overrides and check all of it.

    Relative paths are resolved against the YAML's directory as for a run config
    (``load_config``), before the overrides are applied.

    Args:
        file: the search-space YAML.
        overrides: ``--set`` dotted keys, run config and ``search.*``.

    Raises:
        ConfigError: every problem of the run config and of the search block together, each
            naming the file.
    """
    data = resolve_relative_paths(load_yaml(file), Path(file).resolve().parent)
    try:
        data = apply_search_overrides(data, overrides or {})
    except ConfigError as exc:
        raise ConfigError(exc.problems, file) from None
    base = run_config_part(data)
    problems: list[str] = []
    try:
        config = config_from_dict(base, file)
    except ConfigError as exc:
        problems += exc.problems
    try:
        spec = parse_search_block(data, file)
    except ConfigError as exc:
        problems += exc.problems
    if problems:
        raise ConfigError(problems, file)
    return SearchSpace(data=data, base=base, config=config, spec=spec)


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


def resolve_trial_executor(spec: SearchSpec, base: dict[str, Any]) -> TrialExecutor:
    """``train`` or ``actor``: ``search.trial_executor`` with ``auto`` decided (see the module
    docstring) from the run config ``base`` (the YAML mapping without ``search``)."""
    if spec.trial_executor == "train":
        return "train"
    if spec.trial_executor == "actor":
        return "actor"
    workers = dotted_value(base, "resources.num_workers")
    single = workers is None or workers == 1  # the run config's default is 1 worker
    if single and not any(p.key.startswith("resources.") for p in spec.params):
        return "actor"
    return "train"


def trial_resources(spec: SearchSpec, cfg: RunConfig, executor: str) -> tuple[float, float]:
    """CPUs and GPUs one trial holds: its driver plus its Ray Train workers (train), or the one
    worker that is the trial actor itself (actor)."""
    r = cfg.resources
    if executor == "actor":
        return r.cpus_per_worker, r.gpus_per_worker
    return spec.driver_cpus + r.num_workers * r.cpus_per_worker, r.num_workers * r.gpus_per_worker


def apply_search_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a search-space mapping (a copy is returned).

    ``search.params.<dotted key>.<field>`` addresses a param by its dotted key (which itself
    contains dots); other keys go through the run-config overrides.

    Raises:
        ConfigError: an override the run config's ``apply_overrides`` cannot apply.
    """
    data = copy.deepcopy(data)  # the caller's mapping is not modified
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


# --------------------------------------------------------------------------- sampling


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
            (values.get(ck) if ck in keys else dotted_value(base, ck)) in allowed
            and (ck not in keys or ck in values)
            for ck, allowed in p.when.items()
        )
        if ok:
            values[p.key] = suggest(trial, p)
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
