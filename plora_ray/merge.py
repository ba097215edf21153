"""Merge rounding: how an unload's fp32 update lands in a bf16 / fp16 backbone.

An unload computes the merged update (1-m)·ΔW in fp32; the backbone keeps its own dtype, so the
sum is rounded (``plora.merge_rounding``):

* ``"nearest"`` silently drops per-element updates below half a bf16 ulp, so it is biased for
  small, consistent updates.
* ``"stochastic"`` (the default) rounds up with probability equal to the fractional distance to
  the next representable value: unbiased, and it needs only per-layer temporaries, but its
  zero-mean error adds up like a random walk over unloads.
* ``"from_base"`` (``PLoRA(..., base_weights=source)``; the trainer passes the model's
  safetensors, ``safetensors_base_weights``, or for the tiny model a copy of its initial weights)
  escapes that walk without device memory of backbone size: the unload keeps each layer's merged
  low-rank factors ((1-m)·scaling·B and A, fp32, on the weights' device) and writes
  W_k = round_nearest(W_0 + Σ_{s<=k} intended_s) (``merge_from_base``), with W_0 re-read layer by
  layer from its source, so the error is one rounding of the exact target and does not grow with
  the number of unloads. Its costs: device memory for the factors growing with T (a host copy
  only in checkpoints), one (out x T·r)·(T·r x in) product per layer per unload, and one read
  of W_0 per unload (shared with the checkpoint's recorder, ``base_weights.LastReadCache``). The
  checkpoint replays it from the factors it stores anyway (``checkpoint.replay_backbone``).

The measured errors of the three modes are in README and ``benchmarks/merge_precision.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args

import torch
from safetensors import safe_open

from plora_ray.config import ElementRounding

# What round_to_dtype does element-wise; from_base is an unload mode built on "nearest".
ROUNDINGS: tuple[str, ...] = get_args(ElementRounding)
# One merge's low-rank factors (coef·B, A), fp32, as an unload keeps them.
Factors = tuple[torch.Tensor, torch.Tensor]

__all__ = [
    "MERGE_ERROR_WARN_THRESHOLD",
    "ROUNDINGS",
    "Factors",
    "add_with_rounding",
    "merge_error_warning",
    "merge_from_base",
    "round_to_dtype",
    "safetensors_base_weights",
]


def round_to_dtype(
    x: torch.Tensor, dtype: torch.dtype, rounding: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Round an fp32 tensor to ``dtype`` by round-to-nearest or stochastic rounding.

    Stochastic rounding picks the next representable value away from the nearest one with
    probability equal to the distance to it over the spacing, so E[result] = x. For bf16 it adds
    16 random low bits to the fp32 bit pattern and truncates (sign-magnitude truncation rounds the
    magnitude, which is unbiased for both signs); for fp16 it compares against ``nextafter``.
    fp32 targets are returned as they are.

    Raises:
        ValueError: unknown ``rounding``, or a non-fp32 input.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(
            f"plora.merge_rounding: expected one of {', '.join(ROUNDINGS)}, found {rounding!r}"
        )
    if x.dtype != torch.float32:
        raise ValueError(f"x.dtype: expected torch.float32, found {x.dtype!r}")
    if dtype == torch.float32:
        return x
    if rounding == "nearest" or dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    if dtype == torch.bfloat16:
        bits = x.contiguous().view(torch.int32)
        noise = torch.randint(
            0, 1 << 16, x.shape, generator=generator, dtype=torch.int32, device=x.device
        )
        # -65536 == ~0xFFFF: clear the 16 bits bf16 drops; the bf16 cast is then exact.
        return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)
    near = x.to(dtype)
    err = x - near.float()
    toward = torch.where(
        err > 0,
        torch.tensor(math.inf, dtype=dtype, device=x.device),
        torch.tensor(-math.inf, dtype=dtype, device=x.device),
    )
    other = torch.nextafter(near, toward)
    spacing = (other.float() - near.float()).abs()
    prob = torch.where(spacing > 0, err.abs() / spacing, torch.zeros_like(err))
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u < prob, other, near)


def add_with_rounding(
    weight: torch.Tensor,
    delta_fp32: torch.Tensor,
    rounding: str,
    generator: torch.Generator | None,
) -> None:
    """In place: weight <- round(weight + delta) in weight's dtype (the sum is formed in fp32).

    Memory: one fp32 copy of this one tensor (plus random bits for stochastic rounding), never
    of the whole backbone.
    """
    with torch.no_grad():
        total = weight.float() + delta_fp32.to(device=weight.device, dtype=torch.float32)
        weight.copy_(round_to_dtype(total, weight.dtype, rounding, generator))


def merge_from_base(
    w0: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> torch.Tensor:
    """``from_base``'s new weight: round_nearest(W_0 + Σ_s B_s A_s) in ``dtype``, on W_0's device.

    One product of the stacked factors, Σ_s B_s A_s = [B_1 .. B_k] [A_1; ..; A_k], in fp32 (W_0
    needs no fp32 copy of its own). The unload and the checkpoint replay both call this, so they
    compute the same bits.

    Args:
        w0: the original weight (any float dtype; the sum is formed in fp32).
        factors: ``(coef_s * B_s, A_s)`` of every unload so far, fp32, in unload order.
        dtype: the backbone's dtype.
    """
    dev = w0.device
    bs = torch.cat([b for b, _ in factors], dim=1).to(dev)
    as_ = torch.cat([a for _, a in factors], dim=0).to(dev)
    # One fp32 temporary: the product, with W_0 added in place (the same bits as
    # ``w0.float() + product``: fp32 addition commutes and W_0 is exact in fp32).
    total = bs @ as_
    total.add_(w0)
    return round_to_dtype(total, dtype, "nearest", None)


def safetensors_base_weights(model_dir: str | Path) -> Callable[[str], torch.Tensor]:
    """A ``base_weights`` source reading W_0 from a model directory's ``*.safetensors`` files.

    The files are memory-mapped (``safe_open``); each call loads one tensor, so at most one layer
    of the original weights is resident at a time.

    Args:
        model_dir: a directory (every ``*.safetensors`` file in it) or one ``.safetensors`` file.

    Raises:
        FileNotFoundError: the directory has no ``*.safetensors`` file.
        KeyError: (when called) a name no file holds.
    """
    given = Path(model_dir)
    files = [given] if given.is_file() else sorted(given.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"base weights: expected *.safetensors files in {model_dir}, found none"
        )
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                where[key] = f

    def read(name: str) -> torch.Tensor:
        if name not in where:
            raise KeyError(
                f"base weights in {model_dir}: expected a tensor named {name!r}, found none"
            )
        with safe_open(str(where[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    return read


# A per-unload merge error above this (5% of the intended update, ||applied - intended||_F /
# ||intended||_F) means the merges are small against the weights' rounding spacing: the trainer
# warns once per run (``merge_error_warning``).
MERGE_ERROR_WARN_THRESHOLD = 0.05


def merge_error_warning(report: Mapping[str, Any], rounding: str) -> str | None:
    """The warning for an unload whose merge error exceeds ``MERGE_ERROR_WARN_THRESHOLD``, or None.

    What helps depends on the rounding: ``nearest`` drops merges below half a spacing and
    ``stochastic`` lets the error random-walk over unloads, while ``from_base`` keeps the
    backbone within one rounding of W_0 + Σ merges however many unloads there are (its
    per-unload error stays large, but does not add up: see ``cumulative_rel_error``).

    Args:
        report: the unload's report (``UnloadReport.as_dict()``: ``index``, ``step``,
            ``merge_rel_error``, ``cumulative_rel_error``).
        rounding: ``plora.merge_rounding``.
    """
    error = float(report["merge_rel_error"])
    if not error > MERGE_ERROR_WARN_THRESHOLD:
        return None
    head = (
        f"plora.merge_rounding={rounding}: unload {report['index']} (step {report['step']}) "
        f"applied its merge with a relative error of {error:.1%} (warning above "
        f"{MERGE_ERROR_WARN_THRESHOLD:.0%}): the merged update is small against the rounding "
        "spacing of the backbone's dtype"
    )
    if rounding == "from_base":
        cum = report.get("cumulative_rel_error")
        return head + (
            "; from_base keeps the backbone within one rounding of W_0 + every merge "
            f"(cumulative_rel_error {'n/a' if cum is None else f'{cum:.1%}'}), so the error does"
            " not add up over unloads; a larger lr or a longer plora.unload_every makes each"
            " merge larger"
        )
    return head + (
        "; set plora.merge_rounding=from_base to keep the backbone within one rounding of "
        "W_0 + every merge instead of one rounding per unload"
    )
