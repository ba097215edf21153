"""Ray Tune glue of a search: the trial driver, the searcher and callback, the Tuner.

One Tune trial is one run config: ``trial_driver`` overrides the search space's run config with the
trial's sampled dotted keys and hands it to a trainer (``run_training``: a Ray Train run of its
own; ``run_in_process``: the Tune trial actor trains itself). ``PLoRAOptunaSearch`` tells Optuna
what became of each trial; ``SearchReporter`` records the trials that could not record themselves
and sweeps what Ray leaves behind a stopped trial. ``connect_ray`` / ``free_trial_slots`` /
``run_tuner`` start (or restore) and run the Tuner.

Every import of Ray and every call of a private Ray or Optuna API is in this module. The private
ones were written against ray 2.60.0 and optuna 5.0.0; each says so where it is made.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import optuna
import ray
from ray import tune
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from plora_ray.config import ConfigError, RunConfig, config_from_dict
from plora_ray.executors import Trainer, cleanup_run_shm, holds_run
from plora_ray.objective import ObjectiveSpec
from plora_ray.search_space import SearchSpec, TrialExecutor, grid_points, sample_params
from plora_ray.store import TERMINAL_STATUSES, SearchDir, TrialRecord, TrialStatus
from plora_ray.trial_record import build_record

__all__ = [
    "TRIAL_TRAIN_ENV",
    "PLoRAOptunaSearch",
    "SearchReporter",
    "TrialContext",
    "connect_ray",
    "free_trial_slots",
    "remove_orphaned_placement_groups",
    "run_tuner",
    "trial_driver",
]

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
    store by ``tune.with_parameters``)."""

    base: dict[str, Any]  # the search space's run config (the YAML mapping without search:)
    source: str
    storage: str
    name: str
    objective: ObjectiveSpec
    proxy_metric: str
    # run_training (trial_executor train) or run_in_process (actor), unless a test or benchmark
    # swaps it.
    runner: Trainer
    # Ray Train settings for the trial's training run (see TRIAL_TRAIN_ENV).
    train_env: dict[str, str] = field(default_factory=lambda: dict(TRIAL_TRAIN_ENV))

    def record(self, **fields: Any) -> TrialRecord:
        """``build_record`` for a trial of this search."""
        return build_record(
            search=self.name, objective=self.objective, proxy_metric=self.proxy_metric, **fields
        )


# --------------------------------------------------------------------------- the trial driver


def _final_metrics(rec: TrialRecord) -> dict[str, Any]:
    """The last Tune result of a trial: objectives flat (for Pareto searches), ``objective`` (for
    single/weighted), status and cost (for the summary line)."""
    out: dict[str, Any] = {"status": rec.status, "wall_time_s": rec.wall_time_s, "trial_done": True}
    if rec.status == "completed":
        for m, v in rec.objectives.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[m] = float(v)
        if rec.objective_value is not None:
            out["objective"] = rec.objective_value
    return out


class _ReportClock:
    """Wall-clock times of the trainer's reports as they land (metrics.jsonl carries only the
    run's own elapsed seconds): the timeline benchmarks/search_overhead.py splits into fixed
    overhead and work."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}

    def __call__(self, m: dict[str, Any]) -> None:
        now = time.time()
        if m.get("final"):
            self.seen["final_report_at"] = now
            return
        if "first_report_at" not in self.seen and m.get("elapsed_s") is not None:
            self.seen["first_report_at"] = now
            self.seen["first_report_elapsed_s"] = float(m["elapsed_s"])
        self.seen["last_step_at"] = now

    def timeline(
        self, driver_started: float, cfg: RunConfig, final: dict[str, Any]
    ) -> dict[str, Any]:
        seen = self.seen
        return {
            "driver_started_at": driver_started,
            "driver_pid": os.getpid(),
            # The training loop's start: the first report's arrival minus the loop time it
            # reports.
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


def trial_driver(params: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: the run config with the sampled dotted keys, trained by ``ctx.runner``.

    The record goes to ``trials/<id>.json`` *before* the final report, so a driver killed after it
    and resumed finds the trial done (the re-run returns the record instead of training again).
    """
    driver_started = time.time()
    for key, value in ctx.train_env.items():
        os.environ.setdefault(key, value)
    trial_id = tune.get_context().get_trial_id()
    sdir = SearchDir(ctx.storage, ctx.name)
    done = sdir.trial_record(trial_id)
    if done is not None:
        tune.report(_final_metrics(done))
        return
    started = time.time()
    run_dir = sdir.run_dir(trial_id)
    try:
        cfg = config_from_dict(ctx.base, ctx.source, overrides=params)
    except ConfigError as exc:
        # Validation probed each value alone; a combination can still be invalid (batch sizes).
        rec = ctx.record(
            trial_id=trial_id,
            params=params,
            config=None,
            status="failed",
            reason=str(exc),
            run_dir=run_dir,
            started=started,
        )
        sdir.write_record(rec)
        tune.report(_final_metrics(rec))
        return
    # A retried or resumed trial continues from its own newest checkpoint (Ray Train's snapshot
    # in <run_dir>/ray; run_in_process keeps its checkpoints in the same place without it). The
    # trainer forwards its reports to this Tune trial by itself (TuneReportCallback when it runs
    # inside a Tune session).
    clock = _ReportClock()
    result = ctx.runner(cfg, run_dir, report=clock, resume=holds_run(run_dir)).as_dict()
    status = str(result.get("status") or "completed")
    if status not in TERMINAL_STATUSES:
        status = "failed"
    reason = result.get("reason")
    if status == "diverged" and not reason:
        reason = f"diverged at step {result.get('diverged_step')}"
    rec = ctx.record(
        trial_id=trial_id,
        params=params,
        config=cfg.to_dict(),
        status=cast(TrialStatus, status),
        reason=reason,
        run_dir=run_dir,
        started=started,
        result=result,
    )
    rec.timeline = clock.timeline(driver_started, cfg, result.get("metrics") or {})
    if sdir.trial_record(trial_id) is not None:
        # Stopped by the scheduler while training: Tune killed this trial's actors (so the run
        # "failed" on a dead controller) and the search driver has recorded it as early_stopped.
        return
    sdir.write_record(rec)
    tune.report(_final_metrics(rec))


# --------------------------------------------------------------------------- searcher, callback


class PLoRAOptunaSearch(OptunaSearch):
    """OptunaSearch that (1) ignores intermediate results without the objective (the proxy
    reports), (2) tells Optuna FAIL for diverged/failed trials, with the reason, instead of
    PRUNED, and (3) tags each Optuna trial with its Tune trial id for the dashboard."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
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
        # OptunaSearch's private _ot_trials / _completed_trials (ray 2.60.0): the Optuna trial
        # behind a Tune trial, and the Tune trials already told to the study.
        ot_trial = self._ot_trials.get(trial_id)
        status = (result or {}).get("status")
        if ot_trial is not None and trial_id not in self._completed_trials:
            try:
                ot_trial.set_user_attr("tune_trial_id", trial_id)
                ot_trial.set_user_attr("status", status or ("failed" if error else "early_stopped"))
            except Exception:  # a finished study trial refuses attrs
                pass
        if status in ("diverged", "failed"):
            error, result = True, None
        super().on_trial_complete(trial_id, result=result, error=error)


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
    # Private GCS accessor and its protobuf table (ray 2.60.0): the public state API needs the
    # dashboard.
    accessor = ray._private.state.state._connect_and_get_accessor()
    table = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # protobuf, no stubs
    removed = 0
    for raw in accessor.get_placement_group_table():
        d = table.FromString(raw)
        # A group made by a driver (Tune's trial groups) has the nil actor id (all 0xff bytes)
        # and reads as "creator actor dead": only groups made by an actor qualify.
        made_by_actor = bool(d.creator_actor_id) and d.creator_actor_id.strip(b"\xff") != b""
        dead_creator = made_by_actor and d.creator_actor_dead and not d.is_detached
        if dead_creator and d.state in (table.CREATED, table.PENDING):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(d.placement_group_id)))
            removed += 1
    return removed


class SearchReporter(Callback):
    """Tune callback in the search driver: a record for trials the trial driver could not write
    itself (stopped by ASHA or the time budget, crashed), Tune's view of each trial's timeline,
    and ``on_finished`` (the summary line, a leaderboard refresh) once per finished trial."""

    def __init__(
        self, ctx: TrialContext, spec: SearchSpec, on_finished: Callable[[TrialRecord], None]
    ) -> None:
        self.ctx, self.spec, self.on_finished = ctx, spec, on_finished
        self.sdir = SearchDir(ctx.storage, ctx.name)
        self.finished = 0
        self.launched: dict[str, float] = {}
        self.orphaned_pgs_removed = 0
        self._last_sweep = 0.0
        self._sweep_warned = False

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        # A stopped trial's worker placement group outlives it (see
        # remove_orphaned_placement_groups); sweep every few seconds of the event loop.
        now = time.monotonic()
        if now - self._last_sweep < 2.0:
            return
        self._last_sweep = now
        try:
            self.orphaned_pgs_removed += remove_orphaned_placement_groups()
        except Exception as exc:  # an internal Ray API may move
            if not self._sweep_warned:
                self._sweep_warned = True
                print(f"warning: cannot sweep orphaned placement groups: {exc}", file=sys.stderr)

    def _record_of_stopped_trial(self, trial: Any, status: TrialStatus, reason: str) -> TrialRecord:
        last = dict(trial.last_result or {})
        if self.sdir.is_local:
            # Stopped before the trainer's own cleanup ran: DeepSpeed /dev/shm names its
            # worker groups left behind (usually none: the trainer unlinks them early).
            try:
                cleanup_run_shm(self.sdir.run_dir(trial.trial_id))
            except Exception as exc:  # cleanup must not stop the search
                print(
                    f"warning: /dev/shm cleanup of trial {trial.trial_id}: {exc}", file=sys.stderr
                )
        params = dict(trial.config or {})
        try:
            cfg = config_from_dict(self.ctx.base, self.ctx.source, overrides=params).to_dict()
        except ConfigError:
            cfg = None
        started = float(last.get("timestamp", time.time())) - float(last.get("time_total_s", 0.0))
        return self.ctx.record(
            trial_id=trial.trial_id,
            params=params,
            config=cfg,
            status=status,
            reason=reason,
            run_dir=self.sdir.run_dir(trial.trial_id),
            started=started,
            last=last,
        )

    def _finish(self, trial: Any, status: TrialStatus, reason: str) -> None:
        rec = self.sdir.trial_record(trial.trial_id)
        if (
            rec is not None
            and status == "early_stopped"
            and not (trial.last_result or {}).get("trial_done")
            and rec.status == "failed"
        ):
            # The trial driver, cut off by the stop (its Train controller killed under it),
            # wrote "failed" first; the trial never sent its final report, so the stop is
            # what happened (and Optuna was told PRUNED).
            rec = None
        if rec is None:
            rec = self._record_of_stopped_trial(trial, status, reason)
            self.sdir.write_record(rec)
        launched = self.launched.get(trial.trial_id)
        tl = rec.timeline
        if (
            launched is not None
            and tl is not None
            and "launched_at" not in tl
            and float(tl.get("driver_started_at") or 0.0) >= launched
        ):
            # Tune's view: when it launched the trial and saw it end. Not for a record a
            # killed driver's trial wrote before --resume replayed it: that launch is not its
            # own, and a finished trial's record is never changed.
            tl.update(launched_at=launched, tune_ended_at=time.time())
            self.sdir.write_record(rec)
        self.finished += 1
        self.on_finished(rec)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.launched[trial.trial_id] = time.time()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        s = self.spec.scheduler
        reason = (
            f"stopped by ASHA on {s.metric}" if s.type == "asha" else "stopped by the time budget"
        )
        self._finish(trial, "early_stopped", reason)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
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


# --------------------------------------------------------------------------- the Tuner


def _make_sampler(spec: SearchSpec) -> optuna.samplers.BaseSampler:
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    seed = spec.seed
    if spec.algorithm in ("tpe", "motpe"):
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


def _define_by_run(trial: Any, *, spec: SearchSpec, base: dict[str, Any]) -> dict[str, Any]:
    return sample_params(spec, trial, base)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _close_orphans(study_storage: str, name: str) -> None:
    """Study trials left RUNNING by a killed driver (asked after its last snapshot) are marked
    FAIL, so the study's history (and optuna-dashboard) matches what actually ran."""
    try:
        study = optuna.load_study(study_name=name, storage=study_storage)
    except Exception:  # no study (the driver died before it asked a trial): nothing to close
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # The study's private storage and trial id (optuna 5.0.0): the public API cannot change
        # a finished driver's trials.
        study._storage.set_trial_user_attr(t._trial_id, "status", "orphaned")
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def connect_ray(cpus_per_trial: float) -> None:
    """Attach to a running Ray (``RAY_ADDRESS``, a ``ray job submit`` entrypoint, or an
    ``ray.init`` done by the caller) or start a local one with at least one trial's CPUs."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    # A local Ray gets at least one trial's worth of CPUs even on a 2-core machine.
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        num_cpus=None if address else max(os.cpu_count() or 1, math.ceil(cpus_per_trial)),
    )


def free_trial_slots(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit in what the cluster has free now (the job's own entrypoint
    excluded), not in its total; at least one."""
    res = ray.available_resources()
    fits = [int(res.get("CPU", 1) // cpus_per_trial) if cpus_per_trial > 0 else 10**6]
    if gpus_per_trial > 0:
        fits.append(int(res.get("GPU", 0) // gpus_per_trial))
    return max(1, min(fits))


def _new_tuner(
    trainable: Any,
    spec: SearchSpec,
    ctx: TrialContext,
    sdir: SearchDir,
    executor: TrialExecutor,
    max_concurrent: int,
    study_storage: str,
    callbacks: list[Callback],
    verbose: int,
) -> tune.Tuner:
    points = list(spec.points)
    if spec.algorithm == "grid":
        points += [p for p in grid_points(spec, ctx.base) if p not in points]
    searcher = PLoRAOptunaSearch(
        space=functools.partial(_define_by_run, spec=spec, base=ctx.base),
        metric=spec.objective.tune_metric,
        mode=spec.objective.tune_mode,
        points_to_evaluate=points or None,
        sampler=_make_sampler(spec),
        study_name=ctx.name,
        storage=optuna.storages.RDBStorage(study_storage),
    )
    scheduler = None
    if spec.scheduler.type == "asha":
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
    return tune.Tuner(
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
            name=ctx.name,
            storage_path=sdir.uri.rsplit("/", 1)[0] if sdir.is_local else ctx.storage,
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
            callbacks=callbacks,
            verbose=verbose,
        ),
    )


def run_tuner(
    *,
    spec: SearchSpec,
    ctx: TrialContext,
    sdir: SearchDir,
    executor: TrialExecutor,
    trial_cpus_gpus: tuple[float, float],
    max_concurrent: int,
    study_storage: str,
    resume: bool,
    verbose: int,
    on_finished: Callable[[TrialRecord], None],
) -> None:
    """Build the Tuner of a search (or restore it from ``sdir`` with ``resume``) and run it.

    Args:
        spec: the parsed search block.
        ctx: what every trial driver gets.
        sdir: the search directory (also Tune's experiment directory on local storage).
        executor: where a trial trains (decides the trial's resources and actor reuse).
        trial_cpus_gpus: CPUs and GPUs one trial holds (``search_space.trial_resources``).
        max_concurrent: trials at once.
        study_storage: the Optuna study's database URL.
        resume: restore the Tuner of a search that was stopped or killed.
        verbose: Tune's verbosity (progress table).
        on_finished: called in the search driver with each finished trial's record.
    """
    # Intermediate reports carry the proxy, not the objectives; the searcher wrapper and ASHA
    # skip such results, so Tune's strict check (every metric in every result) must be off.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Snapshot the experiment often: the window in which a killed driver loses searcher state is
    # this long (records of finished trials survive it anyway, see trial_driver).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    per_cpu, per_gpu = trial_cpus_gpus
    if executor == "actor":
        # The trial actor is the worker: it holds the worker's CPUs (and GPUs) itself.
        resources = {"cpu": per_cpu, "gpu": per_gpu}
    else:
        # The trial's workers are requested by Ray Train itself (its own placement group); Tune
        # only schedules the driver. max_concurrent keeps drivers from taking CPUs their workers
        # need.
        resources = {"cpu": spec.driver_cpus}
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), resources)
    if resume:
        # The callbacks, searcher and scheduler come back from the experiment's snapshot.
        tuner = tune.Tuner.restore(
            sdir.uri,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        callbacks: list[Callback] = [SearchReporter(ctx, spec, on_finished)]
        tuner = _new_tuner(
            trainable, spec, ctx, sdir, executor, max_concurrent, study_storage, callbacks, verbose
        )
    tuner.fit()
    _close_orphans(study_storage, ctx.name)
