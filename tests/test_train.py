"""Training on Ray: `plora-ray train` end to end, exact resume, /dev/shm cleanup, divergence.

The end-to-end tests start one local Ray head for the module (3 CPUs: the driver plus two
workers) and run the real TorchTrainer, DeepSpeed and PLoRA on a tiny seeded LLaMA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plora_ray import cli
from plora_ray.config import ConfigError, config_from_dict, load_config
from plora_ray.divergence import DivergenceGuard
from plora_ray.executors import cleanup_run_shm, newest_checkpoint, run_in_process, run_training
from plora_ray.preflight import DEEPSPEED_OVERRIDES_ENV, FAULT_ENV, check_run_config
from plora_ray.run_phases import is_phase
from plora_ray.shm import PROCESS_GROUP_DIR
from plora_ray.store import read_metrics
from plora_ray.training_run import total_steps, truncate_metrics

# Two workers, ZeRO-2 in bf16, unload every 3 steps, a checkpoint every 2 steps and at each
# unload (steps 2, 3, 4, 6, 8), 8 steps, a tiny evaluation at the end.
TINY_YAML = """\
seed: 0
method: plora
model:
  tiny: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
         num_key_value_heads: 2}
  dtype: bfloat16
data:
  sources: [{path: "bundled:gsm8k"}]
  max_length: 96
  held_out: 4
  max_samples: 64
lora: {rank: 4, alpha: 8}
plora: {unload_every: 3, unload_unit: steps, momentum: 0.1, merge_rounding: stochastic}
optim: {lr: 1.0e-3}
batch: {global_batch: 4, micro_batch: 2}
train: {max_steps: 8, log_every: 2}
deepspeed: {enabled: true, zero_stage: 2, bf16: true}
resources: {num_workers: 2, cpus_per_worker: 1}
eval: {tasks: [gsm8k], num_fewshot: {gsm8k: 0}, limit: 2, max_gen_toks: 4, batch_size: 2,
       proxy_samples: 2}
checkpoint: {at_unload: true, every_steps: 2, keep: 2}
"""

RUN_KEYS = {
    "step",
    "samples",
    "tokens",
    "loss",
    "lr",
    "stage",
    "tokens_per_s",
    "merge_rel_error",
    "effective_rank",
    "unload",
    "elapsed_s",
    "status",
}


def _shm_names() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


@pytest.fixture(scope="module")
def ray_head():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=3,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
    )
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    yield
    ray.shutdown()
    # A worker whose interpreter hangs at exit outlives the cluster (a Train controller did once).
    from ray_helpers import stop_processes_of

    stop_processes_of(session_dir)


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


@pytest.fixture(scope="module")
def reference_run(ray_head, tiny_yaml, tmp_path_factory):
    """An uninterrupted run through the CLI: (output dir, exit code, stdout, shm before)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    before = _shm_names()
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["train", str(tiny_yaml), "--output", str(out)])
    return out, rc, buf.getvalue(), before


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_command_writes_metrics_checkpoints_and_a_loadable_model(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, rc, stdout, _ = reference_run
    assert rc == 0, stdout
    records = read_metrics(out / "metrics.jsonl")
    running = [r for r in records if r["status"] == "running"]
    assert [r["step"] for r in running] == [2, 3, 4, 6, 8]
    for r in running:
        assert set(r) >= RUN_KEYS, RUN_KEYS - set(r)
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["tokens"] > 0
    assert [r["step"] for r in running if r["unload"]] == [3, 6]
    assert [r["stage"] for r in running] == [0, 1, 1, 2, 2]
    assert [r["samples"] for r in running] == [8, 12, 16, 24, 32]
    unload = next(r for r in running if r["unload"])
    assert 0 <= unload["merge_rel_error"] < 1 and unload["effective_rank"] >= 1
    assert unload["backbone_exceptions"] == 0  # the compact record replays bit for bit
    assert "gsm8k_nll" in unload  # the proxy, computed at each unload
    final = records[-1]
    assert final["final"] and final["status"] == "completed" and final["num_unloads"] == 2
    assert {"gsm8k", "gsm8k_flexible", "gsm8k_nll"} <= set(final["objectives"])
    # A line of progress per report.
    assert stdout.count("\nstep ") + stdout.startswith("step ") >= len(running)
    assert "[completed]" in stdout

    # checkpoint.keep = 2 of the checkpoints at steps 2, 3, 4, 6, 8.
    kept = sorted(p.name for p in (out / "ray").glob("step_*"))
    assert kept == ["step_000006", "step_000008"]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["num_unloads"] == 2
    assert result["checkpoint_bytes"] > result["backbone_delta_bytes"] > 0
    assert (out / "ray" / "step_000008" / "backbone" / "unload_0001.safetensors").is_file()

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = tok("Question: 2+2?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_run_removes_the_dev_shm_buffers_it_created(reference_run):
    out, rc, _, before = reference_run
    assert rc == 0
    removed = json.loads((out / "result.json").read_text())["shm_removed"]
    # Two ranks on one node: DeepSpeed created one buffer per rank, and the run removed them.
    assert len(removed) == 2, removed
    assert all(Path(p).name.startswith("deepspeed_allreduce_buffer_") for p in removed)
    # They were unlinked as soon as both ranks had mapped them (right after the engine build), so
    # a worker killed later could not leak them.
    final = read_metrics(out / "metrics.jsonl")[-1]
    assert final["shm_unlinked_at_start"] == 2
    # Only this run's names are checked: other processes on the machine may hold buffers too.
    assert not {Path(p).name for p in removed} & _shm_names()
    assert not {Path(p).name for p in removed} & before  # they were new, created by this run


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses_and_weights(
    reference_run, tiny_yaml, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    ref_out, rc, _, _ = reference_run
    assert rc == 0
    out = tmp_path / "run"
    # Killed after step 5: the newest checkpoint is step 4, one step into stage 1 (unload at 3).
    monkeypatch.setenv(FAULT_ENV, "5")
    assert cli.main(["train", str(tiny_yaml), "--output", str(out)]) == 1
    failed = read_metrics(out / "metrics.jsonl")
    assert failed[-1]["status"] == "failed" and "injected fault" in failed[-1]["reason"]
    assert [r["step"] for r in failed if r.get("status") == "running"] == [2, 3, 4]
    # The failed run's workers removed their /dev/shm buffers on the way out.
    gone = json.loads((out / "result.json").read_text())["shm_removed"]
    assert len(gone) == 2 and not any(Path(p).exists() for p in gone)
    monkeypatch.delenv(FAULT_ENV)
    # Without --resume the directory is refused; with it the run continues from step 4.
    assert cli.main(["train", str(tiny_yaml), "--output", str(out)]) == 2
    assert cli.main(["train", str(tiny_yaml), "--output", str(out), "--resume"]) == 0

    ref = read_metrics(ref_out / "metrics.jsonl")
    got = read_metrics(out / "metrics.jsonl")

    def curve(rs):
        return [
            (r["step"], r["loss"], r["lr"], r["samples"], r["tokens"])
            for r in rs
            if r.get("status") == "running"
        ]

    assert curve(got) == curve(ref)
    assert got[-1]["objectives"] == ref[-1]["objectives"]
    a = load_file(ref_out / "model" / "model.safetensors")
    b = load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k


@pytest.fixture(scope="module")
def one_worker_runs(ray_head, tiny_yaml, tmp_path_factory):
    """The tiny config with one worker: a ``run_training`` reference (Ray Train), and the runs of
    tests/in_process_runs.py (``run_in_process`` several times in one fresh process)."""
    base = tmp_path_factory.mktemp("one_worker")
    cfg_path = base / "one.yaml"
    cfg_path.write_text(TINY_YAML.replace("num_workers: 2", "num_workers: 1"))
    ref = run_training(load_config(cfg_path), base / "ray_train")
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "in_process_runs.py"),
            str(cfg_path),
            str(base / "in_process"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return ref, json.loads((base / "in_process" / "results.json").read_text()), base


def _curve(records):
    return [
        (r["step"], r["loss"], r["lr"], r["samples"], r["tokens"], r.get("merge_rel_error"))
        for r in records
        if r.get("status") == "running"
    ]


@pytest.mark.slow
def test_run_in_process_trains_as_ray_train_does_and_again_in_the_same_process(one_worker_runs):
    from safetensors.torch import load_file

    ref, runs, base = one_worker_runs
    assert ref.status == "completed", ref.reason
    a, c = runs["a"]["result"], runs["c"]["result"]
    assert a["status"] == "completed" and c["status"] == "completed", (a["reason"], c["reason"])
    ref_records = read_metrics(ref.metrics_path)
    a_records = read_metrics(a["metrics_path"])
    # The same worker loop with world size 1: the same steps, unloads and losses as the Ray Train
    # worker (bit for bit: same seeds, same data order, same kernels).
    assert _curve(a_records) == _curve(ref_records)
    assert [r["step"] for r in a_records if r.get("unload")] == [3, 6]
    assert a["objectives"] == ref.objectives and a["objectives"]
    # Every report reached the caller as it was written to metrics.jsonl (the setup phases too,
    # which metrics.jsonl leaves out: run_phases).
    assert [r for r in runs["a"]["reports"] if not is_phase(r)] == a_records
    assert any(is_phase(r) for r in runs["a"]["reports"])
    # A second run in the same (reused) process: nothing of the first one leaks into it.
    assert _curve(read_metrics(c["metrics_path"])) == _curve(a_records)
    assert c["objectives"] == a["objectives"]
    wa = load_file(Path(a["model_path"]) / "model.safetensors")
    wc = load_file(Path(c["model_path"]) / "model.safetensors")
    wr = load_file(Path(ref.model_path) / "model.safetensors")
    assert wa.keys() == wc.keys() == wr.keys()
    for k in wa:
        assert torch.equal(wa[k].view(torch.int16), wc[k].view(torch.int16)), k
        assert torch.equal(wa[k].view(torch.int16), wr[k].view(torch.int16)), k
    # Checkpoints where Ray Train keeps them, the newest checkpoint.keep (2) of steps 2,3,4,6,8.
    kept = sorted(p.name for p in (base / "in_process" / "a" / "ray").iterdir())
    assert kept == ["step_000006", "step_000008"], kept
    assert newest_checkpoint(base / "in_process" / "a").name == "step_000008"
    # DeepSpeed's /dev/shm buffer names were unlinked right after the engine build.
    assert set(runs["shm_after"]) <= set(runs["shm_before"]), runs["shm_after"]


@pytest.mark.slow
def test_run_in_process_fails_cleanly_and_resumes_to_the_same_run(one_worker_runs):
    _, runs, base = one_worker_runs
    failed = runs["b_failed"]["result"]
    assert failed["status"] == "failed" and "injected fault" in failed["reason"]
    # The failure's final report reached the callback too.
    assert runs["b_failed"]["reports"][-1]["status"] == "failed"
    assert "already holds a run" in runs["b_refused"]
    resumed = runs["b_resumed"]["result"]
    assert resumed["status"] == "completed", resumed["reason"]
    # Resumed from step 4 (the newest checkpoint before the fault): the reports after it only,
    # and the metrics file reads as the uninterrupted run's.
    assert [r["step"] for r in runs["b_resumed"]["reports"] if r.get("status") == "running"] == [
        6,
        8,
    ]
    a_records = read_metrics(runs["a"]["result"]["metrics_path"])
    assert _curve(read_metrics(resumed["metrics_path"])) == _curve(a_records)
    assert resumed["objectives"] == runs["a"]["result"]["objectives"]


@pytest.mark.slow
def test_run_after_a_zero3_run_in_the_same_process_gets_a_fresh_process_bits(one_worker_runs):
    # ZeRO-3 swaps torch.nn.functional.linear process-wide; the ZeRO-2 run "e" after the ZeRO-3
    # run "d" in the same process must train and export exactly as run "a", the process's first.
    _, runs, _ = one_worker_runs
    d, e, a = runs["d_zero3"]["result"], runs["e"]["result"], runs["a"]["result"]
    assert d["status"] == "completed" and e["status"] == "completed", (d["reason"], e["reason"])
    assert runs["linear_restored_after_zero3"], "torch.nn.functional.linear still DeepSpeed's"
    assert _curve(read_metrics(e["metrics_path"])) == _curve(read_metrics(a["metrics_path"]))
    assert e["objectives"] == a["objectives"]
    from safetensors.torch import load_file

    wa = load_file(Path(a["model_path"]) / "model.safetensors")
    we = load_file(Path(e["model_path"]) / "model.safetensors")
    assert wa.keys() == we.keys()
    for k in wa:
        assert torch.equal(wa[k].view(torch.int16), we[k].view(torch.int16)), k


@pytest.mark.slow
def test_from_base_export_is_one_rounding_of_w0_plus_every_merge(tmp_path):
    """The exported weight = round_nearest(W_0 + Σ unload merges + the last adapter's update),
    bit for bit from the stored factors (as the unloads merge, not peft's merge_and_unload)."""
    from safetensors.torch import load_file

    from plora_ray.checkpoint import load_backbone

    yaml_text = (
        TINY_YAML.replace("num_workers: 2", "num_workers: 1")
        .replace("merge_rounding: stochastic", "merge_rounding: from_base")
        .replace(
            "deepspeed: {enabled: true, zero_stage: 2, bf16: true}", "deepspeed: {enabled: false}"
        )
        .replace("limit: 2,", "limit: 2, at_end: false,")
        .replace("proxy_samples: 2", "proxy_samples: 0")
    )
    cfg_path = tmp_path / "from_base.yaml"
    cfg_path.write_text(yaml_text)
    run = tmp_path / "run"
    code = (
        "import sys; from plora_ray.config import load_config; "
        "from plora_ray.executors import run_in_process; "
        "r = run_in_process(load_config(sys.argv[1]), sys.argv[2]); "
        "sys.exit(0 if r.status == 'completed' else r.reason)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cfg_path), str(run)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The last step (8) is a checkpoint: its records hold every unload's factors and its
    # trainable.pt the final adapter (fp32, what the final merge reads).
    ckpt = newest_checkpoint(run)
    assert ckpt is not None and ckpt.name == "step_000008"
    records, _ = load_backbone(ckpt / "backbone")
    assert [r.index for r in records] == [0, 1] and records[0].rounding == "from_base"
    adapter = torch.load(ckpt / "trainable.pt", weights_only=False)["model"]
    w0 = load_file(run / "base_weights.safetensors")
    exported = load_file(run / "model" / "model.safetensors")
    scaling = 8 / 4  # lora alpha / rank
    for ld in records[-1].layers:
        prefix = ld.name.removesuffix(".base_layer.weight")
        bs = [r.layers[ld.layer_index].coef * r.layers[ld.layer_index].B for r in records]
        as_ = [r.layers[ld.layer_index].A for r in records]
        bs.append(scaling * adapter[prefix + ".lora_B.default.weight"])
        as_.append(adapter[prefix + ".lora_A.default.weight"])
        want = (w0[ld.base_name].float() + torch.cat(bs, 1) @ torch.cat(as_, 0)).bfloat16()
        got = exported[ld.base_name]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), ld.base_name
    assert len(records[-1].layers) == len(w0)


def test_run_in_process_refuses_more_than_one_worker_before_training(tmp_path, tiny_yaml):
    with pytest.raises(ConfigError, match="resources.num_workers: expected 1"):
        run_in_process(load_config(tiny_yaml), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_divergence_stops_the_run_with_its_status_and_step(ray_head, tmp_path):
    data = {
        "model": {
            "tiny": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
            "dtype": "float32",
        },
        "data": {"max_length": 64, "held_out": 2, "max_samples": 64},
        # Full fine-tuning at a learning rate no model survives: after one step the logits are
        # huge and the loss jumps from ~7.6 (ln 2048) to ~1000.
        "method": "full",
        "optim": {"lr": 10.0, "grad_clip": None},
        "batch": {"global_batch": 4, "micro_batch": 4},
        "train": {
            "max_steps": 6,
            "log_every": 1,
            "divergence_loss_multiple": 3.0,
            "divergence_window": 4,
        },
        # The plain-torch fallback (one worker, no DeepSpeed) runs the same loop.
        "deepspeed": {"enabled": False},
        "eval": {"at_end": False, "proxy_samples": 0},
        "checkpoint": {"at_unload": False, "export_model": True},
    }
    cfg = config_from_dict(data)
    res = run_training(cfg, tmp_path / "run")
    assert res.status == "diverged", res
    assert res.diverged_step is not None and 1 < res.diverged_step < 6
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["status"] == "diverged"
    assert records[-1]["diverged_step"] == res.diverged_step
    assert "loss" in records[-1]["reason"]
    assert records[-2]["step"] == res.diverged_step  # the diverging step was reported
    assert res.model_path is None and not (tmp_path / "run" / "model").exists()


@pytest.mark.slow
def test_lora_run_reports_the_proxy_at_the_unload_every_points(ray_head, tmp_path):
    # LoRA never unloads, but its proxy follows plora.unload_every like PLoRA's, so ASHA can
    # compare (and stop) it at the same samples. Every 6 samples at 4 per step: the points 6, 12,
    # 18, 24 fire at the first step boundary at or after them, i.e. steps 2, 3, 5, 6.
    data = {
        "method": "lora",
        "model": {
            "tiny": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
            "dtype": "float32",
        },
        "data": {"max_length": 64, "held_out": 2, "max_samples": 64},
        "lora": {"rank": 2, "alpha": 4},
        "plora": {"unload_every": 6, "unload_unit": "samples"},
        "optim": {"lr": 1.0e-2},
        "batch": {"global_batch": 4, "micro_batch": 4},
        "train": {"max_steps": 6, "log_every": 100},
        "deepspeed": {"enabled": False},
        "eval": {
            "tasks": ["gsm8k"],
            "num_fewshot": {"gsm8k": 0},
            "at_end": False,
            "proxy_samples": 2,
            "batch_size": 2,
        },
        "checkpoint": {"at_unload": False, "export_model": False},
    }
    res = run_training(config_from_dict(data), tmp_path / "run")
    assert res.status == "completed", res.reason
    running = [
        r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["status"] == "running"
    ]
    # log_every 100: only the proxy points (and the last step, one of them) are reported.
    assert [r["step"] for r in running] == [2, 3, 5, 6]
    assert [r["samples"] for r in running] == [8, 12, 20, 24]
    assert all(r["proxy_point"] and not r["unload"] and r["stage"] == 0 for r in running)
    nll = [r["gsm8k_nll"] for r in running]
    assert all(v > 0 for v in nll)
    assert len(set(nll)) == len(nll), nll  # recomputed at each point on the trained model
    assert res.metrics["objectives"]["gsm8k_nll"] == nll[-1]


@pytest.mark.slow
def test_zero3_full_fine_tuning_evaluates_the_whole_model_on_every_rank(
    ray_head, tmp_path, monkeypatch
):
    # ZeRO-3 as it runs a 7B model: every parameter partitioned, and released right after each
    # submodule's forward, so the next forward all-gathers it again (a collective). DeepSpeed's
    # defaults would keep a tiny model's weights whole (persistence threshold 1e5 elements, reuse
    # distance 1e9); the overrides make it behave as at 7B. 3 documents in batches of 1 on 2
    # ranks: rank 0 runs twice as many forward passes as rank 1, which blocks (or pairs the
    # wrong collectives) unless evaluation runs on gathered weights with ZeRO-3's hooks off. Both
    # the proxy (at the unload_every point, step 2) and the final evaluation are checked.
    monkeypatch.setenv(
        DEEPSPEED_OVERRIDES_ENV,
        json.dumps(
            {
                "zero_optimization": {
                    "stage3_param_persistence_threshold": 0,
                    "stage3_max_reuse_distance": 0,
                    "stage3_max_live_parameters": 0,
                    "stage3_prefetch_bucket_size": 0,
                }
            }
        ),
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from plora_ray.proxy import proxy_nll

    data = {
        "method": "full",
        "model": {
            "tiny": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
            "dtype": "bfloat16",
        },
        "data": {"max_length": 64, "held_out": 2, "max_samples": 32},
        "plora": {"unload_every": 2, "unload_unit": "steps"},
        "optim": {"lr": 1.0e-3},
        "batch": {"global_batch": 4, "micro_batch": 2},
        "train": {"max_steps": 3, "log_every": 100},
        "deepspeed": {"enabled": True, "zero_stage": 3, "bf16": True},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        # Batches of 1: rank 0 runs twice as many forward passes as rank 1.
        "eval": {
            "tasks": ["gsm8k"],
            "num_fewshot": {"gsm8k": 0},
            "limit": 3,
            "max_gen_toks": 4,
            "batch_size": 1,
            "proxy_samples": 3,
        },
        "checkpoint": {"at_unload": False, "export_model": True},
    }
    cfg = config_from_dict(data)
    res = run_training(cfg, tmp_path / "run")
    assert res.status == "completed", res.reason
    running = [
        r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["status"] == "running"
    ]
    assert [(r["step"], r["proxy_point"]) for r in running] == [(2, True), (3, False)]
    assert running[0]["gsm8k_nll"] > 0
    objectives = res.objectives
    assert {"gsm8k", "gsm8k_flexible", "gsm8k_nll"} <= set(objectives)
    evaluated = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert evaluated["config"]["sharded"] is True
    # The evaluation saw the trained weights whole: the exported model, loaded in one process,
    # gives the same proxy (up to the order of the 2 ranks' sums).
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "run" / "model", torch_dtype=torch.bfloat16
    )
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    alone = proxy_nll(model, tok, cfg.eval)
    assert alone["gsm8k_nll"] == pytest.approx(objectives["gsm8k_nll"], rel=1e-5)
    assert alone["gsm8k_nll"] != pytest.approx(running[0]["gsm8k_nll"], rel=1e-5)


# --------------------------------------------------------------------------- before Ray


def test_bad_config_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY_YAML.replace("lora: {rank: 4, alpha: 8}", "lora: {rank: 0, alpah: 8}"))
    # A Ray address nobody listens on: reaching Ray at all would fail differently.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plora_ray.cli",
            "train",
            str(bad),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "lora.rank" in proc.stderr and "lora.alpah" in proc.stderr
    assert str(bad) in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_config_the_trainer_cannot_run_is_rejected_before_ray(tmp_path):
    cfg = config_from_dict(
        {
            "resources": {"num_workers": 2},
            "deepspeed": {"enabled": False},
            "batch": {"global_batch": 8, "micro_batch": 4},
        }
    )
    with pytest.raises(ConfigError, match="deepspeed.enabled"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_from_base_needs_safetensors_and_is_refused_with_a_bin_checkpoint_before_ray(tmp_path):
    ok = config_from_dict({"plora": {"merge_rounding": "from_base"}})
    assert ok.plora.merge_rounding == "from_base"
    with pytest.raises(ConfigError, match="plora.merge_rounding"):
        config_from_dict({"plora": {"merge_rounding": "frombase"}})
    # A model directory with the weights as pytorch_model.bin: from_base has no W_0 to re-read.
    model_dir = tmp_path / "llama-bin"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "pytorch_model.bin").write_bytes(b"")
    cfg = config_from_dict(
        {"model": {"path": str(model_dir)}, "plora": {"merge_rounding": "from_base"}}
    )
    with pytest.raises(ConfigError) as err:
        run_training(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "plora.merge_rounding" in msg and str(model_dir) in msg
    assert "pytorch_model.bin" in msg and "stochastic" in msg
    assert not (tmp_path / "run").exists()
    # The same directory is fine for the other roundings and methods.
    for other in ({"plora": {"merge_rounding": "stochastic"}}, {"method": "lora"}):
        check_run_config(
            config_from_dict(
                {
                    "model": {"path": str(model_dir)},
                    **other,
                    "plora": {"merge_rounding": "from_base", **other.get("plora", {})},
                }
            )
        )


def test_existing_run_directory_needs_resume(tmp_path, tiny_yaml):
    (tmp_path / "run" / "ray").mkdir(parents=True)
    (tmp_path / "run" / "ray" / "checkpoint_manager_snapshot.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(load_config(tiny_yaml), tmp_path / "run")


def test_resume_refuses_a_config_that_changes_the_training(tmp_path, tiny_yaml):
    out = tmp_path / "run"
    (out / "ray").mkdir(parents=True)
    (out / "ray" / "checkpoint_manager_snapshot.json").write_text("{}")
    from plora_ray.config import dump_config

    (out / "config.yaml").write_text(dump_config(load_config(tiny_yaml)))
    changed = load_config(tiny_yaml, {"lora.rank": 8, "train.max_steps": 20})
    with pytest.raises(ConfigError) as err:
        run_training(changed, out, resume=True)
    # Training longer is allowed; a different rank is not.
    assert len(err.value.problems) == 1 and "lora.rank" in err.value.problems[0]


# --------------------------------------------------------------------------- pure pieces


def test_cleanup_after_a_killed_driver_removes_only_that_runs_buffers(tmp_path):
    # A run whose driver was killed before its own cleanup (a Tune trial stopped by ASHA): its
    # worker group recorded MASTER_ADDR/PORT; another run's buffer must survive.
    out = tmp_path / "run"
    (out / PROCESS_GROUP_DIR).mkdir(parents=True)
    (out / PROCESS_GROUP_DIR / "40001.json").write_text(
        json.dumps({"addr": "10.9.8.7", "port": "40001"})
    )
    uid = os.getuid()
    ours = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_10.9.8.7_40001_{r}") for r in (0, 1)]
    other = Path(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_10.9.8.7_40002_0")
    try:
        for p in [*ours, other]:
            p.write_bytes(b"x")
        removed = cleanup_run_shm(out)
        assert sorted(removed) == sorted(str(p) for p in ours)
        assert not any(p.exists() for p in ours) and other.exists()
    finally:
        for p in [*ours, other]:
            p.unlink(missing_ok=True)


def test_divergence_guard_flags_nan_inf_and_a_jump_over_the_running_mean():
    g = DivergenceGuard(multiple=3.0, window=3)
    assert g.check(2.0) is None and g.check(1.0) is None
    assert "running mean 1.5" in g.check(4.6)  # 4.6 > 3 x 1.5
    assert "not finite" in DivergenceGuard(5.0, 2).check(float("nan"))
    assert "not finite" in DivergenceGuard(5.0, 2).check(float("inf"))
    # Only the last `window` losses count: an early high loss leaves the window.
    g = DivergenceGuard(multiple=2.0, window=2)
    for loss in (10.0, 1.0, 1.0):
        assert g.check(loss) is None
    assert g.check(2.5) is not None
    wide = DivergenceGuard(multiple=2.0, window=3)
    for loss in (10.0, 1.0, 1.0):
        wide.check(loss)
    assert wide.check(2.5) is None
    restored = DivergenceGuard(multiple=2.0, window=3)
    restored.load_state_dict(wide.state_dict())
    assert list(restored.history) == list(wide.history)


def test_total_steps_follows_epochs_and_max_steps():
    cfg = config_from_dict(
        {"batch": {"global_batch": 8, "micro_batch": 4}, "train": {"epochs": 2.0}}
    )
    assert total_steps(cfg, 100) == 25
    cfg = config_from_dict(
        {"batch": {"global_batch": 8, "micro_batch": 4}, "train": {"epochs": 2.0, "max_steps": 10}}
    )
    assert total_steps(cfg, 100) == 10
    assert total_steps(cfg, 3) == 1  # never zero steps


def test_resume_truncates_metrics_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "status": "running"} for s in (2, 4, 6)]
    lines.append({"status": "failed", "final": True})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 8, "sta')
    truncate_metrics(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [2, 4]
