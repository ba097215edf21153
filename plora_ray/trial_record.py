"""A finished search trial's record, built from what its trainer left, and its summary line.

The trial's driver builds the record from the trainer's result when the trial ran to its end; the
search driver builds it for a trial that could not (stopped by the scheduler, crashed) from the
trial's last report and its ``metrics.jsonl``. No Ray here: the record is plain data
(``plora_ray.store.TrialRecord``), written to ``<search dir>/trials/<trial_id>.json``.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from plora_ray.objective import ObjectiveSpec
from plora_ray.store import TrialRecord, TrialStatus, read_metrics

__all__ = ["build_record", "study_user_attrs", "summary_line", "utc_now"]


def utc_now() -> str:
    """The current UTC time as the records and ``search.json`` write it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _objectives(result: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    objectives = dict(result.get("objectives") or {})
    if not objectives:
        # Only the trainer's final report holds objectives; step reports carry the proxy only.
        for rec in reversed(metrics):
            if rec.get("final") and isinstance(rec.get("objectives"), dict):
                return dict(rec["objectives"])
    return objectives


def _proxy(
    name: str,
    objectives: dict[str, Any],
    result: dict[str, Any],
    last: dict[str, Any],
    metrics: list[dict[str, Any]],
) -> Any:
    """The proxy metric's last value: from the objectives, the result, the last report, or the
    newest report in metrics.jsonl that has it."""
    proxy = objectives.get(name)
    if proxy is None:
        proxy = result.get(name, last.get(name))
    if proxy is None:
        proxy = next((m[name] for m in reversed(metrics) if m.get(name) is not None), None)
    return proxy


def build_record(
    *,
    trial_id: str,
    search: str,
    objective: ObjectiveSpec,
    proxy_metric: str,
    params: dict[str, Any],
    config: dict[str, Any] | None,
    status: TrialStatus,
    reason: str | None,
    run_dir: str,
    started: float,
    last: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
) -> TrialRecord:
    """One finished trial's record.

    Args:
        trial_id: Tune's trial id.
        search: the search's name.
        objective: what the search optimises (gives ``objective_value`` of a completed trial).
        proxy_metric: the cheap metric kept as ``proxy``.
        params: the trial's sampled dotted keys.
        config: the trial's run config as a mapping (None when it was invalid).
        status: how the trial ended.
        reason: why it ended so (a failure, a divergence, a stop), or None.
        run_dir: the trainer's output directory (its ``metrics.jsonl`` is read).
        started: when the trial started (``time.time()``).
        last: the trial's last report to Tune, for a trial stopped before its result.
        result: the trainer's result as a mapping, when the trial ran to its end.
    """
    result = result or {}
    last = last or {}
    metrics = read_metrics(run_dir)
    cfg = config or {}
    objectives = _objectives(result, metrics)
    curve = [[m["step"], m["loss"]] for m in metrics if "step" in m and m.get("loss") is not None]
    final_loss = result.get("final_loss")
    if final_loss is None and curve:
        final_loss = curve[-1][1]
    if final_loss is None:
        final_loss = last.get("loss")
    if final_loss is not None and "final_loss" not in objectives and status == "completed":
        objectives["final_loss"] = final_loss
    ranks = [m["effective_rank"] for m in metrics if isinstance(m.get("effective_rank"), dict)]
    delta_rank = result.get("delta_effective_rank")
    if delta_rank is None and ranks:
        delta_rank = ranks[-1]
    num_unloads = result.get("num_unloads")
    if num_unloads is None:
        num_unloads = sum(1 for m in metrics if m.get("unload"))
    merge_warning = (result.get("metrics") or {}).get("merge_warning") or next(
        (
            m["merge_warning"]
            for m in reversed(metrics)
            if m.get("final") and m.get("merge_warning")
        ),
        None,
    )
    ended = time.time()
    res = cfg.get("resources") or {}
    # Accelerator-hours: GPU-hours on GPU trials, CPU-core-hours of the workers on CPU trials.
    per_worker = res.get("gpus_per_worker") or res.get("cpus_per_worker") or 1.0
    wall = float(result.get("wall_time_s") or (ended - started))
    return TrialRecord(
        trial_id=trial_id,
        search=search,
        status=status,
        reason=reason,
        params=params,
        config=cfg,
        method=cfg.get("method"),
        lora_rank=None if cfg.get("method") == "full" else (cfg.get("lora") or {}).get("rank"),
        objectives=objectives,
        objective_value=objective.value(objectives) if status == "completed" else None,
        proxy=_proxy(proxy_metric, objectives, result, last, metrics),
        final_loss=final_loss,
        num_unloads=num_unloads,
        delta_effective_rank=delta_rank,
        wall_time_s=round(wall, 3),
        accelerator_hours=wall / 3600.0 * float(res.get("num_workers") or 1) * float(per_worker),
        checkpoint_path=result.get("checkpoint_path"),
        model_path=result.get("model_path"),
        started_at=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        ended_at=utc_now(),
        loss_curve=curve,
        diverged_step=result.get("diverged_step"),
        run_dir=run_dir,
        merge_warning=merge_warning,
    )


def summary_line(rec: TrialRecord, objective: ObjectiveSpec) -> str:
    """``[trial 1a2b] completed  gsm8k=0.031 mmlu=0.25  proxy=2.41  loss=2.10  41.3 s  ...``"""
    objs = " ".join(
        f"{m}={rec.objectives[m]:.4g}"
        for m in objective.metrics
        if isinstance(rec.objectives.get(m), (int, float))
    )
    parts = [
        f"[trial {rec.trial_id}] {rec.status:<13}",
        " ".join(f"{k}={v}" for k, v in rec.params.items()),
        objs or "-",
    ]
    if rec.objective_value is not None and objective.kind == "weighted":
        parts.append(f"objective={rec.objective_value:.4g}")
    if rec.proxy is not None:
        parts.append(f"proxy={rec.proxy:.4g}")
    if rec.final_loss is not None:
        parts.append(f"loss={rec.final_loss:.4g}")
    parts.append(f"{rec.wall_time_s or 0:.1f} s, {rec.accelerator_hours or 0:.4f} accel-h")
    if rec.reason:
        parts.append(f"({rec.reason[:120]})")
    return "  ".join(parts)


def study_user_attrs(rec: TrialRecord) -> dict[str, Any]:
    """What the Optuna study keeps of a finished trial's record as user attrs (optuna-dashboard
    shows them next to the trial): its status and reason, objectives, proxy, cost and where its
    run and model are. The record stays the full account; these say which record it is."""
    return {
        "tune_trial_id": rec.trial_id,
        "status": rec.status,
        "reason": rec.reason,
        "objectives": dict(rec.objectives),
        "objective_value": rec.objective_value,
        "proxy": rec.proxy,
        "wall_time_s": rec.wall_time_s,
        "accelerator_hours": rec.accelerator_hours,
        "model_path": rec.model_path,
        "run_dir": rec.run_dir,
        "retries": rec.retries,
        "retry_reasons": list(rec.retry_reasons),
        "merge_warning": rec.merge_warning,
    }
