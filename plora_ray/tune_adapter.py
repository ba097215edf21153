"""Ray Tune glue of a search: the searcher and callback, the Tuner (the trial driver, what each
Tune trial runs, is ``plora_ray.trial_driver``).

``PLoRAOptunaSearch`` tells Optuna what became of each trial; ``SearchReporter`` records the trials
that could not record themselves and sweeps what Ray leaves behind a stopped trial.
``connect_ray`` / ``free_trial_slots`` / ``run_tuner`` start (or restore) and run the Tuner.

The scheduler is ASHA, ``pbt_scheduler.UnloadPBT`` (``search.scheduler.type: pbt_unload``) or
none. Every import of Ray (but ``plora_ray.console``'s, the live table's Tune callback,
``plora_ray.pbt_scheduler``'s and ``plora_ray.trial_driver``'s) and every call of a private Ray or
Optuna API is in this module or those. The
private ones were written against ray 2.60.0 and optuna 5.0.0; each says so where it is made.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import optuna
import ray
from ray import cloudpickle, tune
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from plora_ray.config import ConfigError, config_from_dict
from plora_ray.console import QUIET_WORKER_ENV, LiveTable
from plora_ray.executors import cleanup_run_shm
from plora_ray.objective import ObjectiveSpec
from plora_ray.pbt import split_trial_config, trial_lineage
from plora_ray.pbt_scheduler import UnloadPBT
from plora_ray.run_sync import RunSync
from plora_ray.search_space import SearchSpec, TrialExecutor, grid_points, sample_params
from plora_ray.store import METRICS_FILE, SearchDir, TrialRecord, TrialStatus
from plora_ray.trial_driver import TRIAL_TRAIN_ENV, TrialContext, trial_driver
from plora_ray.trial_record import study_user_attrs, utc_now

__all__ = [
    "TRIAL_TRAIN_ENV",
    "PLoRAOptunaSearch",
    "SearchReporter",
    "TrialContext",
    "close_study_orphans",
    "connect_ray",
    "free_trial_slots",
    "remove_orphaned_placement_groups",
    "run_tuner",
    "set_aside_dropped_runs",
    "set_num_samples",
    "trial_driver",
    "watch_local_ray",
]


# --------------------------------------------------------------------------- searcher, callback


def stop_reason(spec: SearchSpec) -> str:
    """Why a trial that Tune stopped (not its trainer) ended: the scheduler or the time budget."""
    s = spec.scheduler
    return f"stopped by ASHA on {s.metric}" if s.type == "asha" else "stopped by the time budget"


def stopped_trial_record(
    ctx: TrialContext,
    trial_id: str,
    params: dict[str, Any],
    last: dict[str, Any],
    status: TrialStatus,
    reason: str,
) -> TrialRecord:
    """The record of a trial whose driver could not write one (stopped by the scheduler or the
    time budget, crashed), from its sampled params and its last report to Tune.

    On cloud storage the trial's reports come from the storage's copy of its run (pulled into
    this node's scratch copy): the trial ran on whichever node Tune chose."""
    sdir = SearchDir(ctx.storage, ctx.name)
    if not sdir.is_local:
        try:
            RunSync(sdir.uri, trial_id).mirror().pull_files(METRICS_FILE)
        except OSError as exc:  # the record is still written, from the last report alone
            print(f"warning: reading trial {trial_id}'s reports from the storage: {exc}")
    config = params
    params, _ = split_trial_config(config)
    try:
        cfg = config_from_dict(ctx.base, ctx.source, overrides=params).to_dict()
    except ConfigError:
        cfg = None
    started = float(last.get("timestamp", time.time())) - float(last.get("time_total_s", 0.0))
    rec = ctx.record(
        trial_id=trial_id,
        params=params,
        config=cfg,
        status=status,
        reason=reason,
        run_dir=sdir.run_dir(trial_id),
        started=started,
        last=last,
    )
    rec.run_dir = sdir.run_uri(trial_id)
    if ctx.pbt:
        rec.lineage = trial_lineage(trial_id, config)
    return rec


def _cut_off_by_stop(rec: TrialRecord | None, last: dict[str, Any]) -> bool:
    """A "failed" record of a trial that never sent its final report was written by its driver
    after Tune stopped it (its Train controller killed under it): the stop is what happened."""
    return rec is not None and rec.status == "failed" and not last.get("trial_done")


def proxy_as_intermediate(objective: ObjectiveSpec, proxy: float) -> float:
    """A trial's proxy as the study's intermediate value.

    Every proxy (``search_space.PROXY_METRICS``: an NLL or the training loss) is minimised, and
    Optuna keeps a PRUNED trial's last intermediate value as its value and ranks pruned trials by
    it in the study's direction (TPE among them). So a maximised study (e.g. GSM8K accuracy, with
    gsm8k_nll as the proxy) gets the proxy negated; the study's ``intermediate_values`` user attr
    says which.
    """
    return -proxy if objective.scalar_direction == "maximize" else proxy


class PLoRAOptunaSearch(OptunaSearch):
    """OptunaSearch whose study is a record of the search that optuna-dashboard can show.

    The study's metric names are the objective's; each trial's proxy (``ctx.proxy_metric``) is
    reported as an intermediate value at the trainer step of each proxy point, including the
    point at which ASHA stopped it (negated in a maximised study: ``proxy_as_intermediate``); a
    trial ends COMPLETE with its objective(s), PRUNED when Tune stopped it (Optuna then keeps the
    last proxy as its value), FAIL when it diverged, failed or crashed; and it carries its
    record's status, objectives, cost, run and model paths as user attrs
    (``trial_record.study_user_attrs``). Tune's own reports of the objective at
    intermediate iterations are not passed on: only the proxy is an intermediate value.

    Args:
        ctx: the search's trial context (storage and name of the records, proxy metric).
        stop_reason: the reason a record of a trial Tune stopped carries (``stop_reason``).
        **kwargs: ``OptunaSearch``'s arguments.
    """

    def __init__(self, *, ctx: TrialContext, stop_reason: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ctx = ctx
        self.stop_reason = stop_reason
        self.sampled: dict[str, dict[str, Any]] = {}  # Tune trial id -> its params (trial.config)
        # OptunaSearch's private _ot_study (ray 2.60.0): the study it created in __init__.
        study = cast(optuna.Study, self._ot_study)
        study.set_metric_names(_study_metric_names(ctx.objective))
        if not ctx.objective.pareto:
            sign = "-" if proxy_as_intermediate(ctx.objective, 1.0) < 0 else ""
            study.set_user_attr("intermediate_values", f"{sign}{ctx.proxy_metric}")

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        with warnings.catch_warnings():
            # OptunaSearch warns when sampling takes over a second (it validates each sample
            # against the run config, slower on a loaded machine); nothing for a user to do.
            warnings.filterwarnings("ignore", message="Define-by-run function passed in")
            params = super().suggest(trial_id)
        if params is not None:
            self.sampled[trial_id] = dict(params)
            # OptunaSearch's private _ot_trials (ray 2.60.0): the Optuna trial of a Tune trial.
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("tune_trial_id", trial_id)
            ot_trial.set_user_attr("status", "running")
        return params

    def _report_proxy(self, trial_id: str, result: dict[str, Any]) -> None:
        """The proxy of a report made at a proxy point, as the intermediate value at its step
        (Optuna has no intermediate values for multi-objective studies)."""
        value, step = result.get(self.ctx.proxy_metric), result.get("step")
        if self.ctx.objective.pareto or not result.get("proxy_point"):
            return
        if not isinstance(value, (int, float)) or not isinstance(step, int):
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        try:
            with warnings.catch_warnings():
                # A resumed trial reports a point again from its checkpoint: Optuna keeps the
                # first value and warns.
                warnings.simplefilter("ignore")
                ot_trial.report(proxy_as_intermediate(self.ctx.objective, float(value)), step)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # told to the study by a driver killed after its last snapshot

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report_proxy(trial_id, result)

    def _record_for_study(
        self, trial_id: str, last: dict[str, Any], error: bool
    ) -> TrialRecord | None:
        """The record the trial has or will have: its driver's (written before its final
        report), else the one the search driver's SearchReporter writes for a trial Tune
        stopped (built the same way from the same last report)."""
        rec = SearchDir(self.ctx.storage, self.ctx.name).trial_record(trial_id)
        if rec is not None and not (not error and _cut_off_by_stop(rec, last)):
            return rec
        if error or trial_id not in self.sampled:
            # A crashed trial's reason is read from Tune's error file by SearchReporter.
            return None
        return stopped_trial_record(
            self.ctx, trial_id, self.sampled[trial_id], last, "early_stopped", self.stop_reason
        )

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        last = dict(result or {})
        if not last.get("trial_done"):
            # Tune does not pass the report that made ASHA stop a trial to on_trial_result.
            self._report_proxy(trial_id, last)
        ot_trial = self._ot_trials.get(trial_id)
        rec = self._record_for_study(trial_id, last, error)
        status = rec.status if rec is not None else ("failed" if error else "early_stopped")
        if ot_trial is not None and trial_id not in self._completed_trials:
            attrs = study_user_attrs(rec) if rec is not None else {"status": status}
            try:
                for key, value in attrs.items():
                    ot_trial.set_user_attr(key, value)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # told to the study by a driver killed after its last snapshot
        if status in ("diverged", "failed"):
            error, result = True, None
        elif status == "early_stopped":
            result = None  # PRUNED: Optuna keeps the last intermediate value (the proxy)
        super().on_trial_complete(trial_id, result=result, error=error)


def _study_metric_names(objective: ObjectiveSpec) -> list[str]:
    """What optuna-dashboard calls the study's values: each Pareto metric, the single metric, or
    the weighted sum written out."""
    if objective.pareto or objective.weights is None:
        return list(objective.metrics)
    return [" + ".join(f"{w:g}*{m}" for w, m in zip(objective.weights, objective.metrics))]


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
        if self.sdir.is_local:
            # Stopped before the trainer's own cleanup ran: DeepSpeed /dev/shm names its
            # worker groups left behind (usually none: the trainer unlinks them early).
            try:
                cleanup_run_shm(self.sdir.run_dir(trial.trial_id))
            except Exception as exc:  # cleanup must not stop the search
                print(
                    f"warning: /dev/shm cleanup of trial {trial.trial_id}: {exc}", file=sys.stderr
                )
        last = dict(trial.last_result or {})
        return stopped_trial_record(
            self.ctx, trial.trial_id, dict(trial.config or {}), last, status, reason
        )

    def _finish(self, trial: Any, status: TrialStatus, reason: str) -> None:
        rec = self.sdir.trial_record(trial.trial_id)
        if status == "early_stopped" and _cut_off_by_stop(rec, trial.last_result or {}):
            rec = None  # Optuna was told PRUNED
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
        self._finish(trial, "early_stopped", stop_reason(self.spec))

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


# Why a study trial or a run directory of a search has no trial record.
ORPHAN_REASON = (
    "sampled by a search driver that was killed before Tune saved the trial; "
    "Tune never ran it to the end"
)
DROPPED_DIR = "dropped"
DROPPED_FILE = "DROPPED.json"


def set_aside_dropped_runs(sdir: SearchDir) -> list[str]:
    """Move the run directories of a finished search that have no trial record (trials a killed
    driver launched after Tune's last snapshot: Tune no longer knows them, nothing will finish
    them) to ``<search>/dropped/<trial id>/``, each with ``DROPPED.json`` saying why. Returns
    their trial ids. On cloud storage these are the runs' homes in the storage
    (``<search>/runs/<trial id>``); node-local scratch copies are left to their nodes."""
    store = sdir.store
    moved = []
    for name in store.list_names("runs"):
        if not store.is_dir("runs", name) or sdir.trial_record(name) is not None:
            continue
        dest = f"{DROPPED_DIR}/{name}"
        if store.exists(DROPPED_DIR, name):  # dropped twice under one id (not with Tune's ids)
            dest = f"{dest}-{int(time.time())}"
        store.move_dir(f"runs/{name}", dest)
        store.write_json(
            f"{dest}/{DROPPED_FILE}", {"trial_id": name, "reason": ORPHAN_REASON, "at": utc_now()}
        )
        moved.append(name)
    return moved


def close_study_orphans(study_storage: str, name: str) -> None:
    """Study trials left RUNNING by a killed driver (asked after its last snapshot) are marked
    FAIL with the reason, so the study's history (and optuna-dashboard) matches what ran."""
    try:
        study = optuna.load_study(study_name=name, storage=study_storage)
    except Exception:  # no study (the driver died before it asked a trial): nothing to close
        return
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # The study's private storage and trial id (optuna 5.0.0): the public API cannot change
        # a finished driver's trials.
        study._storage.set_trial_user_attr(t._trial_id, "status", "orphaned")
        study._storage.set_trial_user_attr(t._trial_id, "reason", ORPHAN_REASON)
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def connect_ray(cpus_per_trial: float, quiet: bool = False) -> None:
    """Attach to a running Ray (``RAY_ADDRESS``, a ``ray job submit`` entrypoint, or an
    ``ray.init`` done by the caller) or start a local one with at least one trial's CPUs.

    A local Ray started here is stopped whole when this driver dies, however it dies
    (``watch_local_ray``).

    Args:
        cpus_per_trial: CPUs one trial holds (a local Ray gets at least that many).
        quiet: keep the workers' output (progress bars, library warnings) in Ray's log files
            instead of this driver's console, and start a local Ray's workers with
            ``console.QUIET_WORKER_ENV``.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or None
    # A local Ray gets at least one trial's worth of CPUs even on a 2-core machine.
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.ERROR if quiet else logging.WARNING,
        log_to_driver=not quiet,
        num_cpus=None if address else max(os.cpu_count() or 1, math.ceil(cpus_per_trial)),
        # An attached job keeps the runtime env it was submitted with.
        runtime_env={"env_vars": dict(QUIET_WORKER_ENV)} if quiet and not address else None,
    )
    # Private (ray 2.60.0): the node this driver started or connected to; no public equivalent.
    node = ray._private.worker._global_node
    if node is not None and node.is_head():
        # A Ray of this driver's own: stopped whole when the driver dies (ray_watchdog).
        watch_local_ray(node.get_session_dir_path())


def watch_local_ray(session_dir: str) -> subprocess.Popen[bytes]:
    """Start ``plora_ray/ray_watchdog.py`` for this process and its local Ray session: it stops
    every process of the session once this process is gone (a SIGKILL included)."""
    return subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("ray_watchdog.py")),
            f"--pid={os.getpid()}",
            f"--session-dir={session_dir}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own session: a Ctrl-C in the driver's terminal does not reach it.
        start_new_session=True,
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
        ctx=ctx,
        stop_reason=stop_reason(spec),
        space=functools.partial(_define_by_run, spec=spec, base=ctx.base),
        metric=spec.objective.tune_metric,
        mode=spec.objective.tune_mode,
        points_to_evaluate=points or None,
        sampler=_make_sampler(spec),
        study_name=ctx.name,
        storage=optuna.storages.RDBStorage(study_storage),
    )
    scheduler: ASHAScheduler | UnloadPBT | None = None
    if spec.scheduler.type == "pbt_unload":
        scheduler = UnloadPBT(spec.scheduler, spec.params, ctx.storage, ctx.name, spec.seed)
    elif spec.scheduler.type == "asha":
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


def set_num_samples(sdir: SearchDir, num_samples: int) -> bool:
    """Make a restored search sample ``num_samples`` trials in all (``--resume --extend
    search.num_samples=N``); returns whether a saved state said otherwise.

    ``Tuner.restore`` takes the sample count from the experiment's snapshot, not from its
    arguments: Tune's SearchGenerator saves ``total_samples`` (and ``finished``, set once it
    handed out the last one) in ``search_gen_state-<session>.json``, a cloudpickle of a dict
    (private format, ray 2.60.0). Every such file of the search is rewritten before the restore.
    """
    changed = False
    for name in sdir.store.list_names():
        if not (name.startswith("search_gen_state-") and name.endswith(".json")):
            continue
        state = cloudpickle.loads(sdir.store.read_bytes(name))
        if state.get("total_samples") == num_samples:
            continue
        state["total_samples"] = num_samples
        state["finished"] = state.get("counter", 0) >= num_samples
        sdir.store.write_atomic(name, [cloudpickle.dumps(state)])
        changed = True
    return changed


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
) -> bool:
    """Build the Tuner of a search (or restore it from ``sdir`` with ``resume``) and run it;
    returns whether it was interrupted (Ctrl-C, SIGINT) with trials unfinished.

    Args:
        spec: the parsed search block.
        ctx: what every trial driver gets.
        sdir: the search directory (also Tune's experiment directory on local storage).
        executor: where a trial trains (decides the trial's resources and actor reuse).
        trial_cpus_gpus: CPUs and GPUs one trial holds (``search_space.trial_resources``).
        max_concurrent: trials at once.
        study_storage: the Optuna study's database URL.
        resume: restore the Tuner of a search that was stopped or killed.
        verbose: Tune's own output (0: none, ``console.LiveTable`` only; 1: its status; 2:
            its results too).
        on_finished: called in the search driver with each finished trial's record.
    """
    # Intermediate reports carry the proxy, not the objectives; the searcher wrapper and ASHA
    # skip such results, so Tune's strict check (every metric in every result) must be off.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Snapshot the experiment often: the window in which a killed driver loses searcher state is
    # this long (records of finished trials survive it anyway, see trial_driver).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    if verbose == 0:
        # Tune's new console output prints its experiment header even when silent (ray 2.60.0);
        # the old one prints nothing at verbose 0.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
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
        # The callbacks, searcher and scheduler come back from the experiment's snapshot; the
        # sample count too, unless the search was extended (search_resume.EXTENDABLE).
        set_num_samples(sdir, spec.num_samples)
        tuner = tune.Tuner.restore(
            sdir.uri,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        callbacks: list[Callback] = [SearchReporter(ctx, spec, on_finished), LiveTable(spec)]
        tuner = _new_tuner(
            trainable, spec, ctx, sdir, executor, max_concurrent, study_storage, callbacks, verbose
        )
    grid = tuner.fit()
    # Tune ends fit() on the first SIGINT with the unfinished trials' state saved (and marks
    # them terminated): a trial without a record is one that --resume continues (and its study
    # trial, left RUNNING for it).
    paths = [grid[i].path for i in range(len(grid))]
    ids = [os.path.basename(p.rstrip("/")).removeprefix("trial_") for p in paths]
    # A trial Tune never started (still pending when fit() ended) has no run directory and is
    # no interruption.
    interrupted = any(
        sdir.trial_record(t) is None and (not sdir.is_local or os.path.isdir(sdir.run_dir(t)))
        for t in ids
    )
    if not interrupted:
        close_study_orphans(study_storage, ctx.name)
        set_aside_dropped_runs(sdir)
    return interrupted
