"""``build_datasets``: the data pipeline for one run, sources to token sets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plora_ray.config import RunConfig
from plora_ray.data.sources import load_dialogues, split_held_out
from plora_ray.data.stats import DataStats
from plora_ray.data.tokenization import (
    IGNORE_INDEX,
    TokenizedSet,
    ensure_chat_template,
    pack_examples,
    tokenize_dialogues,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["build_datasets"]


def build_datasets(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, base_dir: Path | None = None
) -> tuple[TokenizedSet, TokenizedSet, DataStats]:
    """Train and held-out token sets for a run, with the pipeline's statistics.

    Order of work: load and mix sources (seed ``cfg.seed``), hold out ``data.held_out``
    dialogues, cap training at ``data.max_samples`` (a seeded subset), tokenize with assistant-only
    labels, pack the training set if ``data.packing`` (the held-out set is never packed: the proxy
    NLL is per example). Every rank computes the same sets.

    Raises:
        ValueError: invalid data (``file:line``), too few samples for ``data.held_out``, or no
            training example left.
        FileNotFoundError: a source file is missing.
    """
    d = cfg.data
    stats = DataStats(max_length=d.max_length)
    stats.chat_template = ensure_chat_template(tokenizer)
    dialogues = load_dialogues(d, base_dir, seed=cfg.seed, stats=stats)
    train_d, held_d = split_held_out(dialogues, d.held_out, cfg.seed)
    if d.max_samples is not None and len(train_d) > d.max_samples:
        rng = np.random.default_rng([cfg.seed, 15485863])
        keep = sorted(rng.permutation(len(train_d))[: d.max_samples])
        train_d = [train_d[i] for i in keep]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kept: list[int] = []
    train_ex = tokenize_dialogues(train_d, tokenizer, d.max_length, stats, kept=kept)
    for i in kept:
        stats.sources[train_d[i].source].used += 1
    held_ex = tokenize_dialogues(held_d, tokenizer, d.max_length, stats)
    if not train_ex:
        raise ValueError(
            "data: expected at least one training example with assistant tokens, "
            f"found none ({stats.dropped_no_labels} dropped, data.max_length="
            f"{d.max_length})"
        )
    if d.packing:
        # Pack in a seeded shuffled order so rows mix sources; Batcher reshuffles rows per epoch.
        order = np.random.default_rng([cfg.seed, 32452843]).permutation(len(train_ex))
        train = pack_examples([train_ex[i] for i in order], d.max_length, int(pad))
    else:
        train = TokenizedSet(
            [e[0] for e in train_ex], [e[1] for e in train_ex], [1] * len(train_ex), int(pad)
        )
    held = TokenizedSet(
        [e[0] for e in held_ex], [e[1] for e in held_ex], [1] * len(held_ex), int(pad)
    )
    stats.train_examples = train.total_examples
    stats.held_out_examples = len(held)
    stats.train_rows = len(train)
    stats.train_tokens = sum(len(r) for r in train.input_ids)
    stats.train_label_tokens = sum(sum(1 for x in r if x != IGNORE_INDEX) for r in train.labels)
    return train, held, stats
