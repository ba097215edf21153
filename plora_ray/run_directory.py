"""A run's output directory: made ready for a run, and read back into the run's result.

Both executors (``plora_ray.executors``) share it: ``prepare_output_dir`` refuses to overwrite a
run and checks a resumed run's config, ``collect_result`` reads what the run left into a
``RunResult`` (``DIR/result.json``); ``holds_run`` / ``newest_checkpoint`` say whether and from
where a run continues. No Ray here (the layout of DIR is in ``plora_ray.executors``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plora_ray.checkpoint import dir_bytes
from plora_ray.config import ConfigError, RunConfig, dump_config
from plora_ray.run_sync import RUN_CHECKPOINTS_DIR, RunMirror
from plora_ray.store import METRICS_FILE, atomic_write_json, read_metrics

__all__ = [
    "RESUME_MAY_CHANGE",
    "RunResult",
    "checkpoint_dirs",
    "collect_result",
    "holds_run",
    "newest_checkpoint",
    "prepare_output_dir",
]

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


def checkpoint_dirs(root: Path) -> list[Path]:
    """The complete ``step_NNNNNN`` checkpoint directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def newest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint of a run directory written by ``run_in_process`` (None
    when there is none). ``run_training``'s own checkpoints are Ray Train's to choose from."""
    dirs = checkpoint_dirs(Path(output_dir) / RUN_CHECKPOINTS_DIR)
    return dirs[-1] if dirs else None


def holds_run(output_dir: str | os.PathLike[str]) -> bool:
    """Whether DIR holds a run to continue: Ray Train's checkpoint snapshot (``run_training``)
    or a complete checkpoint directory (``run_in_process``)."""
    out = Path(output_dir)
    snapshot = out / RUN_CHECKPOINTS_DIR / "checkpoint_manager_snapshot.json"
    return snapshot.exists() or newest_checkpoint(out) is not None


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


def check_resume_config(cfg: RunConfig, saved: Path) -> None:
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


def prepare_output_dir(
    cfg: RunConfig, output_dir: str | os.PathLike[str], resume: bool, mirror: RunMirror | None
) -> Path:
    """DIR made ready for a run: refused if it (or, with ``mirror``, the run's home in the
    storage) holds one and ``resume`` is False, the config checked against the resumed run's,
    config.yaml written, and metrics.jsonl dropped when there is nothing to continue from (the
    run starts at step 0)."""
    out = Path(output_dir).resolve()
    held = holds_run(out) or (mirror is not None and mirror.holds_run())
    if held and not resume:
        raise FileExistsError(
            f"{out} already holds a run (checkpoints in {out / RUN_CHECKPOINTS_DIR}); "
            "pass --resume to continue it or choose another --output"
        )
    if resume:
        check_resume_config(cfg, out / "config.yaml")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    metrics_path = out / METRICS_FILE
    if metrics_path.exists() and not held:
        metrics_path.unlink()
    return out


def collect_result(
    cfg: RunConfig,
    out: Path,
    t0: float,
    reason: str | None,
    ckpt_path: str | None,
    removed: list[str],
    report: Report | None,
    mirror: RunMirror | None = None,
) -> RunResult:
    """The RunResult of a finished run, from its metrics.jsonl; written to DIR/result.json.

    A run that ended without its final report (or with ``reason``, an exception) gets a final
    ``failed`` report appended to metrics.jsonl and passed to ``report``. With ``mirror`` (cloud
    storage) the model and the checkpoint are named by their URIs in the storage.
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
    model_path = final.get("model_path")
    ckpt_bytes = backbone_bytes = None
    if mirror is not None:
        model_path, ckpt_path = mirror.uri_of(model_path), mirror.uri_of(ckpt_path)
        ckpt_bytes = mirror.bytes_of(ckpt_path)
        if ckpt_path and cfg.method == "plora":
            backbone_bytes = mirror.bytes_of(f"{ckpt_path}/backbone")
    elif ckpt_path:
        ckpt_bytes = dir_bytes(ckpt_path)
        if cfg.method == "plora":
            backbone_bytes = dir_bytes(Path(ckpt_path) / "backbone")
    res = RunResult(
        status=status,
        output_dir=str(out),
        metrics=final,
        objectives=final.get("objectives") or {},
        metrics_path=str(metrics_path),
        checkpoint_path=ckpt_path,
        model_path=model_path,
        wall_time_s=time.perf_counter() - t0,
        num_unloads=int(final.get("num_unloads") or 0),
        delta_effective_rank=final.get("effective_rank"),
        final_loss=losses[-1][1] if losses else None,
        checkpoint_bytes=ckpt_bytes,
        backbone_delta_bytes=backbone_bytes,
        full_backbone_bytes=final.get("full_backbone_bytes"),
        diverged_step=final.get("diverged_step"),
        reason=final.get("reason") if status != "completed" else None,
        loss_curve=losses,
        shm_removed=removed,
    )
    atomic_write_json(out / "result.json", res.as_dict(), indent=1)
    return res
