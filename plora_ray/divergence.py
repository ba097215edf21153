"""The divergence guard: a run stops when its loss is not finite or jumps far above its mean.

Its settings are ``train.divergence_loss_multiple`` and ``train.divergence_window``; its window
is part of a checkpoint (``state_dict``), so a resumed run judges the next loss as the
uninterrupted run would.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["DivergenceGuard"]


class DivergenceGuard:
    """Stops a run whose loss is NaN/inf or jumps above a multiple of its running mean.

    The running mean is over the last ``window`` step losses before the current one; the first
    step has no mean and is only checked for being finite.

    Args:
        multiple: ``train.divergence_loss_multiple`` (> 1).
        window: ``train.divergence_window`` (>= 1).
    """

    def __init__(self, multiple: float, window: int) -> None:
        self.multiple = float(multiple)
        self.window = int(window)
        self.history: deque[float] = deque(maxlen=self.window)

    def check(self, loss: float) -> str | None:
        """Record ``loss``; return why the run diverged, or None when it did not."""
        if not math.isfinite(loss):
            return f"loss is {loss} (not finite)"
        if self.history:
            mean = sum(self.history) / len(self.history)
            if loss > self.multiple * mean:
                return (
                    f"loss {loss:.4g} > train.divergence_loss_multiple {self.multiple:g} x "
                    f"running mean {mean:.4g} over the last {len(self.history)} steps"
                )
        self.history.append(float(loss))
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)
