"""The lineage of ``pbt_unload`` trials on the board: which trial forked from which, at which
unload, with which settings (``TrialRecord.lineage``, entries as ``plora_ray.pbt`` writes them).

Plain text here; each format (HTML, Markdown, CSV, the YAML comments of ``best_config.yaml``)
escapes it its own way. Records of other schedulers have no lineage and nothing is shown.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from plora_ray.leaderboard.board import Board
from plora_ray.leaderboard.rank import Row

__all__ = [
    "LINEAGE_TOP",
    "compact_lineage",
    "describe_entry",
    "describe_settings",
    "lineage_rows",
]

# The board shows the lineage of this many top trials (every record keeps its own in the JSON).
LINEAGE_TOP = 5


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe_settings(entry: Mapping[str, Any]) -> str:
    """``optim.lr=0.0036 (* 1.2), plora.momentum=0.1 (resampled)``: an entry's settings and how
    each was changed."""
    settings = entry.get("settings") if isinstance(entry.get("settings"), Mapping) else {}
    changes = entry.get("changes") if isinstance(entry.get("changes"), Mapping) else {}
    parts = []
    for k, v in (settings or {}).items():
        how = (changes or {}).get(k)
        parts.append(f"{k}={_num(v)}" + (f" ({how})" if how else ""))
    return ", ".join(parts) or "no settings changed"


def describe_entry(entry: Mapping[str, Any]) -> str:
    """One stage of a lineage as a sentence."""
    stage = entry.get("stage")
    trial = entry.get("trial")
    if entry.get("parent") is None:
        return f"stage {stage}: trial {trial} started with {describe_settings(entry)}"
    own = entry.get("proxy")
    parent_proxy = entry.get("parent_proxy")
    return (
        f"stage {stage} (step {entry.get('step')}, {entry.get('samples')} samples): trial "
        f"{trial}{f' (proxy {_num(own)})' if own is not None else ''} took the unload checkpoint "
        f"of {entry.get('parent')}"
        f"{f' (proxy {_num(parent_proxy)})' if parent_proxy is not None else ''}; "
        f"{describe_settings(entry)}"
    )


def compact_lineage(lineage: Sequence[Mapping[str, Any]]) -> str:
    """A lineage in one cell: ``s0 a1b2; s2 c3d4<-a1b2 optim.lr=0.0036 (* 1.2)``."""
    parts = []
    for e in lineage:
        head = f"s{e.get('stage')} {e.get('trial')}"
        if e.get("parent") is not None:
            head += f"<-{e.get('parent')} {describe_settings(e)}"
        parts.append(head)
    return "; ".join(parts)


def lineage_rows(board: Board, top: int = LINEAGE_TOP) -> list[Row]:
    """The board's top ``top`` completed trials that carry a lineage, in board order (all of
    them when none completed); empty for a board without ``pbt_unload`` trials."""
    with_lineage = [r for r in board.rows if r.record.lineage]
    completed = [r for r in with_lineage if r.record.status == "completed"]
    return (completed or with_lineage)[:top]
