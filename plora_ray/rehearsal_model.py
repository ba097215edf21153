"""A LLaMA-7B-shaped model directory for rehearsing the production path without the real weights.

``python -m plora_ray.rehearsal_model OUT [--layers 2] [--seed 0]`` writes, offline, what a user's
``/shared/llama-7b-hf`` looks like to this project: the Hugging Face layout, LLaMA-7B's config
(hidden 4096, intermediate 11008, 32 heads, vocabulary 32,000, RoPE theta 10,000, RMSNorm eps
1e-6, untied embeddings) with only the depth cut (``--layers``), seeded random bf16 weights saved
as *sharded* safetensors with ``model.safetensors.index.json``, and a LLaMA-style tokenizer
(Metaspace BPE with byte fallback, ``<unk>``/``<s>``/``</s>`` at ids 0/1/2, 32,000 tokens, a BOS
prepended, no pad token) *without a chat template*, as the LLaMA-7B base ships, so the project's
``DEFAULT_CHAT_TEMPLATE`` is what trains and evaluates it.

The weights are random, so nothing learned is measured with it: it is there for shapes, memory,
file layout (shards, index, from_base reads), placement and time. Two layers keep it at 0.67 B
parameters (1.3 GB in bf16), which two CPU workers hold; ``--layers 32`` is the full 6.7 B model.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from plora_ray.config import BUNDLED_DATA_DIR

__all__ = [
    "LLAMA7B_SHAPE",
    "TINY_WIDTHS",
    "build_llama_tokenizer",
    "llama7b_config",
    "write_rehearsal_model",
]

# LLaMA-7B's config.json (huggyllama/llama-7b), all but num_hidden_layers (32 there).
LLAMA7B_SHAPE: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LLAMA_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
# The byte-fallback tokens LLaMA's SentencePiece model carries at ids 3-258.
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
# Shards of about a third of the 2-layer model: several files and an index, as a real checkpoint.
DEFAULT_SHARD_SIZE = "500MB"


# ``--tiny``: the same files at toy widths, for dry runs (benchmarks/gpu_check.py --dry-run).
TINY_WIDTHS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def llama7b_config(num_layers: int, widths: dict[str, int] | None = None) -> LlamaConfig:
    """LLaMA-7B's transformers config with ``num_layers`` decoder layers (``widths``: dry runs'
    overrides of the hidden/intermediate sizes and heads)."""
    return LlamaConfig(
        num_hidden_layers=num_layers,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        **{**LLAMA7B_SHAPE, **(widths or {})},
    )


def _bundled_texts() -> Iterator[str]:
    """The tokenizer's training text: the bundled GSM8K train split and every MMLU CSV row."""
    with open(BUNDLED_DATA_DIR / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            yield rec["question"] + "\n" + rec["answer"]
    for path in sorted((BUNDLED_DATA_DIR / "mmlu").rglob("*.csv")):
        with open(path, newline="") as fh:
            for row in csv.reader(fh):
                yield " ".join(row)


def build_llama_tokenizer(vocab_size: int = 32000) -> PreTrainedTokenizerFast:
    """A LLaMA-style fast tokenizer trained offline on bundled text, exactly ``vocab_size`` tokens.

    Metaspace pre-tokenization (``▁`` for spaces), BPE with byte fallback (ids 3-258 are
    ``<0x00>``-``<0xFF>``), a BOS prepended to every encoding, no chat template, no pad token.

    Raises:
        RuntimeError: the bundled text has too few distinct merges to fill ``vocab_size``.
    """
    tok = Tokenizer(tokenizer_models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=LLAMA_SPECIAL_TOKENS + BYTE_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_bundled_texts(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"rehearsal tokenizer: expected {vocab_size} tokens, the bundled text gave "
            f"{tok.get_vocab_size()}"
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.model_max_length = LLAMA7B_SHAPE["max_position_embeddings"]
    return fast


def write_rehearsal_model(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    seed: int = 0,
    max_shard_size: str = DEFAULT_SHARD_SIZE,
    widths: dict[str, int] | None = None,
) -> Path:
    """Write the rehearsal model (config, sharded bf16 safetensors, index, tokenizer) to a dir.

    Args:
        out_dir: the model directory to create (its files are overwritten).
        num_layers: decoder layers (LLaMA-7B has 32).
        seed: seeds the random weights: the same seed writes the same bits.
        max_shard_size: ``save_pretrained``'s shard size.
        widths: overrides of LLaMA-7B's widths (``TINY_WIDTHS`` for dry runs).

    Returns:
        The model directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = llama7b_config(num_layers, widths)
    # Built in bf16 directly: a 32-layer fp32 build would need 27 GB before the cast.
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    build_llama_tokenizer(config.vocab_size).save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m plora_ray.rehearsal_model OUT [--layers N] [--seed S] [--shard-size 500MB]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out", help="the model directory to write")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (LLaMA-7B: 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE)
    ap.add_argument("--tiny", action="store_true", help="toy widths (dry runs), same files")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error(f"--layers: expected an integer >= 1, found {args.layers}")
    out = write_rehearsal_model(
        args.out,
        num_layers=args.layers,
        seed=args.seed,
        max_shard_size=args.shard_size,
        widths=TINY_WIDTHS if args.tiny else None,
    )
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    print(f"wrote {out}: {len(shards)} safetensors shard(s) + index, tokenizer", flush=True)


if __name__ == "__main__":
    main()
