"""jobs/: the smoke search submitted with `ray job submit` (jobs/smoke.sh) to a real local Ray
head on loopback, waited for, and its finished trials and published results checked."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = {"completed", "early_stopped", "diverged", "failed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[dict[str, str]]:
    """A Ray head of our own on loopback: free ports for everything that has a fixed default
    (other sessions run heads on this machine too), a private --temp-dir, and `ray stop` scoped to
    that temp dir on the way out. Yields the env vars a client needs."""
    # Short path: Ray's socket paths must stay under the 107-byte limit of AF_UNIX.
    temp = tempfile.mkdtemp(prefix="prh", dir="/tmp")
    port, dash = free_port(), free_port()
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp}"]
    # Token auth off on both sides: a loopback-only head, and clients (ray job submit, drivers)
    # must agree with the head on the mode whatever ~/.ray holds on this machine.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if out.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
    try:
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp,
               "auth_mode": "disabled"}
    finally:
        # `ray stop` with no address stops every Ray on the machine; only stop what we started:
        # the processes whose command line names our private temp dir / session.
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: str) -> None:
    import signal
    import time

    def ours() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            except OSError:
                continue
            if temp in cmdline and int(d.name) != os.getpid():
                pids.append(int(d.name))
        return pids

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while ours() and time.time() < deadline:
            time.sleep(0.2)


def test_job_scripts_are_valid_bash_and_name_their_space() -> None:
    for space in ("smoke", "paper_table1", "llama7b_plora"):
        script = ROOT / "jobs" / f"{space}.sh"
        assert os.access(script, os.X_OK), script
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        text = script.read_text()
        assert "ray job submit" in text and f"search_spaces/{space}.yaml" in text
        assert 'RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"' in text
        assert "PLORA_STORAGE" in text and "--runtime-env jobs/runtime_env.yaml" in text
    import yaml

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])


@pytest.mark.slow
def test_smoke_search_submitted_as_a_ray_job_finishes_and_publishes(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    with ray_head(num_cpus=4) as head:
        env = {**os.environ, "RAY_ADDRESS": head["dashboard"], "PLORA_STORAGE": str(storage),
               "RAY_AUTH_MODE": head["auth_mode"],
               "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        # Shrunk with --set so the test stays within its time budget: 3 trials of 4 steps.
        cmd = ["bash", str(ROOT / "jobs" / "smoke.sh"), "--name", "job",
               "--set", "search.num_samples=3", "train.max_steps=4", "eval.limit=2",
               "eval.max_gen_toks=8", "data.max_samples=64", "plora.unload_every=16",
               "search.scheduler.grace_period=16", "search.points=[]"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=420, cwd=ROOT)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
    sdir = storage / "job"
    search = json.loads((sdir / "search.json").read_text())
    assert search["name"] == "job" and search["metrics"] == ["gsm8k_nll"]
    records = [json.loads(p.read_text()) for p in sorted((sdir / "trials").glob("*.json"))]
    assert len(records) == 3
    assert {r["status"] for r in records} <= TERMINAL
    assert any(r["status"] == "completed" for r in records)
    for r in records:
        assert r["search"] == "job" and r["config"]["train"]["max_steps"] == 4
        assert r["method"] in ("plora", "lora") and r["params"]["method"] == r["method"]
        if r["status"] == "completed":
            assert r["objectives"]["gsm8k_nll"] > 0 and r["objective_value"] is not None
            assert r["loss_curve"] and r["wall_time_s"] > 0
        # One summary line per finished trial in the job's output.
        assert f"[trial {r['trial_id']}] {r['status']}" in log
    assert (sdir / "study.db").is_file()
    # The study agrees with the records: completed -> COMPLETE with its value, stopped by ASHA ->
    # PRUNED, failed/diverged -> FAIL.
    import optuna

    study = optuna.load_study(study_name="job", storage=f"sqlite:///{sdir / 'study.db'}")
    by_tune = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    state_of = {"completed": optuna.trial.TrialState.COMPLETE,
                "early_stopped": optuna.trial.TrialState.PRUNED,
                "diverged": optuna.trial.TrialState.FAIL, "failed": optuna.trial.TrialState.FAIL}
    for r in records:
        assert by_tune[r["trial_id"]].state == state_of[r["status"]], (r["status"], r["reason"])
        if r["status"] == "completed":
            assert by_tune[r["trial_id"]].value == r["objective_value"]
    board = sdir / "leaderboard"
    assert board.is_dir() and any(board.iterdir()), "leaderboard not published"
