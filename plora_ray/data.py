"""Chat SFT data: sources -> dialogues -> a mixture -> tokens with assistant-only labels -> batches.

The pipeline, top to bottom:

1. ``load_source`` reads one ``data.sources[i]`` into ``Dialogue`` objects. Accepted records (per
   record with ``format: auto``): ``{"messages": [{"role", "content"}, ...]}``, FastChat
   ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``, and GSM8K
   ``{"question", "answer"}`` (one user turn, one assistant turn). A source is a JSONL file, a
   ``datasets`` dataset (a directory saved with ``save_to_disk``, a local dataset directory, or a
   hub name), or ``bundled:gsm8k`` (the GSM8K train split shipped in
   ``plora_ray/benchmark_data/gsm8k``).
   A corrupt line or a record without the expected fields raises ``ValueError`` naming
   ``file:line``, what was expected and what was found; with ``data.skip_invalid`` it is skipped and
   counted in ``DataStats``.
2. ``mix_sources`` builds one epoch's list from the sources: ``count`` = that many samples of the
   source per epoch, ``weight`` = a relative share of the weighted sources' total, neither = every
   sample once. Deterministic for a seed.
3. ``split_held_out`` takes ``data.held_out`` distinct dialogues out for the held-out NLL proxy;
   every copy of a held-out dialogue leaves the training list, so nothing leaks.
4. ``tokenize_dialogue`` renders the tokenizer's chat template and labels assistant tokens only
   (-100 elsewhere), truncating to ``data.max_length`` (counted). ``pack_examples`` optionally
   packs several examples into one row.
5. ``Batcher`` serves micro-batches: a seeded permutation per epoch, rank ``r`` of ``W`` takes its
   slice of each global micro-step, and ``samples_seen`` counts samples over all ranks exactly
   (every rank knows the global order, so no communication is needed). ``state_dict`` /
   ``load_state_dict`` resume the identical sequence of batches.

Assistant spans. A template with ``{% generation %}`` markers (the tiny tokenizer's) gives the
assistant mask directly (``return_assistant_tokens_mask``). For a template without them, the span
of assistant turn ``i`` is found by rendering the conversation prefix by prefix: tokens of
``messages[:i]`` with the generation prompt, then of ``messages[:i+1]``; the tokens in between are
the assistant's reply plus the template's end-of-turn marker, and any template text after the last
special token of that span (e.g. Qwen's newline after ``<|im_end|>``) is left unlabelled. This
needs a template whose rendering of a prefix is a token prefix of the full rendering; one that
rewrites earlier turns raises ``ValueError`` instead of labelling the wrong tokens. A tokenizer with
no template at all gets ``DEFAULT_CHAT_TEMPLATE`` (see ``ensure_chat_template``).

Packing and attention. A packed row carries ``position_ids`` that restart at 0 for every example
and no ``attention_mask``. Transformers (>= 4.53, masking_utils) then builds a block-diagonal causal
mask from the position ids, so each example attends only to itself -- but only when the model runs
without a KV cache: call ``model(**batch, use_cache=False)`` (a cache disables the detection and
examples would attend to earlier ones in the row). Labels never cross examples: each example's
first token is a template token labelled -100, so the last token of one example is never trained
to predict the next example.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from plora_ray.config import BUNDLED_DATA_DIR, DataConfig, DataSource, RunConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUNDLED_FILES = {"bundled:gsm8k": (BUNDLED_DATA_DIR / "gsm8k" / "train.jsonl", "gsm8k")}

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
# FastChat / ShareGPT speaker names -> chat roles.
CONVERSATION_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
}

# For tokenizers that ship no chat template (base models such as LLaMA-7B): plain-text headers,
# assistant turns end with the EOS token so generation stops there; the {% generation %} markers
# give the assistant mask.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% else %}{{ '### User:\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Dialogue:
    """One chat example: ``messages`` as [{"role", "content"}]; ``origin`` is ``file:line``."""

    messages: list[dict[str, str]]
    origin: str
    source: int = 0  # index into data.sources


@dataclass
class TokenizedSet:
    """Token rows ready for batching.

    ``num_examples[i]`` is how many dialogues row ``i`` holds (1 unless packed);
    ``position_ids`` is set only for packed rows (restarting at 0 for each example).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    num_examples: list[int]
    pad_token_id: int
    position_ids: list[list[int]] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def total_examples(self) -> int:
        return int(sum(self.num_examples))


@dataclass
class SourceStats:
    name: str
    records: int = 0  # valid dialogues read
    invalid_skipped: int = 0
    used: int = 0  # samples of this source in one training epoch (after mixing and held-out)


@dataclass
class DataStats:
    """What the data pipeline did; reported with the run (``as_dict``) and printed (``summary``)."""

    sources: list[SourceStats] = field(default_factory=list)
    chat_template: str = "tokenizer"  # "tokenizer" or "default" (DEFAULT_CHAT_TEMPLATE)
    assistant_mask: str = "generation_tags"  # or "prefix_diff"
    invalid_skipped: int = 0
    # First few skipped-record messages, so a user can see why records were skipped.
    invalid_examples: list[str] = field(default_factory=list)
    train_examples: int = 0
    held_out_examples: int = 0
    truncated: int = 0  # examples cut to max_length (train + held-out)
    dropped_no_labels: int = 0  # examples with no assistant token left after truncation
    train_rows: int = 0  # rows after packing (= train_examples without packing)
    train_tokens: int = 0
    train_label_tokens: int = 0
    max_length: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        src = ", ".join(f"{s.name}: {s.used}" for s in self.sources)
        return (
            f"data: {self.train_examples} train examples ({src}) in {self.train_rows} rows, "
            f"{self.held_out_examples} held out, {self.truncated} truncated to "
            f"{self.max_length} tokens, {self.dropped_no_labels} dropped without assistant "
            f"tokens, {self.invalid_skipped} invalid records skipped; "
            f"{self.train_tokens} tokens ({self.train_label_tokens} labelled)"
        )


# --------------------------------------------------------------------------- records -> dialogues


class _Invalid(Exception):
    """A record that does not fit; the message says what was expected and found."""


def _role_content(
    turns: Any, key: str, role_key: str, text_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise _Invalid(f"expected {key!r} to be a non-empty list of turns, found {turns!r:.80}")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            found = sorted(turn) if isinstance(turn, dict) else repr(turn)[:80]
            raise _Invalid(
                f"expected {key}[{j}] to be an object with {role_key!r} and "
                f"{text_key!r}, found {found}"
            )
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise _Invalid(
                f"expected {key}[{j}].{role_key} to be one of "
                f"{', '.join(sorted(roles))}, found {turn[role_key]!r}"
            )
        if not isinstance(turn[text_key], str):
            raise _Invalid(
                f"expected {key}[{j}].{text_key} to be a string, found "
                f"{type(turn[text_key]).__name__}"
            )
        out.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise _Invalid(
            f"expected at least one assistant turn in {key!r} (loss is on assistant "
            f"tokens only), found roles {[m['role'] for m in out]}"
        )
    return out


def record_to_messages(record: Any, fmt: str = "auto") -> list[dict[str, str]]:
    """Turn one record into chat messages.

    Args:
        record: a parsed JSON object / dataset row.
        fmt: ``auto`` (detect from the keys), ``messages``, ``conversations`` or ``gsm8k``.

    Raises:
        ValueError: the record lacks the fields of its format; the message says which were
            expected and which were found.
    """
    try:
        return _record_to_messages(record, fmt)
    except _Invalid as exc:
        raise ValueError(str(exc)) from None


def _record_to_messages(record: Any, fmt: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise _Invalid(f"expected a JSON object, found {type(record).__name__}")
    if fmt == "auto":
        if "messages" in record:
            fmt = "messages"
        elif "conversations" in record:
            fmt = "conversations"
        elif "question" in record and "answer" in record:
            fmt = "gsm8k"
        else:
            raise _Invalid(
                "expected a record with 'messages', 'conversations', or 'question' and "
                f"'answer', found keys {sorted(record)}"
            )
    if fmt == "messages":
        return _role_content(
            record.get("messages"), "messages", "role", "content", {r: r for r in ROLES}
        )
    if fmt == "conversations":
        return _role_content(
            record.get("conversations"), "conversations", "from", "value", CONVERSATION_ROLES
        )
    if fmt == "gsm8k":
        q, a = record.get("question"), record.get("answer")
        if not isinstance(q, str) or not isinstance(a, str):
            raise _Invalid(
                "expected string fields 'question' and 'answer' (gsm8k format), found "
                f"keys {sorted(record)}"
            )
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    raise _Invalid(f"expected format auto, messages, conversations or gsm8k, found {fmt!r}")


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record or None, error) for each non-blank line."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield (
                    lineno,
                    None,
                    (
                        f"expected a JSON object, found invalid JSON ({exc.msg} at "
                        f"column {exc.colno}): {line.strip()[:60]!r}"
                    ),
                )


def _dataset_rows(source: DataSource) -> tuple[str, Iterable[Any]]:
    import datasets

    name = source.dataset
    assert name is not None
    local = Path(name).expanduser()
    if local.is_dir() and (
        (local / "dataset_dict.json").exists()
        or (local / "dataset_info.json").exists()
        or (local / "state.json").exists()
    ):
        ds = datasets.load_from_disk(str(local))  # a directory written by save_to_disk
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise ValueError(
                    f"{name}: expected split {source.split!r} "
                    f"(data.sources[].split), found splits {sorted(ds)}"
                )
            ds = ds[source.split]
    else:
        ds = datasets.load_dataset(str(local) if local.is_dir() else name, split=source.split)
    return f"{name}[{source.split}]", ds


def load_source(
    source: DataSource,
    *,
    skip_invalid: bool = False,
    base_dir: Path | None = None,
    stats: SourceStats | None = None,
    invalid_examples: list[str] | None = None,
) -> list[Dialogue]:
    """Read one data source into dialogues.

    Args:
        source: the source (``path`` JSONL / ``bundled:...``, or ``dataset``).
        skip_invalid: skip and count bad lines / records instead of raising.
        base_dir: directory that a relative ``path`` is relative to (``load_config`` already
            resolves paths against the YAML's directory; this is for configs built in code).
        stats: counts of valid and skipped records are added here.
        invalid_examples: the first messages of skipped records are appended here (at most 5).

    Raises:
        ValueError: ``file:line: expected ..., found ...`` for a corrupt line or a record without
            the expected fields (unless ``skip_invalid``).
        FileNotFoundError: the file does not exist.
    """
    stats = stats if stats is not None else SourceStats(name="")
    fmt = source.format
    if source.path is not None:
        if source.path in BUNDLED_FILES:
            path, fmt = BUNDLED_FILES[source.path][0], BUNDLED_FILES[source.path][1]
        else:
            path = Path(source.path).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
        if not path.is_file():
            raise FileNotFoundError(
                f"data.sources[].path: expected an existing JSONL file, found "
                f"{str(path)!r} (no such file)"
            )
        label = str(path)
        rows: Iterable[tuple[int, Any, str | None]] = _jsonl_records(path)
        sep = ":"
    else:
        label, ds = _dataset_rows(source)
        rows = ((i, row, None) for i, row in enumerate(ds))
        sep = " row "

    out: list[Dialogue] = []
    for lineno, record, error in rows:
        if error is None:
            try:
                out.append(Dialogue(_record_to_messages(record, fmt), f"{label}{sep}{lineno}"))
                continue
            except _Invalid as exc:
                error = str(exc)
        message = f"{label}{sep}{lineno}: {error}"
        if not skip_invalid:
            raise ValueError(message + " (set data.skip_invalid: true to skip such records)")
        stats.invalid_skipped += 1
        if invalid_examples is not None and len(invalid_examples) < 5:
            invalid_examples.append(message)
    stats.records += len(out)
    if not out:
        raise ValueError(
            f"{label}: expected at least one valid record, found none "
            f"({stats.invalid_skipped} invalid skipped)"
        )
    return out


def _take(items: list[Dialogue], n: int, rng: np.random.Generator) -> list[Dialogue]:
    """``n`` items: whole copies of ``items`` as often as they fit, then a random subset."""
    full, rest = divmod(n, len(items))
    pick = rng.permutation(len(items))[:rest]
    return items * full + [items[i] for i in sorted(pick)]


def mix_sources(
    per_source: list[list[Dialogue]], sources: list[DataSource], seed: int
) -> list[Dialogue]:
    """One epoch's samples from several sources (deterministic for ``seed``).

    A source with ``count: N`` contributes exactly N samples (repeating the source when N exceeds
    its size); sources with ``weight`` share the total size of the weighted sources in proportion
    to their weights (so a small source with a large weight is repeated, a large one with a small
    weight subsampled); a source with neither contributes each of its samples once. The result is
    in source order; shuffling happens per epoch in ``Batcher``.
    """
    weighted = [i for i, s in enumerate(sources) if s.weight is not None]
    target = [len(d) for d in per_source]
    if weighted:
        total = sum(len(per_source[i]) for i in weighted)
        wsum = sum(float(sources[i].weight or 0.0) for i in weighted)
        exact = [total * float(sources[i].weight or 0.0) / wsum for i in weighted]
        # Largest-remainder rounding, so the weighted counts add up to exactly `total`.
        base = [int(x) for x in exact]
        order = sorted(range(len(exact)), key=lambda k: (base[k] - exact[k], k))
        for k in order[: total - sum(base)]:
            base[k] += 1
        for k, i in enumerate(weighted):
            target[i] = base[k]
    for i, s in enumerate(sources):
        if s.count is not None:
            target[i] = s.count
    out: list[Dialogue] = []
    for i, items in enumerate(per_source):
        rng = np.random.default_rng([seed, 7919, i])
        out.extend(items if target[i] == len(items) else _take(items, target[i], rng))
    return out


def _source_name(s: DataSource, i: int) -> str:
    return s.name or s.path or s.dataset or f"source{i}"


def load_dialogues(
    data: DataConfig, base_dir: Path | None = None, *, seed: int = 0, stats: DataStats | None = None
) -> list[Dialogue]:
    """Load every source of ``data`` and mix them into one epoch's list of dialogues.

    Args:
        data: the data section.
        base_dir: directory relative source paths are relative to (None: as given).
        seed: mixture sampling seed.
        stats: per-source counts and skipped records are recorded here.

    Raises:
        ValueError: a corrupt line or invalid record (``file:line``), unless ``skip_invalid``.
        FileNotFoundError: a source file does not exist.
    """
    stats = stats if stats is not None else DataStats()
    per_source = []
    for i, src in enumerate(data.sources):
        st = SourceStats(name=_source_name(src, i))
        dialogues = load_source(
            src,
            skip_invalid=data.skip_invalid,
            base_dir=base_dir,
            stats=st,
            invalid_examples=stats.invalid_examples,
        )
        for dl in dialogues:
            dl.source = i
        per_source.append(dialogues)
        stats.sources.append(st)
        stats.invalid_skipped += st.invalid_skipped
    return mix_sources(per_source, data.sources, seed)


def split_held_out(
    dialogues: list[Dialogue], n: int, seed: int
) -> tuple[list[Dialogue], list[Dialogue]]:
    """(train, held_out): ``n`` distinct dialogues held out; every copy of them leaves train.

    Raises:
        ValueError: fewer than ``n + 1`` distinct dialogues.
    """
    if n == 0:
        return list(dialogues), []
    origins = sorted({d.origin for d in dialogues})
    if len(origins) <= n:
        raise ValueError(
            f"data.held_out: expected fewer than the {len(origins)} distinct samples "
            f"the sources hold, found {n}"
        )
    rng = np.random.default_rng([seed, 104729])
    held = {origins[i] for i in rng.permutation(len(origins))[:n]}
    first = {}
    for d in dialogues:
        if d.origin in held:
            first.setdefault(d.origin, d)
    return [d for d in dialogues if d.origin not in held], [first[o] for o in sorted(first)]


# --------------------------------------------------------------------------- tokenization


def _template_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        t = t.get("default") or next(iter(t.values()), None)
    return t


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give a tokenizer without a chat template ``DEFAULT_CHAT_TEMPLATE``; return which one it uses.

    The tokenizer object is changed in place, so a tokenizer saved with the model carries the
    template it was trained with (evaluation in chat format then matches training).
    """
    if _template_text(tokenizer):
        return "tokenizer"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return "default"


def has_generation_tags(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(_template_text(tokenizer) or ""))


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(out["input_ids"])


def assistant_mask_by_prefix(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) with mask 1 on assistant tokens, found by rendering prefix by prefix.

    Raises:
        ValueError: the template's rendering of a prefix is not a token prefix of the full
            rendering (a template that rewrites earlier turns).
    """
    ids = _render(tokenizer, messages)
    mask = [0] * len(ids)
    special = set(tokenizer.all_special_ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else []
        upto = _render(tokenizer, messages[: i + 1])
        if ids[: len(before)] != before or ids[: len(upto)] != upto:
            raise ValueError(
                "chat template: expected the rendering of a conversation prefix "
                "to be a token prefix of the whole conversation (needed to find "
                "assistant tokens without {% generation %} markers), found it is "
                "not; add {% generation %} markers to the template"
            )
        end = len(upto)
        last_special = max((k for k in range(len(before), end) if ids[k] in special), default=None)
        if last_special is not None:
            end = last_special + 1  # drop template text after the end-of-turn token
        for k in range(len(before), end):
            mask[k] = 1
    return ids, mask


def tokenize_dialogue(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_length: int,
    *,
    use_generation_tags: bool | None = None,
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): labels are the token ids on assistant tokens, -100 elsewhere.

    Args:
        tokenizer: a tokenizer with a chat template (see ``ensure_chat_template``).
        messages: [{"role", "content"}].
        max_length: rows longer than this keep their first ``max_length`` tokens.
        use_generation_tags: how to find assistant tokens (None: detect from the template).

    Raises:
        ValueError: see ``assistant_mask_by_prefix``.
    """
    if use_generation_tags is None:
        use_generation_tags = has_generation_tags(tokenizer)
    if use_generation_tags:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        ids, mask = assistant_mask_by_prefix(tokenizer, messages)
    labels = [t if k else IGNORE_INDEX for t, k in zip(ids, mask)]
    truncated = len(ids) > max_length
    return ids[:max_length], labels[:max_length], truncated


def pack_examples(
    examples: list[tuple[list[int], list[int]]], max_length: int, pad_token_id: int
) -> TokenizedSet:
    """Greedily pack examples, in the given order, into rows of at most ``max_length`` tokens.

    Each example keeps its own labels; ``position_ids`` restart at 0 per example (see the module
    docstring for the attention behaviour).
    """
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    counts: list[int] = []
    for ids, labels in examples:
        if not rows_ids or len(rows_ids[-1]) + len(ids) > max_length:
            rows_ids.append([])
            rows_labels.append([])
            rows_pos.append([])
            counts.append(0)
        rows_ids[-1].extend(ids)
        rows_labels[-1].extend(labels)
        rows_pos[-1].extend(range(len(ids)))
        counts[-1] += 1
    return TokenizedSet(rows_ids, rows_labels, counts, pad_token_id, rows_pos)


def tokenize_dialogues(
    dialogues: list[Dialogue],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    stats: DataStats | None = None,
    kept: list[int] | None = None,
) -> list[tuple[list[int], list[int]]]:
    """Tokenize dialogues; truncation and examples left without labels are counted in ``stats``.

    Examples whose assistant tokens were all truncated away are dropped: they carry no loss.
    The indices of the dialogues kept are appended to ``kept`` when given.
    """
    use_tags = has_generation_tags(tokenizer)
    if stats is not None:
        stats.assistant_mask = "generation_tags" if use_tags else "prefix_diff"
    out = []
    for i, d in enumerate(dialogues):
        ids, labels, truncated = tokenize_dialogue(
            tokenizer, d.messages, max_length, use_generation_tags=use_tags
        )
        if stats is not None:
            stats.truncated += int(truncated)
        if all(label == IGNORE_INDEX for label in labels):
            if stats is not None:
                stats.dropped_no_labels += 1
            continue
        out.append((ids, labels))
        if kept is not None:
            kept.append(i)
    return out


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


# --------------------------------------------------------------------------- batching


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
