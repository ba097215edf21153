"""benchmarks/learning_real.py's pieces at toy size: real tiny LLaMA, real peft, real PLoRA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import learning_real as lr
from plora_ray.data import IGNORE_INDEX
from plora_ray.model import load_tokenizer

# A toy version of the benchmark's settings: one block of width 32, a few dialogues.
TOY = {
    **lr.settings(quick=True),
    "model": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
    "pretrain": {"steps": 4, "batch": 2, "length": 32, "lr": 3e-3, "seed": 0},
    "val_dialogues": 8,
    "finetune_pool": 16,
    "test_dialogues": 8,
    "max_length": 96,
}


@pytest.fixture(scope="module")
def corpus() -> lr.Corpus:
    return lr.load_corpus(TOY, load_tokenizer(lr.model_config(TOY)))


def test_splits_are_disjoint_and_pretraining_text_holds_gsm8k_mmlu_and_arc(
    corpus: lr.Corpus,
) -> None:
    # A dialogue whose answer is truncated away at max_length is dropped: it has no answer tokens.
    assert len(corpus.val) <= 8 and len(corpus.finetune) <= 16 and len(corpus.test) <= 8
    assert min(len(corpus.val), len(corpus.finetune), len(corpus.test)) >= 6
    val_ids = {tuple(ids) for ids, _ in corpus.val}
    assert not val_ids & {tuple(ids) for ids, _ in corpus.finetune}
    texts = lr.pretraining_texts([{"question": "Q?", "answer": "A #### 1"}])
    assert texts[0] == "Q?\nA #### 1"
    assert any(t.startswith("Question: ") for t in texts)  # ARC
    assert any("\nA. " in t and "\nAnswer: " in t for t in texts)  # MMLU


def test_answer_nll_counts_only_answer_tokens(corpus: lr.Corpus) -> None:
    tok = load_tokenizer(lr.model_config(TOY))
    model = lr.load_model(lr.model_config(TOY), seed=0)
    sums, counts = lr.answer_nll(model, corpus.test, int(tok.pad_token_id), batch=3)
    expected = [sum(1 for t in labels[1:] if t != IGNORE_INDEX) for _, labels in corpus.test]
    assert counts.tolist() == expected
    assert all(c < len(ids) for c, (ids, _) in zip(counts, corpus.test))
    # Padding does not change a dialogue's loss: alone or batched, the same NLL.
    alone, _ = lr.answer_nll(model, corpus.test[:1], int(tok.pad_token_id))
    assert alone[0] == pytest.approx(sums[0], rel=1e-4)


def test_every_method_of_a_seed_gets_the_same_batches_and_seeds_differ() -> None:
    a = lr.batch_order(16, steps=5, batch=4, seed=0)
    assert a == lr.batch_order(16, steps=5, batch=4, seed=0)
    assert a != lr.batch_order(16, steps=5, batch=4, seed=1)
    assert sorted(i for b in a[:4] for i in b) == list(range(16))  # an epoch, then the next


def test_cache_key_follows_the_settings_and_the_base_is_cached(
    corpus: lr.Corpus, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv(lr.CACHE_ENV, str(tmp_path))
    other = {**TOY, "pretrain": {**TOY["pretrain"], "steps": 5}}
    assert lr.cache_path(TOY) != lr.cache_path(other)
    first, info = lr.pretrain_base(TOY, corpus)
    assert not info["cached"] and lr.cache_path(TOY).is_file()
    again, info = lr.pretrain_base(TOY, corpus)
    assert info["cached"]
    for p, q in zip(first.parameters(), again.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "method, unloads",
    [
        (lr.Method("full"), 0),
        (lr.Method("lora", 2), 0),
        (lr.Method("plora", 2, 0.1, 2), 3),
    ],
)
def test_finetune_trains_and_plora_unloads_on_its_interval(
    corpus: lr.Corpus, method: lr.Method, unloads: int
) -> None:
    tok = load_tokenizer(lr.model_config(TOY))
    pad = int(tok.pad_token_id)
    base = lr.load_model(lr.model_config(TOY), seed=0).eval()
    batches = lr.batch_order(len(corpus.finetune), steps=6, batch=4, seed=0)
    model, n = lr.finetune(base, corpus, batches, method, 1e-2, 0, pad)
    assert n == unloads
    before = lr.pooled_loss(*lr.answer_nll(base, corpus.finetune, pad))
    after = lr.pooled_loss(*lr.answer_nll(model, corpus.finetune, pad))
    assert after < before
    # The base is copied, never trained in place.
    assert lr.pooled_loss(*lr.answer_nll(base, corpus.finetune, pad)) == pytest.approx(before)


def test_gap_closed_is_the_fraction_of_full_fine_tunings_gain() -> None:
    assert lr.gap_closed(3.0, 2.0, 1.0) == pytest.approx(0.5)
    assert lr.gap_closed(3.0, 1.0, 1.0) == pytest.approx(1.0)


def test_paired_bootstrap_ratio_is_exact_for_a_copy_and_brackets_a_real_difference() -> None:
    g = np.random.default_rng(0)
    counts = g.integers(5, 20, (3, 50)).astype(float)
    base = (np.full(50, 3.0) * counts[0], counts[0])
    full = (2.0 * counts + g.normal(0, 0.1, counts.shape), counts)
    lora = (2.5 * counts + g.normal(0, 0.1, counts.shape), counts)
    plora = (2.25 * counts + g.normal(0, 0.1, counts.shape), counts)
    per_method = {"full": full, "lora": lora, "plora": plora, "copy": lora}
    point, lo, hi = lr.paired_bootstrap_ratio(per_method, base, "copy", "lora", 200)
    # Paired: a method against itself is 1 in every resample.
    assert point == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    point, lo, hi = lr.paired_bootstrap_ratio(per_method, base, "plora", "lora", 200)
    assert lo < point < hi
    assert point == pytest.approx(0.75 / 0.5, rel=0.05)
