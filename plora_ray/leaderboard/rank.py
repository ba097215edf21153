"""Ranking trials: the scalar score, Pareto fronts, board order and the gain over baselines.

Order of a ranked list:

- Completed trials with every objective metric come first. A single-metric or weighted search ranks
  them by the scalar objective in its direction. A Pareto search ranks by non-dominated sorting:
  front 0 (the Pareto front, marked) first, then front 1, ...; inside a front by the first metric,
  then the next.
- Then early-stopped trials (by the proxy, lower first), then completed trials lacking an
  objective, diverged and failed ones. Every trial gets a rank, so the table is one ordered list.

Baselines are trials whose method is ``lora`` or ``full``. A ``plora`` trial of LoRA rank r is
compared with the best completed baseline among the ``lora`` trials of rank r and every ``full``
trial (full fine-tuning has no rank, so it is the reference for every rank). The gain is signed so
that a positive number means PLoRA is better: per objective metric when there are several, and on
the scalar objective for single and weighted searches.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from plora_ray.config.conversion import is_finite_number
from plora_ray.objective import Direction, ObjectiveSpec
from plora_ray.store import METRICS_FILE, TrialRecord

__all__ = [
    "BASELINE_METHODS",
    "Row",
    "baseline_gains",
    "pareto_fronts",
    "rank_rows",
    "score",
    "time_key",
    "to_epoch",
]

BASELINE_METHODS = ("lora", "full")

# Where trials without a usable objective go, after the ranked ones: an early-stopped trial got
# furthest towards an objective, a failed one least.
_STATUS_ORDER = {"early_stopped": 1, "completed": 2, "diverged": 3, "failed": 4}
# Sort keys are ascending: a maximised value is negated.
_SORT_SIGN: dict[Direction, float] = {"maximize": -1.0, "minimize": 1.0}


@dataclass
class Row:
    """One trial on the board: its record, the search it is listed under, and where it ranks.

    ``search`` is the board's name of the trial's search (two searches of the same name from two
    storage roots are told apart by a ``#2`` suffix), not necessarily the record's own field.
    ``rank``, ``score``, ``front``, ``gain`` and ``gain_baseline`` are filled by ranking.
    """

    record: TrialRecord
    search: str
    rank: int | None = None
    score: float | None = None
    front: int | None = None
    gain: dict[str, float] = field(default_factory=dict)
    gain_baseline: dict[str, str] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.record.method in BASELINE_METHODS

    @property
    def on_pareto_front(self) -> bool:
        return self.front == 0

    @property
    def label(self) -> str:
        return f"{self.search}/{self.record.trial_id}"

    @property
    def effective_rank_value(self) -> float | None:
        """One number for the final ΔW effective rank (the mean over sampled layers)."""
        v = self.record.delta_effective_rank
        if isinstance(v, dict):
            nums = [x for x in v.values() if is_finite_number(x)]
            return sum(nums) / len(nums) if nums else None
        return float(v) if is_finite_number(v) else None

    @property
    def metrics_path(self) -> str | None:
        """The trial's ``metrics.jsonl`` (in its run directory), None when the record names none."""
        run_dir = self.record.run_dir
        return f"{run_dir.rstrip('/')}/{METRICS_FILE}" if run_dir else None

    def to_dict(self) -> dict[str, Any]:
        """The row as written to ``leaderboard.json``."""
        rec = self.record
        return {
            "rank": self.rank,
            "search": self.search,
            "trial_id": rec.trial_id,
            "status": rec.status,
            "reason": rec.reason,
            "method": rec.method,
            "lora_rank": rec.lora_rank,
            "baseline": self.is_baseline,
            "pareto_front": self.on_pareto_front,
            "front": self.front,
            "score": self.score,
            "objective_value": rec.objective_value,
            "objectives": rec.objectives,
            "gain_over_baseline": self.gain,
            "gain_baseline": self.gain_baseline,
            "params": rec.params,
            "proxy": rec.proxy,
            "final_loss": rec.final_loss,
            "num_unloads": rec.num_unloads,
            "delta_effective_rank": rec.delta_effective_rank,
            "wall_time_s": rec.wall_time_s,
            "accelerator_hours": rec.accelerator_hours,
            "run_dir": rec.run_dir,
            "metrics_path": self.metrics_path,
            "checkpoint_path": rec.checkpoint_path,
            "model_path": rec.model_path,
            "started_at": rec.started_at,
            "ended_at": rec.ended_at,
            "loss_curve": rec.loss_curve,
            "config": rec.config,
            # pbt_unload: stage by stage, which trial's checkpoint this one continued and with
            # which settings (plora_ray.pbt); empty for every other scheduler.
            "lineage": rec.lineage,
        }


def to_epoch(v: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO-8601 string (None when neither)."""
    if is_finite_number(v):
        return float(v)
    if isinstance(v, str) and v:
        try:
            t = dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return t.timestamp()
    return None


def time_key(v: Any) -> float:
    """A sort key for a record's time: unknown times last."""
    t = to_epoch(v)
    return t if t is not None else math.inf


def score(spec: ObjectiveSpec, record: TrialRecord) -> float | None:
    """The scalar objective of one trial (None for a Pareto search or a missing metric).

    The search's own ``objective_value`` is used when it is a number, so the board ranks exactly
    as the search did; it is recomputed from the metrics only when absent.

    Args:
        spec: the search's objective.
        record: the finished trial.
    """
    if spec.pareto:
        return None
    if record.objective_value is not None:
        return record.objective_value
    return spec.value(record.objectives)


def pareto_fronts(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[int]:
    """Non-dominated sorting: the front index of each point (0 = the Pareto front).

    A point dominates another when it is at least as good in every metric and better in one.
    Equal points share a front.

    Args:
        points: one value per metric for each point.
        directions: the direction of each metric.
    """
    signed = [[v if d == "maximize" else -v for v, d in zip(p, directions)] for p in points]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    fronts = [-1] * len(signed)
    remaining = set(range(len(signed)))
    level = 0
    while remaining:
        current = {
            i
            for i in remaining
            if not any(dominates(signed[j], signed[i]) for j in remaining if j != i)
        }
        for i in current:
            fronts[i] = level
        remaining -= current
        level += 1
    return fronts


def rank_rows(rows: list[Row], spec: ObjectiveSpec) -> list[Row]:
    """Score, order and number ``rows`` by ``spec``; return them in rank order (ranks from 1).

    Completed trials with every metric first (see the module docstring), then the rest.

    Args:
        rows: the trials; their ``score``, ``front`` and ``rank`` are set here.
        spec: the objective they are ranked by.
    """
    scored: list[Row] = []
    rest: list[Row] = []
    for r in rows:
        rec = r.record
        r.front = None
        r.score = score(spec, rec) if rec.status == "completed" else None
        has_all = all(m in rec.objectives for m in spec.metrics)
        if rec.status == "completed" and (r.score is not None if not spec.pareto else has_all):
            scored.append(r)
        else:
            rest.append(r)
    if spec.pareto:
        fronts = pareto_fronts(
            [[r.record.objectives[m] for m in spec.metrics] for r in scored], spec.directions
        )
        for r, f in zip(scored, fronts):
            r.front = f
        scored.sort(
            key=lambda r: (
                r.front,
                *[
                    _SORT_SIGN[d] * r.record.objectives[m]
                    for m, d in zip(spec.metrics, spec.directions)
                ],
                time_key(r.record.ended_at),
                r.record.trial_id,
            )
        )
    else:
        s = _SORT_SIGN[spec.scalar_direction]
        scored.sort(
            key=lambda r: (
                s * r.score,  # type: ignore[operator]
                time_key(r.record.ended_at),
                r.record.trial_id,
            )
        )
    rest.sort(
        key=lambda r: (
            _STATUS_ORDER.get(r.record.status, 9),
            r.record.proxy if r.record.proxy is not None else math.inf,
            time_key(r.record.ended_at),
            r.record.trial_id,
        )
    )
    ordered = scored + rest
    for i, r in enumerate(ordered, 1):
        r.rank = i
    return ordered


def baseline_gains(rows: list[Row], spec: ObjectiveSpec) -> None:
    """Fill ``gain`` / ``gain_baseline`` of each completed PLoRA row (see the module docstring).

    Args:
        rows: ranked rows (``score`` set by ``rank_rows``), baselines among them.
        spec: the objective they were ranked by.
    """
    baselines = [r for r in rows if r.is_baseline and r.record.status == "completed"]
    for r in rows:
        rec = r.record
        r.gain, r.gain_baseline = {}, {}
        if rec.method != "plora" or rec.status != "completed":
            continue
        peers = [
            b for b in baselines if b.record.method == "full" or b.record.lora_rank == rec.lora_rank
        ]
        # Per-metric gains matter when there are several metrics; one metric is the objective.
        per_metric = spec.pareto or len(spec.metrics) > 1
        for m, d in zip(spec.metrics if per_metric else (), spec.directions):
            have = [b for b in peers if m in b.record.objectives]
            if m not in rec.objectives or not have:
                continue
            pick = max if d == "maximize" else min
            best = pick(have, key=lambda b: b.record.objectives[m])
            diff = rec.objectives[m] - best.record.objectives[m]
            r.gain[m] = diff if d == "maximize" else -diff
            r.gain_baseline[m] = best.label
        if not spec.pareto and r.score is not None:
            scored = [(b.score, b) for b in peers if b.score is not None]
            if scored:
                d = spec.scalar_direction
                top, best = (max if d == "maximize" else min)(scored, key=lambda sb: sb[0])
                diff = r.score - top
                r.gain["objective"] = diff if d == "maximize" else -diff
                r.gain_baseline["objective"] = best.label
