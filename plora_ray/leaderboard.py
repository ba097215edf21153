"""Leaderboard: a search's finished trials -> JSON, CSV, Markdown, a self-contained HTML page and
the best configuration as a runnable YAML.

Input is the search directory layout of the search -> leaderboard contract
(``<storage>/<name>/search.json`` and ``trials/<trial_id>.json``, one record per finished trial,
written atomically by the search). Output goes to ``<search_dir>/leaderboard/``:
``leaderboard.json``, ``leaderboard.csv``, ``leaderboard.md``, ``index.html``, ``best_config.yaml``.

Ranking:
- Trials with every objective metric (``status == completed``) come first. A single-metric or
  weighted search ranks them by the scalar objective in its direction. A Pareto search ranks by
  non-dominated sorting: front 0 (the Pareto front, marked) first, then front 1, ...; inside a front
  by the first metric, then the next.
- Then early-stopped trials (by the proxy, lower first), then completed trials lacking an objective,
  diverged and failed ones. Every trial gets a rank, so the table is one ordered list.

Baselines: trials whose method is ``lora`` or ``full``. A ``plora`` trial of LoRA rank r is compared
with the best completed baseline among the ``lora`` trials of rank r and every ``full`` trial (full
fine-tuning has no rank, so it is the reference for every rank). The gain is signed so that a
positive number means PLoRA is better: per objective metric, and for scalar searches on the
scalar objective too.

Several searches merge into one board: when all share the same objective they are ranked together
(baselines from any of them count); otherwise each is ranked by its own objective and the board
lists them one after another. Every row names its search.

Every write is atomic (temp file + ``os.replace``; a single PUT on object stores), so a reader never
sees half a file and a crashed search leaves its last good board. Everything user-written shown in
HTML is escaped; the JSON embedded for the page's script cannot close its ``<script>`` element.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import hashlib
import html
import io
import json
import math
import os
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
)
STATUSES = ("completed", "early_stopped", "diverged", "failed")
BASELINE_METHODS = ("lora", "full")
LEADERBOARD_DIR = "leaderboard"
OUTPUT_FILES = (
    "leaderboard.json",
    "leaderboard.csv",
    "leaderboard.md",
    "index.html",
    "best_config.yaml",
)
# A temp file older than this is a leftover of a killed writer (a live write takes milliseconds).
STALE_TEMP_S = 600.0
# How many of the top trials get a loss curve in the plot (more lines would not be readable).
TOP_LOSS_CURVES = 5


class LeaderboardError(ValueError):
    """A search directory that cannot be read (missing, no search.json, bad objective spec)."""


# --------------------------------------------------------------------------- objective spec


@dataclass(frozen=True)
class ObjectiveSpec:
    """What a search optimises: metrics with directions, optional weights, or a Pareto front.

    ``directions`` holds ``"max"`` or ``"min"`` per metric. With ``weights`` (not Pareto) the scalar
    objective is the weighted sum of the metrics, each signed by its direction, maximised.
    """

    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    pareto: bool = False

    @property
    def scalar_direction(self) -> str:
        """Direction of the scalar objective (single metric, or weighted sum)."""
        if self.weights is not None and len(set(self.directions)) > 1:
            return "max"  # signed sum, see score()
        return self.directions[0]

    def describe(self) -> str:
        def word(d: str) -> str:
            return "maximise" if d == "max" else "minimise"

        if self.pareto:
            return "Pareto front of " + ", ".join(
                f"{m} ({word(d)})" for m, d in zip(self.metrics, self.directions)
            )
        if self.weights is not None:
            terms = " + ".join(f"{w:g}·{m}" for w, m in zip(self.weights, self.metrics))
            return f"{word(self.scalar_direction)} {terms}"
        return f"{word(self.directions[0])} {self.metrics[0]}"

    def score(self, objectives: dict[str, float], objective_value: float | None) -> float | None:
        """The scalar objective of one trial (None for Pareto searches or a missing metric).

        The search's own ``objective_value`` is used when it is a number, so the board ranks
        exactly as the search did; it is recomputed from the metrics only when absent.
        """
        if self.pareto:
            return None
        mixed = self.weights is not None and len(set(self.directions)) > 1
        if _finite(objective_value) and not mixed:
            return float(objective_value)  # type: ignore[arg-type]
        values = [objectives.get(m) for m in self.metrics]
        if not all(_finite(v) for v in values):
            return None
        if self.weights is None:
            return float(values[0])  # type: ignore[arg-type]
        if mixed:
            return sum(
                w * (v if d == "max" else -v)  # type: ignore[operator]
                for w, v, d in zip(self.weights, values, self.directions)
            )
        return sum(w * v for w, v in zip(self.weights, values))  # type: ignore[operator]


_DIRECTION_WORDS = {
    "max": "max",
    "maximize": "max",
    "maximise": "max",
    "min": "min",
    "minimize": "min",
    "minimise": "min",
}


def parse_objective_spec(data: dict[str, Any], source: str) -> ObjectiveSpec:
    """Read the objective from a parsed ``search.json``.

    Accepts the spec under ``objective`` (or at the top level): ``metrics`` (list, or ``metric``),
    ``directions`` (list, or one ``direction``/``mode``), optional ``weights`` and ``pareto``.

    Raises:
        LeaderboardError: no metric, an unknown direction, or lengths that do not match.
    """
    spec = data.get("objective", data)
    if isinstance(spec, str):
        spec = {"metrics": [spec]}
    if not isinstance(spec, dict):
        raise LeaderboardError(
            f"{source}: objective: expected a mapping with metrics and directions, found {spec!r}"
        )
    metrics = spec.get("metrics", spec.get("metric"))
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics or not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise LeaderboardError(
            f"{source}: objective.metrics: expected a non-empty list of metric "
            f"names, found {metrics!r}"
        )
    raw_dirs = spec.get("directions", spec.get("direction", spec.get("mode", "max")))
    if isinstance(raw_dirs, str):
        raw_dirs = [raw_dirs] * len(metrics)
    if not isinstance(raw_dirs, list):
        raise LeaderboardError(
            f"{source}: objective.directions: expected a list of max/min, found {raw_dirs!r}"
        )
    if len(raw_dirs) == 1 and len(metrics) > 1:
        raw_dirs = raw_dirs * len(metrics)
    dirs = []
    for d in raw_dirs:
        if str(d).lower() not in _DIRECTION_WORDS:
            raise LeaderboardError(
                f"{source}: objective.directions: expected max or min "
                f"(maximize/minimize), found {d!r}"
            )
        dirs.append(_DIRECTION_WORDS[str(d).lower()])
    if len(dirs) != len(metrics):
        raise LeaderboardError(
            f"{source}: objective: expected one direction per metric "
            f"({len(metrics)}), found {len(dirs)}"
        )
    weights = spec.get("weights")
    if isinstance(weights, dict):
        weights = [weights.get(m) for m in metrics]
    if weights is not None:
        if (
            not isinstance(weights, list)
            or len(weights) != len(metrics)
            or not all(_finite(w) for w in weights)
        ):
            raise LeaderboardError(
                f"{source}: objective.weights: expected one number per metric "
                f"({len(metrics)}), found {weights!r}"
            )
        weights = tuple(float(w) for w in weights)
    pareto = bool(spec.get("pareto", False))
    if len(metrics) > 1 and weights is None and not pareto:
        raise LeaderboardError(
            f"{source}: objective: several metrics need weights or pareto: "
            f"true, found metrics={metrics!r} without either"
        )
    return ObjectiveSpec(tuple(metrics), tuple(dirs), weights, pareto)


# --------------------------------------------------------------------------- records and rows


@dataclass
class SearchInfo:
    """One search directory as read from its ``search.json``."""

    name: str
    path: str
    spec: ObjectiveSpec
    study_name: str | None = None
    storage_url: str | None = None
    num_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "objective": {
                "metrics": list(self.spec.metrics),
                "directions": list(self.spec.directions),
                "weights": list(self.spec.weights) if self.spec.weights else None,
                "pareto": self.spec.pareto,
                "description": self.spec.describe(),
            },
            "study_name": self.study_name,
            "storage_url": self.storage_url,
            "num_trials": self.num_records,
        }


@dataclass
class Row:
    """One trial on the board: its record (contract fields) plus the ranking results."""

    search: str
    trial_id: str
    status: str
    reason: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    method: str | None = None
    lora_rank: int | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    objective_value: float | None = None
    proxy: float | None = None
    final_loss: float | None = None
    num_unloads: int | None = None
    delta_effective_rank: Any = None
    wall_time_s: float | None = None
    accelerator_hours: float | None = None
    checkpoint_path: str | None = None
    model_path: str | None = None
    started_at: Any = None
    ended_at: Any = None
    loss_curve: list[list[float]] = field(default_factory=list)
    # Filled by ranking.
    rank: int | None = None
    score: float | None = None
    front: int | None = None
    gain: dict[str, float] = field(default_factory=dict)
    gain_baseline: dict[str, str] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.method in BASELINE_METHODS

    @property
    def on_pareto_front(self) -> bool:
        return self.front == 0

    @property
    def label(self) -> str:
        return f"{self.search}/{self.trial_id}"

    @property
    def effective_rank_value(self) -> float | None:
        """One number for the final ΔW effective rank (the mean over sampled layers)."""
        v = self.delta_effective_rank
        if isinstance(v, dict):
            nums = [x for x in v.values() if _finite(x)]
            return sum(nums) / len(nums) if nums else None
        return float(v) if _finite(v) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "search": self.search,
            "trial_id": self.trial_id,
            "status": self.status,
            "reason": self.reason,
            "method": self.method,
            "lora_rank": self.lora_rank,
            "baseline": self.is_baseline,
            "pareto_front": self.on_pareto_front,
            "front": self.front,
            "score": self.score,
            "objective_value": self.objective_value,
            "objectives": self.objectives,
            "gain_over_baseline": self.gain,
            "gain_baseline": self.gain_baseline,
            "params": self.params,
            "proxy": self.proxy,
            "final_loss": self.final_loss,
            "num_unloads": self.num_unloads,
            "delta_effective_rank": self.delta_effective_rank,
            "wall_time_s": self.wall_time_s,
            "accelerator_hours": self.accelerator_hours,
            "checkpoint_path": self.checkpoint_path,
            "model_path": self.model_path,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "loss_curve": self.loss_curve,
            "config": self.config,
        }


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any) -> float | None:
    return float(v) if _finite(v) else None


def _int(v: Any) -> int | None:
    return int(v) if _finite(v) else None


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def row_from_record(rec: Any, search: str, source: str) -> Row:
    """Validate one trial record (contract fields) and turn it into a Row.

    Raises:
        LeaderboardError: naming ``source`` and the field, when the record is not usable.
    """
    if not isinstance(rec, dict):
        raise LeaderboardError(
            f"{source}: expected a JSON object (trial record), found {type(rec).__name__}"
        )
    tid = rec.get("trial_id")
    if not isinstance(tid, (str, int)) or isinstance(tid, bool) or str(tid) == "":
        raise LeaderboardError(f"{source}: trial_id: expected a non-empty string, found {tid!r}")
    status = rec.get("status")
    if status not in STATUSES:
        raise LeaderboardError(
            f"{source}: status: expected one of {', '.join(STATUSES)}, found {status!r}"
        )
    objectives = rec.get("objectives") or {}
    if not isinstance(objectives, dict):
        raise LeaderboardError(
            f"{source}: objectives: expected an object of metric: number, found {objectives!r}"
        )
    params = rec.get("params") or {}
    if not isinstance(params, dict):
        raise LeaderboardError(
            f"{source}: params: expected an object of dotted.key: value, found {params!r}"
        )
    config = rec.get("config")
    if config is not None and not isinstance(config, dict):
        raise LeaderboardError(
            f"{source}: config: expected a run-config object, found {type(config).__name__}"
        )
    curve = []
    for point in rec.get("loss_curve") or []:
        if (
            isinstance(point, (list, tuple))
            and len(point) == 2
            and _finite(point[0])
            and _finite(point[1])
        ):
            curve.append([float(point[0]), float(point[1])])
    method = rec.get("method") or (config or {}).get("method")
    lora_rank = rec.get("lora_rank")
    if lora_rank is None and isinstance(config, dict):
        lora_rank = (config.get("lora") or {}).get("rank")
    return Row(
        search=search,
        trial_id=str(tid),
        status=status,
        reason=_opt_str(rec.get("reason")),
        params=params,
        config=config,
        method=_opt_str(method),
        lora_rank=_int(lora_rank) if method != "full" else None,
        objectives={str(k): float(v) for k, v in objectives.items() if _finite(v)},
        objective_value=_num(rec.get("objective_value")),
        proxy=_num(rec.get("proxy")),
        final_loss=_num(rec.get("final_loss")),
        num_unloads=_int(rec.get("num_unloads")),
        delta_effective_rank=rec.get("delta_effective_rank"),
        wall_time_s=_num(rec.get("wall_time_s")),
        accelerator_hours=_num(rec.get("accelerator_hours")),
        checkpoint_path=_opt_str(rec.get("checkpoint_path")),
        model_path=_opt_str(rec.get("model_path")),
        started_at=rec.get("started_at"),
        ended_at=rec.get("ended_at"),
        loss_curve=curve,
    )


# --------------------------------------------------------------------------- ranking


def pareto_fronts(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Non-dominated sorting: the front index of each point (0 = the Pareto front).

    A point dominates another when it is at least as good in every metric and better in one.
    Equal points share a front.
    """
    signed = [[v if d == "max" else -v for v, d in zip(p, directions)] for p in points]

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


_STATUS_ORDER = {"early_stopped": 1, "completed": 2, "diverged": 3, "failed": 4}


def _time_key(v: Any) -> float:
    t = to_epoch(v)
    return t if t is not None else math.inf


def rank_rows(rows: list[Row], spec: ObjectiveSpec) -> list[Row]:
    """Score, order and number ``rows`` by ``spec``; return them in rank order (ranks from 1).

    Completed trials with every metric first (see the module docstring), then the rest.
    """
    scored: list[Row] = []
    rest: list[Row] = []
    for r in rows:
        r.front = None
        r.score = spec.score(r.objectives, r.objective_value) if r.status == "completed" else None
        has_all = all(m in r.objectives for m in spec.metrics)
        if r.status == "completed" and (r.score is not None if not spec.pareto else has_all):
            scored.append(r)
        else:
            rest.append(r)
    sign = {"max": -1.0, "min": 1.0}
    if spec.pareto:
        fronts = pareto_fronts(
            [[r.objectives[m] for m in spec.metrics] for r in scored], spec.directions
        )
        for r, f in zip(scored, fronts):
            r.front = f
        scored.sort(
            key=lambda r: (
                r.front,
                *[sign[d] * r.objectives[m] for m, d in zip(spec.metrics, spec.directions)],
                _time_key(r.ended_at),
                r.trial_id,
            )
        )
    else:
        s = sign[spec.scalar_direction]
        scored.sort(
            key=lambda r: (
                s * r.score,  # type: ignore[operator]
                _time_key(r.ended_at),
                r.trial_id,
            )
        )
    rest.sort(
        key=lambda r: (
            _STATUS_ORDER.get(r.status, 9),
            r.proxy if r.proxy is not None else math.inf,
            _time_key(r.ended_at),
            r.trial_id,
        )
    )
    ordered = scored + rest
    for i, r in enumerate(ordered, 1):
        r.rank = i
    return ordered


def baseline_gains(rows: list[Row], spec: ObjectiveSpec) -> None:
    """Fill ``gain`` / ``gain_baseline`` of each completed PLoRA row (see the module docstring)."""
    baselines = [r for r in rows if r.is_baseline and r.status == "completed"]
    for r in rows:
        r.gain, r.gain_baseline = {}, {}
        if r.method != "plora" or r.status != "completed":
            continue
        peers = [b for b in baselines if b.method == "full" or b.lora_rank == r.lora_rank]
        # Per-metric gains matter when there are several metrics; one metric is the objective.
        per_metric = spec.pareto or len(spec.metrics) > 1
        for m, d in zip(spec.metrics if per_metric else (), spec.directions):
            have = [b for b in peers if m in b.objectives]
            if m not in r.objectives or not have:
                continue
            pick = max if d == "max" else min
            best = pick(have, key=lambda b: b.objectives[m])
            diff = r.objectives[m] - best.objectives[m]
            r.gain[m] = diff if d == "max" else -diff
            r.gain_baseline[m] = best.label
        if not spec.pareto and r.score is not None:
            have = [(b.score, b) for b in peers if b.score is not None]
            if have:
                d = spec.scalar_direction
                score, best = (max if d == "max" else min)(have, key=lambda sb: sb[0])
                diff = r.score - score
                r.gain["objective"] = diff if d == "max" else -diff
                r.gain_baseline["objective"] = best.label


# --------------------------------------------------------------------------- storage


def _is_uri(path: str) -> bool:
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path)) and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


class _Store:
    """Reads and atomic writes on a local path or, for s3:// gs:// ..., a pyarrow filesystem.

    Object stores publish an object only when its upload completes, so one PUT of the finished
    bytes is atomic there; a local file goes through a temp file in the same directory and
    ``os.replace``.
    """

    def __init__(self, root: str, filesystem: Any = None) -> None:
        self.root = root.rstrip("/") if root != "/" else root
        self.fs = filesystem
        self.base = self.root
        if filesystem is None and _is_uri(root):
            import pyarrow.fs as pafs

            self.fs, self.base = pafs.FileSystem.from_uri(root)
        elif filesystem is None:
            self.base = os.path.abspath(os.path.expanduser(_local(root)))

    def display(self, *parts: str) -> str:
        return (
            "/".join([self.root, *parts])
            if self.fs is not None and _is_uri(self.root)
            else os.path.join(self.base, *parts)
        )

    def _p(self, *parts: str) -> str:
        if self.fs is not None:
            return "/".join([self.base, *parts])
        return os.path.join(self.base, *parts)

    def is_dir(self, *parts: str) -> bool:
        if self.fs is None:
            return os.path.isdir(self._p(*parts))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(*parts)).type == pafs.FileType.Directory

    def exists(self, *parts: str) -> bool:
        if self.fs is None:
            return os.path.exists(self._p(*parts))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str:
        if self.fs is None:
            with open(self._p(*parts), encoding="utf-8") as f:
                return f.read()
        with self.fs.open_input_stream(self._p(*parts)) as f:
            return f.read().decode("utf-8")

    def list_names(self, *parts: str) -> list[str]:
        """Names of plain files and dirs directly under ``parts`` (sorted; [] when missing)."""
        if self.fs is None:
            p = self._p(*parts)
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self._p(*parts), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(sel))

    def remove_stale_temps(self, names: Sequence[str], max_age_s: float = STALE_TEMP_S) -> None:
        """Delete temp files a killed writer left beside ``names`` (local storage only).

        Only old ones: a young temp file may belong to a publisher writing right now.
        """
        if self.fs is not None or not os.path.isdir(self.base):
            return
        now = time.time()
        for entry in os.listdir(self.base):
            if not (entry.endswith(".tmp") and any(entry.startswith(f".{n}.") for n in names)):
                continue
            path = os.path.join(self.base, entry)
            try:
                if now - os.path.getmtime(path) > max_age_s:
                    os.unlink(path)
            except FileNotFoundError:
                pass  # its writer finished or another publisher removed it

    def write_atomic(self, rel: str, chunks: Iterable[bytes]) -> str:
        """Write ``chunks`` to ``rel`` under the root so readers see the old or the new file only.

        Raises:
            Exception: whatever producing or writing the chunks raised; the old file is kept and
                no temp file is left behind.
        """
        target = self._p(*rel.split("/"))
        if self.fs is not None:
            data = b"".join(chunks)  # produce everything first: a failure uploads nothing
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target) as out:
                out.write(data)
            return self.display(*rel.split("/"))
        directory = os.path.dirname(target)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(target) + ".", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            # mkstemp creates 0600; a published board is meant to be read (web server, colleagues).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return target


def atomic_write(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> str:
    """Atomically replace the local or cloud file ``path`` with the concatenated ``chunks``.

    Raises:
        Exception: whatever producing or writing the chunks raised; the old file stays intact.
    """
    p = str(path)
    if _is_uri(p):
        parent, _, name = p.rstrip("/").rpartition("/")
        return _Store(parent).write_atomic(name, chunks)
    p = os.path.abspath(os.path.expanduser(_local(p)))
    return _Store(os.path.dirname(p)).write_atomic(os.path.basename(p), chunks)


# --------------------------------------------------------------------------- building the board


@dataclass
class Board:
    """A leaderboard over one or more searches; ``rows`` are in board order."""

    searches: list[SearchInfo]
    rows: list[Row]
    ranked_globally: bool
    warnings: list[str] = field(default_factory=list)
    generated_at: str = ""

    @property
    def best(self) -> Row | None:
        """The top completed trial with an objective (the first search's when ranked per search)."""
        for r in self.rows:
            if r.status == "completed" and (r.score is not None or r.front is not None):
                return r
        return None

    def spec_of(self, row: Row) -> ObjectiveSpec:
        for s in self.searches:
            if s.name == row.search:
                return s.spec
        return self.searches[0].spec

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "format": "plora-ray leaderboard",
            "version": 1,
            "generated_at": self.generated_at,
            "ranked_globally": self.ranked_globally,
            "searches": [s.to_dict() for s in self.searches],
            "best": {"search": best.search, "trial_id": best.trial_id} if best else None,
            "warnings": self.warnings,
            "rows": [r.to_dict() for r in self.rows],
        }


def _read_search(store: _Store, warnings: list[str]) -> tuple[SearchInfo, list[Row]]:
    where = store.display("search.json")
    if not store.is_dir():
        raise LeaderboardError(
            f"{store.display()}: expected a search directory, found "
            f"{'a file' if store.exists() else 'nothing'} there"
        )
    if not store.exists("search.json"):
        raise LeaderboardError(
            f"{where}: expected search.json (written when the search starts) "
            "in the search directory, found no such file"
        )
    try:
        meta = json.loads(store.read_text("search.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeaderboardError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise LeaderboardError(f"{where}: expected a JSON object, found {type(meta).__name__}")
    name = str(meta.get("name") or os.path.basename(store.base.rstrip("/")))
    optuna_meta = meta.get("optuna") if isinstance(meta.get("optuna"), dict) else {}
    info = SearchInfo(
        name=name,
        path=store.display(),
        spec=parse_objective_spec(meta, where),
        study_name=_opt_str(meta.get("study_name") or optuna_meta.get("study_name")),
        storage_url=_opt_str(
            meta.get("storage_url")
            or meta.get("optuna_storage")
            or optuna_meta.get("storage_url")
            or optuna_meta.get("storage")
        ),
    )
    rows = []
    for fname in store.list_names("trials"):
        if not fname.endswith(".json"):
            continue  # temp files of an in-progress atomic write, editor backups
        src = store.display("trials", fname)
        try:
            rec = json.loads(store.read_text("trials", fname))
            rows.append(row_from_record(rec, name, src))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            warnings.append(f"{src}: skipped, not valid JSON ({exc})")
        except LeaderboardError as exc:
            warnings.append(f"{exc} (skipped)")
    info.num_records = len(rows)
    return info, rows


def _expand(paths: Sequence[str]) -> list[str]:
    """Search directories: each path itself, or its subdirectories holding search.json."""
    out: list[str] = []
    for p in paths:
        store = _Store(p)
        if store.exists("search.json") or not store.is_dir():
            out.append(p)
            continue
        subs = [n for n in store.list_names() if store.exists(n, "search.json")]
        if not subs:
            raise LeaderboardError(
                f"{store.display()}: expected a search directory (with "
                "search.json) or a storage directory holding some, found "
                "neither"
            )
        out.extend(p.rstrip("/") + "/" + n for n in subs)
    return out


def build_leaderboard(search_dirs: Sequence[str | os.PathLike[str]]) -> Board:
    """Read one or more search directories and rank their trials into one board.

    A record that cannot be read is skipped and named in ``Board.warnings`` (a half-written file
    from a crashed writer must not take the whole board down).

    Args:
        search_dirs: search directories (local paths or cloud URIs), or storage directories whose
            subdirectories are searches.

    Raises:
        LeaderboardError: a path that is not a search directory, or an unreadable search.json.
    """
    if not search_dirs:
        raise LeaderboardError("expected at least one search directory, found none")
    warnings: list[str] = []
    searches: list[SearchInfo] = []
    groups: list[list[Row]] = []
    seen_paths: set[str] = set()
    for d in _expand([str(p) for p in search_dirs]):
        store = _Store(d)
        if store.display() in seen_paths:
            warnings.append(f"{store.display()}: given more than once; read once")
            continue
        seen_paths.add(store.display())
        info, rows = _read_search(store, warnings)
        # Two different directories may hold searches of the same name (two storage roots):
        # keep both, told apart by a suffix, so no entry is lost or merged into another.
        names = {s.name for s in searches}
        if info.name in names:
            k = 2
            while f"{info.name}#{k}" in names:
                k += 1
            info.name = f"{info.name}#{k}"
            for r in rows:
                r.search = info.name
        searches.append(info)
        groups.append(rows)
    same_spec = len({s.spec for s in searches}) == 1
    ordered: list[Row] = []
    if same_spec:
        everything = [r for g in groups for r in g]
        ordered = rank_rows(everything, searches[0].spec)
        baseline_gains(ordered, searches[0].spec)
    else:
        for info, g in zip(searches, groups):
            part = rank_rows(g, info.spec)
            baseline_gains(part, info.spec)
            ordered.extend(part)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Board(searches, ordered, same_spec, warnings, now)


# --------------------------------------------------------------------------- formatting helpers


def to_epoch(v: Any) -> float | None:
    """Seconds since the epoch from a number or an ISO-8601 string (None when neither)."""
    if _finite(v):
        return float(v)
    if isinstance(v, str) and v:
        try:
            t = _dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            return None
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.timezone.utc)
        return t.timestamp()
    return None


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _fmt_duration(s: float | None) -> str:
    if s is None:
        return ""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _fmt_gain(v: float | None) -> str:
    return "" if v is None else f"{v:+.4g}"


def _param_keys(rows: Sequence[Row], table: bool = False) -> list[str]:
    """Sampled parameter names; the table leaves out ``method`` (it has its own column)."""
    keys: list[str] = []
    for r in rows:
        for k in r.params:
            if k not in keys and not (table and k == "method"):
                keys.append(k)
    return sorted(keys)


def _metric_keys(board: Board, every: bool = False) -> list[str]:
    """Objective columns: the standard ones any trial has, then other metrics of the specs, then
    (``every``) whatever else the records hold (NLLs), except the final loss (its own column)."""
    present = {k for r in board.rows for k in r.objectives}
    keys = [m for m in OBJECTIVE_METRICS if m in present]
    for s in board.searches:
        keys.extend(m for m in s.spec.metrics if m not in keys)
    if every:
        keys.extend(sorted(present - set(keys) - {"final_loss"}))
    return keys


def _gain_keys(board: Board) -> list[str]:
    keys: list[str] = []
    for s in board.searches:
        if not s.spec.pareto and "objective" not in keys:
            keys.append("objective")
        keys.extend(m for m in s.spec.metrics if m not in keys and len(s.spec.metrics) > 1)
    if not keys:
        keys = ["objective"]
    return keys


# --------------------------------------------------------------------------- CSV and Markdown


def _csv_safe(v: Any) -> Any:
    # A spreadsheet runs a cell starting with = + - @ as a formula; user text (params, reasons)
    # is defused with a leading quote. Numbers stay numbers.
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def render_csv(board: Board) -> str:
    """One line per trial, in board order; params and objectives as their own columns."""
    pkeys, mkeys, gkeys = _param_keys(board.rows), _metric_keys(board, True), _gain_keys(board)
    header = (
        [
            "rank",
            "search",
            "trial_id",
            "status",
            "reason",
            "method",
            "lora_rank",
            "baseline",
            "pareto_front",
            "score",
        ]
        + [f"param.{k}" for k in pkeys]
        + [f"objective.{k}" for k in mkeys]
        + [f"gain.{k}" for k in gkeys]
        + [
            "proxy",
            "final_loss",
            "accelerator_hours",
            "wall_time_s",
            "num_unloads",
            "delta_effective_rank",
            "checkpoint_path",
            "model_path",
            "started_at",
            "ended_at",
        ]
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in board.rows:
        params = [r.params.get(k) for k in pkeys]
        w.writerow(
            [
                _csv_safe(v)
                for v in [
                    r.rank,
                    r.search,
                    r.trial_id,
                    r.status,
                    r.reason,
                    r.method,
                    r.lora_rank,
                    r.is_baseline,
                    r.on_pareto_front,
                    r.score,
                    *[json.dumps(v) if isinstance(v, (list, dict)) else v for v in params],
                    *[r.objectives.get(k) for k in mkeys],
                    *[r.gain.get(k) for k in gkeys],
                    r.proxy,
                    r.final_loss,
                    r.accelerator_hours,
                    r.wall_time_s,
                    r.num_unloads,
                    r.effective_rank_value,
                    r.checkpoint_path,
                    r.model_path,
                    r.started_at,
                    r.ended_at,
                ]
            ]
        )
    return buf.getvalue()


def _md(v: Any) -> str:
    text = _fmt(v) if not isinstance(v, str) else v
    # Keep a cell a cell: no pipes or newlines; HTML in user text shown, not rendered.
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def render_markdown(board: Board) -> str:
    """A readable summary: the objective, the best trial, and the ranked table."""
    mkeys = [
        m
        for m in ("gsm8k", "gsm8k_flexible", "mmlu", "arc_easy", "arc_challenge")
        if m in _metric_keys(board)
    ]
    for s in board.searches:
        mkeys.extend(m for m in s.spec.metrics if m not in mkeys)
    gkeys = _gain_keys(board)
    lines = [f"# Leaderboard: {_md(', '.join(s.name for s in board.searches))}", ""]
    for s in board.searches:
        lines.append(
            f"- **{_md(s.name)}**: {_md(s.spec.describe())}; {s.num_records} trial(s); "
            f"`{_md(s.path)}`"
        )
    best = board.best
    lines.append("")
    if best:
        lines.append(
            f"Best: **{_md(best.label)}** ({_md(best.method)}"
            + (f", rank {best.lora_rank}" if best.lora_rank else "")
            + "), "
            + ", ".join(f"{m} {_fmt(best.objectives.get(m))}" for m in board.spec_of(best).metrics)
            + ". Run it again: `plora-ray train best_config.yaml`."
        )
    else:
        lines.append("No completed trial with an objective yet.")
    if board.warnings:
        lines += ["", "Warnings:"] + [f"- {_md(w)}" for w in board.warnings]
    head = (
        ["#", "search", "trial", "status", "method", "r", "params"]
        + mkeys
        + ["score"]
        + [f"gain {g}" for g in gkeys]
        + ["proxy", "loss", "accel-h", "wall", "unloads", "ΔW rank", "model"]
    )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in board.rows:
        status = r.status + (f": {r.reason}" if r.reason else "")
        rank = f"{r.rank}{' ★' if r.on_pareto_front else ''}"
        method = (r.method or "") + (" (baseline)" if r.is_baseline else "")
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.params.items()))
        cells = (
            [rank, r.search, r.trial_id, status, method, r.lora_rank, params]
            + [r.objectives.get(m) for m in mkeys]
            + [r.score]
            + [_fmt_gain(r.gain.get(g)) for g in gkeys]
            + [
                r.proxy,
                r.final_loss,
                r.accelerator_hours,
                _fmt_duration(r.wall_time_s),
                r.num_unloads,
                r.effective_rank_value,
                r.model_path,
            ]
        )
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if any(s.spec.pareto for s in board.searches):
        lines += ["", "★ on the Pareto front."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- best config


def render_best_config(board: Board) -> str | None:
    """The best trial's run config as YAML that ``plora-ray train`` runs as is (no search block)."""
    best = board.best
    if best is None or not best.config:
        return None
    cfg = {k: v for k, v in best.config.items() if k != "search"}
    spec = board.spec_of(best)

    def one_line(text: str) -> str:
        # User-written names go into YAML comments: a newline there would add YAML keys.
        return re.sub(r"[\r\n\x00-\x1f]", " ", text)

    header = [
        "# Best configuration of the search, exported by plora-ray's leaderboard.",
        f"# search: {one_line(best.search)}   trial: {one_line(best.trial_id)}   rank: {best.rank}",
        f"# objective: {one_line(spec.describe())}: "
        + ", ".join(f"{m}={_fmt(best.objectives.get(m))}" for m in spec.metrics),
        "# Run it:  plora-ray train best_config.yaml",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False)


# --------------------------------------------------------------------------- SVG plots

_METHOD_COLORS = {"plora": "#1f6fb4", "lora": "#e8731a", "full": "#2a9d3c"}
_SERIES_COLORS = ["#1f6fb4", "#e8731a", "#2a9d3c", "#c62f2f", "#8757b8", "#8c564b", "#d6479b"]
_W, _H = 560, 330


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _nice_step(span: float, n: int) -> float:
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (about n of them)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        pad = abs(lo) * 0.1 or 0.5
        # Accuracies and losses are never negative: keep a range of non-negative values there.
        lo, hi = (lo - pad if lo - pad >= 0 or lo < 0 else 0.0), hi + pad
    step = _nice_step(hi - lo, n)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    t = start
    while t < hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - 1e-12:
        ticks.append(round(t, 12))
    return ticks


def _tick_label(v: float, ticks: list[float]) -> str:
    if v == 0:
        return "0"  # also keeps "-0.0" off the axis
    step = (ticks[1] - ticks[0]) if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if step > 0 and abs(step / 10 ** math.floor(math.log10(step)) - 2.5) < 1e-9:
        decimals += 1
    if abs(v) >= 1e5 or (abs(v) < 1e-4 and v != 0):
        return f"{v:.2g}"
    return f"{v:.{decimals}f}"


class _Axes:
    """A linear x/y frame in an SVG of fixed size: ticks, grid, axis labels, title."""

    def __init__(
        self,
        title: str,
        xlabel: str,
        ylabel: str,
        xs: Sequence[float],
        ys: Sequence[float],
        left: int = 62,
        legend_width: int = 150,
        height: int = _H,
    ) -> None:
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        # The legend gets its own column right of the frame, so it never hides a point.
        self.width, self.height = _W + legend_width, height
        self.l, self.r, self.t, self.b = left, 18 + legend_width, 34, 46
        self.xt = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
        self.yt = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return self.l + (v - lo) / (hi - lo) * (self.width - self.l - self.r)

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return self.height - self.b - (v - lo) / (hi - lo) * (self.height - self.t - self.b)

    @property
    def legend_x(self) -> float:
        return self.width - self.r + 22

    def open(self, plot_id: str) -> list[str]:
        w, h = self.width, self.height
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{plot_id}" '
            f'viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-labelledby="{plot_id}-title">',
            f'<title id="{plot_id}-title">{_e(self.title)}</title>',
            f'<text x="{w / 2:.1f}" y="20" class="ptitle" text-anchor="middle">'
            f"{_e(self.title)}</text>",
        ]
        for v in self.yt:
            y = self.y(v)
            out.append(
                f'<line class="grid" x1="{self.l}" x2="{w - self.r}" y1="{y:.1f}" y2="{y:.1f}"/>'
            )
            out.append(
                f'<text class="tick" x="{self.l - 6}" y="{y + 4:.1f}" '
                f'text-anchor="end">{_tick_label(v, self.yt)}</text>'
            )
        for v in self.xt:
            x = self.x(v)
            out.append(
                f'<line class="grid" y1="{self.t}" y2="{h - self.b}" x1="{x:.1f}" x2="{x:.1f}"/>'
            )
            out.append(
                f'<text class="tick" x="{x:.1f}" y="{h - self.b + 16}" '
                f'text-anchor="middle">{_tick_label(v, self.xt)}</text>'
            )
        out.append(
            f'<rect class="frame" x="{self.l}" y="{self.t}" '
            f'width="{w - self.l - self.r}" height="{h - self.t - self.b}"/>'
        )
        out.append(
            f'<text class="alabel" x="{(self.l + w - self.r) / 2:.1f}" y="{h - 8}" '
            f'text-anchor="middle">{_e(self.xlabel)}</text>'
        )
        out.append(
            f'<text class="alabel" transform="translate(14 {(self.t + h - self.b) / 2:.1f})'
            f' rotate(-90)" text-anchor="middle">{_e(self.ylabel)}</text>'
        )
        return out


def _legend(items: Sequence[tuple[str, str, str]], x: float, y: float) -> list[str]:
    """Legend entries (label, colour, shape: circle|square|line) stacked from (x, y)."""
    out = []
    for i, (label, color, shape) in enumerate(items):
        yy = y + i * 15
        if shape == "square":
            out.append(
                f'<rect x="{x - 4:.1f}" y="{yy - 4:.1f}" width="8" height="8" fill="{color}"/>'
            )
        elif shape == "line":
            out.append(
                f'<line x1="{x - 7:.1f}" x2="{x + 7:.1f}" y1="{yy:.1f}" y2="{yy:.1f}" '
                f'stroke="{color}" stroke-width="2.5"/>'
            )
        else:
            out.append(f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="4" fill="{color}"/>')
        out.append(f'<text class="legend" x="{x + 10:.1f}" y="{yy + 4:.1f}">{_e(label)}</text>')
    return out


def _empty_plot(plot_id: str, title: str, message: str) -> str:
    # SVG text does not wrap by itself; a long reason (a path) is cut into lines.
    lines = textwrap.wrap(message, 80, break_long_words=True)[:6] or [""]
    height = 70 + 17 * len(lines)
    spans = "".join(
        f'<tspan x="{_W / 2}" dy="{0 if i == 0 else 17}">{_e(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot empty" id="{_e(plot_id)}" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img">'
        f"<title>{_e(title)}</title>"
        f'<text x="{_W / 2}" y="22" class="ptitle" text-anchor="middle">{_e(title)}</text>'
        f'<text x="{_W / 2}" y="56" class="note" text-anchor="middle">{spans}</text>'
        "</svg>"
    )


def _marker(row: Row, x: float, y: float, tip: str, ring: bool = False) -> str:
    color = _METHOD_COLORS.get(row.method or "", "#777")
    stroke = ' stroke="#111" stroke-width="1.6"' if ring else ' stroke="#fff" stroke-width="0.8"'
    if row.is_baseline:
        return (
            f'<rect class="pt" x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" '
            f'fill="{color}"{stroke}><title>{_e(tip)}</title></rect>'
        )
    return (
        f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"{stroke}>'
        f"<title>{_e(tip)}</title></circle>"
    )


def _method_legend(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    seen = []
    for r in rows:
        label = (r.method or "?") + (" (baseline)" if r.is_baseline else "")
        item = (
            label,
            _METHOD_COLORS.get(r.method or "", "#777"),
            "square" if r.is_baseline else "circle",
        )
        if item not in seen:
            seen.append(item)
    return seen


def plot_objective_over_time(board: Board) -> str:
    """Each completed trial's objective against its finishing time, with the best so far."""
    pid, title = "plot-objective-time", "Objective by trial over time"
    done = [r for r in board.rows if r.status == "completed"]
    t0 = min(
        (
            t
            for r in board.rows
            for t in [to_epoch(r.started_at), to_epoch(r.ended_at)]
            if t is not None
        ),
        default=None,
    )

    def when(r: Row, i: int) -> float:
        t = to_epoch(r.ended_at)
        return (t - t0) / 60.0 if t is not None and t0 is not None else float(i)

    timed = all(to_epoch(r.ended_at) is not None for r in done) and t0 is not None
    xlabel = "minutes since the search started (trial end)" if timed else "trial (finish order)"
    chrono = sorted(done, key=lambda r: (_time_key(r.ended_at), r.trial_id))
    series: list[tuple[str, list[tuple[float, float, Row]], str | None]] = []
    spec = board.searches[0].spec
    if board.ranked_globally and not spec.pareto:
        pts = [(when(r, i), r.score, r) for i, r in enumerate(chrono) if r.score is not None]
        series.append(("objective", pts, spec.scalar_direction))  # type: ignore[arg-type]
        ylabel = "objective" if spec.weights else spec.metrics[0]
    else:
        metrics = list(dict.fromkeys(m for s in board.searches for m in s.spec.metrics))
        for m in metrics:
            pts = [
                (when(r, i), r.objectives[m], r) for i, r in enumerate(chrono) if m in r.objectives
            ]
            series.append((m, pts, None))
        ylabel = "objective value"
    allpts = [p for _, pts, _ in series for p in pts]
    if not allpts:
        return _empty_plot(pid, title, "no completed trial with an objective yet")
    ax = _Axes(title, xlabel, ylabel, [p[0] for p in allpts], [p[1] for p in allpts])
    out = ax.open(pid)
    legend: list[tuple[str, str, str]] = []
    for k, (name, pts, direction) in enumerate(series):
        color = _SERIES_COLORS[k % len(_SERIES_COLORS)]
        if direction is not None:
            # The running best answers what "over time" asks: is the search still improving?
            best, path = None, []
            for x, y, _ in pts:
                if best is None or (y > best if direction == "max" else y < best):
                    if best is not None:
                        path.append(f"L{ax.x(x):.1f},{ax.y(best):.1f}")
                    best = y
                path.append(("M" if not path else "L") + f"{ax.x(x):.1f},{ax.y(best):.1f}")
            path.append(f"L{ax.x(ax.xt[-1]):.1f},{ax.y(best):.1f}")  # type: ignore[arg-type]
            out.append(
                f'<path class="best" d="{" ".join(path)}" fill="none" stroke="#555" '
                'stroke-dasharray="4 3" stroke-width="1.5"/>'
            )
            legend.append(("best so far", "#555", "line"))
        for x, y, r in pts:
            tip = f"{r.label} ({r.method}): {name} = {_fmt(y)}"
            if direction is None and len(series) > 1:
                out.append(
                    f'<circle class="pt" cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" r="4.5" '
                    f'fill="{color}"><title>{_e(tip)}</title></circle>'
                )
            else:
                out.append(_marker(r, ax.x(x), ax.y(y), tip))
        if direction is None and len(series) > 1:
            legend.append((name, color, "circle"))
    if series and series[0][2] is not None or len(series) == 1:
        legend = _method_legend([p[2] for p in allpts]) + legend
    out += _legend(legend, ax.legend_x, ax.t + 8)
    out.append("</svg>")
    return "\n".join(out)


def plot_gsm8k_vs_mmlu(board: Board) -> str:
    """GSM8K against MMLU for every completed trial, the Pareto front of the two drawn as a line."""
    pid, title = "plot-pareto", "GSM8K vs MMLU (Pareto front of the two)"
    rows = [
        r
        for r in board.rows
        if r.status == "completed" and "gsm8k" in r.objectives and "mmlu" in r.objectives
    ]
    if not rows:
        return _empty_plot(pid, title, "no completed trial with both GSM8K and MMLU yet")
    xs = [r.objectives["mmlu"] for r in rows]
    ys = [r.objectives["gsm8k"] for r in rows]
    fronts = pareto_fronts([[x, y] for x, y in zip(xs, ys)], ["max", "max"])
    ax = _Axes(title, "MMLU accuracy", "GSM8K accuracy (strict)", xs, ys)
    out = ax.open(pid)
    front = sorted((x, y) for x, y, f in zip(xs, ys, fronts) if f == 0)
    front.sort(key=lambda p: (-p[0], p[1]))
    # Staircase: the region this front dominates, from the best-MMLU point to the best-GSM8K one.
    d = [f"M{ax.x(front[0][0]):.1f},{ax.y(ax.yt[0]):.1f}"]
    for x, y in front:
        d.append(f"L{ax.x(x):.1f},{ax.y(y):.1f}")
        if (x, y) != front[-1]:
            nxt = front[front.index((x, y)) + 1]
            d.append(f"L{ax.x(nxt[0]):.1f},{ax.y(y):.1f}")
    d.append(f"L{ax.x(ax.xt[0]):.1f},{ax.y(front[-1][1]):.1f}")
    out.append(
        f'<path class="front" d="{" ".join(d)}" fill="none" stroke="#111" '
        'stroke-width="1.4" stroke-dasharray="5 3"/>'
    )
    for r, x, y, f in zip(rows, xs, ys, fronts):
        tip = (
            f"{r.label} ({r.method}"
            + (f", r={r.lora_rank}" if r.lora_rank else "")
            + f"): GSM8K {_fmt(y)}, "
            f"MMLU {_fmt(x)}" + (" — on the front" if f == 0 else "")
        )
        out.append(_marker(r, ax.x(x), ax.y(y), tip, ring=f == 0))
    legend = _method_legend(rows) + [("Pareto front", "#111", "line")]
    out += _legend(legend, ax.legend_x, ax.t + 8)
    out.append("</svg>")
    return "\n".join(out)


def param_importances(info: SearchInfo) -> tuple[dict[str, dict[str, float]], str | None]:
    """Optuna's parameter importances per objective metric, or a reason why there are none.

    Reads the study named in search.json from its storage URL. Needs at least two completed
    trials; a SQLite file that does not exist is not created (opening it would).
    """
    if not info.study_name or not info.storage_url:
        return {}, "search.json names no Optuna study (study_name and storage URL)"
    url = info.storage_url
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///") :]
        if not os.path.isfile(db):
            return {}, f"the study's database {db} does not exist"
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=info.study_name, storage=url)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(done) < 2:
            return {}, f"needs at least 2 completed trials in the study, found {len(done)}"
        out: dict[str, dict[str, float]] = {}
        n_obj = len(study.directions)
        for i in range(n_obj):
            name = info.spec.metrics[i] if i < len(info.spec.metrics) else f"objective {i}"
            target: Callable[[Any], float] | None = None
            if n_obj > 1:
                target = lambda t, i=i: t.values[i]  # noqa: E731
            out[name] = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=target
            )
        if not any(out.values()):
            return {}, "no parameter varied across the completed trials"
        return out, None
    except Exception as exc:  # importances are a nice-to-have; never lose the board over them
        return {}, f"could not compute importances: {type(exc).__name__}: {exc}"


def plot_importances(info: SearchInfo) -> str:
    """Horizontal bars of Optuna's (fANOVA) parameter importances, one group per objective."""
    pid = "plot-importance-" + re.sub(r"[^A-Za-z0-9_-]", "_", info.name)
    title = f"Parameter importances ({info.name})"
    imps, why = param_importances(info)
    if not imps:
        return _empty_plot(pid, title, f"not available: {why}")
    params = sorted(
        {p for d in imps.values() for p in d},
        key=lambda p: -max(d.get(p, 0.0) for d in imps.values()),
    )
    groups = list(imps)
    bar_h, gap = 14, 8
    left = min(260, 20 + 7 * max(len(p) for p in params))
    height = 40 + len(params) * (len(groups) * bar_h + gap) + 20 + 15 * len(groups)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{_e(pid)}" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img">',
        f"<title>{_e(title)}</title>",
        f'<text x="{_W / 2}" y="20" class="ptitle" text-anchor="middle">{_e(title)}</text>',
    ]
    y = 36
    span = _W - left - 60
    for p in params:
        out.append(
            f'<text class="tick" x="{left - 6}" y="{y + bar_h * len(groups) / 2 + 4:.1f}" '
            f'text-anchor="end">{_e(p)}</text>'
        )
        for k, g in enumerate(groups):
            v = imps[g].get(p, 0.0)
            color = _SERIES_COLORS[k % len(_SERIES_COLORS)]
            out.append(
                f'<rect class="bar" x="{left}" y="{y}" width="{max(v * span, 0.5):.1f}" '
                f'height="{bar_h - 2}" fill="{color}"><title>{_e(p)} for {_e(g)}: '
                f"{v:.3f}</title></rect>"
            )
            out.append(
                f'<text class="tick" x="{left + v * span + 4:.1f}" y="{y + bar_h - 4}">'
                f"{v:.2f}</text>"
            )
            y += bar_h
        y += gap
    if len(groups) > 1:
        out += _legend(
            [(g, _SERIES_COLORS[k % len(_SERIES_COLORS)], "square") for k, g in enumerate(groups)],
            left + 10,
            y + 8,
        )
    out.append("</svg>")
    return "\n".join(out)


def plot_loss_curves(board: Board) -> str:
    """Training loss against step for the top-ranked trials."""
    pid, title = "plot-loss", f"Training loss of the top {TOP_LOSS_CURVES} trials"
    top = [r for r in board.rows if r.loss_curve][:TOP_LOSS_CURVES]
    if not top:
        return _empty_plot(pid, title, "no trial has a loss curve yet")
    xs = [p[0] for r in top for p in r.loss_curve]
    ys = [p[1] for r in top for p in r.loss_curve]
    ax = _Axes(title, "optimizer step", "training loss", xs, ys, legend_width=230)
    out = ax.open(pid)
    legend = []
    for k, r in enumerate(top):
        color = _SERIES_COLORS[k % len(_SERIES_COLORS)]
        d = " ".join(
            ("M" if i == 0 else "L") + f"{ax.x(s):.1f},{ax.y(v):.1f}"
            for i, (s, v) in enumerate(r.loss_curve)
        )
        out.append(
            f'<path class="curve" d="{d}" fill="none" stroke="{color}" stroke-width="1.8">'
            f"<title>{_e(r.label)} (#{r.rank}, {_e(r.method)})</title></path>"
        )
        label = f"#{r.rank} {r.label} ({r.method})"
        legend.append((label if len(label) <= 34 else label[:33] + "…", color, "line"))
    out += _legend(legend, ax.legend_x, ax.t + 8)
    out.append("</svg>")
    return "\n".join(out)


# --------------------------------------------------------------------------- HTML


def json_for_script(data: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``</script>``, ``<!--`` or U+2028."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _jsonable(v: Any) -> Any:
    """NaN and inf are not JSON; they become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _cell(text: str, sort_value: Any = None, cls: str = "", title: str | None = None) -> str:
    attrs = ""
    if sort_value is not None and sort_value != "":
        attrs += f' data-v="{_e(sort_value)}"'
    if cls:
        attrs += f' class="{cls}"'
    if title:
        attrs += f' title="{_e(title)}"'
    return f"<td{attrs}>{text}</td>"


def _columns(board: Board) -> list[tuple[str, str, str, Callable[[Row], str]]]:
    """Table columns: (header, type num|text, tooltip, cell renderer)."""
    pkeys, mkeys, gkeys = _param_keys(board.rows, True), _metric_keys(board), _gain_keys(board)
    multi = len(board.searches) > 1
    cols: list[tuple[str, str, str, Callable[[Row], str]]] = []

    def rank_cell(r: Row) -> str:
        star = (
            ' <span class="badge front" title="on the Pareto front">★ front</span>'
            if r.on_pareto_front
            else ""
        )
        return _cell(f"{r.rank}{star}", r.rank, "num")

    cols.append(("#", "num", "rank by the search's objective", rank_cell))
    if multi:
        cols.append(
            (
                "search",
                "text",
                "the search this trial belongs to",
                lambda r: _cell(_e(r.search), r.search),
            )
        )
    cols.append(("trial", "text", "trial id", lambda r: _cell(_e(r.trial_id), r.trial_id, "mono")))

    def status_cell(r: Row) -> str:
        reason = f'<div class="reason">{_e(r.reason)}</div>' if r.reason else ""
        return _cell(
            f'<span class="status {_e(r.status)}">{_e(r.status.replace("_", " "))}</span>{reason}',
            r.status,
            title=r.reason,
        )

    cols.append(
        ("status", "text", "completed, early stopped (ASHA), diverged or failed", status_cell)
    )

    def method_cell(r: Row) -> str:
        badge = ' <span class="badge base">baseline</span>' if r.is_baseline else ""
        return _cell(f"{_e(r.method or '')}{badge}", r.method)

    cols.append(("method", "text", "plora, or a lora / full baseline", method_cell))
    cols.append(("r", "num", "LoRA rank", lambda r: _cell(_fmt(r.lora_rank), r.lora_rank, "num")))
    for k in pkeys:

        def pcell(r: Row, k: str = k) -> str:
            v = r.params.get(k)
            sv = v if _finite(v) else (json.dumps(v) if isinstance(v, (list, dict)) else v)
            return _cell(
                _e(_fmt(v) if not isinstance(v, (list, dict)) else json.dumps(v)),
                sv,
                "num param" if _finite(v) else "param",
            )

        cols.append(
            (
                k,
                "num"
                if all(_finite(r.params.get(k)) or k not in r.params for r in board.rows)
                else "text",
                f"sampled parameter {k}",
                pcell,
            )
        )
    for m in mkeys:
        cols.append(
            (
                m,
                "num",
                f"objective {m}",
                lambda r, m=m: _cell(_fmt(r.objectives.get(m)), r.objectives.get(m), "num"),
            )
        )
    cols.append(
        (
            "score",
            "num",
            "the search's scalar objective",
            lambda r: _cell(_fmt(r.score), r.score, "num"),
        )
    )
    for g in gkeys:

        def gcell(r: Row, g: str = g) -> str:
            v = r.gain.get(g)
            cls = "num gain " + ("pos" if v and v > 0 else "neg" if v and v < 0 else "")
            ref = r.gain_baseline.get(g)
            return _cell(_fmt_gain(v), v, cls, f"vs best baseline {ref}" if ref else None)

        cols.append(
            (
                f"gain {g}",
                "num",
                f"PLoRA minus the best lora baseline of the same rank or full ({g}); "
                "positive = PLoRA better",
                gcell,
            )
        )
    cols += [
        (
            "proxy",
            "num",
            "held-out GSM8K NLL (lower is better)",
            lambda r: _cell(_fmt(r.proxy), r.proxy, "num"),
        ),
        (
            "loss",
            "num",
            "final training loss",
            lambda r: _cell(_fmt(r.final_loss), r.final_loss, "num"),
        ),
        (
            "accel-h",
            "num",
            "accelerator-hours",
            lambda r: _cell(_fmt(r.accelerator_hours, 3), r.accelerator_hours, "num"),
        ),
        (
            "wall",
            "num",
            "wall time",
            lambda r: _cell(_fmt_duration(r.wall_time_s), r.wall_time_s, "num"),
        ),
        (
            "unloads",
            "num",
            "number of PLoRA unloads",
            lambda r: _cell(_fmt(r.num_unloads), r.num_unloads, "num"),
        ),
        (
            "ΔW rank",
            "num",
            "final effective rank of W_now − W_0 (mean over sampled layers)",
            lambda r: _cell(
                _fmt(r.effective_rank_value, 3),
                r.effective_rank_value,
                "num",
                json.dumps(r.delta_effective_rank)
                if isinstance(r.delta_effective_rank, dict)
                else None,
            ),
        ),
        (
            "checkpoint",
            "text",
            "checkpoint location",
            lambda r: _cell(_e(r.checkpoint_path or ""), r.checkpoint_path, "path"),
        ),
        (
            "model",
            "text",
            "exported model location",
            lambda r: _cell(_e(r.model_path or ""), r.model_path, "path"),
        ),
    ]
    return cols


def _table(board: Board) -> str:
    cols = _columns(board)
    head = "".join(
        f'<th data-type="{t}" title="{_e(tip)}" tabindex="0" scope="col">{_e(h)}</th>'
        for h, t, tip, _ in cols
    )
    body = []
    for r in board.rows:
        cls = ["front"] if r.on_pareto_front else []
        if r.is_baseline:
            cls.append("baseline")
        body.append(
            f'<tr class="{" ".join(cls)}" data-trial="{_e(r.label)}">'
            + "".join(render(r) for *_, render in cols)
            + "</tr>"
        )
    return f'<table id="board"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _summary(board: Board) -> str:
    parts = []
    for s in board.searches:
        counts: dict[str, int] = {}
        for r in board.rows:
            if r.search == s.name:
                counts[r.status] = counts.get(r.status, 0) + 1
        tally = (
            ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items()) or "no trials yet"
        )
        parts.append(
            f"<li><b>{_e(s.name)}</b>: {_e(s.spec.describe())}; {tally}. "
            f'<span class="path">{_e(s.path)}</span></li>'
        )
    best = board.best
    if best is not None:
        spec = board.spec_of(best)
        vals = ", ".join(f"{_e(m)} <b>{_e(_fmt(best.objectives.get(m)))}</b>" for m in spec.metrics)
        gain = "".join(
            f"; gain over the best baseline ({_e(g)}): {_e(_fmt_gain(v))}"
            for g, v in best.gain.items()
        )
        best_html = (
            f'<p class="best">Best: <b>{_e(best.label)}</b> ({_e(best.method)}'
            + (f", rank {best.lora_rank}" if best.lora_rank else "")
            + f") — {vals}"
            f"{gain}. Run it again: <code>plora-ray train best_config.yaml</code> "
            '(<a href="best_config.yaml">best_config.yaml</a>).</p>'
        )
    else:
        best_html = '<p class="best">No completed trial with an objective yet.</p>'
    scope = (
        "Trials of all searches are ranked together (same objective)."
        if board.ranked_globally or len(board.searches) == 1
        else "The searches have different objectives: each is ranked by its own, one after another."
    )
    return f'<ul class="searches">{"".join(parts)}</ul>{best_html}<p class="note">{scope}</p>'


_TEMPLATE_PATH = Path(__file__).parent / "assets" / "leaderboard.html"
_SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.S)


def render_html(board: Board) -> str:
    """The self-contained page: summary, sortable table, inline SVG plots, embedded JSON data."""
    template = _TEMPLATE_PATH.read_text(encoding="utf-8")
    m = _SCRIPT_RE.search(template)
    assert m, "the template has an inline <script>"
    # Content-Security-Policy allows exactly our inline script (by hash): defence in depth on top of
    # escaping, and it also proves the page needs no network (default-src 'none').
    digest = base64.b64encode(hashlib.sha256(m.group(1).encode("utf-8")).digest()).decode()
    plots = [
        plot_objective_over_time(board),
        plot_gsm8k_vs_mmlu(board),
        *[plot_importances(s) for s in board.searches],
        plot_loss_curves(board),
    ]
    warnings = "".join(f"<li>{_e(w)}</li>" for w in board.warnings)
    names = ", ".join(s.name for s in board.searches)
    values = {
        "title": _e(f"Leaderboard: {names}"),
        "csp_script_hash": f"sha256-{digest}",
        "generated_at": _e(board.generated_at),
        "summary": _summary(board),
        "warnings": f'<ul class="warnings">{warnings}</ul>' if warnings else "",
        "table": _table(board),
        "plots": "\n".join(f"<figure>{p}</figure>" for p in plots),
        "data_json": json_for_script(_jsonable(board.to_dict())),
        "count": str(len(board.rows)),
    }
    # One pass over the template: text substituted in is never scanned for placeholders again,
    # so a trial param spelled "{{data_json}}" stays literal text.
    return re.sub(r"\{\{(\w+)\}\}", lambda mm: values[mm.group(1)], template)


# --------------------------------------------------------------------------- publishing


def write_board(board: Board, out_dir: str | os.PathLike[str]) -> Path | str:
    """Write the five leaderboard files into ``out_dir`` (local path or cloud URI), atomically each.

    Everything is rendered before the first write, so a rendering error changes nothing on disk.

    Returns:
        the output directory (a Path, or the URI string for cloud storage).
    """
    out = str(out_dir)
    store = _Store(out)
    rendered = {
        "leaderboard.json": json.dumps(
            _jsonable(board.to_dict()), indent=1, ensure_ascii=False, allow_nan=False, default=str
        )
        + "\n",
        "leaderboard.csv": render_csv(board),
        "leaderboard.md": render_markdown(board),
        "index.html": render_html(board),
    }
    best_yaml = render_best_config(board)
    if best_yaml is not None:
        rendered["best_config.yaml"] = best_yaml
    store.remove_stale_temps(OUTPUT_FILES)
    for name, text in rendered.items():
        store.write_atomic(name, [text.encode("utf-8")])
    return store.display() if _is_uri(out) else Path(store.display())


def _check_best_config(board: Board) -> None:
    """Warn on the board when the best config would not validate here (e.g. a cluster-only path)."""
    best = board.best
    if best is None or not best.config:
        return
    from plora_ray.config import ConfigError, config_from_dict

    try:
        config_from_dict(
            {k: v for k, v in best.config.items() if k != "search"}, source="best_config.yaml"
        )
    except ConfigError as exc:
        board.warnings.append(
            f"best_config.yaml does not validate on this machine: {'; '.join(exc.problems)}"
        )


def publish(search_dir: str | os.PathLike[str]) -> Path | str:
    """Rebuild ``<search_dir>/leaderboard/`` from the search's records.

    The search calls this after each finished trial and at its end.

    Args:
        search_dir: the search directory (local path or s3:// / gs:// URI).

    Returns:
        the leaderboard directory (a Path, or the URI string for cloud storage).

    Raises:
        LeaderboardError: ``search_dir`` is not a search directory or its search.json is unusable.
    """
    board = build_leaderboard([search_dir])
    _check_best_config(board)
    base = str(search_dir).rstrip("/")
    return write_board(board, f"{base}/{LEADERBOARD_DIR}")


def leaderboard_command(paths: Sequence[str], out: str | None) -> int:
    """``plora-ray leaderboard PATH... [--out DIR]``: rebuild and (for several searches) merge.

    With one search and no ``--out`` the board goes to ``<search>/leaderboard/``; with several it
    goes to ``--out`` (default ``./leaderboard``).
    """
    try:
        dirs = _expand(list(paths))
        board = build_leaderboard(dirs)
    except LeaderboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _check_best_config(board)
    if out is None:
        out = f"{dirs[0].rstrip('/')}/{LEADERBOARD_DIR}" if len(dirs) == 1 else LEADERBOARD_DIR
    where = write_board(board, out)
    for w in board.warnings:
        print(f"warning: {w}", file=sys.stderr)
    best = board.best
    print(
        f"leaderboard: {len(board.rows)} trial(s) from {len(board.searches)} search(es) -> "
        f"{where}/index.html"
    )
    if best is not None:
        print(
            f"best: {best.label} ({best.method}), "
            + ", ".join(f"{m}={_fmt(best.objectives.get(m))}" for m in board.spec_of(best).metrics)
            + f"; config: {where}/best_config.yaml"
        )
    return 0


__all__ = [
    "Board",
    "LeaderboardError",
    "ObjectiveSpec",
    "Row",
    "SearchInfo",
    "atomic_write",
    "baseline_gains",
    "build_leaderboard",
    "json_for_script",
    "leaderboard_command",
    "nice_ticks",
    "pareto_fronts",
    "parse_objective_spec",
    "publish",
    "rank_rows",
    "render_csv",
    "render_html",
    "render_markdown",
    "write_board",
]
