"""The trial driver: what one Ray Tune trial runs, and what it keeps of its attempts.

One Tune trial is one run config: ``trial_driver`` overrides the search space's run config with the
trial's sampled dotted keys and hands it to a trainer (``run_training``: a Ray Train run of its
own; ``run_in_process``: the Tune trial actor trains itself), then writes the trial's record.

Retries (``search.max_retries``) cover lost infrastructure only, never a failing run: a Train
worker or its node lost under ``run_training`` (``RunResult.infrastructure_loss``) is retried
here, from the run directory's newest checkpoint; the trial's own actor lost (its node, an OOM
kill, ``run_in_process``'s trainer with it) is retried by Tune's ``FailureConfig``, and the
restarted driver notices it in ``attempts.jsonl``. A user-code error, a divergence or an invalid
config ends the trial at once. Both kinds count against the one budget and land in the record
(``retries``, ``retry_reasons``).

On cloud storage the run directory is this node's scratch copy and the run's home is
``<search>/runs/<trial_id>`` in the storage (``plora_ray.run_sync``): the attempts log is pulled
from there before and pushed after each start, the trainer resumes from the storage's newest
checkpoint and leaves its files there, and the record names the storage, never a scratch path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ray import tune
from ray.train._internal.session import get_session

from plora_ray.config import ConfigError, RunConfig, config_from_dict
from plora_ray.executors import Trainer, holds_run
from plora_ray.objective import ObjectiveSpec
from plora_ray.pbt import split_trial_config, trial_lineage
from plora_ray.run_sync import RunMirror, RunSync
from plora_ray.store import METRICS_FILE, TERMINAL_STATUSES, SearchDir, TrialRecord, TrialStatus
from plora_ray.trial_record import build_record

__all__ = [
    "ATTEMPTS_FILE",
    "FORK_FILE",
    "TRIAL_TRAIN_ENV",
    "TrialContext",
    "seed_fork",
    "trial_driver",
]

# One line per start of a trial's training in a run directory (which driver session, when, and
# what was lost before it): how a driver restarted by Tune knows it is a retry.
ATTEMPTS_FILE = "attempts.jsonl"
TRIAL_LOST = "the trial's actor was lost (its process or node died); restarted by Tune"
# In a run directory started from another trial's unload checkpoint (pbt_unload): which fork.
FORK_FILE = "fork.json"

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
    # search.max_retries: restarts after lost infrastructure, per trial.
    max_retries: int = 0
    # search.scheduler.type pbt_unload: trials fork at unloads and their records keep a lineage.
    pbt: bool = False
    # One search driver's run (a --resume is another): a second start of a trial's training in
    # the same session is a retry, a start in a new session is the resume's.
    session: str = field(default_factory=lambda: uuid.uuid4().hex)

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


def _earlier_retries(run_dir: str, session: str, mirror: RunMirror | None) -> list[str]:
    """Log this start of a trial's training in ``attempts.jsonl`` and return the retries of
    this session so far: an earlier start of the same session means Tune restarted the trial
    after losing its actor, which this start records as a retry. With ``mirror`` the log is the
    storage's (the earlier start may have been on another node)."""
    path = Path(run_dir) / ATTEMPTS_FILE
    if mirror is not None:
        mirror.pull_files(ATTEMPTS_FILE)
    earlier: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(entry, dict) and entry.get("session") == session:
                earlier.append(entry)
    reasons = [str(e["after"]) for e in earlier if e.get("after")]
    if earlier:
        reasons.append(TRIAL_LOST)
        _log_attempt(path, session, TRIAL_LOST, mirror)
    else:
        _log_attempt(path, session, None, mirror)
    return reasons


def _log_attempt(path: Path, session: str, after: str | None, mirror: RunMirror | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"session": session, "started_at": time.time(), "pid": os.getpid(), "after": after}
    with open(path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    if mirror is not None:
        mirror.push_files(ATTEMPTS_FILE)


def _stopped_by_tune(session: Any) -> bool:
    """Whether Tune is stopping this trial: its function-trainable session was told to stop
    (``stop_event``) or already shut down (``FunctionTrainable.cleanup``; private, ray 2.60.0)."""
    if session is None:
        return False
    return bool(session.stop_event.is_set()) or get_session() is not session


def seed_fork(run_dir: str, fork: dict[str, Any]) -> bool:
    """Start a trial's run directory from the parent's unload checkpoint a ``pbt_unload`` fork
    copied (``pbt_scheduler.copy_fork``), once per fork; returns whether it did now.

    The run's files from before the fork (its earlier stages, now replaced) are moved to
    ``<run>/before_fork_<n>/``, its checkpoints and export deleted; the copied checkpoint
    becomes the run's newest one and the parent's reports up to the fork its
    ``metrics.jsonl`` (cut at the fork step on restore).
    The trainer then continues from there like any resumed run.

    Raises:
        FileNotFoundError: the fork's checkpoint copy is missing.
    """
    run = Path(run_dir)
    marker = run / FORK_FILE
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("checkpoint") == fork["checkpoint"]:
                return False  # seeded already: the run continues from its own checkpoints
        except (OSError, json.JSONDecodeError):
            pass
    ckpt = Path(fork["checkpoint"])
    if not ckpt.is_dir():
        raise FileNotFoundError(f"pbt_unload fork: the checkpoint copy {ckpt} is missing")
    if run.is_dir() and any(run.iterdir()):
        n = len(list(run.glob("before_fork_*"))) + 1
        keep = run / f"before_fork_{n}"
        keep.mkdir()
        for item in list(run.iterdir()):
            if item.name in ("ray", "model"):
                # Its checkpoints and export: the trial never goes back to them.
                shutil.rmtree(item, ignore_errors=True)
            elif not item.name.startswith("before_fork_"):
                os.replace(item, keep / item.name)
    ray_dir = run / "ray"
    ray_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, ray_dir / ckpt.name)
    if (ckpt.parent / METRICS_FILE).is_file():
        shutil.copyfile(ckpt.parent / METRICS_FILE, run / METRICS_FILE)
    marker.write_text(json.dumps(fork, indent=1))
    return True


def trial_driver(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: the run config with the sampled dotted keys, trained by ``ctx.runner``.

    The record goes to ``trials/<id>.json`` *before* the final report, so a driver killed after it
    and resumed finds the trial done (the re-run returns the record instead of training again).
    A run that lost a Train worker or its node is trained again from its newest checkpoint, up
    to ``ctx.max_retries`` times in all (see the module docstring).
    """
    driver_started = time.time()
    params, pbt_state = split_trial_config(config)
    for key, value in ctx.train_env.items():
        os.environ.setdefault(key, value)
    # A trial Tune pauses (pbt_unload) or stops while its run trains in this actor's thread
    # (run_in_process) ends at its next report, up to a few steps later; Tune reuses the actor
    # only once that thread has ended and waits TUNE_FUNCTION_THREAD_TIMEOUT_S for it (2 s by
    # default, then the trial errors). Read in this process by FunctionTrainable.reset_config.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")
    trial_id = tune.get_context().get_trial_id()
    sdir = SearchDir(ctx.storage, ctx.name)
    done = sdir.trial_record(trial_id)
    if done is not None:
        tune.report(_final_metrics(done))
        return
    started = time.time()
    run_dir = sdir.run_dir(trial_id)
    sync = None if sdir.is_local else RunSync(sdir.uri, trial_id)
    mirror = sync.mirror() if sync is not None else None
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
        rec.run_dir = sdir.run_uri(trial_id)
        sdir.write_record(rec)
        tune.report(_final_metrics(rec))
        return
    fork = (pbt_state or {}).get("fork")
    if isinstance(fork, dict):
        seed_fork(run_dir, fork)
    session = get_session()
    retries = _earlier_retries(run_dir, ctx.session, mirror)
    # A retried or resumed trial continues from its own newest checkpoint (Ray Train's snapshot
    # in <run_dir>/ray; run_in_process keeps its checkpoints in the same place without it; on
    # cloud storage both are in the storage's copy of the run). The trainer forwards its reports
    # to this Tune trial by itself (TuneReportCallback when it runs inside a Tune session).
    clock = _ReportClock()
    while True:
        resume = holds_run(run_dir) or (mirror is not None and mirror.holds_run())
        result = ctx.runner(cfg, run_dir, report=clock, resume=resume, sync=sync).as_dict()
        if _stopped_by_tune(session):
            # Paused or stopped by the scheduler (Tune removed this trial's resources, and with
            # them its Train controller): no record. ASHA's stop is recorded by the search
            # driver; a paused trial (pbt_unload) runs again, from its checkpoint or a fork.
            return
        lost = result.get("infrastructure_loss")
        if not lost or len(retries) >= ctx.max_retries or sdir.trial_record(trial_id) is not None:
            break
        retries.append(str(lost))
        _log_attempt(Path(run_dir) / ATTEMPTS_FILE, ctx.session, str(lost), mirror)
    status = str(result.get("status") or "completed")
    if status not in TERMINAL_STATUSES:
        status = "failed"
    reason = result.get("reason")
    if status == "diverged" and not reason:
        reason = f"diverged at step {result.get('diverged_step')}"
    if lost and status == "failed" and retries:
        reason = f"{reason} (after {len(retries)} retries, search.max_retries {ctx.max_retries})"
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
    rec.run_dir = sdir.run_uri(trial_id)
    rec.retries, rec.retry_reasons = len(retries), retries
    rec.timeline = clock.timeline(driver_started, cfg, result.get("metrics") or {})
    if ctx.pbt:
        rec.lineage = trial_lineage(trial_id, config)
    if sdir.trial_record(trial_id) is not None:
        # Stopped by the scheduler while training: Tune killed this trial's actors (so the run
        # "failed" on a dead controller) and the search driver has recorded it as early_stopped.
        return
    sdir.write_record(rec)
    tune.report(_final_metrics(rec))
