"""Fixed cost of a search trial and how busy the worker slots stay, on the smoke search.

    python -m benchmarks.search_overhead [--quick] [--out FILE.json]

Runs the smoke search (search_spaces/smoke.yaml, real trainer, tiny model, CPU) on a local Ray
twice, side by side in one process: once with Ray Train's default report polling (2 s health-check
interval) and once with the interval plora_ray.search sets for trials (0.2 s). ASHA is switched off
so every trial runs its full timeline. Per trial, from the trial records' timelines:

- startup_s: Tune launches the trial -> the training loop starts (trial actor, Train controller,
  worker group, torch.distributed, the trainer's model/data/DeepSpeed setup);
- teardown_s: the trainer's final report (after evaluation and export) -> Tune sees the trial end;
- trial_overhead_s = startup_s + teardown_s (the fixed cost; training, evaluation and export are
  the work);
- slot occupancy = busy worker-seconds (loop start -> final report, x workers) / available
  worker-seconds (concurrent trial slots x workers x the search's span, first launch -> last end).

Headline: trial_overhead_s and slot_occupancy of the tuned setting (goals <= 10 s and >= 0.8),
and the same figures under Ray's default polling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def _shrink(quick: bool) -> dict[str, Any]:
    sets: dict[str, Any] = {"search.scheduler": {"type": "none"}, "search.time_budget_s": None}
    if quick:
        sets.update({"search.num_samples": 4, "train.max_steps": 4, "eval.limit": 2,
                     "eval.max_gen_toks": 8, "data.max_samples": 64, "plora.unload_every": 16,
                     "search.points": []})
    return sets


def _trial_figures(rec: dict[str, Any]) -> dict[str, Any] | None:
    tl = rec.get("timeline") or {}
    need = ("launched_at", "loop_started_at", "final_report_at", "tune_ended_at")
    if any(tl.get(k) is None for k in need):
        return None
    setup = tl.get("setup_s") or {}
    return {
        "trial_id": rec["trial_id"], "status": rec["status"], "method": rec["method"],
        "startup_s": tl["loop_started_at"] - tl["launched_at"],
        "driver_start_s": tl["driver_started_at"] - tl["launched_at"],
        "trainer_setup_s": sum(v for v in setup.values() if isinstance(v, (int, float))),
        "work_s": tl["final_report_at"] - tl["loop_started_at"],
        "loop_s": tl.get("loop_s"), "eval_s": tl.get("eval_s"),
        "teardown_s": tl["tune_ended_at"] - tl["final_report_at"],
        "trial_overhead_s": (tl["loop_started_at"] - tl["launched_at"])
        + (tl["tune_ended_at"] - tl["final_report_at"]),
        "launched_at": tl["launched_at"], "ended_at": tl["tune_ended_at"],
        "num_workers": tl.get("num_workers") or 1,
    }


def run_variant(label: str, health_check_s: float, quick: bool, storage: str) -> dict[str, Any]:
    from plora_ray.search import run_search

    t0 = time.time()
    out = run_search(str(SMOKE), storage=storage, name=label, overrides=_shrink(quick),
                     verbose=0, train_health_check_s=health_check_s)
    wall = time.time() - t0
    trials = [f for f in (_trial_figures(r) for r in out.records) if f is not None]
    if not trials:
        raise RuntimeError(f"{label}: no trial with a complete timeline in {out.search_dir}")
    search = json.loads(Path(out.search_dir, "search.json").read_text())
    span = max(t["ended_at"] for t in trials) - min(t["launched_at"] for t in trials)
    slots = search.get("max_concurrent_used") or _concurrency(trials)
    workers = max(t["num_workers"] for t in trials)
    busy = sum(t["work_s"] * t["num_workers"] for t in trials)
    return {
        "label": label, "train_health_check_s": health_check_s, "search_wall_s": wall,
        "trials": trials, "concurrent_slots": slots, "span_s": span,
        "trial_overhead_s": statistics.mean(t["trial_overhead_s"] for t in trials),
        "startup_s": statistics.mean(t["startup_s"] for t in trials),
        "teardown_s": statistics.mean(t["teardown_s"] for t in trials),
        "trainer_setup_s": statistics.mean(t["trainer_setup_s"] for t in trials),
        "work_s": statistics.mean(t["work_s"] for t in trials),
        "slot_occupancy": busy / (slots * workers * span) if span > 0 else 0.0,
    }


def _concurrency(trials: list[dict[str, Any]]) -> int:
    """The most trials that ran at once (the slots the search actually had)."""
    events = sorted([(t["launched_at"], 1) for t in trials] + [(t["ended_at"], -1) for t in trials])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 trials of 4 steps per setting")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--num-cpus", type=int, default=4,
                    help="logical CPUs of the local Ray (a trial takes 2: driver + worker)")
    args = ap.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    results = []
    with tempfile.TemporaryDirectory(prefix="plora-bench-") as storage:
        for label, hc in (("ray_default_poll", 2.0), ("tuned", 0.2)):
            results.append(run_variant(label, hc, args.quick, storage))
    ray.shutdown()

    by = {r["label"]: r for r in results}
    headline = {
        "trial_overhead_s": round(by["tuned"]["trial_overhead_s"], 2),
        "slot_occupancy": round(by["tuned"]["slot_occupancy"], 3),
        "startup_s": round(by["tuned"]["startup_s"], 2),
        "teardown_s": round(by["tuned"]["teardown_s"], 2),
        "trainer_setup_s": round(by["tuned"]["trainer_setup_s"], 2),
        "work_s": round(by["tuned"]["work_s"], 2),
        "trial_overhead_s_ray_default_poll": round(by["ray_default_poll"]["trial_overhead_s"], 2),
        "slot_occupancy_ray_default_poll": round(by["ray_default_poll"]["slot_occupancy"], 3),
        "work_s_ray_default_poll": round(by["ray_default_poll"]["work_s"], 2),
        "goal_trial_overhead_s": 10.0,
        "goal_slot_occupancy": 0.8,
    }
    print(f"{'setting':<18}{'trials':>7}{'slots':>6}{'startup s':>11}{'teardown s':>11}"
          f"{'overhead s':>11}{'work s':>8}{'occupancy':>10}{'wall s':>8}")
    for r in results:
        print(f"{r['label']:<18}{len(r['trials']):>7}{r['concurrent_slots']:>6}"
              f"{r['startup_s']:>11.1f}{r['teardown_s']:>11.1f}{r['trial_overhead_s']:>11.1f}"
              f"{r['work_s']:>8.1f}{r['slot_occupancy']:>10.2f}{r['search_wall_s']:>8.0f}")
    print("headline:", json.dumps(headline))
    if args.out:
        payload = {"benchmark": "search_overhead", "quick": args.quick, "num_cpus": args.num_cpus,
                   "cpu_count": os.cpu_count(), "headline": headline, "settings": results}
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
