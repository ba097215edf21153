"""Chat data sources: records -> dialogues, the mixture of sources, and the held-out split.

``load_source`` reads one ``data.sources[i]`` into ``Dialogue`` objects. Accepted records (per
record with ``format: auto``): ``{"messages": [{"role", "content"}, ...]}``, FastChat
``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``, and GSM8K
``{"question", "answer"}`` (one user turn, one assistant turn). A source is a JSONL file, a
``datasets`` dataset (a directory saved with ``save_to_disk``, a local dataset directory, or a
hub name), or ``bundled:gsm8k`` (the GSM8K train split shipped in
``plora_ray/benchmark_data/gsm8k``). A corrupt line or a record without the expected fields
raises ``ValueError`` naming ``file:line``, what was expected and what was found; with
``data.skip_invalid`` it is skipped and counted in ``DataStats``.

``mix_sources`` builds one epoch's list from the sources: ``count`` = that many samples of the
source per epoch, ``weight`` = a relative share of the weighted sources' total, neither = every
sample once. Deterministic for a seed.

``split_held_out`` takes ``data.held_out`` distinct dialogues out for the held-out NLL proxy;
every copy of a held-out dialogue leaves the training list, so nothing leaks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Sets the hub's offline switches, which `datasets` reads when it is first imported: no machine
# of this project reaches a hub, so a hub name fails at once instead of waiting on the network.
import plora_ray.tasks.offline  # noqa: F401

# isort: split
import datasets
import numpy as np

from plora_ray.config import BUNDLED_SOURCES, DataConfig, DataSource
from plora_ray.data.stats import DataStats, SourceStats

__all__ = [
    "SAMPLE_BYTES",
    "SAMPLE_ROWS",
    "Dialogue",
    "load_dialogues",
    "load_source",
    "mix_sources",
    "record_to_messages",
    "split_held_out",
]

ROLES = ("system", "user", "assistant")
# What the pre-flight check reads of a source (``load_source(..., sample=True)``): the head of a
# JSONL file up to this many bytes, the first rows of a dataset. Enough to catch a wrong format
# or wrong role names in seconds; a bad line further down still fails the run with file:line.
SAMPLE_BYTES = 64 * 2**20
SAMPLE_ROWS = 20_000
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


@dataclass
class Dialogue:
    """One chat example: ``messages`` as [{"role", "content"}]; ``origin`` is ``file:line``."""

    messages: list[dict[str, str]]
    origin: str
    source: int = 0  # index into data.sources


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


def _jsonl_records(
    path: Path, max_bytes: int | None = None
) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, record or None, error) for each non-blank line.

    Lines are decoded one at a time, so bytes that are not UTF-8 are an error naming their line
    (the other lines still parse). With ``max_bytes`` reading stops at the first line that ends
    past that many bytes (a sample of the file's head).
    """
    read = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if max_bytes is not None and read >= max_bytes:
                return
            read += len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.start + 1]
                yield (
                    lineno,
                    None,
                    f"expected UTF-8 text, found the byte 0x{bad.hex()} at byte {exc.start + 1} "
                    "of the line (save the file as UTF-8)",
                )
                continue
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


def _dataset_rows(source: DataSource, max_rows: int | None = None) -> tuple[str, Iterable[Any]]:
    """The label and the rows (the first ``max_rows`` of them) of a ``dataset`` source.

    Raises:
        ValueError: the dataset cannot be read (not a ``datasets`` directory, a hub name while
            offline) or lacks ``source.split``.
    """
    name = source.dataset
    assert name is not None
    local = Path(name).expanduser()
    saved = local.is_dir() and any(
        (local / marker).exists()
        for marker in ("dataset_dict.json", "dataset_info.json", "state.json")
    )
    try:
        if saved:
            ds = datasets.load_from_disk(str(local))  # a directory written by save_to_disk
        else:
            ds = datasets.load_dataset(str(local) if local.is_dir() else name, split=source.split)
    except (OSError, ValueError) as exc:
        if local.is_dir():
            expected = (
                "a directory written by datasets' save_to_disk, or one holding data files "
                "datasets can load (JSON, JSONL, CSV, Parquet)"
            )
        else:
            expected = (
                "a local dataset directory (a hub dataset is not downloaded here: download it, "
                "save it with save_to_disk and pass that directory)"
            )
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{name}: expected {expected}, found {type(exc).__name__}: {first[:200]}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise ValueError(
                f"{name}: expected split {source.split!r} "
                f"(data.sources[].split), found splits {sorted(ds)}"
            )
        ds = ds[source.split]
    if max_rows is not None and len(ds) > max_rows:
        ds = ds.select(range(max_rows))
    return f"{name}[{source.split}]", ds


def load_source(
    source: DataSource,
    *,
    skip_invalid: bool = False,
    base_dir: Path | None = None,
    stats: SourceStats | None = None,
    invalid_examples: list[str] | None = None,
    sample: bool = False,
) -> list[Dialogue]:
    """Read one data source into dialogues.

    Args:
        source: the source (``path`` JSONL / ``bundled:...``, or ``dataset``).
        skip_invalid: skip and count bad lines / records instead of raising.
        base_dir: directory that a relative ``path`` is relative to (``load_config`` already
            resolves paths against the YAML's directory; this is for configs built in code).
        stats: counts of valid and skipped records are added here.
        invalid_examples: the first messages of skipped records are appended here (at most 5).
        sample: read only the head of the source (``SAMPLE_BYTES`` of a file, ``SAMPLE_ROWS`` of
            a dataset): the pre-flight check (``plora_ray.inputs_check``) reads it this way.

    Raises:
        ValueError: ``file:line: expected ..., found ...`` for a corrupt line, bytes that are not
            UTF-8 or a record without the expected fields (unless ``skip_invalid``); a source
            without a valid record; a dataset that cannot be read.
        FileNotFoundError: the file does not exist.
    """
    stats = stats if stats is not None else SourceStats(name="")
    fmt: str = source.format
    if source.path is not None:
        if source.path in BUNDLED_SOURCES:
            path, fmt = BUNDLED_SOURCES[source.path]
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
        rows: Iterable[tuple[int, Any, str | None]] = _jsonl_records(
            path, SAMPLE_BYTES if sample else None
        )
        sep = ":"
    else:
        label, ds = _dataset_rows(source, SAMPLE_ROWS if sample else None)
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
    first: dict[str, Dialogue] = {}
    for d in dialogues:
        if d.origin in held:
            first.setdefault(d.origin, d)
    return [d for d in dialogues if d.origin not in held], [first[o] for o in sorted(first)]
