"""The search driver's console: a live table of the trials in place of Tune's progress output.

``plora-ray search`` is quiet by default: Tune's own reporter is off (``verbose=0``), the trials'
worker logs stay in Ray's log files instead of the driver's console (``log_to_driver``), and
``LiveTable`` (a Tune callback in the search driver) shows one row per trial (id, status, the
searched params, the proxy, the objective). Lines printed while the table is on a terminal go
through ``print_above_table``, so the table is redrawn below them instead of being torn. ``-v``
brings back the worker logs and Tune's status output, ``-vv`` Tune's per-result output too.

A failed trial stays visible when quiet: its summary line carries the error's last line, and the
full traceback is in the trial's ``error.txt`` under the search directory.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from plora_ray.pbt import split_trial_config
from plora_ray.search_space import SearchSpec

__all__ = ["QUIET_WORKER_ENV", "LiveTable", "print_above_table"]

# Environment of the trial processes when the console is quiet: they are what fills Ray's worker
# logs (kept on disk either way) with progress bars and warnings.
QUIET_WORKER_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # lm-eval's per-task and per-request progress bars are tqdm's.
    "TQDM_DISABLE": "1",
}

# How many trial rows the table shows at most: the running ones first, then the newest finished.
_MAX_ROWS = 16


class _Screen:
    """What the live table occupies at the bottom of a terminal (the search driver's stdout)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @staticmethod
    def live() -> bool:
        return sys.stdout.isatty()

    def erase(self) -> None:
        if self.lines and self.live():
            # Cursor up over the table, then clear to the end of the screen.
            sys.stdout.write(f"\x1b[{len(self.lines)}F\x1b[J")

    def draw(self, lines: list[str]) -> None:
        self.erase()
        self.lines = lines
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
        if not self.live():
            self.lines = []  # a log file keeps every table: nothing to erase later


_SCREEN = _Screen()


def print_above_table(line: str) -> None:
    """Print a line of the search driver's own (a trial's summary) above the live table."""
    shown = list(_SCREEN.lines)
    _SCREEN.erase()
    _SCREEN.lines = []
    print(line, flush=True)
    if shown:
        _SCREEN.draw(shown)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class LiveTable(Callback):
    """Tune callback: the trials' table, redrawn in place every ``refresh_s`` on a terminal, or
    printed every ``log_refresh_s`` when it changed if stdout is a file or pipe (a job's log).

    Args:
        spec: the search block (the searched params, the objective, the proxy).
        refresh_s: seconds between redraws on a terminal.
        log_refresh_s: seconds between tables written to a file or pipe.
    """

    def __init__(self, spec: SearchSpec, refresh_s: float = 2.0, log_refresh_s: float = 60.0):
        self.params = [p.key for p in spec.params]
        self.proxy = spec.proxy_metric
        self.objective = spec.objective
        self.refresh_s, self.log_refresh_s = refresh_s, log_refresh_s
        self.rows: dict[str, dict[str, Any]] = {}  # Tune trial id -> what the row shows
        self._drawn_at = 0.0
        self._drawn: list[str] = []

    def _row(self, trial: Any) -> dict[str, Any]:
        return self.rows.setdefault(
            trial.trial_id,
            {"status": "pending", "params": split_trial_config(dict(trial.config or {}))[0]},
        )

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._row(trial)["status"] = "running"

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        row = self._row(trial)
        if result.get(self.proxy) is not None:
            row["proxy"] = result[self.proxy]
        if result.get("trial_done"):
            row["status"] = result.get("status") or "completed"
            names = self.objective.metrics if self.objective.pareto else ["objective"]
            found = [result.get(m) for m in names]
            if all(isinstance(v, (int, float)) for v in found):
                row["objective"] = " ".join(_short(v) for v in found)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self._row(trial)
        if row["status"] in ("pending", "running"):
            row["status"] = "early_stopped"

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._row(trial)["status"] = "failed"

    def table(self) -> list[str]:
        """The table's lines: a header, then one row per trial (running ones first)."""
        objective = "/".join(self.objective.metrics) if self.objective.pareto else "objective"
        head = ["trial", "status", *self.params, self.proxy, objective]
        ids = sorted(self.rows, key=lambda t: self.rows[t]["status"] != "running")
        body = [
            [
                t,
                r["status"],
                *(_short(r["params"].get(k, "-")) for k in self.params),
                _short(r.get("proxy", "-")),
                str(r.get("objective", "-")),
            ]
            for t, r in ((t, self.rows[t]) for t in ids[:_MAX_ROWS])
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head]]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in body]
        if len(ids) > _MAX_ROWS:
            lines.append(f"... {len(ids) - _MAX_ROWS} more finished trial(s): see the leaderboard")
        return lines

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        for trial in trials:
            self._row(trial)
        live = _Screen.live()
        if not self._drawn_at:
            self._drawn_at = 1e-9 if live else time.monotonic()  # a log: no table of all pending
        if time.monotonic() - self._drawn_at < (self.refresh_s if live else self.log_refresh_s):
            return
        lines = self.table()
        if live or lines != self._drawn:
            _SCREEN.draw(lines)
            self._drawn = lines
        self._drawn_at = time.monotonic()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        for trial in trials:
            self._row(trial)
        _SCREEN.draw(self.table())
        _SCREEN.lines = []  # the final table stays on screen
