"""Chat SFT data: sources -> dialogues -> a mixture -> tokens with assistant-only labels -> batches.

The pipeline, top to bottom, one module per stage:

1. ``sources``: ``load_source`` reads one ``data.sources[i]`` (JSONL, a ``datasets`` dataset, or
   ``bundled:gsm8k``) into ``Dialogue`` objects; ``mix_sources`` builds one epoch's list from the
   sources (``count`` / ``weight``); ``split_held_out`` takes ``data.held_out`` distinct dialogues
   out for the held-out NLL proxy, so nothing leaks.
2. ``tokenization``: the chat template renders each dialogue, assistant tokens alone are labelled
   (-100 elsewhere), rows are truncated to ``data.max_length``; ``pack_examples`` optionally packs
   several examples into one row.
3. ``build``: ``build_datasets`` runs 1 and 2 for a run config and returns the train and held-out
   token sets with ``DataStats`` (``stats``: what the pipeline did).
4. ``batching``: ``Batcher`` serves deterministic, rank-sharded, resumable micro-batches.
"""

from plora_ray.data.batching import Batcher, collate
from plora_ray.data.build import build_datasets
from plora_ray.data.sources import (
    Dialogue,
    load_dialogues,
    load_source,
    mix_sources,
    record_to_messages,
    split_held_out,
)
from plora_ray.data.stats import DataStats, SourceStats
from plora_ray.data.tokenization import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    TokenizedSet,
    assistant_mask_by_prefix,
    ensure_chat_template,
    has_generation_tags,
    pack_examples,
    tokenize_dialogue,
    tokenize_dialogues,
)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "Batcher",
    "DataStats",
    "Dialogue",
    "SourceStats",
    "TokenizedSet",
    "assistant_mask_by_prefix",
    "build_datasets",
    "collate",
    "ensure_chat_template",
    "has_generation_tags",
    "load_dialogues",
    "load_source",
    "mix_sources",
    "pack_examples",
    "record_to_messages",
    "split_held_out",
    "tokenize_dialogue",
    "tokenize_dialogues",
]
