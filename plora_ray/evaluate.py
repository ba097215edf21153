"""Evaluation: GSM8K, MMLU and ARC through lm-evaluation-harness, plus a cheap NLL proxy.

Three entry points:

- ``evaluate_model(model, tokenizer, ev)``: the in-memory model (inside a trial). The model is
  wrapped in lm-eval's ``HFLM`` and the tasks of ``plora_ray.tasks`` (the stock lm-eval task
  configs on the local data) run through ``lm_eval.evaluator.evaluate``. With ``world_size > 1``
  and ``ev.sharded`` the documents are split across ranks: see ``plora_ray.eval_sharding``.
  It adds the cheap proxy objective of ``plora_ray.proxy`` (``gsm8k_nll``, ``mmlu_nll``).
- ``run_tasks(lm, ev)``: the same tasks with any lm-eval LM (where another backend plugs in).
- ``eval_command(args)``: ``plora-ray eval --model DIR ...`` on an exported checkpoint.

The flat ``objectives`` map holds plain floats: ``gsm8k`` (exact match, strict-match filter),
``gsm8k_flexible`` (flexible-extract), ``mmlu`` and ``mmlu_{humanities,stem,social_sciences,other}``
(acc, subject accuracies weighted by subject size as lm-eval's mmlu group does), ``arc_easy``,
``arc_challenge`` (acc) with ``_norm`` variants (acc_norm), ``gsm8k_nll`` and ``mmlu_nll``.

ARC caveat: the shipped ARC items are padded or cut to exactly 4 choices (3-choice items carry a
duplicated option, 5-choice items lose the fifth), so about 0.5% of ARC items cannot score exactly
as the stock ``arc_easy``/``arc_challenge`` tasks would on the hub data.

Backend: ``ev.backend`` is ``"hf"`` (transformers forward passes through ``HFLM``). lm-eval's vLLM
backend (``lm_eval.models.vllm_causallms.VLLM``) is the speed anchor for generation on GPUs; it
loads a model from a directory, so it fits ``eval_command`` on an exported checkpoint: adding it
means a ``"vllm"`` value here, constructing ``VLLM(pretrained=DIR, ...)`` instead of ``HFLM`` and
the ``vllm`` package in the environment. The tasks are unchanged.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

# Sets the hub's offline switches before lm-eval (and through it `datasets` and the hub client)
# is first imported: no machine of this project reaches a hub.
import plora_ray.tasks.offline  # noqa: F401

# isort: split
from lm_eval.api.model import LM
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.utils import handle_non_serializable, make_table

from plora_ray.config import EvalConfig, ModelConfig
from plora_ray.eval_sharding import broadcast_from_rank0, check_distributed, shard_lm
from plora_ray.eval_state import eval_mode, preserved_rng
from plora_ray.inputs_check import model_dir_problems
from plora_ray.model import load_model, load_tokenizer
from plora_ray.proxy import proxy_nll
from plora_ray.tasks import (
    TASK_NAMES,
    DataError,
    as_task_dict,
    build_tasks,
    check_data,
    check_task_names,
    fixed_subsample,
)
from plora_ray.tasks.local_data import data_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Seeds lm-eval's simple_evaluate uses by default (random 0; numpy, torch, few-shot 1234), so a
# run here samples the same few-shot examples as `lm_eval --tasks ...` would.
RANDOM_SEED, OTHER_SEED = 0, 1234

# objective name -> (result entry, metric key) in lm-eval's results["results"].
OBJECTIVE_KEYS: dict[str, tuple[str, str]] = {
    "gsm8k": ("gsm8k", "exact_match,strict-match"),
    "gsm8k_flexible": ("gsm8k", "exact_match,flexible-extract"),
    "mmlu": ("mmlu", "acc,none"),
    "mmlu_humanities": ("mmlu_humanities", "acc,none"),
    "mmlu_stem": ("mmlu_stem", "acc,none"),
    "mmlu_social_sciences": ("mmlu_social_sciences", "acc,none"),
    "mmlu_other": ("mmlu_other", "acc,none"),
    "arc_easy": ("arc_easy", "acc,none"),
    "arc_easy_norm": ("arc_easy", "acc_norm,none"),
    "arc_challenge": ("arc_challenge", "acc,none"),
    "arc_challenge_norm": ("arc_challenge", "acc_norm,none"),
}


@dataclass
class EvalResult:
    """What an evaluation returns.

    Attributes:
        objectives: flat ``{name: float}`` (see the module docstring).
        results: lm-eval's results structure (results, groups, group_subtasks, configs, versions,
            n-shot, higher_is_better, n-samples) plus a ``config`` entry with our settings.
        seconds: wall time of the whole evaluation.
        seconds_per_task: wall time per top-level task, and ``proxy_nll``.
    """

    objectives: dict[str, float]
    results: dict[str, Any]
    seconds: float
    seconds_per_task: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """lm-eval's structure plus ``objectives``, ``seconds``, ``seconds_per_task``."""
        return {
            **self.results,
            "objectives": dict(self.objectives),
            "seconds": self.seconds,
            "seconds_per_task": dict(self.seconds_per_task),
        }


# --------------------------------------------------------------------------- lm-eval models


class LocalHFLM(HFLM):
    """lm-eval's HFLM around an in-memory model, with our default cap on generated tokens.

    HFLM's default cap on generated tokens is a fixed 256; a task's own max_gen_toks in its
    generation_kwargs still wins over this, as in lm-eval.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        batch_size: requests per forward pass.
        max_gen_toks: the cap on generated tokens where a task sets none (``eval.max_gen_toks``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        max_gen_toks: int,
    ) -> None:
        self._default_max_gen_toks = max_gen_toks
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    @property
    def max_gen_toks(self) -> int:
        return self._default_max_gen_toks


# --------------------------------------------------------------------------- helpers


def objectives_from_results(results: dict[str, Any]) -> dict[str, float]:
    """The flat objectives (plain floats) found in an lm-eval results structure."""
    out: dict[str, float] = {}
    table = results.get("results", {})
    for name, (entry, key) in OBJECTIVE_KEYS.items():
        value = table.get(entry, {}).get(key)
        if isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _merge_results(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        else:
            into[key] = value


def _validate(ev: EvalConfig) -> None:
    check_task_names(list(ev.tasks))
    if ev.backend != "hf":
        raise ValueError(f"eval.backend: expected 'hf', found {ev.backend!r}")
    if ev.limit is not None and ev.limit < 1:
        raise ValueError(f"eval.limit: expected an integer >= 1 or null, found {ev.limit!r}")
    if ev.batch_size < 1:
        raise ValueError(f"eval.batch_size: expected an integer >= 1, found {ev.batch_size!r}")
    unknown = [k for k in ev.num_fewshot if k not in TASK_NAMES]
    if unknown:
        raise ValueError(
            f"eval.num_fewshot: unknown task {', '.join(map(repr, unknown))}; "
            f"expected names from {', '.join(TASK_NAMES)}"
        )


# --------------------------------------------------------------------------- evaluation


def run_tasks(
    lm: LM, ev: EvalConfig, tasks: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, float]]:
    """Evaluate ``ev.tasks`` with any lm-eval LM through ``lm_eval.evaluator.evaluate``.

    Seeds as lm-eval's ``simple_evaluate`` does (so few-shot examples match a stock run), runs one
    ``evaluate()`` per top-level task (so each task's wall time is its own), and applies the
    fixed-seed ``ev.limit`` subsample to every leaf task (each MMLU subject gets ``limit``
    documents, as lm-eval's ``--limit`` does). This is where another backend plugs in: pass an
    lm-eval ``VLLM`` instead of ``HFLM``.

    Args:
        lm: an ``lm_eval.api.model.LM``.
        ev: eval settings (tasks, num_fewshot, limit, limit_seed, chat_format, data_dir).
        tasks: prebuilt tasks (``plora_ray.tasks.build_tasks``); built from ``ev`` when None.

    Returns:
        (lm-eval's results structure merged over the tasks, wall seconds per task).

    Raises:
        ValueError: an unknown task or ARC few-shot.
        DataError: a missing data file or column.
    """
    if tasks is None:
        _validate(ev)
        tasks = build_tasks(
            list(ev.tasks), ev.data_dir, dict(ev.num_fewshot), ev.limit, ev.limit_seed
        )
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with preserved_rng():
        for name, obj in tasks.items():
            _run_one(lm, ev, name, obj, results, seconds)
    return results, seconds


def _run_one(
    lm: LM, ev: EvalConfig, name: str, obj: Any, results: dict[str, Any], seconds: dict[str, float]
) -> None:
    """One top-level task through lm_eval.evaluator.evaluate, merged into ``results``."""
    t0 = time.perf_counter()
    task_dict = as_task_dict(obj)
    samples = {}
    for leaf_name, leaf in task_dict["tasks"].items():
        leaf.set_fewshot_seed(seed=OTHER_SEED)
        # Tasks built with ev.limit hold the subsample already (then idx is None); prebuilt
        # full tasks get the same documents through lm-eval's `samples`.
        idx = fixed_subsample(leaf_name, len(leaf.eval_docs), ev.limit, ev.limit_seed)
        if idx is not None:
            samples[leaf_name] = idx
    random.seed(RANDOM_SEED)
    np.random.seed(OTHER_SEED)
    torch.manual_seed(OTHER_SEED)
    part = evaluate(
        lm=lm,
        task_dict=task_dict,
        samples=samples or None,
        log_samples=False,
        apply_chat_template=ev.chat_format,
        fewshot_as_multiturn=ev.chat_format,
    )
    if part is None:
        raise RuntimeError(
            f"lm-eval returned no results for {name} on rank {lm.rank}; pass "
            "an LM that reports rank 0 (shard_lm does)"
        )
    _merge_results(results, dict(part))
    seconds[name] = time.perf_counter() - t0


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ev: EvalConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Run the lm-eval tasks of ``ev.tasks`` (and the NLL proxy) on an in-memory model.

    Call it on every rank. With ``world_size > 1`` and ``ev.sharded`` each rank scores a
    deterministic share of the documents and all ranks get the same result; without
    ``ev.sharded`` rank 0 scores everything and broadcasts the result. Under DeepSpeed ZeRO-3
    the parameters are partitioned and a forward pass is a collective: pass an unpartitioned
    model (the ranks here run different numbers of forward passes).

    The model's train/eval mode and the global RNG states are restored afterwards.

    Args:
        model: a causal LM (transformers ``PreTrainedModel``, or a peft model around one).
        tokenizer: its tokenizer (with a chat template when ``ev.chat_format``).
        ev: the eval settings (tasks, num_fewshot, limit + limit_seed, chat_format, batch_size,
            max_gen_toks, data_dir, backend, sharded, proxy_samples).
        rank: this process's rank in the default torch.distributed group.
        world_size: the group's size.

    Returns:
        EvalResult with lm-eval's results, flat objectives and wall times.

    Raises:
        ValueError: an unknown task or backend, ARC few-shot, bad rank/world_size.
        DataError: a missing data file or column (raised before any forward pass).
        RuntimeError: world_size > 1 without an initialized process group.
    """
    _validate(ev)
    check_distributed(rank, world_size)
    with preserved_rng():
        return _evaluate_model(model, tokenizer, ev, rank, world_size)


def _evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ev: EvalConfig,
    rank: int,
    world_size: int,
) -> EvalResult:
    start = time.perf_counter()
    # Build (and so validate) every task before the model does any work, on every rank (also
    # those that will only wait for rank 0's broadcast): a bad data file then fails all ranks
    # alike instead of leaving the others blocked in a collective.
    tasks = build_tasks(list(ev.tasks), ev.data_dir, dict(ev.num_fewshot), ev.limit, ev.limit_seed)
    sharded = world_size > 1 and ev.sharded
    runs_here = sharded or rank == 0

    payload: tuple[dict[str, Any], dict[str, float], dict[str, float]] | None = None
    if runs_here:
        with eval_mode(model):
            lm: LM = LocalHFLM(model, tokenizer, ev.batch_size, ev.max_gen_toks)
            if sharded:
                lm = shard_lm(lm, rank, world_size)
            results, seconds = run_tasks(lm, ev, tasks)
            t0 = time.perf_counter()
            proxy = proxy_nll(
                model,
                tokenizer,
                ev,
                rank=rank if sharded else 0,
                world_size=world_size if sharded else 1,
            )
            if proxy:
                seconds["proxy_nll"] = time.perf_counter() - t0
        results["config"] = {
            "backend": ev.backend,
            "batch_size": ev.batch_size,
            "limit": ev.limit,
            "limit_seed": ev.limit_seed,
            "num_fewshot": dict(ev.num_fewshot),
            "chat_format": ev.chat_format,
            "max_gen_toks": ev.max_gen_toks,
            "data_dir": str(data_root(ev.data_dir)),
            "world_size": world_size,
            "sharded": sharded,
            "lm_eval_version": _lm_eval_version(),
            "model": getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
        }
        objectives = objectives_from_results(results)
        objectives.update(proxy)
        payload = (results, objectives, seconds)
    if world_size > 1 and not sharded:
        payload = broadcast_from_rank0(payload, rank)
    assert payload is not None
    results, objectives, seconds = payload
    return EvalResult(
        objectives=objectives,
        results=results,
        seconds=time.perf_counter() - start,
        seconds_per_task=seconds,
    )


def _lm_eval_version() -> str:
    return version("lm_eval")


# --------------------------------------------------------------------------- command line


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """Raise FileNotFoundError naming what a Hugging Face model directory lacks.

    Args:
        path: the ``--model`` directory.

    Raises:
        FileNotFoundError: no directory, no config.json, no weights (or an index naming missing
            shards), or no tokenizer files.
    """
    d = Path(path).expanduser()
    problems = model_dir_problems("--model", d)
    if problems:
        raise FileNotFoundError("; ".join(problems))
    return d


def _checkpoint_dtype(model_dir: Path) -> str:
    """The dtype saved in config.json (lm-eval's dtype='auto'), as a ModelConfig.dtype name."""
    cfg = json.loads((model_dir / "config.json").read_text())
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def eval_command(args: Any) -> int:
    """``plora-ray eval``: evaluate an exported model directory; print a table, write JSON.

    Args:
        args: parsed arguments with model, tasks (comma-separated), num_fewshot, limit,
            batch_size, chat_format, data_dir, out.

    Returns:
        0 on success, 2 on bad input (message on stderr, before the model is loaded).
    """
    names = [t.strip() for t in str(args.tasks).split(",") if t.strip()]
    defaults = EvalConfig()
    if args.num_fewshot is not None:
        shots = dict.fromkeys(names, args.num_fewshot)
    else:
        shots = {k: v for k, v in defaults.num_fewshot.items() if k in names}
    ev = EvalConfig(
        tasks=names,
        num_fewshot=shots,
        limit=args.limit,
        batch_size=args.batch_size,
        chat_format=bool(args.chat_format),
        data_dir=args.data_dir,
    )
    try:
        _validate(ev)
        check_data(names, ev.data_dir)
        model_dir = check_model_dir(args.model)
        if any(n.startswith("arc_") and shots.get(n, 0) > 0 for n in names):
            raise ValueError(
                "--num-fewshot: ARC runs 0-shot here (only its test split is "
                "shipped); evaluate ARC separately with --num-fewshot 0"
            )
        dtype: Any = _checkpoint_dtype(model_dir)
        mcfg = ModelConfig(path=str(model_dir), dtype=dtype)
        tokenizer = load_tokenizer(mcfg)
        model = load_model(mcfg)
    except (ValueError, FileNotFoundError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        # transformers wraps Module.to with functools.wraps, so mypy sees the unbound signature.
        model = model.to("cuda")  # type: ignore[arg-type]
    result = evaluate_model(model, tokenizer, ev)
    print(make_table(result.results))
    if "groups" in result.results:
        print(make_table(result.results, "groups"))
    width = max(len(k) for k in result.objectives) if result.objectives else 10
    print("objectives:")
    for k, v in result.objectives.items():
        print(f"  {k:<{width}}  {v:.4f}")
    print(
        "seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds_per_task.items())
        + f"; total {result.seconds:.1f}"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.as_dict(), indent=2, default=handle_non_serializable))
        print(f"wrote {out}")
    return 0


__all__ = [
    "OBJECTIVE_KEYS",
    "EvalResult",
    "check_model_dir",
    "eval_command",
    "evaluate_model",
    "LocalHFLM",
    "objectives_from_results",
    "run_tasks",
]
