"""Shared test helpers that start real Ray: a loopback head of our own, and the one smoke search
of a pytest session, submitted with `ray job submit` (jobs/smoke.sh) the way users submit it.

The jobs test checks the submission itself; the leaderboard tests build their boards from the
same finished search, so CI pays for one smoke search, not two (nor one per pytest-xdist
worker: the workers share it through their common base temp directory and a file lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plora_ray.ray_watchdog import stop_session

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE_YAML = ROOT / "search_spaces" / "smoke.yaml"
# The shipped smoke search, shrunk with --set to fit CI's budget (4 trials of 4 steps, a tiny
# evaluation): the same search space, trainer, evaluation, ASHA and publishing, less compute.
# The two fixed points make sure the board has a PLoRA trial and its LoRA baseline of the same rank.
# ASHA's first rung (grace_period 64 samples) lies beyond these 32-sample trials, so which trials
# complete does not depend on the order in which concurrent trials reach a rung; ASHA's stopping
# is checked on its own, deterministically (tests/test_search.py).
SMOKE_SETS = [
    "search.num_samples=4",
    "train.max_steps=4",
    "eval.limit=2",
    "eval.max_gen_toks=8",
    "data.max_samples=64",
    "plora.unload_every=16",
    # 16-sample intervals so a 4-step trial of batch 8 unloads; the shipped space offers 32 and 64.
    "search.params.plora.unload_every={distribution: choice, values: [16, 32], "
    "when: {method: plora}}",
    "search.scheduler.grace_period=64",
    "search.points=[{method: plora, optim.lr: 0.001, lora.rank: 8, plora.momentum: 0.1, "
    "plora.unload_every: 16}, {method: lora, optim.lr: 0.001, lora.rank: 8}]",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_defaults_env() -> dict[str, str]:
    """This process's environment with Ray's defaults restored: no RAY_AUTH_MODE (Ray 2.60 then
    turns token auth on wherever a token exists), no RAY_ADDRESS, and the venv's bin/ off PATH,
    as for a user who runs `.venv/bin/ray` and `jobs/*.sh` without activating the venv (README)."""
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    if BIN != ROOT / ".venv" / "bin":
        # A venv outside the checkout: jobs/submit_env.sh cannot find it, so it stays on PATH
        # (as it would for a user who activated it).
        path.insert(0, str(BIN))
    env["PATH"] = os.pathsep.join(path)
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 4) -> Iterator[dict[str, str]]:
    """A Ray head of our own on loopback: free ports for everything that has a fixed default
    (other sessions run heads on this machine too), a private --temp-dir, and `ray stop` scoped to
    that temp dir on the way out. Yields the addresses a client needs.

    The head runs with Ray's default auth mode and a token present (`ray get-auth-token
    --generate`, what the first local `ray.init()` does), so it requires token auth as a user's
    head does; it is started as `.venv/bin/ray start` without the venv on PATH."""
    # Short path: Ray's socket paths must stay under the 107-byte limit of AF_UNIX.
    temp = tempfile.mkdtemp(prefix="prh", dir="/tmp")
    port, dash = free_port(), free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--num-cpus={num_cpus}",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
    ]
    env = ray_defaults_env()
    token = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if token.returncode != 0:
        raise RuntimeError(f"ray get-auth-token failed:\n{token.stderr}")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    if out.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
    try:
        _wait_for_job_agent(f"http://127.0.0.1:{dash}", env)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    finally:
        # `ray stop` with no address stops every Ray on the machine; only stop what we started:
        # the processes whose command line names our private temp dir / session.
        stop_processes_of(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_job_agent(dashboard: str, env: dict[str, str], timeout_s: float = 120.0) -> None:
    """Wait until the head accepts jobs.

    `ray start` returns before the head node's dashboard agent has registered; a job submitted in
    that window fails at once with "No available agent to submit job" (seen on a loaded 2-core
    machine). A no-op job is submitted until one is accepted.
    """
    env = dict(env, RAY_AUTH_MODE="token")
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--no-wait", "--", "true"]
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if out.returncode == 0:
            return
        text = out.stdout + out.stderr
        if "No available agent" not in text or time.time() > deadline:
            raise RuntimeError(f"the head at {dashboard} does not accept jobs:\n{text[-3000:]}")
        time.sleep(1.0)


def stop_processes_of(root: str) -> None:
    """SIGTERM, then SIGKILL, every process of ours whose command line names ``root`` or that
    has a file open under it: a Ray head's services and its workers, including a worker whose
    interpreter hangs at exit after Ray shut down (seen with a Train controller)."""
    stop_session(root)


@dataclass
class SmokeJob:
    search_dir: Path
    returncode: int
    log: str


def smoke_job_search(tmp_path_factory: pytest.TempPathFactory) -> SmokeJob:
    """Submit the (shrunk) smoke search with jobs/smoke.sh to a loopback head of our own, once
    per pytest session; later callers get the cached result (the log and exit code are kept in
    the session's base temp directory)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the session's xdist workers (popen-gw0, popen-gw1, ...)
    storage = base / "smoke-job"
    storage.mkdir(parents=True, exist_ok=True)
    with open(base / "smoke-job.lock", "w") as lock:
        # The first worker to get here runs the search; the others wait for its result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _smoke_job_search(storage)


def _smoke_job_search(storage: Path) -> SmokeJob:
    log_file, rc_file = storage / "job.log", storage / "RETURNCODE"
    if rc_file.exists():
        return SmokeJob(storage / "smoke", int(rc_file.read_text()), log_file.read_text())
    with ray_head(num_cpus=4) as head:
        # Submitted as README says, with Ray's defaults: no RAY_AUTH_MODE (jobs/submit_env.sh
        # finds the token), the venv not activated (the script finds .venv/bin/ray).
        env = {
            **ray_defaults_env(),
            "RAY_ADDRESS": head["dashboard"],
            "PLORA_STORAGE": str(storage),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = ["bash", str(ROOT / "jobs" / "smoke.sh"), "--name", "smoke", "--set", *SMOKE_SETS]
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
            )
            rc, log = out.returncode, out.stdout + out.stderr
        except subprocess.TimeoutExpired as exc:
            rc = -1
            log = f"timed out after {exc.timeout} s\n{exc.stdout or ''}{exc.stderr or ''}"
    log_file.write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    rc_file.write_text(str(rc))
    return SmokeJob(storage / "smoke", rc, log_file.read_text())


def finished_smoke_search(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The search directory of the session's smoke search; fails the caller if the job failed."""
    job = smoke_job_search(tmp_path_factory)
    if job.returncode != 0:
        pytest.fail(f"the smoke search job exited {job.returncode}:\n{job.log[-3000:]}")
    return job.search_dir


def load_records(search_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((search_dir / "trials").glob("*.json"))]
