"""Overhead of PLoRA against stock peft LoRA: step time, peak memory, one unload; merge precision.

* Step time: two copies of the same tiny LLaMA with the same peft LoRA adapters, data and AdamW;
  one trains as plain LoRA, the other as PLoRA (unload every ``unload_every`` steps, the unload's
  time counted in its step). Steps alternate LoRA / PLoRA in one process so both see the same
  machine load; ``step_time_ratio`` = total PLoRA time / total LoRA time.
* Peak memory: each method trains in a fresh subprocess (so neither inherits the other's
  allocations); on CUDA ``torch.cuda.max_memory_allocated``, on CPU the process's peak resident
  set size (``ru_maxrss``, which sees torch's allocations unlike tracemalloc).
  ``peak_memory_ratio`` = PLoRA / LoRA peak; ``peak_memory_increment_ratio`` compares the growth
  of the peak during training over the RSS right before the first step.
* ``unload_ms``: median time of one unload (all target layers, stochastic rounding, metrics).
* Merge precision (bf16 tiny LLaMA, 50 unloads, consistent-direction updates of relative size
  rho = ||ΔW||/||W|| per unload): cumulative relative Frobenius error and retained fraction
  (component along the intended update) for round-to-nearest and stochastic rounding.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.common import parse_args, print_table, write_result
from plora_ray.config import LoraConfig, ModelConfig, PLoRAConfig, TinyModelConfig
from plora_ray.model import load_model
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora, lora_pairs

VOCAB = 2048


def settings(quick: bool) -> dict[str, Any]:
    return dict(hidden=128, intermediate=352, layers=4, heads=4, batch=8, length=128,
                steps=60 if quick else 400, unload_every=20 if quick else 100,
                warmup=3, rank=8, seed=0)


def build(s: dict[str, Any], device: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    tiny = TinyModelConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           num_key_value_heads=s["heads"])
    dtype = "bfloat16" if device == "cuda" else "float32"
    model = load_model(ModelConfig(tiny=tiny, dtype=dtype), seed=s["seed"], vocab_size=VOCAB)
    torch.manual_seed(s["seed"])
    model = attach_lora(model, LoraConfig(rank=s["rank"])).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.99))
    return model, opt


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
    plora = PLoRA(pl_model, PLoRAConfig(unload_every=s["unload_every"], unload_unit="steps"),
                  s["batch"], s["seed"], TorchParamAccess(pl_opt))
    t_lora, t_plora, unload_s = [], [], []
    for step in range(s["warmup"] + s["steps"]):
        x = data(step, s, device)
        # Alternate which method goes first so neither always follows the other's cache effects.
        order = ("lora", "plora") if step % 2 == 0 else ("plora", "lora")
        for which in order:
            sync(device)
            t0 = time.perf_counter()
            if which == "lora":
                train_step(lora, lora_opt, x)
            else:
                train_step(pl_model, pl_opt, x)
                if plora.due(step + 1, (step + 1) * s["batch"]):
                    t1 = time.perf_counter()
                    plora.unload(step + 1, (step + 1) * s["batch"])
                    sync(device)
                    unload_s.append(time.perf_counter() - t1)
            sync(device)
            dt = time.perf_counter() - t0
            if step >= s["warmup"]:
                (t_lora if which == "lora" else t_plora).append(dt)
    return {
        "lora_step_s_total": sum(t_lora), "plora_step_s_total": sum(t_plora),
        "lora_step_s_median": statistics.median(t_lora),
        "plora_step_s_median": statistics.median(t_plora),
        "unloads": plora.num_unloads, "unload_s": unload_s,
    }


def peak_memory_child(method: str, s: dict[str, Any], device: str) -> dict[str, float]:
    """Runs in a fresh subprocess: train ``steps`` steps and report the peak memory."""
    model, opt = build(s, device)
    plora = None
    if method == "plora":
        plora = PLoRA(model, PLoRAConfig(unload_every=s["unload_every"], unload_unit="steps"),
                      s["batch"], s["seed"], TorchParamAccess(opt))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for step in range(s["steps"]):
        train_step(model, opt, data(step, s, device))
        if plora is not None and plora.due(step + 1, (step + 1) * s["batch"]):
            plora.unload(step + 1, (step + 1) * s["batch"])
    sync(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"rss_before_bytes": before, "rss_peak_bytes": peak}
    if device == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def peak_memory(method: str, s: dict[str, Any], device: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--child", method, json.dumps(s), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def merge_precision(rounding: str, rho: float, unloads: int = 50) -> dict[str, float]:
    """Cumulative applied vs intended update over ``unloads`` unloads on a bf16 tiny LLaMA."""
    model = load_model(ModelConfig(tiny=TinyModelConfig(), dtype="bfloat16"), seed=0,
                       vocab_size=256)
    torch.manual_seed(0)
    model = attach_lora(model, LoraConfig(rank=8))
    pairs = lora_pairs(model)
    g = torch.Generator().manual_seed(5)
    directions = []
    for p in pairs:
        b, a = torch.randn(p.B.shape, generator=g), torch.randn(p.A.shape, generator=g)
        scale = rho * p.base.float().norm() / (p.scaling * b @ a).norm()
        directions.append((b * scale, a))
    plora = PLoRA(model, PLoRAConfig(momentum=0.0, merge_rounding=rounding), 24, 0,
                  TorchParamAccess(None), track_all_layers=True)
    per = []
    for k in range(unloads):
        jitter = 1 + 0.3 * float(torch.randn((), generator=g))
        with torch.no_grad():
            for p, (b, a) in zip(pairs, directions):
                p.B.copy_(b * jitter)
                p.A.copy_(a)
        per.append(plora.unload(k + 1, 24 * (k + 1)).merge_rel_error)
    stats = plora.cumulative_merge_stats()
    stats["mean_per_unload_rel_error"] = sum(per) / len(per)
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(peak_memory_child(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])))
        return {}
    args = parse_args(__doc__.splitlines()[0], argv)
    started = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = settings(args.quick)
    times = step_times(s, device)
    mem = {m: peak_memory(m, s, device) for m in ("lora", "plora")}
    key = "cuda_peak_bytes" if device == "cuda" else "rss_peak_bytes"
    merge = {}
    for rho in (1e-3, 1e-2):
        for rounding in ("nearest", "stochastic"):
            merge[f"{rounding}_rho{rho:g}"] = merge_precision(rounding, rho)
    print_table("step time and memory", [
        {"method": m, "total_step_s": times[f"{m}_step_s_total"],
         "median_step_ms": 1e3 * times[f"{m}_step_s_median"],
         "peak_MiB": mem[m][key] / 2**20,
         "peak_growth_MiB": (mem[m]["rss_peak_bytes"] - mem[m]["rss_before_bytes"]) / 2**20}
        for m in ("lora", "plora")])
    print_table("merge precision, 50 unloads, bf16", [
        {"setting": k, **{kk: v for kk, v in val.items()}} for k, val in merge.items()])

    def growth(m: str) -> float:
        return float(mem[m]["rss_peak_bytes"] - mem[m]["rss_before_bytes"])

    headline = {
        "step_time_ratio": times["plora_step_s_total"] / times["lora_step_s_total"],
        "step_time_ratio_median": times["plora_step_s_median"] / times["lora_step_s_median"],
        "peak_memory_ratio": mem["plora"][key] / mem["lora"][key],
        "peak_memory_increment_ratio": growth("plora") / max(1.0, growth("lora")),
        "unload_ms": 1e3 * statistics.median(times["unload_s"]),
        "merge_cum_rel_error_nearest": merge["nearest_rho0.01"]["cumulative_rel_error"],
        "merge_cum_rel_error_stochastic": merge["stochastic_rho0.01"]["cumulative_rel_error"],
        "merge_cum_rel_error_nearest_rho1e-3": merge["nearest_rho0.001"]["cumulative_rel_error"],
        "merge_cum_rel_error_stochastic_rho1e-3":
            merge["stochastic_rho0.001"]["cumulative_rel_error"],
        "merge_retained_nearest_rho1e-3": merge["nearest_rho0.001"]["retained_fraction"],
        "merge_retained_stochastic_rho1e-3": merge["stochastic_rho0.001"]["retained_fraction"],
    }
    return write_result("overhead", args.quick, headline,
                        {"device": device, "settings": s, "step_times": times,
                         "peak_memory": mem, "merge_precision": merge}, args.out, started)


if __name__ == "__main__":
    main()
