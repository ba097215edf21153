"""Micro-batches for training: deterministic, sharded across ranks, resumable.

``Batcher`` serves micro-batches: a seeded permutation per epoch, rank ``r`` of ``W`` takes its
slice of each global micro-step, and ``samples_seen`` counts samples over all ranks exactly (every
rank knows the global order, so no communication is needed). ``state_dict`` / ``load_state_dict``
resume the identical sequence of batches.

Packed rows and attention. A packed row carries ``position_ids`` that restart at 0 for every
example and no ``attention_mask``. Transformers (>= 4.53, masking_utils) then builds a
block-diagonal causal mask from the position ids, so each example attends only to itself -- but
only when the model runs without a KV cache: call ``model(**batch, use_cache=False)`` (a cache
disables the detection and examples would attend to earlier ones in the row).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from plora_ray.data.tokenization import IGNORE_INDEX, TokenizedSet

__all__ = ["Batcher", "collate"]


def collate(data: TokenizedSet, rows: list[int]) -> dict[str, torch.Tensor]:
    """Right-pad the given rows to their longest one.

    Unpacked: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask``. Packed:
    ``input_ids``, ``labels``, ``position_ids`` and no ``attention_mask`` (see the module docstring;
    run the model with ``use_cache=False``).
    """
    width = max(len(data.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), data.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, i in enumerate(rows):
        n = len(data.input_ids[i])
        ids[b, :n] = torch.tensor(data.input_ids[i])
        labels[b, :n] = torch.tensor(data.labels[i])
        mask[b, :n] = 1
        if data.position_ids is not None:
            pos[b, :n] = torch.tensor(data.position_ids[i])
            # Padding forms its own block of positions, so it is a separate "sequence" that no
            # real token attends to.
            pos[b, n:] = torch.arange(width - n)
    if data.position_ids is not None:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Batcher:
    """Deterministic, sharded, resumable micro-batches over a ``TokenizedSet``.

    The global order is a stream of epochs, each a permutation of the rows seeded by
    ``(seed, epoch)``. Global micro-step ``k`` covers stream positions
    ``[k*M*W, (k+1)*M*W)`` (M = micro batch, W = world size); rank ``r`` takes the ``r``-th slice of
    ``M`` rows. A global micro-step that runs past the end of an epoch continues into the next
    epoch's permutation, so within every epoch each row goes to exactly one rank exactly once and
    no rank ever gets a short batch. Because every rank computes the same stream, ``samples_seen``
    and ``tokens_seen`` count all ranks exactly without communication.

    Args:
        data: the token rows (all ranks pass the same set).
        micro_batch: rows per rank per micro-step.
        rank: this worker's rank.
        world_size: number of workers.
        seed: shuffling seed.

    Raises:
        ValueError: bad rank / world size / micro batch, or an empty set.
    """

    def __init__(
        self, data: TokenizedSet, micro_batch: int, rank: int, world_size: int, seed: int
    ) -> None:
        if len(data) == 0:
            raise ValueError("Batcher: expected a non-empty data set, found 0 rows")
        if micro_batch < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"Batcher: expected micro_batch >= 1 and 0 <= rank < world_size, "
                f"found micro_batch={micro_batch}, rank={rank}, "
                f"world_size={world_size}"
            )
        self.data = data
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.index = 0  # position within the current epoch's permutation
        self.samples_seen = 0  # dialogues consumed by all ranks together
        self.tokens_seen = 0  # non-padding tokens consumed by all ranks together
        self._lengths = np.array([len(r) for r in data.input_ids], dtype=np.int64)
        self._counts = np.array(data.num_examples, dtype=np.int64)
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.data)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._perm_epoch = epoch
        return self._perm

    def _global_rows(self) -> list[int]:
        """The rows of the next global micro-step (all ranks), advancing the position."""
        need = self.micro_batch * self.world_size
        rows: list[int] = []
        while len(rows) < need:
            perm = self._permutation(self.epoch)
            take = perm[self.index : self.index + need - len(rows)]
            rows.extend(int(x) for x in take)
            self.index += len(take)
            if self.index >= len(perm):
                self.epoch += 1
                self.index = 0
        return rows

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        """This rank's next micro-batch (see ``collate`` for the keys)."""
        rows = self._global_rows()
        self.samples_seen += int(self._counts[rows].sum())
        self.tokens_seen += int(self._lengths[rows].sum())
        mine = rows[self.rank * self.micro_batch : (self.rank + 1) * self.micro_batch]
        return collate(self.data, mine)

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed (rows, all ranks)."""
        return self.epoch + self.index / len(self.data)

    def state_dict(self) -> dict[str, Any]:
        """The position: enough to continue with the identical sequence of batches."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "seed": self.seed,
            "rows": len(self.data),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``.

        Raises:
            ValueError: the state was saved for a different data set or seed (the batches would
                differ silently otherwise).
        """
        if state.get("rows") != len(self.data) or state.get("seed") != self.seed:
            raise ValueError(
                f"data position: expected a state for {len(self.data)} rows and seed "
                f"{self.seed}, found rows={state.get('rows')}, "
                f"seed={state.get('seed')} (did the data or seed change?)"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self.samples_seen = int(state["samples_seen"])
        self.tokens_seen = int(state["tokens_seen"])
