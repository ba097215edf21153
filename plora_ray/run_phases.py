"""What a run is doing between its reports: setup (model, data, engine) and evaluation.

Step reports say how training goes; the ~30 s of setup before the first one and the final
evaluation say nothing. A worker marks each phase with ``report_phase`` (rank 0 appends one line
to ``DIR/phases.jsonl``); the driver follows that file as it follows metrics.jsonl and hands each
line (``{"phase": ..., "elapsed_s": ...}``) to the same report callback, where ``plora-ray train``
prints it. Phases are never written to metrics.jsonl, so every reader of a run's steps
(``store.read_metrics``, resume's truncation, the leaderboard) sees only steps and the final
report. A file, not ``ray.train.report``: Ray Train's reports do not reach the driver's callback
and carry checkpoints, and a phase must cost nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from plora_ray.config import EvalConfig, RunConfig

__all__ = [
    "PHASES_FILE",
    "describe_engine",
    "describe_evaluation",
    "is_phase",
    "report_phase",
]

PHASES_FILE = "phases.jsonl"
# When this process first marked a phase: the driver prints phases with their time since then.
_T0 = time.perf_counter()


def report_phase(output_dir: str | Path, rank: int, phase: str, **details: Any) -> None:
    """Append ``{"phase": phase, **details}`` to ``output_dir/phases.jsonl`` (rank 0 only).

    Args:
        output_dir: the run directory.
        rank: this worker's rank; the other ranks mark nothing (they do the same work).
        phase: what the run starts doing now, e.g. ``"loading the model"``.
        details: JSON values shown after it (``name=value``).
    """
    if rank != 0:
        return
    line = {"phase": phase, **details, "elapsed_s": round(time.perf_counter() - _T0, 1)}
    with open(Path(output_dir) / PHASES_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")


def is_phase(report: dict[str, Any]) -> bool:
    """Whether a report handed to a run's callback is a phase line (not a step or final one)."""
    return "phase" in report and "step" not in report


def describe_evaluation(ev: EvalConfig) -> str:
    """The final evaluation's phase: its tasks and how many documents each scores."""
    docs = f"{ev.limit} documents per task" if ev.limit else "every document"
    return f"evaluating {', '.join(ev.tasks)} ({docs}, batch {ev.batch_size})"


def describe_engine(cfg: RunConfig) -> str:
    """The engine build's phase: DeepSpeed's (with its ZeRO stage) or plain torch's optimizer."""
    if cfg.deepspeed.enabled:
        return f"building the DeepSpeed engine (ZeRO-{cfg.deepspeed.zero_stage})"
    return "building the optimizer (plain torch)"
