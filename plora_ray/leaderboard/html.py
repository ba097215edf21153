"""The self-contained HTML page: summary, sortable table, inline SVG plots, embedded JSON data.

Everything user-written shown in the page is escaped; the JSON embedded for the page's script
cannot close its ``<script>`` element; and the page's Content-Security-Policy allows exactly its
own inline script (by hash) and no network at all.

The table starts with what a reader looks for first: rank, trial, status and the objective, so
the objective is on screen without scrolling sideways. A trial's run directory, metrics.jsonl and
exported model are links relative to the page's folder when the page and the files lie under the
same storage directory (the page keeps working when that directory is copied or served as a
whole); elsewhere (a cloud URI, another machine's path) they are plain text, never ``file://``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Callable
from importlib import resources
from typing import Any

from plora_ray.config.conversion import is_finite_number
from plora_ray.leaderboard.board import Board, jsonable
from plora_ray.leaderboard.lineage import LINEAGE_TOP, describe_settings, lineage_rows
from plora_ray.leaderboard.plots import (
    plot_gsm8k_vs_mmlu,
    plot_importances,
    plot_loss_curves,
    plot_objective_over_time,
)
from plora_ray.leaderboard.rank import Row
from plora_ray.leaderboard.tables import (
    describe_cost,
    escape,
    fmt_duration,
    fmt_gain,
    fmt_value,
    gain_keys,
    metric_keys,
    param_keys,
)
from plora_ray.store import is_uri

__all__ = ["json_for_script", "relative_href", "render_html"]


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


def _cell(text: str, sort_value: Any = None, cls: str = "", title: str | None = None) -> str:
    attrs = ""
    if sort_value is not None and sort_value != "":
        attrs += f' data-v="{escape(sort_value)}"'
    if cls:
        attrs += f' class="{cls}"'
    if title:
        attrs += f' title="{escape(title)}"'
    return f"<td{attrs}>{text}</td>"


def _local_dir(path: str | None) -> str | None:
    """``path`` as a normalised absolute local path; None for a URI or a relative path."""
    if not path or is_uri(path):
        return None
    path = path[len("file://") :] if path.startswith("file://") else path
    return os.path.normpath(path) if os.path.isabs(path) else None


def _is_under(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def relative_href(target: str | None, board_dir: str | None, root: str | None) -> str | None:
    """The URL-quoted link from ``board_dir`` to ``target`` when both lie under ``root``.

    None (shown as plain text) when any of them is not a local absolute path, or when the board or
    the target is outside ``root``: a link there would break as soon as the board is moved, or
    point into another machine's file system.

    Args:
        target: the file or directory to link to, as the trial record names it.
        board_dir: the folder the page is written to.
        root: the directory both must lie under (the storage directory of the trial's search).
    """
    t, b, r = _local_dir(target), _local_dir(board_dir), _local_dir(root)
    if t is None or b is None or r is None or not (_is_under(t, r) and _is_under(b, r)):
        return None
    # quote() turns every character that means something in a URL (# ? : % space) into %XX, so
    # the href is a relative path and nothing else; a "javascript:" name becomes harmless text.
    return urllib.parse.quote(os.path.relpath(t, b).replace(os.sep, "/"), safe="/")


def _file_links(links: list[tuple[str, str | None, str | None, bool]]) -> str:
    """Links ``(text, target, href, is_dir)`` joined by a dot; the first target without an href
    is shown as plain text instead (nothing to link to from here)."""
    parts = []
    for text, target, href, is_dir in links:
        if not target:
            continue
        if href is None:
            return escape(target)
        href += "/" if is_dir and not href.endswith("/") else ""
        parts.append(f'<a href="{escape(href)}" title="{escape(target)}">{escape(text)}</a>')
    return " · ".join(parts)


def _columns(
    board: Board, board_dir: str | None
) -> list[tuple[str, str, str, Callable[[Row], str]]]:
    """Table columns: (header, type num|text, tooltip, cell renderer)."""
    pkeys, mkeys, gkeys = param_keys(board.rows, True), metric_keys(board), gain_keys(board)
    # The objective right after the status: the scalar objective of scalar searches, and the
    # metrics of multi-metric ones (a Pareto search has no scalar; its front is marked in "#").
    scalar = any(not s.spec.pareto for s in board.searches)
    lead_metrics: list[str] = []
    for s in board.searches:
        if s.spec.pareto or len(s.spec.metrics) > 1:
            lead_metrics.extend(m for m in s.spec.metrics if m not in lead_metrics)
    mkeys = [m for m in mkeys if m not in lead_metrics]
    multi = len(board.searches) > 1
    cols: list[tuple[str, str, str, Callable[[Row], str]]] = []

    def href(r: Row, target: str | None) -> str | None:
        path = board.search_of(r).path
        root = os.path.dirname(path.rstrip("/")) if _local_dir(path) else None
        return relative_href(target, board_dir, root)

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
                lambda r: _cell(escape(r.search), r.search),
            )
        )
    cols.append(
        (
            "trial",
            "text",
            "trial id",
            lambda r: _cell(escape(r.record.trial_id), r.record.trial_id, "mono"),
        )
    )

    def status_cell(r: Row) -> str:
        status, reason = r.record.status, r.record.reason
        note = f'<div class="reason">{escape(reason)}</div>' if reason else ""
        text = escape(status.replace("_", " "))
        return _cell(
            f'<span class="status {escape(status)}">{text}</span>{note}', status, title=reason
        )

    cols.append(
        ("status", "text", "completed, early stopped (ASHA), diverged or failed", status_cell)
    )

    def metric_cell(m: str) -> Callable[[Row], str]:
        def render(r: Row) -> str:
            v = r.record.objectives.get(m)
            return _cell(fmt_value(v), v, "num")

        return render

    if scalar:
        cols.append(
            (
                "objective",
                "num",
                "the search's objective: "
                + "; ".join(s.spec.describe() for s in board.searches if not s.spec.pareto),
                lambda r: _cell(fmt_value(r.score), r.score, "num objective"),
            )
        )
    for m in lead_metrics:
        cols.append((m, "num", f"objective {m}", metric_cell(m)))

    def method_cell(r: Row) -> str:
        badge = ' <span class="badge base">baseline</span>' if r.is_baseline else ""
        return _cell(f"{escape(r.record.method or '')}{badge}", r.record.method)

    cols.append(("method", "text", "plora, or a lora / full baseline", method_cell))
    cols.append(
        (
            "r",
            "num",
            "LoRA rank",
            lambda r: _cell(fmt_value(r.record.lora_rank), r.record.lora_rank, "num"),
        )
    )
    for k in pkeys:

        def pcell(r: Row, k: str = k) -> str:
            v = r.record.params.get(k)
            sv = v if is_finite_number(v) else (json.dumps(v) if isinstance(v, (list, dict)) else v)
            return _cell(
                escape(fmt_value(v) if not isinstance(v, (list, dict)) else json.dumps(v)),
                sv,
                "num param" if is_finite_number(v) else "param",
            )

        cols.append(
            (
                k,
                "num"
                if all(
                    is_finite_number(r.record.params.get(k)) or k not in r.record.params
                    for r in board.rows
                )
                else "text",
                f"sampled parameter {k}",
                pcell,
            )
        )
    for m in mkeys:
        cols.append((m, "num", f"objective {m}", metric_cell(m)))
    for g in gkeys:

        def gcell(r: Row, g: str = g) -> str:
            v = r.gain.get(g)
            cls = "num gain " + ("pos" if v and v > 0 else "neg" if v and v < 0 else "")
            ref = r.gain_baseline.get(g)
            return _cell(fmt_gain(v), v, cls, f"vs best baseline {ref}" if ref else None)

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
            lambda r: _cell(fmt_value(r.record.proxy), r.record.proxy, "num"),
        ),
        (
            "loss",
            "num",
            "final training loss",
            lambda r: _cell(fmt_value(r.record.final_loss), r.record.final_loss, "num"),
        ),
        (
            "accel-h",
            "num",
            "accelerator-hours",
            lambda r: _cell(
                fmt_value(r.record.accelerator_hours, 3), r.record.accelerator_hours, "num"
            ),
        ),
        (
            "wall",
            "num",
            "wall time",
            lambda r: _cell(fmt_duration(r.record.wall_time_s), r.record.wall_time_s, "num"),
        ),
        (
            "unloads",
            "num",
            "number of PLoRA unloads",
            lambda r: _cell(fmt_value(r.record.num_unloads), r.record.num_unloads, "num"),
        ),
        (
            "ΔW rank",
            "num",
            "final effective rank of W_now − W_0 (mean over sampled layers)",
            lambda r: _cell(
                fmt_value(r.effective_rank_value, 3),
                r.effective_rank_value,
                "num",
                json.dumps(r.record.delta_effective_rank)
                if isinstance(r.record.delta_effective_rank, dict)
                else None,
            ),
        ),
        (
            "checkpoint",
            "text",
            "checkpoint location",
            lambda r: _cell(
                escape(r.record.checkpoint_path or ""), r.record.checkpoint_path, "path"
            ),
        ),
        (
            "run",
            "text",
            "the trial's run directory and its metrics.jsonl",
            lambda r: _cell(
                _file_links(
                    [
                        ("run", r.record.run_dir, href(r, r.record.run_dir), True),
                        ("metrics", r.metrics_path, href(r, r.metrics_path), False),
                    ]
                ),
                r.record.run_dir,
                "path",
            ),
        ),
        (
            "model",
            "text",
            "exported model location",
            lambda r: _cell(
                _file_links([("model", r.record.model_path, href(r, r.record.model_path), True)]),
                r.record.model_path,
                "path",
            ),
        ),
    ]
    return cols


def _table(board: Board, board_dir: str | None) -> str:
    cols = _columns(board, board_dir)
    head = "".join(
        f'<th data-type="{t}" title="{escape(tip)}" tabindex="0" scope="col">{escape(h)}</th>'
        for h, t, tip, _ in cols
    )
    body = []
    for r in board.rows:
        cls = ["front"] if r.on_pareto_front else []
        if r.is_baseline:
            cls.append("baseline")
        body.append(
            f'<tr class="{" ".join(cls)}" data-trial="{escape(r.label)}">'
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
                counts[r.record.status] = counts.get(r.record.status, 0) + 1
        tally = (
            ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items()) or "no trials yet"
        )
        extended = (
            f" Extended on --resume: {escape('; '.join(s.extensions))}." if s.extensions else ""
        )
        parts.append(
            f"<li><b>{escape(s.name)}</b>: {escape(s.spec.describe())}; {tally}.{extended} "
            f'<span class="path">{escape(s.path)}</span></li>'
        )
    best = board.best
    if best is not None:
        spec = board.spec_of(best)
        vals = ", ".join(
            f"{escape(m)} <b>{escape(fmt_value(best.record.objectives.get(m)))}</b>"
            for m in spec.metrics
        )
        gain = "".join(
            f"; gain over the best baseline ({escape(g)}): {escape(fmt_gain(v))}"
            for g, v in best.gain.items()
        )
        best_html = (
            f'<p class="best">Best: <b>{escape(best.label)}</b> ({escape(best.record.method)}'
            + (f", rank {best.record.lora_rank}" if best.record.lora_rank else "")
            + f") — {vals}"
            f"{gain}. Run it again: <code>plora-ray train best_config.yaml</code> "
            '(<a href="best_config.yaml">best_config.yaml</a>).</p>'
        )
    else:
        best_html = '<p class="best">No completed trial with an objective yet.</p>'
    best_html += f'<p class="cost">{escape(describe_cost(board.cost))}</p>'
    scope = (
        "Trials of all searches are ranked together (same objective)."
        if board.ranked_globally or len(board.searches) == 1
        else "The searches have different objectives: each is ranked by its own, one after another."
    )
    return f'<ul class="searches">{"".join(parts)}</ul>{best_html}<p class="note">{scope}</p>'


def _lineage(board: Board) -> str:
    """The lineage of the top ``pbt_unload`` trials: a table per trial, one row per stage (empty
    for boards without forks)."""
    top = lineage_rows(board)
    if not top:
        return ""

    def proxy(v: Any) -> str:
        return escape(fmt_value(v)) if v is not None else ""

    parts = [
        "<h2>Lineage</h2>",
        f'<p class="note">The top {min(LINEAGE_TOP, len(top))} trial(s) of this population-based '
        "search, stage by stage: at an unload a trial behind the others took a better trial's "
        "unload checkpoint (its merged backbone, adapter and optimizer state) and went on with "
        "perturbed settings for the next stage. <code>best_config.yaml</code> replays the "
        "winner's schedule from step 0 (<code>plora.stages</code>).</p>",
    ]
    for r in top:
        rows = []
        for e in r.record.lineage:
            forked = e.get("parent") is not None
            rows.append(
                "<tr>"
                f'<td class="num">{escape(e.get("stage"))}</td>'
                f'<td class="num">{escape(e.get("step"))}</td>'
                f'<td class="num">{escape(e.get("samples"))}</td>'
                f'<td class="mono">{escape(e.get("trial"))}</td>'
                f'<td class="mono">{escape(e.get("parent")) if forked else "(start)"}</td>'
                f'<td class="num">{proxy(e.get("parent_proxy"))}</td>'
                f'<td class="num">{proxy(e.get("proxy"))}</td>'
                f"<td>{escape(describe_settings(e))}</td>"
                "</tr>"
            )
        head = "".join(
            f'<th scope="col" title="{escape(tip)}">{escape(h)}</th>'
            for h, tip in [
                ("stage", "the stage these settings start"),
                ("step", "optimizer step of the unload"),
                ("samples", "training samples seen at the unload"),
                ("trial", "the trial that ran this stage (an ancestor for inherited stages)"),
                ("forked from", "whose unload checkpoint it continued"),
                ("parent proxy", "the parent's proxy at the unload (lower is better)"),
                ("own proxy", "the forking trial's proxy when it was replaced"),
                ("settings", "the stage's settings and how each was perturbed"),
            ]
        )
        parts.append(
            f"<h3>#{escape(r.rank)} {escape(r.label)} "
            f'<span class="status {escape(r.record.status)}">'
            f"{escape(r.record.status.replace('_', ' '))}</span></h3>"
            f'<div class="tablewrap"><table class="lineage"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
    return "\n".join(parts)


# The page around the board: styles, the sorting script, {{placeholders}}; shipped as package data.
_TEMPLATE = resources.files("plora_ray").joinpath("assets/leaderboard.html")
_SCRIPT_RE = re.compile(r"<script>(.*?)</script>", re.S)


def render_html(board: Board, board_dir: str | None = None) -> str:
    """The self-contained page: summary, sortable table, inline SVG plots, embedded JSON data.

    Args:
        board: the ranked board.
        board_dir: the folder the page is written to, for links to the trials' files relative to
            it; None: the files are named as plain text.
    """
    template = _TEMPLATE.read_text(encoding="utf-8")
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
    warnings = "".join(f"<li>{escape(w)}</li>" for w in board.warnings)
    names = ", ".join(s.name for s in board.searches)
    values = {
        "title": escape(f"Leaderboard: {names}"),
        "csp_script_hash": f"sha256-{digest}",
        "generated_at": escape(board.generated_at),
        "summary": _summary(board),
        "warnings": f'<ul class="warnings">{warnings}</ul>' if warnings else "",
        "table": _table(board, board_dir),
        "lineage": _lineage(board),
        "plots": "\n".join(f"<figure>{p}</figure>" for p in plots),
        "data_json": json_for_script(jsonable(board.to_dict())),
        "count": str(len(board.rows)),
    }
    # One pass over the template: text substituted in is never scanned for placeholders again,
    # so a trial param spelled "{{data_json}}" stays literal text.
    return re.sub(r"\{\{(\w+)\}\}", lambda mm: values[mm.group(1)], template)
