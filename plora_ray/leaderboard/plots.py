"""The board's plots as inline SVG: objective over time, GSM8K vs MMLU with its Pareto front,
Optuna's parameter importances, and the loss curves of the top trials.

Plain SVG text, no plotting library: the page stays self-contained and loads nothing. Every label
that comes from a user (trial ids, methods, parameter names) is escaped.

A plot that would mislead says why instead: a scatter of one point, or of values that are all the
same (a tiny model scoring 0 on GSM8K and MMLU), is replaced by a one-line reason; importances
from fewer than ``MIN_IMPORTANCE_TRIALS`` completed trials carry a caveat line.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna

from plora_ray.leaderboard.board import Board, SearchInfo
from plora_ray.leaderboard.rank import Row, pareto_fronts, time_key, to_epoch
from plora_ray.leaderboard.tables import escape, fmt_value

__all__ = [
    "MIN_IMPORTANCE_TRIALS",
    "TOP_LOSS_CURVES",
    "Importances",
    "nice_ticks",
    "param_importances",
    "plot_gsm8k_vs_mmlu",
    "plot_importances",
    "plot_loss_curves",
    "plot_objective_over_time",
    "study_importances",
]

# How many of the top trials get a loss curve in the plot (more lines would not be readable).
TOP_LOSS_CURVES = 5
# fANOVA fits a random forest to the completed trials; below 10 (also the number of random
# start-up trials of Optuna's TPE sampler) one more trial can reorder the parameters.
MIN_IMPORTANCE_TRIALS = 10
_METHOD_COLORS = {"plora": "#1f6fb4", "lora": "#e8731a", "full": "#2a9d3c"}
_SERIES_COLORS = ["#1f6fb4", "#e8731a", "#2a9d3c", "#c62f2f", "#8757b8", "#8c564b", "#d6479b"]
_W, _H = 560, 330


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
    ticks: list[float] = []
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
            f'<title id="{plot_id}-title">{escape(self.title)}</title>',
            f'<text x="{w / 2:.1f}" y="20" class="ptitle" text-anchor="middle">'
            f"{escape(self.title)}</text>",
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
            f'text-anchor="middle">{escape(self.xlabel)}</text>'
        )
        out.append(
            f'<text class="alabel" transform="translate(14 {(self.t + h - self.b) / 2:.1f})'
            f' rotate(-90)" text-anchor="middle">{escape(self.ylabel)}</text>'
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
        out.append(f'<text class="legend" x="{x + 10:.1f}" y="{yy + 4:.1f}">{escape(label)}</text>')
    return out


def _tspans(message: str) -> tuple[str, int]:
    """``message`` as centred ``<tspan>`` lines (SVG text does not wrap by itself; a long reason,
    a path, is cut into lines) and the number of lines."""
    lines = textwrap.wrap(message, 80, break_long_words=True)[:6] or [""]
    spans = "".join(
        f'<tspan x="{_W / 2}" dy="{0 if i == 0 else 17}">{escape(line)}</tspan>'
        for i, line in enumerate(lines)
    )
    return spans, len(lines)


def _empty_plot(plot_id: str, title: str, message: str) -> str:
    spans, n_lines = _tspans(message)
    height = 70 + 17 * n_lines
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot empty" id="{escape(plot_id)}" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img">'
        f"<title>{escape(title)}</title>"
        f'<text x="{_W / 2}" y="22" class="ptitle" text-anchor="middle">{escape(title)}</text>'
        f'<text x="{_W / 2}" y="56" class="note" text-anchor="middle">{spans}</text>'
        "</svg>"
    )


def _marker(row: Row, x: float, y: float, tip: str, ring: bool = False) -> str:
    color = _METHOD_COLORS.get(row.record.method or "", "#777")
    stroke = ' stroke="#111" stroke-width="1.6"' if ring else ' stroke="#fff" stroke-width="0.8"'
    if row.is_baseline:
        return (
            f'<rect class="pt" x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" '
            f'fill="{color}"{stroke}><title>{escape(tip)}</title></rect>'
        )
    return (
        f'<circle class="pt" cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}"{stroke}>'
        f"<title>{escape(tip)}</title></circle>"
    )


def _method_legend(rows: Sequence[Row]) -> list[tuple[str, str, str]]:
    seen = []
    for r in rows:
        label = (r.record.method or "?") + (" (baseline)" if r.is_baseline else "")
        item = (
            label,
            _METHOD_COLORS.get(r.record.method or "", "#777"),
            "square" if r.is_baseline else "circle",
        )
        if item not in seen:
            seen.append(item)
    return seen


def plot_objective_over_time(board: Board) -> str:
    """Each completed trial's objective against its finishing time, with the best so far."""
    pid, title = "plot-objective-time", "Objective by trial over time"
    done = [r for r in board.rows if r.record.status == "completed"]
    t0 = min(
        (
            t
            for r in board.rows
            for t in [to_epoch(r.record.started_at), to_epoch(r.record.ended_at)]
            if t is not None
        ),
        default=None,
    )

    def when(r: Row, i: int) -> float:
        t = to_epoch(r.record.ended_at)
        return (t - t0) / 60.0 if t is not None and t0 is not None else float(i)

    timed = all(to_epoch(r.record.ended_at) is not None for r in done) and t0 is not None
    xlabel = "minutes since the search started (trial end)" if timed else "trial (finish order)"
    chrono = sorted(done, key=lambda r: (time_key(r.record.ended_at), r.record.trial_id))
    series: list[tuple[str, list[tuple[float, float, Row]], str | None]] = []
    spec = board.searches[0].spec
    if board.ranked_globally and not spec.pareto:
        pts = [(when(r, i), r.score, r) for i, r in enumerate(chrono) if r.score is not None]
        series.append(("objective", pts, spec.scalar_direction))
        ylabel = "objective" if spec.weights else spec.metrics[0]
    else:
        metrics = list(dict.fromkeys(m for s in board.searches for m in s.spec.metrics))
        for m in metrics:
            pts = [
                (when(r, i), r.record.objectives[m], r)
                for i, r in enumerate(chrono)
                if m in r.record.objectives
            ]
            series.append((m, pts, None))
        ylabel = "objective value"
    allpts = [p for _, pts, _ in series for p in pts]
    if not allpts:
        return _empty_plot(pid, title, "no completed trial with an objective yet")
    if len({id(p[2]) for p in allpts}) < 2:
        return _empty_plot(
            pid, title, "only 1 completed trial with an objective so far: nothing to compare yet"
        )
    ax = _Axes(title, xlabel, ylabel, [p[0] for p in allpts], [p[1] for p in allpts])
    out = ax.open(pid)
    legend: list[tuple[str, str, str]] = []
    for k, (name, pts, direction) in enumerate(series):
        color = _SERIES_COLORS[k % len(_SERIES_COLORS)]
        if direction is not None:
            # The running best answers what "over time" asks: is the search still improving?
            best: float | None = None
            path: list[str] = []
            for x, y, _ in pts:
                if best is None or (y > best if direction == "maximize" else y < best):
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
            tip = f"{r.label} ({r.record.method}): {name} = {fmt_value(y)}"
            if direction is None and len(series) > 1:
                out.append(
                    f'<circle class="pt" cx="{ax.x(x):.1f}" cy="{ax.y(y):.1f}" r="4.5" '
                    f'fill="{color}"><title>{escape(tip)}</title></circle>'
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
        if r.record.status == "completed"
        and "gsm8k" in r.record.objectives
        and "mmlu" in r.record.objectives
    ]
    if not rows:
        return _empty_plot(pid, title, "no completed trial with both GSM8K and MMLU yet")
    if len(rows) < 2:
        return _empty_plot(
            pid, title, "only 1 completed trial with both GSM8K and MMLU: no trade-off to show yet"
        )
    xs = [r.record.objectives["mmlu"] for r in rows]
    ys = [r.record.objectives["gsm8k"] for r in rows]
    same = [f"{name} is {fmt_value(v[0])}" for name, v in (("GSM8K", ys), ("MMLU", xs))]
    same = [text for text, v in zip(same, (ys, xs)) if len(set(v)) == 1]
    if same:
        return _empty_plot(
            pid,
            title,
            f"{' and '.join(same)} in all {len(rows)} completed trials: no trade-off to show",
        )
    fronts = pareto_fronts([[x, y] for x, y in zip(xs, ys)], ["maximize", "maximize"])
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
            f"{r.label} ({r.record.method}"
            + (f", r={r.record.lora_rank}" if r.record.lora_rank else "")
            + f"): GSM8K {fmt_value(y)}, "
            f"MMLU {fmt_value(x)}" + (" — on the front" if f == 0 else "")
        )
        out.append(_marker(r, ax.x(x), ax.y(y), tip, ring=f == 0))
    legend = _method_legend(rows) + [("Pareto front", "#111", "line")]
    out += _legend(legend, ax.legend_x, ax.t + 8)
    out.append("</svg>")
    return "\n".join(out)


@dataclass(frozen=True)
class Importances:
    """Optuna's parameter importances of one search, or why there are none.

    ``values`` maps each objective metric to {parameter: importance}; ``reason`` says why it is
    empty; ``num_trials`` is how many completed trials they come from.
    """

    values: dict[str, dict[str, float]] = field(default_factory=dict)
    reason: str | None = None
    num_trials: int = 0

    @property
    def caveat(self) -> str | None:
        """A warning to show with the importances when they rest on too few trials."""
        if not self.values or self.num_trials >= MIN_IMPORTANCE_TRIALS:
            return None
        return (
            f"Caveat: from only {self.num_trials} completed trials (fewer than "
            f"{MIN_IMPORTANCE_TRIALS}): a rough indication that more trials may change."
        )


def param_importances(info: SearchInfo) -> tuple[dict[str, dict[str, float]], str | None]:
    """Optuna's parameter importances per objective metric, or a reason why there are none.

    ``study_importances`` without the number of trials they come from.
    """
    found = study_importances(info)
    return found.values, found.reason


def study_importances(info: SearchInfo) -> Importances:
    """Optuna's parameter importances per objective metric, or a reason why there are none.

    Reads the study named in search.json from its storage URL. Needs at least two completed
    trials; a SQLite file that does not exist is not created (opening it would).
    """
    if not info.study_name or not info.storage_url:
        return Importances(reason="search.json names no Optuna study (study_name and storage URL)")
    url = info.storage_url
    if url.startswith("sqlite:///"):
        db = url[len("sqlite:///") :]
        if not os.path.isfile(db):
            return Importances(reason=f"the study's database {db} does not exist")
    num_trials = 0
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=info.study_name, storage=url)
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        num_trials = len(done)
        if num_trials < 2:
            return Importances(
                reason=f"needs at least 2 completed trials in the study, found {num_trials}",
                num_trials=num_trials,
            )
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
            return Importances(
                reason="no parameter varied across the completed trials", num_trials=num_trials
            )
        return Importances(out, None, num_trials)
    except Exception as exc:  # importances are a nice-to-have; never lose the board over them
        return Importances(
            reason=f"could not compute importances: {type(exc).__name__}: {exc}",
            num_trials=num_trials,
        )


def plot_importances(info: SearchInfo) -> str:
    """Horizontal bars of Optuna's (fANOVA) parameter importances, one group per objective."""
    pid = "plot-importance-" + re.sub(r"[^A-Za-z0-9_-]", "_", info.name)
    title = f"Parameter importances ({info.name})"
    found = study_importances(info)
    imps = found.values
    if not imps:
        return _empty_plot(pid, title, f"not available: {found.reason}")
    params = sorted(
        {p for d in imps.values() for p in d},
        key=lambda p: -max(d.get(p, 0.0) for d in imps.values()),
    )
    groups = list(imps)
    bar_h, gap = 14, 8
    left = min(260, 20 + 7 * max(len(p) for p in params))
    caveat, caveat_lines = _tspans(found.caveat) if found.caveat else ("", 0)
    y = 36 + 17 * caveat_lines
    height = y + 4 + len(params) * (len(groups) * bar_h + gap) + 20 + 15 * len(groups)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" id="{escape(pid)}" '
        f'viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<text x="{_W / 2}" y="20" class="ptitle" text-anchor="middle">{escape(title)}</text>',
    ]
    if caveat:
        out.append(
            f'<text x="{_W / 2}" y="38" class="note caveat" text-anchor="middle">{caveat}</text>'
        )
    span = _W - left - 60
    for p in params:
        out.append(
            f'<text class="tick" x="{left - 6}" y="{y + bar_h * len(groups) / 2 + 4:.1f}" '
            f'text-anchor="end">{escape(p)}</text>'
        )
        for k, g in enumerate(groups):
            v = imps[g].get(p, 0.0)
            color = _SERIES_COLORS[k % len(_SERIES_COLORS)]
            out.append(
                f'<rect class="bar" x="{left}" y="{y}" width="{max(v * span, 0.5):.1f}" '
                f'height="{bar_h - 2}" fill="{color}"><title>{escape(p)} for {escape(g)}: '
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
    top = [r for r in board.rows if r.record.loss_curve][:TOP_LOSS_CURVES]
    if not top:
        return _empty_plot(pid, title, "no trial has a loss curve yet")
    xs = [p[0] for r in top for p in r.record.loss_curve]
    ys = [p[1] for r in top for p in r.record.loss_curve]
    ax = _Axes(title, "optimizer step", "training loss", xs, ys, legend_width=230)
    out = ax.open(pid)
    legend = []
    for k, r in enumerate(top):
        color = _SERIES_COLORS[k % len(_SERIES_COLORS)]
        d = " ".join(
            ("M" if i == 0 else "L") + f"{ax.x(s):.1f},{ax.y(v):.1f}"
            for i, (s, v) in enumerate(r.record.loss_curve)
        )
        out.append(
            f'<path class="curve" d="{d}" fill="none" stroke="{color}" stroke-width="1.8">'
            f"<title>{escape(r.label)} (#{r.rank}, {escape(r.record.method)})</title></path>"
        )
        label = f"#{r.rank} {r.label} ({r.record.method})"
        legend.append((label if len(label) <= 34 else label[:33] + "…", color, "line"))
    out += _legend(legend, ax.legend_x, ax.t + 8)
    out.append("</svg>")
    return "\n".join(out)
