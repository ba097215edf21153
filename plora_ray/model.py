"""Base model and tokenizer: a local path / hub id, or a tiny LLaMA built from config fields.

The tiny model is the embedded default: random weights, seeded, so every run and test is
reproducible without network. Its tokenizer is a real ``transformers`` fast tokenizer (byte-level
BPE, 2,048 tokens) trained offline on the bundled GSM8K train split and shipped in
``plora_ray/assets/tiny_tokenizer`` (rebuild with ``python -m plora_ray.model --build-tokenizer``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from plora_ray.config import BUNDLED_DATA_DIR, ModelConfig, TinyModelConfig, resolve_model_path

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER_DIR = ASSETS / "tiny_tokenizer"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The chat template of the tiny tokenizer. Roles are marked by special tokens and every turn ends
# with <|end|>. The {% generation %} markers let transformers return the assistant-token mask
# (apply_chat_template(..., return_assistant_tokens_mask=True)), which is how the loss is put on
# assistant tokens only.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
# BpeTrainer gives the special tokens the first ids, in list order. Generation stops at </s> and
# at <|end|>, the token that ends every turn of the chat template: a chat model stops at the end
# of its turn (``generate`` reads the list from the generation config).
TINY_EOS_TOKEN_IDS = [TINY_SPECIAL_TOKENS.index("</s>"), TINY_SPECIAL_TOKENS.index("<|end|>")]


def build_tiny_tokenizer(out_dir: Path = TINY_TOKENIZER_DIR, vocab_size: int = 2048) -> None:
    """Train the tiny model's byte-level BPE tokenizer on bundled GSM8K train and save it.

    Deterministic for a given tokenizers version; the result is shipped, so users never run this.
    """
    texts = []
    with open(BUNDLED_DATA_DIR / "gsm8k" / "train.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            texts.append(rec["question"] + "\n" + rec["answer"])
    tok = Tokenizer(tokenizer_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=TINY_SPECIAL_TOKENS[4:],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(str(out_dir))


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a model config: ``model.tokenizer``, else ``model.path``, else the tiny one.

    A tokenizer without a pad token gets its EOS token as pad (LLaMA ships none).

    Raises:
        FileNotFoundError: a local directory without tokenizer files.
    """
    source = resolve_model_path(cfg.tokenizer or cfg.path or str(TINY_TOKENIZER_DIR))
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"model.tokenizer: expected a tokenizer (tokenizer.json or tokenizer.model) at "
            f"{source!r}, found none: {exc}"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama_config(tiny: TinyModelConfig, vocab_size: int) -> LlamaConfig:
    """The tiny LLaMA's transformers config (``model.tiny``) for a vocabulary of ``vocab_size``."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_parameters={"rope_theta": tiny.rope_theta, "rope_type": "default"},
        tie_word_embeddings=False,
        bos_token_id=TINY_SPECIAL_TOKENS.index("<s>"),
        eos_token_id=TINY_EOS_TOKEN_IDS,
        pad_token_id=TINY_SPECIAL_TOKENS.index("<pad>"),
    )


def load_model(cfg: ModelConfig, seed: int = 0, vocab_size: int | None = None) -> PreTrainedModel:
    """Load the base model: ``from_pretrained(model.path)`` (a ``bundled:`` name is the shipped
    directory) or a seeded tiny LLaMA.

    Args:
        cfg: the model section.
        seed: seeds the tiny model's random weights (same seed, same weights).
        vocab_size: the tiny model's vocabulary; default the tiny tokenizer's size.

    Raises:
        FileNotFoundError: ``model.path`` is a directory without weights or config.
    """
    dtype = DTYPES[cfg.dtype]
    if cfg.tiny is not None:
        if vocab_size is None:
            vocab_size = len(load_tokenizer(cfg))
        config = tiny_llama_config(cfg.tiny, vocab_size)
        # Build under a fixed seed, then restore the caller's RNG so model building does not
        # change data order or dropout masks.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
        # transformers wraps Module.to with functools.wraps, so mypy sees the unbound signature.
        return model.to(dtype)  # type: ignore[arg-type]
    # ModelConfig's own check: exactly one of model.path and model.tiny is set.
    assert cfg.path is not None
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolve_model_path(cfg.path), dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"model.path: expected a model directory or hub id with config and weights, found "
            f"{cfg.path!r}: {exc}"
        ) from exc


def check_lora_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """Raise ValueError naming ``lora.targets`` and each name the model has no Linear for."""
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            "lora.targets: expected names of the model's linear layers "
            f"({', '.join(sorted(names))}), "
            f"found {missing} which the model lacks"
        )


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-tokenizer", action="store_true")
    if ap.parse_args().build_tokenizer:
        build_tiny_tokenizer()
        print(f"wrote {TINY_TOKENIZER_DIR}")
