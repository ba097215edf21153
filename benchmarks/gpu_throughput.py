"""GPU throughput of a run config's model under DeepSpeed, PLoRA unloads as the trainer runs them.

``python -m benchmarks.gpu_throughput [--config RUN.yaml] [--quick] [--out FILE.json]``

What a shipped search pays: the model's shape, the sequence length (``data.max_length``), the
micro-batch, gradient checkpointing, the LoRA section (rank, alpha, dropout, targets), the
``plora`` section (rounding, momentum, rank tracking) and the ZeRO stage come from a run YAML
(``--config``, default ``search_spaces/llama7b_plora.yaml``, whose base config is used; the
``search:`` block is ignored). The shape is ``model.tiny``'s, or that of ``model.path``'s
``config.json`` (read with ``AutoConfig``; ``huggyllama/llama-7b``'s is built in, so a machine
without the download runs it). Weights are random, built directly on the GPU in bf16; a DeepSpeed
engine from ``plora_ray.engine.build_engine`` (bf16, torch AdamW on the LoRA parameters); random
tokens. One micro-batch per rank per optimizer step (no gradient accumulation), so a step's
tokens are micro-batch x sequence x ranks.

Figures:
* ``tokens_per_s``: trained tokens per second over the timed steps (after warm-up steps).
* ``mfu``: model FLOPs per second / the GPU's peak dense bf16 FLOPs (table below, by device name).
  Model FLOPs per optimizer step, T = tokens in the step, s = sequence length, n = sequences,
  L = layers, d = hidden size::

      F = T·(4·N_frozen + 6·N_lora) + 12·L·d·s²·n

  where N_frozen counts the weights of every frozen matmul (the seven projections of every
  layer and the LM head; the embedding is a lookup, no FLOPs) and N_lora the LoRA parameters.
  Forward: 2 FLOPs per weight per token for every matmul (2·N_frozen + 2·N_lora). Backward:
  gradients w.r.t. activations through every matmul (2·N_frozen + 2·N_lora), and weight
  gradients only for the trainable LoRA weights (2·N_lora); a frozen weight gets none, which is
  why the usual 6·N_total·T over-counts LoRA training by ~1/3. Attention scores and weighted sum
  (no weights): 4·d·s² per layer and sequence forward, twice that backward, counted over the
  full s x s square as in PaLM (appendix B) although the causal mask makes half of it skippable.
  Activation recomputation (``--grad-ckpt``) is not counted (MFU, not hardware FLOPs
  utilisation). The first layer's input gradients, which autograd skips because the embedding is
  frozen, are counted: an over-count below 1/L of the matmul term.
* ``peak_memory_gb``: ``torch.cuda.max_memory_allocated()`` over the timed training steps, in GB
  (1e9 bytes), weights included. On CPU: the process's peak resident set size (host memory).
* ``unload_ms``: median wall time of a PLoRA unload as the trainer runs it
  (``recorded_unload.recorded_unload``: the backbone recorder, the config's merge rounding --
  ``from_base`` re-reads W_0 from a safetensors copy of the initial weights, as from the model's
  own files -- and its rank tracking, A/B rewrite through the fp32 masters, Adam reset),
  synchronised; ``checkpoint_at_unload_ms``: the PLoRA part of a checkpoint after them
  (``save_plora_checkpoint``).

``--quick``, or no CUDA device: depth and width shrink to a tiny LLaMA of the same structure on
CPU (everything else still from the config), through the same code path (DeepSpeed on gloo), so
tests and CI run it in about a minute; ``mfu`` is then null and ``notes`` says what shrank.
"""

from __future__ import annotations

import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from benchmarks.common import print_table, write_result
from plora_ray.base_weights import LastReadCache
from plora_ray.config import RunConfig, TinyModelConfig, config_from_dict, load_config, load_yaml
from plora_ray.merge import safetensors_base_weights

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

# LLaMA-7B (Touvron et al. 2023, table 2) and the quick CPU stand-in.
LLAMA_7B = TinyModelConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
)
LLAMA_7B_VOCAB = 32000
TINY = TinyModelConfig(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)
TINY_VOCAB = 256
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "search_spaces" / "llama7b_plora.yaml"
# Shapes of hub models a machine without the download can still benchmark.
KNOWN_SHAPES = {"huggyllama/llama-7b": (LLAMA_7B, LLAMA_7B_VOCAB)}

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s from NVIDIA's data sheets, matched by
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.05),
]


def peak_bf16_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by name, or None when the table does not know it."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def model_flops_per_step(
    n_frozen: int, n_lora: int, layers: int, hidden: int, seq: int, sequences: int
) -> float:
    """F = T·(4·N_frozen + 6·N_lora) + 12·L·d·s²·n (see the module docstring)."""
    tokens = sequences * seq
    return float(tokens * (4 * n_frozen + 6 * n_lora) + 12 * layers * hidden * seq**2 * sequences)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Frozen matmul weights (Linear layers incl. the LM head), LoRA parameters, all parameters."""
    n_frozen = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
    )
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    return {"n_frozen_matmul": n_frozen, "n_lora": n_lora, "n_total": n_total}


def _ensure_process_group_env() -> None:
    # A single-rank run outside a launcher: DeepSpeed still wants a process group.
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, value)


def build_model(shape: TinyModelConfig, vocab: int, device: torch.device) -> LlamaForCausalLM:
    """Random-weight LLaMA of ``shape`` built in bf16 directly on ``device`` (no fp32 CPU copy)."""
    from transformers import LlamaForCausalLM

    from plora_ray.model import tiny_llama_config

    config = tiny_llama_config(shape, vocab)
    config._attn_implementation = "sdpa"  # flash / memory-efficient kernels on the GPU
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def model_shape(cfg: RunConfig) -> tuple[TinyModelConfig, int]:
    """The config's model shape and vocabulary: ``model.tiny``, or ``model.path``'s config.json.

    Raises:
        ValueError: ``model.path`` has no readable config.json and is not in ``KNOWN_SHAPES``.
    """
    if cfg.model.tiny is not None:
        return cfg.model.tiny, TINY_VOCAB
    path = str(cfg.model.path)
    if path in KNOWN_SHAPES:
        return KNOWN_SHAPES[path]
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise ValueError(
            f"model.path: expected a model whose config.json can be read, found {path!r} ({exc})"
        ) from None
    shape = TinyModelConfig(
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", hf.num_attention_heads),
        max_position_embeddings=hf.max_position_embeddings,
    )
    return shape, int(hf.vocab_size)


def benchmark_config(
    path: Path, shape: TinyModelConfig, world: int, cuda: bool, stage: int | None
) -> RunConfig:
    """The run config of ``path`` (a search space's base config) set up for the benchmark.

    The model becomes ``shape`` (random weights), one micro-batch per rank per step, unloads
    are triggered by hand (never inside the timed steps), and ``stage`` replaces the ZeRO stage
    when given.
    """
    data = load_yaml(path)
    data.pop("search", None)
    model = dict(data.get("model") or {})
    model.pop("path", None)
    model["tiny"] = {
        k: getattr(shape, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
    }
    micro = int((data.get("batch") or {}).get("micro_batch", 1))
    plora = {**(data.get("plora") or {}), "unload_every": 10**9, "unload_unit": "steps"}
    deepspeed = {**(data.get("deepspeed") or {}), "enabled": True, "bf16": True}
    if stage is not None:
        deepspeed["zero_stage"] = stage
    data.update(
        model=model,
        plora=plora,
        deepspeed=deepspeed,
        batch={"global_batch": micro * world, "micro_batch": micro},
        resources={"num_workers": world, "gpus_per_worker": 1.0 if cuda else 0.0},
    )
    return config_from_dict(data, source=str(path))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run YAML")
    ap.add_argument("--quick", action="store_true", help="tiny depth/width on CPU (a minute)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stage", type=int, default=None, choices=[0, 1, 2, 3], help="ZeRO stage")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps (>= 30)")
    ap.add_argument("--unloads", type=int, default=3, help="timed unloads")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak bf16 TFLOP/s when the device is not in the table",
    )
    args = ap.parse_args(argv)
    if args.steps < 30:
        ap.error(f"--steps: expected >= 30 timed steps, found {args.steps}")
    started = time.time()

    cuda = torch.cuda.is_available() and not args.quick
    notes: list[str] = []
    if not torch.cuda.is_available() and not args.quick:
        notes.append("no CUDA device: ran the tiny CPU size instead of the config's model")
    _ensure_process_group_env()
    from plora_ray.engine import DeepSpeedParamAccess, build_engine, init_distributed
    from plora_ray.plora import attach_lora, base_param_name, lora_pairs
    from plora_ray.recorded_unload import (
        build_recorded_plora,
        recorded_unload,
        save_plora_checkpoint,
    )

    init_distributed()
    world = torch.distributed.get_world_size()
    shape, vocab = model_shape(load_config(args.config))
    if not cuda:
        notes.append(
            f"depth and width shrunk to a tiny LLaMA on CPU (config's model: hidden "
            f"{shape.hidden_size}, {shape.num_hidden_layers} layers); sequence length, "
            "micro-batch, checkpointing, dropout, LoRA and plora sections as in the config"
        )
        shape, vocab = TINY, TINY_VOCAB
    cfg = benchmark_config(args.config, shape, world, cuda, args.stage)
    seq, micro = cfg.data.max_length, cfg.batch.micro_batch
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    steps = args.steps
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    t0 = time.perf_counter()
    llama = build_model(shape, vocab, device)
    if cfg.model.gradient_checkpointing:
        llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(llama, cfg.lora)
    counts = count_params(model)
    tmp = tempfile.TemporaryDirectory()
    base_weights = None
    if cfg.plora.merge_rounding == "from_base":
        # W_0 in safetensors, as from_base reads the model's own files.
        w0_file = Path(tmp.name) / "model.safetensors"
        save_file(
            {base_param_name(p.name): p.base.detach().cpu() for p in lora_pairs(model)},
            str(w0_file),
        )
        base_weights = LastReadCache(safetensors_base_weights(w0_file))
    engine, _, scheduler = build_engine(model, cfg, world, stage_length_steps=1)
    access = DeepSpeedParamAccess(engine)
    plora, recorder = build_recorded_plora(
        engine.module, cfg.plora, cfg.batch.global_batch, cfg.seed, access, scheduler, base_weights
    )
    setup_s = time.perf_counter() - t0
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (micro, seq), generator=gen).to(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def train_step() -> float:
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    for _ in range(warmup):
        train_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    losses = [train_step() for _ in range(steps)]
    sync()
    train_s = time.perf_counter() - t1
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated(device)
        peak_kind = "torch.cuda.max_memory_allocated over the timed steps"
    else:
        # ru_maxrss is in KiB on Linux: the whole process's peak host memory.
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "host peak RSS of the process (no GPU)"

    unload_ms = []
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.unloads):
        train_step()  # a fresh adapter update for each unload
        sync()
        t2 = time.perf_counter()
        recorded_unload(plora, recorder, steps + warmup + i, 0, warned=i > 0)
        sync()
        unload_ms.append((time.perf_counter() - t2) * 1e3)
    unload_peak = torch.cuda.max_memory_allocated(device) if cuda else None
    t3 = time.perf_counter()
    rank0 = torch.distributed.get_rank() == 0
    save_plora_checkpoint(Path(tmp.name) / "ckpt", engine.module, plora, recorder, access, rank0)
    sync()
    checkpoint_ms = (time.perf_counter() - t3) * 1e3
    tmp.cleanup()

    tokens_per_step = micro * seq * world
    tokens_per_s = tokens_per_step * steps / train_s
    flops_step = model_flops_per_step(
        counts["n_frozen_matmul"],
        counts["n_lora"],
        shape.num_hidden_layers,
        shape.hidden_size,
        seq,
        micro * world,
    )
    achieved_tflops = flops_step * steps / train_s / 1e12
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    mfu: float | None = None
    peak_tflops = args.peak_tflops or (peak_bf16_tflops(device_name) if cuda else None)
    if cuda and peak_tflops:
        # Per-GPU: flops_step covers all ranks' tokens, so divide by world GPUs.
        mfu = achieved_tflops / world / peak_tflops
    elif cuda:
        notes.append(f"device {device_name!r} not in the peak-FLOPs table: pass --peak-tflops")
    else:
        notes.append("mfu is null on CPU: no meaningful peak bf16 FLOP/s to compare against")

    headline = {
        "tokens_per_s": round(tokens_per_s, 2),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_memory_gb": round(peak_bytes / 1e9, 3),
        "unload_ms": round(statistics.median(unload_ms), 2) if unload_ms else None,
        "checkpoint_at_unload_ms": round(checkpoint_ms, 2),
        "device": device_name,
    }
    details = {
        "model_shape": {
            "hidden_size": shape.hidden_size,
            "layers": shape.num_hidden_layers,
            "heads": shape.num_attention_heads,
            "intermediate_size": shape.intermediate_size,
            "vocab": vocab,
        },
        "params": counts,
        "config": str(args.config),
        "lora": {
            "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "targets": list(cfg.lora.targets),
        },
        "plora": {
            "merge_rounding": cfg.plora.merge_rounding,
            "momentum": cfg.plora.momentum,
            "rank_sample_layers": cfg.plora.rank_sample_layers,
        },
        "zero_stage": cfg.deepspeed.zero_stage,
        "world_size": world,
        "micro_batch": micro,
        "seq_len": seq,
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "train_seconds": round(train_s, 4),
        "losses": losses,
        "flops_formula": "F_step = T*(4*N_frozen_matmul + 6*N_lora) + 12*L*d*s^2*n_seq "
        "(fwd 2N+2N_lora, bwd activation-grad 2N+2N_lora, LoRA weight-grad "
        "2N_lora; attention fwd 4*L*d*s^2 + bwd 8*L*d*s^2 per sequence; "
        "recomputation not counted)",
        "flops_per_step": flops_step,
        "achieved_tflops": round(achieved_tflops, 3),
        "peak_bf16_tflops": peak_tflops,
        "peak_memory_kind": peak_kind,
        "unload_peak_memory_gb": round(unload_peak / 1e9, 3) if unload_peak is not None else None,
        "unload_ms_all": [round(x, 2) for x in unload_ms],
        "setup_seconds": round(setup_s, 2),
        "notes": notes,
    }
    print_table(
        "gpu_throughput details",
        [
            {
                "figure": "params (total / frozen matmul / lora)",
                "value": (
                    f"{counts['n_total']:,} / {counts['n_frozen_matmul']:,} / {counts['n_lora']:,}"
                ),
            },
            {"figure": "tokens per step", "value": tokens_per_step},
            {"figure": "achieved TFLOP/s", "value": round(achieved_tflops, 3)},
            {"figure": "setup s", "value": round(setup_s, 2)},
        ],
    )
    result = write_result("gpu_throughput", not cuda, headline, details, args.out, started)
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
