"""Run configuration: YAML -> typed, validated dataclasses.

One schema serves a single training run and a search: a search space is a run config plus a
``search:`` block (see ``plora_ray.search``), and a sampled trial is the run config with dotted keys
overridden (``lora.rank=8``). Every default lives here, and the defaults reproduce the PLoRA paper
(arXiv 2402.16141): AdamW with constant LR 1e-4 and beta2 0.99, global batch 24, rank 8 on all
seven LLaMA linear layers, an unload every 4.8k samples.

Validation collects *all* problems of a file before raising, and each message names the file, the
dotted key, what was expected and what was found, so a bad config fails before Ray starts or a GPU
is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

LLAMA_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """One or more problems in a config file; ``problems`` holds each message.

    Each message starts with the file name when one is known (``smoke.yaml: lora.rank: expected
    an integer >= 1, found 0``), so a message read on its own still says where to look.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        prefix = f"{source}: " if source else ""
        self.problems = [p if not prefix or p.startswith(prefix) else prefix + p for p in problems]
        self.source = source
        where = f" in {source}" if source else " in the config"
        head = f"{len(self.problems)} problem(s){where}"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


# --------------------------------------------------------------------------- schema


@dataclass
class TinyModelConfig:
    """A small LLaMA built from these fields with seeded random weights (the embedded default)."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


@dataclass
class ModelConfig:
    # A local directory or a hub id, loaded with from_pretrained. At most one of path / tiny; with
    # neither, the tiny model with default fields is used (the embedded default).
    path: str | None = None
    tiny: TinyModelConfig | None = None
    # Tokenizer directory or hub id; default: model.path, or the bundled offline tokenizer for tiny.
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # Model code from a hub is never executed unless the user opts in.
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.path is None and self.tiny is None:
            self.tiny = TinyModelConfig()


@dataclass
class DataSource:
    """One source of chat SFT data.

    ``path`` is a local JSONL file; ``format`` says how its records become dialogues. ``dataset`` is a
    ``datasets`` name or local directory loaded with ``datasets.load_dataset`` / ``load_from_disk``.
    ``bundled:gsm8k`` is the GSM8K train split shipped in the package, turned into dialogues.
    """

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    format: Literal["auto", "messages", "conversations", "gsm8k"] = "auto"
    # Mixture: either a relative weight or an absolute count of samples per epoch (not both).
    weight: float | None = None
    count: int | None = None
    name: str | None = None


@dataclass
class DataConfig:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource(path="bundled:gsm8k")])
    max_length: int = 512
    packing: bool = False
    # Skip and count corrupt lines / invalid records instead of failing with file:line.
    skip_invalid: bool = False
    # Samples held out of training, used for the held-out NLL proxy objective.
    held_out: int = 64
    # Cap on training samples per epoch after mixing (None: all).
    max_samples: int | None = None


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_TARGETS))


@dataclass
class PLoRAConfig:
    # Unload (merge + reset) every `unload_every` optimizer steps or training samples. A
    # sample-based point that falls inside a step fires at the first step boundary at or after it.
    unload_every: int = 4800
    unload_unit: Literal["samples", "steps"] = "samples"
    # Fraction of the adapter's update that the adapter keeps across an unload, in [0, 1).
    momentum: float = 0.1
    # "exact": W += (1-m)·ΔW and the adapter keeps m·ΔW (function-preserving, the default).
    # "paper_literal": A and B each scaled by m, as the paper's text says; drops m(1-m)·ΔW.
    variant: Literal["exact", "paper_literal"] = "exact"
    # How the fp32 update is added into a low-precision backbone: round-to-nearest, stochastic
    # rounding (unbiased, no extra memory of backbone size), or from_base: W = round_nearest(W_0 +
    # all merged updates), W_0 re-read from model.path's *.safetensors (a .bin checkpoint is
    # refused) or a saved copy of the tiny model's, so the error is one rounding, not a random
    # walk: 50 unloads of bf16 PLoRA training, cumulative error 0.30% vs 2.7% stochastic (LR
    # 1e-3), 2.0% (the bf16 floor) vs 19% (LR 1e-4); benchmarks/merge_precision.py. Recommended
    # for runs; the default stays stochastic because PLoRA(...) called without base_weights (the
    # Python API's callers: tests, benchmarks) cannot use from_base.
    merge_rounding: Literal["nearest", "stochastic", "from_base"] = "stochastic"
    # Effective rank of W_now - W_0: singular values above rank_threshold * the largest one.
    rank_threshold: float = 0.01
    # How many target layers to sample for the effective-rank metric (0 = none).
    rank_sample_layers: int = 2


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # constant (the paper's), warmup_restart (linear warmup then constant, restarted at each
    # unload), cosine_restart (warmup then cosine decay to min_lr_ratio over a stage).
    schedule: Literal["constant", "warmup_restart", "cosine_restart"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0


@dataclass
class BatchConfig:
    # Samples per optimizer step over all workers. gradient accumulation =
    # global_batch / (micro_batch * num_workers), which must be a whole number.
    global_batch: int = 24
    micro_batch: int = 4


@dataclass
class TrainConfig:
    epochs: float = 1.0
    # Hard caps; whichever comes first ends training (None: no cap).
    max_steps: int | None = None
    log_every: int = 10
    # Divergence guard: NaN/inf loss, or a loss above loss_multiple x its running mean over
    # `window` steps, stops the run with status "diverged".
    divergence_loss_multiple: float = 5.0
    divergence_window: int = 20


@dataclass
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: int = 2
    bf16: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class ResourcesConfig:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["gsm8k", "mmlu"])
    # Few-shot examples per task; a task missing here uses lm-eval's default.
    num_fewshot: dict[str, int] = field(default_factory=lambda: {"gsm8k": 0, "mmlu": 5})
    # Evaluate on a fixed-seed subsample of this many documents per task (None: all).
    limit: int | None = None
    limit_seed: int = 1234
    # Prompt in the training chat format (the paper evaluated in its training prompt format).
    chat_format: bool = False
    batch_size: int = 8
    max_gen_toks: int = 256
    # Directory holding gsm8k/, mmlu/, arc/ like the bundled data; None: the bundled copy.
    data_dir: str | None = None
    backend: Literal["hf"] = "hf"
    # Score on rank 0 only, or shard documents across the trial's workers and gather.
    sharded: bool = True
    # Run the full evaluation at the end of training.
    at_end: bool = True
    # Proxy objective (no generation): NLL of this many GSM8K reference solutions (and MMLU
    # answers), at every multiple of plora.unload_every for every method (so ASHA compares
    # methods at equal samples) and at the end.
    proxy_samples: int = 64


@dataclass
class CheckpointConfig:
    at_unload: bool = True
    every_steps: int | None = None
    keep: int = 2
    export_model: bool = True


@dataclass
class RunConfig:
    seed: int = 0
    method: Literal["plora", "lora", "full"] = "plora"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    plora: PLoRAConfig = field(default_factory=PLoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # The search block of a search space; validated by plora_ray.search, ignored by training.
    search: dict[str, Any] | None = None

    @property
    def grad_accum(self) -> int:
        return self.batch.global_batch // (self.batch.micro_batch * self.resources.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- generic conversion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return name + (" or null" if len(args) < len(get_args(tp)) else "")
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Convert a YAML value to ``tp``; append a problem (and return None) when it does not fit."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sections = [a for a in inner if dataclasses.is_dataclass(a)]
        if sections and isinstance(value, dict):
            # A section given as a mapping: report problems inside it, not "expected a section".
            return _build(sections[0], value, key, problems)
        for a in inner:
            sub: list[str] = []
            out = _convert(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}{extra}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}")
            return None
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}")
            return None
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, problems)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key}: expected {_type_name(tp)}, found {value!r}")
    return None


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or '<top level>'}: expected a mapping (section), found {data!r}")
        return cls()
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            hint = difflib.get_close_matches(str(k), names, n=1)
            extra = (
                f" (did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?)" if hint else ""
            )
            problems.append(f"{key}: unknown key{extra}; expected one of {', '.join(names)}")
            continue
        before = len(problems)
        out = _convert(v, hints[k], key, problems)
        # Keep a section even when a field inside it was bad (that field keeps its default), so
        # the range checks still see the section's other values.
        if len(problems) == before or dataclasses.is_dataclass(out):
            kwargs[k] = out
    return cls(**kwargs)


# --------------------------------------------------------------------------- semantic checks


def _check_ranges(cfg: RunConfig, problems: list[str]) -> None:
    def need(cond: bool, key: str, expected: str, found: Any) -> None:
        if not cond:
            problems.append(f"{key}: expected {expected}, found {found!r}")

    m = cfg.model
    if (m.path is None) == (m.tiny is None):
        problems.append(
            "model: expected exactly one of model.path (a local directory or hub id) and "
            f"model.tiny (a tiny LLaMA config), found path={m.path!r} and tiny={'set' if m.tiny else None}"
        )
    if m.tiny is not None:
        t = m.tiny
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            need(getattr(t, name) >= 1, f"model.tiny.{name}", "an integer >= 1", getattr(t, name))
        if t.num_attention_heads >= 1:
            need(
                t.hidden_size % t.num_attention_heads == 0,
                "model.tiny.hidden_size",
                f"a multiple of num_attention_heads ({t.num_attention_heads})",
                t.hidden_size,
            )
        if t.num_key_value_heads >= 1:
            need(
                t.num_attention_heads % t.num_key_value_heads == 0,
                "model.tiny.num_attention_heads",
                f"a multiple of num_key_value_heads ({t.num_key_value_heads})",
                t.num_attention_heads,
            )
    if m.path is not None and _looks_local(m.path) and not Path(m.path).expanduser().is_dir():
        problems.append(
            f"model.path: expected an existing directory or a hub id, found {m.path!r} "
            "(no such directory)"
        )
    if (
        m.tokenizer is not None
        and _looks_local(m.tokenizer)
        and not Path(m.tokenizer).expanduser().is_dir()
    ):
        problems.append(
            f"model.tokenizer: expected an existing directory or a hub id, found "
            f"{m.tokenizer!r} (no such directory)"
        )

    d = cfg.data
    need(len(d.sources) >= 1, "data.sources", "at least one source", d.sources)
    for i, s in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if (s.path is None) == (s.dataset is None):
            problems.append(
                f"{key}: expected exactly one of path and dataset, found "
                f"path={s.path!r}, dataset={s.dataset!r}"
            )
        if (
            s.path is not None
            and not s.path.startswith("bundled:")
            and not Path(s.path).expanduser().is_file()
        ):
            problems.append(
                f"{key}.path: expected an existing JSONL file, found {s.path!r} (no such file)"
            )
        if s.path is not None and s.path.startswith("bundled:") and s.path not in BUNDLED_SOURCES:
            hint = difflib.get_close_matches(s.path, BUNDLED_SOURCES, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(
                f"{key}.path: expected a JSONL file or one of {', '.join(BUNDLED_SOURCES)}, "
                f"found {s.path!r}{extra}"
            )
        if (
            s.path is not None
            and s.path.startswith("bundled:")
            and s.format not in ("auto", "gsm8k")
        ):
            problems.append(
                f"{key}.format: expected 'auto' or 'gsm8k' for {s.path}, found {s.format!r}"
            )
        if (
            s.dataset is not None
            and _looks_local(s.dataset)
            and not Path(s.dataset).expanduser().exists()
        ):
            problems.append(
                f"{key}.dataset: expected a `datasets` hub name or an existing local "
                f"directory, found {s.dataset!r} (no such directory)"
            )
        if s.weight is not None and s.count is not None:
            problems.append(
                f"{key}: expected weight or count, not both, found weight={s.weight!r}, "
                f"count={s.count!r}"
            )
        if s.weight is not None:
            need(s.weight > 0, f"{key}.weight", "a number > 0", s.weight)
        if s.count is not None:
            need(s.count >= 1, f"{key}.count", "an integer >= 1", s.count)
    need(d.max_length >= 8, "data.max_length", "an integer >= 8", d.max_length)
    need(d.held_out >= 0, "data.held_out", "an integer >= 0", d.held_out)
    if d.max_samples is not None:
        need(d.max_samples >= 1, "data.max_samples", "an integer >= 1 or null", d.max_samples)

    lo = cfg.lora
    need(lo.rank >= 1, "lora.rank", "an integer >= 1", lo.rank)
    need(lo.alpha > 0, "lora.alpha", "a number > 0", lo.alpha)
    need(0.0 <= lo.dropout < 1.0, "lora.dropout", "a number in [0, 1)", lo.dropout)
    need(len(lo.targets) >= 1, "lora.targets", "at least one module name", lo.targets)
    if m.tiny is not None:
        unknown = [t for t in lo.targets if t not in LLAMA_LINEAR_TARGETS]
        need(
            not unknown,
            "lora.targets",
            f"names of LLaMA linear layers ({', '.join(LLAMA_LINEAR_TARGETS)})",
            unknown,
        )

    p = cfg.plora
    need(p.unload_every >= 1, "plora.unload_every", "an integer >= 1", p.unload_every)
    need(0.0 <= p.momentum < 1.0, "plora.momentum", "a number in [0, 1)", p.momentum)
    need(
        0.0 < p.rank_threshold < 1.0, "plora.rank_threshold", "a number in (0, 1)", p.rank_threshold
    )
    need(
        p.rank_sample_layers >= 0,
        "plora.rank_sample_layers",
        "an integer >= 0",
        p.rank_sample_layers,
    )

    o = cfg.optim
    need(o.lr > 0, "optim.lr", "a number > 0", o.lr)
    need(
        len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas if b is not None),
        "optim.betas",
        "two numbers in [0, 1)",
        o.betas,
    )
    need(o.eps > 0, "optim.eps", "a number > 0", o.eps)
    need(o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    need(o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", o.warmup_steps)
    need(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "a number in [0, 1]", o.min_lr_ratio)
    if o.grad_clip is not None:
        need(o.grad_clip > 0, "optim.grad_clip", "a number > 0 or null", o.grad_clip)

    b, r = cfg.batch, cfg.resources
    need(b.global_batch >= 1, "batch.global_batch", "an integer >= 1", b.global_batch)
    need(b.micro_batch >= 1, "batch.micro_batch", "an integer >= 1", b.micro_batch)
    need(r.num_workers >= 1, "resources.num_workers", "an integer >= 1", r.num_workers)
    need(r.cpus_per_worker >= 0, "resources.cpus_per_worker", "a number >= 0", r.cpus_per_worker)
    need(r.gpus_per_worker >= 0, "resources.gpus_per_worker", "a number >= 0", r.gpus_per_worker)
    if b.global_batch >= 1 and b.micro_batch >= 1 and r.num_workers >= 1:
        per_step = b.micro_batch * r.num_workers
        need(
            b.global_batch % per_step == 0,
            "batch.global_batch",
            f"a multiple of batch.micro_batch x resources.num_workers = {b.micro_batch} x "
            f"{r.num_workers} = {per_step}",
            b.global_batch,
        )

    t = cfg.train
    need(t.epochs > 0, "train.epochs", "a number > 0", t.epochs)
    if t.max_steps is not None:
        need(t.max_steps >= 1, "train.max_steps", "an integer >= 1 or null", t.max_steps)
    need(t.log_every >= 1, "train.log_every", "an integer >= 1", t.log_every)
    need(
        t.divergence_loss_multiple > 1,
        "train.divergence_loss_multiple",
        "a number > 1",
        t.divergence_loss_multiple,
    )
    need(
        t.divergence_window >= 1, "train.divergence_window", "an integer >= 1", t.divergence_window
    )

    need(
        cfg.deepspeed.zero_stage in (0, 1, 2, 3),
        "deepspeed.zero_stage",
        "one of 0, 1, 2, 3",
        cfg.deepspeed.zero_stage,
    )

    e = cfg.eval
    for i, task in enumerate(e.tasks):
        if task not in EVAL_TASKS:
            hint = difflib.get_close_matches(task, EVAL_TASKS, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(
                f"eval.tasks[{i}]: expected one of {', '.join(EVAL_TASKS)}, found {task!r}{extra}"
            )
    need(e.limit is None or e.limit >= 1, "eval.limit", "an integer >= 1 or null", e.limit)
    need(e.batch_size >= 1, "eval.batch_size", "an integer >= 1", e.batch_size)
    need(e.max_gen_toks >= 1, "eval.max_gen_toks", "an integer >= 1", e.max_gen_toks)
    need(e.proxy_samples >= 0, "eval.proxy_samples", "an integer >= 0", e.proxy_samples)
    for task, n in e.num_fewshot.items():
        if n is not None:
            need(n >= 0, f"eval.num_fewshot.{task}", "an integer >= 0", n)
    if e.data_dir is not None and not Path(e.data_dir).expanduser().is_dir():
        problems.append(
            f"eval.data_dir: expected an existing directory, found {e.data_dir!r} (no such directory)"
        )

    c = cfg.checkpoint
    if c.every_steps is not None:
        need(c.every_steps >= 1, "checkpoint.every_steps", "an integer >= 1 or null", c.every_steps)
    need(c.keep >= 1, "checkpoint.keep", "an integer >= 1", c.keep)


BUNDLED_SOURCES = ("bundled:gsm8k",)
# Benchmarks plora_ray.evaluate scores (bundled data under plora_ray/data).
EVAL_TASKS = ("gsm8k", "mmlu", "arc_easy", "arc_challenge")


def _looks_local(path: str) -> bool:
    """A hub id is 'org/name'; anything starting with /, ., ~ or with more slashes is a path."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1 or os.path.exists(path)


# --------------------------------------------------------------------------- public API


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``8``, ``0.1``, ``[a, b]``, ``null``).

    Raises:
        ConfigError: when there is no ``=`` or the key is empty.
    """
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected dotted.key=value, found no '='"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError([f"override {text!r}: expected dotted.key=value, found an empty key"])
    return key, yaml.safe_load(raw) if raw.strip() else None


_INDEX = re.compile(r"\[(\d+)\]")


def _split_dotted(dotted: str) -> list[str | int]:
    """``data.sources[0].weight`` or ``data.sources.0.weight`` -> ['data', 'sources', 0, 'weight']."""
    parts: list[str | int] = []
    for part in _INDEX.sub(r".\1", dotted).split("."):
        if part == "":
            continue
        parts.append(int(part) if part.isdigit() else part)
    return parts


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each dotted key set (sections are created as needed).

    A numeric part indexes a list (``data.sources[0].weight=2`` or ``data.sources.0.weight=2``).

    Raises:
        ConfigError: a list index past the end of the list, or an index into something that is
            not a list.
    """
    import copy

    out = copy.deepcopy(data)
    problems: list[str] = []
    for dotted, value in overrides.items():
        node: Any = out
        parts = _split_dotted(dotted)
        if not parts:
            problems.append(f"override {dotted!r}: expected dotted.key=value, found an empty key")
            continue
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(str(p) for p in parts[: depth + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    parent = ".".join(str(p) for p in parts[:depth])
                    found = (
                        f"a list of {len(node)} item(s)"
                        if isinstance(node, list)
                        else f"no list at {parent}"
                    )
                    problems.append(
                        f"override {dotted}: expected {where} to index an existing list "
                        f"item, found {found}"
                    )
                    break
            elif not isinstance(node, dict):
                problems.append(
                    f"override {dotted}: expected a section at {where}, found {type(node).__name__}"
                )
                break
            if last:
                node[part] = value
            else:
                nxt = parts[depth + 1]
                child = node[part] if isinstance(part, int) else node.get(part)
                if isinstance(nxt, str) and not isinstance(child, dict):
                    child = {}
                    node[part] = child
                if child is None:
                    child = {}
                    node[part] = child
                node = child
    if problems:
        raise ConfigError(problems)
    return out


def config_from_dict(
    data: dict[str, Any], source: str | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Build and validate a RunConfig; raise one ConfigError listing every problem.

    Args:
        data: the parsed YAML mapping.
        source: the file name, used in error messages.
        overrides: dotted keys to set before validation (a sampled trial, ``--set``).

    Raises:
        ConfigError: listing all problems, each naming the key, the expected and the found value.
    """
    problems: list[str] = []
    if overrides:
        try:
            data = apply_overrides(data or {}, overrides)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source) from None
    cfg = _build(RunConfig, data, "", problems)
    # Range checks run even after type problems (a bad field keeps its default), so the user
    # sees every problem of the file at once.
    _check_ranges(cfg, problems)
    if problems:
        raise ConfigError([_blame_override(p, overrides or {}) for p in problems], source)
    return cfg


def _blame_override(problem: str, overrides: dict[str, Any]) -> str:
    """Add ``(set by --set KEY=VALUE)`` to a problem about a key an override set, so the user
    looks at the command line rather than the file."""
    key = problem.split(":", 1)[0]
    norm = ".".join(str(p) for p in _split_dotted(key))
    for dotted, value in overrides.items():
        o = ".".join(str(p) for p in _split_dotted(dotted))
        if norm == o or norm.startswith(o + "."):
            shown = yaml.safe_dump(value, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()  # safe_dump ends scalars with '...'
            return f"{problem} (set by override {dotted}={shown})"
    return problem


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"expected an existing YAML file, found no file at {str(p)!r}"], str(p))
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(p)) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"<top level>: expected a mapping, found {type(data).__name__}"], str(p))
    return data


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a run config (or the base config of a search space) from YAML.

    Relative ``data.sources[].path``, ``model.path`` and ``eval.data_dir`` are resolved against the
    YAML file's directory when such a file exists there, so a config can ship beside its data.

    Raises:
        ConfigError: every problem found, naming the file.
    """
    data = resolve_relative_paths(load_yaml(path), Path(path).resolve().parent)
    return config_from_dict(data, source=str(path), overrides=overrides)


def _resolve(value: Any, base_dir: Path, always: bool) -> Any:
    if not isinstance(value, str) or not value or value.startswith("bundled:"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute() or value.startswith("~"):
        return value
    candidate = base_dir / p
    # data.sources[].path is always a file path; the others may be hub ids ("org/name"), so they
    # are only rewritten when the YAML's directory really holds such a path.
    if always or candidate.exists():
        return str(candidate)
    return value


def resolve_relative_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Resolve relative paths of a parsed YAML mapping against ``base_dir`` (the YAML's directory).

    ``data.sources[].path`` is always resolved (it can only be a file); ``data.sources[].dataset``,
    ``model.path``, ``model.tokenizer`` and ``eval.data_dir`` only when that path exists under
    ``base_dir`` (otherwise they may be hub names). Malformed sections are left for validation.
    """
    import copy

    out = copy.deepcopy(data)
    d = out.get("data")
    if isinstance(d, dict) and isinstance(d.get("sources"), list):
        for src in d["sources"]:
            if isinstance(src, dict):
                if "path" in src:
                    src["path"] = _resolve(src["path"], base_dir, always=True)
                if "dataset" in src:
                    src["dataset"] = _resolve(src["dataset"], base_dir, always=False)
    for section, key in (("model", "path"), ("model", "tokenizer"), ("eval", "data_dir")):
        sec = out.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = _resolve(sec[key], base_dir, always=False)
    return out


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "BUNDLED_SOURCES",
    "EVAL_TASKS",
    "LLAMA_LINEAR_TARGETS",
    "ConfigError",
    "RunConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "load_yaml",
    "parse_override",
    "resolve_relative_paths",
]
