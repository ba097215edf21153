"""The learning-rate schedule that PLoRA restarts at every unload.

Each PLoRA stage (the steps between two unloads) runs the same schedule from its start: an unload
merges the adapter into the backbone and resets the adapter's optimizer state, so the next stage
starts its optimization afresh (warmup included), with its own settings where ``plora.stages``
changes them (``RestartableLR.use_settings``). LoRA and full fine-tuning run one stage as long
as the whole run.
"""

from __future__ import annotations

import math

import torch

from plora_ray.config import OptimConfig, check_section

__all__ = ["RestartableLR", "make_lr_scheduler"]


class RestartableLR(torch.optim.lr_scheduler.LRScheduler):
    """LR = base_lr · factor(t), t = steps since the stage began; ``restart()`` starts a stage.

    factor: constant 1; warmup_restart min(1, (t+1)/warmup); cosine_restart the same warmup then
    cosine from 1 down to ``min_lr_ratio`` at t = stage_length - 1 (held there after). The stage
    length may change at each restart: with a sample-based unload interval that is not a multiple
    of the global batch, stages after the first are shorter (``plora.next_stage_length``), and the
    cosine must reach its end at each stage's own last step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        schedule: str,
        warmup_steps: int,
        min_lr_ratio: float,
        stage_length_steps: int | None,
    ) -> None:
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.stage_length_steps = stage_length_steps
        self.stage_start = 0
        super().__init__(optimizer)

    def factor(self, t: int) -> float:
        """The LR multiplier t steps into a stage (t = 0 for the stage's first step)."""
        if self.schedule == "constant":
            return 1.0
        warm = self.warmup_steps
        if t < warm:
            return (t + 1) / warm
        if self.schedule == "warmup_restart":
            return 1.0
        length = self.stage_length_steps or 1
        span = max(1, length - 1 - warm)
        progress = min(1.0, (t - warm) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    def get_lr(self) -> list[float]:  # type: ignore[override]
        f = self.factor(self.last_epoch - self.stage_start)
        return [float(base) * f for base in self.base_lrs]

    def use_settings(self, optim: OptimConfig) -> None:
        """Take a stage's optimizer settings (``plora.stages``), for the next ``restart``.

        The schedule (name, warmup, min_lr_ratio), the base LR, and AdamW's betas, eps and weight
        decay, which torch's AdamW reads from its param groups at every step (under DeepSpeed
        too: it steps the torch optimizer this schedule was built on, ``engine.build_engine``).
        The LR itself is set by ``restart`` (or ``resume_lr``).

        Raises:
            ValueError: a value the ``optim`` section's own check rejects (a ``ConfigError``).
        """
        check_section(optim, "optim")
        self.schedule = optim.schedule
        self.warmup_steps = optim.warmup_steps
        self.min_lr_ratio = optim.min_lr_ratio
        self.base_lrs = [optim.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = optim.lr
            group["betas"] = (optim.betas[0], optim.betas[1])
            group["eps"] = optim.eps
            group["weight_decay"] = optim.weight_decay

    def resume_lr(self) -> None:
        """Put the LR this schedule last set back into the param groups (after restoring its
        state: a DeepSpeed checkpoint loaded into another layout may not restore the groups)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_last_lr()):
            group["lr"] = lr

    def restart(self, stage_length_steps: int | None = None) -> None:
        """Begin a new stage now: the next optimizer step uses factor(0).

        Args:
            stage_length_steps: the new stage's length in optimizer steps (None: as the last).
        """
        if stage_length_steps is not None:
            self.stage_length_steps = stage_length_steps
        self.stage_start = self.last_epoch
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, stage_length_steps: int | None
) -> RestartableLR:
    """The run's LR schedule; PLoRA calls ``restart()`` at each unload.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is the base LR.
        optim: schedule (constant | warmup_restart | cosine_restart), warmup_steps, min_lr_ratio.
        stage_length_steps: optimizer steps of the first stage (``PLoRA.stage_length_steps``, or
            the run's total steps for LoRA / full fine-tuning; PLoRA passes each later stage's to
            ``restart``); needed by cosine_restart.

    Raises:
        ValueError: a value the ``optim`` section's own check rejects (a ``ConfigError`` naming
            e.g. ``optim.schedule``), or ``cosine_restart`` without a stage length.
    """
    check_section(optim, "optim")
    if optim.schedule == "cosine_restart" and (
        stage_length_steps is None or stage_length_steps < 1
    ):
        raise ValueError(
            "stage_length_steps: expected an integer >= 1 for optim.schedule cosine_restart, "
            f"found {stage_length_steps!r}"
        )
    return RestartableLR(
        optimizer, optim.schedule, optim.warmup_steps, optim.min_lr_ratio, stage_length_steps
    )
