"""Reading search directories into one ranked board.

Input is a search directory as the search writes it (``plora_ray.store``):
``<storage>/<name>/search.json`` and ``trials/<trial_id>.json``, one record per finished trial,
each written atomically.

Several searches merge into one board: when all share the same objective they are ranked together
(baselines from any of them count); otherwise each is ranked by its own objective and the board
lists them one after another. Every row names its search.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from plora_ray.leaderboard.rank import Row, baseline_gains, rank_rows, to_epoch
from plora_ray.objective import ObjectiveError, ObjectiveSpec
from plora_ray.store import Store, TrialRecord, read_records

__all__ = [
    "FORMAT_VERSION",
    "Board",
    "Cost",
    "LeaderboardError",
    "SearchInfo",
    "build_leaderboard",
    "cost_of",
    "expand",
    "jsonable",
]

# The version of leaderboard.json (docs/leaderboard_json.md); bumped when a field changes meaning
# or goes away, so a reader can tell which fields to expect. 2 added cost, run_dir, metrics_path.
FORMAT_VERSION = 2


class LeaderboardError(ValueError):
    """A search directory that cannot be read (missing, no search.json, bad objective spec)."""


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


@dataclass
class SearchInfo:
    """One search directory as read from its ``search.json``."""

    name: str
    path: str
    spec: ObjectiveSpec
    study_name: str | None = None
    storage_url: str | None = None
    num_records: int = 0
    # ``--resume --extend`` of the search, each "key old -> new (when)" (search.json extensions).
    extensions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The search as listed in ``leaderboard.json``."""
        spec = self.spec
        return {
            "name": self.name,
            "path": self.path,
            "objective": {
                "metrics": list(spec.metrics),
                # leaderboard.json has always said max/min; its readers keep working.
                "directions": ["max" if d == "maximize" else "min" for d in spec.directions],
                "weights": list(spec.weights) if spec.weights else None,
                "pareto": spec.pareto,
                "description": spec.describe(),
            },
            "study_name": self.study_name,
            "storage_url": self.storage_url,
            "num_trials": self.num_records,
        }


@dataclass(frozen=True)
class Cost:
    """What a set of trials cost, and how long their search took to reach its best trial.

    ``accelerator_hours`` and ``wall_time_s`` are sums over the trials that report them (None when
    none does: unknown is not zero). ``time_to_best_s`` runs from the first trial start of the best
    trial's search to the end of that trial: how long the search needed to find what it found.
    """

    num_trials: int
    accelerator_hours: float | None
    wall_time_s: float | None
    time_to_best_s: float | None
    best: str | None

    def to_dict(self) -> dict[str, Any]:
        """The cost as written to ``leaderboard.json``."""
        return {
            "num_trials": self.num_trials,
            "accelerator_hours": self.accelerator_hours,
            "wall_time_s": self.wall_time_s,
            "time_to_best_s": self.time_to_best_s,
            "best": self.best,
        }


def _sum_known(values: Sequence[Any]) -> float | None:
    known = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(known) if known else None


def _trial_start(rec: TrialRecord) -> float | None:
    # A record without started_at still says when it ended and how long it ran.
    start = to_epoch(rec.started_at)
    end = to_epoch(rec.ended_at)
    if start is None and end is not None and rec.wall_time_s is not None:
        start = end - rec.wall_time_s
    return start


def cost_of(rows: Sequence[Row], best: Row | None) -> Cost:
    """Total cost of ``rows`` and the time to ``best`` (see ``Cost``).

    Args:
        rows: the trials to add up.
        best: the best trial among them, or None when there is none yet.
    """
    time_to_best = None
    if best is not None:
        starts = [_trial_start(r.record) for r in rows if r.search == best.search]
        known = [t for t in starts if t is not None]
        end = to_epoch(best.record.ended_at)
        if known and end is not None:
            time_to_best = max(0.0, end - min(known))
    return Cost(
        num_trials=len(rows),
        accelerator_hours=_sum_known([r.record.accelerator_hours for r in rows]),
        wall_time_s=_sum_known([r.record.wall_time_s for r in rows]),
        time_to_best_s=time_to_best,
        best=best.label if best is not None else None,
    )


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
        return self.best_of(None)

    def best_of(self, search: str | None) -> Row | None:
        """The top completed trial with an objective of one search (None: of the whole board)."""
        for r in self.rows:
            if search is not None and r.search != search:
                continue
            if r.record.status == "completed" and (r.score is not None or r.front is not None):
                return r
        return None

    def search_of(self, row: Row) -> SearchInfo:
        """The search ``row`` is listed under."""
        for s in self.searches:
            if s.name == row.search:
                return s
        return self.searches[0]

    def spec_of(self, row: Row) -> ObjectiveSpec:
        """The objective ``row`` was ranked by (its search's)."""
        return self.search_of(row).spec

    @property
    def cost(self) -> Cost:
        """Total cost of every trial on the board and the time to the board's best trial."""
        return cost_of(self.rows, self.best)

    def cost_of_search(self, name: str) -> Cost:
        """Total cost of one search's trials and the time to that search's best trial."""
        return cost_of([r for r in self.rows if r.search == name], self.best_of(name))

    def to_dict(self) -> dict[str, Any]:
        """The board as written to ``leaderboard.json`` and embedded in the HTML page."""
        best = self.best
        return {
            "format": "plora-ray leaderboard",
            "version": FORMAT_VERSION,
            "generated_at": self.generated_at,
            "ranked_globally": self.ranked_globally,
            "searches": [
                {**s.to_dict(), "cost": self.cost_of_search(s.name).to_dict()}
                for s in self.searches
            ],
            "best": {"search": best.search, "trial_id": best.record.trial_id} if best else None,
            "cost": self.cost.to_dict(),
            "warnings": self.warnings,
            "rows": [r.to_dict() for r in self.rows],
        }


def jsonable(v: Any) -> Any:
    """``v`` with NaN and inf (not JSON) turned into null, at any depth."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def _read_search(store: Store, warnings: list[str]) -> tuple[SearchInfo, list[Row]]:
    """The search's ``search.json`` and its usable trial records; each skipped record is named
    in ``warnings``.

    Raises:
        LeaderboardError: no search directory there, or a missing or unusable search.json.
    """
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
    try:
        spec = ObjectiveSpec.from_dict(meta, where)
    except ObjectiveError as exc:
        raise LeaderboardError(str(exc)) from exc
    name = str(meta.get("name") or os.path.basename(store.base.rstrip("/")))
    optuna_meta: dict[str, Any] = meta["optuna"] if isinstance(meta.get("optuna"), dict) else {}
    info = SearchInfo(
        name=name,
        path=store.display(),
        spec=spec,
        study_name=_opt_str(meta.get("study_name") or optuna_meta.get("study_name")),
        storage_url=_opt_str(
            meta.get("storage_url")
            or meta.get("optuna_storage")
            or optuna_meta.get("storage_url")
            or optuna_meta.get("storage")
        ),
    )
    info.extensions = [
        f"{e.get('key')} {e.get('old')} -> {e.get('new')} ({e.get('at')})"
        for e in meta.get("extensions") or []
        if isinstance(e, dict)
    ]
    rows = [Row(rec, name) for rec in read_records(store, warnings)]
    info.num_records = len(rows)
    return info, rows


def expand(paths: Sequence[str]) -> list[str]:
    """Search directories: each path itself, or its subdirectories holding search.json.

    Raises:
        LeaderboardError: a directory that is neither a search nor holds any.
    """
    out: list[str] = []
    for p in paths:
        store = Store(p)
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
    for d in expand([str(p) for p in search_dirs]):
        store = Store(d)
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
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return Board(searches, ordered, same_spec, warnings, now)
