"""``plora-ray validate``: check run configs and search spaces before anything runs."""

from __future__ import annotations

import sys
from typing import Any

from plora_ray.config import ConfigError, load_config, load_yaml
from plora_ray.search_space import validate_search_block


def validate_file(path: str, overrides: dict[str, Any] | None = None) -> list[str]:
    """All problems of one file (run config and, when present, its search block); [] when valid."""
    problems: list[str] = []
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        return exc.problems
    if cfg.search is not None:
        problems.extend(validate_search_block(load_yaml(path), source=path))
    return problems


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
