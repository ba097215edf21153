"""Search quality at equal compute: random search, TPE + ASHA, Ray's stock PBT and pbt_unload.

    python -m benchmarks.search_quality [--quick] [--out FILE.json]    # --quick: 12 min, 2 CPUs

What it measures (issue 16): on the real-text learning task of ``benchmarks/learning_real.py``
(a small LLaMA pretrained on bundled text, instruction-tuned on GSM8K dialogues with PLoRA rank
8), how good a model each search method finds for the same compute, and how much compute each
needs to match what the shipped default (TPE + ASHA) ends with.

The searched space is the same for every method: ``optim.lr`` loguniform [1e-4, 1e-2] (the
adapter's LR) and ``plora.momentum`` uniform [0, 0.5], PLoRA at rank 8 unloading every
``unload_every`` optimizer steps (a trial of ``steps`` steps has ``steps / unload_every`` stages).
A trial fine-tunes the cached pretrained base (``learning_real.pretrain_base``; the same base,
splits and tokenization as that benchmark) with ``learning_real``'s own loop pieces
(``start_finetune``, ``train_step``), batches in the seed's order (``batch_order``).

* **proxy** (what ASHA and the PBTs decide on): answer NLL on ``val_dialogues`` GSM8K train
  dialogues held out of fine-tuning (``learning_real``'s validation split), reported as
  ``gsm8k_nll`` at the method's decision points only.
* **objective** (what is reported): answer NLL on ``test_dialogues`` GSM8K *test* dialogues,
  computed once, when a trial reaches its last step, for every method alike; no searcher ever
  sees it. TPE is told a finished trial's validation NLL at its last step instead. Lower is
  better. A search's ``best`` is the lowest objective among its finished trials.

Compute, the same ledger for every method, in samples: each training sample of an optimizer step
is one, and each dialogue scored for a proxy, for TPE's final value or for the objective is one
(a scoring forward pass is cheaper than a training step; counting it as a whole sample charges
evaluation generously). Work a trial loses (a PBT member that forks discards its own stage) is
counted: each trial keeps the total it has spent in its run directory and every report carries
it; the driver adds the newest total of every trial in arrival order (``ComputeLedger``), so the
anytime curve is the best objective found so far against the compute the whole search has spent.

Methods (each search on one local Ray with ``cpus`` CPUs, a trial on one CPU and one torch
thread, so two train at once; the same starting points for the three that take them):

* ``random``: ``population`` trials at points drawn by Optuna's RandomSampler (seeded), run to
  the end with no proxy (random search needs none, so pays for none).
* ``tpe_asha``: the shipped default (``search_spaces/smoke.yaml``, ``plora_ray.tune_adapter``):
  OptunaSearch with TPESampler(seed, multivariate, group, constant_liar), ASHAScheduler on the
  proxy at every unload, ``time_attr: samples``, ``grace_period`` one stage, ``reduction_factor``
  2, ``max_t`` the trial's samples; pruned trials go to Optuna with their last proxy, as the
  product does. New trials are started until the search has spent the budget; then every trial
  still running is stopped (``ComputeLedger.stop_all``).
* ``stock_pbt``: ``ray.tune.schedulers.PopulationBasedTraining`` (the same quantile, resample
  probability and factors as pbt_unload, values clipped to the searched ranges), perturbing every
  ``stock_pbt_interval`` steps, a time axis not aligned to the unloads: a trial reports its full
  state (backbone with its merges, adapter, optimizer, PLoRA state, step) as a Tune checkpoint
  there, and a restored trial continues mid-stage with the new LR (the new momentum applies at
  its next unload).
* ``pbt_unload``: ``plora_ray.pbt_scheduler.UnloadPBT``: at each unload but the last, a bottom
  trial continues from a top trial's unload checkpoint with perturbed settings for the stage that
  begins there (``plora.stages``, read with ``pbt.stage_value``).

* ``pbt_unload_half``: ``pbt_unload`` with half the population, so half the budget. A
  population's members all finish together, at the end of its budget, so the anytime curve of a
  PBT has no finished trial before most of its budget is spent; the smaller run shows whether
  pbt_unload reaches the target with half the compute. ``pbt_unload_compute_to_tpe_best`` is the
  earlier of the two runs, per seed.

The budget ``B`` is ``population`` full trials with a proxy at each unload but the last:
``population * (steps * batch + (steps / unload_every - 1) * val_dialogues + test_dialogues)``.
stock_pbt's proxy points are as many (``stock_pbt_interval`` is chosen so), random's
``population`` trials cost less (no proxy) and TPE + ASHA stops at ``B``; each search's actual
compute is in the JSON.

Figures, per seed (the data order, the starting points and every searcher's seed): each method's
anytime curve ``[[compute, best so far], ...]`` and the compute it needs to reach the best that
TPE + ASHA ends with on the same seed, as a fraction of ``B`` (null when it never does).
Headline: ``pbt_unload_compute_to_tpe_best`` (goal <= 0.5), ``stock_pbt_compute_to_tpe_best``,
``random_compute_to_tpe_best`` (mean over seeds, a seed that never reached it counted as 1.0,
a lower bound; min, max, how many seeds reached it, each seed's value) and ``best_objective``
per method (mean over seeds with a 90% t interval), plus pbt_unload's paired difference to
TPE + ASHA.

Full mode (more seeds, longer trials, a population of 8: see ``settings``) is documented, not
run on this machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
import scipy.stats
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from benchmarks.common import parse_args, print_table, write_result
from benchmarks.learning_real import (
    Example,
    Finetuning,
    Method,
    answer_nll,
    batch_order,
    load_corpus,
    model_config,
    pooled_loss,
    pretrain_base,
    start_finetune,
    train_step,
)
from benchmarks.learning_real import settings as learning_settings
from plora_ray.model import load_model, load_tokenizer
from plora_ray.pbt import split_trial_config, stage_value
from plora_ray.pbt_scheduler import UnloadPBT
from plora_ray.search_params import ParamSpec, parse_params, suggest
from plora_ray.search_scheduler import SchedulerSpec, parse_scheduler
from plora_ray.store import SearchDir

METHODS = ("random", "tpe_asha", "stock_pbt", "pbt_unload")
# pbt_unload again with half the population, so half the budget: a population's members all
# finish at the end of its budget, so only a smaller run can show it reaching a target early.
HALF = "pbt_unload_half"
PROXY = "gsm8k_nll"  # the proxy's name in reports (a scheduler metric the product knows)
TPE_VALUE = "final_val_nll"  # what TPE is told of a finished trial
STATE_FILE = "state.pt"  # a checkpoint directory's one file
SPENT_FILE = "spent.json"  # a trial's compute so far, in its run directory
FORK_MARKER = "fork.json"  # which fork checkpoint a pbt_unload trial started from
# The searched space, as a search space's params block (plora_ray.search_params parses it).
PARAMS = {
    "optim.lr": {"distribution": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
    "plora.momentum": {"distribution": "uniform", "low": 0.0, "high": 0.5},
}
# pbt_unload's block as a search space writes it (search_spaces/smoke_pbt.yaml's values); the
# stock PBT takes the same quantile, resample probability and factors.
PBT_BLOCK = {
    "type": "pbt_unload",
    "metric": PROXY,
    "direction": "minimize",
    "quantile_fraction": 0.25,
    "resample_probability": 0.25,
    "perturbation_factors": [1.2, 0.8],
    "burn_in_stages": 1,
}


def settings(quick: bool, tiny: bool = False) -> dict[str, Any]:
    """Benchmark settings: ``quick`` (12 min measured on a 2-core CPU), ``tiny`` (the test's
    run: one seed, three trials of 8 steps on a toy base, ~1 min), else the full mode (not run
    here; about 1.5 h on the same CPU at the quick run's rate per sample)."""
    s: dict[str, Any] = {
        # learning_real's model, pretraining and splits: its cached base is this one.
        "base": learning_settings(quick=True),
        "steps": 160,
        "batch": 8,
        "rank": 8,
        "unload_every": 20,
        # 7 proxy points of pbt_unload's (20, 40, ..., 140) vs 6 of stock PBT's (25, ..., 150).
        "stock_pbt_interval": 25,
        "val_dialogues": 64,
        "test_dialogues": 256,
        "population": 8,
        "seeds": [0, 1, 2, 3, 4],
        # A trial reports its compute at least this often (steps): what a budget stop can cut
        # off unreported is at most this many steps per running trial.
        "report_every": 4,
        "tpe_max_trials": 200,
        "cpus": 2,
        "trial_cpus": 1,
        "interval_level": 0.9,
    }
    if quick:
        s.update(
            steps=64,
            unload_every=16,
            # 3 proxy points (20, 40, 60) as pbt_unload's 3 (16, 32, 48): equal budgets, and
            # every perturbation falls inside a stage.
            stock_pbt_interval=20,
            val_dialogues=32,
            test_dialogues=128,
            population=4,
            seeds=[0, 1, 2],
        )
    if tiny:
        # A toy base (pretrained in seconds, cached like learning_real's) and a small split.
        s["base"] = {
            **s["base"],
            "model": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
            "pretrain": {"steps": 8, "batch": 4, "length": 64, "lr": 3e-3, "seed": 0},
            "val_dialogues": 16,
            "finetune_pool": 64,
            "test_dialogues": 16,
            "max_length": 128,
        }
        s.update(
            steps=8,
            unload_every=2,
            stock_pbt_interval=3,
            val_dialogues=8,
            test_dialogues=8,
            # 3 trials on 2 slots: the PBTs pause and resume members (time-sharing) as in --quick.
            population=3,
            seeds=[0],
            report_every=2,
        )
    return s


def trial_cost(s: dict[str, Any], proxy_points: int, final_val: bool = False) -> int:
    """Compute of one trial run to the end: training samples plus every dialogue scored."""
    evals = proxy_points * s["val_dialogues"] + s["test_dialogues"]
    return s["steps"] * s["batch"] + evals + (s["val_dialogues"] if final_val else 0)


def unload_proxy_points(s: dict[str, Any]) -> int:
    """Unloads before the last step (the last one ends the trial: nothing is decided there)."""
    return len(range(s["unload_every"], s["steps"], s["unload_every"]))


def stock_proxy_points(s: dict[str, Any]) -> int:
    return len(range(s["stock_pbt_interval"], s["steps"], s["stock_pbt_interval"]))


def budget(s: dict[str, Any]) -> int:
    """B: ``population`` full trials with a proxy at each unload but the last."""
    return int(s["population"] * trial_cost(s, unload_proxy_points(s)))


# --------------------------------------------------------------------------- figures (pure)


def anytime_curve(events: Sequence[tuple[float, float]], total: float) -> list[list[float]]:
    """The best objective found so far against the compute spent.

    Args:
        events: (the search's compute when a trial finished, its objective), in arrival order.
        total: the search's compute at its end (the curve's last point).

    Returns:
        ``[[compute, best so far], ...]``: one point per finished trial, then ``[total, best]``;
        empty when no trial finished.
    """
    curve: list[list[float]] = []
    best = float("inf")
    for compute, objective in events:
        best = min(best, objective)
        curve.append([float(compute), best])
    if curve:
        curve.append([float(max(total, curve[-1][0])), best])
    return curve


def compute_to_reach(curve: list[list[float]], target: float, budget: float) -> float | None:
    """The compute (fraction of ``budget``) at which ``curve`` first reaches ``target`` or
    below; None when it never does."""
    for compute, best in curve:
        if best <= target:
            return compute / budget
    return None


def mean_interval(values: list[float], level: float = 0.9) -> dict[str, float | None]:
    """Mean over seeds and its two-sided t interval (``lo`` = ``hi`` = mean for one value)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return {"mean": None, "lo": None, "hi": None}
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "lo": mean, "hi": mean}
    half = float(scipy.stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half}


def fraction_summary(fractions: list[float | None]) -> dict[str, Any]:
    """Compute-to-reach over seeds: the mean with a seed that never reached the target counted
    as 1.0 (a lower bound: it spent the budget without reaching it), min, max, how many seeds
    reached it, and each seed's value (null: never)."""
    counted = [1.0 if f is None else f for f in fractions]
    reached = [f for f in fractions if f is not None]
    return {
        "mean": float(np.mean(counted)) if counted else None,
        "min": float(min(counted)) if counted else None,
        "max": float(max(counted)) if counted else None,
        "reached": f"{len(reached)}/{len(fractions)}",
        "per_seed": fractions,
    }


# --------------------------------------------------------------------------- the trial


@dataclass(frozen=True)
class TrialJob:
    """What every trial of one search gets (``tune.with_parameters``)."""

    method: str
    settings: dict[str, Any]
    seed: int
    base_path: str
    finetune: list[Example]
    val: list[Example]
    test: list[Example]
    pad_id: int
    storage: str
    name: str


def _load_base(job: TrialJob) -> Any:
    base_s = job.settings["base"]
    base = load_model(model_config(base_s), seed=base_s["pretrain"]["seed"])
    base.load_state_dict(torch.load(job.base_path, weights_only=True))
    return base


def _start(job: TrialJob, base: Any, lr: float) -> Finetuning:
    s = job.settings
    method = Method("plora", s["rank"], 0.0, s["unload_every"])
    return start_finetune(base, method, lr, job.seed, s["batch"])


def save_state(ft: Finetuning, step: int, directory: Path) -> None:
    """A checkpoint: the model (backbone with its merges, adapter), optimizer, PLoRA, step.
    The data position is the step (every trial of a search reads the seed's one batch order)."""
    assert ft.plora is not None
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": ft.model.state_dict(),
        "opt": ft.opt.state_dict(),
        "plora": ft.plora.state_dict(),
        "step": step,
    }
    tmp = directory / f"{STATE_FILE}.tmp"
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)


def load_state(ft: Finetuning, directory: Path) -> int:
    """Restore ``save_state``'s checkpoint into ``ft``; returns its step."""
    assert ft.plora is not None
    state = torch.load(directory / STATE_FILE, weights_only=False)
    ft.model.load_state_dict(state["model"])
    ft.opt.load_state_dict(state["opt"])
    ft.plora.load_state_dict(state["plora"])
    return int(state["step"])


def _stage_dirs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("stage_*"))


def _restore(job: TrialJob, ft: Finetuning, pbt_state: dict[str, Any] | None, run_dir: Path) -> int:
    """Where a (re)started trial continues: stock PBT from its Tune checkpoint (its own after a
    pause, the parent's after an exploit); pbt_unload from the fork's copy of the parent's
    unload checkpoint the first time it runs with that fork, else from its own newest unload
    checkpoint (after a pause). Returns the step to continue after (0: from the start)."""
    if job.method == "stock_pbt":
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as d:
            return load_state(ft, Path(d))
    if job.method != "pbt_unload":
        return 0
    fork = (pbt_state or {}).get("fork")
    marker = run_dir / FORK_MARKER
    if isinstance(fork, dict):
        started = json.loads(marker.read_text()).get("checkpoint") if marker.is_file() else None
        if started != fork["checkpoint"]:
            step = load_state(ft, Path(fork["checkpoint"]))
            # The trial's own stages from before the fork are replaced, not resumed.
            for d in _stage_dirs(run_dir):
                shutil.rmtree(d)
            marker.write_text(json.dumps(fork))
            return step
    own = _stage_dirs(run_dir)
    return load_state(ft, own[-1]) if own else 0


def search_trial(config: dict[str, Any], *, job: TrialJob) -> None:
    """One Tune trial: fine-tune with PLoRA to ``steps``, reporting at the method's decision
    points, then score the objective on the test dialogues (see the module docstring)."""
    torch.set_num_threads(1)  # one torch thread per trial: trials share the CPUs
    s = job.settings
    steps, batch, method = s["steps"], s["batch"], job.method
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(SearchDir(job.storage, job.name).run_dir(trial_id))
    run_dir.mkdir(parents=True, exist_ok=True)
    spent_path = run_dir / SPENT_FILE
    spent = json.loads(spent_path.read_text()) if spent_path.is_file() else {"train": 0, "eval": 0}
    params, pbt_state = split_trial_config(config)
    ft = _start(job, _load_base(job), float(stage_value(params, "optim.lr", 0)))
    assert ft.plora is not None
    step = _restore(job, ft, pbt_state, run_dir)
    batches = batch_order(len(job.finetune), steps, batch, job.seed)

    def scored(examples: list[Example]) -> float:
        spent["eval"] += len(examples)
        loss = pooled_loss(*answer_nll(ft.model, examples, job.pad_id))
        ft.model.train()
        return loss

    def progress() -> dict[str, Any]:
        assert ft.plora is not None
        spent_path.write_text(json.dumps(spent))
        return {
            "step": step,
            "samples": step * batch,
            "stage": ft.plora.num_unloads,
            "total_steps": steps,
            "compute": spent["train"] + spent["eval"],
        }

    ft.model.train()
    while step < steps:
        stage = ft.plora.num_unloads
        lr = float(stage_value(params, "optim.lr", stage))
        for group in ft.opt.param_groups:
            group["lr"] = lr
        rows = batches[step]
        step += 1
        train_step(ft, [job.finetune[i] for i in rows], job.pad_id)
        spent["train"] += len(rows)
        unloaded = ft.plora.due(step, step * batch)
        if unloaded:
            # A stage's momentum is the one of the unload that ends it (plora.stages' rule).
            momentum = float(stage_value(params, "plora.momentum", stage))
            ft.plora.cfg = dataclasses.replace(ft.plora.cfg, momentum=momentum)
            ft.plora.unload(step, step * batch)
        if step >= steps:
            break
        if method in ("tpe_asha", "pbt_unload") and unloaded:
            point: dict[str, Any] = {PROXY: scored(job.val), "proxy_point": True}
            if method == "pbt_unload":
                # UnloadPBT forks from this directory (it copies it at once).
                ckpt = run_dir / f"stage_{ft.plora.num_unloads:03d}"
                save_state(ft, step, ckpt)
                point.update(checkpoint=True, checkpoint_path=str(ckpt))
            tune.report({**progress(), **point})
        elif method == "stock_pbt" and step % s["stock_pbt_interval"] == 0:
            point = {PROXY: scored(job.val), "proxy_point": True}
            with tempfile.TemporaryDirectory(prefix="sqckpt") as d:
                save_state(ft, step, Path(d))  # Tune copies it into the trial's storage
                tune.report({**progress(), **point}, checkpoint=tune.Checkpoint.from_directory(d))
        elif step % s["report_every"] == 0:
            tune.report(progress())
    final: dict[str, Any] = {"objective": scored(job.test), "trial_done": True}
    if method == "tpe_asha":
        final[TPE_VALUE] = scored(job.val)
    final["lr_last"] = float(stage_value(params, "optim.lr", ft.plora.num_unloads))
    tune.report({**progress(), **final})


# --------------------------------------------------------------------------- the driver side


class ComputeLedger(Stopper):
    """The search's compute in arrival order: every report carries its trial's total spent so
    far; the search's total is the sum of every trial's newest. Records (total, objective) as
    each trial finishes and, with a ``budget``, stops the whole search once it is spent."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.spent: dict[str, int] = {}
        self.finished: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, float]] = []

    @property
    def total(self) -> int:
        return sum(self.spent.values())

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if isinstance(result.get("compute"), (int, float)):
            self.spent[trial_id] = max(self.spent.get(trial_id, 0), int(result["compute"]))
        objective = result.get("objective")
        if isinstance(objective, (int, float)) and trial_id not in self.finished:
            self.events.append((self.total, float(objective)))
            self.finished[trial_id] = {
                "compute_at_finish": self.total,
                "objective": float(objective),
                "trial_compute": self.spent.get(trial_id),
            }
        return False

    def stop_all(self) -> bool:
        return self.budget is not None and self.total >= self.budget


class ProxyOptunaSearch(OptunaSearch):
    """OptunaSearch as the product drives it (``tune_adapter.PLoRAOptunaSearch``): the proxy is
    each trial's intermediate value at its step, a trial ASHA stopped ends PRUNED (TPE ranks it
    by its last proxy), a finished one COMPLETE with ``TPE_VALUE``."""

    def _report_proxy(self, trial_id: str, result: dict[str, Any]) -> None:
        value, step = result.get(PROXY), result.get("step")
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        if result.get("proxy_point") and isinstance(value, float) and isinstance(step, int):
            ot_trial.report(value, step)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report_proxy(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        last = dict(result or {})
        if not last.get("trial_done"):
            # Tune does not pass the report that made ASHA stop a trial to on_trial_result.
            self._report_proxy(trial_id, last)
            result = None  # PRUNED: Optuna keeps the last intermediate value
        super().on_trial_complete(trial_id, result=result, error=error)


def _define_by_run(trial: Any, params: list[ParamSpec]) -> dict[str, Any]:
    return {p.key: suggest(trial, p) for p in params}


def starting_points(params: list[ParamSpec], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` points from Optuna's RandomSampler (seeded), through the product's ``suggest``."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        points.append({p.key: suggest(trial, p) for p in params})
        study.tell(trial, 0.0)
    return points


def _clip_to_space(params: list[ParamSpec], config: dict[str, Any]) -> dict[str, Any]:
    """Stock PBT's explore multiplies without bounds: keep values inside the searched ranges
    (pbt_unload's explore clips too)."""
    for p in params:
        assert p.low is not None and p.high is not None
        config[p.key] = min(max(float(config[p.key]), p.low), p.high)
    return config


def run_search(
    method: str,
    seed: int,
    s: dict[str, Any],
    data: dict[str, Any],
    storage: str,
    label: str | None = None,
) -> dict[str, Any]:
    """One search of ``method`` at one seed, to its budget; its ledger and trials (named
    ``label`` when given: the same method at other settings)."""
    problems: list[str] = []
    params, _ = parse_params(PARAMS, problems)
    spec: SchedulerSpec = parse_scheduler(PBT_BLOCK, problems)
    assert not problems, problems
    name = f"{label or method}-seed{seed}"
    job = TrialJob(method=method, settings=s, seed=seed, storage=storage, name=name, **data)
    B = budget(s)
    points = starting_points(params, s["population"], seed)
    # Tune's view of the same space (stock PBT resamples from it).
    lr, momentum = (next(p for p in params if p.key == k) for k in ("optim.lr", "plora.momentum"))
    assert None not in (lr.low, lr.high, momentum.low, momentum.high)
    space = {
        "optim.lr": tune.loguniform(float(lr.low or 0), float(lr.high or 0)),
        "plora.momentum": tune.uniform(float(momentum.low or 0), float(momentum.high or 0)),
    }
    ledger = ComputeLedger(B if method == "tpe_asha" else None)
    scheduler: Any = None
    search_alg: Any = BasicVariantGenerator(points_to_evaluate=points, random_state=seed)
    num_samples = len(points)
    if method == "tpe_asha":
        # group is experimental in Optuna; the product silences the warning too.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        )
        searcher = ProxyOptunaSearch(
            space=functools.partial(_define_by_run, params=params),
            metric=TPE_VALUE,
            mode="min",
            sampler=sampler,
        )
        search_alg = ConcurrencyLimiter(searcher, max_concurrent=int(s["cpus"] // s["trial_cpus"]))
        stage_samples = s["unload_every"] * s["batch"]
        scheduler = ASHAScheduler(
            time_attr="samples",
            metric=PROXY,
            mode="min",
            grace_period=stage_samples,
            reduction_factor=2,
            max_t=s["steps"] * s["batch"],
            stop_last_trials=False,
        )
        space, num_samples = {}, s["tpe_max_trials"]
    elif method == "stock_pbt":
        random.seed(seed)  # Tune's PBT draws parents and perturbations from `random`
        np.random.seed(seed)  # and resamples through numpy
        scheduler = PopulationBasedTraining(
            time_attr="step",
            metric=PROXY,
            mode="min",
            perturbation_interval=s["stock_pbt_interval"],
            hyperparam_mutations=dict(space),
            quantile_fraction=spec.quantile_fraction,
            resample_probability=spec.resample_probability,
            perturbation_factors=spec.perturbation_factors,
            custom_explore_fn=functools.partial(_clip_to_space, params),
            require_attrs=False,
        )
    elif method == "pbt_unload":
        scheduler = UnloadPBT(spec, params, storage, name, seed)
    trainable = tune.with_resources(
        tune.with_parameters(search_trial, job=job), {"cpu": s["trial_cpus"]}
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            stop=ledger,
            verbose=0,
            failure_config=tune.FailureConfig(fail_fast=True),
        ),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    wall = time.perf_counter() - t0
    if grid.errors:
        raise RuntimeError(f"{name}: {len(grid.errors)} trial(s) failed: {grid.errors[0]}")
    trials = []
    for i in range(len(grid)):
        r = grid[i]
        tid = str(r.metrics.get("trial_id")) if r.metrics else os.path.basename(r.path)
        params_now, pbt_state = split_trial_config(dict(r.config or {}))
        trials.append(
            {
                "trial_id": tid,
                "config": params_now,
                "forked_from": ((pbt_state or {}).get("fork") or {}).get("from"),
                "finished": tid in ledger.finished,
                **ledger.finished.get(tid, {}),
            }
        )
    curve = anytime_curve(ledger.events, ledger.total)
    forks = getattr(scheduler, "forks", None)
    if method == "stock_pbt":
        forks = scheduler._num_perturbations  # Tune's PBT count of exploits (private attribute)
    return {
        "method": label or method,
        "seed": seed,
        "budget": B,
        "compute": ledger.total,
        "compute_fraction": ledger.total / B,
        "best": curve[-1][1] if curve else None,
        "curve": curve,
        "trials_started": len(grid),
        "trials_finished": len(ledger.finished),
        "forks": forks,
        "points": points if method != "tpe_asha" else None,
        "trials": trials,
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        extra=[("--tiny", "the test's run: one seed, a population of 2, 8-step trials")],
    )
    started = time.time()
    s = settings(args.quick, tiny=args.tiny)
    torch.set_num_threads(s["cpus"])
    # Intermediate reports carry no objective (as in the product: plora_ray.tune_adapter).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base_s = s["base"]
    tokenizer = load_tokenizer(model_config(base_s))
    pad_id = int(tokenizer.pad_token_id)
    corpus = load_corpus(base_s, tokenizer)
    base, pretrain_info = pretrain_base(base_s, corpus)  # cached after its first build
    print(f"base: {pretrain_info}", flush=True)
    val, test = corpus.val[: s["val_dialogues"]], corpus.test[: s["test_dialogues"]]
    base_test = pooled_loss(*answer_nll(base, test, pad_id))
    data = {
        "base_path": pretrain_info["path"],
        "finetune": corpus.finetune,
        "val": val,
        "test": test,
        "pad_id": pad_id,
    }
    # Short paths: Ray's socket paths must stay under AF_UNIX's 107 bytes.
    ray_dir = tempfile.mkdtemp(prefix="sq", dir="/tmp")
    storage = tempfile.mkdtemp(prefix="sqs", dir="/tmp")
    searches: list[dict[str, Any]] = []
    try:
        ray.init(
            address="local",
            num_cpus=s["cpus"],
            include_dashboard=False,
            _temp_dir=ray_dir,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
        half = {**s, "population": max(2, s["population"] // 2)}
        for seed in s["seeds"]:
            runs = [(m, s, None) for m in METHODS] + [("pbt_unload", half, HALF)]
            for method, settings_, label in runs:
                r = run_search(method, seed, settings_, data, storage, label)
                searches.append(r)
                print(
                    f"  {r['method']:<15} seed {seed}: best {r['best']:.4f} compute "
                    f"{r['compute']}/{r['budget']} trials {r['trials_finished']}/"
                    f"{r['trials_started']} forks {r['forks']} ({r['wall_s']:.0f} s)",
                    flush=True,
                )
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
        shutil.rmtree(ray_dir, ignore_errors=True)

    B = budget(s)
    by = {(r["method"], r["seed"]): r for r in searches}
    for r in searches:
        target = by[("tpe_asha", r["seed"])]["best"]
        r["tpe_best"] = target
        r["compute_to_tpe_best"] = (
            compute_to_reach(r["curve"], target, B) if target is not None else None
        )
    level = s["interval_level"]
    shown = (*METHODS, HALF)
    for r in searches:
        r["compute_fraction_of_B"] = r["compute"] / B
    best_objective = {
        m: mean_interval([by[(m, sd)]["best"] for sd in s["seeds"]], level) for m in shown
    }
    fractions = {
        m: fraction_summary([by[(m, sd)]["compute_to_tpe_best"] for sd in s["seeds"]])
        for m in shown
    }
    # pbt_unload's compute to TPE + ASHA's best: the smaller of its two runs' (B/2, then B).
    earliest = []
    for sd in s["seeds"]:
        reached = [
            f for f in (by[(m, sd)]["compute_to_tpe_best"] for m in (HALF, "pbt_unload")) if f
        ]
        earliest.append(min(reached) if reached else None)
    diff = mean_interval(
        [by[("pbt_unload", sd)]["best"] - by[("tpe_asha", sd)]["best"] for sd in s["seeds"]],
        level,
    )
    headline: dict[str, Any] = {
        "pbt_unload_compute_to_tpe_best": fraction_summary(earliest),
        "pbt_unload_full_budget_compute_to_tpe_best": fractions["pbt_unload"],
        "pbt_unload_half_budget_compute_to_tpe_best": fractions[HALF],
        "stock_pbt_compute_to_tpe_best": fractions["stock_pbt"],
        "random_compute_to_tpe_best": fractions["random"],
        "best_objective": best_objective,
        "pbt_unload_minus_tpe_asha_best": diff,
        "budget_samples": B,
        "base_test_nll": base_test,
    }
    print_table(
        f"search quality at equal compute (B = {B} samples; test answer NLL, lower is better; "
        f"{level:.0%} t interval over {len(s['seeds'])} seeds)",
        [
            {
                "method": m,
                "best_objective": best_objective[m]["mean"],
                "lo": best_objective[m]["lo"],
                "hi": best_objective[m]["hi"],
                "compute_to_tpe_best": fractions[m]["mean"],
                "reached": fractions[m]["reached"],
                "compute/B": float(
                    np.mean([by[(m, sd)]["compute_fraction_of_B"] for sd in s["seeds"]])
                ),
                "finished/started": "+".join(
                    f"{by[(m, sd)]['trials_finished']}/{by[(m, sd)]['trials_started']}"
                    for sd in s["seeds"]
                ),
            }
            for m in shown
        ],
    )
    details = {
        "settings": s,
        "pretrain": pretrain_info,
        "compute_accounting": (
            "samples: each training sample of an optimizer step is one; each dialogue scored "
            "(proxy on validation, TPE's final validation value, the objective on test) is one; "
            "a trial's total includes work it later discards (forks); the search's total is "
            "the sum of its trials' newest totals, in the order Tune receives the reports"
        ),
        "per_trial_cost": {
            "random": trial_cost(s, 0),
            "tpe_asha": trial_cost(s, unload_proxy_points(s), final_val=True),
            "stock_pbt": trial_cost(s, stock_proxy_points(s)),
            "pbt_unload": trial_cost(s, unload_proxy_points(s)),
            HALF: trial_cost(s, unload_proxy_points(s)),
        },
        "half_population": max(2, s["population"] // 2),
        "unreached_counts_as": 1.0,
        "searches": searches,
    }
    return write_result("search_quality", args.quick, headline, details, args.out, started)


if __name__ == "__main__":
    # Through the package path, so Ray's workers unpickle the trial function by reference.
    from benchmarks.search_quality import main as package_main

    package_main()
