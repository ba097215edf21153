"""lm-eval tasks on the local benchmark files, derived at run time from the installed lm-eval.

Each task is the stock task of the installed lm-evaluation-harness with only its dataset replaced
by the local rows, so prompts, few-shot construction, generation settings, filters and metrics are
lm-eval's own. The modules, bottom up:

- ``offline``: the hub switches, set before lm-eval is ever loaded;
- ``local_data``: read and validate the local files, rows converted to the hub schema;
- ``stock``: the stock task and group configs of the installed lm-eval;
- ``build``: the task objects (``build_tasks``) that ``plora_ray.evaluate`` runs.
"""

from plora_ray.tasks import offline as offline
from plora_ray.tasks.build import (
    TASK_NAMES,
    LocalDataset,
    as_task_dict,
    build_leaf_task,
    build_mmlu,
    build_tasks,
    check_data,
    check_task_names,
    fixed_subsample,
    leaf_task_config,
    local_splits,
)
from plora_ray.tasks.local_data import DataError
from plora_ray.tasks.stock import mmlu_subject_categories, stock_config, stock_tasks_dir

__all__ = [
    "TASK_NAMES",
    "DataError",
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
    "mmlu_subject_categories",
    "stock_config",
    "stock_tasks_dir",
]
