"""Where ``merge_rounding: from_base`` reads the original weights W_0 from.

A from_base unload writes W_k = round_nearest(W_0 + Σ intended) from the original weights (see
``plora_ray.plora``), so every unload and every checkpoint replay re-reads W_0 layer by layer:

* with ``model.path``, from the model's own ``*.safetensors`` files (memory-mapped), which must
  exist: ``from_base_source_problem`` says why not, before Ray starts;
* with ``model.tiny``, from ``DIR/base_weights.safetensors``: the tiny model's initial target
  weights, written at setup by each node's local rank 0 (identical bits on every rank: the model
  is seeded).

The source keeps the last tensor it read (``LastReadCache``): the unload's merge and the
recorder's check of it ask for the same layer one after the other, so each W_0 is read once per
unload, and one layer of W_0 is resident at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import snapshot_download
from safetensors.torch import save as safetensors_bytes

from plora_ray.config import RunConfig, resolve_model_path
from plora_ray.merge import safetensors_base_weights
from plora_ray.plora import base_param_name, lora_pairs
from plora_ray.store import atomic_write

__all__ = [
    "BASE_WEIGHTS_FILE",
    "LastReadCache",
    "base_weights_source",
    "from_base_source_problem",
]

# merge_rounding from_base with model.tiny: the initial target weights, W_0 of every unload.
BASE_WEIGHTS_FILE = "base_weights.safetensors"


class LastReadCache:
    """A W_0 source that returns the tensor it read last again when asked for the same name.

    ``PLoRA.unload`` reads a layer's W_0 for its merge and ``BackboneRecorder`` reads it again
    right after to check the write; with one shared ``LastReadCache`` that is one read. Callers
    must not modify the returned tensor in place (both convert it, which copies).

    Args:
        read: the underlying source (e.g. ``merge.safetensors_base_weights``).
    """

    def __init__(self, read: Callable[[str], torch.Tensor]) -> None:
        self.read = read
        self.reads = 0  # how many tensors came from ``read`` (the benchmark reports it)
        self._last: tuple[str, torch.Tensor] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, self.read(name))
            self.reads += 1
        return self._last[1]


def from_base_source_problem(path: str) -> str | None:
    """Why ``model.path`` cannot be from_base's W_0 source, or None (a hub id is checked on the
    workers, after the download ``from_pretrained`` does anyway)."""
    d = Path(path)
    if not d.is_dir() or any(d.glob("*.safetensors")):
        return None
    found = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    return (
        f"plora.merge_rounding: 'from_base' re-reads the original weights (W_0) from the "
        f"model's *.safetensors files at each unload; expected them in model.path {path}, "
        f"found {', '.join(found[:3]) or 'none'}; save the model with "
        "save_pretrained(dir, safe_serialization=True) or set plora.merge_rounding=stochastic"
    )


def _safetensors_dir(path: str) -> Path:
    """The local directory of ``model.path`` (a hub id resolves to its cached snapshot).

    Raises:
        ValueError: naming plora.merge_rounding, when it holds no *.safetensors file.
    """
    d = Path(path)
    if not d.is_dir():
        d = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    if not any(d.glob("*.safetensors")):
        raise ValueError(
            from_base_source_problem(str(d))
            or f"plora.merge_rounding: 'from_base' needs *.safetensors in {path}"
        )
    return d


def base_weights_source(
    cfg: RunConfig, output_dir: Path, model: torch.nn.Module, local_rank: int, world: int
) -> Callable[[str], torch.Tensor]:
    """from_base's W_0 source for a worker: the model's safetensors, or the tiny model's copy.

    Call before the engine build (ZeRO-3 partitions the weights there), on every rank: with the
    tiny model it holds a barrier after the write.

    Args:
        cfg: the run config.
        output_dir: DIR, where the tiny model's copy goes.
        model: the model with LoRA attached.
        local_rank: this worker's rank on its node (local rank 0 writes the copy).
        world: the number of ranks.

    Returns:
        A ``LastReadCache``: pass the same object to ``PLoRA`` and ``BackboneRecorder``.

    Raises:
        ValueError: ``model.path`` holds no *.safetensors file.
    """
    if cfg.model.path is not None:
        model_dir = _safetensors_dir(resolve_model_path(cfg.model.path))
        return LastReadCache(safetensors_base_weights(model_dir))
    path = output_dir / BASE_WEIGHTS_FILE
    # One writer per node; atomic, so a reader on another node sharing DIR never sees half a file.
    if local_rank == 0:
        tensors = {
            base_param_name(pr.name): pr.base.detach().contiguous().cpu()
            for pr in lora_pairs(model)
        }
        atomic_write(path, [safetensors_bytes(tensors)])
    if world > 1 and dist.is_initialized():
        dist.barrier()
    return LastReadCache(safetensors_base_weights(path))
