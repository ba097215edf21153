"""The board as text: cell formatting, the columns shown, CSV, Markdown and ``best_config.yaml``.

User-written text (trial ids, params, reasons, search names) is made harmless for each format: a
spreadsheet formula in the CSV is defused, HTML in the Markdown is shown rather than rendered, and
a newline cannot add keys to the YAML through its header comments.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Sequence
from typing import Any

import yaml

from plora_ray.leaderboard.board import Board, Cost
from plora_ray.leaderboard.lineage import compact_lineage, describe_entry, lineage_rows
from plora_ray.leaderboard.rank import Row
from plora_ray.objective import OBJECTIVE_METRICS

__all__ = [
    "ACCURACY_METRICS",
    "describe_cost",
    "escape",
    "fmt_duration",
    "fmt_gain",
    "fmt_value",
    "gain_keys",
    "metric_keys",
    "param_keys",
    "render_best_config",
    "render_csv",
    "render_markdown",
]

# The metrics shown as columns in their own order; the NLLs are listed only in the CSV (sorted,
# after these), the final loss has a column of its own.
ACCURACY_METRICS = tuple(
    m for m in OBJECTIVE_METRICS if not m.endswith("_nll") and m != "final_loss"
)
# The Markdown summary keeps to the headline metrics (the MMLU subjects would make it too wide).
_MARKDOWN_METRICS = ("gsm8k", "gsm8k_flexible", "mmlu", "arc_easy", "arc_challenge")


def escape(v: Any) -> str:
    """``str(v)`` escaped for HTML text and attribute values."""
    return html.escape(str(v), quote=True)


def fmt_value(v: Any, digits: int = 4) -> str:
    """A cell's text: empty for None, ``digits`` significant digits for a float."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def fmt_duration(s: float | None) -> str:
    """``42 s``, ``3:05`` or ``1:02:03``."""
    if s is None:
        return ""
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def fmt_gain(v: float | None) -> str:
    """A signed gain: ``+0.05``, ``-0.02``."""
    return "" if v is None else f"{v:+.4g}"


def describe_cost(cost: Cost) -> str:
    """One sentence: total accelerator-hours and trial wall time, and the time to the best trial.

    Plain text; each format escapes it its own way.
    """
    hours = (
        f"{fmt_value(cost.accelerator_hours, 3)} accelerator-hours"
        if cost.accelerator_hours is not None
        else "accelerator-hours not reported"
    )
    wall = (
        f"{fmt_duration(cost.wall_time_s)} of trial wall time"
        if cost.wall_time_s is not None
        else "trial wall time not reported"
    )
    if cost.time_to_best_s is not None:
        to_best = (
            f"time to best: {fmt_duration(cost.time_to_best_s)} "
            f"(from the search's first trial start to the end of {cost.best})"
        )
    elif cost.best is not None:
        to_best = "time to best: unknown (the records lack start or end times)"
    else:
        to_best = "no best trial yet"
    return f"Total cost: {hours}, {wall} over {cost.num_trials} trial(s); {to_best}."


def param_keys(rows: Sequence[Row], table: bool = False) -> list[str]:
    """Sampled parameter names; the table leaves out ``method`` (it has its own column)."""
    keys: list[str] = []
    for r in rows:
        for k in r.record.params:
            if k not in keys and not (table and k == "method"):
                keys.append(k)
    return sorted(keys)


def metric_keys(board: Board, every: bool = False) -> list[str]:
    """Objective columns: the standard ones any trial has, then other metrics of the specs, then
    (``every``) whatever else the records hold (NLLs), except the final loss (its own column)."""
    present = {k for r in board.rows for k in r.record.objectives}
    keys = [m for m in ACCURACY_METRICS if m in present]
    for s in board.searches:
        keys.extend(m for m in s.spec.metrics if m not in keys)
    if every:
        keys.extend(sorted(present - set(keys) - {"final_loss"}))
    return keys


def gain_keys(board: Board) -> list[str]:
    """Gain columns: ``objective`` for scalar searches, each metric for multi-metric ones."""
    keys: list[str] = []
    for s in board.searches:
        if not s.spec.pareto and "objective" not in keys:
            keys.append("objective")
        keys.extend(m for m in s.spec.metrics if m not in keys and len(s.spec.metrics) > 1)
    if not keys:
        keys = ["objective"]
    return keys


# --------------------------------------------------------------------------- CSV


def _csv_safe(v: Any) -> Any:
    # A spreadsheet runs a cell starting with = + - @ as a formula; user text (params, reasons)
    # is defused with a leading quote. Numbers stay numbers.
    if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + v
    return v


def render_csv(board: Board) -> str:
    """One line per trial, in board order; params and objectives as their own columns."""
    pkeys, mkeys, gkeys = param_keys(board.rows), metric_keys(board, True), gain_keys(board)
    has_lineage = any(r.record.lineage for r in board.rows)
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
        + (["lineage"] if has_lineage else [])
    )
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in board.rows:
        rec = r.record
        params = [rec.params.get(k) for k in pkeys]
        w.writerow(
            [
                _csv_safe(v)
                for v in [
                    r.rank,
                    r.search,
                    rec.trial_id,
                    rec.status,
                    rec.reason,
                    rec.method,
                    rec.lora_rank,
                    r.is_baseline,
                    r.on_pareto_front,
                    r.score,
                    *[json.dumps(v) if isinstance(v, (list, dict)) else v for v in params],
                    *[rec.objectives.get(k) for k in mkeys],
                    *[r.gain.get(k) for k in gkeys],
                    rec.proxy,
                    rec.final_loss,
                    rec.accelerator_hours,
                    rec.wall_time_s,
                    rec.num_unloads,
                    r.effective_rank_value,
                    rec.checkpoint_path,
                    rec.model_path,
                    rec.started_at,
                    rec.ended_at,
                    *([compact_lineage(rec.lineage)] if has_lineage else []),
                ]
            ]
        )
    return buf.getvalue()


# --------------------------------------------------------------------------- Markdown


def _md(v: Any) -> str:
    text = fmt_value(v) if not isinstance(v, str) else v
    # Keep a cell a cell: no pipes or newlines; HTML in user text shown, not rendered.
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def render_markdown(board: Board) -> str:
    """A readable summary: the objective, the best trial, and the ranked table."""
    mkeys = [m for m in _MARKDOWN_METRICS if m in metric_keys(board)]
    for s in board.searches:
        mkeys.extend(m for m in s.spec.metrics if m not in mkeys)
    gkeys = gain_keys(board)
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
            f"Best: **{_md(best.label)}** ({_md(best.record.method)}"
            + (f", rank {best.record.lora_rank}" if best.record.lora_rank else "")
            + "), "
            + ", ".join(
                f"{m} {fmt_value(best.record.objectives.get(m))}"
                for m in board.spec_of(best).metrics
            )
            + ". Run it again: `plora-ray train best_config.yaml`."
        )
    else:
        lines.append("No completed trial with an objective yet.")
    lines += ["", _md(describe_cost(board.cost))]
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
        rec = r.record
        status = rec.status + (f": {rec.reason}" if rec.reason else "")
        rank = f"{r.rank}{' ★' if r.on_pareto_front else ''}"
        method = (rec.method or "") + (" (baseline)" if r.is_baseline else "")
        params = ", ".join(f"{k}={fmt_value(v)}" for k, v in sorted(rec.params.items()))
        cells = (
            [rank, r.search, rec.trial_id, status, method, rec.lora_rank, params]
            + [rec.objectives.get(m) for m in mkeys]
            + [r.score]
            + [fmt_gain(r.gain.get(g)) for g in gkeys]
            + [
                rec.proxy,
                rec.final_loss,
                rec.accelerator_hours,
                fmt_duration(rec.wall_time_s),
                rec.num_unloads,
                r.effective_rank_value,
                rec.model_path,
            ]
        )
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    if any(s.spec.pareto for s in board.searches):
        lines += ["", "★ on the Pareto front."]
    top = lineage_rows(board)
    if top:
        lines += ["", "## Lineage", "", "Top trials, stage by stage (pbt_unload forks at unloads):"]
        for r in top:
            lines += ["", f"- **{_md(r.label)}** (rank {r.rank}, {_md(r.record.status)})"]
            lines += [f"  - {_md(describe_entry(e))}" for e in r.record.lineage]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- best config


def _one_line(text: str) -> str:
    # User-written names go into YAML comments: any line break there would add YAML keys, and
    # YAML 1.1 (PyYAML) breaks lines at U+0085, U+2028 and U+2029 too, not only at \n and \r.
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", " ", text)


def render_best_config(board: Board) -> str | None:
    """The best trial's run config as YAML that ``plora-ray train`` runs as is (no search block).

    None when no trial has finished with an objective and a config.
    """
    best = board.best
    if best is None or not best.record.config:
        return None
    cfg = {k: v for k, v in best.record.config.items() if k != "search"}
    spec = board.spec_of(best)
    header = [
        "# Best configuration of the search, exported by plora-ray's leaderboard.",
        f"# search: {_one_line(best.search)}   trial: {_one_line(best.record.trial_id)}   "
        f"rank: {best.rank}",
        f"# objective: {_one_line(spec.describe())}: "
        + ", ".join(f"{m}={fmt_value(best.record.objectives.get(m))}" for m in spec.metrics),
        "# Run it:  plora-ray train best_config.yaml",
    ]
    if best.record.lineage:
        # A pbt_unload winner: its per-stage schedule (plora.stages below) came from these forks.
        header.append("# lineage (pbt_unload), replayed by plora.stages from step 0:")
        header += [f"#   {_one_line(describe_entry(e))}" for e in best.record.lineage]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False)
