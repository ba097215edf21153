"""Writing a board: the five files of ``<search_dir>/leaderboard/``, and the CLI command.

The five files are published together (``generations``: a new generation directory written
whole, then one pointer swap), so a reader sees the previous board or the new one, never a mix,
and a search that crashes leaves its last good board.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from plora_ray.config import ConfigError, config_from_dict
from plora_ray.leaderboard.board import (
    Board,
    LeaderboardError,
    build_leaderboard,
    expand,
    jsonable,
)
from plora_ray.leaderboard.generations import publish_generation
from plora_ray.leaderboard.html import render_html
from plora_ray.leaderboard.tables import (
    fmt_value,
    render_best_config,
    render_csv,
    render_markdown,
)
from plora_ray.store import Store, is_uri

__all__ = ["LEADERBOARD_DIR", "OUTPUT_FILES", "leaderboard_command", "publish", "write_board"]

LEADERBOARD_DIR = "leaderboard"
OUTPUT_FILES = (
    "leaderboard.json",
    "leaderboard.csv",
    "leaderboard.md",
    "index.html",
    "best_config.yaml",
)


def write_board(board: Board, out_dir: str | os.PathLike[str]) -> Path | str:
    """Publish the five leaderboard files into ``out_dir`` (local path or cloud URI) as one unit.

    Everything is rendered before the first write, so a rendering error changes nothing on disk.

    Args:
        board: the ranked board.
        out_dir: the directory to write into (created when missing).

    Returns:
        The output directory (a Path, or the URI string for cloud storage).
    """
    out = str(out_dir)
    store = Store(out)
    rendered = {
        "leaderboard.json": json.dumps(
            jsonable(board.to_dict()), indent=1, ensure_ascii=False, allow_nan=False, default=str
        )
        + "\n",
        "leaderboard.csv": render_csv(board),
        "leaderboard.md": render_markdown(board),
        "index.html": render_html(board, store.display()),
    }
    best_yaml = render_best_config(board)
    if best_yaml is not None:
        rendered["best_config.yaml"] = best_yaml
    store.remove_stale_temps(OUTPUT_FILES)  # per-file temps of an older plora-ray's publisher
    publish_generation(out, rendered, OUTPUT_FILES)
    return store.display() if is_uri(out) else Path(store.display())


def _check_best_config(board: Board) -> None:
    """Warn on the board when the best config would not validate here (e.g. a cluster-only path)."""
    best = board.best
    if best is None or not best.record.config:
        return
    try:
        config_from_dict(
            {k: v for k, v in best.record.config.items() if k != "search"},
            source="best_config.yaml",
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
        The leaderboard directory (a Path, or the URI string for cloud storage).

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

    Args:
        paths: search directories, or storage directories holding searches.
        out: where to write the board; None for the default above.

    Returns:
        The exit status: 0, or 2 when a path is not a usable search.
    """
    try:
        dirs = expand(list(paths))
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
        metrics = board.spec_of(best).metrics
        print(
            f"best: {best.label} ({best.record.method}), "
            + ", ".join(f"{m}={fmt_value(best.record.objectives.get(m))}" for m in metrics)
            + f"; config: {where}/best_config.yaml"
        )
    return 0
