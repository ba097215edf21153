"""Fixed cost of a search trial, where it goes, and how busy the worker slots stay (smoke search).

    python -m benchmarks.search_overhead [--quick] [--out FILE.json]

Runs the smoke search (search_spaces/smoke.yaml: real trainer, tiny model, DeepSpeed, CPU) on one
local Ray with as many CPUs as the machine has (what ``plora-ray search`` itself starts), once per
setting, side by side in one process:

- ``actor``: ``search.trial_executor: actor``, what the smoke search runs (``auto`` picks it for
  single-worker trials): each trial trains in its Tune trial actor (``train.run_in_process``) and
  Tune reuses the actor for the next trial; a trial takes its worker's CPU only;
- ``train``: ``search.trial_executor: train``, Train inside Tune: each trial drives a Ray Train
  run of its own (a trial takes a driver CPU plus its worker's), with the Ray Train settings
  ``plora_ray.tune_adapter`` sets for every trial (``TRIAL_TRAIN_ENV``);
- ``train_ray_defaults``: the same with Ray Train's own settings (2 s controller poll,
  preemption-watcher actor, 60 s worker-group start timeout).

ASHA is switched off so every trial runs its whole timeline. Per trial, from the trial record's
timeline (wall clock of the trial driver and of Tune) and from Ray's actor table (when each actor
of the trial became alive; ``train`` settings only):

    launched_at          Tune starts the trial
      tune_launch_s      -> trial actor up, trial_driver called
    driver_started_at
      controller_s       -> run_training: config checks, TorchTrainer, controller actor alive
    controller alive
      worker_start_s     -> worker placement group + worker process start (+ import ray) alive
    worker alive
      dist_init_s        -> torch.distributed (gloo), train context; train_loop_per_worker starts
      model_s, data_s, engine_s   the trainer's own setup (imports torch/transformers/peft/
                                  deepspeed on first use, tiny model, tokenised data, engine)
    loop_started_at      -> training (work) -> last step -> evaluation + export (work)
    final_report_at
      train_teardown_s   -> Ray Train notices the end, stops the workers, run_training returns
    driver_ended_at
      tune_teardown_s    -> the trial's last report reaches Tune, the trial actor ends
    tune_ended_at

startup_s = launched_at -> loop_started_at; teardown_s = final_report_at -> tune_ended_at;
trial_overhead_s = startup_s + teardown_s (the fixed cost; training, evaluation and export are the
work). ``trial_overhead_s_with_eval`` counts the evaluation and export as overhead too (launch ->
first step plus last step -> end, the issue's literal split). ``actor`` trials are ``cold`` (the
first trial of its actor process: process start and imports) or ``warm`` (a reused actor);
``slot_occupancy_warm`` is the occupancy of the warm trials alone (each holds its slot from its
predecessor's end on the same process to its own end): what a longer search tends to.
Slot occupancy (defined again in the JSON):

    busy worker-CPU-seconds / available worker-CPU-seconds
    busy      = sum over trials of work_s (loop start -> final report) x the trial's worker CPUs
    available = the worker CPUs the search may hold at once (max_concurrent x workers x CPUs per
                worker) x the search's span (first trial launched -> last trial ended)

Headline: trial_overhead_s and slot_occupancy of the smoke search as shipped (``actor``; goals
<= 10 s and >= 0.8), the same for ``train`` and ``train_ray_defaults``, the cold and warm actor
overheads, and the machine's load average while it ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"

OCCUPANCY_DEFINITION = (
    "busy worker-CPU-seconds / available worker-CPU-seconds; busy = sum over trials of "
    "(trainer loop start -> final report, i.e. training + evaluation + export) x the trial's "
    "worker CPUs; available = max_concurrent x num_workers x cpus_per_worker x span (first trial "
    "launched -> last trial ended, Tune's clock)"
)


def _shrink(quick: bool, executor: str) -> dict[str, Any]:
    sets: dict[str, Any] = {
        "search.scheduler": {"type": "none"},
        "search.time_budget_s": None,
        "search.trial_executor": executor,
    }
    if quick:
        # The smoke search's 6 trials, each shrunk to 4 steps and a tiny evaluation.
        sets.update(
            {
                "train.max_steps": 4,
                "eval.limit": 2,
                "eval.max_gen_toks": 8,
                "data.max_samples": 64,
                "plora.unload_every": 16,
                "search.points": [],
            }
        )
    return sets


def _actor_rows() -> list[dict[str, Any]]:
    """Every actor of the local Ray (GCS actor table): class, pid, when it became alive / died,
    its worker id and its owner's (the actor that created it)."""
    import ray
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    rows = []
    for raw in accessor.get_actor_table(None, None):
        # Generated protobuf module: no stubs for its message classes (ray 2.60.0).
        d = gcs_pb2.ActorTableData.FromString(raw)  # type: ignore[attr-defined]
        rows.append(
            {
                "cls": d.class_name,
                "pid": d.pid,
                "alive_at": d.start_time / 1000.0,
                "ended_at": (d.end_time / 1000.0) or None,
                "wid": d.address.worker_id,
                "owner": d.owner_address.worker_id,
            }
        )
    return rows


def _descendants(rows: list[dict[str, Any]], root: dict[str, Any]) -> list[dict[str, Any]]:
    out, frontier = [], [root["wid"]]
    while frontier:
        kids = [r for r in rows if r["owner"] in frontier and r is not root and r not in out]
        out += kids
        frontier = [k["wid"] for k in kids if k["wid"]]
    return out


def _trial_figures(rec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    tl = rec.get("timeline") or {}
    need = (
        "launched_at",
        "driver_started_at",
        "loop_started_at",
        "final_report_at",
        "driver_ended_at",
        "tune_ended_at",
    )
    if any(tl.get(k) is None for k in need):
        return None
    setup = {
        k: float(v) for k, v in (tl.get("setup_s") or {}).items() if isinstance(v, (int, float))
    }
    fig: dict[str, Any] = {
        "trial_id": rec["trial_id"],
        "status": rec["status"],
        "method": rec["method"],
        "launched_at": tl["launched_at"],
        "ended_at": tl["tune_ended_at"],
        "num_workers": tl.get("num_workers") or 1,
        "cpus_per_worker": tl.get("cpus_per_worker") or 1,
        "startup_s": tl["loop_started_at"] - tl["launched_at"],
        "tune_launch_s": tl["driver_started_at"] - tl["launched_at"],
        **setup,
        "work_s": tl["final_report_at"] - tl["loop_started_at"],
        "loop_s": (tl["last_step_at"] - tl["loop_started_at"]) if tl.get("last_step_at") else None,
        "eval_export_s": (tl["final_report_at"] - tl["last_step_at"])
        if tl.get("last_step_at")
        else None,
        "trial_overhead_s_with_eval": None,
        "train_teardown_s": tl["driver_ended_at"] - tl["final_report_at"],
        "tune_teardown_s": tl["tune_ended_at"] - tl["driver_ended_at"],
        "teardown_s": tl["tune_ended_at"] - tl["final_report_at"],
    }
    fig["trial_overhead_s"] = fig["startup_s"] + fig["teardown_s"]
    if tl.get("last_step_at"):
        fig["trial_overhead_s_with_eval"] = (
            fig["startup_s"] + tl["tune_ended_at"] - tl["last_step_at"]
        )
    # The actors of this trial: its driver (matched by pid and time) and what it created.
    pid = tl.get("driver_pid")
    roots = [r for r in rows if r["pid"] == pid and r["alive_at"] <= tl["driver_started_at"] + 1]
    if roots:
        root = max(roots, key=lambda r: r["alive_at"])
        kids = _descendants(rows, root)
        fig["actors"] = sorted(k["cls"] for k in kids)
        ctrl = [k for k in kids if k["cls"] == "TrainController"]
        workers = [k for k in kids if k["cls"] == "RayTrainWorker"]
        if ctrl and workers:
            c_alive = min(k["alive_at"] for k in ctrl)
            w_alive = max(k["alive_at"] for k in workers)
            fig["controller_s"] = c_alive - tl["driver_started_at"]
            fig["worker_start_s"] = w_alive - c_alive
            fig["dist_init_s"] = (tl["loop_started_at"] - sum(setup.values())) - w_alive
    return fig


PHASES = (
    "tune_launch_s",
    "controller_s",
    "worker_start_s",
    "dist_init_s",
    "model_s",
    "data_s",
    "engine_s",
    "startup_s",
    "loop_s",
    "eval_export_s",
    "work_s",
    "train_teardown_s",
    "tune_teardown_s",
    "teardown_s",
    "trial_overhead_s",
    "trial_overhead_s_with_eval",
)


def _mean(trials: list[dict[str, Any]], key: str) -> float | None:
    vals = [t[key] for t in trials if isinstance(t.get(key), (int, float))]
    return statistics.mean(vals) if vals else None


def run_variant(
    label: str, executor: str, train_env: dict[str, str], quick: bool, storage: str
) -> dict[str, Any]:
    from plora_ray.search import run_search

    t0 = time.time()
    load0 = os.getloadavg()[0]
    out = run_search(
        str(SMOKE),
        storage=storage,
        name=label,
        overrides=_shrink(quick, executor),
        verbose=0,
        train_env=train_env,
    )
    wall = time.time() - t0
    rows = _actor_rows()
    records = [r.to_dict() for r in out.records]
    timelines = {r["trial_id"]: r.get("timeline") or {} for r in records}
    trials = [f for f in (_trial_figures(r, rows) for r in records) if f is not None]
    if not trials:
        raise RuntimeError(f"{label}: no trial with a complete timeline in {out.search_dir}")
    # Cold: the first trial its process ran (process start, imports); warm: a reused process.
    seen_pids: set[Any] = set()
    last_end: dict[Any, float] = {}
    warm_busy = warm_slot = 0.0
    for t in sorted(trials, key=lambda t: t["launched_at"]):
        pid = timelines[t["trial_id"]].get("driver_pid")
        t["cold"] = pid not in seen_pids
        seen_pids.add(pid)
        if pid in last_end:
            # A warm trial holds its slot from its predecessor's end on the same process to its
            # own end: the steady state of a longer search.
            warm_busy += t["work_s"]
            warm_slot += t["ended_at"] - last_end[pid]
        last_end[pid] = t["ended_at"]
    search = json.loads(Path(out.search_dir, "search.json").read_text())
    span = max(t["ended_at"] for t in trials) - min(t["launched_at"] for t in trials)
    slots = int(search["max_concurrent_used"])
    worker_cpus = max(t["num_workers"] * t["cpus_per_worker"] for t in trials)
    busy = sum(t["work_s"] * t["num_workers"] * t["cpus_per_worker"] for t in trials)
    res: dict[str, Any] = {
        "label": label,
        "trial_executor": executor,
        "train_env": train_env,
        "search_wall_s": wall,
        "trials": trials,
        "max_concurrent": slots,
        "worker_cpus_per_trial": worker_cpus,
        "span_s": span,
        "busy_worker_cpu_s": busy,
        "available_worker_cpu_s": slots * worker_cpus * span,
        "slot_occupancy": busy / (slots * worker_cpus * span) if span > 0 else 0.0,
        "load_avg_1m_start": load0,
        "load_avg_1m_end": os.getloadavg()[0],
    }
    for k in PHASES:
        res[k] = _mean(trials, k)
    res["processes"] = len(seen_pids)
    res["trial_overhead_s_cold"] = _mean([t for t in trials if t["cold"]], "trial_overhead_s")
    res["trial_overhead_s_warm"] = _mean([t for t in trials if not t["cold"]], "trial_overhead_s")
    res["slot_occupancy_warm"] = warm_busy / warm_slot if warm_slot > 0 else None
    return res


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 trials of 4 steps per setting")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument(
        "--num-cpus",
        type=int,
        default=max(2, os.cpu_count() or 1),
        help="logical CPUs of the local Ray (default: the machine's, as plora-ray "
        "search starts it; a train trial takes 2, an actor trial 1)",
    )
    args = ap.parse_args(argv)

    import ray

    from plora_ray.tune_adapter import TRIAL_TRAIN_ENV

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        logging_level=logging.ERROR,
        log_to_driver=False,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="plora-bench-") as storage:
        for label, executor, env in (
            ("actor", "actor", dict(TRIAL_TRAIN_ENV)),
            ("train", "train", dict(TRIAL_TRAIN_ENV)),
            ("train_ray_defaults", "train", {}),
        ):
            results.append(run_variant(label, executor, env, args.quick, storage))
    ray.shutdown()

    by = {r["label"]: r for r in results}
    a, t, d = by["actor"], by["train"], by["train_ray_defaults"]

    def r2(v: float | None, n: int = 2) -> float | None:
        return None if v is None else round(v, n)

    headline = {
        "trial_overhead_s": r2(a["trial_overhead_s"]),
        "slot_occupancy": r2(a["slot_occupancy"], 3),
        "startup_s": r2(a["startup_s"]),
        "teardown_s": r2(a["teardown_s"]),
        "work_s": r2(a["work_s"]),
        "trial_overhead_s_cold": r2(a["trial_overhead_s_cold"]),
        "trial_overhead_s_warm": r2(a["trial_overhead_s_warm"]),
        "trial_overhead_s_with_eval": r2(a["trial_overhead_s_with_eval"]),
        "slot_occupancy_warm": r2(a["slot_occupancy_warm"], 3),
        "trial_overhead_s_train": r2(t["trial_overhead_s"]),
        "slot_occupancy_train": r2(t["slot_occupancy"], 3),
        "work_s_train": r2(t["work_s"]),
        "trial_overhead_s_ray_defaults": r2(d["trial_overhead_s"]),
        "slot_occupancy_ray_defaults": r2(d["slot_occupancy"], 3),
        "overhead_ratio_train_over_actor": r2(t["trial_overhead_s"] / a["trial_overhead_s"]),
        "search_wall_ratio_train_over_actor": r2(t["search_wall_s"] / a["search_wall_s"]),
        "goal_trial_overhead_s": 10.0,
        "goal_slot_occupancy": 0.8,
        "load_avg_1m": round(max(r["load_avg_1m_end"] for r in results), 2),
    }
    print(f"{'phase (mean s)':<18}" + "".join(f"{r['label']:>14}" for r in results))
    for k in PHASES + (
        "trial_overhead_s_cold",
        "trial_overhead_s_warm",
        "slot_occupancy",
        "slot_occupancy_warm",
        "search_wall_s",
        "processes",
    ):
        print(f"{k:<18}" + "".join(f"{_fmt(r[k]):>14}" for r in results))
    print(
        f"{'trials x slots':<18}"
        + "".join(
            f"{str(len(r['trials'])) + ' x ' + str(r['max_concurrent']):>14}" for r in results
        )
    )
    print("actors per train trial:", by["train"]["trials"][0].get("actors"))
    print("headline:", json.dumps(headline))
    if args.out:
        payload = {
            "benchmark": "search_overhead",
            "quick": args.quick,
            "num_cpus": args.num_cpus,
            "cpu_count": os.cpu_count(),
            "occupancy_definition": OCCUPANCY_DEFINITION,
            "headline": headline,
            "settings": results,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
