"""``plora-ray validate``: check run configs and search spaces before anything runs.

A file with a ``search:`` block (after the overrides) is read by ``load_search_space``, the same
function ``plora-ray search`` starts with, so validate and search accept and refuse the same keys.
A valid config's inputs (data sources, eval data, model files) are then read by
``inputs_check.check_inputs``, the pre-flight check ``train`` and ``search`` run before Ray starts.
"""

from __future__ import annotations

import sys
from typing import Any

from plora_ray.config import ConfigError, load_config, load_yaml
from plora_ray.inputs_check import check_inputs
from plora_ray.search_space import apply_search_overrides, load_search_space


def validate_file(
    path: str, overrides: dict[str, Any] | None = None, *, inputs: bool = False
) -> list[str]:
    """All problems of one file (run config and, when present, its search block); [] when valid.

    Args:
        path: a run config or a search-space YAML.
        overrides: ``--set`` dotted keys, applied as ``train`` or ``search`` applies them.
        inputs: also read the valid config's inputs (``check_inputs``: data sources, eval data,
            model files), as ``plora-ray validate`` does. Off, the file alone is checked: a
            shipped 7B config is valid before its model is downloaded.
    """
    try:
        data = load_yaml(path)
        # A --set search.* turns a run config into a search space, as it would for `search`.
        is_space = apply_search_overrides(data, overrides or {}).get("search") is not None
        if is_space:
            cfg = load_search_space(path, overrides).config
        else:
            cfg = load_config(path, overrides)
        if inputs:
            check_inputs(cfg, path)
    except ConfigError as exc:
        return exc.problems
    return []


def validate_command(files: list[str], overrides: dict[str, Any] | None = None) -> int:
    """``plora-ray validate FILE...``: each file's problems, its inputs' included, on stderr; 1
    when any has some."""
    bad = 0
    for f in files:
        problems = validate_file(f, overrides, inputs=True)
        if problems:
            bad += 1
            print(f"{f}: {len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        else:
            print(f"{f}: ok")
    return 1 if bad else 0
