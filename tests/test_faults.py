"""Fault injection on real searches (a loopback Ray head of our own, the real trainer, a tiny
model): a Train worker killed under a trial is retried from the run's newest checkpoint up to
search.max_retries, and recorded as retried; with no retries left the trial is recorded failed
with what was lost. A SIGKILLed driver leaves nothing running of the Ray it started, and what it
dropped (run directories without a record, study trials left RUNNING) is closed with a reason."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import ray_helpers as helpers

from plora_ray.ray_watchdog import holds_files_under, session_processes
from plora_ray.store import SearchDir, TrialRecord
from plora_ray.tune_adapter import (
    DROPPED_DIR,
    DROPPED_FILE,
    ORPHAN_REASON,
    close_study_orphans,
    set_aside_dropped_runs,
)

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

# One LoRA trial trained by a Ray Train run of its own, long enough (20 steps, a checkpoint every
# 4) to be hit mid-training, with no scheduler to stop it.
ONE_LONG_TRAIN_TRIAL = [
    "search.num_samples=1",
    "search.max_concurrent=1",
    "search.trial_executor=train",
    "search.scheduler=none",
    "train.max_steps=20",
    "checkpoint.every_steps=4",
    "train.epochs=100",
    "train.log_every=2",
    "eval.limit=2",
    # GSM8K only (the objective): MMLU's 57 subjects would cost more than the training.
    "eval.tasks=[gsm8k]",
    "eval.num_fewshot={gsm8k: 0}",
    "eval.max_gen_toks=8",
    "data.max_samples=64",
    "plora.unload_every=16",
    "search.points=[{method: lora, optim.lr: 0.001, lora.rank: 4}]",
]


def _train_workers_of(temp_dir: str) -> list[int]:
    """PIDs of the Ray Train workers of the head whose private temp dir is ``temp_dir`` (never
    another session's Ray: a worker holds its log files open under its head's temp dir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline and holds_files_under(d, temp_dir):
            pids.append(int(d.name))
    return pids


def _search_with_a_killed_worker(tmp_path: Path, max_retries: int) -> tuple[dict, Path, str]:
    """Run the one-trial search, SIGKILL its Train worker once its first checkpoint is on disk;
    returns the trial's record, the search dir and the driver's output."""
    storage = tmp_path / "st"
    sdir = storage / "k"
    cmd = [
        sys.executable,
        "-m",
        "plora_ray.cli",
        "search",
        str(SMOKE),
        "--storage",
        str(storage),
        "--name",
        "k",
        "--set",
        *ONE_LONG_TRAIN_TRIAL,
        f"search.max_retries={max_retries}",
    ]
    log = tmp_path / "search.log"
    with helpers.ray_head(num_cpus=3) as head:
        env = {**helpers.ray_defaults_env(), "RAY_ADDRESS": head["gcs"], "RAY_AUTH_MODE": "token"}
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            killed: list[int] = []
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not killed:
                # A checkpoint Train has committed (a step_* directory alone may be one whose
                # report the controller never got: a retry could not start from it).
                ckpts = list((sdir / "runs").glob("*/ray/checkpoint_manager_snapshot.json"))
                workers = _train_workers_of(head["temp"]) if ckpts else []
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                time.sleep(0.2)
            assert killed, "no Train worker to kill before the search ended:\n" + log.read_text()
            print(f"killed Train worker(s) {killed} at {ckpts}")
            rc = proc.wait(timeout=400)
    out = log.read_text()
    assert rc in (0, 1), out[-4000:]
    (path,) = sorted((sdir / "trials").glob("*.json"))
    return json.loads(path.read_text()), sdir, out


def _tune_steps(sdir: Path, trial_id: str) -> list[int]:
    """The steps of every report Tune got from the trial, in order (both attempts)."""
    lines = (sdir / f"trial_{trial_id}" / "result.json").read_text().splitlines()
    return [int(r["step"]) for r in map(json.loads, lines) if r.get("status") == "running"]


@pytest.mark.slow
def test_a_killed_train_worker_is_retried_from_the_newest_checkpoint(tmp_path: Path) -> None:
    rec, sdir, out = _search_with_a_killed_worker(tmp_path, max_retries=1)
    assert rec["status"] == "completed", (rec["reason"], out[-4000:])
    assert rec["retries"] == 1, rec
    (why,) = rec["retry_reasons"]
    assert why.startswith("WorkerGroupError: lost Train worker(s) (rank 0: a worker health"), why
    # The second attempt started from the checkpoint: Tune saw step 2 once, and the steps go on
    # from a checkpoint's step to the last one (a restart from 0 would report 2, 4, ... again).
    steps = _tune_steps(sdir, rec["trial_id"])
    assert steps.count(2) == 1 and steps[-1] == 20, steps
    # The run's metrics are one clean run: every step once, the final report completed.
    metrics = [json.loads(x) for x in (Path(rec["run_dir"]) / "metrics.jsonl").open()]
    run_steps = [m["step"] for m in metrics if m.get("status") == "running"]
    assert run_steps == list(range(2, 21, 2)), run_steps
    assert metrics[-1]["final"] and metrics[-1]["status"] == "completed"
    # The study says so too.
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{sdir / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["retries"] == 1 and trial.user_attrs["retry_reasons"] == [why]


@pytest.mark.slow
def test_a_killed_train_worker_without_retries_fails_the_trial_with_the_reason(
    tmp_path: Path,
) -> None:
    rec, sdir, out = _search_with_a_killed_worker(tmp_path, max_retries=0)
    assert rec["status"] == "failed", out[-4000:]
    assert "WorkerGroupError" in rec["reason"] and "health check" in rec["reason"], rec["reason"]
    assert rec.get("retries", 0) == 0
    study = optuna.load_study(study_name="k", storage=f"sqlite:///{sdir / 'study.db'}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert "health check" in trial.user_attrs["reason"]


# --------------------------------------------------------------------------- a killed driver


@pytest.mark.parametrize("uri", [False, True], ids=["local", "uri"])
def test_run_dirs_without_a_record_are_set_aside_and_study_orphans_closed(
    tmp_path: Path, uri: bool
) -> None:
    """What a SIGKILLed driver leaves (a trial launched after Tune's last snapshot: a run
    directory without a record, a RUNNING study trial) is closed with a reason at the end of the
    resumed search; a finished trial's run stays where it is. On URI storage (pyarrow's local
    filesystem through ``local://``, handled like s3://) the runs are their homes in the storage."""
    sdir = SearchDir(f"local://{tmp_path}" if uri else str(tmp_path), "s")
    sdir.write_json("search.json", {"name": "s"})
    for tid in ("done", "lost"):
        sdir.store.write_atomic(
            f"runs/{tid}/metrics.jsonl", [b'{"step": 2, "loss": 1.0, "status": "running"}\n']
        )
    sdir.write_record(
        TrialRecord(trial_id="done", status="completed", run_dir=sdir.run_uri("done"))
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.ask()
    assert set_aside_dropped_runs(sdir) == ["lost"]
    close_study_orphans(storage, "s")
    assert (tmp_path / "s" / "runs" / "done" / "metrics.jsonl").is_file()
    assert not (tmp_path / "s" / "runs" / "lost").exists()
    dropped = tmp_path / "s" / DROPPED_DIR / "lost"
    assert (dropped / "metrics.jsonl").is_file()
    assert json.loads((dropped / DROPPED_FILE).read_text())["reason"] == ORPHAN_REASON
    (trial,) = optuna.load_study(study_name="s", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs == {"status": "orphaned", "reason": ORPHAN_REASON}


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_process_of_its_own_local_ray(tmp_path: Path) -> None:
    """A search with no cluster to attach to starts a Ray of its own; SIGKILL its driver while a
    trial trains: within 30 s no process of that Ray (found by its private temp dir, RAY_TMPDIR)
    is left, the dashboard and runtime-env agents included."""
    ray_tmp = tempfile.mkdtemp(prefix="prk", dir="/tmp")  # short: AF_UNIX path limit
    storage = tmp_path / "st"
    cmd = [
        sys.executable,
        "-m",
        "plora_ray.cli",
        "search",
        str(SMOKE),
        "--storage",
        str(storage),
        "--name",
        "d",
        "--set",
        *ONE_LONG_TRAIN_TRIAL,
    ]
    env = {**helpers.ray_defaults_env(), "RAY_TMPDIR": ray_tmp}
    log = tmp_path / "search.log"
    try:
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None:
                if list((storage / "d" / "runs").glob("*/metrics.jsonl")):
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "the search ended before the kill:\n" + log.read_text()
            assert session_processes(ray_tmp), "the search's Ray is not under RAY_TMPDIR"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        deadline = time.time() + 30
        while session_processes(ray_tmp) and time.time() < deadline:
            time.sleep(0.5)
        assert session_processes(ray_tmp) == [], log.read_text()[-3000:]
    finally:
        helpers.stop_processes_of(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
