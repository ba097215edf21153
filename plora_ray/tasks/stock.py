"""The stock task configs of the installed lm-evaluation-harness, read as lm-eval reads them.

Each task of ``plora_ray.tasks`` starts from one of these YAMLs (``gsm8k/gsm8k.yaml``,
``mmlu/default/mmlu_<subject>.yaml``, ``arc/arc_easy.yaml``, ``arc/arc_challenge.yaml``), loaded
with lm-eval's own YAML loader so ``include:`` chains resolve exactly as lm-eval resolves them.
MMLU's group tree (``mmlu`` -> stem/other/social_sciences/humanities -> 57 subjects) comes from
the stock group YAMLs.

lm-eval is imported inside the functions that use it: the package sets the offline switches of
``datasets`` and ``huggingface_hub`` before lm-eval first loads them (``plora_ray.tasks``), and
``plora_ray.evaluate``'s proxy objective, which the training loop imports, needs no lm-eval.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import lm_eval
import lm_eval.tasks

# Private in lm-eval 0.4.13: the loader that resolves !function tags and includes as lm-eval does.
from lm_eval.tasks._yaml_loader import load_yaml

# The stock config files, relative to lm_eval/tasks/.
STOCK_FILES = {
    "gsm8k": "gsm8k/gsm8k.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
}
MMLU_DIR = "mmlu/default"


def stock_tasks_dir() -> Path:
    """The ``lm_eval/tasks`` folder of the installed lm-eval."""
    return Path(lm_eval.tasks.__file__).resolve().parent


def stock_config(relpath: str) -> dict[str, Any]:
    """A stock task/group YAML of the installed lm-eval, includes resolved, as lm-eval loads it.

    Args:
        relpath: path under ``lm_eval/tasks``, e.g. ``gsm8k/gsm8k.yaml``.

    Raises:
        FileNotFoundError: the installed lm-eval has no such config (a different version).
    """
    path = stock_tasks_dir() / relpath
    if not path.is_file():
        raise FileNotFoundError(
            f"lm-eval {getattr(lm_eval, '__version__', '?')} has no task config {relpath!r} "
            f"(looked in {path.parent}); plora-ray derives its tasks from lm-eval 0.4.x configs"
        )
    return dict(load_yaml(path, resolve_func=True))


def stock_file_of(name: str) -> str:
    """The stock config file of a leaf task, relative to ``lm_eval/tasks``."""
    if name.startswith("mmlu_"):
        return f"{MMLU_DIR}/{name}.yaml"
    return STOCK_FILES[name]


@functools.lru_cache(maxsize=1)
def mmlu_index() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The stock MMLU configs (cached): groups by name, and each subject task's tag (category)."""
    groups: dict[str, dict[str, Any]] = {}
    tags: dict[str, str] = {}
    for path in sorted((stock_tasks_dir() / MMLU_DIR).glob("*.yaml")):
        cfg = load_yaml(path, resolve_func=False, recursive=True)
        if "group" in cfg:
            groups[cfg["group"]] = dict(cfg)
        elif "task" in cfg:
            tag = cfg.get("tag")
            tags[cfg["task"]] = tag if isinstance(tag, str) else tag[0]
    if "mmlu" not in groups:
        raise FileNotFoundError(f"no 'mmlu' group config under {stock_tasks_dir() / MMLU_DIR}")
    return groups, tags


def mmlu_subject_categories() -> dict[str, str]:
    """``{subject: category group}`` from the stock configs, e.g. ``anatomy: mmlu_stem``."""
    groups, tags = mmlu_index()
    tag_to_group = {}
    for gname, g in groups.items():
        for child in g.get("task", []):
            if isinstance(child, str) and child not in groups:
                tag_to_group[child] = gname
    return {task[len("mmlu_") :]: tag_to_group[tag] for task, tag in tags.items()}


__all__ = [
    "MMLU_DIR",
    "STOCK_FILES",
    "mmlu_subject_categories",
    "mmlu_index",
    "stock_config",
    "stock_file_of",
    "stock_tasks_dir",
]
