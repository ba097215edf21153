"""Data pipeline: sources, mixtures, assistant-only labels, truncation, packing, sharding,
resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plora_ray.config import DataConfig, DataSource, ModelConfig, TinyModelConfig, config_from_dict
from plora_ray.data import (
    IGNORE_INDEX,
    Batcher,
    DataStats,
    Dialogue,
    TokenizedSet,
    build_datasets,
    ensure_chat_template,
    has_generation_tags,
    load_dialogues,
    load_source,
    mix_sources,
    pack_examples,
    split_held_out,
    tokenize_dialogue,
)
from plora_ray.model import TINY_TOKENIZER_DIR, load_model, load_tokenizer

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, so 6."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(tiny=TinyModelConfig()))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def qa(i: int) -> dict:
    return {"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"}


def labelled_spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decode each run of consecutive labelled tokens, checking labels equal the input ids."""
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


# --------------------------------------------------------------------------- sources


def test_messages_and_fastchat_conversations_in_one_file_give_the_same_dialogue(tmp_path):
    conv = [
        {
            "from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
            "value": m["content"],
        }
        for m in CHAT
    ]
    records = [{"messages": CHAT}, "", {"conversations": conv}, qa(3)]
    f = write_jsonl(tmp_path / "mixed.jsonl", records)
    out = load_source(DataSource(path=str(f)))
    assert [d.messages for d in out[:2]] == [CHAT, CHAT]
    # Blank lines are skipped but line numbers stay the file's.
    assert [d.origin for d in out] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert out[2].messages == [
        {"role": "user", "content": qa(3)["question"]},
        {"role": "assistant", "content": qa(3)["answer"]},
    ]


def test_bundled_gsm8k_becomes_user_assistant_dialogues():
    out = load_source(DataSource(path="bundled:gsm8k"))
    assert len(out) == 7473
    first = out[0].messages
    assert [m["role"] for m in first] == ["user", "assistant"]
    assert first[0]["content"].startswith("Natalia sold clips")
    assert first[1]["content"].endswith("#### 72")


def test_datasets_dataset_saved_to_disk_loads_by_directory_and_split(tmp_path):
    import datasets

    rows = [{"messages": CHAT}, {"messages": CHAT[1:3]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    ).save_to_disk(str(tmp_path / "dict"))
    single = load_source(DataSource(dataset=str(tmp_path / "single")))
    assert [d.messages for d in single] == [CHAT, CHAT[1:3]]
    test = load_source(DataSource(dataset=str(tmp_path / "dict"), split="test"))
    assert len(test) == 1 and test[0].origin.endswith("[test] row 0")
    with pytest.raises(
        ValueError, match=r"expected split 'validation'.*found splits \['test', 'train'\]"
    ):
        load_source(DataSource(dataset=str(tmp_path / "dict"), split="validation"))


def test_corrupt_json_line_error_names_file_line_and_what_was_found(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [qa(1), qa(2), '{"question": "x", "answer": ', qa(4)])
    with pytest.raises(ValueError) as err:
        load_source(DataSource(path=str(f)))
    msg = str(err.value)
    assert f"{f}:3: expected a JSON object, found invalid JSON" in msg
    assert "data.skip_invalid" in msg


@pytest.mark.parametrize(
    "record, expected",
    [
        (
            {"prompt": "x", "completion": "y"},
            "expected a record with 'messages', 'conversations', or 'question' and 'answer', "
            "found keys ['completion', 'prompt']",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "expected at least one assistant turn in 'messages'",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "expected messages[0].role to be one of assistant, system, user, found 'robot'",
        ),
        (
            {"conversations": [{"from": "human"}]},
            "expected conversations[0] to be an object with 'from' and 'value', found ['from']",
        ),
        ([1, 2], "expected a JSON object, found list"),
    ],
)
def test_record_without_expected_fields_error_names_line_expected_and_found(
    tmp_path, record, expected
):
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, record])
    with pytest.raises(ValueError) as err:
        load_source(DataSource(path=str(f)))
    assert f"{f}:2: " in str(err.value)
    assert expected in str(err.value)


def test_skip_invalid_skips_and_counts_bad_lines_and_records(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [qa(1), "not json", qa(2), {"messages": []}, qa(3)])
    stats = DataStats()
    out = load_dialogues(
        DataConfig(sources=[DataSource(path=str(f))], skip_invalid=True), stats=stats
    )
    assert len(out) == 3
    assert stats.invalid_skipped == 2 and stats.sources[0].invalid_skipped == 2
    assert stats.sources[0].records == 3
    assert stats.invalid_examples[0].startswith(f"{f}:2: ")
    assert stats.invalid_examples[1].startswith(f"{f}:4: ")


def test_relative_source_path_is_resolved_against_base_dir(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [qa(1)])
    out = load_dialogues(DataConfig(sources=[DataSource(path="d.jsonl")]), base_dir=tmp_path)
    assert out[0].origin == f"{tmp_path / 'd.jsonl'}:1"


# --------------------------------------------------------------------------- mixtures, held-out


def _dialogues(prefix: str, n: int) -> list[Dialogue]:
    return [
        Dialogue(
            [{"role": "user", "content": f"{prefix}{i}"}, {"role": "assistant", "content": "ok"}],
            f"{prefix}:{i}",
        )
        for i in range(n)
    ]


def test_mixture_counts_give_exact_samples_per_source_repeating_small_sources():
    a, b = _dialogues("a", 10), _dialogues("b", 4)
    srcs = [DataSource(path="a", count=3), DataSource(path="b", count=9)]
    out = mix_sources([a, b], srcs, seed=0)
    from_a = [d for d in out if d.origin.startswith("a:")]
    from_b = [d for d in out if d.origin.startswith("b:")]
    assert len(from_a) == 3 and len({d.origin for d in from_a}) == 3  # subsample, no repeats
    assert len(from_b) == 9
    # 9 from 4: each sample twice, one sample a third time.
    assert sorted(sum(d.origin == o for d in from_b) for o in {d.origin for d in b}) == [2, 2, 2, 3]


def test_mixture_weights_share_the_weighted_total_and_unweighted_sources_count_once():
    a, b, c = _dialogues("a", 30), _dialogues("b", 10), _dialogues("c", 5)
    srcs = [
        DataSource(path="a", weight=1.0),
        DataSource(path="b", weight=3.0),
        DataSource(path="c"),
    ]
    out = mix_sources([a, b, c], srcs, seed=1)
    counts = {p: sum(d.origin.startswith(p + ":") for d in out) for p in "abc"}
    assert counts == {"a": 10, "b": 30, "c": 5}  # total of weighted sources (40) split 1:3


def test_mixture_is_deterministic_for_a_seed_and_changes_with_it():
    a, b = _dialogues("a", 50), _dialogues("b", 50)
    srcs = [DataSource(path="a", count=20), DataSource(path="b", count=70)]
    one = [d.origin for d in mix_sources([a, b], srcs, seed=5)]
    assert one == [d.origin for d in mix_sources([a, b], srcs, seed=5)]
    assert one != [d.origin for d in mix_sources([a, b], srcs, seed=6)]


def test_held_out_dialogues_never_appear_in_train_even_when_upsampled():
    a = _dialogues("a", 6)
    mixed = mix_sources([a], [DataSource(path="a", count=30)], seed=0)
    train, held = split_held_out(mixed, 2, seed=0)
    assert len(held) == 2 and len({d.origin for d in held}) == 2
    assert not {d.origin for d in held} & {d.origin for d in train}
    assert len(train) == 30 - 10  # every copy (5 each) of the 2 held-out dialogues removed
    with pytest.raises(ValueError, match="data.held_out: expected fewer than the 6 distinct"):
        split_held_out(mixed, 6, seed=0)


# --------------------------------------------------------------------------- tokenization


def test_labels_are_exactly_the_assistant_text_and_end_token(tok):
    assert has_generation_tags(tok)
    ids, labels, truncated = tokenize_dialogue(tok, CHAT, max_length=512)
    assert not truncated and len(ids) == len(labels)
    assert labelled_spans(tok, ids, labels) == ["It is 4.<|end|>", "Six, so 6.<|end|>"]


def test_prefix_rendering_finds_the_same_assistant_tokens_without_generation_markers(tok):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    plain.chat_template = tok.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""
    )
    assert not has_generation_tags(plain)
    ids, labels, _ = tokenize_dialogue(plain, CHAT, max_length=512)
    ref_ids, ref_labels, _ = tokenize_dialogue(tok, CHAT, max_length=512)
    assert ids == ref_ids
    # The newline after <|end|> is template text after the last special token: not labelled.
    assert labels == ref_labels


def test_tokenizer_without_template_gets_the_default_one_ending_turns_with_eos(tok):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    bare.chat_template = None
    assert ensure_chat_template(bare) == "default"
    ids, labels, _ = tokenize_dialogue(bare, CHAT, max_length=512)
    assert labelled_spans(bare, ids, labels) == ["It is 4.</s>", "Six, so 6.</s>"]
    assert ensure_chat_template(tok) == "tokenizer"


def _cfg(tmp_path: Path, records: list, **data) -> object:
    f = write_jsonl(tmp_path / "train.jsonl", records)
    return config_from_dict({"seed": 3, "data": {"sources": [{"path": str(f)}], **data}})


def test_truncation_is_counted_and_examples_without_assistant_tokens_are_dropped(tok, tmp_path):
    long_prompt = {
        "messages": [
            {"role": "user", "content": "word " * 80},
            {"role": "assistant", "content": "yes"},
        ]
    }
    long_answer = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "word " * 80},
        ]
    }
    cfg = _cfg(
        tmp_path, [qa(i) for i in range(6)] + [long_prompt, long_answer], max_length=40, held_out=0
    )
    train, held, stats = build_datasets(cfg, tok)
    assert stats.truncated == 2
    assert stats.dropped_no_labels == 1  # the long prompt lost its whole answer
    assert len(train) == stats.train_examples == 7 and stats.sources[0].used == 7
    assert max(len(r) for r in train.input_ids) == 40
    assert "2 truncated to 40 tokens" in stats.summary()


def test_build_datasets_holds_out_and_labels_match_inputs(tok, tmp_path):
    cfg = _cfg(tmp_path, [qa(i) for i in range(20)], held_out=4)
    train, held, stats = build_datasets(cfg, tok)
    assert (len(train), len(held)) == (16, 4) == (stats.train_examples, stats.held_out_examples)
    assert not {tuple(r) for r in held.input_ids} & {tuple(r) for r in train.input_ids}
    for ids, labels in zip(train.input_ids, train.labels):
        answer = labelled_spans(tok, ids, labels)
        assert len(answer) == 1 and answer[0].endswith("<|end|>") and "####" in answer[0]


def test_packing_keeps_each_examples_labels_and_fits_max_length(tok, tmp_path):
    cfg = _cfg(tmp_path, [qa(i) for i in range(30)], held_out=0, packing=True, max_length=128)
    train, _, stats = build_datasets(cfg, tok)
    assert train.packed and stats.train_rows == len(train) < 30
    assert train.total_examples == stats.train_examples == 30
    spans = []
    for ids, labels, pos, n in zip(
        train.input_ids, train.labels, train.position_ids, train.num_examples
    ):
        assert len(ids) <= 128
        starts = [k for k, p in enumerate(pos) if p == 0]
        assert len(starts) == n
        # The first token of each example (BOS) is never a label: no loss across a boundary.
        assert all(labels[k] == IGNORE_INDEX and ids[k] == tok.bos_token_id for k in starts)
        spans += labelled_spans(tok, ids, labels)
    expected = sorted(f"{i} + {i} = {2 * i}\n#### {2 * i}<|end|>" for i in range(30))
    assert sorted(spans) == expected


def test_packed_rows_attend_within_each_example_only(tok):
    model = load_model(
        ModelConfig(tiny=TinyModelConfig(), dtype="float32"), seed=0, vocab_size=len(tok)
    )
    a, _, _ = tokenize_dialogue(tok, CHAT[1:3], 64)
    b, _, _ = tokenize_dialogue(tok, CHAT[3:5], 64)
    packed = pack_examples([(a, a), (b, b)], 256, tok.pad_token_id)
    batch = Batcher(packed, 1, 0, 1, 0).next_micro_batch()
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
    torch.testing.assert_close(logits[len(a) : len(a) + len(b)], alone, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- batching


def _rows(n: int, packed_counts: list[int] | None = None) -> TokenizedSet:
    # Row i holds token i + 10 (so batches identify their rows) and i % 3 + 1 tokens.
    ids = [[i + 10] * (i % 3 + 1) for i in range(n)]
    counts = packed_counts or [1] * n
    return TokenizedSet(ids, [list(r) for r in ids], counts, pad_token_id=0)


def _row_ids(batch) -> list[int]:
    return [int(r[0]) - 10 for r in batch["input_ids"]]


@pytest.mark.parametrize("n, micro, world", [(24, 2, 3), (25, 2, 3), (7, 3, 2)])
def test_sharding_gives_each_row_to_exactly_one_rank_once_per_epoch(n, micro, world):
    ranks = [Batcher(_rows(n), micro, r, world, seed=11) for r in range(world)]
    seen: list[int] = []
    while len(seen) < 3 * n:  # three epochs, crossing epoch boundaries mid micro-step
        batches = [_row_ids(b.next_micro_batch()) for b in ranks]
        assert all(len(x) == micro for x in batches)  # nobody gets a short batch
        seen += [i for x in batches for i in x]
    for e in range(3):
        assert sorted(seen[e * n : (e + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n : 2 * n]  # reshuffled per epoch
    assert len({b.samples_seen for b in ranks}) == 1  # every rank counts the same global total
    assert ranks[0].samples_seen == len(seen)


def test_samples_seen_counts_examples_in_packed_rows_over_all_ranks():
    counts = [1, 2, 3, 4, 5, 6]
    ranks = [Batcher(_rows(6, counts), 1, r, 2, seed=0) for r in range(2)]
    total = 0
    for _ in range(3):
        rows = [i for b in ranks for i in _row_ids(b.next_micro_batch())]
        total += sum(counts[i] for i in rows)
        assert ranks[0].samples_seen == ranks[1].samples_seen == total
    assert total == sum(counts)  # one epoch exactly
    assert ranks[0].tokens_seen == sum(i % 3 + 1 for i in range(6))


def test_resume_from_state_continues_with_the_identical_batches():
    data = _rows(13)
    ref = Batcher(data, 2, 1, 2, seed=4)
    reference = [ref.next_micro_batch() for _ in range(20)]
    first = Batcher(data, 2, 1, 2, seed=4)
    for _ in range(9):  # stop mid-epoch
        first.next_micro_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = Batcher(data, 2, 1, 2, seed=4)
    resumed.load_state_dict(state)
    assert resumed.samples_seen == first.samples_seen == 9 * 4
    for want in reference[9:]:
        got = resumed.next_micro_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="expected a state for 12 rows and seed 4"):
        Batcher(_rows(12), 2, 1, 2, seed=4).load_state_dict(state)


def test_micro_batch_pads_right_with_masked_labels():
    data = _rows(3)  # lengths 1, 2, 3
    batch = Batcher(data, 3, 0, 1, seed=0).next_micro_batch()
    lengths = batch["attention_mask"].sum(1).tolist()
    assert sorted(lengths) == [1, 2, 3] and batch["input_ids"].shape == (3, 3)
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == 0).all()


def test_bytes_that_are_not_utf8_are_an_error_naming_the_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "a"}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + good.replace(b"q", b"caf\xe9") + b"\n")
    with pytest.raises(
        ValueError, match=r"latin1.jsonl:2: expected UTF-8 text, found the byte 0xe9"
    ):
        load_source(DataSource(path=str(path)))
    assert len(load_source(DataSource(path=str(path)), skip_invalid=True)) == 1


def test_tiny_model_generation_stops_at_the_end_of_a_turn(tok):
    end = tok.convert_tokens_to_ids("<|end|>")
    model = load_model(ModelConfig(), seed=0, vocab_size=len(tok))
    assert end in model.generation_config.eos_token_id
    # Logits that favour <|end|>: generation must stop right after it, not run to max_new_tokens.
    bias = torch.zeros(len(tok))
    bias[end] = 100.0
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias.to(out.dtype))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0, ids.shape[1] :].tolist() == [end]
