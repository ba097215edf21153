"""The DeepSpeed config dict of a run: plain data, built without importing DeepSpeed.

``plora-ray train`` builds it before Ray starts (``plora_ray.preflight``) and
``engine.build_engine`` hands it to DeepSpeed, so a batch or ZeRO setting that DeepSpeed would
refuse fails first, naming the key.
"""

from __future__ import annotations

from typing import Any

import torch

from plora_ray.config import RunConfig

__all__ = ["deepspeed_config"]


def deepspeed_config(
    cfg: RunConfig, world_size: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The DeepSpeed config dict for a run config on ``world_size`` data-parallel ranks.

    Args:
        cfg: the run config; reads ``batch``, ``optim``, ``deepspeed`` and ``model.dtype``.
        world_size: number of data-parallel ranks (``resources.num_workers`` in a Ray run).
        overrides: extra DeepSpeed keys merged in last (nested dicts are merged key by key), for
            settings the run-config schema does not expose (e.g. a test forcing ZeRO-3 to
            partition even tiny parameters with ``stage3_param_persistence_threshold: 0``).

    Raises:
        ValueError: the global batch is not a whole number of micro batches per rank, an offload
            setting does not fit the ZeRO stage, or the model dtype does not fit ``deepspeed.bf16``.
    """
    ds = cfg.deepspeed
    b = cfg.batch
    if world_size < 1:
        raise ValueError(f"world_size: expected an integer >= 1, found {world_size!r}")
    per_step = b.micro_batch * world_size
    if b.global_batch % per_step != 0:
        raise ValueError(
            f"batch.global_batch: expected a multiple of batch.micro_batch x world size = "
            f"{b.micro_batch} x {world_size} = {per_step}, found {b.global_batch}"
        )
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError(
            "deepspeed.offload_optimizer: expected deepspeed.zero_stage >= 1 (ZeRO-Offload "
            f"partitions the optimizer), found zero_stage={ds.zero_stage}"
        )
    if ds.offload_param and ds.zero_stage != 3:
        raise ValueError(
            "deepspeed.offload_param: expected deepspeed.zero_stage = 3 (only ZeRO-3 partitions "
            f"parameters), found zero_stage={ds.zero_stage}"
        )
    if cfg.model.dtype == "float16":
        # fp16 needs dynamic loss scaling, which skips optimizer steps on overflow; PLoRA counts
        # steps and samples for its unload points, so a skipped step would shift them silently.
        raise ValueError(
            "model.dtype: expected 'bfloat16' or 'float32' under DeepSpeed (fp16 loss scaling "
            "skips steps), found 'float16'"
        )
    if cfg.model.dtype == "bfloat16" and not ds.bf16:
        # Without the bf16 section DeepSpeed would run AdamW directly on bf16 weights (no fp32
        # master copy), where updates of size lr x 1 round away against weights of size ~1.
        raise ValueError(
            "deepspeed.bf16: expected true when model.dtype is 'bfloat16' (DeepSpeed keeps fp32 "
            "master weights only in bf16 mode), found false; set deepspeed.bf16=true or "
            "model.dtype=float32"
        )
    cuda = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    o = cfg.optim
    config: dict[str, Any] = {
        "train_batch_size": b.global_batch,
        "train_micro_batch_size_per_gpu": b.micro_batch,
        "gradient_accumulation_steps": b.global_batch // per_step,
        "gradient_clipping": float(o.grad_clip) if o.grad_clip is not None else 0.0,
        "bf16": {"enabled": bool(ds.bf16)},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW instead of FusedAdam / DeepSpeedCPUAdam: see module docstring.
                "torch_adam": True,
            },
        },
        # The training loop logs; DeepSpeed's own periodic prints would only add noise.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.bf16 and ds.zero_stage >= 1:
        # Sum the micro batches' gradients in fp32: in bf16 each gradient-accumulation add
        # rounds to 8 mantissa bits (2e-3 relative at 3 micro batches). Stage 0 keeps bf16 sums:
        # DeepSpeed refuses fp32 accumulation of bf16 weights without ZeRO ("unsupported mix").
        # At stage 1 DeepSpeed then picks BF16_Optimizer, whose one all-reduce per step would
        # round the fp32 sum back to bf16 (the default communication_data_type), so it reduces
        # in fp32 there: the trainable gradients once per step. Overrides win.
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        if ds.zero_stage == 1:
            config["communication_data_type"] = "fp32"
    if overrides:
        _merge_into(config, overrides)
    return config


def _merge_into(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_into(base[key], value)
        else:
            base[key] = value
