"""``--resume`` continues the search that was started, or refuses.

A resumed search restores Tune's and Optuna's state of the search as it started; a YAML edited
since (other rank choices, another alpha) would silently mix two searches: new trials with the
new run config, the searcher with the old distributions. So ``search.json`` keeps the resolved
search-space mapping a search started with (the file with its ``--set`` overrides applied and its
relative paths resolved: what every trial is built from), and a resume compares the mapping it
resolves now with it, key by key. Any difference is refused with the list of changed keys; a
comment or a reordering in the YAML is no difference. A search from before this record is
resumed with a warning.

The one documented way to grow a search is ``--resume --extend KEY=VALUE`` with a key of
``EXTENDABLE``: it adds trials without changing what a trial is or how the searcher samples. Each
extension is kept in ``search.json`` (``extensions``: when, which key, old -> new), applied again
by every later ``--resume``, and shown on the leaderboard.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from plora_ray.config import ConfigError
from plora_ray.search_space import SearchSpace
from plora_ray.store import SearchDir, json_text
from plora_ray.trial_record import utc_now

__all__ = [
    "EXTENDABLE",
    "EXTENSIONS_KEY",
    "STARTED_WITH_KEY",
    "check_extend",
    "check_resume",
    "config_diff",
    "recorded_extensions",
    "started_config",
]

# The key of search.json that holds the resolved mapping the search started with.
STARTED_WITH_KEY = "started_with"
_ABSENT = "(absent)"
# Keys --extend may change on --resume: more of the same search, nothing else.
EXTENDABLE = ("search.num_samples",)
EXTENSIONS_KEY = "extensions"


def _as_json(data: dict[str, Any]) -> Any:
    # What search.json gives back: the comparison sees both sides through the same JSON round
    # trip (tuples become lists, dates strings). search.json is shared with the leaderboard, so a
    # study database URL is kept without its password (a new password is no new search).
    out = json.loads(json_text(data))
    search = out.get("search")
    if isinstance(search, dict) and isinstance(search.get("study_storage"), str):
        search["study_storage"] = re.sub(
            r"(://[^:/@]+):[^@]+@", r"\1:***@", search["study_storage"]
        )
    return out


def started_config(space: SearchSpace) -> dict[str, Any]:
    """What ``search.json`` records of a new search for a later ``--resume`` to compare with.

    Args:
        space: the search space as ``run_search`` resolved it (file, ``--set``, paths).
    """
    return {STARTED_WITH_KEY: _as_json(space.data)}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            _flatten(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = value


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Each dotted key whose value differs, as ``key: old -> new`` (``(absent)`` for a key one
    side lacks), in key order."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    lines = []
    for key in sorted(a.keys() | b.keys()):
        if key in a and key in b and a[key] == b[key]:
            continue
        was = json.dumps(a[key]) if key in a else _ABSENT
        now = json.dumps(b[key]) if key in b else _ABSENT
        lines.append(f"{key}: {was} -> {now}")
    return lines


def recorded_extensions(sdir: SearchDir) -> dict[str, Any]:
    """Each extended key's newest value, from ``search.json``'s ``extensions``."""
    meta = sdir.read_json("search.json") or {}
    out: dict[str, Any] = {}
    for ext in meta.get(EXTENSIONS_KEY) or []:
        if isinstance(ext, dict) and ext.get("key") in EXTENDABLE:
            out[str(ext["key"])] = ext.get("new")
    return out


def _started_value(sdir: SearchDir, key: str) -> Any:
    meta = sdir.read_json("search.json") or {}
    if key in recorded_extensions(sdir):
        return recorded_extensions(sdir)[key]
    value: Any = meta.get(STARTED_WITH_KEY) or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None and key == "search.num_samples":
        value = meta.get("num_samples")
    return value


def check_extend(sdir: SearchDir, extend: dict[str, Any], file: str) -> list[dict[str, Any]]:
    """Check ``--extend KEY=VALUE`` of a ``--resume``; returns the extensions to record.

    Args:
        sdir: the search directory being resumed.
        extend: the ``--extend`` keys and values.
        file: the search-space YAML (for the messages).

    Raises:
        ConfigError: a key outside ``EXTENDABLE``, or a sample count that is not an integer
            above the search's current one.
    """
    problems, out = [], []
    for key, new in extend.items():
        if key not in EXTENDABLE:
            problems.append(
                f"--extend {key}: expected one of {', '.join(EXTENDABLE)} (what grows a search "
                f"without changing it), found {key}; other changes need a new search (--name)"
            )
            continue
        old = _started_value(sdir, key)
        if not isinstance(new, int) or isinstance(new, bool) or new <= (old or 0):
            problems.append(
                f"--extend {key}: expected an integer above the search's {old!r}, found {new!r}"
            )
            continue
        out.append({"at": utc_now(), "key": key, "old": old, "new": new})
    if problems:
        raise ConfigError(problems, file)
    return out


def check_resume(
    sdir: SearchDir, space: SearchSpace, file: str, extended: tuple[str, ...] = ()
) -> None:
    """Refuse a ``--resume`` whose search differs from what the search started with.

    Args:
        sdir: the search directory being resumed.
        space: the search space resolved now (file, ``--set`` and extensions).
        file: the search-space YAML (for the messages).
        extended: keys changed by ``--extend`` (now or by an earlier resume): not a difference.

    Raises:
        ConfigError: a key of the run config or of the search block differs; the message lists
            each as ``key: old -> new``.
    """
    meta = sdir.read_json("search.json") or {}
    old = meta.get(STARTED_WITH_KEY)
    if not isinstance(old, dict):
        print(
            f"warning: {sdir.uri}/search.json does not record the config the search started with "
            "(a search from an older plora-ray); resuming without comparing it with "
            f"{file} and --set",
            file=sys.stderr,
        )
        return
    diff = [
        line
        for line in config_diff(old, _as_json(space.data))
        if line.split(": ", 1)[0] not in extended
    ]
    if diff:
        changes = "".join(f"\n      {line}" for line in diff)
        raise ConfigError(
            [
                f"--resume: expected the search {sdir.uri} was started with (search.json), "
                f"found {len(diff)} changed key(s) in the file and --set (old -> new):{changes}"
                "\n    resume with the original file and --set, or start a new search (--name)"
            ],
            file,
        )
