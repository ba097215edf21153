"""Overhead of PLoRA against stock peft LoRA: step time, peak memory and the time of one unload.

* Step time: two copies of the same tiny LLaMA with the same peft LoRA adapters, data and AdamW;
  one trains as plain LoRA, the other as PLoRA (an unload every ``unload_every_run`` steps, so
  several unloads happen in a short run). Steps alternate LoRA / PLoRA (which goes first alternates
  too) in one process, so both see the same machine load. The unload's time is measured apart
  from the step it follows.
  ``step_time_ratio`` = median over steps of (PLoRA step / the LoRA step next to it in time) +
  median unload / ``realistic_interval`` / median LoRA step, with ``realistic_interval`` = 200
  steps (the paper: an unload every 4.8k samples at global batch 24). Paired medians, because other
  processes on a shared machine add load that drifts and spikes: the two steps of a pair run
  back to back and see the same load. ``step_time_ratio_of_medians`` is reported beside it.
  ``step_time_ratio_in_run`` is the plain ratio of totals with the run's own (much more frequent)
  unloads counted in PLoRA's steps; ``unload_share_at_interval`` = the unload's amortised share.
* Peak memory: each method trains in a fresh subprocess (so neither inherits the other's
  allocations), with unloads; on CUDA ``torch.cuda.max_memory_allocated``, on CPU the process's
  peak resident set size (``ru_maxrss``, which sees torch's allocations unlike tracemalloc).
  ``peak_memory_ratio`` = PLoRA / LoRA peak; ``peak_memory_increment_ratio`` compares what
  training adds: the largest RSS sampled after each step and unload minus the RSS right before the
  first step (on CPU the ratio of peaks is diluted by the interpreter, libraries and model build).
  On CPU the increment also counts library code first paged in by the unload (the
  eigendecompositions of the rank metric, safetensors, the random generators): a few MiB that do
  not grow with the model, which is why the tiny model's increment ratio is well above 1 while
  PLoRA's state (W_0 and Σ of the 2 sampled layers, the merged factors the recorder and
  from_base keep, on CPU) is a few hundred KiB here.
* ``unload_ms``: median time of one unload as the trainer runs it
  (``recorded_unload.recorded_unload``: the backbone recorder, merge error, effective rank of
  the sampled layers) with the ``plora`` section of a run YAML (``--config``, default
  ``search_spaces/llama7b_plora.yaml``: ``from_base``, which re-reads W_0 from a safetensors
  copy of the initial weights as from the model's files, momentum 0.1, rank tracking of 2
  layers); its interval is replaced by ``unload_every_run`` steps.

Merge precision (bf16, nearest vs stochastic vs from_base) is benchmarks/merge_precision.py.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from benchmarks.common import parse_args, print_table, write_result
from plora_ray.base_weights import LastReadCache
from plora_ray.checkpoint import BackboneRecorder
from plora_ray.config import LoraConfig, ModelConfig, TinyModelConfig, load_config
from plora_ray.merge import safetensors_base_weights
from plora_ray.model import load_model
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora, base_param_name, lora_pairs
from plora_ray.recorded_unload import build_recorded_plora, recorded_unload

VOCAB = 2048
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "search_spaces" / "llama7b_plora.yaml"


def settings(quick: bool) -> dict[str, Any]:
    return {
        "hidden": 64 if quick else 128,
        "intermediate": 176 if quick else 352,
        "layers": 2 if quick else 4,
        "heads": 4,
        "batch": 4,
        "length": 64 if quick else 128,
        "steps": 100 if quick else 300,
        "unload_every_run": 20 if quick else 50,
        "memory_steps": 20 if quick else 60,
        "realistic_interval": 200,
        "warmup": 3,
        "rank": 8,
        "seed": 0,
    }


def build(s: dict[str, Any], device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    tiny = TinyModelConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
    )
    dtype: Literal["bfloat16", "float32"] = "bfloat16" if device == "cuda" else "float32"
    model: torch.nn.Module = load_model(
        ModelConfig(tiny=tiny, dtype=dtype), seed=s["seed"], vocab_size=VOCAB
    )
    torch.manual_seed(s["seed"])
    model = attach_lora(model, LoraConfig(rank=s["rank"])).to(device)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.99)
    )
    return model, opt


def recorded_plora(
    model: torch.nn.Module, opt: torch.optim.Optimizer, s: dict[str, Any], every: int, tmp: Path
) -> tuple[PLoRA, BackboneRecorder]:
    """PLoRA as the trainer builds it (recorder, W_0 source) with the config's plora section."""
    cfg = replace(load_config(s["config"]).plora, unload_every=every, unload_unit="steps")
    source = None
    if cfg.merge_rounding == "from_base":
        save_file(
            {base_param_name(p.name): p.base.detach().cpu() for p in lora_pairs(model)},
            str(tmp / "model.safetensors"),
        )
        source = LastReadCache(safetensors_base_weights(tmp / "model.safetensors"))
    return build_recorded_plora(
        model, cfg, s["batch"], s["seed"], TorchParamAccess(opt), None, source
    )


def data(step: int, s: dict[str, Any], device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randint(0, VOCAB, (s["batch"], s["length"]), generator=g).to(device)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_times(s: dict[str, Any], device: str) -> dict[str, Any]:
    lora, lora_opt = build(s, device)
    pl_model, pl_opt = build(s, device)
    tmp = tempfile.TemporaryDirectory()
    plora, recorder = recorded_plora(pl_model, pl_opt, s, s["unload_every_run"], Path(tmp.name))
    t_lora, t_plora, unload_s = [], [], []
    t_plora_with_unload = []
    for step in range(s["warmup"] + s["steps"]):
        x = data(step, s, device)
        # Alternate which method goes first so neither always follows the other's cache effects.
        order = ("lora", "plora") if step % 2 == 0 else ("plora", "lora")
        for which in order:
            sync(device)
            t0 = time.perf_counter()
            if which == "lora":
                train_step(lora, lora_opt, x)
                sync(device)
                dt, du = time.perf_counter() - t0, 0.0
            else:
                train_step(pl_model, pl_opt, x)
                sync(device)
                dt, du = time.perf_counter() - t0, 0.0
                if plora.due(step + 1, (step + 1) * s["batch"]):
                    t1 = time.perf_counter()
                    recorded_unload(plora, recorder, step + 1, (step + 1) * s["batch"], True)
                    sync(device)
                    du = time.perf_counter() - t1
                    unload_s.append(du)
            if step >= s["warmup"]:
                if which == "lora":
                    t_lora.append(dt)
                else:
                    t_plora.append(dt)
                    t_plora_with_unload.append(dt + du)
    tmp.cleanup()
    paired = [p / q for p, q in zip(t_plora, t_lora)]
    return {
        "paired_ratio_median": statistics.median(paired),
        "lora_step_s": t_lora,
        "plora_step_s": t_plora,
        "lora_step_s_total": sum(t_lora),
        "plora_step_s_total": sum(t_plora_with_unload),
        "lora_step_s_median": statistics.median(t_lora),
        "plora_step_s_median": statistics.median(t_plora),
        "unloads": plora.num_unloads,
        "unload_s": unload_s,
    }


def peak_memory_child(method: str, s: dict[str, Any], device: str) -> dict[str, float]:
    """Runs in a fresh subprocess: train ``memory_steps`` steps and report the peak memory."""
    model, opt = build(s, device)
    plora = recorder = None
    tmp = tempfile.TemporaryDirectory()
    if method == "plora":
        every = max(1, s["memory_steps"] // 2)  # two unloads, so their temporaries count
        plora, recorder = recorded_plora(model, opt, s, every, Path(tmp.name))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss is a high-water mark that model building may already have set, so also sample the
    # current RSS after every step and every unload: its growth over the pre-training RSS is what
    # training (and PLoRA's state and temporaries) adds.
    rss0 = current_rss()
    rss_max = rss0
    for step in range(s["memory_steps"]):
        train_step(model, opt, data(step, s, device))
        rss_max = max(rss_max, current_rss())
        if plora is not None and plora.due(step + 1, (step + 1) * s["batch"]):
            assert recorder is not None
            recorded_unload(plora, recorder, step + 1, (step + 1) * s["batch"], True)
            rss_max = max(rss_max, current_rss())
    sync(device)
    tmp.cleanup()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, float] = {
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "rss_start_bytes": rss0,
        "rss_sampled_max_bytes": rss_max,
    }
    if device == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def current_rss() -> int:
    """This process's resident set size now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_memory(method: str, s: dict[str, Any], device: str) -> dict[str, float]:
    """Run ``peak_memory_child`` in a fresh interpreter and return its figures."""
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--child", method, json.dumps(s), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(1)
        print(json.dumps(peak_memory_child(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
        return {}
    args = parse_args(__doc__.splitlines()[0], argv, config=DEFAULT_CONFIG)
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = {**settings(args.quick), "config": str(args.config)}
    times = step_times(s, device)
    mem = {m: peak_memory(m, s, device) for m in ("lora", "plora")}
    key = "cuda_peak_bytes" if device == "cuda" else "rss_peak_bytes"
    lora_med = times["lora_step_s_median"]
    plora_med = times["plora_step_s_median"]
    unload_med = statistics.median(times["unload_s"])
    interval = s["realistic_interval"]

    def growth(m: str) -> float:
        return float(mem[m]["rss_sampled_max_bytes"] - mem[m]["rss_start_bytes"])

    print_table(
        "step time and memory",
        [
            {
                "method": m,
                "median_step_ms": 1e3 * times[f"{m}_step_s_median"],
                "total_step_s": times[f"{m}_step_s_total"],
                "peak_MiB": mem[m][key] / 2**20,
                "sampled_growth_MiB": growth(m) / 2**20,
            }
            for m in ("lora", "plora")
        ],
    )

    headline = {
        "step_time_ratio": times["paired_ratio_median"] + unload_med / interval / lora_med,
        "realistic_interval_steps": interval,
        "step_time_ratio_steps_only": times["paired_ratio_median"],
        "step_time_ratio_of_medians": plora_med / lora_med,
        f"step_time_ratio_in_run_every{s['unload_every_run']}": times["plora_step_s_total"]
        / times["lora_step_s_total"],
        "unload_share_at_interval": unload_med / interval / lora_med,
        "peak_memory_ratio": mem["plora"][key] / mem["lora"][key],
        "peak_memory_increment_ratio": growth("plora") / max(1.0, growth("lora")),
        "peak_memory_increment_extra_mib": (growth("plora") - growth("lora")) / 2**20,
        "unload_ms": 1e3 * unload_med,
        "unload_in_lora_steps": unload_med / lora_med,
        "lora_step_ms": 1e3 * lora_med,
    }
    return write_result(
        "overhead",
        args.quick,
        headline,
        {"device": device, "settings": s, "step_times": times, "peak_memory": mem},
        args.out,
        started,
    )


if __name__ == "__main__":
    main()
