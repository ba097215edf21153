"""The unload at LLaMA-7B widths, as the trainer runs it, against a plain in-place merge.

Model: LLaMA decoder layers at LLaMA-7B widths (hidden 4096, intermediate 11008, 32 heads), bf16,
LoRA rank 8 on the seven linears (q, k, v, o, gate, up, down); ``--quick``: 1 layer, else 2
(``--tiny``: hidden 64 / intermediate 176, for the test of this file). The unload is the
trainer's own path (``plora_ray.recorded_unload``: ``build_recorded_plora``, ``recorded_unload``,
``save_plora_checkpoint``, the W_0 source of ``base_weights``), with the default rank tracking
(``plora.rank_sample_layers: 2``), not a copy of it.

* ``plain_merge_s``: the limit, ``W += B @ A`` in bf16, in place, over the same layers, measured
  in the same run (medians of repeats, alternating with the unloads, so both see the same load).
* ``unload_over_plain_merge``: median nearest unload / median plain merge.
  ``unload_over_plain_merge_from_base_20``: the 20th from_base unload (W_0 + the 20 unloads'
  factors, recorder check included) / plain merge.
* Per-layer breakdown (seconds per decoder layer): ``merge`` (the fp32 product, sum and rounding
  of every target), ``bookkeeping`` (merge error), ``rank`` (effective rank of the sampled
  layers from the factors), ``w0_read`` (one read of every target's W_0 from safetensors),
  ``record`` (the rest of the real unload: the recorder's copy of the factors and its replay
  check of one layer, the sampled layers' cumulative error (their drift gains the merge error
  the merge formed anyway, one norm; ||Σ intended||² from the Grams), the adapter's rewrite), the
  ``merge before`` / ``bookkeeping before`` rows: the same merge as PLoRA computed it before it
  dropped its full-size fp32 copies (see ``merge_and_bookkeeping``),
  ``checkpoint`` (``save_plora_checkpoint``: digests of the changed weights, records, state).
  ``merge`` and ``bookkeeping`` are timed apart by running the same operations as
  ``PLoRA.unload`` on one layer; the total is the real unload's.
* ``..._32_layers_est``: the same ratios for 32 decoder layers, estimated: what the 2
  rank-sampled layers add per unload (cumulative error and rank: a nearest run with
  ``rank_sample_layers: 0`` measures it, ``sampled_layers_s_per_unload``) is paid once per
  unload, the rest per layer. With 1-2 layers the sampled targets are up to a third of the
  weights, at 32 layers 2 of 224.
* ``rank_tracking_ms``: what the last unload paid for one sampled layer's effective rank (its
  merge added to the layer's ``FactorGrams``, then the rank), the larger of the two roundings.
* ``host_bytes_per_unload``: growth of the host bytes an unload leaves behind (the recorder's
  fp32 factors of every target; PLoRA's own factors are on the weights' device, which is the
  host on a CPU-only machine and counted then).
* ``projection``: the unload's share of the training time between unloads on 8 GPUs. A 7B step's
  time is tokens per step (global batch 24 x ``max_length`` 512, search_spaces/llama7b_plora.yaml)
  over 8 x ``ASSUMED_TOKENS_PER_S_PER_GPU``; the GPU unload is the measured ratio to a plain merge
  times a plain merge of all 32 layers at ``ASSUMED_HBM_BYTES_PER_S`` (bytes of W read and
  written, bf16). Both figures are stated assumptions (no 7B step was run here), so the share is
  an estimate; the measured ratios are the result.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks.common import parse_args, print_table, write_result
from plora_ray.base_weights import LastReadCache
from plora_ray.config import LoraConfig, ModelConfig, PLoRAConfig, TinyModelConfig
from plora_ray.config.schema import MergeRounding
from plora_ray.effective_rank import FactorGrams
from plora_ray.merge import round_to_dtype, safetensors_base_weights
from plora_ray.model import load_model
from plora_ray.plora import (
    PLoRA,
    TorchParamAccess,
    attach_lora,
    base_param_name,
    lora_pairs,
)
from plora_ray.recorded_unload import build_recorded_plora, recorded_unload, save_plora_checkpoint

VOCAB = 256
# Stated assumptions of the projection (see the module docstring).
ASSUMED_TOKENS_PER_S_PER_GPU = 3000.0  # LoRA fine-tuning of a 7B model, bf16, A100-class GPU
ASSUMED_HBM_BYTES_PER_S = 1.5e12  # sustained HBM bandwidth of an A100-class GPU
LLAMA7B_LAYERS = 32
TOKENS_PER_STEP = 24 * 512  # global batch x max_length of search_spaces/llama7b_plora.yaml


def settings(quick: bool, tiny: bool) -> dict[str, Any]:
    return {
        "hidden": 64 if tiny else 4096,
        "intermediate": 176 if tiny else 11008,
        "heads": 4 if tiny else 32,
        "layers": 1 if quick else 2,
        "rank": 8,
        "nearest_unloads": 5,
        "from_base_unloads": 20,
    }


def build(s: dict[str, Any]) -> torch.nn.Module:
    tiny = TinyModelConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
    )
    model = load_model(ModelConfig(tiny=tiny, dtype="bfloat16"), seed=0, vocab_size=VOCAB)
    return attach_lora(model, LoraConfig(rank=s["rank"], alpha=16.0))


def trained_adapters(model: torch.nn.Module, seed: int) -> None:
    """An update of LR-1e-4 size in every adapter, as training leaves before an unload."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_pairs(model):
            p.B.copy_(torch.randn(p.B.shape, generator=g) * 1e-3)


def plain_merge(model: torch.nn.Module) -> float:
    """The limit: W += B @ A in the backbone's dtype, in place, every target."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in lora_pairs(model):
            p.base.add_(p.B.to(p.base.dtype) @ p.A.to(p.base.dtype))
    return time.perf_counter() - t0


def merge_and_bookkeeping(model: torch.nn.Module) -> dict[str, float]:
    """PLoRA.unload's merge (nearest) and error bookkeeping on every target, timed apart.

    ``merge`` / ``bookkeeping``: the operations of ``PLoRA._merged_weight`` (one fp32 temporary:
    the product, the sum added into it in place, the rounding error subtracted in place;
    ||intended||² from the r x r Grams). ``merge_before`` / ``bookkeeping_before``: the same
    result as PLoRA computed it before that change (fp32 copies of W, the product, the sum and
    the difference), on the same layers in the same run.
    """
    t = dict.fromkeys(("merge", "bookkeeping", "merge_before", "bookkeeping_before"), 0.0)
    with torch.no_grad():
        for p in lora_pairs(model):
            w, a, b = p.base.detach(), p.A.detach().float(), p.B.detach().float()
            t0 = time.perf_counter()
            total = b @ a
            total.mul_(p.scaling)
            total.add_(w)
            new = round_to_dtype(total, w.dtype, "nearest", None)
            t1 = time.perf_counter()
            b64, a64 = b.double(), a.double()
            norm = p.scaling**2 * ((b64.T @ b64) * (a64 @ a64.T)).sum()
            float(torch.linalg.vector_norm(total.sub_(new)).square() / norm)
            t2 = time.perf_counter()
            del total, new
            intended = p.scaling * (b @ a)
            total = w.float() + intended
            new = round_to_dtype(total, w.dtype, "nearest", None)
            t3 = time.perf_counter()
            err = torch.linalg.vector_norm(new.float() - total).square()
            float(err / torch.linalg.vector_norm(intended).square())
            t4 = time.perf_counter()
            del intended, total, new
            t["merge"] += t1 - t0
            t["bookkeeping"] += t2 - t1
            t["merge_before"] += t3 - t2
            t["bookkeeping_before"] += t4 - t3
    return t


def run_unloads(
    s: dict[str, Any],
    rounding: MergeRounding,
    unloads: int,
    base_dir: Path,
    ckpt: Path,
    sample_layers: int = 2,
) -> dict[str, Any]:
    """``unloads`` unloads through the trainer's path; times of the last, checkpoint, rank."""
    model = build(s)
    source = LastReadCache(safetensors_base_weights(base_dir)) if rounding == "from_base" else None
    cfg = PLoRAConfig(
        momentum=0.0, merge_rounding=rounding, unload_every=1, rank_sample_layers=sample_layers
    )
    access = TorchParamAccess(None)
    plora, recorder = build_recorded_plora(model, cfg, 24, 0, access, None, source)
    unload_s, plain_s, host = [], [], []
    for k in range(unloads):
        trained_adapters(model, seed=k)
        before = recorder_bytes(recorder, plora)
        out = recorded_unload(plora, recorder, k + 1, 24 * (k + 1), warned=True)
        unload_s.append(out["unload_s"])
        host.append(recorder_bytes(recorder, plora) - before)
        if rounding == "nearest":
            # The limit, alternating with the unloads (same load); on a copy-free in-place add.
            plain_s.append(plain_merge(model))
    t0 = time.perf_counter()
    save_plora_checkpoint(ckpt, model, plora, recorder, access, write=True)
    checkpoint_s = time.perf_counter() - t0
    rank_ms = []
    for i in plora.sampled:
        # What the last unload paid: its merge added to the Grams of the earlier ones, the rank.
        factors = plora.base_factors[plora.pairs[i].name]
        grams = FactorGrams()
        grams.extend(factors[:-1])
        t0 = time.perf_counter()
        grams.extend(factors)
        grams.rank(cfg.rank_threshold)
        rank_ms.append((time.perf_counter() - t0) * 1000)
    w0_read_s = 0.0
    if source is not None:
        t0 = time.perf_counter()
        for p in plora.pairs:
            source.read(base_param_name(p.name))
        w0_read_s = time.perf_counter() - t0
    return {
        "model": model,
        "unload_s": unload_s,
        "plain_s": plain_s,
        "host_bytes": host,
        "checkpoint_s": checkpoint_s,
        "rank_ms": rank_ms,
        "w0_read_s": w0_read_s,
        "rank_s": sum(rank_ms) / 1000,
    }


def recorder_bytes(recorder: Any, plora: PLoRA) -> int:
    """Host bytes kept across unloads: the recorder's factors, plus PLoRA's when on the host."""
    n = sum(t.nbytes for rec in recorder.records for ld in rec.layers for t in (ld.B, ld.A))
    n += sum(t.nbytes for fs in plora.base_factors.values() for f in fs for t in f if not t.is_cuda)
    return n


def projection(ratio: float, s: dict[str, Any], interval_steps: int) -> dict[str, Any]:
    """The unload's share of training time between unloads on 8 GPUs (see module docstring)."""
    per_layer_bytes = 2 * 2 * (4 * s["hidden"] ** 2 + 3 * s["hidden"] * s["intermediate"])
    plain_gpu_s = LLAMA7B_LAYERS * per_layer_bytes / ASSUMED_HBM_BYTES_PER_S
    step_s = TOKENS_PER_STEP / (8 * ASSUMED_TOKENS_PER_S_PER_GPU)
    unload_gpu_s = ratio * plain_gpu_s
    return {
        "interval_steps": interval_steps,
        "step_s": round(step_s, 3),
        "plain_merge_gpu_s": round(plain_gpu_s, 4),
        "unload_gpu_s": round(unload_gpu_s, 4),
        "share": unload_gpu_s / (interval_steps * step_s),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap_args = parse_args(__doc__.splitlines()[0], argv, extra=[("--tiny", "small widths (tests)")])
    s = settings(ap_args.quick, ap_args.tiny)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        base_dir.mkdir()
        # W_0 in safetensors, as from_base reads the model's own files.
        model0 = build(s)
        save_file(
            {base_param_name(p.name): p.base.detach().contiguous() for p in lora_pairs(model0)},
            str(base_dir / "model.safetensors"),
        )
        pieces = merge_and_bookkeeping(model0)
        merge_s, book_s = pieces["merge"], pieces["bookkeeping"]
        del model0
        near = run_unloads(s, "nearest", s["nearest_unloads"], base_dir, Path(tmp) / "ck_n")
        del near["model"]
        fb = run_unloads(s, "from_base", s["from_base_unloads"], base_dir, Path(tmp) / "ck_fb")
        del fb["model"]
        bare = run_unloads(
            s, "nearest", s["nearest_unloads"], base_dir, Path(tmp) / "ck_0", sample_layers=0
        )
        del bare["model"]
    layers = s["layers"]
    plain = statistics.median(near["plain_s"] + bare["plain_s"])
    ratio = statistics.median(near["unload_s"]) / plain
    ratio_fb = fb["unload_s"][-1] / plain
    # The 2 sampled layers' cost (cumulative error, rank) is per unload, not per decoder layer:
    # at 32 layers it is spread over 32 layers' merges (an estimate from the measured parts).
    fixed = max(0.0, statistics.median(near["unload_s"]) - statistics.median(bare["unload_s"]))
    plain_32 = LLAMA7B_LAYERS * plain / layers
    ratio_32 = (LLAMA7B_LAYERS * (ratio * plain - fixed) / layers + fixed) / plain_32
    ratio_fb_32 = (LLAMA7B_LAYERS * (ratio_fb * plain - fixed) / layers + fixed) / plain_32
    record_s = max(0.0, statistics.median(near["unload_s"]) - merge_s - book_s - near["rank_s"])
    breakdown = [
        {"piece": "plain merge W += B@A (limit)", "s_per_layer": plain / layers},
        {"piece": "merge (nearest)", "s_per_layer": merge_s / layers},
        {"piece": "bookkeeping", "s_per_layer": book_s / layers},
        {"piece": "merge before (fp32 copies)", "s_per_layer": pieces["merge_before"] / layers},
        {"piece": "bookkeeping before", "s_per_layer": pieces["bookkeeping_before"] / layers},
        {"piece": "rank (sampled layers)", "s_per_layer": near["rank_s"] / layers},
        {"piece": "record, sampled layers, rest", "s_per_layer": record_s / layers},
        {"piece": "W_0 read (from_base)", "s_per_layer": fb["w0_read_s"] / layers},
        {"piece": "checkpoint at unload", "s_per_layer": near["checkpoint_s"] / layers},
        {"piece": "unload nearest (total)", "s_per_layer": ratio * plain / layers},
        {"piece": "unload from_base #20 (total)", "s_per_layer": fb["unload_s"][-1] / layers},
    ]
    proj = {
        "paper_interval_200_steps": projection(ratio, s, 200),
        "interval_20_steps": projection(ratio, s, 20),
        "from_base_20_paper_interval": projection(ratio_fb, s, 200),
        "from_base_20_interval_20_steps": projection(ratio_fb, s, 20),
    }
    headline = {
        "unload_over_plain_merge": ratio,
        "unload_over_plain_merge_from_base_20": ratio_fb,
        "unload_over_plain_merge_32_layers_est": ratio_32,
        "unload_over_plain_merge_from_base_20_32_layers_est": ratio_fb_32,
        "rank_tracking_ms": max(near["rank_ms"] + fb["rank_ms"]),
        "host_bytes_per_unload": statistics.median(near["host_bytes"]),
        "goals": "unload_over_plain_merge <= 1.5, from_base_20 <= 2.5, rank_tracking_ms < 50",
    }
    print_table("per decoder layer", breakdown)
    print_table("projected share of training time", [{"case": k, **v} for k, v in proj.items()])
    return write_result(
        "unload_scale",
        ap_args.quick,
        headline,
        {
            "settings": s,
            "breakdown_per_layer": breakdown,
            "unload_s": {
                "nearest": near["unload_s"],
                "from_base": fb["unload_s"],
                "nearest_no_sampled_layers": bare["unload_s"],
            },
            "sampled_layers_s_per_unload": fixed,
            "plain_merge_s": near["plain_s"] + bare["plain_s"],
            "host_bytes": {"nearest": near["host_bytes"], "from_base": fb["host_bytes"]},
            "projection": proj,
            "projection_assumptions": {
                "tokens_per_s_per_gpu": ASSUMED_TOKENS_PER_S_PER_GPU,
                "hbm_bytes_per_s": ASSUMED_HBM_BYTES_PER_S,
                "tokens_per_step": TOKENS_PER_STEP,
                "gpus": 8,
            },
        },
        ap_args.out,
        started,
    )


if __name__ == "__main__":
    main()
