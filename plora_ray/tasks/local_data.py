"""Read the local benchmark files and turn their rows into the hub schema of the stock tasks.

The stock lm-eval task configs render prompts from the columns of the hub datasets
(``openai/gsm8k``, ``cais/mmlu``, ``allenai/ai2_arc``). The shipped files (see
``plora_ray/benchmark_data/SOURCES.md``) use other column names for MMLU and ARC, so each reader
here validates a file and converts every row into exactly the hub's columns; the stock
``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` then apply unchanged.

Files are read with the ``csv`` and ``json`` modules, not pandas, so an MMLU choice such as
``"None"`` or ``"1.50"`` stays the exact string the prompt must show. Every problem is reported
with the file, the line and the column, before any model work.

A ``data_dir`` has the bundled layout::

    gsm8k/train.jsonl, gsm8k/test.jsonl        {"question", "answer"}
    mmlu/test/<subject>_test.csv, mmlu/dev/<subject>_dev.csv
                                               question,choice0,choice1,choice2,choice3,answer
    arc/arc_easy.jsonl, arc/arc_challenge.jsonl  {"query": "Question: ...", "choices", "gold"}
"""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path
from typing import Any

from plora_ray.config import BUNDLED_DATA_DIR

GSM8K_KEYS = ("question", "answer")
MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
ARC_KEYS = ("query", "choices", "gold")
ARC_LABELS = ("A", "B", "C", "D")


class DataError(ValueError):
    """A local benchmark file is missing or malformed; the message names file, line and column."""


def data_root(data_dir: str | os.PathLike[str] | None) -> Path:
    """The directory holding gsm8k/, mmlu/, arc/: ``data_dir`` or the bundled copy.

    Raises:
        DataError: ``data_dir`` is given but is not a directory.
    """
    if data_dir is None:
        return BUNDLED_DATA_DIR
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"eval.data_dir: expected a directory with gsm8k/, mmlu/, arc/, found "
            f"{str(root)!r} (no such directory)"
        )
    return root


def _need_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(f"{path}: expected the {what} file, found no such file")


def _file_key(path: Path) -> tuple[str, int, int]:
    # Cache by content identity so a rewritten file is read again within one process.
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size)


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, found invalid JSON ({exc.msg})"
                ) from exc
            if not isinstance(rec, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}"
                )
            missing = [k for k in keys if k not in rec]
            if missing:
                raise DataError(
                    f"{path}:{lineno}: missing column {', '.join(map(repr, missing))}; "
                    f"expected keys {', '.join(keys)}, found {', '.join(rec)}"
                )
            rec["_line"] = lineno
            rows.append(rec)
    if not rows:
        raise DataError(f"{path}: expected at least one record, found an empty file")
    return rows


@functools.lru_cache(maxsize=16)
def _gsm8k_cached(key: tuple[str, int, int]) -> tuple[dict[str, Any], ...]:
    path = Path(key[0])
    out = []
    for rec in _read_jsonl(path, GSM8K_KEYS):
        for k in GSM8K_KEYS:
            if not isinstance(rec[k], str) or not rec[k].strip():
                raise DataError(
                    f"{path}:{rec['_line']}: column {k!r}: expected a non-empty "
                    f"string, found {rec[k]!r}"
                )
        out.append({"question": rec["question"], "answer": rec["answer"]})
    return tuple(out)


def read_gsm8k(root: Path, split: str) -> list[dict[str, Any]]:
    """GSM8K rows in the ``openai/gsm8k`` schema: ``{"question", "answer"}``.

    Args:
        root: the data directory (see ``data_root``).
        split: ``train`` or ``test``.

    Raises:
        DataError: missing file, invalid JSON, or a missing/empty column (file:line named).
    """
    path = root / "gsm8k" / f"{split}.jsonl"
    _need_file(path, f"GSM8K {split}")
    return list(_gsm8k_cached(_file_key(path)))


def mmlu_subjects(root: Path) -> list[str]:
    """Subjects that have a test file under ``root/mmlu/test`` (sorted).

    Raises:
        DataError: no such folder or no ``*_test.csv`` in it.
    """
    folder = root / "mmlu" / "test"
    subjects = sorted(p.name[: -len("_test.csv")] for p in folder.glob("*_test.csv"))
    if not subjects:
        raise DataError(f"{folder}: expected MMLU test files <subject>_test.csv, found none")
    return subjects


@functools.lru_cache(maxsize=256)
def _mmlu_cached(key: tuple[str, int, int], subject: str) -> tuple[dict[str, Any], ...]:
    path = Path(key[0])
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(
                f"{path}: expected a header row {','.join(MMLU_COLUMNS)}, found an empty file"
            )
        header = [h.strip() for h in header]
        missing = [c for c in MMLU_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: missing column {', '.join(map(repr, missing))}; expected "
                f"header {','.join(MMLU_COLUMNS)}, found {','.join(header)}"
            )
        col = {c: header.index(c) for c in MMLU_COLUMNS}
        out = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: expected {len(header)} columns, found {len(row)}")
            answer = row[col["answer"]].strip()
            if answer not in ("0", "1", "2", "3"):
                raise DataError(
                    f"{path}:{line}: column 'answer': expected an integer 0-3, found {answer!r}"
                )
            out.append(
                {
                    "question": row[col["question"]],
                    "subject": subject,
                    "choices": [row[col[f"choice{i}"]] for i in range(4)],
                    "answer": int(answer),
                }
            )
    if not out:
        raise DataError(f"{path}: expected at least one row after the header, found none")
    return tuple(out)


def read_mmlu(root: Path, split: str, subject: str) -> list[dict[str, Any]]:
    """One MMLU subject in the ``cais/mmlu`` schema: question, subject, choices, answer.

    Args:
        root: the data directory.
        split: ``test`` or ``dev`` (the few-shot pool).
        subject: e.g. ``anatomy``.

    Raises:
        DataError: missing file, a missing column, a short row or an answer outside 0-3.
    """
    path = root / "mmlu" / split / f"{subject}_{split}.csv"
    _need_file(path, f"MMLU {split} ({subject})")
    return list(_mmlu_cached(_file_key(path), subject))


@functools.lru_cache(maxsize=8)
def _arc_cached(key: tuple[str, int, int], name: str) -> tuple[dict[str, Any], ...]:
    path = Path(key[0])
    out = []
    for rec in _read_jsonl(path, ARC_KEYS):
        line = rec["_line"]
        query, choices, gold = rec["query"], rec["choices"], rec["gold"]
        if not isinstance(query, str) or not query.startswith("Question: "):
            raise DataError(
                f"{path}:{line}: column 'query': expected a string starting with "
                f"'Question: ', found {query!r:.60}"
            )
        if (
            not isinstance(choices, list)
            or len(choices) != len(ARC_LABELS)
            or not all(isinstance(c, str) for c in choices)
        ):
            raise DataError(
                f"{path}:{line}: column 'choices': expected a list of "
                f"{len(ARC_LABELS)} strings, found {choices!r:.80}"
            )
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise DataError(
                f"{path}:{line}: column 'gold': expected an integer 0-"
                f"{len(choices) - 1}, found {gold!r}"
            )
        # The stock prompt is "Question: {{question}}\nAnswer:"; the local query already carries
        # the "Question: " prefix, so strip it to recover the hub's question text.
        out.append(
            {
                "id": f"{name}/{line}",
                "question": query[len("Question: ") :],
                "choices": {"text": list(choices), "label": list(ARC_LABELS)},
                "answerKey": ARC_LABELS[gold],
            }
        )
    return tuple(out)


def read_arc(root: Path, name: str) -> list[dict[str, Any]]:
    """ARC test rows in the ``allenai/ai2_arc`` schema: ``{"id", "question", "choices":
    {"text", "label"}, "answerKey"}``.

    Every local item has exactly 4 choices (3-choice items carry a duplicated option, 5-choice
    items lose the fifth; about 0.5% of items), so a few items cannot score exactly as on the hub.

    Args:
        root: the data directory.
        name: ``arc_easy`` or ``arc_challenge``.

    Raises:
        DataError: missing file or a malformed row (file:line and column named).
    """
    path = root / "arc" / f"{name}.jsonl"
    _need_file(path, name)
    return list(_arc_cached(_file_key(path), name))


__all__ = [
    "BUNDLED_DATA_DIR",
    "DataError",
    "data_root",
    "mmlu_subjects",
    "read_arc",
    "read_gsm8k",
    "read_mmlu",
]
