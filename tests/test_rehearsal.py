"""The rehearsal model, the shrunk two-node rehearsal (``benchmarks/rehearsal.py --quick``), a
node lost mid-search, and the GPU check's dry run.

The full rehearsal (both 7B search spaces) is the documented command in README ("Rehearsal");
CI runs one search of one trial: the 7B-wide checkpoint on disk, ``jobs/llama7b_plora.sh`` through
``ray job submit`` to two loopback nodes, a 2-worker ZeRO-3 PLoRA trial with one worker per node,
from_base unloads, the default chat template, evaluation, the leaderboard, and the exported model
checked against the run's own final checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from transformers import AutoConfig, AutoTokenizer

from benchmarks.rehearsal import kill_node, ray_env, two_node_cluster
from plora_ray.data import ensure_chat_template
from plora_ray.rehearsal_model import LLAMA7B_SHAPE, write_rehearsal_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rehearsal_model_has_llama7b_widths_sharded_weights_and_no_chat_template(
    tmp_path: Path,
) -> None:
    out = write_rehearsal_model(tmp_path / "m", num_layers=1, max_shard_size="200MB")
    cfg = AutoConfig.from_pretrained(out)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert getattr(cfg, key) == LLAMA7B_SHAPE[key], key
    assert cfg.num_hidden_layers == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 32000 and tok.chat_template is None
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("Natalia sold 48 clips.").input_ids[0] == 1
    assert ensure_chat_template(tok) == "default"  # what the project trains it with


@pytest.mark.slow
def test_quick_rehearsal_on_two_nodes_finishes_publishes_and_exports_the_trained_weights(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rehearsal.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.rehearsal", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PLORA_REHEARSAL_DIR": str(tmp_path / "work")},
        timeout=1800,
    )
    assert out.exists(), (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    (search,) = result["searches"]
    assert search["job_exit_code"] == 0, search["log_tail"]
    assert [t["status"] for t in search["trials"]] == ["completed"], search["trials"]
    assert search["leaderboard"]
    (export,) = search["exports"]
    assert export["ok"], export
    assert export["unloads"] >= 2 and export["targets_checked"] > 0
    # One Ray Train worker on each node, and their peak RSS measured.
    assert search["worker_nodes"] == ["head", "second"], search["workers"]
    assert all(w["peak_rss_mib"] > 0 for w in search["workers"])
    assert result["headline"]["ok"] and proc.returncode == 0


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_writes_the_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert result["throughput_7b"]["tokens_per_s"] > 0
    run = result["plora_run"]
    assert run["steps"] == 4 and run["unloads"] == 2
    assert 0 < run["unload_share_of_interval"] < 1
    assert run["export_files"]
    assert set(result["eval_seconds_per_task"]) == {"gsm8k", "mmlu"}


# Two LoRA trials one after the other, each a 2-worker Ray Train run (one worker per node: 1 CPU
# per node, 0.99 per worker, 0.01 for the trial's driver), long enough (20 steps, a checkpoint
# every 4) to lose a node mid-trial.
TWO_TRAIN_TRIALS = [
    "search.num_samples=2",
    "search.max_concurrent=1",
    "search.trial_executor=train",
    "search.scheduler=none",
    "search.driver_cpus=0.01",
    "search.max_retries=1",
    "resources.num_workers=2",
    "resources.cpus_per_worker=0.99",
    "batch.global_batch=8",
    "batch.micro_batch=4",
    "train.max_steps=20",
    "checkpoint.every_steps=4",
    "train.epochs=100",
    "train.log_every=2",
    "eval.limit=2",
    "eval.max_gen_toks=8",
    "data.max_samples=64",
    "plora.unload_every=16",
    "search.points=[{method: lora, optim.lr: 0.001, lora.rank: 4}, "
    "{method: lora, optim.lr: 0.002, lora.rank: 4}]",
]


@pytest.mark.slow
def test_losing_a_node_mid_trial_retries_it_and_keeps_what_finished(tmp_path: Path) -> None:
    """The second node is SIGKILLed (all its processes: raylet, workers) while the second trial
    trains with a committed checkpoint; a replacement node joins, as an autoscaler's would. The
    search finishes, the first trial's result is kept, the hit trial is retried from its
    checkpoint (or recorded failed with the reason), and the Optuna study agrees."""
    storage, name = tmp_path / "st", "nodeloss"
    sdir = storage / name
    cmd = [sys.executable, "-m", "plora_ray.cli", "search", str(ROOT / "search_spaces/smoke.yaml")]
    cmd += ["--storage", str(storage), "--name", name, "--set", *TWO_TRAIN_TRIALS]
    log = tmp_path / "search.log"
    with two_node_cluster(head_cpus=1, node_cpus=1) as cluster:
        env = {**ray_env(), "RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "token"}
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            killed: list[int] = []
            deadline = time.time() + 900
            while time.time() < deadline and proc.poll() is None and not killed:
                done = {p.stem for p in (sdir / "trials").glob("*.json")}
                hit = [
                    p
                    for p in (sdir / "runs").glob("*/ray/checkpoint_manager_snapshot.json")
                    if p.parents[1].name not in done
                ]
                if done and hit:
                    killed = kill_node(cluster.temps[1])
                    cluster.add_node(num_cpus=1)  # the replacement
                time.sleep(0.5)
            assert killed, "the second trial never checkpointed:\n" + log.read_text()[-4000:]
            rc = proc.wait(timeout=900)
    out = log.read_text()
    assert rc == 0, out[-4000:]
    records = {p.stem: json.loads(p.read_text()) for p in (sdir / "trials").glob("*.json")}
    assert len(records) == 2, out[-4000:]
    first, second = sorted(records.values(), key=lambda r: r.get("started_at") or "")
    assert first["status"] == "completed" and not first.get("retries"), first
    if second["status"] == "completed":
        assert second["retries"] == 1 and second["retry_reasons"], second
    else:
        assert second["status"] == "failed" and second["reason"], second
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sdir / 'study.db'}")
    states = {"completed": optuna.trial.TrialState.COMPLETE, "failed": optuna.trial.TrialState.FAIL}
    assert sorted(t.state.name for t in study.trials) == sorted(
        states[r["status"]].name for r in records.values()
    )
