"""Run configuration: YAML -> typed, checked dataclasses.

One schema serves a single training run and a search: a search space is a run config plus a
``search:`` block (see ``plora_ray.search``), and a sampled trial is the run config with dotted keys
overridden (``lora.rank=8``). Every default lives in ``schema``.

Validation collects *all* problems of a file before raising, and each message names the file, the
dotted key, what was expected and what was found, so a bad config fails before Ray starts or a GPU
is touched. The package's modules, bottom up:

- ``conversion``: YAML values -> the fields' types, a message per value that does not fit;
- ``schema``: one dataclass per section, each checking its own values (``problems``);
- ``loading``: files, dotted-key overrides, relative paths, ``dump_config``;
- ``stages``: ``plora.stages``, the settings that change at unloads (checked by the schema).
"""

from plora_ray.config.conversion import ConfigError
from plora_ray.config.loading import (
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    load_yaml,
    parse_override,
    resolve_relative_paths,
)
from plora_ray.config.schema import (
    BUNDLED_DATA_DIR,
    BUNDLED_MODELS,
    BUNDLED_SOURCES,
    EVAL_TASKS,
    LLAMA_LINEAR_TARGETS,
    BatchConfig,
    CheckpointConfig,
    DataConfig,
    DataSource,
    DeepSpeedConfig,
    ElementRounding,
    EvalConfig,
    LoraConfig,
    LrSchedule,
    MergeRounding,
    Method,
    ModelConfig,
    OptimConfig,
    PLoRAConfig,
    ResourcesConfig,
    RunConfig,
    Section,
    TinyModelConfig,
    TrainConfig,
    UnloadUnit,
    UnloadVariant,
    check_section,
    resolve_model_path,
)
from plora_ray.config.stages import STAGE_KEYS, StageSchedule, StageSettings, stage_problems

__all__ = [
    "BUNDLED_DATA_DIR",
    "BUNDLED_MODELS",
    "BUNDLED_SOURCES",
    "EVAL_TASKS",
    "LLAMA_LINEAR_TARGETS",
    "BatchConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DataSource",
    "DeepSpeedConfig",
    "ElementRounding",
    "EvalConfig",
    "LoraConfig",
    "LrSchedule",
    "STAGE_KEYS",
    "MergeRounding",
    "Method",
    "ModelConfig",
    "OptimConfig",
    "PLoRAConfig",
    "ResourcesConfig",
    "RunConfig",
    "Section",
    "StageSchedule",
    "StageSettings",
    "TinyModelConfig",
    "TrainConfig",
    "UnloadUnit",
    "UnloadVariant",
    "apply_overrides",
    "check_section",
    "config_from_dict",
    "dump_config",
    "load_config",
    "load_yaml",
    "parse_override",
    "resolve_model_path",
    "resolve_relative_paths",
    "stage_problems",
]
