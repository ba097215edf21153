"""An evaluation inside a training run leaves the trainer's state as it found it.

lm-eval seeds the global RNGs (and ``datasets`` draws from them), and scoring needs the model in
eval mode; both are restored afterwards, so a run that evaluates on the way trains on the same
random streams as one that does not.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["eval_mode", "preserved_rng"]


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """lm-eval seeds the global RNGs (and datasets draws from them); give the trainer its
    random, numpy and torch streams back untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, in its previous mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
