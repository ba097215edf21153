"""Shared benchmark plumbing: the command line, machine info, the JSON file and a printed table.

Every benchmark is ``python -m benchmarks.NAME [--quick] [--out FILE.json]`` and writes one JSON
object ``{"benchmark", "quick", "machine", "headline": {...}, ...details}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(
    description: str,
    argv: list[str] | None = None,
    extra: list[tuple[str, str]] | None = None,
    config: Path | None = None,
) -> argparse.Namespace:
    """``--quick`` (minutes on a CPU), ``--out FILE.json``, ``extra`` on/off flags
    (``(flag, help)`` pairs) and, when ``config`` is given, ``--config RUN.yaml`` defaulting
    to it."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small settings: minutes on a CPU")
    ap.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    if config is not None:
        ap.add_argument(
            "--config", type=Path, default=config, help="run YAML (default %(default)s)"
        )
    for flag, text in extra or []:
        ap.add_argument(flag, action="store_true", help=text)
    return ap.parse_args(argv)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (ratios are only comparable within one run)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(
    name: str,
    quick: bool,
    headline: dict[str, Any],
    details: dict[str, Any],
    out: Path | None,
    started: float,
) -> dict[str, Any]:
    """Assemble, print as a table, and (with ``out``) write the result JSON."""
    result = {
        "benchmark": name,
        "quick": quick,
        "machine": machine_info(),
        "wall_s": round(time.time() - started, 2),
        "headline": headline,
        **details,
    }
    print_table(f"{name} headline", [{"figure": k, "value": v} for k, v in headline.items()])
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {out}")
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows (dicts with the same keys) as an aligned text table."""
    if not rows:
        return
    cols = list(rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
