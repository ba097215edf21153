"""The tiny pretrained base shipped with the package (``model.path: bundled:tiny_base``).

A random-initialised tiny LLaMA learns next to nothing in a smoke run's few steps, so a search on
it ranks trials by noise. This module builds a small LLaMA (the ``model.tiny`` builder, the
project's offline tokenizer) and pretrains it as a plain language model on bundled text: every
GSM8K *train* question with its worked answer, every MMLU question with its options and answer,
every ARC question with its answer. GSM8K *test*, which the held-out objective ``gsm8k_nll``
scores, is never read. No chat template is used in pretraining; fine-tuning teaches the format.

The result is saved in Hugging Face layout (config.json, generation_config.json,
model.safetensors, the tiny tokenizer's files) with a ``MANIFEST.json`` holding the command, the
settings, the library versions, the pretraining loss curve and each file's sha256. The run is
seeded and single-process on CPU with a fixed thread count and deterministic algorithms, so the
same command gives the same bytes (for the same torch/transformers versions)::

    python -m plora_ray.tiny_base --out plora_ray/assets/tiny_base --seed 0

``benchmarks/learning_real.py`` pretrains its base with the same ``pretraining_texts``,
``token_stream`` and ``pretrain``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plora_ray.config import BUNDLED_DATA_DIR, BUNDLED_MODELS, ModelConfig, TinyModelConfig
from plora_ray.model import DTYPES, TINY_TOKENIZER_DIR, load_model, load_tokenizer

__all__ = [
    "MANIFEST_FILE",
    "PretrainSettings",
    "TINY_BASE_DIR",
    "TINY_BASE_MODEL",
    "build_tiny_base",
    "file_sha256",
    "pretrain",
    "pretraining_texts",
    "token_stream",
]

TINY_BASE_DIR = BUNDLED_MODELS["bundled:tiny_base"]
MANIFEST_FILE = "MANIFEST.json"
# Width 128, 4 layers: big enough that a few dozen fine-tuning steps visibly change the held-out
# NLL, small enough (1.3M parameters) to ship and to fine-tune on a 2-core CPU in seconds.
TINY_BASE_MODEL = TinyModelConfig(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
)


@dataclass(frozen=True)
class PretrainSettings:
    """Plain-LM pretraining: ``steps`` batches of ``batch`` random windows of ``length`` tokens.

    AdamW (betas 0.9/0.95, weight decay 0.1), linear warmup over the first 10% of steps, then a
    cosine decay to 0; gradients clipped at norm 1. ``seed`` seeds the weights and the windows.
    """

    steps: int = 300
    batch: int = 16
    length: int = 256
    lr: float = 3e-3
    seed: int = 0


def pretraining_texts(gsm8k_rows: list[dict[str, str]]) -> list[str]:
    """Plain-text documents: the given GSM8K rows, every MMLU test row and every ARC row, each a
    question followed by its answer (no chat template: instruction-tuning teaches the format).

    Args:
        gsm8k_rows: GSM8K records (``question``, ``answer``) to include, in order.
    """
    texts = [f"{r['question']}\n{r['answer']}" for r in gsm8k_rows]
    for path in sorted((BUNDLED_DATA_DIR / "mmlu" / "test").glob("*.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                choices = [row[f"choice{i}"] for i in range(4)]
                options = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(choices))
                answer = int(row["answer"])
                texts.append(
                    f"{row['question']}\n{options}\nAnswer: {'ABCD'[answer]}. {choices[answer]}"
                )
    for name in ("arc_easy", "arc_challenge"):
        with open(BUNDLED_DATA_DIR / "arc" / f"{name}.jsonl") as fh:
            for line in fh:
                rec = json.loads(line)
                texts.append(f"{rec['query']}\nAnswer: {rec['choices'][rec['gold']]}")
    return texts


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> torch.Tensor:
    """The documents as one token stream, each wrapped in BOS ... EOS."""
    stream: list[int] = []
    # One batch call: the fast tokenizer encodes the documents in parallel, with the same ids.
    for ids in tokenizer(list(texts))["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    return torch.tensor(stream, dtype=torch.long)


def pretrain(
    model: PreTrainedModel, stream: torch.Tensor, s: PretrainSettings, log_every: int = 100
) -> list[float]:
    """Pretrain ``model`` in place on random windows of ``stream``; return each step's loss.

    Args:
        model: a causal LM (fp32 recommended: the optimizer updates the weights in place).
        stream: the token stream (``token_stream``); longer than ``s.length``.
        s: the pretraining settings.
        log_every: print the mean loss of the last ``log_every`` steps every that many steps.

    Raises:
        ValueError: the stream is not longer than one window.
    """
    if len(stream) <= s.length:
        raise ValueError(
            f"pretrain: expected a token stream longer than length={s.length}, found "
            f"{len(stream)} tokens"
        )
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, s.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, k / s.steps))),
    )
    g = torch.Generator().manual_seed(s.seed)
    model.train()
    losses = []
    for step in range(s.steps):
        starts = torch.randint(0, len(stream) - s.length, (s.batch,), generator=g)
        x = torch.stack([stream[i : i + s.length] for i in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0:
            print(
                f"  pretrain step {step + 1}: loss {np.mean(losses[-log_every:]):.3f}", flush=True
            )
    model.eval()
    return losses


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loss_summary(losses: list[float], window: int = 50) -> dict[str, Any]:
    """The loss curve in a few numbers: the first step's loss and each window's mean."""
    means = [
        {
            "steps": f"{k + 1}-{min(k + window, len(losses))}",
            "mean_loss": round(float(np.mean(losses[k : k + window])), 4),
        }
        for k in range(0, len(losses), window)
    ]
    return {"first_step_loss": round(losses[0], 4), "window_means": means}


def build_tiny_base(
    out_dir: Path,
    settings: PretrainSettings = PretrainSettings(),
    dtype: str = "bfloat16",
    threads: int = 1,
    command: str | None = None,
) -> dict[str, Any]:
    """Build, pretrain and save the tiny base in Hugging Face layout with its manifest.

    The run is pinned for reproducibility: ``threads`` intra-op threads and deterministic
    algorithms, both restored afterwards.

    Args:
        out_dir: the directory to write (created; files of the same names are replaced).
        settings: pretraining settings.
        dtype: the saved weights' dtype (trained in fp32, cast once when saving).
        threads: torch's intra-op threads during the run (part of what makes the bytes repeat).
        command: the command line recorded in the manifest; default this process's argv.

    Returns:
        The manifest written to ``out_dir / MANIFEST.json``.

    Raises:
        ValueError: an unknown ``dtype``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
    started = time.perf_counter()
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        cfg = ModelConfig(tiny=TINY_BASE_MODEL, dtype="float32")
        tokenizer = load_tokenizer(cfg)
        with open(BUNDLED_DATA_DIR / "gsm8k" / "train.jsonl") as fh:
            gsm8k_train = [json.loads(line) for line in fh]
        stream = token_stream(tokenizer, pretraining_texts(gsm8k_train))
        model = load_model(cfg, seed=settings.seed, vocab_size=len(tokenizer))
        losses = pretrain(model, stream, settings)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[dtype]).save_pretrained(str(out_dir), safe_serialization=True)  # type: ignore[arg-type]
    for f in sorted(TINY_TOKENIZER_DIR.iterdir()):
        shutil.copyfile(f, out_dir / f.name)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {
        "command": command or "python -m plora_ray.tiny_base " + " ".join(sys.argv[1:]),
        "what": (
            "A tiny LLaMA pretrained as a plain LM on bundled GSM8K train questions+answers, "
            "MMLU test questions+answers and ARC questions+answers (never GSM8K test)."
        ),
        "model": dataclasses.asdict(TINY_BASE_MODEL),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "pretrain": dataclasses.asdict(settings),
        "threads": threads,
        "stream_tokens": len(stream),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "loss": loss_summary(losses),
        "seconds": round(time.perf_counter() - started, 1),
        "sha256": {name: file_sha256(out_dir / name) for name in files},
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """``python -m plora_ray.tiny_base --out DIR [--seed 0] [--steps 400]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory to write")
    ap.add_argument("--seed", type=int, default=PretrainSettings.seed)
    ap.add_argument("--steps", type=int, default=PretrainSettings.steps)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        ap.error(
            f"--steps and --threads: expected integers >= 1, found {args.steps}, {args.threads}"
        )
    command = "python -m plora_ray.tiny_base " + " ".join(sys.argv[1:] if argv is None else argv)
    manifest = build_tiny_base(
        args.out,
        PretrainSettings(steps=args.steps, seed=args.seed),
        dtype=args.dtype,
        threads=args.threads,
        command=command,
    )
    print(
        f"wrote {args.out}: final loss {manifest['loss']['window_means'][-1]['mean_loss']}, "
        f"{manifest['seconds']} s"
    )


if __name__ == "__main__":
    main()
