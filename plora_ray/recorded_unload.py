"""The trainer's unload path: PLoRA with its backbone recorder, one unload, and its checkpoint.

``TrainingRun`` (``plora_ray.training_run``) calls these functions and so does
``benchmarks/unload_scale.py``, so the benchmark times what training pays, not a copy of it:

* ``build_recorded_plora``: the recorder (``checkpoint.BackboneRecorder``) around the parameter
  access and the ``PLoRA`` that unloads through it, both given the same W_0 source
  (``base_weights.base_weights_source``, which reads each W_0 once per unload);
* ``recorded_unload``: one unload with its backbone change recorded, and the merge-error warning
  (``merge.merge_error_warning``: logged once per run, returned to go in the metrics);
* ``save_plora_checkpoint``: the PLoRA part of a checkpoint (the unload records, the digests of
  every weight they changed, the PLoRA state without the factors the records hold).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from plora_ray.checkpoint import BackboneRecorder, backbone_digests, save_backbone
from plora_ray.config import PLoRAConfig
from plora_ray.lr_schedule import RestartableLR
from plora_ray.merge import add_with_rounding, merge_error_warning
from plora_ray.plora import ParamAccess, PLoRA, derive_seed, lora_pairs, merge_coefficient

__all__ = [
    "PLORA_STATE_FILE",
    "build_recorded_plora",
    "recorded_unload",
    "rounding_generator",
    "save_plora_checkpoint",
]

PLORA_STATE_FILE = "plora_state.pt"
log = logging.getLogger(__name__)


def rounding_generator(seed: int, unload_index: int, layer_index: int, device: Any) -> Any:
    """The generator PLoRA's unload uses for a layer's rounding (seeded as ``plora.unload``)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, unload_index, layer_index, "merge"))
    return g


def build_recorded_plora(
    module: torch.nn.Module,
    cfg: PLoRAConfig,
    global_batch: int,
    seed: int,
    access: ParamAccess,
    scheduler: RestartableLR | None,
    base_weights: Callable[[str], torch.Tensor] | None,
) -> tuple[PLoRA, BackboneRecorder]:
    """PLoRA unloading through a ``BackboneRecorder`` that records each unload's change.

    Args:
        module: the model with LoRA attached (the engine's module under DeepSpeed).
        cfg: the ``plora`` section.
        global_batch: samples per optimizer step.
        seed: the run's seed.
        access: the real parameter access (``TorchParamAccess`` or ``DeepSpeedParamAccess``).
        scheduler: the LR schedule the unloads restart.
        base_weights: from_base's W_0 source (None for the other roundings), shared by both.

    Raises:
        ValueError: a ``plora`` setting PLoRA refuses, or from_base without ``base_weights``.
    """
    names = {id(p): n for n, p in module.named_parameters()}

    def generator_for(unload_index: int, layer_index: int, device: Any = "cpu") -> Any:
        return rounding_generator(seed, unload_index, layer_index, device)

    recorder = BackboneRecorder(
        access,
        lora_pairs(module),
        names,
        generator_for,
        add_with_rounding,
        # plora.cfg, not cfg: with plora.stages each stage's unload has its own momentum.
        coef_for=lambda pr: merge_coefficient(plora.cfg.momentum, pr.scaling),
        rounding=cfg.merge_rounding,
        base_weights=base_weights,
    )
    plora = PLoRA(
        module,
        cfg,
        global_batch,
        seed,
        recorder,
        scheduler=scheduler,
        base_weights=base_weights,
    )
    return plora, recorder


def recorded_unload(
    plora: PLoRA, recorder: BackboneRecorder, step: int, samples: int, warned: bool
) -> dict[str, Any]:
    """One unload with its backbone change recorded: the metrics the trainer reports.

    Returns ``UnloadReport.as_dict()`` plus ``backbone_exceptions``, ``unload_s`` (the whole
    unload as training pays it: merge, bookkeeping, rank, recording) and, when the merge error
    exceeds ``merge.MERGE_ERROR_WARN_THRESHOLD``, ``merge_warning`` (logged unless ``warned``,
    so a run logs it once).

    Args:
        plora: the run's PLoRA (``build_recorded_plora``).
        recorder: its recorder.
        step: optimizer steps so far.
        samples: training samples so far.
        warned: whether this run already logged a merge-error warning.
    """
    t0 = time.perf_counter()
    recorder.begin_unload(plora.num_unloads, step)
    rep = plora.unload(step, samples)
    rec = recorder.end_unload()
    out = {
        **rep.as_dict(),
        "backbone_exceptions": rec.num_exceptions,
        "unload_s": time.perf_counter() - t0,
    }
    warning = merge_error_warning(out, plora.cfg.merge_rounding)
    if warning is not None:
        out["merge_warning"] = warning
        if not warned:
            log.warning(warning)
    return out


def save_plora_checkpoint(
    directory: Path,
    module: torch.nn.Module,
    plora: PLoRA,
    recorder: BackboneRecorder,
    access: Any,
    write: bool,
) -> int:
    """The PLoRA part of a checkpoint: ``backbone/`` (records + digests) and the PLoRA state.

    Collective under ZeRO-3 (the digests gather each changed weight): every rank calls it there.

    Args:
        directory: the checkpoint directory.
        module: the model.
        plora: the run's PLoRA.
        recorder: its recorder (its records are the backbone's change).
        access: the parameter access the digests read through.
        write: whether this rank writes (rank 0).

    Returns:
        The bytes of ``backbone/`` written (0 on a rank that does not write).
    """
    names = sorted({ld.name for rec in recorder.records for ld in rec.layers})
    digests = backbone_digests(module, names, access)
    if not write:
        return 0
    size = save_backbone(recorder.records, digests, directory / "backbone")
    # The kept factors duplicate the records' (rebuilt from them on restore).
    state = {k: v for k, v in plora.state_dict().items() if k != "base_factors"}
    torch.save(state, directory / PLORA_STATE_FILE)
    return size
