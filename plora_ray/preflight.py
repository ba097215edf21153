"""What the driver settles before Ray starts: the run config's last checks, the workers' arguments.

``check_run_config``: a config that passes ``config`` can still be one the trainer cannot run
(from_base without the model's safetensors, several workers without DeepSpeed, a batch DeepSpeed
cannot split). It fails here, naming the key, the expected and the found value, before a worker
or a GPU is touched.

``WorkerArgs``: what every worker of the run gets, a typed object (Ray pickles it to Ray Train's
workers), with the two test hooks read from the driver's environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plora_ray.base_weights import from_base_source_problem
from plora_ray.config import ConfigError, RunConfig, resolve_model_path
from plora_ray.ds_config import deepspeed_config

__all__ = [
    "DEEPSPEED_OVERRIDES_ENV",
    "FAULT_ENV",
    "WorkerArgs",
    "check_run_config",
    "deepspeed_overrides_from_env",
]

# PLORA_DEEPSPEED_OVERRIDES='{json}' (read on the driver) is merged last into the DeepSpeed config,
# for settings the run config does not expose; tests use it to make ZeRO-3 partition and release a
# tiny model's parameters as it does a 7B one's.
DEEPSPEED_OVERRIDES_ENV = "PLORA_DEEPSPEED_OVERRIDES"
# Tests only. PLORA_FAULT_AT_STEP=k (read on the driver) makes every worker raise right after step
# k's report and checkpoint, in a run that did not start from a checkpoint.
FAULT_ENV = "PLORA_FAULT_AT_STEP"


def deepspeed_overrides_from_env() -> dict[str, Any] | None:
    """``PLORA_DEEPSPEED_OVERRIDES`` as a dict (None when unset).

    Raises:
        ConfigError: the variable is not a JSON object.
    """
    raw = os.environ.get(DEEPSPEED_OVERRIDES_ENV)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        value = exc
    if not isinstance(value, dict):
        raise ConfigError(
            [
                f"{DEEPSPEED_OVERRIDES_ENV}: expected a JSON object of DeepSpeed "
                f"config keys, found {raw!r}"
            ]
        )
    return value


def check_run_config(cfg: RunConfig) -> None:
    """Checks that need more than the schema: raised before Ray starts.

    Raises:
        ConfigError: a combination the trainer cannot run.
    """
    problems = []
    if cfg.method == "plora" and cfg.plora.merge_rounding == "from_base" and cfg.model.path:
        problem = from_base_source_problem(resolve_model_path(cfg.model.path))
        if problem:
            problems.append(problem)
    if not cfg.deepspeed.enabled and cfg.resources.num_workers != 1:
        problems.append(
            "deepspeed.enabled: expected true when resources.num_workers > 1 (the plain-torch "
            f"fallback runs one worker), found false with num_workers={cfg.resources.num_workers}"
        )
    if cfg.deepspeed.enabled:
        try:
            deepspeed_config(cfg, cfg.resources.num_workers, deepspeed_overrides_from_env())
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker of a run (Ray pickles it to Ray Train's workers).

    Args:
        config: the validated run config.
        output_dir: DIR, the run directory (absolute).
        fault_at_step: raise right after this step (tests: ``PLORA_FAULT_AT_STEP``).
        deepspeed_overrides: merged last into the DeepSpeed config (``PLORA_DEEPSPEED_OVERRIDES``).
    """

    config: RunConfig
    output_dir: str
    fault_at_step: int | None = None
    deepspeed_overrides: dict[str, Any] | None = None

    @classmethod
    def from_environment(cls, config: RunConfig, output_dir: Path) -> WorkerArgs:
        """The arguments of a run, with the tests' fault and DeepSpeed overrides from the env.

        Raises:
            ConfigError: ``PLORA_DEEPSPEED_OVERRIDES`` is not a JSON object.
            ValueError: ``PLORA_FAULT_AT_STEP`` is not an integer.
        """
        fault = os.environ.get(FAULT_ENV)
        return cls(
            config=config,
            output_dir=str(output_dir),
            fault_at_step=int(fault) if fault else None,
            deepspeed_overrides=deepspeed_overrides_from_env(),
        )
