"""Per-stage settings (``plora.stages``): what may change at an unload, checked, and in force when.

A stage is the training between two unloads: stage 0 runs from step 0 to the first unload, stage
k starts right after unload k. Each entry of ``plora.stages`` names the stage it starts at and
the settings that change there, as dotted keys (the form ``--set`` and a search's
``points_to_evaluate`` use)::

    plora:
      unload_every: 600
      stages:
        - {at: 2, optim.lr: 5.0e-5, plora.momentum: 0.3}
        - {at: 4, optim.schedule: cosine_restart, plora.unload_every: 1200}

An entry's settings hold from stage ``at`` on, until a later entry changes them. ``at`` is an
integer >= 1, strictly increasing over the list (stage 0 runs the config's own settings).
``plora.momentum`` of a stage is the momentum of the unload that *ends* that stage;
``plora.unload_every`` of a stage is that stage's length in ``plora.unload_unit`` (which cannot
change): the stage's unload points are the unload point that began it plus multiples of its
interval. Without an interval change the points stay the multiples of ``unload_every``, as in a
run without stages.

Only ``STAGE_KEYS`` may change: each is read afresh at or after an unload, by the LR schedule
(restarted at the unload), by torch's AdamW at every step (its param groups' ``lr``, ``betas``,
``eps``, ``weight_decay``; DeepSpeed steps the same torch optimizer, ``engine.py``) or by PLoRA.
Everything else is built once per run (the adapters' shapes, the engine, the data) and is refused
with the reason. A value is checked by applying the entries up to it to a copy of its section and
running that section's own checks, so the ranges live in ``schema`` only.

This module imports no schema class at run time (``schema`` calls ``stage_problems``); it reads
the sections it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_type_hints

from plora_ray.config.conversion import ConfigError, convert_value

if TYPE_CHECKING:
    from plora_ray.config.schema import OptimConfig, PLoRAConfig, RunConfig

__all__ = ["STAGE_KEYS", "StageSchedule", "StageSettings", "stage_problems"]

# The settings a stage may change; the PBT scheduler perturbs these.
STAGE_KEYS = (
    "optim.lr",
    "optim.betas",
    "optim.eps",
    "optim.weight_decay",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "plora.momentum",
    "plora.unload_every",
)

# Why a config key cannot change at an unload: by dotted key, else by its section.
_FIXED: dict[str, str] = {
    "optim.name": "the optimizer is built once, with the engine",
    "optim.grad_clip": "DeepSpeed fixes gradient clipping when it builds the engine",
    "plora.unload_unit": "every stage is measured in one unit, so the run's unit is fixed",
    "plora.variant": "an unload variant is a setting of the whole run",
    "plora.merge_rounding": (
        "the merge rounding is fixed for the run (from_base opens the original weights at the "
        "start, and a checkpoint replays the run's one rounding)"
    ),
    "plora.rank_threshold": "the effective-rank metric is defined once for the whole run",
    "plora.rank_sample_layers": "the effective-rank metric is defined once for the whole run",
    "plora.stages": "stages do not nest",
    "model": "the model is loaded once, before the engine is built",
    "lora": "the adapters' shapes and scaling are built once (another rank needs new adapters)",
    "data": "the data pipeline is built once, at the start",
    "batch": "the batch sizes and gradient accumulation are fixed when the engine is built",
    "deepspeed": "the DeepSpeed engine is built once",
    "resources": "the workers are started once",
    "train": "it is a setting of the whole run",
    "eval": "it is a setting of the whole run",
    "checkpoint": "it is a setting of the whole run",
    "seed": "it is a setting of the whole run",
    "method": "it is a setting of the whole run",
    "search": "it is a setting of the whole search",
}


def _config_keys(cfg: RunConfig) -> set[str]:
    """Every dotted key of a run config: ``seed``, ``optim``, ``optim.lr``, ... (one level)."""
    keys = set()
    for f in dataclasses.fields(cfg):
        keys.add(f.name)
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)}
    return keys


def _refusal(name: str, cfg: RunConfig, entry: str) -> str | None:
    """The problem with a key of the stage entry ``entry`` (``plora.stages[i]``) other than
    ``at``; None when it may change."""
    where = f"{entry}.{name}"
    if name in STAGE_KEYS:
        return None
    allowed = ", ".join(STAGE_KEYS)
    known = _config_keys(cfg)
    if name in known or name.split(".", 1)[0] in known - {"plora", "optim"}:
        reason = _FIXED.get(name) or _FIXED.get(name.split(".", 1)[0], "it is fixed for the run")
        return (
            f"{where}: expected a setting that can change at an unload ({allowed}), found "
            f"{name!r}, which cannot: {reason}"
        )
    hint = difflib.get_close_matches(name, ("at", *STAGE_KEYS), n=1)
    extra = f" (did you mean {entry + '.' + hint[0]!r}?)" if hint else ""
    return f"{where}: unknown key{extra}; expected at or one of {allowed}"


def _apply(
    sections: dict[str, Any], settings: dict[str, Any], where: str, problems: list[str]
) -> None:
    """Set each dotted key of ``settings`` on its section (``sections['optim']``, ...), the
    value converted to the field's type; a value that does not fit is left out, with a problem
    naming ``where.key``."""
    for name, value in settings.items():
        section_name, field_name = name.split(".", 1)
        section = sections[section_name]
        hint = get_type_hints(type(section))[field_name]
        before = len(problems)
        out = convert_value(value, hint, f"{where}.{name}", problems)
        if len(problems) == before:
            setattr(section, field_name, out)


def stage_problems(cfg: RunConfig, prefix: str = "") -> list[str]:
    """Every problem of ``plora.stages``, each naming ``plora.stages[i].key``.

    Args:
        cfg: the run config, its sections already built (their own problems are reported by
            their own checks; here only what a stage entry sets).
        prefix: the run config's dotted prefix (empty at the top level).

    Returns:
        One message per problem: a refused or unknown key, a bad ``at``, a value its section
        rejects, stages on a method without unloads.
    """
    entries = cfg.plora.stages
    key = f"{prefix}.plora.stages" if prefix else "plora.stages"
    problems: list[str] = []
    if not isinstance(entries, list) or not entries:
        return problems
    if cfg.method != "plora":
        problems.append(
            f"{key}: expected no stages with method {cfg.method!r} (a stage is the training "
            f"between two PLoRA unloads), found {len(entries)} entries"
        )
        return problems
    sections: dict[str, Any] = {
        "plora": copy.deepcopy(cfg.plora),
        "optim": copy.deepcopy(cfg.optim),
    }
    previous_at = 0
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            continue  # the conversion of plora.stages reported it
        if "at" not in entry:
            problems.append(
                f"{where}: expected an 'at' key (the stage the entry's settings start at), "
                f"found keys {', '.join(map(str, entry)) or 'none'}"
            )
        else:
            found: list[str] = []
            at = convert_value(entry["at"], int, f"{where}.at", found)
            if found or at < 1:
                problems.append(f"{where}.at: expected an integer >= 1, found {entry['at']!r}")
            elif at <= previous_at:
                problems.append(
                    f"{where}.at: expected an integer > {previous_at} (the entry before starts at "
                    f"stage {previous_at}; entries go in stage order), found {entry['at']!r}"
                )
            else:
                previous_at = at
        settings = {str(k): v for k, v in entry.items() if k != "at"}
        if not settings:
            problems.append(
                f"{where}: expected at least one setting besides at ({', '.join(STAGE_KEYS)}), "
                "found none"
            )
        refused = [_refusal(name, cfg, where) for name in settings]
        problems += [p for p in refused if p is not None]
        allowed = {k: v for k, v in settings.items() if k in STAGE_KEYS}
        _apply(sections, allowed, where, problems)
        # The sections' own range checks on the settings in force from this stage on; only the
        # keys this entry sets are its problems (the base config's are reported as such).
        for name in allowed:
            section_name = name.split(".", 1)[0]
            for problem in sections[section_name].problems(section_name):
                if problem.split(":", 1)[0] == name:
                    problems.append(f"{where}.{problem}")
    return problems


@dataclass(frozen=True)
class StageSettings:
    """The settings in force during one stage: the ``plora`` and ``optim`` sections with every
    entry up to the stage applied."""

    index: int
    plora: PLoRAConfig
    optim: OptimConfig

    def as_dict(self) -> dict[str, Any]:
        """Each of ``STAGE_KEYS`` and its value in this stage (what the metrics log)."""
        sections = {"plora": self.plora, "optim": self.optim}
        out = {}
        for name in STAGE_KEYS:
            section_name, field_name = name.split(".", 1)
            out[name] = copy.copy(getattr(sections[section_name], field_name))
        return out


class StageSchedule:
    """A run's ``plora.stages``, checked: the settings in force in each stage.

    The stage index is the number of unloads done so far (``PLoRA.num_unloads``), which a
    checkpoint holds, so a resumed run finds its stage's settings again.

    Args:
        cfg: the run config.

    Raises:
        ConfigError: the problems of ``plora.stages`` (``stage_problems``).
    """

    def __init__(self, cfg: RunConfig) -> None:
        problems = stage_problems(cfg)
        if problems:
            raise ConfigError(problems)
        self.base_plora, self.base_optim = cfg.plora, cfg.optim
        self.entries: list[tuple[int, dict[str, Any]]] = [
            (int(entry["at"]), {str(k): v for k, v in entry.items() if k != "at"})
            for entry in cfg.plora.stages
        ]

    def __bool__(self) -> bool:
        return bool(self.entries)

    def settings(self, stage: int) -> StageSettings:
        """The settings of stage ``stage`` (0: the config's own; entries with ``at`` <= stage
        applied in order, later ones winning)."""
        sections: dict[str, Any] = {
            "plora": copy.deepcopy(self.base_plora),
            "optim": copy.deepcopy(self.base_optim),
        }
        problems: list[str] = []
        for at, settings in self.entries:
            if at <= stage:
                _apply(sections, settings, "plora.stages", problems)
        if problems:  # checked in __init__; kept for a schedule edited after that
            raise ConfigError(problems)
        return StageSettings(stage, sections["plora"], sections["optim"])
