"""One training run on Ray Train: the worker loop, the TorchTrainer around it, ``plora-ray train``.

Read top to bottom:

* ``train_loop_per_worker`` is what every Ray Train worker runs: model + tokenizer, LoRA (or full
  fine-tuning), data, one DeepSpeed engine per worker, the PLoRA schedule, reports, checkpoints,
  the evaluation at the end and the export of the merged model.
* ``run_training`` builds the ``TorchTrainer`` (Train v2) for a run config, runs it, cleans up and
  returns a ``RunResult``. It works from the command line and inside a Ray Tune trial (the trial
  function calls it; metrics reach Tune through ``TuneReportCallback``, the documented
  Train-inside-Tune pattern of Ray 2.5x+).
* ``run_in_process`` runs the same worker loop with one worker in the calling process, without
  Ray Train: what a one-worker search trial does inside its (reused) Tune trial actor
  (``search.trial_executor: actor``).
* ``train_command`` is ``plora-ray train FILE [--set k=v ...] [--output DIR] [--resume]``.

Output directory layout (``DIR``)::

    config.yaml        the validated run config (all defaults filled in)
    metrics.jsonl      one JSON object per report (rank 0), the final one with "status"
    ray/               Ray Train's run storage: checkpoint_manager_snapshot.json and the kept
                       checkpoints ray/step_NNNNNN/ (see plora_ray.checkpoint for their content)
    model/             the merged model in the Hugging Face layout (safetensors, config, tokenizer)
    base_weights.safetensors
                       plora.merge_rounding from_base with model.tiny only: the tiny model's
                       initial target weights (W_0), written at setup by each node's local rank 0
                       (identical bits: the model is seeded) and memory-mapped by the unloads and
                       the checkpoint replay; with model.path, W_0 is read from the model's own
                       *.safetensors files instead, which must exist (checked before Ray starts)
    eval_results.json  lm-eval results of the final evaluation
    result.json        the RunResult

Resume: Ray Train restores the newest checkpoint of ``DIR/ray`` when a trainer with the same
storage path and name starts; ``--resume`` does exactly that (and refuses nothing: with no
checkpoint the run starts from step 0). Without ``--resume`` an existing run in ``DIR`` is an
error, so an old run is never continued by accident. Inside one ``run_training`` call,
``max_failures`` lets Ray restart failed workers from the newest checkpoint.

Exactness of a resumed run: every piece of state that feeds the next step is restored -- the
backbone (replayed from the compact unload records), trainable weights and their fp32 masters,
Adam moments, the LR schedule, PLoRA's counters, the data position and every RNG -- so a run
killed mid-stage and resumed reproduces the uninterrupted run's losses and weights bit for bit
(``tests/test_train.py`` checks it with 2 workers, ZeRO-2, on CPU).

Proxy points: the cheap proxy objective (``gsm8k_nll``, ``mmlu_nll``: ``evaluate.proxy_nll``,
``eval.proxy_samples`` > 0) is computed and reported at every multiple of ``plora.unload_every``
in its unit (samples or steps), at the first step boundary at or after it, and at the end. Proxy
points follow plora.unload_every for every method, so ASHA compares methods at equal samples:
for ``plora`` they are its unloads (the proxy sees the model right after the merge); ``lora``
and ``full`` follow the same schedule without unloading. A report at such a step says
``"proxy_point": true``; later reports repeat the last value.

Fault injection for tests: ``PLORA_FAULT_AT_STEP=k`` (read on the driver) makes every worker raise
right after step ``k``'s report and checkpoint, in a run that did not start from a checkpoint.
``PLORA_DEEPSPEED_OVERRIDES='{json}'`` (read on the driver) is merged last into the DeepSpeed
config (``engine.deepspeed_config(overrides=...)``), for settings the run config does not expose;
tests use it to make ZeRO-3 partition and release a tiny model's parameters as it does a 7B one's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from plora_ray.config import ConfigError, RunConfig, dump_config, load_config

# Ray 2.50-2.5x need this to select Train v2; from Ray 2.60 it is the default. Set before any
# ray.train import.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

RAY_RUN_NAME = "ray"
METRICS_FILE = "metrics.jsonl"
# merge_rounding from_base with model.tiny: the initial target weights, W_0 of every unload.
BASE_WEIGHTS_FILE = "base_weights.safetensors"
FAULT_ENV = "PLORA_FAULT_AT_STEP"
DEEPSPEED_OVERRIDES_ENV = "PLORA_DEEPSPEED_OVERRIDES"
# One file per worker group (port): what /dev/shm names its DeepSpeed buffers carry.
PROCESS_GROUP_DIR = ".process_groups"

__all__ = [
    "DivergenceGuard",
    "RunResult",
    "cleanup_run_shm",
    "holds_run",
    "newest_checkpoint",
    "read_metrics",
    "run_in_process",
    "run_training",
    "train_command",
    "train_loop_per_worker",
]


# --------------------------------------------------------------------------- small pure pieces


class DivergenceGuard:
    """Stops a run whose loss is NaN/inf or jumps above a multiple of its running mean.

    The running mean is over the last ``window`` step losses before the current one; the first
    step has no mean and is only checked for being finite.

    Args:
        multiple: ``train.divergence_loss_multiple`` (> 1).
        window: ``train.divergence_window`` (>= 1).
    """

    def __init__(self, multiple: float, window: int) -> None:
        self.multiple = float(multiple)
        self.window = int(window)
        self.history: deque[float] = deque(maxlen=self.window)

    def check(self, loss: float) -> str | None:
        """Record ``loss``; return why the run diverged, or None when it did not."""
        if not math.isfinite(loss):
            return f"loss is {loss} (not finite)"
        if self.history:
            mean = sum(self.history) / len(self.history)
            if loss > self.multiple * mean:
                return (
                    f"loss {loss:.4g} > train.divergence_loss_multiple {self.multiple:g} x "
                    f"running mean {mean:.4g} over the last {len(self.history)} steps"
                )
        self.history.append(float(loss))
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.window)


def total_steps(cfg: RunConfig, train_rows: int) -> int:
    """Optimizer steps of a run: ``train.epochs`` over the rows, capped by ``train.max_steps``."""
    steps = max(1, math.floor(cfg.train.epochs * train_rows / cfg.batch.global_batch))
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    return steps


def _deepspeed_overrides_from_env() -> dict[str, Any] | None:
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


def _from_base_source_problem(path: str) -> str | None:
    """Why ``model.path`` cannot be from_base's W_0 source, or None (a hub id is checked on the
    workers, after the download ``from_pretrained`` does anyway)."""
    d = Path(path)
    if not d.is_dir() or any(d.glob("*.safetensors")):
        return None
    found = sorted(f.name for f in d.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    return (
        f"plora.merge_rounding: 'from_base' re-reads the original weights (W_0) from the "
        f"model's *.safetensors files at each unload; expected them in model.path {path}, "
        f"found {', '.join(found[:3]) or 'none'}; save the model with "
        "save_pretrained(dir, safe_serialization=True) or set plora.merge_rounding=stochastic"
    )


def _safetensors_dir(path: str) -> Path:
    """The local directory of ``model.path`` (a hub id resolves to its cached snapshot).

    Raises:
        ValueError: naming plora.merge_rounding, when it holds no *.safetensors file.
    """
    d = Path(path)
    if not d.is_dir():
        from huggingface_hub import snapshot_download

        d = Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    if not any(d.glob("*.safetensors")):
        raise ValueError(
            _from_base_source_problem(str(d))
            or f"plora.merge_rounding: 'from_base' needs *.safetensors in {path}"
        )
    return d


def check_run_config(cfg: RunConfig) -> None:
    """Checks that need more than the schema: raised before Ray starts.

    Raises:
        ConfigError: a combination the trainer cannot run.
    """
    problems = []
    if cfg.method == "plora" and cfg.plora.merge_rounding == "from_base" and cfg.model.path:
        problem = _from_base_source_problem(cfg.model.path)
        if problem:
            problems.append(problem)
    if not cfg.deepspeed.enabled and cfg.resources.num_workers != 1:
        problems.append(
            "deepspeed.enabled: expected true when resources.num_workers > 1 (the plain-torch "
            f"fallback runs one worker), found false with num_workers={cfg.resources.num_workers}"
        )
    if cfg.deepspeed.enabled:
        from plora_ray.engine import deepspeed_config

        try:
            deepspeed_config(cfg, cfg.resources.num_workers, _deepspeed_overrides_from_env())
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- the worker loop


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mean_over_ranks(value: float, world: int) -> float:
    """The mean of a float over all ranks (every rank gets the same bits)."""
    import torch
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


# --------------------------------------------------------------------------- sessions
#
# Where a run's worker sits: ``_RayTrainSession`` in a Ray Train worker of a TorchTrainer (any
# number of workers), ``_ProcessSession`` in the calling process itself (one worker, world size 1:
# a Tune trial actor that Tune reuses for the next trial, see ``run_in_process``). ``_Run`` asks
# its session for its rank, device, the checkpoint to restore from, and to report.


class _WorkerSession(Protocol):
    """What ``_Run`` needs from where it runs."""

    rank: int
    world: int
    local_rank: int
    device: Any

    def checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The directory of the checkpoint to restore from (None: start at step 0)."""
        ...

    def report(
        self, metrics: dict[str, Any], save: Callable[[Path], None] | None, name: str
    ) -> None:
        """Report ``metrics``; with ``save``, first write a checkpoint named ``name`` with it."""
        ...


class _RayTrainSession:
    """A Ray Train worker: rank, device and checkpoints come from Ray Train's context."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world: int = ctx.get_world_size()
        self.local_rank: int = ctx.get_local_rank()
        # Ray Train assigns each GPU worker its device (CPU when no GPU was requested).
        self.device = ray.train.torch.get_device()

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        """The newest checkpoint Ray Train restores this run from, as a directory (or None)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(
        self, metrics: dict[str, Any], save: Callable[[Path], None] | None, name: str
    ) -> None:
        """``ray.train.report``; with ``save``, a checkpoint it writes (collective) goes along."""
        import ray.train

        if save is None:
            ray.train.report(metrics)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"plora_ckpt_r{self.rank}_"))
        try:
            save(tmp)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=name,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class _ProcessSession:
    """One worker in the calling process (world size 1).

    Checkpoints go where Ray Train would put them, ``DIR/ray/step_NNNNNN``: written beside under
    a temporary name and renamed, so a directory of that name is always complete; the newest
    ``keep`` are kept. ``on_report`` gets every report after its checkpoint is on disk.
    """

    rank = 0
    world = 1
    local_rank = 0

    def __init__(
        self, out: Path, keep: int, device: Any, on_report: Callable[[dict[str, Any]], None] | None
    ) -> None:
        self.ckpt_root = out / RAY_RUN_NAME
        self.keep = keep
        self.device = device
        self.on_report = on_report

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        yield newest_checkpoint(self.ckpt_root.parent)

    def report(
        self, metrics: dict[str, Any], save: Callable[[Path], None] | None, name: str
    ) -> None:
        if save is not None:
            final = self.ckpt_root / name
            tmp = self.ckpt_root / f".{name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            if final.exists():  # the same step written by an attempt that failed after it
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in _checkpoint_dirs(self.ckpt_root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if self.on_report is not None:
            self.on_report(metrics)


def _checkpoint_dirs(root: Path) -> list[Path]:
    """The complete ``step_NNNNNN`` checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def newest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run directory written by ``run_in_process`` (None
    when there is none). ``run_training``'s own checkpoints are Ray Train's to choose from."""
    dirs = _checkpoint_dirs(Path(output_dir) / RAY_RUN_NAME)
    return dirs[-1] if dirs else None


class _Run:
    """The state of one worker's training run (a class only to keep ``run`` readable)."""

    def __init__(self, loop_cfg: dict[str, Any], session: _WorkerSession) -> None:
        from plora_ray.config import config_from_dict

        self.cfg: RunConfig = config_from_dict(loop_cfg["config"])
        self.out = Path(loop_cfg["output_dir"])
        self.fault_at: int | None = loop_cfg.get("fault_at_step")
        self.deepspeed_overrides: dict[str, Any] | None = loop_cfg.get("deepspeed_overrides")
        self.session = session
        self.rank = session.rank
        self.world = session.world
        self.metrics_path = self.out / METRICS_FILE

    # ---- setup

    def setup(self) -> None:
        import torch

        from plora_ray.checkpoint import BackboneRecorder, full_backbone_bytes
        from plora_ray.data import Batcher, build_datasets
        from plora_ray.model import load_model, load_tokenizer
        from plora_ray.plora import (
            PLoRA,
            TorchParamAccess,
            add_with_rounding,
            attach_lora,
            lora_pairs,
            make_lr_scheduler,
        )

        cfg = self.cfg
        t0 = time.perf_counter()
        _seed_everything(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, seed=cfg.seed, vocab_size=len(self.tokenizer))
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
            if cfg.method != "full":
                model.enable_input_require_grads()  # LoRA: inputs of checkpointed blocks need grads
        model = attach_lora(model, cfg.lora, cfg.method)
        self.full_backbone_bytes = full_backbone_bytes(model)
        # Before the engine build: ZeRO-3 partitions the weights there.
        self.base_weights = (
            self._base_weights_source(model)
            if cfg.method == "plora" and cfg.plora.merge_rounding == "from_base"
            else None
        )
        t1 = time.perf_counter()
        self.train_set, self.held_set, self.data_stats = build_datasets(cfg, self.tokenizer)
        t2 = time.perf_counter()
        self.batcher = Batcher(
            self.train_set, cfg.batch.micro_batch, self.rank, self.world, cfg.seed
        )
        self.total_steps = total_steps(cfg, len(self.train_set))
        stage_len = self.total_steps
        if cfg.method == "plora":
            per = cfg.plora.unload_every
            per_step = cfg.batch.global_batch
            stage_len = per if cfg.plora.unload_unit == "steps" else -(-per // per_step)
        self.grad_accum = cfg.grad_accum
        # Ray Train assigns each GPU worker its device (CPU when no GPU was requested).
        self.device = self.session.device
        if cfg.deepspeed.enabled:
            from plora_ray.engine import DeepSpeedParamAccess, build_engine

            self.engine, self.optimizer, self.scheduler = build_engine(
                model,
                cfg,
                self.world,
                stage_length_steps=stage_len,
                overrides=self.deepspeed_overrides,
            )
            self.module = self.engine.module
            self.access: Any = DeepSpeedParamAccess(self.engine)
            self.shm_removed = _unlink_shm_names(self.world)
        else:
            self.engine = None
            self.module = model.to(self.device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            o = cfg.optim
            self.optimizer = torch.optim.AdamW(
                trainable, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay
            )
            self.scheduler = make_lr_scheduler(self.optimizer, o, stage_len)
            self.access = TorchParamAccess(self.optimizer)
        self.plora: PLoRA | None = None
        self.recorder: BackboneRecorder | None = None
        if cfg.method == "plora":
            pairs = lora_pairs(self.module)
            names = {id(p): n for n, p in self.module.named_parameters()}
            self.recorder = BackboneRecorder(
                self.access,
                pairs,
                names,
                self._generator_for,
                add_with_rounding,
                coef_for=lambda pr: (1.0 - float(cfg.plora.momentum)) * pr.scaling,
                rounding=cfg.plora.merge_rounding,
                base_weights=self.base_weights,
            )
            self.plora = PLoRA(
                self.module,
                cfg.plora,
                cfg.batch.global_batch,
                cfg.seed,
                self.recorder,
                scheduler=self.scheduler,
                base_weights=self.base_weights,
            )
        self.guard = DivergenceGuard(
            cfg.train.divergence_loss_multiple, cfg.train.divergence_window
        )
        # Where a run's fixed cost goes (reported once, in the final report).
        self.setup_seconds = {
            "model_s": round(t1 - t0, 3),
            "data_s": round(t2 - t1, 3),
            "engine_s": round(time.perf_counter() - t2, 3),
        }
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of earlier attempts (resume)
        self.last_unload: dict[str, Any] = {}
        self.last_loss: float | None = None
        self.proxy: dict[str, float] = {}
        self.proxy_step = -1  # the step the proxy was last computed at
        self.restored_from: str | None = None
        self.backbone_delta_bytes = 0
        self.shm_removed: list[str] = getattr(self, "shm_removed", [])

    def _base_weights_source(self, model: Any) -> Any:
        """from_base's W_0 source: the model's safetensors, or the tiny model's saved copy."""
        import torch.distributed as dist

        from plora_ray.plora import base_param_name, lora_pairs, safetensors_base_weights

        if self.cfg.model.path is not None:
            return safetensors_base_weights(_safetensors_dir(self.cfg.model.path))
        path = self.out / BASE_WEIGHTS_FILE
        # One writer per node (every rank built the same seeded weights); written aside and
        # renamed, so a reader on another node sharing DIR never sees half a file.
        if self.session.local_rank == 0:
            from safetensors.torch import save_file

            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / f".{BASE_WEIGHTS_FILE}.{os.getpid()}.tmp"
            save_file(
                {
                    base_param_name(pr.name): pr.base.detach().contiguous().cpu()
                    for pr in lora_pairs(model)
                },
                str(tmp),
            )
            os.replace(tmp, path)
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
        return safetensors_base_weights(path)

    def _generator_for(self, unload_index: int, layer_index: int, device: Any = "cpu") -> Any:
        """The generator PLoRA's unload uses for this layer's rounding (see plora.unload)."""
        import torch

        from plora_ray.plora import derive_seed

        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(self.cfg.seed, unload_index, layer_index, "merge"))
        return g

    # ---- checkpoints

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint directory (all ranks)."""
        import torch

        from plora_ray.checkpoint import STATE_FILE, load_backbone, replay_backbone, restore_rng
        from plora_ray.plora import add_with_rounding

        state = json.loads((directory / STATE_FILE).read_text())
        if state["world_size"] != self.world:
            raise ValueError(
                f"resume: expected resources.num_workers={state['world_size']} as in "
                f"the checkpoint {directory}, found {self.world}"
            )
        if self.plora is not None and self.recorder is not None:
            self.plora.load_state_dict(torch.load(directory / "plora_state.pt", weights_only=False))
            records, digests = load_backbone(directory / "backbone")
            replay_backbone(
                self.module,
                records,
                self.access,
                self._generator_for,
                add_with_rounding,
                digests,
                base_weights=self.base_weights,
            )
            self.recorder.records = records
            # from_base: the factors the unloads keep, stored once (in the records).
            self.plora.base_factors = self.recorder.from_base_factors()
        if self.engine is not None:
            load_path, _ = self.engine.load_checkpoint(
                str(directory / "deepspeed"),
                tag="engine",
                load_module_strict=False,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise RuntimeError(f"resume: DeepSpeed could not load {directory / 'deepspeed'}")
        else:
            blob = torch.load(directory / "trainable.pt", weights_only=False)
            missing = self.module.load_state_dict(blob["model"], strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"resume: unexpected weights {missing.unexpected_keys[:3]}")
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
        self.batcher.load_state_dict(state["batcher"])
        self.guard.load_state_dict(state["divergence"])
        self.step = int(state["step"])
        self.last_loss = state.get("last_loss")
        self.elapsed_before = float(state["elapsed_s"])
        self.last_unload = state.get("last_unload", {})
        self.proxy = state.get("proxy", {})
        self.proxy_step = int(state.get("proxy_step", -1))
        restore_rng(torch.load(directory / f"rng_rank{self.rank}.pt", weights_only=False))
        self.restored_from = str(directory)
        if self.rank == 0:
            _truncate_metrics(self.metrics_path, self.step)

    def save_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of a checkpoint (collective: every rank calls it)."""
        import torch

        from plora_ray.checkpoint import (
            STATE_FILE,
            backbone_digests,
            capture_rng,
            save_backbone,
            write_json,
        )

        directory.mkdir(parents=True, exist_ok=True)
        if self.engine is not None:
            # Frozen weights are excluded: the backbone is restored from the base model plus the
            # compact unload records (full fine-tuning trains every weight, so it stores them).
            self.engine.save_checkpoint(
                str(directory / "deepspeed"),
                tag="engine",
                save_latest=False,
                exclude_frozen_parameters=self.cfg.method != "full",
            )
        elif self.rank == 0:
            trainable = {
                n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad
            }
            torch.save(
                {
                    "model": trainable,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                directory / "trainable.pt",
            )
        torch.save(capture_rng(), directory / f"rng_rank{self.rank}.pt")
        stage3 = self.cfg.deepspeed.enabled and self.cfg.deepspeed.zero_stage == 3
        if self.plora is not None and self.recorder is not None and (self.rank == 0 or stage3):
            # Digests of every weight an unload changed; gathering them is collective under ZeRO-3.
            names = sorted({ld.name for rec in self.recorder.records for ld in rec.layers})
            digests = backbone_digests(self.module, names, self.access)
            if self.rank == 0:
                self.backbone_delta_bytes = save_backbone(
                    self.recorder.records, digests, directory / "backbone"
                )
                # base_factors duplicate the records' factors (rebuilt from them on restore).
                state = {k: v for k, v in self.plora.state_dict().items() if k != "base_factors"}
                torch.save(state, directory / "plora_state.pt")
        if self.rank == 0:
            write_json(
                directory / STATE_FILE,
                {
                    "step": self.step,
                    "world_size": self.world,
                    "batcher": self.batcher.state_dict(),
                    "divergence": self.guard.state_dict(),
                    "elapsed_s": self.elapsed(),
                    "last_unload": self.last_unload,
                    "proxy": self.proxy,
                    "proxy_step": self.proxy_step,
                    "last_loss": self.last_loss,
                    "method": self.cfg.method,
                },
            )
            (directory / "config.yaml").write_text(dump_config(self.cfg))
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    # ---- reporting

    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t_start)

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        """Append to metrics.jsonl (rank 0) and report to the session (all ranks), with a
        checkpoint when asked."""
        if self.rank == 0:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(metrics, default=_json_scalar) + "\n")
        self.session.report(
            metrics, self.save_checkpoint if checkpoint else None, f"step_{self.step:06d}"
        )

    def step_metrics(
        self,
        loss: float,
        lr: float,
        tokens_per_s: float,
        unload: bool,
        checkpoint: bool,
        proxy_point: bool = False,
    ) -> dict[str, Any]:
        ranks = self.last_unload.get("effective_rank") or {}
        return {
            "step": self.step,
            "samples": self.batcher.samples_seen,
            "tokens": self.batcher.tokens_seen,
            "epoch": round(self.batcher.epochs_done, 4),
            "loss": loss,
            "lr": lr,
            "stage": self.plora.num_unloads if self.plora is not None else 0,
            "tokens_per_s": tokens_per_s,
            "merge_rel_error": self.last_unload.get("merge_rel_error"),
            "cumulative_rel_error": self.last_unload.get("cumulative_rel_error"),
            "backbone_exceptions": self.last_unload.get("backbone_exceptions"),
            "unload_s": self.last_unload.get("unload_s"),
            "effective_rank": (sum(ranks.values()) / len(ranks)) if ranks else None,
            "effective_rank_layers": ranks,
            "unload": unload,
            # The proxy (gsm8k_nll, mmlu_nll) was computed at this step; other reports repeat
            # the last computed value.
            "proxy_point": proxy_point,
            "checkpoint": checkpoint,
            "elapsed_s": round(self.elapsed(), 3),
            "status": "running",
            **self.proxy,
        }

    # ---- the loop

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; (mean loss over ranks, lr)."""
        import torch

        lr = float(self.optimizer.param_groups[0]["lr"])
        self.module.train()
        total = 0.0
        for _ in range(self.grad_accum):
            batch = {k: v.to(self.device) for k, v in self.batcher.next_micro_batch().items()}
            if self.engine is not None:
                loss = self.engine(**batch, use_cache=False).loss
                self.engine.backward(loss)
                self.engine.step()  # an optimizer step (and LR step) at the accumulation boundary
            else:
                loss = self.module(**batch, use_cache=False).loss
                (loss / self.grad_accum).backward()
            total += float(loss.detach().float())
        if self.engine is None:
            if self.cfg.optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.module.parameters() if p.requires_grad],
                    self.cfg.optim.grad_clip,
                )
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return _mean_over_ranks(total / self.grad_accum, self.world), lr

    def run(self) -> None:
        from plora_ray.plora import unload_due

        cfg = self.cfg
        self.setup()
        self.t_start = time.perf_counter()
        with self.session.checkpoint() as ckpt_dir:
            if ckpt_dir is not None:
                self.restore(ckpt_dir)
        if self.rank == 0:
            (self.out / "data_stats.json").write_text(
                json.dumps(self.data_stats.as_dict(), indent=1, default=_json_scalar)
            )
        last_t, last_tokens = time.perf_counter(), self.batcher.tokens_seen
        diverged: str | None = None
        every = cfg.checkpoint.every_steps
        while self.step < self.total_steps:
            counter_before = self.proxy_counter()
            loss, lr = self.train_step()
            self.step += 1
            self.last_loss = loss
            diverged = self.guard.check(loss)
            unload = False
            if (
                diverged is None
                and self.plora is not None
                and self.plora.due(self.step, self.batcher.samples_seen)
            ):
                self.unload()
                unload = True
            # The proxy points: the multiples of plora.unload_every, for every method (see the
            # module docstring); for plora they are the unloads (PLoRA.due is the same test).
            point = diverged is None and unload_due(
                self.proxy_counter(), counter_before, cfg.plora.unload_every
            )
            if point and cfg.eval.proxy_samples > 0:
                self.proxy = self.compute_proxy()
                self.proxy_step = self.step
            ckpt_due = diverged is None and (
                (unload and cfg.checkpoint.at_unload) or bool(every and self.step % every == 0)
            )
            if (
                self.step % cfg.train.log_every == 0
                or unload
                or point
                or ckpt_due
                or diverged
                or self.step == self.total_steps
            ):
                seconds = max(time.perf_counter() - last_t, 1e-9)
                tps = (self.batcher.tokens_seen - last_tokens) / seconds
                self.report(
                    self.step_metrics(loss, lr, tps, unload, ckpt_due, point), checkpoint=ckpt_due
                )
                # The next interval's throughput excludes this report's checkpoint and proxy time.
                last_t, last_tokens = time.perf_counter(), self.batcher.tokens_seen
            if diverged is not None:
                break
            if (
                self.fault_at is not None
                and self.step == self.fault_at
                and self.restored_from is None
            ):
                raise RuntimeError(
                    f"{FAULT_ENV}={self.fault_at}: injected fault after step {self.step}"
                )
        self.finish(diverged)

    def proxy_counter(self) -> int:
        """Where training is in ``plora.unload_unit``: optimizer steps or samples seen."""
        return self.step if self.cfg.plora.unload_unit == "steps" else self.batcher.samples_seen

    def unload(self) -> None:
        """PLoRA unload with its backbone change recorded."""
        assert self.plora is not None and self.recorder is not None
        t0 = time.perf_counter()
        self.recorder.begin_unload(self.plora.num_unloads, self.step)
        rep = self.plora.unload(self.step, self.batcher.samples_seen)
        rec = self.recorder.end_unload()
        # The whole unload as training pays it: the merge plus recording its backbone change.
        self.last_unload = {
            **rep.as_dict(),
            "backbone_exceptions": rec.num_exceptions,
            "unload_s": time.perf_counter() - t0,
        }

    def adapter_effective_rank(self) -> dict[str, int]:
        """LoRA's ΔW = scaling·B·A: its effective rank on the layers PLoRA would sample."""
        from plora_ray.plora import effective_rank, lora_pairs

        pairs = lora_pairs(self.module)
        k = min(self.cfg.plora.rank_sample_layers, len(pairs))
        picks = sorted({round(j * (len(pairs) - 1) / max(1, k - 1)) for j in range(k)})
        out = {}
        for i in picks:
            pr = pairs[i]
            with self.access.gathered([pr.A, pr.B]):
                delta = pr.scaling * (
                    self.access.read_trainable(pr.B) @ self.access.read_trainable(pr.A)
                )
            out[pr.name] = effective_rank(delta, self.cfg.plora.rank_threshold)
        return out

    def evaluable(self) -> contextlib.AbstractContextManager[None]:
        """The model as evaluation needs it: every parameter whole in every rank's module.

        A no-op except under ZeRO-3, where ``engine.zero3_whole_model`` gathers the parameters
        (every rank then holds the full model in the module's dtype while the evaluation runs:
        ~13.5 GB for a 7B model in bf16, beside its ZeRO-3 partitions; it fits an 80 GB GPU).
        """
        if self.engine is not None and self.cfg.deepspeed.zero_stage == 3:
            from plora_ray.engine import zero3_whole_model

            return zero3_whole_model(self.engine)
        return contextlib.nullcontext()

    def compute_proxy(self) -> dict[str, float]:
        from plora_ray.evaluate import proxy_nll

        # Every rank calls it (documents are sharded across ranks and gathered); it restores the
        # model's mode and the RNG states, so the training that follows is unchanged.
        with self.evaluable():
            out = proxy_nll(
                self.module, self.tokenizer, self.cfg.eval, rank=self.rank, world_size=self.world
            )
        return {k: float(v) for k, v in out.items()}

    def finish(self, diverged: str | None) -> None:
        """Final evaluation, export and the final report (all ranks)."""
        from plora_ray.checkpoint import export_model

        cfg = self.cfg
        final: dict[str, Any] = {
            "step": self.step,
            "loss": self.last_loss,
            "samples": self.batcher.samples_seen,
            "tokens": self.batcher.tokens_seen,
            "final": True,
            "num_unloads": self.plora.num_unloads if self.plora is not None else 0,
            "full_backbone_bytes": self.full_backbone_bytes,
            "backbone_delta_bytes": self.backbone_delta_bytes,
        }
        ranks = self.last_unload.get("effective_rank") or {}
        final["effective_rank"] = (sum(ranks.values()) / len(ranks)) if ranks else None
        final["effective_rank_layers"] = ranks
        if diverged is not None:
            final.update(status="diverged", diverged_step=self.step, reason=diverged)
        else:
            final["status"] = "completed"
            if self.plora is not None:
                ranks = self.plora.delta_effective_rank()
            elif cfg.method == "lora":
                ranks = self.adapter_effective_rank()
            if ranks:
                final["effective_rank"] = sum(ranks.values()) / len(ranks)
                final["effective_rank_layers"] = ranks
            objectives: dict[str, float] = {}
            if cfg.eval.at_end:
                from plora_ray.evaluate import evaluate_model

                # Every rank calls it: with eval.sharded the documents are split across ranks,
                # otherwise rank 0 scores them all and broadcasts.
                with self.evaluable():
                    res = evaluate_model(
                        self.module, self.tokenizer, cfg.eval, rank=self.rank, world_size=self.world
                    )
                objectives = {k: float(v) for k, v in res.objectives.items()}
                final["eval_seconds"] = round(res.seconds, 3)
                if self.rank == 0:
                    (self.out / "eval_results.json").write_text(
                        json.dumps(res.as_dict(), indent=1, default=_json_scalar)
                    )
            # The proxy of the final model, unless the evaluation or the last step's proxy point
            # already computed it.
            if (
                cfg.eval.proxy_samples > 0
                and self.proxy_step != self.step
                and not any(k in objectives for k in self.proxy)
            ):
                self.proxy = self.compute_proxy()
            objectives = {**self.proxy, **objectives}
            final.update(objectives)
            final["objectives"] = objectives
            if cfg.checkpoint.export_model:
                stage3 = cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3
                if self.rank == 0 or stage3:
                    export_model(
                        self.module,
                        self.tokenizer,
                        self.out / "model",
                        access=self.access if stage3 else None,
                        write=self.rank == 0,
                    )
                final["model_path"] = str(self.out / "model")
        final["elapsed_s"] = round(self.elapsed(), 3)
        final["setup_seconds"] = self.setup_seconds
        # /dev/shm names unlinked right after the engine build (nothing to leak after that).
        final["shm_unlinked_at_start"] = len(self.shm_removed)
        self.report(final, checkpoint=False)


def _unlink_shm_names(world: int) -> list[str]:
    """Unlink DeepSpeed's /dev/shm all-reduce buffer names as soon as every rank has mapped them.

    DeepSpeed's CPU backend creates one named buffer per rank when the engine initialises
    ``deepspeed.comm`` and every rank opens its peers' buffers by name right then, never later
    (``shm_initialize`` in deepspeed/ops/csrc/cpu/comm/shm.cpp). After a barrier that follows the
    engine build the names are no longer needed; the mappings stay valid until the processes
    exit, and the memory is freed then. Unlinking this early means a worker killed later (a Tune
    trial stopped by its scheduler, an OOM kill) leaves nothing in /dev/shm.
    """
    import torch.distributed as dist

    from plora_ray.engine import cleanup_shm

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not port:
        return []
    if world > 1 and dist.is_initialized():
        dist.barrier()
    # One process per node unlinks (the node's local rank 0), so the list it returns is complete.
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return []
    return cleanup_shm(addr, port)


def _json_scalar(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the reports up to ``step`` (a resumed run re-reports what follows)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("status") == "running" and int(rec.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    """The function every Ray Train worker runs (``TorchTrainer(train_loop_per_worker, ...)``).

    Args:
        loop_cfg: ``{"config": RunConfig.to_dict(), "output_dir": str, "fault_at_step": int|None}``.
    """
    import ray.train

    from plora_ray.engine import cleanup_shm

    ctx = ray.train.get_context()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    out = Path(loop_cfg["output_dir"])
    if ctx.get_world_rank() == 0 and port:
        d = out / PROCESS_GROUP_DIR
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{port}.json").write_text(json.dumps({"addr": addr, "port": port}))
    # What DeepSpeed's own launcher sets: all ranks of this node. With it, DeepSpeed's CPU
    # backend uses its shared-memory all-reduce when every rank is on one node.
    os.environ.setdefault("LOCAL_SIZE", str(ctx.get_local_world_size()))
    run = None
    try:
        run = _Run(loop_cfg, _RayTrainSession())
        run.run()
    finally:
        if port:
            # Names left if the run failed before ``_unlink_shm_names`` (unlinking while a peer
            # still maps a buffer is safe: the mapping outlives the name).
            removed = getattr(run, "shm_removed", []) + cleanup_shm(addr, port)
            if removed:
                d = out / PROCESS_GROUP_DIR
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{port}.removed.rank{ctx.get_world_rank()}").write_text("\n".join(removed))


# --------------------------------------------------------------------------- the driver


@dataclass
class RunResult:
    """What a training run produced; ``as_dict()`` is written to ``DIR/result.json``."""

    status: str  # completed | diverged | failed
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)  # the final report
    objectives: dict[str, float] = field(default_factory=dict)
    metrics_path: str = ""
    checkpoint_path: str | None = None
    model_path: str | None = None
    wall_time_s: float = 0.0
    num_unloads: int = 0
    delta_effective_rank: float | None = None
    final_loss: float | None = None
    checkpoint_bytes: int | None = None
    backbone_delta_bytes: int | None = None
    full_backbone_bytes: int | None = None
    diverged_step: int | None = None
    reason: str | None = None
    loss_curve: list[list[float]] = field(default_factory=list)
    shm_removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The reports of a run's metrics.jsonl (lines cut short by a kill are skipped)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


class _MetricsTail:
    """Follows metrics.jsonl on the driver and hands each new report to a callback."""

    def __init__(self, path: Path, callback: Callable[[dict[str, Any]], None] | None) -> None:
        self.path = path
        self.callback = callback
        self.pos = path.stat().st_size if path.is_file() else 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _MetricsTail:
        if self.callback is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.callback is not None:
            self.stop_event.set()
            self.thread.join(timeout=5)
            self.poll()

    def _loop(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()

    def poll(self) -> None:
        if self.callback is None or not self.path.is_file():
            return
        size = self.path.stat().st_size
        if size < self.pos:  # truncated by a resume
            self.pos = size
            return
        with open(self.path) as fh:
            fh.seek(self.pos)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.pos += len(complete.encode())
        for line in complete.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                self.callback(json.loads(line))


# Settings a resumed run may change: how long it trains, how it reports, checkpoints and
# evaluates. Anything else would make the continuation a different run than the checkpoint's.
RESUME_MAY_CHANGE = (
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "eval.",
    "checkpoint.",
    "search",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _check_resume_config(cfg: RunConfig, saved: Path) -> None:
    """Refuse to resume a run with a config that changes what training computes.

    Raises:
        ConfigError: naming each changed key with the checkpoint's and the new value.
    """
    import yaml

    if not saved.is_file():
        return
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(cfg.to_dict())
    problems = [
        f"{k}: expected {old.get(k)!r} as in the run being resumed, found {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not k.startswith(RESUME_MAY_CHANGE)
    ]
    if problems:
        raise ConfigError(problems, source=f"--resume of {saved.parent}")


def _ensure_ray(cfg: RunConfig) -> bool:
    """Connect to Ray: the running one, RAY_ADDRESS, or a new local head. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return True
    r = cfg.resources
    # The Train controller takes 0 CPUs; the driver needs one, each worker its share.
    need = math.ceil(r.num_workers * r.cpus_per_worker) + 1
    # No dashboard (nothing listens beyond Ray's own services). Ray resolves a loopback
    # node address to the machine's own IP anyway, so none is passed.
    ray.init(
        address="local",
        num_cpus=max(need, os.cpu_count() or 1),
        num_gpus=math.ceil(r.num_workers * r.gpus_per_worker) if r.gpus_per_worker else None,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
    )
    return True


def cleanup_run_shm(output_dir: str | os.PathLike[str]) -> list[str]:
    """Remove the /dev/shm buffers a run in ``output_dir`` left behind; return what was removed.

    ``run_training`` calls this itself in a ``finally``. Call it after a run whose driver was
    killed (e.g. a Tune trial stopped by its scheduler, which kills the trial's actors before
    their cleanup runs): the run's worker groups recorded their MASTER_ADDR/PORT in
    ``DIR/.process_groups``, which DeepSpeed's buffer names carry, so only this run's files go.
    """
    return _cleanup_run_shm(Path(output_dir), set())


def _cleanup_run_shm(out: Path, before: set[str]) -> list[str]:
    """Remove /dev/shm buffers this run's worker groups created (their names carry the group's
    MASTER_ADDR and MASTER_PORT); files that existed before the run are never touched."""
    from plora_ray.engine import cleanup_shm

    removed: list[str] = []
    d = out / PROCESS_GROUP_DIR
    if d.is_dir():
        # What the workers removed themselves at their end ...
        for f in sorted(d.glob("*.removed.rank*")):
            removed += f.read_text().split()
        # ... and what a worker killed before its cleanup left behind.
        for f in sorted(d.glob("*.json")):
            with contextlib.suppress(json.JSONDecodeError, KeyError):
                pg = json.loads(f.read_text())
                removed += [p for p in cleanup_shm(pg["addr"], pg["port"]) if p not in before]
        shutil.rmtree(d, ignore_errors=True)
    return sorted(set(removed))


def _shm_snapshot() -> set[str]:
    with contextlib.suppress(OSError):
        return {str(p) for p in Path("/dev/shm").iterdir()}
    return set()


def holds_run(output_dir: str | os.PathLike[str]) -> bool:
    """Whether DIR holds a run to continue: Ray Train's checkpoint snapshot (``run_training``)
    or a complete checkpoint directory (``run_in_process``)."""
    out = Path(output_dir)
    return (out / RAY_RUN_NAME / "checkpoint_manager_snapshot.json").exists() or newest_checkpoint(
        out
    ) is not None


def _prepare_output_dir(cfg: RunConfig, output_dir: str | os.PathLike[str], resume: bool) -> Path:
    """DIR made ready for a run: refused if it holds one and ``resume`` is False, the config
    checked against the resumed run's, config.yaml written, and metrics.jsonl dropped when there
    is nothing to continue from (the run starts at step 0)."""
    out = Path(output_dir).resolve()
    held = holds_run(out)
    if held and not resume:
        raise FileExistsError(
            f"{out} already holds a run (checkpoints in {out / RAY_RUN_NAME}); "
            "pass --resume to continue it or choose another --output"
        )
    if resume:
        _check_resume_config(cfg, out / "config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    metrics_path = out / METRICS_FILE
    if metrics_path.exists() and not held:
        metrics_path.unlink()
    return out


def run_training(
    cfg: RunConfig,
    output_dir: str | os.PathLike[str],
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
    max_failures: int = 0,
) -> RunResult:
    """Train one run on Ray Train and return what it produced.

    Starts a local Ray (loopback, no dashboard) when none is connected and ``RAY_ADDRESS`` is
    unset, and shuts down only what it started. Inside a Ray Tune trial, metrics go to Tune as
    well (``TuneReportCallback``), every report's keys as in metrics.jsonl.

    Args:
        cfg: a validated run config.
        output_dir: DIR (see the module docstring for its layout).
        report: called on the driver with each report (a dict, as in metrics.jsonl) as it lands.
        resume: continue from the newest checkpoint in DIR (from step 0 when there is none).
        max_failures: worker failures Ray Train recovers from (from the newest checkpoint).

    Raises:
        ConfigError: a config the trainer cannot run (before Ray starts).
        FileExistsError: DIR already holds a run and ``resume`` is False.
    """
    check_run_config(cfg)
    out = _prepare_output_dir(cfg, output_dir, resume)
    fault = os.environ.get(FAULT_ENV)
    ds_overrides = _deepspeed_overrides_from_env()
    t0 = time.perf_counter()
    started = _ensure_ray(cfg)
    shm_before = _shm_snapshot()
    reason, result = None, None
    removed: list[str] = []
    try:
        from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
        from ray.train import RunConfig as RayRunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        r = cfg.resources
        use_gpu = r.gpus_per_worker > 0
        resources = {"CPU": r.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = r.gpus_per_worker
        callbacks = []
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session

        if _in_tune_session():
            from ray.tune.integration.ray_train import TuneReportCallback

            callbacks.append(TuneReportCallback())
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.to_dict(),
                "output_dir": str(out),
                "fault_at_step": int(fault) if fault else None,
                "deepspeed_overrides": ds_overrides,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=RayRunConfig(
                name=RAY_RUN_NAME,
                storage_path=str(out),
                callbacks=callbacks,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                failure_config=FailureConfig(max_failures=max_failures),
            ),
        )
        with _MetricsTail(out / METRICS_FILE, report):
            try:
                result = trainer.fit()
            except Exception as exc:  # WorkerGroupError / ControllerError: the run failed
                reason = f"{type(exc).__name__}: {exc}"
    finally:
        removed = _cleanup_run_shm(out, shm_before)
        if started:
            import ray

            ray.shutdown()
    ckpt_path = result.checkpoint.path if result is not None and result.checkpoint else None
    return _collect_result(cfg, out, t0, reason, ckpt_path, removed, report)


def _init_process_group(use_gpu: bool) -> None:
    """A world-size-1 torch.distributed group in this process (DeepSpeed needs one), created
    once and kept: the next ``run_in_process`` in the same process (a reused Tune trial actor)
    finds it initialised. The env vars are the ones Ray Train and DeepSpeed's launcher set, so
    DeepSpeed names (and ``_unlink_shm_names`` removes) its /dev/shm buffers as for a worker."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(
                f"run_in_process: this process is in a torch.distributed group "
                f"of {dist.get_world_size()} ranks; expected none or 1"
            )
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "LOCAL_SIZE": "1",
        }
    )
    dist.init_process_group(
        "nccl" if use_gpu else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )


def run_in_process(
    cfg: RunConfig,
    output_dir: str | os.PathLike[str],
    *,
    report: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = False,
) -> RunResult:
    """Train one single-worker run in this process (no Ray Train) and return what it produced.

    The same worker loop as ``run_training`` (``_Run``: model, DeepSpeed engine, PLoRA,
    reports, checkpoints, evaluation, export) with world size 1, in the calling process. It is
    what a search trial runs with ``search.trial_executor: actor``: the Tune trial actor trains
    itself, and Tune reuses the actor for the next trial, so its imports, its process group and
    its warm caches are paid once per actor instead of once per trial (``run_training`` starts a
    Train controller and a worker process per run). Inside a Tune trial every report goes to Tune
    as well (``ray.tune.report``: what ``TuneReportCallback`` forwards in ``run_training``); a
    trial stopped by its scheduler ends inside that call (Tune raises ``SystemExit`` in the
    trial's thread), after the report's checkpoint is on disk.

    Output directory layout: as ``run_training``'s; the checkpoints are ``DIR/ray/step_NNNNNN``
    without Ray Train's snapshot file (``newest_checkpoint`` finds them).

    Args:
        cfg: a validated run config with ``resources.num_workers`` 1.
        output_dir: DIR.
        report: called with each report (a dict, as in metrics.jsonl) as it is made.
        resume: continue from the newest checkpoint in DIR (from step 0 when there is none).

    Raises:
        ConfigError: a config the trainer cannot run, or ``resources.num_workers`` other than 1.
        FileExistsError: DIR already holds a run and ``resume`` is False.
    """
    import gc

    import torch

    check_run_config(cfg)
    r = cfg.resources
    if r.num_workers != 1:
        raise ConfigError(
            [
                f"resources.num_workers: expected 1 for a run in the trial's own "
                f"process (search.trial_executor: actor), found {r.num_workers}; "
                "use search.trial_executor: train for multi-worker trials"
            ]
        )
    out = _prepare_output_dir(cfg, output_dir, resume)
    fault = os.environ.get(FAULT_ENV)
    t0 = time.perf_counter()
    use_gpu = r.gpus_per_worker > 0
    tune_report = None
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if _in_tune_session():
        from ray import tune

        tune_report = tune.report

    def on_report(m: dict[str, Any]) -> None:
        if report is not None:
            report(m)
        if tune_report is not None:
            tune_report(m)

    reason: str | None = None
    try:
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError(
                f"resources.gpus_per_worker is {r.gpus_per_worker} but this "
                "process sees no CUDA device"
            )
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
        _init_process_group(use_gpu)
        loop_cfg = {
            "config": cfg.to_dict(),
            "output_dir": str(out),
            "fault_at_step": int(fault) if fault else None,
            "deepspeed_overrides": _deepspeed_overrides_from_env(),
        }
        session = _ProcessSession(out, cfg.checkpoint.keep, device, on_report)
        _Run(loop_cfg, session).run()
    except Exception as exc:  # the run failed; the search goes on with the next trial
        import traceback

        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        # The next run in this process starts from a clean heap (the engine, the model and the
        # optimizer state of this one are garbage now).
        gc.collect()
        if use_gpu and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _collect_result(cfg, out, t0, reason, None, [], report)


def _collect_result(
    cfg: RunConfig,
    out: Path,
    t0: float,
    reason: str | None,
    ckpt_path: str | None,
    removed: list[str],
    report: Callable[[dict[str, Any]], None] | None,
) -> RunResult:
    """The RunResult of a finished run, from its metrics.jsonl; written to DIR/result.json.

    A run that ended without its final report (or with ``reason``, an exception) gets a final
    ``failed`` report appended to metrics.jsonl and passed to ``report``.
    """
    metrics_path = out / METRICS_FILE
    records = read_metrics(metrics_path)
    final = next((m for m in reversed(records) if m.get("final")), None)
    if final is not None and reason is None:
        status = final["status"]
    else:
        status = "failed"
        final = {
            "status": "failed",
            "reason": reason or "the run ended without a final report",
            "final": True,
        }
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(final) + "\n")
        if report is not None:
            report(final)
        reason = final["reason"]
    losses = [[m["step"], m["loss"]] for m in records if m.get("status") == "running"]
    if ckpt_path is None:
        newest = newest_checkpoint(out)
        ckpt_path = str(newest) if newest else None
    from plora_ray.checkpoint import dir_bytes

    res = RunResult(
        status=status,
        output_dir=str(out),
        metrics=final,
        objectives=final.get("objectives") or {},
        metrics_path=str(metrics_path),
        checkpoint_path=ckpt_path,
        model_path=final.get("model_path"),
        wall_time_s=time.perf_counter() - t0,
        num_unloads=int(final.get("num_unloads") or 0),
        delta_effective_rank=final.get("effective_rank"),
        final_loss=losses[-1][1] if losses else None,
        checkpoint_bytes=dir_bytes(ckpt_path) if ckpt_path else None,
        backbone_delta_bytes=(
            dir_bytes(Path(ckpt_path) / "backbone") if ckpt_path and cfg.method == "plora" else None
        ),
        full_backbone_bytes=final.get("full_backbone_bytes"),
        diverged_step=final.get("diverged_step"),
        reason=final.get("reason") if status != "completed" else None,
        loss_curve=losses,
        shm_removed=removed,
    )
    (out / "result.json").write_text(json.dumps(res.as_dict(), indent=1, default=_json_scalar))
    return res


# --------------------------------------------------------------------------- CLI


def _progress_line(m: dict[str, Any]) -> str:
    if m.get("final"):
        bits = [f"[{m.get('status')}]"]
        if m.get("step") is not None:
            bits.append(f"step {m['step']}")
        if m.get("reason"):
            bits.append(str(m["reason"]).splitlines()[0][:200])
        for k, v in (m.get("objectives") or {}).items():
            bits.append(f"{k}={v:.4g}")
        return "  ".join(bits)
    bits = [
        f"step {m['step']:>6}",
        f"loss {m['loss']:.4f}",
        f"lr {m['lr']:.2e}",
        f"stage {m['stage']}",
        f"samples {m['samples']}",
        f"{m['tokens_per_s']:.0f} tok/s",
    ]
    if m.get("unload"):
        bits.append(f"UNLOAD merge_err {m['merge_rel_error']:.2e} rank {m['effective_rank']}")
    if m.get("checkpoint"):
        bits.append("ckpt")
    return "  ".join(bits)


def train_command(
    file: str, overrides: dict[str, Any] | None, output: str | None, resume: bool = False
) -> int:
    """``plora-ray train FILE [--set k=v ...] [--output DIR] [--resume]``.

    Validates the config (a ConfigError, exit 2, before Ray starts), trains, prints a line per
    report, and returns 0 when the run completed, 1 otherwise.

    Raises:
        ConfigError: the config is invalid (the CLI prints it).
    """
    cfg = load_config(file, overrides)
    check_run_config(cfg)
    out = Path(output) if output else Path("runs") / Path(file).stem
    engine = (
        f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage}" if cfg.deepspeed.enabled else "plain torch"
    )
    print(
        f"plora-ray train: {file} -> {out} ({cfg.method}, {cfg.resources.num_workers} "
        f"worker(s), {engine})",
        flush=True,
    )

    def show(m: dict[str, Any]) -> None:
        print(_progress_line(m), flush=True)

    try:
        res = run_training(cfg, out, report=show, resume=resume)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if res.status == "failed" and res.reason:
        print(res.reason, file=sys.stderr)
    print(
        f"done in {res.wall_time_s:.1f} s: status {res.status}; metrics {res.metrics_path}"
        + (f"; model {res.model_path}" if res.model_path else "")
        + (
            f"; checkpoint {res.checkpoint_path} ({res.checkpoint_bytes} bytes)"
            if res.checkpoint_path
            else ""
        ),
        flush=True,
    )
    return 0 if res.status == "completed" else 1
