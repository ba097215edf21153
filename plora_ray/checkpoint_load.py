"""Loading a checkpoint's pickled files without letting them run code.

A checkpoint lives in shared storage: whoever can write there could leave a ``.pt`` file whose
pickle calls ``os.system`` on the next resume. So every ``.pt`` file of a checkpoint is read with
``torch.load(weights_only=True)``, which builds only tensors, plain containers and the few types
registered here, and refuses anything else before it is called. DeepSpeed reads its own files with
``weights_only=False``, so its part of the checkpoint is checked first: every global its pickles
name (read from the pickle opcodes, nothing is executed) must be one of the types DeepSpeed's
checkpoints are known to hold.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEEPSPEED_CHECKPOINT_GLOBALS",
    "UnsafeCheckpointError",
    "check_deepspeed_checkpoint",
    "load_pickled_state",
]

# What the run's own .pt files hold besides tensors and containers: NumPy's RNG state (a uint32
# ndarray in ``rng_rank{r}.pt``). Reconstructing an ndarray runs no user code.
_STATE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.ndarray,
    np.dtype,
    np.dtypes.UInt32DType,
]

# Globals DeepSpeed's checkpoint files name beyond what ``weights_only`` allows anyway (tensors,
# storages, OrderedDict, torch.Size): its ZeRO optimizer states hold these. Plain classes restored
# from their attribute dicts; none runs code of its own when unpickled.
DEEPSPEED_CHECKPOINT_GLOBALS = frozenset(
    {
        # DeepSpeed's BF16_Optimizer state (ZeRO 1 with fp32 gradient accumulation) pickles a
        # getattr call; allowed here with the other names this scan accepts, so what it can
        # reach is limited to those (a weaker guarantee than weights_only=True).
        "builtins.getattr",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than plain state (it could run code on load)."""


def load_pickled_state(path: str | os.PathLike[str]) -> Any:
    """``torch.load`` of one of the run's own ``.pt`` files, refusing anything that is not data.

    Args:
        path: the file (``plora_state.pt``, ``trainable.pt``, ``rng_rank{r}.pt``).

    Returns:
        What the file holds: tensors, numbers, strings, containers, NumPy arrays.

    Raises:
        UnsafeCheckpointError: the file names a type or function outside that set (a pickled
            object that could run code); nothing of it was built.
        FileNotFoundError: the file is missing.
    """
    try:
        with torch.serialization.safe_globals(_STATE_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(_refusal(path, str(exc).splitlines()[-1])) from None


def _refusal(path: str | os.PathLike[str], found: str) -> str:
    return (
        f"{path}: expected a checkpoint file of tensors and plain values, found {found}; "
        "refusing to load it (a checkpoint that names other objects could run code on resume: "
        "was it written by another program?)"
    )


def _pickle_globals(path: Path) -> list[str]:
    # Only the pickle's opcodes are read; no object of the file is built.
    if not zipfile.is_zipfile(path):
        raise UnsafeCheckpointError(_refusal(path, "a file that is not torch's zip format"))
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def check_deepspeed_checkpoint(directory: str | os.PathLike[str]) -> None:
    """Check every ``.pt`` file under a DeepSpeed checkpoint directory before DeepSpeed loads it
    (DeepSpeed itself unpickles with ``weights_only=False``).

    Args:
        directory: the checkpoint's ``deepspeed/`` directory.

    Raises:
        UnsafeCheckpointError: a file names a global outside ``DEEPSPEED_CHECKPOINT_GLOBALS``.
    """
    for path in sorted(Path(directory).rglob("*.pt")):
        unknown = sorted(set(_pickle_globals(path)) - DEEPSPEED_CHECKPOINT_GLOBALS)
        if unknown:
            raise UnsafeCheckpointError(_refusal(path, f"the globals {unknown}"))
