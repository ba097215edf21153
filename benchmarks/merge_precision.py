"""Merge precision of PLoRA's unload into a bf16 backbone: nearest vs stochastic vs from_base.

What is measured: after 50 unloads, the cumulative relative Frobenius error
||(W_now - W_0) - Σ intended||_F / ||Σ intended||_F over every target layer
(``PLoRA(..., track_all_layers=True).cumulative_merge_stats()``), where intended = (1-m)·ΔW is what
each unload meant to add, and the retained fraction <W_now - W_0, Σ> / ||Σ||² (1.0 = no bias).
Rounding modes side by side: ``nearest``, ``stochastic`` (the default), ``from_base`` (W_k =
round_nearest(W_0 + Σ intended), W_0 memory-mapped from the base's safetensors; see plora.py).

1. Training-derived (the headline): the bf16 tiny LLaMA (hidden 64, 2 blocks, the embedded tiny
   tokenizer) trains with PLoRA rank 8 (momentum 0.1, AdamW, grad clip 1.0, constant LR) on bundled
   GSM8K train text (causal LM loss, packed sequences), one unload every ``unload_every`` steps, 50
   unloads, at LR 1e-3 (the smoke config's) and 1e-4 (the paper's). The three roundings start from
   the same model and data; their trajectories then differ slightly (each backbone is its own).
   ``rho`` = mean over unloads and layers of ||intended||_F / ||W||_F: the relative size of the
   updates this training produced, to place the run on the sweep below.
2. Synthetic sweep: 50 unloads of a consistent-direction update of relative size rho per unload
   (30% jitter), rho in {1e-3, 1e-2, 3e-2, 1e-1}, on the same bf16 model.

``floor`` = ||round_nearest(W_0 + Σ) - (W_0 + Σ)||_F / ||Σ||_F: the smallest error any bf16
backbone can have for that Σ (each element at its nearest bf16 value), ~1.6e-3·||W|| / ||Σ||.
from_base sits on it by construction; stochastic rounding's random walk adds ~0.4 ulp·sqrt(T).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks.common import parse_args, print_table, write_result
from plora_ray.config import (
    BUNDLED_DATA_DIR,
    LoraConfig,
    MergeRounding,
    ModelConfig,
    PLoRAConfig,
    TinyModelConfig,
)
from plora_ray.merge import safetensors_base_weights
from plora_ray.model import load_model, load_tokenizer
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora, base_param_name, lora_pairs

ROUNDINGS = ("nearest", "stochastic", "from_base")
MODEL_CFG = ModelConfig(tiny=TinyModelConfig(), dtype="bfloat16")


def settings(quick: bool) -> dict[str, Any]:
    return {
        "seed": 0,
        "rank": 8,
        "momentum": 0.1,
        "unloads": 50,
        "batch": 4,
        "length": 64,
        "unload_every": 4 if quick else 20,
        "lrs": [1e-3, 1e-4],
        "rhos": [1e-3, 1e-2, 3e-2, 1e-1],
        "jitter": 0.3,
    }


def floor_error(plora: PLoRA, base_dir: Path) -> float:
    """||nearest(W_0 + Σ) - (W_0 + Σ)||_F / ||Σ||_F over the tracked layers (the bf16 optimum)."""
    src = safetensors_base_weights(base_dir)
    err = norm = 0.0
    for i in plora.tracked:
        p = plora.pairs[i]
        target = src(base_param_name(p.name)).float() + plora.intended_sum[p.name]
        err += float((target.to(torch.bfloat16).float() - target).double().pow(2).sum())
        norm += float(plora.intended_sum[p.name].double().pow(2).sum())
    return (err / norm) ** 0.5 if norm else 0.0


def gsm8k_tokens(s: dict[str, Any]) -> torch.Tensor:
    """Bundled GSM8K train text, tokenized and packed into (N, length) sequences."""
    tok = load_tokenizer(MODEL_CFG)
    need = (s["unloads"] * s["unload_every"]) * s["batch"] * s["length"]
    ids: list[int] = []
    with open(BUNDLED_DATA_DIR / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            ids += tok(rec["question"] + "\n" + rec["answer"] + "\n")["input_ids"]
            if len(ids) >= need:
                break
    n = len(ids) // s["length"]
    return torch.tensor(ids[: n * s["length"]]).view(n, s["length"])


def new_plora(
    rounding: str,
    s: dict[str, Any],
    base_dir: Path,
    opt: torch.optim.Optimizer | None,
    model: torch.nn.Module,
    every: int,
) -> PLoRA:
    cfg = PLoRAConfig(
        unload_every=every,
        unload_unit="steps",
        momentum=s["momentum"],
        merge_rounding=cast(MergeRounding, rounding),
        rank_sample_layers=0,
    )
    return PLoRA(
        model,
        cfg,
        s["batch"],
        s["seed"],
        TorchParamAccess(opt),
        track_all_layers=True,
        base_weights=safetensors_base_weights(base_dir),
    )


def lora_model(s: dict[str, Any], vocab: int | None = None) -> torch.nn.Module:
    model = load_model(MODEL_CFG, seed=s["seed"], vocab_size=vocab)
    torch.manual_seed(s["seed"])  # peft draws the initial A from the global RNG
    return attach_lora(model, LoraConfig(rank=s["rank"]))


def training_run(
    rounding: str, lr: float, s: dict[str, Any], data: torch.Tensor, base_dir: Path
) -> dict[str, Any]:
    """PLoRA training of the bf16 tiny LLaMA with ``unloads`` unloads; merge stats at the end."""
    model = lora_model(s)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    plora = new_plora(rounding, s, base_dir, opt, model, s["unload_every"])
    pairs = lora_pairs(model)
    rhos, per_unload = [], []
    t0 = time.perf_counter()
    step = 0
    while plora.num_unloads < s["unloads"]:
        x = data[(step * s["batch"]) % (len(data) - s["batch"]) :][: s["batch"]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if plora.due(step, step * s["batch"]):
            with torch.no_grad():
                rhos.append(
                    sum(
                        float(
                            (1 - s["momentum"])
                            * p.scaling
                            * (p.B @ p.A).norm()
                            / p.base.float().norm()
                        )
                        for p in pairs
                    )
                    / len(pairs)
                )
            per_unload.append(plora.unload(step, step * s["batch"]).merge_rel_error)
    stats = plora.cumulative_merge_stats()
    return {
        "rounding": rounding,
        "lr": lr,
        "steps": step,
        "final_loss": float(loss),
        "rho": sum(rhos) / len(rhos),
        "mean_per_unload_rel_error": sum(per_unload) / len(per_unload),
        **stats,
        "floor": floor_error(plora, base_dir),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def synthetic_run(rounding: str, rho: float, s: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """50 unloads of a consistent-direction update of relative size ``rho`` per unload."""
    model = lora_model(s, vocab=256)
    pairs = lora_pairs(model)
    g = torch.Generator().manual_seed(5)
    directions = []
    for p in pairs:
        b, a = torch.randn(p.B.shape, generator=g), torch.randn(p.A.shape, generator=g)
        # (1 - m)·scaling·B·A has relative size rho: the part merged is rho of ||W||.
        scale = rho * p.base.float().norm() / ((1 - s["momentum"]) * p.scaling * b @ a).norm()
        directions.append((b * scale, a))
    jitter = (1 + s["jitter"] * torch.randn(s["unloads"], generator=g)).tolist()
    plora = new_plora(rounding, s, base_dir, None, model, 1)
    for k in range(s["unloads"]):
        with torch.no_grad():
            for p, (b, a) in zip(pairs, directions):
                p.B.copy_(b * jitter[k])
                p.A.copy_(a)
        plora.unload(k + 1, k + 1)
    return {
        "rounding": rounding,
        "rho": rho,
        **plora.cumulative_merge_stats(),
        "floor": floor_error(plora, base_dir),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    started = time.time()
    s = settings(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        # The W_0 source of from_base: the base models saved as safetensors (the same seed).
        dirs = {"gsm8k": Path(tmp) / "gsm8k", "synthetic": Path(tmp) / "synthetic"}
        load_model(MODEL_CFG, seed=s["seed"]).save_pretrained(dirs["gsm8k"])
        load_model(MODEL_CFG, seed=s["seed"], vocab_size=256).save_pretrained(dirs["synthetic"])
        data = gsm8k_tokens(s)
        train = []
        for lr in s["lrs"]:
            for r in ROUNDINGS:
                train.append(training_run(r, lr, s, data, dirs["gsm8k"]))
                print(
                    f"  train lr={lr:g} {r}: cum error {train[-1]['cumulative_rel_error']:.4f} "
                    f"({train[-1]['seconds']:.0f} s)",
                    flush=True,
                )
        sweep = [
            synthetic_run(r, rho, s, dirs["synthetic"]) for rho in s["rhos"] for r in ROUNDINGS
        ]
    cols = (
        "rounding",
        "lr",
        "rho",
        "cumulative_rel_error",
        "retained_fraction",
        "floor",
        "mean_per_unload_rel_error",
        "final_loss",
        "seconds",
    )
    print_table(
        f"training-derived, {s['unloads']} unloads every {s['unload_every']} steps, bf16",
        [{k: row[k] for k in cols} for row in train],
    )
    print_table(
        f"synthetic sweep, {s['unloads']} unloads, bf16",
        [
            {
                k: row[k]
                for k in ("rounding", "rho", "cumulative_rel_error", "retained_fraction", "floor")
            }
            for row in sweep
        ],
    )

    def pick(rows: list[dict[str, Any]], key: str, value: float, rounding: str) -> dict[str, Any]:
        return next(r for r in rows if r[key] == value and r["rounding"] == rounding)

    headline: dict[str, Any] = {}
    for r in ROUNDINGS:
        headline[f"merge_cum_rel_error_{r}"] = pick(train, "lr", 1e-3, r)["cumulative_rel_error"]
    for r in ROUNDINGS:
        headline[f"merge_cum_rel_error_{r}_lr1e-4"] = pick(train, "lr", 1e-4, r)[
            "cumulative_rel_error"
        ]
    for r in ROUNDINGS:
        headline[f"merge_retained_{r}"] = pick(train, "lr", 1e-3, r)["retained_fraction"]
    headline["merge_floor_lr1e-3"] = pick(train, "lr", 1e-3, "from_base")["floor"]
    headline["rho_lr1e-3"] = pick(train, "lr", 1e-3, "stochastic")["rho"]
    headline["rho_lr1e-4"] = pick(train, "lr", 1e-4, "stochastic")["rho"]
    for rho in s["rhos"]:
        for r in ROUNDINGS:
            headline[f"sweep_rho{rho:g}_{r}"] = pick(sweep, "rho", rho, r)["cumulative_rel_error"]
        headline[f"sweep_rho{rho:g}_floor"] = pick(sweep, "rho", rho, "from_base")["floor"]
    return write_result(
        "merge_precision",
        args.quick,
        headline,
        {"settings": s, "training": train, "sweep": sweep},
        args.out,
        started,
    )


if __name__ == "__main__":
    main()
