"""``plora-ray validate``: check run configs and search spaces before anything runs.

A file with a ``search:`` block (after the overrides) is read by ``load_search_space``, the same
function ``plora-ray search`` starts with, so validate and search accept and refuse the same keys.
"""

from __future__ import annotations

import sys
from typing import Any

from plora_ray.config import ConfigError, load_config, load_yaml
from plora_ray.search_space import apply_search_overrides, load_search_space


def validate_file(path: str, overrides: dict[str, Any] | None = None) -> list[str]:
    """All problems of one file (run config and, when present, its search block); [] when valid.

    Args:
        path: a run config or a search-space YAML.
        overrides: ``--set`` dotted keys, applied as ``train`` or ``search`` applies them.
    """
    try:
        data = load_yaml(path)
        # A --set search.* turns a run config into a search space, as it would for `search`.
        is_space = apply_search_overrides(data, overrides or {}).get("search") is not None
        if is_space:
            load_search_space(path, overrides)
        else:
            load_config(path, overrides)
    except ConfigError as exc:
        return exc.problems
    return []


def validate_command(files: list[str], overrides: dict[str, Any] | None = None) -> int:
    """``plora-ray validate FILE...``: each file's problems on stderr; 1 when any has some."""
    bad = 0
    for f in files:
        problems = validate_file(f, overrides)
        if problems:
            bad += 1
            print(f"{f}: {len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        else:
            print(f"{f}: ok")
    return 1 if bad else 0
