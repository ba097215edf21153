"""Several ``run_in_process`` runs in one process, as a reused Tune trial actor makes them (for
tests/test_train.py; not collected by pytest).

Usage:
    python tests/in_process_runs.py CONFIG.yaml OUT_DIR

In order, all in this one process: ``a`` an uninterrupted run; ``b`` the same run failing after
step 5 (``PLORA_FAULT_AT_STEP``) and then resumed from its newest checkpoint; ``c`` the
uninterrupted run again; ``d_zero3`` the run under ZeRO-3 (which swaps
``torch.nn.functional.linear`` process-wide while it runs); ``e`` the uninterrupted run again.
Writes ``OUT_DIR/results.json``: each call's RunResult and the reports
its ``report`` callback received, plus the /dev/shm names seen before and after.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _shm() -> list[str]:
    d = Path("/dev/shm")
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def main(config: str, out_dir: str) -> None:
    from plora_ray.config import load_config
    from plora_ray.executors import run_in_process
    from plora_ray.preflight import FAULT_ENV

    out = Path(out_dir)
    cfg = load_config(config)
    results: dict[str, Any] = {"shm_before": _shm(), "pid": os.getpid()}

    def run(name: str, key: str, resume: bool = False) -> None:
        seen: list[dict[str, Any]] = []
        res = run_in_process(cfg, out / name, report=seen.append, resume=resume)
        results[key] = {"result": res.as_dict(), "reports": seen}

    run("a", "a")
    os.environ[FAULT_ENV] = "5"
    run("b", "b_failed")
    del os.environ[FAULT_ENV]
    try:
        run("b", "b_refused")
    except FileExistsError as exc:
        results["b_refused"] = str(exc)
    run("b", "b_resumed", resume=True)
    run("c", "c")
    linear = torch.nn.functional.linear
    zero3 = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, zero_stage=3))
    seen: list[dict[str, Any]] = []
    res = run_in_process(zero3, out / "d", report=seen.append)
    results["d_zero3"] = {"result": res.as_dict(), "reports": seen}
    results["linear_restored_after_zero3"] = torch.nn.functional.linear is linear
    run("e", "e")
    results["shm_after"] = _shm()
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
