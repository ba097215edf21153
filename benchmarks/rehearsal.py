"""Rehearse the production path on this CPU: the shipped 7B searches, a 7B-wide checkpoint on disk,
``ray job submit`` to a cluster of two loopback nodes, 2-worker trials across both nodes.

    python -m benchmarks.rehearsal [--quick] [--out benchmarks/results/rehearsal.json]

One command: it writes the rehearsal model (``plora_ray.rehearsal_model``: LLaMA-7B's widths, 2
layers, sharded safetensors, a tokenizer without a chat template), starts two Ray nodes of its own
on 127.0.0.1 (each ``ray start`` with its own temp dir; the head takes the job's entrypoint, each
node has CPU for exactly one training worker, so Ray Train's two workers land one per node),
submits ``jobs/llama7b_plora.sh`` and ``jobs/paper_table1.sh`` as a user would (``PLORA_MODEL``,
``PLORA_STORAGE``, Ray's default token auth), waits, checks, and stops only the processes of the
nodes it started. Checked per search: the job exits 0, every trial completed, the leaderboard is
published, the storage check accepted the shared path, and each exported model loads with
``from_pretrained`` and equals, bit for bit, W_0 + every unload's merge + the final adapter
recomputed from the run's own final checkpoint. The JSON has the time of each search and the peak
RSS (``VmHWM``) of every Ray Train worker and its node.

The ``--set`` overrides (``REHEARSAL_SETS``) shrink the run (steps, batch, sequence length,
evaluation size, trial count, CPUs) and make two changes of substance, said where they are set:
fp32 compute, because this CPU multiplies bf16 ~200x slower than fp32 (the checkpoint on disk stays
bf16), and ZeRO-3 for the 7B PLoRA search, because the ZeRO-3 trial of paper_table1 (full
fine-tuning) needs ~11 GB of fp32 weights, gradients and Adam states at these widths, more than
this shared machine gives the rehearsal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoModelForCausalLM

from benchmarks.common import parse_args, write_result
from plora_ray.checkpoint import load_backbone
from plora_ray.checkpoint_load import check_deepspeed_checkpoint, load_pickled_state
from plora_ray.merge import safetensors_base_weights
from plora_ray.ray_watchdog import holds_files_under, session_processes, stop_session
from plora_ray.rehearsal_model import write_rehearsal_model
from plora_ray.store import SearchDir

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULT = ROOT / "benchmarks" / "results" / "rehearsal.json"

# Both searches: a few steps of a small batch, short sequences, one document per evaluation
# (sub)task, and CPU resources sized so one worker fits per node (see TwoNodeCluster).
COMMON_SETS = [
    "train.max_steps=4",
    "batch.global_batch=2",
    "batch.micro_batch=1",
    "data.max_length=256",  # shorter drops most GSM8K dialogues (their answers truncated away)
    "data.max_samples=64",
    "data.held_out=4",
    "eval.limit=1",
    "eval.max_gen_toks=4",
    "eval.batch_size=4",
    "eval.proxy_samples=2",
    "resources.gpus_per_worker=0",
    # One worker per node: a node has 1 free CPU, a worker takes 0.99, the trial's driver 0.01
    # (Tune refuses 0), so wherever the driver goes, two workers never fit on one node.
    "resources.cpus_per_worker=0.99",
    "search.driver_cpus=0.01",
    "search.max_concurrent=1",
    # This CPU (no AVX512-BF16) multiplies bf16 at ~0.25 GFLOP/s against ~46 in fp32; the
    # checkpoint stays bf16 on disk and from_base still reads W_0 from its shards.
    "model.dtype=float32",
    "deepspeed.bf16=false",
]
# An unload every 2 steps of 2 samples: unloads at steps 2 and 4, the last one a checkpoint
# that the export check reads the final adapter from.
UNLOAD_EVERY = 4
SPACES: dict[str, dict[str, Any]] = {
    "llama7b_plora": {
        "lora": (8, 16),
        "sets": [
            "search.num_samples=1",
            # The paper's point first (the one trial), its interval cut with the steps.
            "search.points=[{plora.unload_every: 4, plora.momentum: 0.1, lora.rank: 8, "
            "lora.alpha: 16, optim.lr: 1.0e-4}]",
            "search.params.plora.unload_every.low=2",
            "search.params.plora.unload_every.high=8",
            "search.params.plora.unload_every.q=2",
            # MMLU 0-shot: 57 subjects of 5-shot prompts are ~1 h of CPU at these widths.
            "eval.num_fewshot={gsm8k: 0, mmlu: 0}",
            # ZeRO-3 here instead of paper_table1's full fine-tuning (module docstring).
            "deepspeed.zero_stage=3",
        ],
    },
    "paper_table1": {
        "lora": (1, 16),
        "sets": [
            f"plora.unload_every={UNLOAD_EVERY}",
            # One trial of the grid, its PLoRA rank-1 cell, on 2 workers instead of 8.
            "search.num_samples=1",
            "search.points=[{method: plora, lora.rank: 1}]",
            "resources.num_workers=2",
        ],
    },
}
# --quick (the CI test): one search, one trial, GSM8K only (the 57 MMLU subjects are minutes).
QUICK_SETS = [
    "eval.tasks=[gsm8k]",
    "search.objective={weighted: {gsm8k: 1.0}, direction: maximize}",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ray_env() -> dict[str, str]:
    """This environment with Ray's defaults (no RAY_AUTH_MODE / RAY_ADDRESS), as a user's shell."""
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    env.pop("RAY_ADDRESS", None)
    return env


def _node_ports() -> list[str]:
    """Free ports for a node's services (other Rays run on this machine; no fixed defaults)."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


@dataclass
class TwoNodeCluster:
    """Addresses of a running loopback cluster (``two_node_cluster``)."""

    gcs: str
    dashboard: str
    temps: list[str]  # the head's temp dir, then one per further node

    def add_node(self, num_cpus: float, env: dict[str, str] | None = None) -> str:
        """Start one more node (e.g. the replacement of a lost one); its temp dir.

        Raises:
            RuntimeError: ``ray start`` failed.
        """
        temp = tempfile.mkdtemp(prefix="prr", dir="/tmp")
        self.temps.append(temp)  # stopped with the cluster
        cmd = [
            str(BIN / "ray"),
            "start",
            f"--address={self.gcs}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *_node_ports(),
        ]
        # A joining node sends the token only with RAY_AUTH_MODE=token (the head turns auth on
        # by itself when a token exists).
        full_env = {**ray_env(), "RAY_AUTH_MODE": "token", **(env or {})}
        out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=240)
        if out.returncode != 0:
            raise RuntimeError(f"ray start --address failed:\n{out.stdout}\n{out.stderr}")
        return temp


def kill_node(temp: str) -> list[int]:
    """SIGKILL every process of one node (a node lost at once, no drain); the PIDs killed."""
    pids = session_processes(temp)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


@contextlib.contextmanager
def two_node_cluster(
    head_cpus: float = 2, node_cpus: float = 1, node_env: dict[str, str] | None = None
) -> Iterator[TwoNodeCluster]:
    """A head and a second node on 127.0.0.1, each a ``ray start`` with its own temp dir and free
    ports, token auth on as Ray's default with a token present; both stopped on the way out.

    The head has a custom resource ``head`` (the job's entrypoint is pinned there with
    ``--entrypoint-resources``) and ``head_cpus`` CPUs: 1 for the entrypoint, the rest for one
    worker; the second node has ``node_cpus`` (one worker).

    Args:
        head_cpus: the head's CPUs.
        node_cpus: the second node's CPUs.
        node_env: extra environment of the second node's Ray (its workers inherit it).

    Raises:
        RuntimeError: a node did not start or the head does not accept jobs.
    """
    env = ray_env()
    token = subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if token.returncode != 0:
        raise RuntimeError(f"ray get-auth-token failed:\n{token.stderr}")
    # Short paths: Ray's socket paths must stay under AF_UNIX's 107 bytes.
    head_temp = tempfile.mkdtemp(prefix="prr", dir="/tmp")
    port, dash = free_port(), free_port()
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}",
        f"--num-cpus={head_cpus}",
        '--resources={"head": 1}',
        "--disable-usage-stats",
        f"--temp-dir={head_temp}",
        *_node_ports(),
    ]
    cluster = TwoNodeCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", [head_temp])
    try:
        out = subprocess.run(head, capture_output=True, text=True, env=env, timeout=240)
        if out.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{out.stdout}\n{out.stderr}")
        cluster.add_node(node_cpus, node_env)
        _wait_for_nodes(cluster, env)
        yield cluster
    finally:
        for temp in reversed(cluster.temps):
            stop_session(temp)
            shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(cluster: TwoNodeCluster, env: dict[str, str], timeout_s: float = 180) -> None:
    """Until the head accepts a job that sees both nodes alive (``ray start`` returns before the
    head's job agent registers: "No available agent to submit job")."""
    probe = "import ray; ray.init(); assert sum(n['Alive'] for n in ray.nodes()) == 2"
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster.dashboard,
        "--",
        sys.executable,
        "-c",
        probe,
    ]
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env={**env, "RAY_AUTH_MODE": "token"}, timeout=240
        )
        if out.returncode == 0:
            return
        if time.time() > deadline:
            text = (out.stdout + out.stderr)[-3000:]
            raise RuntimeError(f"the cluster at {cluster.dashboard} is not ready:\n{text}")
        time.sleep(2.0)


@dataclass
class PeakRss:
    """Samples the peak RSS (``VmHWM``) of the Ray Train workers of our nodes every ``every_s``."""

    temps: list[str]
    every_s: float = 2.0
    peaks: dict[int, dict[str, Any]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _sample(self) -> None:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="ignore")
                if not cmd.startswith("ray::RayTrainWorker"):
                    continue
                status = (d / "status").read_text()
            except OSError:
                continue
            hwm = next((ln for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
            node = next((i for i, t in enumerate(self.temps) if holds_files_under(d, t)), None)
            if hwm is None or node is None:
                continue
            kib = int(hwm.split()[1])
            prev = self.peaks.get(int(d.name), {}).get("peak_rss_mib", 0.0)
            self.peaks[int(d.name)] = {
                "pid": int(d.name),
                "node": ["head", "second"][node] if node < 2 else f"node{node}",
                "peak_rss_mib": max(prev, round(kib / 1024, 1)),
            }

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    @contextlib.contextmanager
    def running(self) -> Iterator[PeakRss]:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def newest_final_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint directory (``ray/step_N`` holding ``state.json``)."""
    found = sorted(run_dir.glob("ray/step_*/state.json"), key=lambda p: p.parent.name)
    return found[-1].parent if found else None


def checkpoint_adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    """The trainable weights a checkpoint holds: DeepSpeed's fp32 masters (gathered across the
    ZeRO partitions by DeepSpeed's own ``zero_to_fp32``) or, without DeepSpeed, ``trainable.pt``'s
    module weights; each file is checked as a resume checks it before anything is unpickled."""
    if (ckpt / "deepspeed").is_dir():
        check_deepspeed_checkpoint(ckpt / "deepspeed")
        return dict(
            get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt / "deepspeed"), tag="engine", exclude_frozen_parameters=True
            )
        )
    return dict(load_pickled_state(ckpt / "trainable.pt")["model"])


def export_matches_run(model_path: Path, base_dir: Path, scaling: float) -> dict[str, Any]:
    """Load the exported model with ``from_pretrained`` and compare every weight with what the
    run's own final checkpoint says it must be: each LoRA target W_0 + Σ unload merges + the
    final adapter (recomputed from the stored factors), every other weight W_0.

    Args:
        model_path: the trial's exported model directory.
        base_dir: the base model directory (W_0's shards).
        scaling: the trial's LoRA alpha / rank.
    """
    run_dir = model_path.parent
    ckpt = newest_final_checkpoint(run_dir)
    if ckpt is None:
        return {"ok": False, "why": f"no checkpoint (ray/step_N/state.json) under {run_dir}"}
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    got = {k: v.detach() for k, v in model.state_dict().items()}
    w0 = safetensors_base_weights(base_dir)
    records, _ = load_backbone(ckpt / "backbone")
    adapter = checkpoint_adapter(ckpt)
    mismatched, targets = [], set()
    for ld in records[-1].layers if records else []:
        prefix = ld.name.removesuffix(".base_layer.weight")
        bs = [r.layers[ld.layer_index].coef * r.layers[ld.layer_index].B for r in records]
        as_ = [r.layers[ld.layer_index].A for r in records]
        bs.append(scaling * adapter[prefix + ".lora_B.default.weight"].float())
        as_.append(adapter[prefix + ".lora_A.default.weight"].float())
        w = got[ld.base_name]
        want = (w0(ld.base_name).float() + torch.cat(bs, 1) @ torch.cat(as_, 0)).to(w.dtype)
        targets.add(ld.base_name)
        if not torch.equal(w, want):
            mismatched.append(ld.base_name)
    for name, w in got.items():
        if name not in targets and not torch.equal(w, w0(name).to(w.dtype)):
            mismatched.append(name)
    shards = sorted(p.name for p in model_path.glob("*.safetensors"))
    return {
        "ok": bool(records) and not mismatched,
        "checkpoint": str(ckpt),
        "unloads": len(records),
        "targets_checked": len(targets),
        "weights_checked": len(got),
        "mismatched": mismatched[:10],
        "export_files": shards,
        "export_index": (model_path / "model.safetensors.index.json").exists(),
    }


def run_space(
    space: str, sets: list[str], cluster: TwoNodeCluster, model_dir: Path, storage: Path
) -> dict[str, Any]:
    """Submit one search with its job script, wait, and check what it left."""
    env = {
        **ray_env(),
        "RAY_ADDRESS": cluster.dashboard,
        "PLORA_STORAGE": str(storage),
        "PLORA_MODEL": str(model_dir),
        "RAY_JOB_ARGS": '--entrypoint-resources {"head":0.01}',
        "PYTHONUNBUFFERED": "1",
    }
    cmd = ["bash", str(ROOT / "jobs" / f"{space}.sh"), "--name", space, "--set", *sets]
    peaks = PeakRss(cluster.temps)
    t0 = time.time()
    with peaks.running():
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=7200)
    seconds = time.time() - t0
    log = out.stdout + out.stderr
    (storage / f"{space}.job.log").write_text(log)
    sdir = SearchDir(str(storage), space)
    records = sdir.records() if sdir.exists() else []
    lora_rank, lora_alpha = SPACES[space]["lora"]
    exports = []
    for r in records:
        if not r.model_path:
            continue
        try:
            check = export_matches_run(Path(r.model_path), model_dir, lora_alpha / lora_rank)
        except Exception as exc:  # reported in the JSON; the other checks still run
            check = {"ok": False, "why": f"{type(exc).__name__}: {exc}"}
        exports.append({"trial": r.trial_id, **check})
    workers = sorted(peaks.peaks.values(), key=lambda w: w["pid"])
    board = Path(sdir.path) / "leaderboard" / "index.html"
    result = {
        "space": space,
        "sets": sets,
        "job_exit_code": out.returncode,
        "seconds": round(seconds, 1),
        "trials": [{"id": r.trial_id, "status": r.status, "reason": r.reason} for r in records],
        "leaderboard": board.exists(),
        "exports": exports,
        "workers": workers,
        "worker_nodes": sorted({w["node"] for w in workers}),
        "log_tail": log[-2000:],
    }
    result["ok"] = bool(
        out.returncode == 0
        and records
        and all(r.status == "completed" for r in records)
        and board.exists()
        and exports
        and all(e["ok"] for e in exports)
        and result["worker_nodes"] == ["head", "second"]
    )
    return result


def rehearse(quick: bool, work: Path) -> dict[str, Any]:
    """Make the model, start the cluster, run the searches, check; the per-search results."""
    model_dir = work / "llama7b-2layer"
    if not (model_dir / "model.safetensors.index.json").exists():
        write_rehearsal_model(model_dir, num_layers=2, seed=0)
    storage = work / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    spaces = ["llama7b_plora"] if quick else list(SPACES)
    results = []
    with two_node_cluster() as cluster:
        for space in spaces:
            sets = COMMON_SETS + SPACES[space]["sets"] + (QUICK_SETS if quick else [])
            if quick:
                sets = [s for s in sets if not s.startswith("eval.num_fewshot")]
            results.append(run_space(space, sets, cluster, model_dir, storage))
    return {"model_dir": str(model_dir), "searches": results}


def main(argv: list[str] | None = None) -> None:
    t0 = time.time()
    args = parse_args(__doc__.split("\n", 1)[0], argv)
    work = Path(os.environ.get("PLORA_REHEARSAL_DIR") or tempfile.mkdtemp(prefix="rehearsal-"))
    details = rehearse(args.quick, work)
    searches = details["searches"]
    headline = {
        "ok": all(s["ok"] for s in searches),
        "total_s": round(time.time() - t0, 1),
        **{f"{s['space']}_s": s["seconds"] for s in searches},
        "peak_worker_rss_mib": max(
            (w["peak_rss_mib"] for s in searches for w in s["workers"]), default=None
        ),
    }
    out = args.out if args.out is not None else (None if args.quick else RESULT)
    write_result("rehearsal", args.quick, headline, details, out, t0)
    if not headline["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
