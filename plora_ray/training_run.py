"""The training run of one worker, read top to bottom: setup, train, save, finish.

``TrainingRun`` is what every worker of a run executes, wherever it sits: a Ray Train worker or
the calling process (``plora_ray.executors``; the ``WorkerSession`` says which). In order:

* ``setup``: ``setup_model`` (tokenizer, model, LoRA or full fine-tuning), ``setup_data``
  (datasets, batcher, step count), ``setup_engine`` (one DeepSpeed engine per worker, or plain
  torch with one worker), ``setup_plora`` (the unload schedule and the recorder of the
  backbone's change);
* ``restore`` from the session's checkpoint, if any;
* ``train``: steps, unloads, proxy points, reports, checkpoints (``save_checkpoint``), the
  divergence guard;
* ``finish``: the final evaluation, the export of the merged model, the final report.

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
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from plora_ray.base_weights import base_weights_source
from plora_ray.checkpoint import (
    BackboneRecorder,
    capture_rng,
    full_backbone_bytes,
    load_backbone,
    read_state,
    replay_backbone,
    restore_rng,
    write_state,
)
from plora_ray.checkpoint_load import check_deepspeed_checkpoint, load_pickled_state
from plora_ray.config import RunConfig, StageSchedule, dump_config
from plora_ray.data import Batcher, build_datasets
from plora_ray.divergence import DivergenceGuard
from plora_ray.engine import (
    DeepSpeedParamAccess,
    build_engine,
    zero3_linear_restored,
    zero3_whole_model,
)
from plora_ray.evaluate import evaluate_model
from plora_ray.lr_schedule import make_lr_scheduler
from plora_ray.merge import add_with_rounding
from plora_ray.model import load_model, load_tokenizer
from plora_ray.model_export import export_model
from plora_ray.plora import (
    PLoRA,
    TorchParamAccess,
    attach_lora,
    effective_rank,
    lora_pairs,
    next_stage_length,
    sampled_layers,
    unload_due,
)
from plora_ray.preflight import FAULT_ENV, WorkerArgs
from plora_ray.proxy import proxy_nll
from plora_ray.recorded_unload import (
    PLORA_STATE_FILE,
    build_recorded_plora,
    recorded_unload,
    rounding_generator,
    save_plora_checkpoint,
)
from plora_ray.run_phases import describe_engine, describe_evaluation, report_phase
from plora_ray.shm import unlink_shm_names
from plora_ray.store import METRICS_FILE, atomic_write, atomic_write_json, json_text

__all__ = ["TrainingRun", "WorkerSession", "total_steps", "truncate_metrics"]

# --------------------------------------------------------------------------- pure pieces


def total_steps(cfg: RunConfig, train_rows: int) -> int:
    """Optimizer steps of a run: ``train.epochs`` over the rows, capped by ``train.max_steps``."""
    steps = max(1, math.floor(cfg.train.epochs * train_rows / cfg.batch.global_batch))
    if cfg.train.max_steps is not None:
        steps = min(steps, cfg.train.max_steps)
    return steps


def truncate_metrics(path: Path, step: int) -> None:
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
    atomic_write(path, ["".join(line + "\n" for line in keep).encode()])


# --------------------------------------------------------------------------- the worker


class WorkerSession(Protocol):
    """Where a run's worker sits, as ``TrainingRun`` needs it (see ``plora_ray.executors``)."""

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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (the model's init draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def mean_over_ranks(value: float, world: int) -> float:
    """The mean of a float over all ranks (every rank gets the same bits)."""
    if world == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


class TrainingRun:
    """One worker's training run: ``run()`` = setup, restore, train, finish.

    Args:
        args: the run's config, directory and test hooks.
        session: where this worker sits (rank, device, checkpoints, reports).
    """

    def __init__(self, args: WorkerArgs, session: WorkerSession) -> None:
        self.cfg = args.config
        self.out = Path(args.output_dir)
        self.fault_at = args.fault_at_step
        self.deepspeed_overrides = args.deepspeed_overrides
        self.session = session
        self.rank = session.rank
        self.world = session.world
        self.device = session.device
        self.metrics_path = self.out / METRICS_FILE
        self.guard = DivergenceGuard(
            self.cfg.train.divergence_loss_multiple, self.cfg.train.divergence_window
        )
        # What a checkpoint restores besides the weights, optimizer and data position.
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of earlier attempts (resume)
        self.last_unload: dict[str, Any] = {}
        self.last_loss: float | None = None
        self.proxy: dict[str, float] = {}
        self.proxy_step = -1  # the step the proxy was last computed at
        self.restored_from: str | None = None
        self.backbone_delta_bytes = 0
        self.merge_warning: str | None = None  # the first merge-error warning of the run
        # /dev/shm names unlinked right after the engine build (nothing to leak after that).
        self.shm_removed: list[str] = []
        self.t_start = time.perf_counter()

    def run(self) -> None:
        """The whole run on this worker; the final report says how it ended. A later run in this
        process (a reused trial actor) does not inherit ZeRO-3's process-wide linear."""
        with zero3_linear_restored():
            self.setup()
            self.t_start = time.perf_counter()
            with self.session.checkpoint() as ckpt_dir:
                if ckpt_dir is not None:
                    self.restore(ckpt_dir)
            if self.rank == 0:
                atomic_write_json(self.out / "data_stats.json", self.data_stats.as_dict(), indent=1)
            self.finish(self.train())

    # ---- setup

    def setup(self) -> None:
        """Model, data, engine and PLoRA, in this order (the seeded draws depend on it)."""
        t0 = time.perf_counter()
        seed_everything(self.cfg.seed)
        report_phase(self.out, self.rank, "loading the model and tokenizer")
        model = self.setup_model()
        t1 = time.perf_counter()
        report_phase(self.out, self.rank, "reading and tokenizing the data")
        self.setup_data()
        t2 = time.perf_counter()
        report_phase(self.out, self.rank, describe_engine(self.cfg))
        self.setup_engine(model)
        self.setup_plora()
        # Where a run's fixed cost goes (reported once, in the final report).
        self.setup_seconds = {
            "model_s": round(t1 - t0, 3),
            "data_s": round(t2 - t1, 3),
            "engine_s": round(time.perf_counter() - t2, 3),
        }

    def setup_model(self) -> torch.nn.Module:
        """The tokenizer and the model with LoRA attached (all weights trainable for ``full``)."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.model)
        model = load_model(cfg.model, seed=cfg.seed, vocab_size=len(self.tokenizer))
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
            if cfg.method != "full":
                model.enable_input_require_grads()  # LoRA: inputs of checkpointed blocks need grads
        lora_model = attach_lora(model, cfg.lora, cfg.method)
        self.full_backbone_bytes = full_backbone_bytes(lora_model)
        # Before the engine build: ZeRO-3 partitions the weights there.
        self.base_weights = (
            base_weights_source(cfg, self.out, lora_model, self.session.local_rank, self.world)
            if cfg.method == "plora" and cfg.plora.merge_rounding == "from_base"
            else None
        )
        return lora_model

    def setup_data(self) -> None:
        """The training and held-out sets, this rank's batcher and the run's step count."""
        cfg = self.cfg
        self.train_set, self.held_set, self.data_stats = build_datasets(cfg, self.tokenizer)
        self.batcher = Batcher(
            self.train_set, cfg.batch.micro_batch, self.rank, self.world, cfg.seed
        )
        self.total_steps = total_steps(cfg, len(self.train_set))
        self.grad_accum = cfg.grad_accum

    def setup_engine(self, model: torch.nn.Module) -> None:
        """DeepSpeed's engine (any number of workers) or plain torch AdamW (one worker).

        The LR schedule restarts at each unload, so it is built for one stage's length.
        """
        cfg = self.cfg
        stage_len = self.total_steps
        if cfg.method == "plora":
            stage_len = next_stage_length(cfg.plora, cfg.batch.global_batch, 0)
        self.access: Any
        if cfg.deepspeed.enabled:
            self.engine, self.optimizer, self.scheduler = build_engine(
                model,
                cfg,
                self.world,
                stage_length_steps=stage_len,
                overrides=self.deepspeed_overrides,
            )
            self.module = self.engine.module
            self.access = DeepSpeedParamAccess(self.engine)
            self.shm_removed = unlink_shm_names(self.world)
        else:
            self.engine = None
            self.module = model.to(self.device)
            trainable = [p for p in model.parameters() if p.requires_grad]
            o = cfg.optim
            self.optimizer = torch.optim.AdamW(
                trainable,
                lr=o.lr,
                betas=(o.betas[0], o.betas[1]),
                eps=o.eps,
                weight_decay=o.weight_decay,
            )
            self.scheduler = make_lr_scheduler(self.optimizer, o, stage_len)
            self.access = TorchParamAccess(self.optimizer)

    def setup_plora(self) -> None:
        """PLoRA's unload schedule and the recorder of each unload's backbone change."""
        cfg = self.cfg
        self.plora: PLoRA | None = None
        self.recorder: BackboneRecorder | None = None
        if cfg.method != "plora":
            return
        self.plora, self.recorder = build_recorded_plora(
            self.module,
            cfg.plora,
            cfg.batch.global_batch,
            cfg.seed,
            self.access,
            self.scheduler,
            self.base_weights,
        )
        self.plora.stages = StageSchedule(cfg)  # plora.stages: empty for most runs

    def generator_for(self, unload_index: int, layer_index: int, device: Any = "cpu") -> Any:
        """The generator PLoRA's unload uses for this layer's rounding (see plora.unload)."""
        return rounding_generator(self.cfg.seed, unload_index, layer_index, device)

    # ---- the loop

    def train(self) -> str | None:
        """Train to ``total_steps``; return why the run diverged (None when it did not).

        Raises:
            RuntimeError: the test fault (``PLORA_FAULT_AT_STEP``) after its step.
        """
        cfg = self.cfg
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
            # module docstring); for plora they are the unloads (the same test, PLoRA.due, with
            # each stage's interval).
            point = (
                unload
                if self.plora is not None
                else diverged is None
                and unload_due(self.proxy_counter(), counter_before, cfg.plora.unload_every)
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
        return diverged

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over ``grad_accum`` micro-batches; (mean loss over ranks, lr)."""
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
        return mean_over_ranks(total / self.grad_accum, self.world), lr

    def proxy_counter(self) -> int:
        """Where training is in ``plora.unload_unit``: optimizer steps or samples seen."""
        return self.step if self.cfg.plora.unload_unit == "steps" else self.batcher.samples_seen

    def unload(self) -> None:
        """PLoRA unload with its backbone change recorded."""
        assert self.plora is not None and self.recorder is not None
        self.last_unload = recorded_unload(
            self.plora,
            self.recorder,
            self.step,
            self.batcher.samples_seen,
            warned=self.merge_warning is not None,
        )
        # Logged once per run; the first one goes in the final report (and the trial record).
        self.merge_warning = self.merge_warning or self.last_unload.get("merge_warning")

    # ---- reports

    def elapsed(self) -> float:
        """Training seconds so far, earlier attempts of a resumed run included."""
        return self.elapsed_before + (time.perf_counter() - self.t_start)

    def report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        """Append to metrics.jsonl (rank 0) and report to the session (all ranks), with a
        checkpoint when asked."""
        if self.rank == 0:
            with open(self.metrics_path, "a") as fh:
                fh.write(json_text(metrics, indent=None) + "\n")
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
        """A running report (one line of metrics.jsonl)."""
        ranks = self.last_unload.get("effective_rank") or {}
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "samples": self.batcher.samples_seen,
            "tokens": self.batcher.tokens_seen,
            "epoch": round(self.batcher.epochs_done, 4),
            "loss": loss,
            "lr": lr,
            "stage": self.plora.num_unloads if self.plora is not None else 0,
            **(self.plora.stage_metrics() if self.plora is not None else {}),
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

    # ---- checkpoints

    def save_checkpoint(self, directory: Path) -> None:
        """Write this rank's part of a checkpoint (collective: every rank calls it)."""
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
            # Digests of every weight an unload changed: collective under ZeRO-3.
            size = save_plora_checkpoint(
                directory, self.module, self.plora, self.recorder, self.access, self.rank == 0
            )
            self.backbone_delta_bytes = size if self.rank == 0 else self.backbone_delta_bytes
        if self.rank == 0:
            write_state(
                directory,
                {
                    "step": self.step,
                    "world_size": self.world,
                    "batcher": self.batcher.state_dict(),
                    "divergence": self.guard.state_dict(),
                    "elapsed_s": self.elapsed(),
                    "last_unload": self.last_unload,
                    "merge_warning": self.merge_warning,
                    "proxy": self.proxy,
                    "proxy_step": self.proxy_step,
                    "last_loss": self.last_loss,
                    "method": self.cfg.method,
                },
            )
            (directory / "config.yaml").write_text(dump_config(self.cfg))
            self.tokenizer.save_pretrained(str(directory / "tokenizer"))

    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint directory (all ranks).

        Raises:
            ValueError: the checkpoint was written by another number of workers, or holds
                weights this model does not have.
            RuntimeError: DeepSpeed could not load its part.
        """
        state = read_state(directory)
        if state["world_size"] != self.world:
            raise ValueError(
                f"resume: expected resources.num_workers={state['world_size']} as in "
                f"the checkpoint {directory}, found {self.world}"
            )
        if self.plora is not None and self.recorder is not None:
            plora_state = load_pickled_state(directory / PLORA_STATE_FILE)
            records, digests = load_backbone(directory / "backbone")
            replay_backbone(
                self.module,
                records,
                self.access,
                self.generator_for,
                add_with_rounding,
                digests,
                base_weights=self.base_weights,
            )
            self.recorder.records = records
            # The factors the unloads keep are stored once, in the records.
            plora_state["base_factors"] = self.recorder.merged_factors(self.plora.factor_layers())
            self.plora.load_state_dict(plora_state)
        if self.engine is not None:
            check_deepspeed_checkpoint(directory / "deepspeed")  # DeepSpeed unpickles freely
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
            blob = load_pickled_state(directory / "trainable.pt")
            missing = self.module.load_state_dict(blob["model"], strict=False)
            if missing.unexpected_keys:
                raise ValueError(f"resume: unexpected weights {missing.unexpected_keys[:3]}")
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
        if self.plora is not None:  # plora.stages: the stage's optimizer settings
            self.plora.resume_stage(at_boundary=int(state["step"]) == self.plora.last_step)
        self.batcher.load_state_dict(state["batcher"])
        self.guard.load_state_dict(state["divergence"])
        self.step = int(state["step"])
        self.last_loss = state.get("last_loss")
        self.elapsed_before = float(state["elapsed_s"])
        self.last_unload = state.get("last_unload", {})
        self.merge_warning = state.get("merge_warning")
        self.proxy = state.get("proxy", {})
        self.proxy_step = int(state.get("proxy_step", -1))
        restore_rng(load_pickled_state(directory / f"rng_rank{self.rank}.pt"))
        self.restored_from = str(directory)
        if self.rank == 0:
            truncate_metrics(self.metrics_path, self.step)

    # ---- evaluation and the end

    def evaluable(self) -> contextlib.AbstractContextManager[None]:
        """The model as evaluation needs it: every parameter whole in every rank's module.

        A no-op except under ZeRO-3, where ``engine.zero3_whole_model`` gathers the parameters
        (every rank then holds the full model in the module's dtype while the evaluation runs,
        beside its ZeRO-3 partitions).
        """
        if self.engine is not None and self.cfg.deepspeed.zero_stage == 3:
            return zero3_whole_model(self.engine)
        return contextlib.nullcontext()

    def compute_proxy(self) -> dict[str, float]:
        """The proxy objectives of the model now (every rank calls it)."""
        # Documents are sharded across ranks and gathered; it restores the model's mode and the
        # RNG states, so the training that follows is unchanged.
        with self.evaluable():
            out = proxy_nll(
                self.module, self.tokenizer, self.cfg.eval, rank=self.rank, world_size=self.world
            )
        return {k: float(v) for k, v in out.items()}

    def adapter_effective_rank(self) -> dict[str, int]:
        """LoRA's ΔW = scaling·B·A: its effective rank on the layers PLoRA would sample."""
        pairs = lora_pairs(self.module)
        out = {}
        for i in sampled_layers(len(pairs), self.cfg.plora.rank_sample_layers):
            pr = pairs[i]
            with self.access.gathered([pr.A, pr.B]):
                delta = pr.scaling * (
                    self.access.read_trainable(pr.B) @ self.access.read_trainable(pr.A)
                )
            out[pr.name] = effective_rank(delta, self.cfg.plora.rank_threshold)
        return out

    def finish(self, diverged: str | None) -> None:
        """Final evaluation, export and the final report (all ranks)."""
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
        if self.merge_warning is not None:
            final["merge_warning"] = self.merge_warning
        if diverged is not None:
            final.update(status="diverged", diverged_step=self.step, reason=diverged)
        else:
            final["status"] = "completed"
            if self.plora is not None:
                ranks = self.plora.effective_ranks()
            elif cfg.method == "lora":
                ranks = self.adapter_effective_rank()
            if ranks:
                final["effective_rank"] = sum(ranks.values()) / len(ranks)
                final["effective_rank_layers"] = ranks
            objectives: dict[str, float] = {}
            if cfg.eval.at_end:
                # Every rank calls it: with eval.sharded the documents are split across ranks,
                # otherwise rank 0 scores them all and broadcasts.
                report_phase(self.out, self.rank, describe_evaluation(cfg.eval))
                with self.evaluable():
                    res = evaluate_model(
                        self.module, self.tokenizer, cfg.eval, rank=self.rank, world_size=self.world
                    )
                objectives = {k: float(v) for k, v in res.objectives.items()}
                final["eval_seconds"] = round(res.seconds, 3)
                if self.rank == 0:
                    atomic_write_json(self.out / "eval_results.json", res.as_dict(), indent=1)
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
                if self.plora is not None:
                    # The last adapter merged as an unload merges (every rank: collective).
                    self.plora.merge_adapter()
                if self.rank == 0 or stage3:
                    export_model(
                        self.module,
                        self.tokenizer,
                        self.out / "model",
                        access=self.access if stage3 else None,
                        write=self.rank == 0,
                        merge_adapter=self.plora is None,
                    )
                final["model_path"] = str(self.out / "model")
        final["elapsed_s"] = round(self.elapsed(), 3)
        final["setup_seconds"] = self.setup_seconds
        final["shm_unlinked_at_start"] = len(self.shm_removed)
        self.report(final, checkpoint=False)
