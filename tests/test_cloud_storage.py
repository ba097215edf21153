"""A search on cloud-like storage across two loopback nodes: everything a trial produces that the
search driver needs reaches it through the storage, never through a node-local path.

The storage is ``local://<dir>``: pyarrow's LocalFileSystem through a URI. The project treats it
as any cloud URI (``store.is_uri``: trials write into node-local scratch and ``run_sync`` carries
the run to the storage; Ray Tune and Ray Train persist through pyarrow), so it drives the code
path of s3:// and gs:// without a cloud. Each node has a scratch directory of its own
(``PLORA_SCRATCH`` in its Ray's environment), so a path that leaks from one node's scratch into a
record is caught. The trial's driver and its Ray Train worker are forced onto different nodes: each
node has one CPU, and the trial's driver and its worker take one each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from transformers import AutoModelForCausalLM

from benchmarks.rehearsal import ray_env, two_node_cluster
from plora_ray.run_sync import CHECKPOINT_COMPLETE, RunSync
from plora_ray.store import Store

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

# One PLoRA trial trained by a Ray Train run of its own: 4 steps, a checkpoint every 2, an unload
# at step 4 (32 samples), a tiny evaluation and the merged model exported.
ONE_TRAIN_TRIAL = [
    "search.num_samples=1",
    "search.max_concurrent=1",
    "search.trial_executor=train",
    "search.scheduler=none",
    "search.driver_cpus=1",
    "train.max_steps=4",
    "train.log_every=2",
    "checkpoint.every_steps=2",
    "eval.limit=2",
    # GSM8K only (the objective): MMLU's 57 subjects would cost more than the training.
    "eval.tasks=[gsm8k]",
    "eval.num_fewshot={gsm8k: 0}",
    "eval.max_gen_toks=8",
    "data.max_samples=64",
    "search.points=[{method: plora, optim.lr: 0.001, lora.rank: 4, plora.momentum: 0.1, "
    "plora.unload_every: 32}]",
]


def _run_files(scratch: Path) -> set[str]:
    """Names of the files and folders of every trial run in a node's scratch directory."""
    return {p.name for p in scratch.glob("*/*/*")}


@pytest.mark.slow
def test_search_on_uri_storage_across_two_nodes_reaches_the_driver_through_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = tmp_path / "bucket"
    storage = f"local://{bucket}"
    head_scratch, node_scratch = tmp_path / "scratch-head", tmp_path / "scratch-node2"
    # The head's Ray and the search driver inherit this; the second node gets its own.
    monkeypatch.setenv("PLORA_SCRATCH", str(head_scratch))
    with two_node_cluster(
        head_cpus=1, node_cpus=1, node_env={"PLORA_SCRATCH": str(node_scratch)}
    ) as cluster:
        env = {**ray_env(), "RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "token"}
        cmd = [sys.executable, "-m", "plora_ray.cli", "search", str(SMOKE)]
        cmd += ["--storage", storage, "--name", "cloud", "--set", *ONE_TRAIN_TRIAL]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]

    search = Store(f"{storage}/cloud")
    names = [n for n in search.list_names("trials") if n.endswith(".json")]
    assert len(names) == 1, (names, log[-3000:])
    rec = json.loads(search.read_text("trials", names[0]))
    assert rec["status"] == "completed", (rec["reason"], log[-3000:])
    run_uri = f"{storage}/cloud/runs/{rec['trial_id']}"
    # The record names the storage, never a node's scratch directory.
    assert rec["run_dir"] == run_uri
    assert rec["model_path"] == f"{run_uri}/model"
    assert rec["checkpoint_path"].startswith(f"{run_uri}/ray/step_")
    assert "scratch" not in json.dumps(rec)
    assert rec["loss_curve"] and rec["objectives"]

    # The trial's driver and its worker ran on different nodes: one scratch copy holds the
    # worker's files (the exported model), the other only the driver's.
    head_files, node_files = _run_files(head_scratch), _run_files(node_scratch)
    worker, driver = (head_files, node_files) if "model" in head_files else (node_files, head_files)
    assert "model" in worker and "model" not in driver, (head_files, node_files)
    assert "attempts.jsonl" in driver and "attempts.jsonl" not in worker

    # The run reached the storage: its reports, Ray Train's checkpoints, the exported model.
    run = Store(run_uri)
    assert any(
        json.loads(line).get("final") for line in run.read_text("metrics.jsonl").splitlines()
    )
    assert run.exists("ray", "checkpoint_manager_snapshot.json")
    assert run.exists(*rec["checkpoint_path"][len(run_uri) + 1 :].split("/"))
    # The board, published by the search driver from the records in the storage.
    board = json.loads(search.read_text("leaderboard", "leaderboard.json"))
    assert rec["trial_id"] in json.dumps(board)

    # The model path is a URI that loads: fetched through pyarrow, opened by transformers.
    fs, path = pafs.FileSystem.from_uri(rec["model_path"])
    local = tmp_path / "model"
    local.mkdir()
    pafs.copy_files(path, str(local), source_filesystem=fs)
    model = AutoModelForCausalLM.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert os.path.isfile(local / "config.json")


def test_checkpoint_pushed_from_one_node_is_resumed_on_another_and_a_cut_upload_never_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_in_process``'s checkpoints travel through the storage: node A pushes them (each one's
    marker last), node B (another scratch directory) pulls the newest complete one; a checkpoint
    whose upload was cut (no marker) is never pulled, and the storage keeps what the run keeps."""
    sync = RunSync(f"local://{tmp_path}/bucket/search", "t1")
    monkeypatch.setenv("PLORA_SCRATCH", str(tmp_path / "node-a"))
    a = sync.mirror()
    for step in (2, 4):
        ckpt = a.local / "ray" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.bin").write_bytes(bytes([step]) * 10)
    (a.local / "metrics.jsonl").write_text('{"step": 4}\n')
    (a.local / ".process_groups").mkdir()
    (a.local / ".process_groups" / "1.json").write_text("{}")
    a.push(checkpoints=True)
    # The run pruned step 2 and wrote step 6; step 8's upload is cut before its marker.
    (a.local / "ray" / "step_000002" / "state.bin").unlink()
    (a.local / "ray" / "step_000002").rmdir()
    (a.local / "ray" / "step_000006").mkdir()
    (a.local / "ray" / "step_000006" / "state.bin").write_bytes(b"\x06" * 10)
    a.push(checkpoints=True)
    run = Store(sync.uri)
    run.write_atomic("ray/step_000008/state.bin", [b"\x08" * 3])
    assert a.complete_checkpoints() == ["step_000004", "step_000006"]
    assert not run.exists("ray", "step_000002")  # the storage keeps what the run keeps
    assert not run.exists(".process_groups")  # node-local bookkeeping stays on the node
    assert run.exists("ray", "step_000006", CHECKPOINT_COMPLETE)

    monkeypatch.setenv("PLORA_SCRATCH", str(tmp_path / "node-b"))
    b = sync.mirror()
    assert b.local != a.local and not b.local.exists()
    assert b.holds_run()
    b.pull(checkpoint=True)
    assert sorted(p.name for p in (b.local / "ray").iterdir()) == ["step_000006"]
    assert (b.local / "ray" / "step_000006" / "state.bin").read_bytes() == b"\x06" * 10
    assert (b.local / "metrics.jsonl").read_text() == '{"step": 4}\n'
    # Paths reported from either node's scratch copy name the storage.
    assert b.uri_of(str(a.local / "model")) == f"{sync.uri}/model"
    assert b.uri_of(str(b.local / "ray" / "step_000006")) == f"{sync.uri}/ray/step_000006"
    assert b.uri_of(f"{tmp_path}/bucket/search/runs/t1/ray/x") == f"{sync.uri}/ray/x"
