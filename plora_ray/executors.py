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

Cloud storage (``sync``, a search trial on s3:// or gs://): DIR is the scratch copy of the run on
the node at hand, and the run's home is ``sync.uri`` in the storage (``plora_ray.run_sync``).
``run_training`` hands Ray Train that URI as its storage, so Train persists its checkpoints there
and restores from there on any node; every worker writes into its own node's scratch copy, and
rank 0 pushes the run's files (metrics, the exported model, ...) to the storage as it goes.
``run_in_process`` pulls the newest complete checkpoint before it starts and pushes checkpoints and
files as it goes. The returned ``RunResult`` then names the model and checkpoint by their URIs.

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
import dataclasses
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
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

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

from plora_ray.config import ConfigError, RunConfig
from plora_ray.preflight import WorkerArgs, check_run_config
from plora_ray.run_directory import (
    Report,
    RunResult,
    checkpoint_dirs,
    collect_result,
    holds_run,
    newest_checkpoint,
    prepare_output_dir,
)
from plora_ray.run_phases import PHASES_FILE
from plora_ray.run_sync import RUN_CHECKPOINTS_DIR, RunSync
from plora_ray.shm import (
    cleanup_run_shm,
    cleanup_shm,
    record_process_group,
    record_removed,
    shm_snapshot,
)
from plora_ray.store import METRICS_FILE, atomic_write_json
from plora_ray.train_failures import infrastructure_loss
from plora_ray.training_run import TrainingRun

__all__ = [
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


class Trainer(Protocol):
    """An executor: trains one run config into ``output_dir`` and says what it produced.

    ``run_training`` and ``run_in_process`` are the two; a search picks one per trial. With
    ``sync`` (cloud storage) the run's home is ``sync.uri`` and ``output_dir`` this node's
    scratch copy of it.
    """

    def __call__(
        self,
        cfg: RunConfig,
        output_dir: str | os.PathLike[str],
        *,
        report: Report | None = None,
        resume: bool = False,
        sync: RunSync | None = None,
    ) -> RunResult: ...


# --------------------------------------------------------------------------- sessions
#
# Where a run's worker sits: ``_RayTrainSession`` in a Ray Train worker of a TorchTrainer (any
# number of workers), ``_ProcessSession`` in the calling process itself (one worker, world size 1:
# a Tune trial actor that Tune reuses for the next trial, see ``run_in_process``). Both are
# ``training_run.WorkerSession``s.


class _RayTrainSession:
    """A Ray Train worker: rank, device and checkpoints come from Ray Train's context."""

    def __init__(self, seeded: str | None = None) -> None:
        ctx = ray.train.get_context()
        self.seeded = seeded
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
            yield Path(self.seeded) if self.seeded else None
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
        self.ckpt_root = out / RUN_CHECKPOINTS_DIR
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
            for old in checkpoint_dirs(self.ckpt_root)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        if self.on_report is not None:
            self.on_report(metrics)


# --------------------------------------------------------------------------- Ray Train


def train_loop_per_worker(
    args: WorkerArgs, sync: RunSync | None = None, seeded: str | None = None
) -> None:
    """What every Ray Train worker runs: the training run, then its /dev/shm cleanup.

    Args:
        args: the run's config and directory (``functools.partial`` binds it for Ray Train).
        sync: the run's home in cloud storage, or None (``args.output_dir`` is shared). With it,
            every worker writes into its own node's scratch copy of the run; rank 0 first pulls
            the run's reports so far (a resumed run continues them) and pushes its files to the
            storage while it trains and at its end.
        seeded: a checkpoint directory put into the run by hand (a ``pbt_unload`` fork) to start
            from when Ray Train restores none.
    """
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    mirror = sync.mirror() if sync is not None else None
    if mirror is not None:
        args = dataclasses.replace(args, output_dir=str(mirror.local))
        mirror.local.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            mirror.pull_files(METRICS_FILE, PHASES_FILE, "config.yaml")
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    out = Path(args.output_dir)
    if rank == 0 and port:
        record_process_group(out, addr, port)
    # What DeepSpeed's own launcher sets: all ranks of this node. With it, DeepSpeed's CPU
    # backend uses its shared-memory all-reduce when every rank is on one node.
    os.environ.setdefault("LOCAL_SIZE", str(ctx.get_local_world_size()))
    pushing = (
        mirror.mirrored(checkpoints=False)
        if mirror is not None and rank == 0
        else contextlib.nullcontext()
    )
    run = None
    try:
        with pushing:
            run = TrainingRun(args, _RayTrainSession(seeded))
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


def _seeded_checkpoint(out: Path) -> str | None:
    """A checkpoint put into DIR/ray by hand, with no Ray Train snapshot to restore it from (a
    ``pbt_unload`` fork, ``trial_driver.seed_fork``): what the workers start the run from when
    Ray Train gives them none (TorchTrainer's own ``resume_from_checkpoint`` is deprecated in
    Train v2, ray 2.60.0)."""
    if (out / RUN_CHECKPOINTS_DIR / "checkpoint_manager_snapshot.json").exists():
        return None  # Ray Train restores its own newest checkpoint
    seeded = newest_checkpoint(out)
    return str(seeded) if seeded is not None else None


def run_training(
    cfg: RunConfig,
    output_dir: str | os.PathLike[str],
    *,
    report: Report | None = None,
    resume: bool = False,
    max_failures: int = 0,
    sync: RunSync | None = None,
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
        sync: the run's home in cloud storage (a search trial on s3:// / gs://), with DIR this
            node's scratch copy; None when DIR itself is on storage every node sees.

    Raises:
        ConfigError: a config the trainer cannot run (before Ray starts).
        FileExistsError: DIR already holds a run and ``resume`` is False.
    """
    check_run_config(cfg)
    mirror = sync.mirror() if sync is not None else None
    if mirror is not None:
        mirror.pull_files("config.yaml", METRICS_FILE)
    out = prepare_output_dir(cfg, output_dir, resume, mirror)
    if mirror is not None:
        # What the workers (on any node) continue from: the checked config, the reports so far
        # (none when there is no checkpoint to continue).
        mirror.push_files("config.yaml", METRICS_FILE)
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
            functools.partial(
                train_loop_per_worker,
                args,
                sync,
                _seeded_checkpoint(out) if resume and mirror is None else None,
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources
            ),
            run_config=ray.train.RunConfig(
                name=RUN_CHECKPOINTS_DIR,
                # Cloud storage: Train persists and restores the checkpoints there itself.
                storage_path=sync.uri if sync is not None else str(out),
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
    if mirror is not None:
        # What rank 0 wrote on its node (maybe another one) reaches this one through the storage.
        mirror.pull(checkpoint=False)
    res = collect_result(cfg, out, t0, reason, ckpt_path, removed, report, mirror)
    if lost is not None:
        res.infrastructure_loss = lost
        atomic_write_json(out / "result.json", res.as_dict(), indent=1)
    if mirror is not None:
        mirror.push_files(METRICS_FILE, "result.json")
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
    sync: RunSync | None = None,
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
        sync: the run's home in cloud storage, with DIR this node's scratch copy: the newest
            complete checkpoint is pulled from there first (``resume``), and checkpoints and
            files are pushed there as the run goes. None when DIR is on storage every node sees.

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
    mirror = sync.mirror() if sync is not None else None
    if mirror is not None and resume:
        mirror.pull(checkpoint=True)
    out = prepare_output_dir(cfg, output_dir, resume, mirror)
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
        pushing = (
            mirror.mirrored(checkpoints=True) if mirror is not None else contextlib.nullcontext()
        )
        with pushing, _MetricsTail(out / PHASES_FILE, report):
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
    res = collect_result(cfg, out, t0, reason, None, [], report, mirror)
    if mirror is not None:
        mirror.push_files(METRICS_FILE, "result.json")
    return res
