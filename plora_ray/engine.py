"""DeepSpeed: the engine built from a run config, and PLoRA's unload under ZeRO stages 0-3.

An unload rewrites trainable LoRA parameters (rescale B, re-initialise A), adds into frozen
backbone weights and resets Adam state. Inside a DeepSpeed engine the module's tensors are not the
whole truth, and writing only to them is silently wrong:

* **Master copies.** With bf16 (any stage), and with fp32 under ZeRO-1/2, the optimizer steps on
  its own fp32 copy of each trainable parameter and copies it back into the module after every
  step. A value written only into ``module.weight`` is overwritten at the next step. Which copy
  exists depends on the wrapper DeepSpeed picks (``DeepSpeedEngine._do_optimizer_sanity_check`` in
  ``deepspeed/runtime/engine.py``):

  =========  =====  =================================  ==========================================
  stage      bf16   optimizer wrapper                  fp32 master of a trainable param
  =========  =====  =================================  ==========================================
  0          no     none (the torch optimizer itself)  the module parameter itself
  0          yes    ``FP16_UnfusedOptimizer``          ``fp32_groups[i][j]`` (one tensor per param)
                    (with torch AdamW; ``FP16_Optimizer``
                    for FusedAdam is refused)
  1          no     ``DeepSpeedZeroOptimizer``         a fragment of this rank's flat fp32
                                                       partition (``param._hp_mapping``)
  1          yes    ``BF16_Optimizer`` (fp32 gradient  the same (``bf16_groups`` /
                    accumulation, ``ds_config``)       ``fp32_groups_flat_partition``)
  2          any    ``DeepSpeedZeroOptimizer``         as stage 1 fp32
  3          any    ``DeepSpeedZeroOptimizer_Stage3``  a slice of ``fp32_partitioned_groups_flat``
  =========  =====  =================================  ==========================================

  (Stage 1 bf16 with optimizer offload keeps ``DeepSpeedZeroOptimizer``.)
  DeepSpeed's ``safe_get/set_full_fp32_param`` and ``safe_get/set_full_optimizer_state``
  (``deepspeed/utils/tensor_fragment.py``) cover stages 1-3 but return ``None`` / do nothing for
  stage 0 with bf16: ``FP16_UnfusedOptimizer`` links no ``_hp_mapping``. This module handles that
  case itself. They also write only the master, never the module copy: we write both.

* **Partitioned parameters (ZeRO-3).** Every parameter, the frozen backbone included, holds only
  this rank's slice (``param.ds_tensor``); ``param.data`` is empty outside a
  ``deepspeed.zero.GatheredParameters`` context. Writes happen inside such a context with
  ``modifier_rank=0``, whose exit re-partitions the written full value (every rank computes the
  same value, so which rank is the source does not matter).

* **Adam state.** The moments live in the optimizer state of the flat fp32 partition (stages 1-3)
  or of the per-parameter master (stage 0); views into them are cached by DeepSpeed
  (``_hp_mapping.optim_fragment``), so they are zeroed in place, never replaced. The step count
  of ``torch.optim.AdamW`` is ``state['step']`` of the tensor being stepped: under ZeRO that is one
  count per flat partition, shared by every parameter of the param group, so a reset must cover
  the whole group (PLoRA resets all LoRA parameters at once, which does).

Optimizer choice: ``torch.optim.AdamW`` via DeepSpeed's ``"torch_adam": true``. DeepSpeed's
defaults are ``FusedAdam`` (a CUDA kernel, absent on CPU) or, with optimizer offload,
``DeepSpeedCPUAdam``, which JIT-compiles a C++ extension with gcc at first use (tens of seconds on
CI) and uses its own vectorised arithmetic. Using the torch optimizer everywhere means one Adam
implementation on CPU and GPU, no compile step, and a plain-torch reference that matches a
DeepSpeed run to float rounding (``tests/test_engine.py`` checks it).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from plora_ray.config import RunConfig

# DeepSpeed JIT-builds its CPU ops (the shared-memory all-reduce) with gcc into torch's extension
# cache, ~/.cache/torch_extensions/<python>_<device> unless TORCH_EXTENSIONS_DIR says otherwise.
# That directory is shared by every Python environment of the user: an environment whose torch
# lives elsewhere compiles with other include paths, so each environment's build overwrites the
# other's and the next engine start rebuilds (~25 s on a 2-core CPU, in every process that starts
# an engine meanwhile). One cache per Python environment, set before DeepSpeed's first import.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    os.path.join(
        os.path.expanduser("~"),
        ".cache",
        "plora-ray",
        "torch_extensions",
        hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:12],
    ),
)

# After TORCH_EXTENSIONS_DIR: DeepSpeed reads it when it first builds an op.
import deepspeed
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
)

from plora_ray.ds_config import deepspeed_config
from plora_ray.lr_schedule import make_lr_scheduler

__all__ = [
    "DeepSpeedParamAccess",
    "build_engine",
    "gather_full_state_dict",
    "init_distributed",
    "zero3_linear_restored",
    "zero3_whole_model",
]

# Adam state entries shaped like the parameter. ``max_exp_avg_sq`` exists with amsgrad only.
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise ``deepspeed.comm`` from the usual env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    A no-op when torch.distributed is already initialised (e.g. by Ray Train's TorchTrainer).
    gloo on CPU, nccl on CUDA (DeepSpeed's accelerator picks).
    """
    deepspeed.init_distributed(
        auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s)
    )


@contextlib.contextmanager
def zero3_linear_restored() -> Iterator[None]:
    """Put ``torch.nn.functional.linear`` back as it was when the block exits.

    A ZeRO-3 engine replaces it process-wide with DeepSpeed's memory-efficient linear
    (``deepspeed.zero.Init``; "This will persist unless manually reset") and nothing resets it
    when the engine is gone. Its bf16 rounding differs from torch's, so a process that runs
    several trainings (a reused Tune trial actor) would otherwise run every run after a ZeRO-3
    one with DeepSpeed's linear and get other bits than a fresh process.
    """
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear


def build_engine(
    model: torch.nn.Module,
    cfg: RunConfig,
    world_size: int,
    *,
    stage_length_steps: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[DeepSpeedEngine, Any, Any]:
    """Wrap ``model`` (LoRA already attached) in a DeepSpeed engine.

    The LR scheduler is PLoRA's restartable one (``plora.make_lr_scheduler``) built on the
    optimizer DeepSpeed steps (its ``basic_optimizer``), and the engine steps it after each
    optimizer step. Restart it at each unload.

    Args:
        model: the module; only parameters with ``requires_grad`` are given to the optimizer.
        cfg: the run config (see ``deepspeed_config``).
        world_size: data-parallel ranks; torch.distributed must be initialised (see
            ``init_distributed``) before this call.
        stage_length_steps: optimizer steps between unloads, for schedules that decay over a
            stage (cosine_restart); None when unknown or irrelevant.
        overrides: extra DeepSpeed config keys (see ``deepspeed_config``).

    Returns:
        (engine, optimizer, scheduler): ``optimizer`` is DeepSpeed's wrapper (``engine.optimizer``).

    Raises:
        ValueError: from ``deepspeed_config``, or when the model has no trainable parameter.
    """
    ds_config = deepspeed_config(cfg, world_size, overrides)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model: expected at least one trainable parameter, found none")

    def scheduler_factory(optimizer: torch.optim.Optimizer) -> Any:
        return make_lr_scheduler(optimizer, cfg.optim, stage_length_steps)

    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=scheduler_factory,
        dist_init_required=False,
    )
    _undo_construction_step(engine)
    return engine, optimizer, scheduler


def _undo_construction_step(engine: DeepSpeedEngine) -> None:
    """Undo the optimizer step DeepSpeed's stage-0 low-precision wrappers take at construction.

    ``FP16_UnfusedOptimizer.initialize_optimizer_states`` (``deepspeed/runtime/fp16/
    unfused_optimizer.py``, called from ``__init__``) and ``FP16_Optimizer``'s
    (``fused_optimizer.py``) run ``optimizer.step()`` on zero gradients to create the Adam state.
    That counts as step 1, so every later Adam bias correction is off by one (the first real
    update is 0.74 x lr instead of 1 x lr at beta2 0.99), and with weight decay it also shrinks the
    fp32 masters once. ZeRO stages create their state lazily and are unaffected. We restore the
    masters from the module (they were cloned from it) and reset the state to a fresh Adam.
    """
    if engine.zero_optimization_stage() != 0 or not hasattr(engine.optimizer, "fp16_groups"):
        return
    access = DeepSpeedParamAccess(engine)
    params = [p for group in engine.optimizer.fp16_groups for p in group]
    for p in params:
        with torch.no_grad():
            access._masters[id(p)].copy_(p.detach().float())
    access.reset_optimizer_state(params)


# --------------------------------------------------------------------------- parameter access


class DeepSpeedParamAccess:
    """PLoRA's ``ParamAccess`` inside a DeepSpeed engine (ZeRO 0-3, fp32 or bf16).

    Every method is collective under ZeRO-1/2/3 (it may all-reduce or all-gather): all ranks must
    call the same methods on the same parameters in the same order, which PLoRA's unload does
    because every rank computes identical values (seeded generators, no communication).

    Args:
        engine: the ``DeepSpeedEngine`` from ``build_engine`` (or ``deepspeed.initialize``).
    """

    def __init__(self, engine: DeepSpeedEngine) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.optimizer = engine.optimizer
        # The torch optimizer that owns the Adam state (DeepSpeed's wrappers step this one).
        self.base_optimizer: torch.optim.Optimizer = engine.basic_optimizer
        # Stage 0 only: module param -> its fp32 master (itself in fp32 mode).
        self._masters: dict[int, torch.Tensor] = {}
        if self.stage == 0:
            self._masters = self._stage0_masters()

    # ---- stage 0 bookkeeping

    def _stage0_masters(self) -> dict[int, torch.Tensor]:
        opt = self.optimizer
        masters: dict[int, torch.Tensor] = {}
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            # FP16_UnfusedOptimizer (bf16 with a non-fused torch optimizer, what build_engine
            # gives): one fp32 tensor per module parameter, stepped by the torch optimizer.
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    masters[id(lp)] = hp
        elif hasattr(opt, "fp16_groups"):
            # FP16_Optimizer (FusedAdam on CUDA) keeps flat masters. build_engine never selects
            # it (torch_adam), so it is refused here rather than handled untested.
            raise NotImplementedError(
                f"DeepSpeedParamAccess: ZeRO stage 0 with {type(opt).__name__} is not supported; "
                "build the engine with plora_ray.engine.build_engine (torch AdamW) or use ZeRO >= 1"
            )
        else:
            # No wrapper (fp32, stage 0): the torch optimizer steps the module parameters.
            for group in self.base_optimizer.param_groups:
                for p in group["params"]:
                    masters[id(p)] = p
        return masters

    def _master_of(self, p: torch.nn.Parameter) -> torch.Tensor:
        if id(p) not in self._masters:
            raise KeyError(f"parameter of shape {tuple(p.shape)} is not in the optimizer")
        return self._masters[id(p)]

    # ---- ParamAccess protocol

    @contextlib.contextmanager
    def gathered(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        """Make the full values of ``params`` visible in the module; writes persist on exit.

        Under ZeRO-3: ``GatheredParameters(params, modifier_rank=0)``, whose exit re-partitions
        what rank 0 holds (every rank writes the same values). Elsewhere a no-op.
        """
        if self.stage != 3:
            yield
            return
        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
            yield

    def read_trainable(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full fp32 value of a trainable parameter: its master copy where one exists.

        Raises:
            KeyError: ``p`` is not one of the optimizer's parameters.
        """
        if self.stage == 0:
            return self._master_of(p).detach().float().clone()
        value = safe_get_full_fp32_param(p)
        if value is None:
            raise KeyError(f"parameter of shape {tuple(p.shape)} has no DeepSpeed fp32 master")
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape  # type: ignore[attr-defined]
        return value.detach().float().clone().reshape(shape)

    def write_trainable(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set a trainable parameter: the fp32 master (what the optimizer steps) and the module.

        Writing only the module is undone at the next step, when the optimizer copies its master
        back (the pitfall this class exists for).
        """
        value = value.detach()
        if self.stage == 0:
            master = self._master_of(p)
            with torch.no_grad():
                master.copy_(value.to(master.dtype).view_as(master))
                if master is not p:
                    p.data.copy_(value.to(p.dtype).view_as(p))
            return
        # Each rank copies its own fragment of the full value into its fp32 partition.
        safe_set_full_fp32_param(p, value.float())
        self._write_module(p, value)

    def read_frozen(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The full value of a frozen (backbone) parameter in its own dtype.

        Under ZeRO-3 a copy (the gathered buffer is freed when ``gathered()`` exits); gathered
        here if the caller has not.
        """
        if hasattr(p, "ds_id"):
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:  # type: ignore[attr-defined]
                with self.gathered([p]):
                    return p.detach().clone()
            return p.detach().clone()
        return p.detach()

    def write_frozen(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Set a frozen (backbone) parameter; it has no master copy, only the module value."""
        self._write_module(p, value.detach())

    def _write_module(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        # ZeRO-3, called outside gathered(): gather just this parameter for the write.
        if hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE:  # type: ignore[attr-defined]
            with self.gathered([p]), torch.no_grad():
                p.data.copy_(value.to(p.dtype).view(p.ds_shape))  # type: ignore[attr-defined]
            return
        with torch.no_grad():
            p.data.copy_(value.to(p.dtype).view_as(p))

    def reset_optimizer_state(self, params: list[torch.nn.Parameter]) -> None:
        """Zero the Adam moments of ``params`` and set the step count of their state to 0.

        Raises:
            ValueError: ``params`` covers only part of a ZeRO param group, whose step count is
                shared by all of its parameters (resetting it would reset the others' too).
        """
        if self.stage == 0:
            self._reset_stage0(params)
        elif self.stage in (1, 2):
            self._reset_stage12(params)
        else:
            self._reset_stage3(params)

    # ---- reset per stage

    def _zero_state(self, owner: torch.Tensor) -> None:
        state = self.base_optimizer.state.get(owner)
        if not state:
            return  # no step taken yet: the state is created fresh (zero) at the first step
        with torch.no_grad():
            for key in _MOMENT_KEYS:
                if key in state and torch.is_tensor(state[key]):
                    state[key].zero_()
            if "step" in state:
                _zero_step(state)

    def _reset_stage0(self, params: list[torch.nn.Parameter]) -> None:
        # One master, and one Adam state with its own step count, per parameter.
        for p in params:
            self._zero_state(self._master_of(p))
        self._reset_group_steps()

    def _reset_stage12(self, params: list[torch.nn.Parameter]) -> None:
        opt = self.optimizer
        # DeepSpeedZeroOptimizer: bit16_groups / single_partition_of_fp32_groups;
        # BF16_Optimizer (stage 1 with fp32 grad accumulation): bf16_groups / fp32 partitions.
        if hasattr(opt, "bit16_groups"):
            lp_groups, hp_flats = opt.bit16_groups, opt.single_partition_of_fp32_groups
        else:
            lp_groups, hp_flats = opt.bf16_groups, opt.fp32_groups_flat_partition
        wanted = {id(p) for p in params}
        with torch.no_grad():
            for p in params:
                mapping = getattr(p, "_hp_mapping", None)
                # None: no fragment of p lives in this rank's partition.
                if mapping is not None and mapping.optim_fragment:
                    for key in mapping.get_optim_state_keys():
                        if key in _MOMENT_KEYS:
                            mapping.get_hp_fragment(key).zero_()
        for gi, (lp_group, flat) in enumerate(zip(lp_groups, hp_flats)):
            hit = [p for p in lp_group if id(p) in wanted]
            if not hit:
                continue
            _require_whole_group(lp_group, hit, gi)
            state = self.base_optimizer.state.get(flat)
            if state and "step" in state:
                _zero_step(state)
        self._reset_group_steps()

    def _reset_stage3(self, params: list[torch.nn.Parameter]) -> None:
        opt = self.optimizer
        wanted = {id(p) for p in params}
        groups_hit: set[int] = set()
        with torch.no_grad():
            for p in params:
                group_idx, offset, numel = opt.grad_position[opt.get_param_id(p)]
                groups_hit.add(group_idx)
                flat = opt.fp32_partitioned_groups_flat[group_idx]
                state = self.base_optimizer.state.get(flat)
                if not state:
                    continue
                for key in _MOMENT_KEYS:
                    if key in state and torch.is_tensor(state[key]):
                        state[key].narrow(0, offset, numel).zero_()
        for gi in sorted(groups_hit):
            lp_group = opt.fp16_groups[gi]
            _require_whole_group(lp_group, [p for p in lp_group if id(p) in wanted], gi)
            state = self.base_optimizer.state.get(opt.fp32_partitioned_groups_flat[gi])
            if state and "step" in state:
                _zero_step(state)
        self._reset_group_steps()

    def _reset_group_steps(self) -> None:
        # Optimizers that keep the step in the param group (DeepSpeed's FusedAdam, Lamb).
        for group in self.base_optimizer.param_groups:
            if "step" in group:
                group["step"] = 0

    # ---- reading optimizer state (tests, checkpoints)

    def read_optimizer_state(self, p: torch.nn.Parameter) -> dict[str, Any]:
        """Full fp32 Adam moments of ``p`` and its step count (collective under ZeRO).

        Returns:
            ``{"exp_avg": Tensor, "exp_avg_sq": Tensor, "step": float}``; zeros and step 0
            before the first optimizer step.
        """
        shape = p.ds_shape if hasattr(p, "ds_id") else p.shape  # type: ignore[attr-defined]
        zeros = torch.zeros(shape, dtype=torch.float32)
        out: dict[str, Any] = {"exp_avg": zeros.clone(), "exp_avg_sq": zeros.clone(), "step": 0.0}
        if self.stage == 0:
            state = self.base_optimizer.state.get(self._master_of(p), {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    out[key] = state[key].detach().float().clone().view(shape)
            out["step"] = _step_value(state)
            return out
        if self.stage in (1, 2):
            step_state = self._stage12_state_of(p)
        else:
            gi = self.optimizer.grad_position[self.optimizer.get_param_id(p)][0]
            step_state = self.base_optimizer.state.get(
                self.optimizer.fp32_partitioned_groups_flat[gi], {}
            )
        if not step_state:
            return out
        for key in ("exp_avg", "exp_avg_sq"):
            value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                out[key] = value.detach().float().clone().view(shape)
        out["step"] = _step_value(step_state)
        return out

    def _stage12_state_of(self, p: torch.nn.Parameter) -> dict[str, Any]:
        opt = self.optimizer
        if hasattr(opt, "bit16_groups"):
            lp_groups, hp_flats = opt.bit16_groups, opt.single_partition_of_fp32_groups
        else:
            lp_groups, hp_flats = opt.bf16_groups, opt.fp32_groups_flat_partition
        for lp_group, flat in zip(lp_groups, hp_flats):
            if any(q is p for q in lp_group):
                return self.base_optimizer.state.get(flat, {})
        raise KeyError(f"parameter of shape {tuple(p.shape)} is not in the optimizer")


def _zero_step(state: dict[str, Any]) -> None:
    if torch.is_tensor(state["step"]):
        state["step"].zero_()
    else:
        state["step"] = 0


def _step_value(state: dict[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if torch.is_tensor(step) else step)


def _require_whole_group(
    group: list[torch.nn.Parameter], hit: list[torch.nn.Parameter], index: int
) -> None:
    if len(hit) != len(group):
        raise ValueError(
            f"reset_optimizer_state: expected every parameter of optimizer param group {index} "
            f"({len(group)} parameters; DeepSpeed keeps one Adam step count per group), found "
            f"{len(hit)} of them; put the parameters to reset in their own param group"
        )


# --------------------------------------------------------------------------- export


def gather_full_state_dict(
    engine: DeepSpeedEngine, trainable_only: bool
) -> dict[str, torch.Tensor]:
    """Full, unpartitioned parameter values by name, on CPU, identical on every rank.

    Trainable parameters come from their fp32 master copies (what training continues from);
    frozen ones in the module's dtype. Collective: call on every rank.

    Args:
        engine: a DeepSpeed engine.
        trainable_only: only parameters with ``requires_grad`` (a LoRA adapter checkpoint).
    """
    access = DeepSpeedParamAccess(engine)
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = access.read_trainable(p).cpu()
        elif not trainable_only:
            with access.gathered([p]):
                out[name] = p.detach().clone().cpu()
    return out


@contextlib.contextmanager
def zero3_whole_model(engine: Any) -> Iterator[None]:
    """Every parameter gathered into every rank's module, ZeRO-3's module hooks off, meanwhile.

    Under ZeRO-3 a parameter's ``data`` is empty outside ``GatheredParameters``, and a forward
    pass is a collective: DeepSpeed's module hooks all-gather each submodule's parameters before
    it runs and release them after, and the root's pre-forward hook (``reset_step``) compares the
    recorded module order across ranks while its trace is incomplete. Evaluation runs different
    numbers of forward passes on different ranks (sharded documents; rank 0 alone without
    ``eval.sharded``), which would leave the ranks waiting for each other. So: gather everything
    once (``GatheredParameters(..., modifier_rank=None)``: read-only, nothing is broadcast back),
    remove the hooks for the evaluation (as DeepSpeed's own ``unwrap_model_for_generation`` does,
    plus the pre-forward hook), then put them back and release the gathered copies. The
    re-registration invalidates ZeRO-3's prefetch trace; the next training step records it again.
    Memory: the whole model in the module's dtype on every rank while inside.
    """
    offload = engine.optimizer.parameter_offload
    module = offload.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        start_hook = module._forward_pre_hooks[offload.fwd_pre_hook.id]
        offload.fwd_pre_hook.remove()
        for handle in [*offload.forward_hooks, *offload.backward_hooks]:
            handle.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            for p in params:
                p.ds_active_sub_modules.clear()  # a submodule still "using" p blocks its release
            # First among the root's pre-forward hooks, where DeepSpeed registered it; module ids
            # numbered from 0 again, as at the engine's construction.
            offload.fwd_pre_hook = module.register_forward_pre_hook(start_hook, prepend=True)
            offload._register_deepspeed_module(module, count=[0])
