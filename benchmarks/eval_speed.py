"""Evaluation speed: wall time per task on the tiny model, rank 0 alone vs sharded over 2 ranks.

Setup (CPU, fp32, seeded LLaMAs built by ``plora_ray.model``: the embedded tiny one and a
"small" one, see MODELS; one torch thread per rank, gloo).
Two ranks form a torch.distributed group, as the workers of one trial do. In one run, side by
side, the same evaluation (``plora_ray.evaluate.evaluate_model``) runs twice:

* ``rank0``: ``eval.sharded = false``: rank 0 scores every document, rank 1 waits for the
  broadcast result (what a trial pays when only rank 0 evaluates);
* ``sharded``: ``eval.sharded = true``: each rank scores half of the documents and the responses
  are gathered with ``all_gather_object`` (see ``plora_ray.eval_sharding.ShardedLM``).

A warm-up evaluation runs first so neither mode pays one-time imports. Tasks: GSM8K 0-shot
(generation), MMLU 0-shot (all 57 subjects), ARC-Easy, ARC-Challenge, and the NLL proxy, each on
a fixed-seed ``limit``.

Figures: ``seconds_per_task`` (rank0 mode, wall), ``seconds_per_task_sharded``,
``sharded_speedup`` (total wall rank0 / total wall sharded) and per-task speedups,
``sharded_speedup_cpu`` (CPU seconds of rank 0 in rank0 mode / CPU seconds of the busiest rank
when sharded: the speedup on dedicated cores, robust to other load on a shared machine), and
``objectives_equal`` (both modes give the same objectives, to 1e-6).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import parse_args, print_table, write_result

TASKS = ["gsm8k", "mmlu", "arc_easy", "arc_challenge"]

# The embedded tiny model (0.3M parameters besides embeddings) and a wider, deeper one (~26M)
# whose forward passes, not lm-eval's per-document bookkeeping, dominate the time: sharding
# splits the model work and repeats the bookkeeping on every rank, so the two bracket the range.
MODELS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
}


def settings(quick: bool, model: str) -> dict[str, Any]:
    if model == "small":
        return (
            {"limit": 2, "max_gen_toks": 32, "proxy_samples": 8, "batch_size": 8}
            if quick
            else {"limit": 12, "max_gen_toks": 64, "proxy_samples": 16, "batch_size": 8}
        )
    if quick:
        return {"limit": 8, "max_gen_toks": 64, "proxy_samples": 16, "batch_size": 8}
    return {"limit": 40, "max_gen_toks": 256, "proxy_samples": 64, "batch_size": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, quick: bool, out_dir: str) -> None:
    import torch.distributed as dist

    from plora_ray.config import EvalConfig, ModelConfig, TinyModelConfig
    from plora_ray.evaluate import evaluate_model
    from plora_ray.model import load_model, load_tokenizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        out: dict[str, Any] = {}
        for name, fields in MODELS.items():
            mc = ModelConfig(tiny=TinyModelConfig(**fields), dtype="float32")
            model, tok = load_model(mc, seed=0), load_tokenizer(mc)
            s = settings(quick, name)
            warm = EvalConfig(tasks=["arc_easy"], limit=2, proxy_samples=0)
            evaluate_model(model, tok, warm, rank=rank, world_size=world_size)
            for mode, sharded in (("rank0", False), ("sharded", True)):
                ev = EvalConfig(
                    tasks=TASKS,
                    num_fewshot={"gsm8k": 0, "mmlu": 0},
                    limit=s["limit"],
                    max_gen_toks=s["max_gen_toks"],
                    proxy_samples=s["proxy_samples"],
                    batch_size=s["batch_size"],
                    sharded=sharded,
                )
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                res = evaluate_model(model, tok, ev, rank=rank, world_size=world_size)
                cpu = time.process_time() - c0
                dist.barrier()
                out[f"{name}/{mode}"] = {
                    "wall_s": time.perf_counter() - t0,
                    "cpu_s": cpu,
                    "load_average_1m": os.getloadavg()[0],
                    "seconds_per_task": res.seconds_per_task,
                    "objectives": res.objectives,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "documents": {k: v["effective"] for k, v in res.results["n-samples"].items()},
                }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out, default=float))
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch.multiprocessing as mp

    args = parse_args(__doc__.splitlines()[0], argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, _free_port(), args.quick, tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    headline: dict[str, Any] = {}
    details: dict[str, Any] = {
        "settings": {
            "tasks": TASKS,
            "num_fewshot": {"gsm8k": 0, "mmlu": 0},
            "world_size": 2,
            "backend": "gloo",
            "torch_threads_per_rank": 1,
            **{name: {**settings(args.quick, name), "model": MODELS[name]} for name in MODELS},
        }
    }
    for name in MODELS:
        a, b = ranks[0][f"{name}/rank0"], ranks[0][f"{name}/sharded"]
        tasks = list(a["seconds_per_task"])
        speedups = {k: round(a["seconds_per_task"][k] / b["seconds_per_task"][k], 3) for k in tasks}
        equal = all(abs(a["objectives"][k] - b["objectives"][k]) <= 1e-6 for k in a["objectives"])
        equal = equal and ranks[1][f"{name}/sharded"]["objectives"] == b["objectives"]
        suffix = "" if name == "tiny" else f"_{name}"
        # CPU seconds on the critical path (the busiest rank): what the wall time would be on
        # dedicated cores; the wall-time ratio is only meaningful on an otherwise idle machine.
        cpu_rank0 = a["cpu_s"]
        cpu_sharded = max(r[f"{name}/sharded"]["cpu_s"] for r in ranks)
        headline[f"sharded_speedup{suffix}"] = round(a["wall_s"] / b["wall_s"], 3)
        headline[f"sharded_speedup_cpu{suffix}"] = round(cpu_rank0 / cpu_sharded, 3)
        headline[f"seconds_total_rank0{suffix}"] = round(a["wall_s"], 3)
        headline[f"seconds_total_sharded{suffix}"] = round(b["wall_s"], 3)
        headline[f"objectives_equal{suffix}"] = equal
        if name == "tiny":
            headline.update(
                {f"seconds_{k}_rank0": round(a["seconds_per_task"][k], 3) for k in tasks}
            )
            headline.update(
                {f"seconds_{k}_sharded": round(b["seconds_per_task"][k], 3) for k in tasks}
            )
        print_table(
            f"{name} model ({a['parameters']:,} parameters): seconds per task, 2 ranks, "
            "CPU, 1 thread per rank",
            [
                {
                    "task": k,
                    "rank0_s": a["seconds_per_task"][k],
                    "sharded_s": b["seconds_per_task"][k],
                    "speedup": speedups[k],
                }
                for k in tasks
            ],
        )
        details[name] = {
            "parameters": a["parameters"],
            "seconds_per_task": {k: round(v, 3) for k, v in a["seconds_per_task"].items()},
            "seconds_per_task_sharded": {k: round(v, 3) for k, v in b["seconds_per_task"].items()},
            "sharded_speedup_per_task": speedups,
            "documents": a["documents"],
            "cpu_s_rank0_mode": {"rank0": a["cpu_s"], "rank1": ranks[1][f"{name}/rank0"]["cpu_s"]},
            "cpu_s_sharded_mode": {
                "rank0": b["cpu_s"],
                "rank1": ranks[1][f"{name}/sharded"]["cpu_s"],
            },
            "load_average_1m": {
                "rank0_mode": a["load_average_1m"],
                "sharded_mode": b["load_average_1m"],
            },
            "objectives_rank0": a["objectives"],
            "objectives_sharded": b["objectives"],
        }
    details["seconds_per_task"] = details["tiny"]["seconds_per_task"]
    return write_result("eval_speed", args.quick, headline, details, args.out, started)


if __name__ == "__main__":
    main()
