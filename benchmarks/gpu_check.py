"""One GPU check: the figures a machine with one NVIDIA GPU gives in under 8 minutes, in one JSON.

    bash benchmarks/gpu_check.sh [--out benchmarks/results/gpu_check.json]   # installs, then this
    python -m benchmarks.gpu_check --dry-run --out /tmp/gpu_check.json       # CPU, tiny, ~1 min

Steps, each timed:

1. ``benchmarks.gpu_throughput`` at LLaMA-7B shape (``search_spaces/llama7b_plora.yaml``'s model:
   32 layers, hidden 4096, bf16, its sequence length, micro-batch, LoRA and from_base rounding):
   tokens/s, MFU, peak memory, unload time.
2. A 20-step PLoRA run of ``llama7b_plora.yaml`` (``plora-ray train``, one worker) on a
   7B-*wide* random model written by ``plora_ray.rehearsal_model`` with 8 of LLaMA-7B's 32
   layers: every matrix has the 7B shape, so an unload's per-layer cost is the real one, while
   writing, loading and exporting the checkpoint (twice 3.9 GB instead of 13.5 GB) fit the
   8-minute budget; step 1 gives the full-depth throughput. ``plora.unload_every`` is 7 steps, so
   the run has 2 unloads (steps 7 and 14), ``merge_rounding: from_base`` reads W_0 from the
   model's shards, and the run exports the merged model. Unload time and its share of the
   interval come from the run's ``metrics.jsonl``.
3. ``plora-ray eval`` of the exported model on GSM8K and on MMLU (``--limit``, the run's chat
   format), one task at a time: seconds per task.

``--dry-run``: the same steps on CPU at toy size (``gpu_throughput --quick``, the rehearsal model
at ``TINY_WIDTHS`` with 2 layers, 4 steps with unloads every 2, eval limit 1); the JSON has the
same keys. No test depends on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from plora_ray.rehearsal_model import TINY_WIDTHS, write_rehearsal_model
from plora_ray.store import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "llama7b_plora.yaml"
RESULT = ROOT / "benchmarks" / "results" / "gpu_check.json"
# Of LLaMA-7B's 32 layers (module docstring: why 8).
GPU_LAYERS = 8
STEPS = {"gpu": 20, "dry": 4}
UNLOAD_EVERY_STEPS = {"gpu": 7, "dry": 2}
EVAL_LIMIT = {"gpu": 50, "dry": 1}


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; its seconds.

    Raises:
        RuntimeError: the command failed (with the end of its output).
    """
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        ).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {rc}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def throughput(work: Path, dry: bool) -> dict[str, Any]:
    """Step 1: ``gpu_throughput`` at 7B shape (``--quick`` in a dry run)."""
    out = work / "gpu_throughput.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_throughput", "--config", str(SPACE)]
    cmd += ["--out", str(out)] + (["--quick"] if dry else [])
    seconds = _run(cmd, work / "gpu_throughput.log")
    res = json.loads(out.read_text())
    head = res.get("headline", res)
    keys = ("tokens_per_s", "mfu", "peak_memory_gb", "unload_ms")
    return {"seconds": round(seconds, 1), **{k: head.get(k) for k in keys}}


def plora_run(work: Path, dry: bool) -> dict[str, Any]:
    """Step 2: the 20-step PLoRA run of llama7b_plora.yaml on the 7B-wide model; its figures."""
    mode = "dry" if dry else "gpu"
    t0 = time.perf_counter()
    model_dir = write_rehearsal_model(
        work / "model",
        num_layers=2 if dry else GPU_LAYERS,
        max_shard_size="2MB" if dry else "2GB",
        widths=TINY_WIDTHS if dry else None,
    )
    model_s = time.perf_counter() - t0
    batch = 24
    sets = [
        f"model.path={model_dir}",
        f"train.max_steps={STEPS[mode]}",
        f"plora.unload_every={UNLOAD_EVERY_STEPS[mode] * batch}",
        "resources.num_workers=1",
        "batch.micro_batch=4",
        "eval.at_end=false",
        "eval.proxy_samples=0",
    ]
    if dry:
        sets += [
            "resources.gpus_per_worker=0",
            "resources.cpus_per_worker=1",
            "data.max_length=64",
            "data.max_samples=128",
            "model.dtype=float32",
            "deepspeed.bf16=false",
            "model.gradient_checkpointing=false",
        ]
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "plora_ray.cli", "train", str(SPACE), "--output", str(run_dir)]
    seconds = _run(cmd + ["--set", *sets], work / "train.log")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    # A row at each unload step: that unload's seconds and the run's elapsed seconds there.
    unloads = [m for m in metrics if m.get("unload") and m.get("unload_s") is not None]
    unload_s = statistics.median(float(m["unload_s"]) for m in unloads) if unloads else None
    at = [0.0] + [float(m["elapsed_s"]) for m in unloads]
    interval_s = statistics.median(b - a for a, b in zip(at, at[1:])) if unloads else None
    export = run_dir / "model"
    return {
        "layers": 2 if dry else GPU_LAYERS,
        "model_write_s": round(model_s, 1),
        "seconds": round(seconds, 1),
        "steps": STEPS[mode],
        "unloads": len(unloads),
        "unload_s": unload_s,
        # Of the wall time from one unload to the next (training steps + the unload).
        "unload_share_of_interval": (
            unload_s / interval_s if unload_s is not None and interval_s else None
        ),
        "export_files": sorted(p.name for p in export.glob("*.safetensors")),
        "export_dir": str(export),
    }


def evaluation(work: Path, model: str, dry: bool) -> dict[str, float]:
    """Step 3: seconds of ``plora-ray eval`` per task on the exported model (limited set)."""
    limit = EVAL_LIMIT["dry" if dry else "gpu"]
    seconds = {}
    for task in ("gsm8k", "mmlu"):
        cmd = [sys.executable, "-m", "plora_ray.cli", "eval", "--model", model, "--tasks", task]
        cmd += ["--limit", str(limit), "--chat-format", "--out", str(work / f"eval_{task}.json")]
        seconds[task] = round(_run(cmd, work / f"eval_{task}.log"), 1)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three steps and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps at toy size on CPU")
    ap.add_argument("--out", type=Path, default=None, help=f"the JSON (default {RESULT})")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a machine with an NVIDIA GPU, or pass --dry-run")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    run = plora_run(work, args.dry_run)
    result = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "throughput_7b": throughput(work, args.dry_run),
        "plora_run": run,
        "eval_seconds_per_task": evaluation(work, run["export_dir"], args.dry_run),
    }
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out = args.out or RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
