"""lm-eval task objects on the local benchmark files: each stock task with only its data swapped.

Only the dataset fields of a stock config (``stock``) change: ``custom_dataset`` (lm-eval's hook
for local data) returns the local rows converted to the hub schema (``local_data``), so prompts,
few-shot construction, generation settings, filters and metrics are the stock ones. MMLU is the
stock group tree (acc aggregated with ``weight_by_size``) with every subject on local data.

Differences from the stock tasks, forced by the data we ship:
- ARC has only its test split here, so ARC few-shot is refused (the stock tasks draw shots from
  the train split); ARC items are padded or cut to 4 choices (see SOURCES.md of the data).
- MMLU has no validation split (the stock task does not use one).

lm-eval and ``datasets`` are imported inside the functions that use them, for the reason given in
``plora_ray.tasks.stock``.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import datasets
from lm_eval.api.group import Group
from lm_eval.api.task import ConfigurableTask, Task
from lm_eval.config.group import GroupConfig
from lm_eval.tasks import TaskManager

from plora_ray.config import EVAL_TASKS
from plora_ray.tasks.local_data import (
    DataError,
    data_root,
    mmlu_subjects,
    read_arc,
    read_gsm8k,
    read_mmlu,
)
from plora_ray.tasks.stock import (
    mmlu_index,
    mmlu_subject_categories,
    stock_config,
    stock_file_of,
    stock_tasks_dir,
)

# The task names ``build_tasks`` accepts: the config's list, so the two cannot disagree.
TASK_NAMES = EVAL_TASKS


def check_task_names(names: list[str]) -> None:
    """Raise ValueError naming each unknown task and the known ones."""
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise ValueError(
            f"eval.tasks: unknown task {', '.join(map(repr, unknown))}; expected "
            f"names from {', '.join(TASK_NAMES)}"
        )
    if not names:
        raise ValueError(
            f"eval.tasks: expected at least one of {', '.join(TASK_NAMES)}, found none"
        )


def fixed_subsample(name: str, n: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted document indices of a fixed-seed subsample of ``limit`` out of ``n`` (None: all).

    The generator is seeded from ``(seed, name)`` as a string (hashed with SHA-512 by
    ``random``), so every process and every run picks the same documents for a task.
    """
    if limit is None or limit >= n:
        return None
    return sorted(random.Random(f"{seed}:{name}").sample(range(n), limit))


class LocalDataset:
    """lm-eval's ``custom_dataset`` hook: the local rows of one task as a ``DatasetDict``.

    lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``; those kwargs are unused.
    It prints as a short description (lm-eval writes the config into its results), and deep
    copies share the rows (lm-eval's config dump deep-copies every field).
    """

    def __init__(self, name: str, root: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
        self.name, self.root, self.splits = name, root, splits

    def __call__(self, **_: Any) -> datasets.DatasetDict:
        return datasets.DatasetDict(
            {k: datasets.Dataset.from_list(v) for k, v in self.splits.items()}
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> LocalDataset:
        return self

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"plora_ray local data for {self.name} from {self.root} ({sizes})"


def local_splits(name: str, root: Path) -> dict[str, list[dict[str, Any]]]:
    """The hub-schema rows of one leaf task, keyed by the split names the stock config uses.

    Args:
        name: ``gsm8k``, ``arc_easy``, ``arc_challenge`` or ``mmlu_<subject>``.
        root: data directory.

    Raises:
        DataError: a missing or malformed file.
        ValueError: an unknown task name.
    """
    if name == "gsm8k":
        return {"train": read_gsm8k(root, "train"), "test": read_gsm8k(root, "test")}
    if name in ("arc_easy", "arc_challenge"):
        return {"test": read_arc(root, name)}
    if name.startswith("mmlu_"):
        subject = name[len("mmlu_") :]
        return {"test": read_mmlu(root, "test", subject), "dev": read_mmlu(root, "dev", subject)}
    raise ValueError(f"no local data for task {name!r}")


def check_data(names: list[str], data_dir: str | os.PathLike[str] | None) -> Path:
    """Read and validate every file the tasks need (cached), before any model work.

    Returns:
        The data directory used.

    Raises:
        ValueError: an unknown task name.
        DataError: a missing file or column (the message names file, line and column).
    """
    check_task_names(names)
    root = data_root(data_dir)
    for name in names:
        if name == "mmlu":
            subjects = mmlu_subjects(root)
            expected = set(mmlu_subject_categories())
            missing = sorted(expected - set(subjects))
            if missing:
                raise DataError(
                    f"{root / 'mmlu' / 'test'}: expected a test file for each of the "
                    f"{len(expected)} MMLU subjects, missing {', '.join(missing)}"
                )
            for s in subjects:
                local_splits(f"mmlu_{s}", root)
        else:
            local_splits(name, root)
    return root


def leaf_task_config(
    name: str, stock: dict[str, Any], root: Path, limit: int | None = None, limit_seed: int = 0
) -> dict[str, Any]:
    """The stock config of one leaf task with its dataset pointed at the local rows.

    Args:
        name: the task name (``gsm8k``, ``arc_easy``, ``mmlu_anatomy``...).
        stock: the stock config (``stock_config``).
        root: data directory.
        limit: keep a fixed-seed subsample of this many evaluation documents (``fixed_subsample``;
            the few-shot pool is untouched). Subsampling the data, rather than passing lm-eval
            ``samples``, spares lm-eval a pass over every document of the split.
        limit_seed: the subsample's seed.
    """
    cfg = dict(stock)
    # Structural keys that lm-eval's TaskFactory also strips before building a task.
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg["task"] = name
    splits = dict(local_splits(name, root))
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if eval_split in splits:
        idx = fixed_subsample(name, len(splits[eval_split]), limit, limit_seed)
        if idx is not None:
            splits[eval_split] = [splits[eval_split][i] for i in idx]
    cfg["custom_dataset"] = LocalDataset(name, root, splits)
    cfg["dataset_path"] = str(root)
    cfg["dataset_kwargs"] = None
    # Only splits that exist locally; ARC ships test only (the stock config also names train and
    # validation, which lm-eval would try to index).
    for key in ("training_split", "validation_split", "test_split"):
        if cfg.get(key) is not None and cfg[key] not in splits:
            cfg[key] = None
    cfg["metadata"] = {
        **(cfg.get("metadata") or {}),
        "config_source": str(stock_tasks_dir() / stock_file_of(name)),
        "data_source": str(root),
    }
    return cfg


def build_leaf_task(
    name: str,
    root: Path,
    num_fewshot: int | None = None,
    limit: int | None = None,
    limit_seed: int = 0,
) -> ConfigurableTask:
    """One lm-eval ``ConfigurableTask`` from its stock config on local data.

    Args:
        name: ``gsm8k``, ``arc_easy``, ``arc_challenge`` or ``mmlu_<subject>``.
        root: data directory.
        num_fewshot: shots; None keeps the stock default (gsm8k 5, others 0).
        limit: evaluate a fixed-seed subsample of this many documents (None: all).
        limit_seed: the subsample's seed.

    Raises:
        ValueError: few-shot requested for ARC (no train split is shipped).
        DataError: a missing or malformed data file.
    """
    cfg = leaf_task_config(name, stock_config(stock_file_of(name)), root, limit, limit_seed)
    if num_fewshot is not None:
        cfg["num_fewshot"] = num_fewshot
    elif cfg.get("num_fewshot") is None:
        cfg["num_fewshot"] = 0  # lm-eval's simple_evaluate does the same for tasks without one
    if name.startswith("arc_") and cfg["num_fewshot"] > 0:
        raise ValueError(
            f"eval.num_fewshot.{name}: expected 0 (only the ARC test split is "
            f"shipped, the stock task draws shots from train), found "
            f"{cfg['num_fewshot']}"
        )
    # lm-eval warns once per task that custom_dataset kwargs can come from --metadata; that
    # advice is for its CLI and would print 57 times for MMLU.
    task_log = logging.getLogger("lm_eval.api.task")
    level = task_log.level
    task_log.setLevel(logging.ERROR)
    try:
        return ConfigurableTask(config=cfg)
    finally:
        task_log.setLevel(level)


def build_mmlu(
    root: Path, num_fewshot: int | None = None, limit: int | None = None, limit_seed: int = 0
) -> Group:
    """The stock ``mmlu`` group tree with every subject task on local data.

    Args:
        root: data directory.
        num_fewshot: shots per subject (from the dev split, first-n as in lm-eval); None: 0.
        limit: documents per subject (a fixed-seed subsample, as lm-eval's ``--limit`` applies
            per subject); None: all.
        limit_seed: the subsample's seed.

    Raises:
        DataError: a missing or malformed MMLU file.
    """
    groups, tags = mmlu_index()

    def build(gname: str) -> Group:
        gcfg = dict(groups[gname])
        children = gcfg.pop("task", [])
        group = Group.from_config(GroupConfig(**gcfg))
        for child in children:
            if child in groups:
                group.add(build(child))
            else:
                # A tag: lm-eval expands it to its tasks in sorted order.
                for task in sorted(t for t, tag in tags.items() if tag == child):
                    group.add(build_leaf_task(task, root, num_fewshot, limit, limit_seed))
        return group

    return build("mmlu")


def build_tasks(
    names: list[str],
    data_dir: str | os.PathLike[str] | None = None,
    num_fewshot: dict[str, int] | None = None,
    limit: int | None = None,
    limit_seed: int = 0,
) -> dict[str, Task | Group]:
    """Top-level tasks by name (``mmlu`` is a Group), ready for ``lm_eval.evaluator.evaluate``.

    Args:
        names: task names from ``TASK_NAMES``.
        data_dir: directory with gsm8k/, mmlu/, arc/; None: the bundled copy.
        num_fewshot: shots per top-level name; a name missing here keeps lm-eval's default.
        limit: documents per leaf task, a fixed-seed subsample (``fixed_subsample``); None: all.
        limit_seed: the subsample's seed.

    Raises:
        ValueError: an unknown task name or ARC few-shot.
        DataError: a missing or malformed data file.
    """
    root = check_data(names, data_dir)
    shots = num_fewshot or {}
    out: dict[str, Task | Group] = {}
    for name in names:
        if name == "mmlu":
            out[name] = build_mmlu(root, shots.get("mmlu"), limit, limit_seed)
        else:
            out[name] = build_leaf_task(name, root, shots.get(name), limit, limit_seed)
    return out


def as_task_dict(obj: Task | Group) -> dict[str, Any]:
    """``{"tasks", "groups", "group_map"}`` as lm-eval's ``TaskManager.load`` returns it."""
    # An empty index (no default task folders scanned): load() only flattens our objects.
    return dict(TaskManager(include_defaults=False).load([obj]))


__all__ = [
    "TASK_NAMES",
    "LocalDataset",
    "as_task_dict",
    "build_leaf_task",
    "build_mmlu",
    "build_tasks",
    "check_data",
    "check_task_names",
    "fixed_subsample",
    "leaf_task_config",
    "local_splits",
]
