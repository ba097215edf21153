"""How a PLoRA unload reads and writes parameters: the ``ParamAccess`` protocol.

The unload (``plora_ray.plora``) never touches a parameter directly: plain torch goes through
``TorchParamAccess`` (here), DeepSpeed ZeRO 0-3 through ``plora_ray.engine.DeepSpeedParamAccess``,
and ``checkpoint.BackboneRecorder`` wraps either to record what an unload wrote.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch
from torch import nn

__all__ = ["ParamAccess", "TorchParamAccess"]


class ParamAccess(Protocol):
    """How an unload reads and writes parameters (plain torch, or DeepSpeed ZeRO 0-3).

    The unload calls every method below only inside ``gathered([pair.base, pair.A, pair.B])`` of
    the pair it works on.
    """

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager[None]:
        """Make these full params visible in the module for reading and writing (ZeRO-3
        GatheredParameters with a modifier rank; a no-op elsewhere)."""
        ...

    def read_trainable(self, p: nn.Parameter) -> torch.Tensor:
        """The full fp32 value (the master copy if one exists); the caller may keep it."""
        ...

    def write_trainable(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Write an fp32 value of p's full shape into the module param AND the master copy."""
        ...

    def read_frozen(self, p: nn.Parameter) -> torch.Tensor:
        """The full value of a frozen backbone weight, in its own dtype."""
        ...

    def write_frozen(self, p: nn.Parameter, value: torch.Tensor) -> None:
        """Write a value already in p's dtype, identical on every rank (seeded rounding)."""
        ...

    def reset_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """Reset Adam's state of these params: exp_avg, exp_avg_sq = 0, step = 0."""
        ...


class TorchParamAccess:
    """ParamAccess for a plain torch model and optimizer (e.g. torch.optim.AdamW)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer

    def gathered(self, params: list[nn.Parameter]) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def read_trainable(self, p: nn.Parameter) -> torch.Tensor:
        return p.detach().float().clone()

    def write_trainable(self, p: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(value.to(device=p.device, dtype=p.dtype))

    def read_frozen(self, p: nn.Parameter) -> torch.Tensor:
        return p.detach()

    def write_frozen(self, p: nn.Parameter, value: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(value)

    def reset_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """Zero every tensor of each param's optimizer state (Adam moments) and its step count.

        Zeroing in place (rather than deleting the state) keeps the allocations, so no memory
        spike at the next step, and works for fused / capturable Adam whose step is a tensor.
        """
        if self.optimizer is None:
            return
        for p in params:
            state = self.optimizer.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor):
                    value.zero_()
                elif key == "step":
                    state[key] = 0
