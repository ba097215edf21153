"""PeriodicLoRA (PLoRA, arXiv 2402.16141) on stock peft LoRA layers: the method's state machine.

PLoRA trains an ordinary rank-r LoRA adapter and, at fixed points of training, *unloads* it: the
adapter's update is merged into the frozen backbone, the adapter is reset (keeping a fraction m,
the momentum), the adapter's optimizer state is reset and the learning-rate schedule restarts.
Over T stages the backbone accumulates an update of rank up to T*r at the memory cost of rank r.
This module is a training-loop behaviour on top of peft's LoRA layers, not a new tuner.

Unload semantics (per target layer, with ΔW = scaling * B @ A computed in fp32):

* ``variant="exact"`` (the default, function-preserving): W <- W + (1-m)·ΔW and the adapter keeps
  exactly m·ΔW. Factorisation: **B <- m·B, A unchanged**. Why A stays: the adapter must keep
  m·ΔW exactly, and with rank r the only factorisations of m·B·A are (B·M^-1·m, M·A), so A's row
  space cannot be refreshed without losing part of m·ΔW. Keeping A at its trained scale and
  shrinking B puts the adapter in the same shape as LoRA's own init (A at full scale, B near zero):
  B learns at full speed in A's row space, and A still learns new input directions because its
  gradient, s·B^T·G, is non-zero while B is, and Adam (whose moments are reset at the unload)
  normalises the step size per coordinate, so A's steps do not shrink with ||B||.
* ``m = 0`` (both variants): A is re-initialised as peft's LoRA init, kaiming_uniform(a=sqrt(5)),
  i.e. U(-1/sqrt(in), 1/sqrt(in)), and B is zeroed: a fresh adapter in new random directions.
* ``variant="paper_literal"``: W <- W + (1-m)·ΔW, A <- m·A, B <- m·B, as the paper's text reads.
  The adapter then holds m²·ΔW, so each unload drops m(1-m)·ΔW of the learnt update and the
  model's outputs jump. Offered for faithful reproduction only.

Merge precision: the fp32 merge is rounded into the backbone's dtype (``plora.merge_rounding``:
nearest, stochastic or from_base; what each costs and guarantees is in ``plora_ray.merge``).
Each unload reports ``merge_rel_error`` = ||applied - intended||_F / ||intended||_F over all
layers (applied = W_after - W_before, intended = (1-m)·ΔW; fp32 on the weights' device, every
layer, formed in the merge's one fp32 temporary, ||intended||² from the factors' r x r Grams,
one host read per unload) and ``cumulative_rel_error`` = ||(W_now - W_0) - Σ intended||_F
/ ||Σ intended||_F over the tracked layers (those sampled for the rank metric, or every layer
with ``track_all_layers=True``). The cumulative error needs neither W_0 nor a dense Σ intended:
(W_now - W_0) - Σ intended is the sum of the unloads' own errors (applied - intended), which each
merge forms anyway, so a tracked layer keeps that sum (the drift, fp32 on its device) and
||Σ intended||² comes from the kept factors' Grams. A merge error above
``MERGE_ERROR_WARN_THRESHOLD`` (5%) gets a warning naming ``plora.merge_rounding``
(``merge_error_warning``). The final export merges the last adapter the same way
(``PLoRA.merge_adapter``).

Effective rank (``plora_ray.effective_rank``, one definition everywhere): the number of singular
values above ``plora.rank_threshold`` · σ_max, reported at each unload for the change Σ intended
of ``plora.rank_sample_layers`` evenly spaced layers, computed from the merges' kept factors
(``factor_effective_rank``: milliseconds, no dense SVD). What rounding into the backbone's dtype
adds on top is the dense rank of W_now - W_0 (``PLoRA.delta_effective_rank``, for tests and
benchmarks).

Unload points: every ``unload_every`` optimizer steps or training samples (``unload_unit``).
The points are the multiples of ``unload_every``; ``due`` is called after each optimizer step and
fires when the counter has passed a point since the last unload. A sample-based point that falls
inside a step fires at the first step boundary at or after it; several points passed within one
step fire a single unload. With ``plora.stages`` (``StageSchedule``), the unload that ends stage k
applies stage k+1's settings after its merge, before the optimizer reset and the LR restart; a
stage that changes ``unload_every`` counts its points from the point that ended the stage before
(``point_origin``: the last point of the old interval the counter passed), so they are that point
plus multiples of the new interval.

Randomness (A re-init, stochastic rounding) comes from torch.Generators seeded from
(seed, unload index, layer index), so every rank computes identical bits without communication
and a resumed run continues with the same bits.

How an unload reads and writes parameters is the ``ParamAccess`` protocol
(``plora_ray.param_access``, re-exported here with ``TorchParamAccess``, for plain torch);
DeepSpeed's is ``plora_ray.engine.DeepSpeedParamAccess``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast, get_args

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from plora_ray.config import LoraConfig, Method, PLoRAConfig, StageSchedule, check_section
from plora_ray.effective_rank import (
    FactorGrams,
    argument_error,
    effective_rank,
    factor_effective_rank,
    rank_of_spectrum,
    sampled_layers,
)
from plora_ray.lr_schedule import RestartableLR
from plora_ray.merge import (
    MERGE_ERROR_WARN_THRESHOLD,
    Factors,
    merge_error_warning,
    merge_from_base,
    round_to_dtype,
)
from plora_ray.model import check_lora_targets
from plora_ray.param_access import ParamAccess, TorchParamAccess

# The choices come from the config's types, so a new one is added in one place.
METHODS: tuple[str, ...] = get_args(Method)

__all__ = [
    "MERGE_ERROR_WARN_THRESHOLD",
    "Factors",
    "LoraPair",
    "PLoRA",
    "ParamAccess",
    "TorchParamAccess",
    "UnloadReport",
    "attach_lora",
    "base_param_name",
    "derive_seed",
    "effective_rank",
    "factor_effective_rank",
    "lora_init_A",
    "lora_pairs",
    "merge_coefficient",
    "merge_error_warning",
    "next_stage_length",
    "rank_of_spectrum",
    "sampled_layers",
    "unload_due",
]


# --------------------------------------------------------------------------- LoRA attachment


def attach_lora(model: nn.Module, lora: LoraConfig, method: str = "plora") -> nn.Module:
    """Attach stock peft LoRA adapters (or make every parameter trainable for ``full``).

    Args:
        model: the base model (e.g. from ``plora_ray.model.load_model``).
        lora: rank, alpha, dropout and target module names (default the seven LLaMA linears).
        method: ``plora`` or ``lora`` (the same adapters; PLoRA adds unloads in the loop) or
            ``full`` (full fine-tuning: the model itself, all parameters trainable).

    Returns:
        The peft model (only LoRA parameters trainable), or ``model`` for ``full``.

    Raises:
        ValueError: naming ``method``, ``lora.rank``, ``lora.alpha``, ``lora.dropout`` or
            ``lora.targets`` (with the names the model lacks) and the value found (a
            ``ConfigError`` for a value the ``lora`` section's own check rejects).
    """
    if method not in METHODS:
        raise argument_error("method", "one of " + ", ".join(METHODS), method)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    check_section(lora, "lora")
    check_lora_targets(model, list(lora.targets))
    peft_cfg = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int; alpha/r works for a float
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
    )
    # peft's default autocast_adapter_dtype=True keeps the adapters in fp32 on a bf16 backbone,
    # which is what makes "the adapter keeps exactly m·ΔW" hold in plain torch.
    return get_peft_model(model, peft_cfg)


@dataclass
class LoraPair:
    """One LoRA-wrapped linear layer: frozen W (out x in), A (r x in), B (out x r), scaling."""

    name: str
    layer: LoraLayer
    base: nn.Parameter
    A: nn.Parameter
    B: nn.Parameter
    scaling: float


def lora_pairs(model: nn.Module) -> list[LoraPair]:
    """Every peft LoRA Linear of ``model`` (its active adapter), in module registration order.

    Registration order (``named_modules``) is the model's definition order, identical on every
    rank and every run, so layer indices (used to seed generators) are stable.
    """
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, LoraLayer) or not isinstance(mod.get_base_layer(), nn.Linear):
            continue
        adapter = mod.active_adapters[0]
        if adapter not in mod.lora_A:
            continue
        pairs.append(
            LoraPair(
                name=name,
                layer=mod,
                base=cast(nn.Parameter, mod.get_base_layer().weight),
                A=cast(nn.Parameter, mod.lora_A[adapter].weight),
                B=cast(nn.Parameter, mod.lora_B[adapter].weight),
                scaling=float(mod.scaling[adapter]),
            )
        )
    return pairs


# --------------------------------------------------------------------------- seeds, points, rank


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as (seed, unload index, layer index, purpose)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, *parts: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def unload_due(counter: int, last_counter: int, every: int) -> bool:
    """Whether an unload is due after the optimizer step that brought ``counter`` to its value.

    Unload points are the multiples of ``every`` (in steps or samples). An unload is due when a
    point p satisfies last_counter < p <= counter, i.e. a point that falls inside the last step
    fires at that step's boundary, and several points within one step fire once.

    Args:
        counter: optimizer steps or samples seen so far (after this step).
        last_counter: the counter's value at the last unload (0 before the first).
        every: the unload interval, >= 1.

    Raises:
        ValueError: ``every`` < 1 (named ``plora.unload_every``).
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise argument_error("plora.unload_every", "an integer >= 1", every)
    return counter // every > last_counter // every


def next_stage_length(cfg: PLoRAConfig, global_batch: int, samples_seen: int) -> int:
    """Optimizer steps from an unload (or the start) to the next unload point.

    Step-based intervals: ``unload_every``. Sample-based ones: the steps until the sample counter
    passes the next multiple of ``unload_every`` (see ``unload_due``) at ``global_batch`` samples
    per step, so the length is computed per stage: every 50 samples at batch 24 gives 3 steps
    (to sample 72), then 2 (to 120), 2, ...

    Args:
        cfg: the ``plora`` section (``unload_every``, ``unload_unit``).
        global_batch: samples per optimizer step.
        samples_seen: the sample counter where the stage begins (0 for the first stage).
    """
    if cfg.unload_unit == "steps":
        return cfg.unload_every
    next_point = (samples_seen // cfg.unload_every + 1) * cfg.unload_every
    return -(-(next_point - samples_seen) // global_batch)


def merge_coefficient(momentum: float, scaling: float) -> float:
    """The factor an unload merges a layer's ``B @ A`` with: (1 - m) * scaling.

    The unload, the backbone recorder and the checkpoint replay all take it from here: if two
    of them computed it differently, every merged element would differ from its replay and be
    stored as a recorder exception, and checkpoints would silently grow.

    Args:
        momentum: ``plora.momentum`` (m), the fraction of the update the adapter keeps.
        scaling: the LoRA layer's ``scaling`` (alpha / rank).
    """
    return (1.0 - float(momentum)) * scaling


def base_param_name(pair_name: str) -> str:
    """The base model's parameter name of a LoRA layer's frozen weight.

    ``base_model.model.model.layers.0.self_attn.q_proj`` (a ``lora_pairs`` name, peft's wrapping)
    -> ``model.layers.0.self_attn.q_proj.weight`` (the name in the checkpoint files).
    """
    prefix = "base_model.model."
    name = pair_name[len(prefix) :] if pair_name.startswith(prefix) else pair_name
    return name + ".weight"


def lora_init_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """peft's LoRA init of A in fp32: kaiming_uniform(a=sqrt(5)) on (rank, in), U(±1/sqrt(in))."""
    a = torch.empty(rank, in_features, dtype=torch.float32)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


# --------------------------------------------------------------------------- the method


@dataclass
class UnloadReport:
    """What one unload did; ``as_dict()`` is what the trainer logs."""

    index: int
    step: int
    samples: int
    merge_rel_error: float
    cumulative_rel_error: float | None
    effective_rank: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PLoRA:
    """The PLoRA schedule and unload, owned by the training loop.

    Loop order per optimizer step: ``optimizer.step(); scheduler.step(); if plora.due(step,
    samples): plora.unload(step, samples)``. The unload restarts ``scheduler`` when one is set
    (constructor argument or attribute), and resets the LoRA parameters' optimizer state through
    ``access``.

    What an unload keeps, on the weights' device (a host copy is made only by ``state_dict``):
    each merge's factors (coef·B, A), fp32, of every layer under ``from_base`` (its merge is
    computed from them) and of the tracked layers otherwise (the rank-sampled layers: their
    effective rank, ``factor_effective_rank``, and ||Σ intended||² come from them); and for the
    tracked layers the drift (W_now - W_0) - Σ intended, fp32, for ``cumulative_rel_error``.
    The error bookkeeping is fp32 on the device, summed without a host sync per layer, over
    every layer.

    Args:
        model: a model with peft LoRA layers (``attach_lora``).
        cfg: the ``plora`` section.
        global_batch: samples per optimizer step (sets the stage length of sample-based points).
        seed: the run's seed; every random bit of an unload derives from it.
        access: how parameters and optimizer state are read and written.
        scheduler: a ``RestartableLR`` to restart at each unload (optional).
        stages: the run's per-stage settings (``plora.stages``; argument or attribute): each
            unload takes the next stage's ``plora`` section, and gives the scheduler its
            ``optim`` settings before the restart. None or empty: ``cfg`` throughout.
        track_all_layers: measure the cumulative merge error over every layer (keeps an fp32
            drift of every layer: backbone-sized, for tests and benchmarks only).
            Default: only the layers sampled for the effective rank.
        base_weights: for ``merge_rounding="from_base"``: base parameter name (e.g.
            ``model.layers.0.self_attn.q_proj.weight``, see ``base_param_name``) -> that weight's
            original value W_0 (any float dtype, any device), e.g. ``safetensors_base_weights``;
            pass the recorder the same source (``base_weights.base_weights_source`` keeps the
            last layer read, so the unload and the recorder read each W_0 once).

    Raises:
        ValueError: a setting out of range (named ``plora.<key>`` with the value found), a model
            without LoRA layers, or ``from_base`` without ``base_weights``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: PLoRAConfig,
        global_batch: int,
        seed: int,
        access: ParamAccess,
        *,
        scheduler: RestartableLR | None = None,
        stages: StageSchedule | None = None,
        track_all_layers: bool = False,
        base_weights: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        # The plora section checks itself, as it does when loaded from YAML.
        check_section(cfg, "plora")
        if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
            raise argument_error("batch.global_batch", "an integer >= 1", global_batch)
        if cfg.merge_rounding == "from_base" and base_weights is None:
            raise argument_error(
                "plora.merge_rounding",
                "nearest or stochastic, or 'from_base' together "
                "with PLoRA(base_weights=...) (a source of the original weights)",
                cfg.merge_rounding,
            )
        self.base_weights = base_weights
        # Per layer, the factors (coef·B, A) of every unload so far (fp32, weights' device):
        # every layer under from_base, the rank-sampled layers otherwise (``factor_layers``).
        self.base_factors: dict[str, list[Factors]] = {}
        # Per tracked layer, the Grams of its factors, extended by each unload's merge.
        self.grams: dict[str, FactorGrams] = {}
        self.cfg = cfg
        self.global_batch = global_batch
        self.seed = int(seed)
        self.access = access
        self.scheduler = scheduler
        self.pairs = lora_pairs(model)
        if not self.pairs:
            raise ValueError(
                "model: expected peft LoRA layers (call attach_lora first), found none"
            )
        self.num_unloads = 0
        self.last_step = 0
        self.last_samples = 0
        self.stages = stages
        # Where the current interval's unload points are counted from (0 without stages).
        self.point_origin = 0
        self.sampled = sampled_layers(len(self.pairs), cfg.rank_sample_layers)
        self.tracked = list(range(len(self.pairs))) if track_all_layers else list(self.sampled)
        # Per tracked layer, (W_now - W_0) - Σ intended in fp32 on the weight's device: the sum
        # of every unload's applied - intended. Made at the first unload (the weight's shape:
        # ZeRO-3 shows an empty placeholder outside gathered()).
        self.drift: dict[str, torch.Tensor] = {}

    def factor_layers(self) -> set[str]:
        """The layers whose merged factors the unload keeps (see ``base_factors``)."""
        if self.cfg.merge_rounding == "from_base":
            return {p.name for p in self.pairs}
        return {self.pairs[i].name for i in self.tracked}

    def _merged_weight(
        self,
        i: int,
        p: LoraPair,
        coef: float,
        b: torch.Tensor,
        a: torch.Tensor,
        w: torch.Tensor,
        drift: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge coef·B·A into w with the configured rounding: (new weight in w's dtype, the
        squared Frobenius error of applied vs intended as an fp32 scalar on w's device).

        One fp32 temporary of the layer's size: intended = coef·(b @ a) becomes the sum
        w + intended in place (the same bits as ``w.float() + intended``, which is how
        ``checkpoint.replay_layer`` replays it: fp32 addition commutes and w is exact in fp32),
        then the rounding error total - new in place. ``from_base``: round_nearest(W_0 + the
        earlier unloads' merges + this one), with this merge's factors already appended to
        ``base_factors``. ``drift`` (a tracked layer's (W - W_0) - Σ intended) gains this
        merge's applied - intended, in place.
        """
        intended = b @ a
        intended.mul_(coef)
        if self.cfg.merge_rounding == "from_base":
            new = self._from_base(p, self.base_factors[p.name], w)
            diff = new.to(torch.float32, copy=True)
            diff.sub_(w)
            diff.sub_(intended.to(w.device))
            if drift is not None:
                drift.add_(diff.to(drift.device))
            return new, torch.linalg.vector_norm(diff).square()
        total = intended.to(w.device).add_(w)
        gen = _generator(w.device, self.seed, self.num_unloads, i, "merge")
        new = round_to_dtype(total, w.dtype, self.cfg.merge_rounding, gen)
        if new.dtype == torch.float32:  # an fp32 backbone: no rounding, and new is total itself
            return new, torch.zeros((), device=w.device)
        err = total.sub_(new)  # intended - applied
        if drift is not None:
            drift.sub_(err.to(drift.device))
        return new, torch.linalg.vector_norm(err).square()

    def _from_base(self, p: LoraPair, factors: list[Factors], w: torch.Tensor) -> torch.Tensor:
        """round_nearest(W_0 + Σ factors) for one layer, W_0 read from the source."""
        assert self.base_weights is not None
        w0 = self.base_weights(base_param_name(p.name)).to(device=w.device)
        if w0.shape != w.shape:
            raise ValueError(
                f"base_weights({base_param_name(p.name)!r}): expected shape "
                f"{tuple(w.shape)}, found {tuple(w0.shape)}"
            )
        return merge_from_base(w0, factors, w.dtype)

    @property
    def stage_length_steps(self) -> int:
        """Optimizer steps of the first stage (sample-based intervals rounded up to whole steps;
        later stages: ``next_stage_length``)."""
        return next_stage_length(self.cfg, self.global_batch, 0)

    def trainable_params(self) -> list[nn.Parameter]:
        """The LoRA parameters (A and B of every pair)."""
        return [t for p in self.pairs for t in (p.A, p.B)]

    def due(self, step: int, samples_seen: int) -> bool:
        """Whether to unload now; call after each optimizer step (see ``unload_due``)."""
        o = self.point_origin
        if self.cfg.unload_unit == "steps":
            return unload_due(step - o, self.last_step - o, self.cfg.unload_every)
        return unload_due(samples_seen - o, self.last_samples - o, self.cfg.unload_every)

    def begin_stage(self, stage: int, counter: int) -> None:
        """Take stage ``stage``'s settings (``stages``) at an unload, the counter (steps or
        samples, ``plora.unload_unit``) at ``counter``: the next points are counted from the last
        point of the old interval passed, and the scheduler gets the stage's ``optim``."""
        assert self.stages is not None
        every = self.cfg.unload_every
        self.point_origin += (counter - self.point_origin) // every * every
        settings = self.stages.settings(stage)
        self.cfg = settings.plora
        if self.scheduler is not None:
            self.scheduler.use_settings(settings.optim)

    def resume_stage(self, at_boundary: bool = False) -> None:
        """After a restore, give the scheduler the current stage's ``optim`` settings and its
        last LR again (a DeepSpeed checkpoint loaded into another layout may not restore the
        param groups). A no-op without ``stages``.

        ``at_boundary``: restored from the checkpoint of the unload that began the stage, before
        any step of it. The stage then begins again under this run's settings, which may differ
        from those of the run that wrote the checkpoint (a ``pbt_unload`` fork adds a stage entry
        there): the next unload point is counted from the unload's point with this stage's
        interval, and the LR schedule restarts with this stage's settings. For the run that wrote
        the checkpoint this is what its unload did, so its resume is unchanged."""
        if not self.stages:
            return
        settings = self.stages.settings(self.num_unloads)
        if at_boundary and self.num_unloads > 0:
            counter = self.last_step if self.cfg.unload_unit == "steps" else self.last_samples
            # Where begin_stage put the origin; a run without stages never moved it (the same
            # unload points, as multiples of one interval).
            every = self.stages.settings(self.num_unloads - 1).plora.unload_every
            self.point_origin += (counter - self.point_origin) // every * every
            self.cfg = settings.plora
            if self.scheduler is not None:
                self.scheduler.use_settings(settings.optim)
                self.scheduler.restart(
                    next_stage_length(self.cfg, self.global_batch, counter - self.point_origin)
                )
            return
        if self.scheduler is not None:
            self.scheduler.use_settings(settings.optim)
            self.scheduler.resume_lr()

    def stage_metrics(self) -> dict[str, Any]:
        """``{"stage_settings": ...}``: each changeable setting in the current stage (with
        ``stages``; empty without)."""
        if not self.stages:
            return {}
        return {"stage_settings": self.stages.settings(self.num_unloads).as_dict()}

    def unload(self, step: int, samples_seen: int) -> UnloadReport:
        """Merge (1-m)·ΔW into the backbone, keep m·ΔW in the adapter, reset optimizer and LR.

        Layer by layer, so the extra memory is a few temporaries of one layer's size. The error
        sums are fp32 on each layer's device, read once at the end.
        """
        t0 = time.perf_counter()
        cfg, m, k = self.cfg, float(self.cfg.momentum), self.num_unloads
        keep = self.factor_layers()
        tracked = set(self.tracked)
        err_sq: list[torch.Tensor] = []
        int_sq: list[torch.Tensor] = []
        cum_err_sq: list[torch.Tensor] = []
        cum_int_sq: list[torch.Tensor] = []
        for i, p in enumerate(self.pairs):
            with self.access.gathered([p.base, p.A, p.B]):
                a = self.access.read_trainable(p.A)
                b = self.access.read_trainable(p.B)
                w = self.access.read_frozen(p.base)
                coef = merge_coefficient(m, p.scaling)
                if p.name in keep:
                    factors = ((coef * b).detach().float().clone(), a.detach().float().clone())
                    self.base_factors.setdefault(p.name, []).append(factors)
                # ||intended||² from the factors: coef²·<BᵀB, AAᵀ> (r x r, fp64), no dense pass.
                b64, a64 = b.double(), a.double()
                int_sq.append((coef * coef * ((b64.T @ b64) * (a64 @ a64.T)).sum()).float())
                drift = None
                if i in tracked:
                    drift = self.drift.get(p.name)
                    if drift is None:
                        drift = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                        self.drift[p.name] = drift
                new, layer_err_sq = self._merged_weight(i, p, coef, b, a, w, drift)
                err_sq.append(layer_err_sq)
                if drift is not None:
                    cum_err_sq.append(torch.linalg.vector_norm(drift).square())
                    cum_int_sq.append(self._intended_norm_sq(p.name))
                self.access.write_frozen(p.base, new)
                if m == 0.0:
                    a_new = lora_init_A(
                        a.shape[0],
                        a.shape[1],
                        _generator(torch.device("cpu"), self.seed, k, i, "init_A"),
                    )
                    self.access.write_trainable(p.A, a_new.to(a.device))
                    self.access.write_trainable(p.B, torch.zeros_like(b))
                elif cfg.variant == "exact":
                    self.access.write_trainable(p.B, m * b)
                else:  # paper_literal
                    self.access.write_trainable(p.A, m * a)
                    self.access.write_trainable(p.B, m * b)
                del a, b, new
        ranks = self.effective_ranks()
        if self.stages:
            self.begin_stage(k + 1, step if cfg.unload_unit == "steps" else samples_seen)
        self.access.reset_optimizer_state(self.trainable_params())
        if self.scheduler is not None:
            self.scheduler.restart(
                next_stage_length(self.cfg, self.global_batch, samples_seen - self.point_origin)
            )
        self.num_unloads += 1
        self.last_step, self.last_samples = step, samples_seen
        err, norm = _total(err_sq), _total(int_sq)
        # An all-zero intended update (e.g. an unload before any step) applies nothing: error 0.
        rel = math.sqrt(err / norm) if norm > 0 else 0.0
        cum_norm = _total(cum_int_sq)
        cum = (
            (math.sqrt(_total(cum_err_sq) / cum_norm) if cum_norm > 0 else 0.0)
            if self.tracked
            else None
        )
        return UnloadReport(
            index=k,
            step=step,
            samples=samples_seen,
            merge_rel_error=rel,
            cumulative_rel_error=cum,
            effective_rank=ranks,
            seconds=time.perf_counter() - t0,
        )

    def effective_ranks(self) -> dict[str, int]:
        """Effective rank of the backbone's change Σ intended (every merge so far) for each
        rank-sampled layer, from the kept factors (``factor_effective_rank``).

        This is the rank of what the unloads merged; the rounding of each merge into the
        backbone's dtype adds a full-rank perturbation on top, which ``delta_effective_rank``
        (dense SVD of W_now - W_0) includes.
        """
        return {
            self.pairs[i].name: self._grams(self.pairs[i].name).rank(self.cfg.rank_threshold)
            for i in self.sampled
        }

    def _grams(self, name: str) -> FactorGrams:
        """The layer's factor Grams, brought up to its kept factors."""
        grams = self.grams.setdefault(name, FactorGrams())
        grams.extend(self.base_factors.get(name, []))
        return grams

    def _intended_norm_sq(self, name: str) -> torch.Tensor:
        """||Σ intended||²_F of a tracked layer from its factors' Grams: ||B A||² = <BᵀB, A Aᵀ>
        (fp64 on the factors' device, returned as an fp32 scalar there)."""
        grams = self._grams(name)
        if grams.count == 0:
            return torch.zeros(())
        return (grams.g_b * grams.g_a).sum().float()

    @property
    def intended_sum(self) -> dict[str, torch.Tensor]:
        """Σ intended (every merge so far, dense fp32) per tracked layer, from the kept factors:
        for tests and benchmarks (one out x in product per layer)."""
        out = {}
        for i in self.tracked:
            p = self.pairs[i]
            factors = self.base_factors.get(p.name, [])
            if factors:
                out[p.name] = torch.cat([b for b, _ in factors], 1) @ torch.cat(
                    [a for _, a in factors], 0
                )
            else:
                out[p.name] = torch.zeros(
                    p.B.shape[0], p.A.shape[1], dtype=torch.float32, device=p.B.device
                )
        return out

    def _applied(self, i: int, intended: torch.Tensor) -> torch.Tensor:
        """W_now - W_0 of tracked layer i: its drift + Σ intended (fp32)."""
        name = self.pairs[i].name
        drift = self.drift.get(name)
        return intended if drift is None else drift.to(intended.device) + intended

    def merge_adapter(self) -> None:
        """Merge the adapter's whole update, scaling·B·A, into the backbone, then zero B.

        For the final export: the same merge and rounding as an unload (``from_base``:
        round_nearest(W_0 + every unload's merge + scaling·B·A), one rounding of the whole
        change), from the fp32 masters of A and B, so the exported weights do not depend on how
        peft's ``merge_and_unload`` rounds the module's (bf16, under DeepSpeed) adapter copies.
        The model computes the same function after (the adapter is zero); export it dropping
        the adapter layers (``model_export.export_model(..., merge_adapter=False)``). Counters,
        records, kept factors and the optimizer are untouched: call it once, when training is
        over.
        """
        for i, p in enumerate(self.pairs):
            with self.access.gathered([p.base, p.A, p.B]):
                a = self.access.read_trainable(p.A)
                b = self.access.read_trainable(p.B)
                w = self.access.read_frozen(p.base)
                coef = merge_coefficient(0.0, p.scaling)
                if self.cfg.merge_rounding == "from_base":
                    last = ((coef * b).detach().float().clone(), a.detach().float().clone())
                    new = self._from_base(p, [*self.base_factors.get(p.name, []), last], w)
                else:
                    new, _ = self._merged_weight(i, p, coef, b, a, w)
                self.access.write_frozen(p.base, new)
                self.access.write_trainable(p.B, torch.zeros_like(b))

    def delta_effective_rank(self) -> dict[str, int]:
        """The dense check: effective rank of W_now - W_0 (``torch.linalg.svdvals`` of the whole
        matrix) for each tracked layer, now.

        Unlike ``effective_ranks`` it includes what rounding each merge into the backbone's
        dtype added (with ``from_base`` at most one rounding of W_0 + Σ merges); for tests and
        benchmarks: an SVD of out x in per layer.
        """
        intended = self.intended_sum
        return {
            self.pairs[i].name: effective_rank(
                self._applied(i, intended[self.pairs[i].name]), self.cfg.rank_threshold
            )
            for i in self.tracked
        }

    def cumulative_merge_stats(self) -> dict[str, float]:
        """Applied vs intended cumulative update over the tracked layers, now.

        ``cumulative_rel_error`` = ||(W_now - W_0) - S||_F / ||S||_F with S = Σ intended, and
        ``retained_fraction`` = <W_now - W_0, S> / ||S||² (1.0: the intended update is applied
        along its own direction without bias; what is left of the error is orthogonal noise).
        """
        err = dot = norm = 0.0
        intended = self.intended_sum
        for i in self.tracked:
            p = self.pairs[i]
            s = intended[p.name].double()
            applied = self._applied(i, intended[p.name]).double()
            drift = self.drift.get(p.name)
            err += 0.0 if drift is None else float(drift.double().pow(2).sum())
            dot += float((applied * s).sum())
            norm += float(self._intended_norm_sq(p.name))
        if norm == 0.0:
            return {"cumulative_rel_error": 0.0, "retained_fraction": 1.0}
        return {"cumulative_rel_error": math.sqrt(err / norm), "retained_fraction": dot / norm}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (the generators derive from
        seed + unload count + layer index, so they need no state of their own); tensors are
        host copies."""
        return {
            "num_unloads": self.num_unloads,
            "last_step": self.last_step,
            "last_samples": self.last_samples,
            "point_origin": self.point_origin,
            "seed": self.seed,
            "layers": [p.name for p in self.pairs],
            "drift": {k: v.cpu().clone() for k, v in self.drift.items()},
            "base_factors": {
                k: [(b.cpu().clone(), a.cpu().clone()) for b, a in v]
                for k, v in self.base_factors.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output, onto each layer's device.

        Raises:
            ValueError: the state is from a run with other LoRA layers or another seed.
        """
        names = [p.name for p in self.pairs]
        if state["layers"] != names:
            raise ValueError(
                f"PLoRA state: expected LoRA layers {names[:3]}..., found "
                f"{state['layers'][:3]}... (a checkpoint of another model or targets)"
            )
        if int(state["seed"]) != self.seed:
            raise ValueError(f"PLoRA state: expected seed {self.seed}, found {state['seed']}")
        self.num_unloads = int(state["num_unloads"])
        self.last_step = int(state["last_step"])
        self.last_samples = int(state["last_samples"])
        self.point_origin = int(state.get("point_origin", 0))
        if self.stages:  # the stage is the unload count (the optimizer's part: the trainer's)
            self.cfg = self.stages.settings(self.num_unloads).plora
        # Absent in states saved before from_base existed, and left out of checkpoints (the
        # trainer rebuilds them from the backbone records: ``BackboneRecorder.merged_factors``).
        self.base_factors = {
            k: [(b.to(self._device(k), copy=True), a.to(self._device(k), copy=True)) for b, a in v]
            for k, v in state.get("base_factors", {}).items()
        }
        self.grams = {}
        if "drift" in state:
            self.drift = {k: v.to(self._device(k), copy=True) for k, v in state["drift"].items()}
        else:  # saved by an earlier version: W_0 and Σ intended; the backbone is restored by now
            self.drift = {}
            for name, w0 in state["w0"].items():
                p = next(pr for pr in self.pairs if pr.name == name)
                with self.access.gathered([p.base]):
                    w = self.access.read_frozen(p.base).float()
                self.drift[name] = (
                    w - w0.to(w.device).float() - state["intended_sum"][name].to(w.device)
                )

    def _device(self, name: str) -> torch.device:
        """Where the layer ``name``'s weight lives (ZeRO-3's placeholder is on the same device)."""
        return next(p.base.device for p in self.pairs if p.name == name)


def _total(parts: list[torch.Tensor]) -> float:
    """Σ of per-layer fp32 scalars (on their devices), read with one host sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in parts:
        by_device.setdefault(t.device, []).append(t)
    return sum(float(torch.stack(ts).sum()) for ts in by_device.values())
