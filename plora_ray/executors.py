"""Where a run trains: on Ray Train (any number of workers) or in the calling process (one).

Both executors are ``Trainer``s, ``(cfg, output_dir, *, report=None, resume=False) -> RunResult``:
they prepare the run directory, run ``training_run.TrainingRun`` on every worker and collect the
``RunResult`` from the run's metrics.jsonl.

* ``run_training`` builds the ``TorchTrainer`` (Train v2) for a run config, runs it, cleans up and
  returns a ``RunResult``. It works from the command line and inside a Ray Tune trial (the trial
  calls it; metrics reach Tune through ``TuneReportCallback``, the documented Train-inside-Tune
  pattern of Ray 2.5x+).
* ``run_in_process`` runs the same worker loop with one worker in the calling process, without
  Ray Train: what a one-worker search trial does inside its (reused) Tune trial actor
  (``search.trial_executor: actor``).

Output directory layout (``DIR``)::

    config.yaml        the validated run config (all defaults filled in)
    metrics.jsonl      one JSON object per report (rank 0), the final one with "status"
    phases.jsonl       what the run started doing when, setup and evaluation (plora_ray.run_phases)
    data_stats.json    what the data pipeline kept and dropped
    ray/               Ray Train's run storage: checkpoint_manager_snapshot.json and the kept
                       checkpoints ray/step_NNNNNN/ (see plora_ray.checkpoint for their content)
    model/             the merged model in the Hugging Face layout (safetensors, config, tokenizer)
    base_weights.safetensors
                       plora.merge_rounding from_base with model.tiny only (plora_ray.base_weights)
    eval_results.json  lm-eval results of the final evaluation
    result.json        the RunResult

Resume: Ray Train restores the newest checkpoint of ``DIR/ray`` when a trainer with the same
storage path and name starts; ``--resume`` does exactly that (and refuses nothing: with no
checkpoint the run starts from step 0). Without ``--resume`` an existing run in ``DIR`` is an
error, so an old run is never continued by accident. Inside one ``run_training`` call,
``max_failures`` lets Ray restart failed workers from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import yaml

# Ray 2.50-2.5x need this to select Train v2; from Ray 2.60 it is the default. Set before any
# ray.train import, hence before the imports below.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer, get_device
from ray.tune.integration.ray_train import TuneReportCallback

# Private (Ray 2.50-2.60): whether this code runs inside a Tune trial; no public equivalent.
from ray.tune.trainable.trainable_fn_utils import _in_tune_session

from plora_ray.checkpoint import dir_bytes
from plora_ray.config import ConfigError, RunConfig, dump_config
from plora_ray.preflight import WorkerArgs, check_run_config
from plora_ray.run_phases import PHASES_FILE
from plora_ray.shm import (
    cleanup_run_shm,
    cleanup_shm,
    record_process_group,
    record_removed,
    shm_snapshot,
)
from plora_ray.store import METRICS_FILE, atomic_write_json, read_metrics
from plora_ray.train_failures import infrastructure_loss
from plora_ray.training_run import TrainingRun

__all__ = [
    "RAY_RUN_NAME",
    "RunResult",
    "Trainer",
    "cleanup_run_shm",
    "holds_run",
    "infrastructure_loss",
    "newest_checkpoint",
    "run_in_process",
    "run_training",
    "train_loop_per_worker",
]

RAY_RUN_NAME = "ray"

Report = Callable[[dict[str, Any]], None]


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
    # What the run lost when it failed for a worker, its node or its worker group's start (a
    # retry from the newest checkpoint may succeed), None otherwise (``infrastructure_loss``).
    infrastructure_loss: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Trainer(Protocol):
    """An executor: trains one run config into ``output_dir`` and says what it produced.

    ``run_training`` and ``run_in_process`` are the two; a search picks one per trial.
    """

    def __call__(
        self,
        cfg: RunConfig,
        output_dir: str | os.PathLike[str],
        *,
        report: Report | None = None,
        resume: bool = False,
    ) -> RunResult: ...


# --------------------------------------------------------------------------- sessions
#
# Where a run's worker sits: ``_RayTrainSession`` in a Ray Train worker of a TorchTrainer (any
# number of workers), ``_ProcessSession`` in the calling process itself (one worker, world size 1:
# a Tune trial actor that Tune reuses for the next trial, see ``run_in_process``). Both are
# ``training_run.WorkerSession``s.


class _RayTrainSession:
    """A Ray Train worker: rank, device and checkpoints come from Ray Train's context."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world: int = ctx.get_world_size()
        self.local_rank: int = ctx.get_local_rank()
        # Ray Train assigns each GPU worker its device (CPU when no GPU was requested).
        self.device = get_device()

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        """The newest checkpoint Ray Train restores this run from, as a directory (or None)."""
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

    def __init__(self, out: Path, keep: int, device: Any, on_report: Report | None) -> None:
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


def holds_run(output_dir: str | os.PathLike[str]) -> bool:
    """Whether DIR holds a run to continue: Ray Train's checkpoint snapshot (``run_training``)
    or a complete checkpoint directory (``run_in_process``)."""
    out = Path(output_dir)
    snapshot = out / RAY_RUN_NAME / "checkpoint_manager_snapshot.json"
    return snapshot.exists() or newest_checkpoint(out) is not None


# --------------------------------------------------------------------------- Ray Train


def train_loop_per_worker(args: WorkerArgs) -> None:
    """What every Ray Train worker runs: the training run, then its /dev/shm cleanup.

    Args:
        args: the run's config and directory (``functools.partial`` binds it for Ray Train).
    """
    ctx = ray.train.get_context()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    out = Path(args.output_dir)
    if ctx.get_world_rank() == 0 and port:
        record_process_group(out, addr, port)
    # What DeepSpeed's own launcher sets: all ranks of this node. With it, DeepSpeed's CPU
    # backend uses its shared-memory all-reduce when every rank is on one node.
    os.environ.setdefault("LOCAL_SIZE", str(ctx.get_local_world_size()))
    run = None
    try:
        run = TrainingRun(args, _RayTrainSession())
        run.run()
    finally:
        if port:
            # Names left if the run failed before the engine build unlinked them (unlinking while
            # a peer still maps a buffer is safe: the mapping outlives the name).
            unlinked = run.shm_removed if run is not None else []
            record_removed(out, port, ctx.get_world_rank(), unlinked + cleanup_shm(addr, port))


class _MetricsTail:
    """Follows a run's JSONL file (metrics.jsonl, phases.jsonl) on the driver and hands each new
    line to a callback."""

    def __init__(self, path: Path, callback: Report | None) -> None:
        self.path = path
        self.callback = callback
        self.pos = path.stat().st_size if path.is_file() else 0
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _MetricsTail:
        if self.callback is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.callback is not None:
            self.stop_event.set()
            self.thread.join(timeout=5)
            self.poll()

    def _loop(self) -> None:
        while not self.stop_event.wait(0.5):
            self.poll()

    def poll(self) -> None:
        """Hand the complete lines written since the last poll to the callback."""
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


def _ensure_ray(cfg: RunConfig) -> bool:
    """Connect to Ray: the running one, RAY_ADDRESS, or a new local head. True if we started it."""
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
        logging_level=logging.WARNING,
    )
    return True


def run_training(
    cfg: RunConfig,
    output_dir: str | os.PathLike[str],
    *,
    report: Report | None = None,
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
        report: called on the driver with each report (a dict, as in metrics.jsonl) as it lands,
            and with each phase (``run_phases``: ``{"phase": ...}``, never in metrics.jsonl).
        resume: continue from the newest checkpoint in DIR (from step 0 when there is none).
        max_failures: worker failures Ray Train recovers from (from the newest checkpoint).

    Raises:
        ConfigError: a config the trainer cannot run (before Ray starts).
        FileExistsError: DIR already holds a run and ``resume`` is False.
    """
    check_run_config(cfg)
    out = _prepare_output_dir(cfg, output_dir, resume)
    args = WorkerArgs.from_environment(cfg, out)
    t0 = time.perf_counter()
    if report is not None and not ray.is_initialized():
        where = os.environ.get("RAY_ADDRESS") or "a local head"
        report({"phase": f"starting Ray ({where})", "elapsed_s": 0.0})
    started = _ensure_ray(cfg)
    shm_before = shm_snapshot()
    reason, result, lost = None, None, None
    removed: list[str] = []
    try:
        r = cfg.resources
        use_gpu = r.gpus_per_worker > 0
        resources = {"CPU": r.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = r.gpus_per_worker
        callbacks: list[Any] = [TuneReportCallback()] if _in_tune_session() else []
        trainer = TorchTrainer(
            functools.partial(train_loop_per_worker, args),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=RAY_RUN_NAME,
                storage_path=str(out),
                callbacks=callbacks,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
            ),
        )
        with _MetricsTail(out / METRICS_FILE, report), _MetricsTail(out / PHASES_FILE, report):
            try:
                result = trainer.fit()
            except Exception as exc:  # WorkerGroupError / ControllerError: the run failed
                reason = f"{type(exc).__name__}: {exc}"
                lost = infrastructure_loss(exc)
    finally:
        removed = cleanup_run_shm(out, shm_before)
        if started:
            ray.shutdown()
    ckpt_path = result.checkpoint.path if result is not None and result.checkpoint else None
    res = _collect_result(cfg, out, t0, reason, ckpt_path, removed, report)
    if lost is not None:
        res.infrastructure_loss = lost
        atomic_write_json(out / "result.json", res.as_dict(), indent=1)
    return res


# --------------------------------------------------------------------------- in process


def _init_process_group(use_gpu: bool) -> None:
    """A world-size-1 torch.distributed group in this process (DeepSpeed needs one), created
    once and kept: the next ``run_in_process`` in the same process (a reused Tune trial actor)
    finds it initialised. The env vars are the ones Ray Train and DeepSpeed's launcher set, so
    DeepSpeed names (and ``shm.unlink_shm_names`` removes) its /dev/shm buffers as for a worker.
    """
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
    report: Report | None = None,
    resume: bool = False,
) -> RunResult:
    """Train one single-worker run in this process (no Ray Train) and return what it produced.

    The same worker loop as ``run_training`` (``TrainingRun``) with world size 1, in the calling
    process. It is what a search trial runs with ``search.trial_executor: actor``: the Tune trial
    actor trains itself, and Tune reuses the actor for the next trial, so its imports, its
    process group and its warm caches are paid once per actor instead of once per trial
    (``run_training`` starts a Train controller and a worker process per run). Inside a Tune
    trial every report goes to Tune as well (``ray.tune.report``: what ``TuneReportCallback``
    forwards in ``run_training``); a trial stopped by its scheduler ends inside that call (Tune
    raises ``SystemExit`` in the trial's thread), after the report's checkpoint is on disk.

    Output directory layout: as ``run_training``'s; the checkpoints are ``DIR/ray/step_NNNNNN``
    without Ray Train's snapshot file (``newest_checkpoint`` finds them).

    Args:
        cfg: a validated run config with ``resources.num_workers`` 1.
        output_dir: DIR.
        report: called with each report (a dict, as in metrics.jsonl) as it is made, and with
            each phase (``run_phases``: ``{"phase": ...}``, never in metrics.jsonl or to Tune).
        resume: continue from the newest checkpoint in DIR (from step 0 when there is none).

    Raises:
        ConfigError: a config the trainer cannot run, or ``resources.num_workers`` other than 1.
        FileExistsError: DIR already holds a run and ``resume`` is False.
    """
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
    t0 = time.perf_counter()
    use_gpu = r.gpus_per_worker > 0
    tune_report = tune.report if _in_tune_session() else None

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
        args = WorkerArgs.from_environment(cfg, out)
        session = _ProcessSession(out, cfg.checkpoint.keep, device, on_report)
        with _MetricsTail(out / PHASES_FILE, report):
            TrainingRun(args, session).run()
    except Exception as exc:  # the run failed; the search goes on with the next trial
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        # The next run in this process starts from a clean heap (the engine, the model and the
        # optimizer state of this one are garbage now).
        gc.collect()
        if use_gpu and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return _collect_result(cfg, out, t0, reason, None, [], report)


# --------------------------------------------------------------------------- the run directory

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


def _collect_result(
    cfg: RunConfig,
    out: Path,
    t0: float,
    reason: str | None,
    ckpt_path: str | None,
    removed: list[str],
    report: Report | None,
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
    atomic_write_json(out / "result.json", res.as_dict(), indent=1)
    return res
