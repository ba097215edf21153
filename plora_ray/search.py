"""``plora-ray search``: run (or resume) the search of a search-space YAML on a Ray cluster.

The file is read and every problem of it reported (``plora_ray.search_space``) before Ray starts;
then the search directory ``<storage>/<name>/`` gets its ``search.json`` (what the search is: the
objective, the space, the source YAML, the Optuna study's location), Ray Tune runs the trials
(``plora_ray.tune_adapter``), each finished trial leaves its record in ``trials/<id>.json``
(``plora_ray.store``) and a line on stdout, and the leaderboard is refreshed as trials finish.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from plora_ray.config import ConfigError
from plora_ray.console import print_above_table
from plora_ray.executors import Trainer, run_in_process, run_training
from plora_ray.inputs_check import check_inputs
from plora_ray.leaderboard import publish
from plora_ray.leaderboard.publish import LEADERBOARD_DIR
from plora_ray.objective import ObjectiveSpec
from plora_ray.search_lock import take_search_lock
from plora_ray.search_resume import (
    EXTENSIONS_KEY,
    check_extend,
    check_resume,
    recorded_extensions,
    started_config,
)
from plora_ray.search_space import (
    SearchSpec,
    TrialExecutor,
    load_search_space,
    resolve_trial_executor,
    search_name_problem,
    trial_resources,
)
from plora_ray.storage_check import check_storage_visible
from plora_ray.store import SearchDir, TrialRecord
from plora_ray.trial_record import summary_line, utc_now
from plora_ray.tune_adapter import (
    TrialContext,
    connect_ray,
    free_trial_slots,
    run_tuner,
)

__all__ = [
    "SearchOutcome",
    "default_study_storage",
    "publish_leaderboard",
    "resume_command",
    "run_search",
    "search_command",
]


@dataclass
class SearchOutcome:
    """What a finished (or resumed and finished) search left."""

    search_dir: str
    records: list[TrialRecord]
    study_storage: str
    study_name: str
    wall_time_s: float
    objective: ObjectiveSpec
    # Stopped by Ctrl-C / SIGINT with trials unfinished: --resume continues it.
    interrupted: bool = False


def default_study_storage(sdir: SearchDir) -> str:
    """SQLite inside the search directory, so optuna-dashboard and ``--resume`` find it there.
    With cloud storage the file lives in the driver's local scratch (SQLite needs a real file
    system); use a database URL (study_storage) for a study that outlives the driver machine."""
    if sdir.is_local:
        return f"sqlite:///{os.path.join(sdir.path, 'study.db')}"
    local = sdir.scratch_dir()
    os.makedirs(local, exist_ok=True)
    return f"sqlite:///{os.path.join(local, 'study.db')}"


def _redact(url: str) -> str:
    """A database URL without its password (search.json is shared with the leaderboard)."""
    return re.sub(r"(://[^:/@]+):[^@]+@", r"\1:***@", url)


def publish_leaderboard(search_dir: str) -> None:
    """Refresh ``<search dir>/leaderboard/``; a leaderboard problem is reported but never stops
    the search."""
    try:
        publish(search_dir)
    except Exception as exc:  # the search matters more than its report
        print(f"warning: leaderboard publish failed for {search_dir}: {exc}", file=sys.stderr)


def announce_trial(rec: TrialRecord, *, objective: ObjectiveSpec, search_dir: str) -> None:
    """What the search driver does with each finished trial: its summary line, a fresh board."""
    print_above_table(summary_line(rec, objective))
    publish_leaderboard(search_dir)


def _search_json(
    *,
    name: str,
    spec: SearchSpec,
    executor: TrialExecutor,
    file: str,
    overrides: dict[str, Any],
    study_storage: str,
    storage: str,
) -> dict[str, Any]:
    """What ``search.json`` says the search is (the leaderboard and ``--resume`` read it)."""
    objective = spec.objective.as_dict()
    return {
        "name": name,
        "objective": objective,
        "metrics": objective["metrics"],
        "directions": objective["directions"],
        "weights": objective["weights"],
        "pareto": objective["pareto"],
        "algorithm": spec.algorithm,
        "seed": spec.seed,
        "num_samples": spec.num_samples,
        "trial_executor": executor,
        "scheduler": dataclasses.asdict(spec.scheduler),
        "params": [dataclasses.asdict(p) for p in spec.params],
        "points": spec.points,
        "source_file": str(file),
        "source_yaml": Path(file).read_text(),
        "overrides": overrides,
        "optuna_storage": _redact(study_storage),
        "study_name": name,
        "storage": storage,
        "created_at": utc_now(),
    }


def _search_dir(file: str, storage: str, name: str, resume: bool) -> SearchDir:
    """The search directory, checked against ``resume``.

    Raises:
        ConfigError: ``--resume`` of a search that does not exist, or a new search over an
            existing one.
    """
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
    return sdir


def check_population_fits(population: int, per_cpu: float, per_gpu: float, file: str) -> None:
    """pbt_unload with ``trial_executor: train`` needs its whole population on the cluster at
    once: each trial's driver holds a CPU while its Ray Train workers wait for theirs, so
    drivers of a population larger than the cluster would hold the CPUs every worker waits for
    (the actor executor's trials hold their whole share and simply wait their turn).

    Raises:
        ConfigError: the cluster's free CPUs/GPUs fit fewer trials than the population.
    """
    fits = free_trial_slots(per_cpu, per_gpu)
    if fits < population:
        raise ConfigError(
            [
                f"search.num_samples: pbt_unload with search.trial_executor train runs its whole "
                f"population at once ({per_cpu:g} CPUs and {per_gpu:g} GPUs per trial, driver "
                f"included); expected at most {fits}, what this cluster has free, found "
                f"{population} (add nodes, lower search.num_samples, or use "
                "search.trial_executor actor for one-worker trials)"
            ],
            file,
        )


def run_search(
    file: str,
    *,
    storage: str | None = None,
    name: str | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    runner: Trainer | None = None,
    verbose: int = 0,
    train_env: dict[str, str] | None = None,
    extend: dict[str, Any] | None = None,
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
        runner: the trainer of every trial (default ``run_training``, or ``run_in_process``
            with ``search.trial_executor`` actor).
        verbose: 0: quiet (a live table, a line per finished trial; the trials' worker logs stay
            in Ray's log files); 1 (``-v``): the worker logs and Tune's status output too; 2
            (``-vv``): Tune's per-result output too.
        train_env: Ray Train settings for the trials (default ``TRIAL_TRAIN_ENV``; ``{}``: Ray's
            own defaults).
        extend: ``--extend`` keys of a ``--resume`` that grow the search
            (``search_resume.EXTENDABLE``: more samples), recorded in ``search.json``.

    Raises:
        ConfigError: problems in the file (all of them) or a search name that would leave the
            storage, before anything is written or Ray starts; or ``--resume`` of a search that
            does not exist, or a new search over an existing one; or ``--extend`` of another key
            or without ``--resume``.
    """
    t0 = time.time()
    overrides = overrides or {}
    space = load_search_space(file, overrides)
    check_inputs(space.config, file)
    base, cfg, spec = space.base, space.config, space.spec
    name = name or spec.name or Path(file).stem
    storage = storage or spec.storage
    why = search_name_problem(name)
    if why is not None:
        raise ConfigError(
            [
                f"search name: expected one directory name inside the storage ({storage}), "
                f"found {why} (from --name, search.name or the file's name)"
            ],
            file,
        )
    if "://" not in storage:
        # Absolute before it reaches the trials: Tune runs each trial function in a working
        # directory of its own, where a relative storage (the default runs/search) would put the
        # trial's record and run directory out of the search driver's sight.
        storage = os.path.abspath(os.path.expanduser(storage))
    sdir = _search_dir(file, storage, name, resume)
    extensions: list[dict[str, Any]] = []
    if extend and not resume:
        raise ConfigError(["--extend: grows a search being resumed; pass --resume"], file)
    if resume:
        extensions = check_extend(sdir, extend or {}, file)
        grown = {**recorded_extensions(sdir), **(extend or {})}
        if grown:
            # The file and --set as started, plus every extension so far.
            space = load_search_space(file, {**overrides, **grown})
            base, cfg, spec = space.base, space.config, space.spec
        # A changed search is refused (search_resume).
        check_resume(sdir, space, file, extended=tuple(grown))
    lock = take_search_lock(sdir, fresh=not resume)  # one driver per search (search_lock)
    try:
        executor = resolve_trial_executor(spec, base)
        if resume:
            # A resumed search trains the way it started (searches from before the setting:
            # train).
            started_with = (sdir.read_json("search.json") or {}).get("trial_executor", "train")
            executor = "actor" if started_with == "actor" else "train"
        default_runner: Trainer = run_in_process if executor == "actor" else run_training
        ctx = TrialContext(
            base=base,
            source=str(file),
            storage=storage,
            name=name,
            objective=spec.objective,
            proxy_metric=spec.proxy_metric,
            runner=runner or default_runner,
            max_retries=spec.max_retries,
            pbt=spec.scheduler.type == "pbt_unload",
        )
        if train_env is not None:
            ctx.train_env = dict(train_env)
        study_storage = spec.study_storage or default_study_storage(sdir)
        if extensions:
            meta = sdir.read_json("search.json") or {}
            meta[EXTENSIONS_KEY] = [*(meta.get(EXTENSIONS_KEY) or []), *extensions]
            meta["num_samples"] = spec.num_samples
            sdir.write_json("search.json", meta)
        per_cpu, per_gpu = trial_resources(spec, cfg, executor)
        if verbose == 0:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        connect_ray(per_cpu, quiet=verbose == 0)
        check_storage_visible(storage, file)  # every node must see it (storage_check)
        if spec.scheduler.type == "pbt_unload" and executor == "train":
            check_population_fits(spec.num_samples, per_cpu, per_gpu, file)
        if not resume:
            # Written once the storage is known good: a refused storage leaves no search behind
            # that only --resume could reuse.
            sdir.write_json(
                "search.json",
                started_config(space)
                | _search_json(
                    name=name,
                    spec=spec,
                    executor=executor,
                    file=file,
                    overrides=overrides,
                    study_storage=study_storage,
                    storage=storage,
                ),
            )
        max_concurrent = spec.max_concurrent or free_trial_slots(per_cpu, per_gpu)
        if spec.scheduler.type == "pbt_unload":
            # The whole population exists from the start (Tune's PBT pauses and resumes its
            # trials in turn when the cluster fits fewer; a trial waits for its resources).
            max_concurrent = spec.num_samples
        if not resume:
            # What the search ran with (the benchmark's occupancy counts these slots).
            meta = sdir.read_json("search.json") or {}
            sdir.write_json("search.json", {**meta, "max_concurrent_used": max_concurrent})
        interrupted = run_tuner(
            spec=spec,
            ctx=ctx,
            sdir=sdir,
            executor=executor,
            trial_cpus_gpus=(per_cpu, per_gpu),
            max_concurrent=max_concurrent,
            study_storage=study_storage,
            resume=resume,
            verbose=verbose,
            on_finished=functools.partial(
                announce_trial, objective=spec.objective, search_dir=sdir.uri
            ),
        )
        records = sdir.records()
        publish_leaderboard(sdir.uri)
    finally:
        lock.release()  # also when the search raised: the next --resume is not refused
    return SearchOutcome(
        search_dir=sdir.uri,
        records=records,
        study_storage=study_storage,
        study_name=name,
        wall_time_s=time.time() - t0,
        objective=spec.objective,
        interrupted=interrupted,
    )


def _set_arg(key: str, value: Any) -> str:
    """``--set`` text that parses back to ``value`` (YAML flow style; PyYAML writes 1e+30 as
    1.0e+30, which it reads back as a number)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    text = text.removesuffix("...").strip()
    return f"{key}={text}"


def resume_command(file: str, storage: str, name: str, overrides: dict[str, Any]) -> str:
    """The exact ``plora-ray search ... --resume`` that continues this search (the file is read
    again on resume, so its ``--set`` overrides are repeated)."""
    args = ["plora-ray", "search", file, "--storage", storage, "--name", name, "--resume"]
    if overrides:
        args += ["--set", *(_set_arg(k, v) for k, v in overrides.items())]
    return shlex.join(args)


def _best_line(out: SearchOutcome) -> str:
    """``best trial 1a2b: gsm8k_nll=7.601  method=plora optim.lr=0.0023 ...`` (Pareto: the
    front's size; the leaderboard lists it)."""
    done = [r for r in out.records if r.status == "completed"]
    if out.objective.pareto:
        return f"Pareto search: {len(done)} completed trial(s); the front is on the leaderboard"
    scored = [r for r in done if r.objective_value is not None]
    if not scored:
        return "best trial: none (no trial completed with an objective)"
    sign = 1.0 if out.objective.scalar_direction == "maximize" else -1.0
    best = max(scored, key=lambda r: sign * float(r.objective_value or 0.0))
    params = " ".join(f"{k}={v}" for k, v in best.params.items())
    label = out.objective.describe().split(" ", 1)[1]
    return f"best trial {best.trial_id}: {label} = {best.objective_value:.6g}  {params}"


def search_command(
    file: str,
    storage: str | None = None,
    name: str | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    verbose: int = 0,
    extend: dict[str, Any] | None = None,
) -> int:
    """``plora-ray search FILE [--storage] [--name] [--resume] [--set k=v ...] [-v|-vv]``.

    Prints a line per finished trial, then the search's totals, its best trial and where its
    leaderboard is; after an interruption, the ``--resume`` command that continues it.

    Raises:
        ConfigError: problems in the file or the storage (printed by the CLI, exit 2).
    """
    out = run_search(
        file,
        storage=storage,
        name=name,
        resume=resume,
        overrides=overrides,
        verbose=verbose,
        extend=extend,
    )
    by_status: dict[str, int] = {}
    for r in out.records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    print(
        f"search {out.search_dir}: {len(out.records)} finished trial(s) "
        f"({', '.join(f'{n} {s}' for s, n in sorted(by_status.items())) or 'none'}) in "
        f"{out.wall_time_s:.0f} s; study {out.study_name} at {_redact(out.study_storage)}",
        flush=True,
    )
    print(_best_line(out), flush=True)
    print(f"leaderboard: {out.search_dir}/{LEADERBOARD_DIR}/index.html", flush=True)
    if out.interrupted:
        sdir_storage = out.search_dir.rsplit("/", 1)[0]
        print(
            "interrupted; continue with:\n  "
            + resume_command(file, sdir_storage, out.study_name, overrides or {}),
            flush=True,
        )
        return 130
    return 0 if out.records else 1
