"""Learning on real text: PLoRA vs LoRA vs full fine-tuning of a small pretrained LLaMA on GSM8K.

What it measures: how much of full fine-tuning's gain on a real instruction-tuning task PLoRA
recovers at rank r, against LoRA at the same rank, with everything else identical.

Setup (CPU, fp32, seeded). A small LLaMA (``transformers`` ``LlamaForCausalLM`` from a config,
the project's tiny tokenizer) is first *pretrained* as a plain language model on bundled text
(the loop and the texts of ``plora_ray.tiny_base``, which makes the shipped ``bundled:tiny_base``):
GSM8K questions and worked answers (a part of the train split that fine-tuning never sees), MMLU
questions with their answers and ARC questions with their answers. That base is cached under
``$PLORA_BENCH_CACHE`` (default: the temp dir) keyed by a hash of its settings, so a rerun skips
it; from nothing it is built in the run. Then the base is *instruction-tuned* on GSM8K dialogues
(the project's chat template; loss on the assistant's tokens only) by:

* full fine-tuning (every parameter),
* LoRA rank r (stock peft adapters on the seven LLaMA linears, ``plora_ray.plora.attach_lora``),
* PLoRA rank r: the same adapters plus ``plora_ray.plora.PLoRA``'s unload every ``unload_every``
  optimizer steps, for each momentum m in ``momenta`` and interval in ``unload_intervals``
  (constant LR and an Adam state reset at each unload, as the method says),

at ranks 1 and 8, all in one plain torch loop (no Ray, no DeepSpeed: this measures the method).
Every method of one seed sees the same batches in the same order.

Selection, on VALIDATION (GSM8K train dialogues held out of fine-tuning): each method's LR from its
grid (``lr_grid``: one grid for LoRA and PLoRA, one for full fine-tuning), and the best PLoRA
setting (m, interval) per rank. With ``--quick`` the PLoRA LR is swept at the default setting
(``plora_default``) and the other PLoRA settings reuse it, and the selection runs on seed 0 only;
the chosen configurations then run on the other seeds. Reported on TEST (GSM8K test split).

Figures (on test, all seeds pooled):

* ``answer_nll``: the mean NLL per assistant (answer) token.
* ``gap_closed`` = (L_base - L_method) / (L_base - L_full): the fraction of full fine-tuning's gain
  the method recovers (L_base: the pretrained base, not fine-tuned).
* ``plora_over_lora_rank{r}`` = gap_closed(best PLoRA) / gap_closed(LoRA) at rank r, with a 90%
  interval (``_lo``, ``_hi``) from a paired bootstrap: each resample draws test dialogues and
  seeds with replacement, the same draw for every method, and recomputes every loss from the
  per-dialogue sums.

The whole sweep (every run's validation and test NLL and LR) is in the JSON (``sweep``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from benchmarks.common import parse_args, print_table, write_result
from plora_ray.config import (
    BUNDLED_DATA_DIR,
    BUNDLED_SOURCES,
    DataSource,
    LoraConfig,
    ModelConfig,
    PLoRAConfig,
    TinyModelConfig,
)
from plora_ray.data import IGNORE_INDEX, load_source, record_to_messages, tokenize_dialogue
from plora_ray.model import TINY_TOKENIZER_DIR, load_model, load_tokenizer
from plora_ray.plora import PLoRA, TorchParamAccess, attach_lora
from plora_ray.tiny_base import PretrainSettings, pretrain, pretraining_texts, token_stream

# (input_ids, labels) of one tokenized dialogue; labels are IGNORE_INDEX outside the answer.
Example = tuple[list[int], list[int]]
CACHE_ENV = "PLORA_BENCH_CACHE"


def settings(quick: bool) -> dict[str, Any]:
    """Benchmark settings (``quick``: minutes on a 2-core CPU; otherwise a fuller sweep)."""
    return {
        "model": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4},
        "max_length": 256,
        "pretrain": {"steps": 400, "batch": 16, "length": 256, "lr": 3e-3, "seed": 0},
        # GSM8K train is split once (seeded): validation, a fine-tuning pool, and the rest is
        # pretraining text, so fine-tuning dialogues were never seen as plain text.
        "val_dialogues": 128,
        "finetune_pool": 2000,
        "test_dialogues": 256,
        "steps": 64 if quick else 160,
        "batch": 8,
        "seeds": [0, 1, 2] if quick else [0, 1, 2, 3, 4],
        "ranks": [1, 8],
        "momenta": [0.0, 0.1, 0.3],
        # In optimizer steps: steps / interval stages (8, 4, 2 with --quick).
        "unload_intervals": [8, 16, 32] if quick else [10, 20, 40, 80],
        "plora_default": {"momentum": 0.1, "unload_every": 16 if quick else 20},
        "lr_grid": {"full": [3e-4, 1e-3, 3e-3], "adapter": [1e-3, 3e-3, 1e-2]},
        "sweep_all_seeds": not quick,
        "bootstrap": 2000,
        "threads": 2,
    }


# --------------------------------------------------------------------------- data


@dataclass
class Corpus:
    """Everything tokenized: the pretraining token stream and the three dialogue splits."""

    pretrain_stream: torch.Tensor
    finetune: list[Example]
    val: list[Example]
    test: list[Example]


def tokenize_examples(
    tokenizer: PreTrainedTokenizerBase, dialogues: list[list[dict[str, str]]], max_length: int
) -> list[Example]:
    """Tokenize chat dialogues (answer-only labels), dropping any left without answer tokens."""
    out = []
    for messages in dialogues:
        ids, labels, _ = tokenize_dialogue(tokenizer, messages, max_length)
        if any(label != IGNORE_INDEX for label in labels):
            out.append((ids, labels))
    return out


def load_corpus(s: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> Corpus:
    """Split bundled GSM8K train (seeded) into validation, fine-tuning and pretraining parts,
    take the test dialogues from GSM8K test, and tokenize everything."""
    train_path, _ = BUNDLED_SOURCES["bundled:gsm8k"]
    with open(train_path) as fh:
        rows = [json.loads(line) for line in fh]
    order = np.random.default_rng(s["pretrain"]["seed"]).permutation(len(rows))
    n_val, n_ft = s["val_dialogues"], s["finetune_pool"]
    val_rows = [rows[i] for i in order[:n_val]]
    pre_rows = [rows[i] for i in order[n_val + n_ft :]]
    with open(BUNDLED_DATA_DIR / "gsm8k" / "test.jsonl") as fh:
        test_rows = [json.loads(line) for line in fh][: s["test_dialogues"]]
    # The train split through the project's own loader, so a dialogue is exactly what a run
    # trains on (``bundled:gsm8k`` -> user question, assistant answer).
    dialogues = [d.messages for d in load_source(DataSource(path="bundled:gsm8k"))]
    assert len(dialogues) == len(rows)

    def msgs(rs: list[dict[str, str]]) -> list[list[dict[str, str]]]:
        return [record_to_messages(r, "gsm8k") for r in rs]

    return Corpus(
        pretrain_stream=token_stream(tokenizer, pretraining_texts(pre_rows)),
        finetune=tokenize_examples(
            tokenizer, [dialogues[i] for i in order[n_val : n_val + n_ft]], s["max_length"]
        ),
        val=tokenize_examples(tokenizer, msgs(val_rows), s["max_length"]),
        test=tokenize_examples(tokenizer, msgs(test_rows), s["max_length"]),
    )


def pad_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(pool_size: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """The fine-tuning batches of one seed (indices into the pool): every method gets these."""
    g = np.random.default_rng(1000 + seed)
    order: list[int] = []
    while len(order) < steps * batch:
        order += g.permutation(pool_size).tolist()
    return [order[k * batch : (k + 1) * batch] for k in range(steps)]


# --------------------------------------------------------------------------- models


def model_config(s: dict[str, Any]) -> ModelConfig:
    return ModelConfig(tiny=TinyModelConfig(**s["model"]), dtype="float32")


def cache_path(s: dict[str, Any]) -> Path:
    """Where the pretrained base of these settings is cached (the key hashes every setting that
    changes it, and the tokenizer's files)."""
    key = {k: s[k] for k in ("model", "pretrain", "val_dialogues", "finetune_pool")}
    tok_hash = hashlib.sha256((TINY_TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps([key, tok_hash], sort_keys=True).encode()).hexdigest()
    root = Path(os.environ.get(CACHE_ENV) or tempfile.gettempdir())
    return root / "plora_ray_learning_real" / f"base_{digest[:16]}.pt"


def pretrain_base(s: dict[str, Any], corpus: Corpus) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The pretrained base: loaded from the cache, or trained (seeded, ``plora_ray.tiny_base``'s
    ``pretrain`` loop) and cached."""
    p = s["pretrain"]
    model = load_model(model_config(s), seed=p["seed"])
    path = cache_path(s)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), {"cached": True, "path": str(path)}
    t0 = time.perf_counter()
    losses = pretrain(model, corpus.pretrain_stream, PretrainSettings(**p))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    info = {
        "cached": False,
        "path": str(path),
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": float(np.mean(losses[-50:])),
        "stream_tokens": len(corpus.pretrain_stream),
    }
    return model.eval(), info


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module, examples: list[Example], pad_id: int, batch: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Per dialogue: the summed NLL of its answer tokens, and how many there are."""
    model.eval()
    sums, counts = [], []
    for k in range(0, len(examples), batch):
        b = pad_batch(examples[k : k + batch], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        target = b["labels"][:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            target.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(target.shape)
        sums.append(nll.sum(1).double().numpy())
        counts.append((target != IGNORE_INDEX).sum(1).numpy())
    return np.concatenate(sums), np.concatenate(counts)


@dataclass(frozen=True)
class Method:
    """One fine-tuning configuration (``rank``/``momentum``/``unload_every`` unused by full)."""

    kind: str  # full | lora | plora
    rank: int = 0
    momentum: float = 0.0
    unload_every: int = 0

    @property
    def label(self) -> str:
        if self.kind == "full":
            return "full"
        if self.kind == "lora":
            return f"lora r{self.rank}"
        return f"plora r{self.rank} m{self.momentum:g} every{self.unload_every}"


@dataclass
class Finetuning:
    """One fine-tuning in progress: the model, its trainable parameters, optimizer and PLoRA
    (None but for ``plora``). ``finetune`` runs one to the end; ``benchmarks.search_quality``
    steps, checkpoints and evaluates one inside a Tune trial."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    plora: PLoRA | None


def start_finetune(
    base: PreTrainedModel, method: Method, lr: float, seed: int, batch: int
) -> Finetuning:
    """A copy of ``base`` with the method's adapters (none for full), its AdamW and, for
    ``plora``, its PLoRA unloading every ``method.unload_every`` steps of ``batch`` samples."""
    torch.manual_seed(seed)  # peft draws the initial A from the global RNG
    model: torch.nn.Module = copy.deepcopy(base)
    lora = LoraConfig(rank=max(1, method.rank), alpha=2.0 * max(1, method.rank), dropout=0.0)
    model = attach_lora(model, lora, "full" if method.kind == "full" else "lora")
    params = [p for p in model.parameters() if p.requires_grad]
    # beta2 0.99 and no weight decay: the paper's optimizer.
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    plora = None
    if method.kind == "plora":
        cfg = PLoRAConfig(
            unload_every=method.unload_every,
            unload_unit="steps",
            momentum=method.momentum,
            merge_rounding="nearest",
            rank_sample_layers=0,
        )
        plora = PLoRA(model, cfg, batch, seed, TorchParamAccess(opt))
    return Finetuning(model, params, opt, plora)


def train_step(ft: Finetuning, examples: list[Example], pad_id: int) -> None:
    """One optimizer step on one batch (gradients clipped at norm 1); the unload is the caller's."""
    b = pad_batch(examples, pad_id)
    ft.model(**b).loss.backward()
    torch.nn.utils.clip_grad_norm_(ft.params, 1.0)
    ft.opt.step()
    ft.opt.zero_grad(set_to_none=True)


def finetune(
    base: PreTrainedModel,
    corpus: Corpus,
    batches: list[list[int]],
    method: Method,
    lr: float,
    seed: int,
    pad_id: int,
) -> tuple[torch.nn.Module, int]:
    """Instruction-tune a copy of ``base`` with one method on the given batches.

    Returns:
        The fine-tuned model and the number of PLoRA unloads (0 for the others).
    """
    ft = start_finetune(base, method, lr, seed, len(batches[0]))
    ft.model.train()
    for step, rows in enumerate(batches, start=1):
        train_step(ft, [corpus.finetune[i] for i in rows], pad_id)
        if ft.plora is not None and ft.plora.due(step, step * len(rows)):
            ft.plora.unload(step, step * len(rows))
    return ft.model, ft.plora.num_unloads if ft.plora is not None else 0


# --------------------------------------------------------------------------- statistics


def pooled_loss(sums: np.ndarray, counts: np.ndarray) -> float:
    """Mean NLL per answer token over every (seed, dialogue) cell given."""
    return float(sums.sum() / counts.sum())


def gap_closed(l_base: float, l_method: float, l_full: float) -> float:
    """(L_base - L_method) / (L_base - L_full): the fraction of full fine-tuning's gain."""
    return (l_base - l_method) / (l_base - l_full)


def paired_bootstrap_ratio(
    per_method: dict[str, tuple[np.ndarray, np.ndarray]],
    base: tuple[np.ndarray, np.ndarray],
    num: str,
    den: str,
    resamples: int,
    seed: int = 0,
    level: float = 0.9,
) -> tuple[float, float, float]:
    """gap_closed(num) / gap_closed(den) and its paired bootstrap interval.

    Args:
        per_method: method -> (NLL sums, answer-token counts), each of shape (seeds, dialogues);
            must hold ``full``, ``num`` and ``den``.
        base: the base model's (sums, counts), shape (dialogues,): it does not depend on a seed.
        num: the method in the numerator (e.g. the best PLoRA).
        den: the method in the denominator (e.g. LoRA at the same rank).
        resamples: bootstrap draws; each draws seeds and dialogues with replacement, the same
            draw for every method (paired).
        seed: the bootstrap's own RNG seed.
        level: the interval's coverage (0.9: the 5th and 95th percentiles).

    Returns:
        (ratio on the data, interval low, interval high).
    """

    def ratio(ws: np.ndarray, wd: np.ndarray) -> float:
        def loss(sums: np.ndarray, counts: np.ndarray) -> float:
            return float(ws @ sums @ wd / (ws @ counts @ wd))

        l_base = float(base[0] @ wd / (base[1] @ wd))
        full = loss(*per_method["full"])
        return gap_closed(l_base, loss(*per_method[num]), full) / gap_closed(
            l_base, loss(*per_method[den]), full
        )

    n_seeds, n_dialogues = per_method["full"][0].shape
    point = ratio(np.ones(n_seeds), np.ones(n_dialogues))
    g = np.random.default_rng(seed)
    draws = [
        ratio(
            np.bincount(g.integers(0, n_seeds, n_seeds), minlength=n_seeds).astype(float),
            np.bincount(g.integers(0, n_dialogues, n_dialogues), minlength=n_dialogues).astype(
                float
            ),
        )
        for _ in range(resamples)
    ]
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(draws, [tail, 1.0 - tail])
    return point, float(lo), float(hi)


# --------------------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(__doc__.splitlines()[0], argv)
    started = time.time()
    s = settings(args.quick)
    torch.set_num_threads(s["threads"])
    tokenizer = load_tokenizer(model_config(s))
    pad_id = int(tokenizer.pad_token_id)
    corpus = load_corpus(s, tokenizer)
    base, pretrain_info = pretrain_base(s, corpus)
    print(f"base: {pretrain_info}", flush=True)
    base_val = answer_nll(base, corpus.val, pad_id)
    base_test = answer_nll(base, corpus.test, pad_id)

    sweep: list[dict[str, Any]] = []
    test_arrays: dict[tuple[Method, float, int], tuple[np.ndarray, np.ndarray]] = {}

    def run(method: Method, lr: float, seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        batches = batch_order(len(corpus.finetune), s["steps"], s["batch"], seed)
        model, unloads = finetune(base, corpus, batches, method, lr, seed, pad_id)
        val = answer_nll(model, corpus.val, pad_id)
        test = answer_nll(model, corpus.test, pad_id)
        test_arrays[(method, lr, seed)] = test
        row = {
            "method": method.label,
            "kind": method.kind,
            "rank": method.rank or None,
            "momentum": method.momentum if method.kind == "plora" else None,
            "unload_every": method.unload_every or None,
            "lr": lr,
            "seed": seed,
            "unloads": unloads,
            "val_nll": pooled_loss(*val),
            "test_nll": pooled_loss(*test),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        sweep.append(row)
        print(
            f"  {row['method']:<28} lr={lr:<7g} seed={seed}: val {row['val_nll']:.4f} "
            f"test {row['test_nll']:.4f} ({row['seconds']:.0f} s)",
            flush=True,
        )
        return row

    def best_lr(method: Method, grid: list[float], seeds: list[int]) -> float:
        """The grid LR with the lowest validation NLL (mean over ``seeds``)."""
        scores = {lr: np.mean([run(method, lr, sd)["val_nll"] for sd in seeds]) for lr in grid}
        return min(scores, key=lambda lr: scores[lr])

    select_seeds = s["seeds"] if s["sweep_all_seeds"] else s["seeds"][:1]
    grid_full, grid_adapter = s["lr_grid"]["full"], s["lr_grid"]["adapter"]
    chosen: dict[str, tuple[Method, float]] = {}
    full = Method("full")
    chosen["full"] = (full, best_lr(full, grid_full, select_seeds))
    for r in s["ranks"]:
        lora = Method("lora", r)
        chosen[f"lora_rank{r}"] = (lora, best_lr(lora, grid_adapter, select_seeds))
        default = Method("plora", r, **s["plora_default"])
        settings_r = [Method("plora", r, m, k) for m in s["momenta"] for k in s["unload_intervals"]]
        scores: dict[tuple[Method, float], float] = {}
        if s["sweep_all_seeds"]:
            for m in settings_r:
                lr = best_lr(m, grid_adapter, select_seeds)
                scores[(m, lr)] = float(
                    np.mean(
                        [x["val_nll"] for x in sweep if x["method"] == m.label and x["lr"] == lr]
                    )
                )
        else:
            # --quick: the LR is swept at the default PLoRA setting; the others reuse it.
            lr = best_lr(default, grid_adapter, select_seeds)
            for m in settings_r:
                if m != default:
                    run(m, lr, select_seeds[0])
                scores[(m, lr)] = next(
                    x["val_nll"] for x in sweep if x["method"] == m.label and x["lr"] == lr
                )
        chosen[f"plora_rank{r}"] = min(scores, key=lambda key: scores[key])
        plora_val = {
            f"{m.label} lr={lr:g}": score for (m, lr), score in sorted(scores.items(), key=str)
        }
        print(f"  rank {r} PLoRA validation NLL by setting: {plora_val}", flush=True)

    # The chosen configurations on every seed (the selection seeds' runs are reused).
    for method, lr in chosen.values():
        for sd in s["seeds"]:
            if (method, lr, sd) not in test_arrays:
                run(method, lr, sd)

    def stacked(method: Method, lr: float) -> tuple[np.ndarray, np.ndarray]:
        arrays = [test_arrays[(method, lr, sd)] for sd in s["seeds"]]
        return np.stack([a[0] for a in arrays]), np.stack([a[1] for a in arrays])

    per_method = {name: stacked(*ml) for name, ml in chosen.items()}
    l_base = pooled_loss(*base_test)
    l_full = pooled_loss(*per_method["full"])
    headline: dict[str, Any] = {}
    table = [{"method": "base (not fine-tuned)", "lr": "-", "test_nll": l_base, "gap_closed": 0.0}]
    for name, (method, lr) in chosen.items():
        loss = pooled_loss(*per_method[name])
        frac = gap_closed(l_base, loss, l_full)
        table.append({"method": method.label, "lr": lr, "test_nll": loss, "gap_closed": frac})
        if name != "full":
            headline[f"{name}_gap_closed"] = frac
    for r in s["ranks"]:
        point, lo, hi = paired_bootstrap_ratio(
            per_method, base_test, f"plora_rank{r}", f"lora_rank{r}", s["bootstrap"]
        )
        headline[f"plora_over_lora_rank{r}"] = point
        headline[f"plora_over_lora_rank{r}_lo"] = lo
        headline[f"plora_over_lora_rank{r}_hi"] = hi
        m = chosen[f"plora_rank{r}"][0]
        headline[f"plora_rank{r}_setting"] = {
            "momentum": m.momentum,
            "unload_every": m.unload_every,
        }
    headline["base_test_nll"] = l_base
    headline["full_test_nll"] = l_full
    print_table(
        "learning on real text (GSM8K test answer NLL per token, all seeds; "
        "gap_closed = (L_base - L) / (L_base - L_full))",
        table,
    )
    print_table(
        "PLoRA / LoRA gap closed, paired bootstrap 90% interval",
        [
            {
                "rank": r,
                "ratio": headline[f"plora_over_lora_rank{r}"],
                "lo": headline[f"plora_over_lora_rank{r}_lo"],
                "hi": headline[f"plora_over_lora_rank{r}_hi"],
                "plora setting": chosen[f"plora_rank{r}"][0].label,
            }
            for r in s["ranks"]
        ],
    )
    details = {
        "settings": s,
        "pretrain": pretrain_info,
        "data": {
            "pretrain_tokens": len(corpus.pretrain_stream),
            "finetune_dialogues": len(corpus.finetune),
            "val_dialogues": len(corpus.val),
            "test_dialogues": len(corpus.test),
            "base_val_nll": pooled_loss(*base_val),
        },
        "chosen": {
            name: {"method": m.label, "lr": lr, "test_nll": pooled_loss(*per_method[name])}
            for name, (m, lr) in chosen.items()
        },
        "sweep": sweep,
    }
    return write_result("learning_real", args.quick, headline, details, args.out, started)


if __name__ == "__main__":
    main()
