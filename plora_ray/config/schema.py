"""The run-config schema: one dataclass per YAML section, each checking its own values.

Every default lives here, and the defaults reproduce the PLoRA paper (arXiv 2402.16141): AdamW with
constant LR 1e-4 and beta2 0.99, global batch 24, rank 8 on all seven LLaMA linear layers, an
unload every 4.8k samples.

Each section reports its problems with ``problems(prefix)``: its fields' types first, then their
ranges, each message naming the dotted key (``prefix.field``), the expected and the found value.
The loader (``config_from_dict``) concatenates the problems of every section, so all problems of a
file are reported together; ``check_section`` raises them for a section built in Python, such as
the ``PLoRAConfig`` handed to ``PLoRA(...)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from plora_ray.config.conversion import ConfigError, field_type_problems
from plora_ray.config.stages import stage_problems

# The choices of the string fields, named so that other modules derive their checks from these
# types (``typing.get_args``) instead of repeating the strings.
Method = Literal["plora", "lora", "full"]
UnloadUnit = Literal["samples", "steps"]
UnloadVariant = Literal["exact", "paper_literal"]
# Element-wise roundings of an fp32 sum into the backbone's dtype; from_base re-rounds W_0 + Σ.
ElementRounding = Literal["nearest", "stochastic"]
MergeRounding = Literal[ElementRounding, "from_base"]
LrSchedule = Literal["constant", "warmup_restart", "cosine_restart"]

LLAMA_LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The shipped benchmark files: GSM8K, MMLU, ARC, with SOURCES.md, licenses and MANIFEST.sha256.
BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "benchmark_data"
# Training sources a data.sources entry can name instead of a file: name -> (file, row format).
BUNDLED_SOURCES: dict[str, tuple[Path, str]] = {
    "bundled:gsm8k": (BUNDLED_DATA_DIR / "gsm8k" / "train.jsonl", "gsm8k"),
}
# Models shipped in the package that model.path (or model.tokenizer) can name: name -> its
# directory in Hugging Face layout. Made by ``python -m plora_ray.tiny_base`` (see its MANIFEST).
BUNDLED_MODELS: dict[str, Path] = {
    "bundled:tiny_base": Path(__file__).resolve().parent.parent / "assets" / "tiny_base",
}
# Benchmarks plora_ray.evaluate scores on the bundled data.
EVAL_TASKS = ("gsm8k", "mmlu", "arc_easy", "arc_challenge")

_FIELD_VALUE: Any = object()


class _Checks:
    """The problems of one section, each message keyed under the section's dotted prefix."""

    def __init__(self, section: Any, prefix: str) -> None:
        self.section, self.prefix = section, prefix
        # Types first: a range cannot be checked on a value of the wrong type.
        self.problems = field_type_problems(section, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def need(self, ok: bool, name: str, expected: str, found: Any = _FIELD_VALUE) -> None:
        """Report ``prefix.name: expected ..., found ...`` unless ``ok``."""
        if not ok:
            value = getattr(self.section, name) if found is _FIELD_VALUE else found
            self.problems.append(f"{self.key(name)}: expected {expected}, found {value!r}")


def resolve_model_path(value: str) -> str:
    """The directory a ``bundled:`` model name stands for; any other value unchanged.

    Every place that opens ``model.path`` or ``model.tokenizer`` goes through this, so a config
    (and a trial's stored config) keeps the portable name rather than this machine's path.
    """
    bundled = BUNDLED_MODELS.get(value)
    return str(bundled) if bundled is not None else value


def _looks_local(path: str) -> bool:
    """A hub id is 'org/name'; anything starting with /, ., ~ or with more slashes is a path."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1 or os.path.exists(path)


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

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        for f in dataclasses.fields(self):
            if f.name != "rope_theta":
                c.need(getattr(self, f.name) >= 1, f.name, "an integer >= 1")
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads >= 1:
            c.need(
                self.hidden_size % heads == 0,
                "hidden_size",
                f"a multiple of num_attention_heads ({heads})",
            )
        if kv_heads >= 1:
            c.need(
                heads % kv_heads == 0,
                "num_attention_heads",
                f"a multiple of num_key_value_heads ({kv_heads})",
            )
        return c.problems


@dataclass
class ModelConfig:
    # A local directory, a hub id or a shipped model (bundled:tiny_base), loaded with
    # from_pretrained. At most one of path / tiny; with neither, the tiny model with default
    # fields and random weights is used.
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

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section (the tiny model's included), keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        if (self.path is None) == (self.tiny is None):
            c.problems.append(
                f"{prefix}: expected exactly one of {c.key('path')} (a local directory or hub id) "
                f"and {c.key('tiny')} (a tiny LLaMA config), found path={self.path!r} and "
                f"tiny={'set' if self.tiny else None}"
            )
        if self.tiny is not None:
            c.problems += self.tiny.problems(c.key("tiny"))
        for name in ("path", "tokenizer"):
            value = getattr(self, name)
            if value is not None and value.startswith("bundled:"):
                if value not in BUNDLED_MODELS:
                    hint = difflib.get_close_matches(value, BUNDLED_MODELS, n=1)
                    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                    c.problems.append(
                        f"{c.key(name)}: expected a local directory, a hub id or one of the "
                        f"shipped models ({', '.join(BUNDLED_MODELS)}), found {value!r}{extra}"
                    )
            elif (
                value is not None and _looks_local(value) and not Path(value).expanduser().is_dir()
            ):
                c.problems.append(
                    f"{c.key(name)}: expected an existing directory or a hub id, found "
                    f"{value!r} (no such directory)"
                )
        return c.problems


@dataclass
class DataSource:
    """One source of chat SFT data.

    ``path`` is a local JSONL file; ``format`` says how its records become dialogues. ``dataset``
    is a ``datasets`` name or local directory loaded with ``datasets.load_dataset`` /
    ``load_from_disk``.
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

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this source, keys under ``prefix`` (``data.sources[i]``)."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        path, dataset = self.path, self.dataset
        bundled = path is not None and path.startswith("bundled:")
        if (path is None) == (dataset is None):
            c.problems.append(
                f"{prefix}: expected exactly one of path and dataset, found "
                f"path={path!r}, dataset={dataset!r}"
            )
        if path is not None and not bundled and not Path(path).expanduser().is_file():
            c.problems.append(
                f"{c.key('path')}: expected an existing JSONL file, found {path!r} (no such file)"
            )
        if bundled and path not in BUNDLED_SOURCES:
            hint = difflib.get_close_matches(str(path), BUNDLED_SOURCES, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            c.problems.append(
                f"{c.key('path')}: expected a JSONL file or one of {', '.join(BUNDLED_SOURCES)}, "
                f"found {path!r}{extra}"
            )
        if bundled and self.format not in ("auto", "gsm8k"):
            c.need(False, "format", f"'auto' or 'gsm8k' for {path}")
        if (
            dataset is not None
            and _looks_local(dataset)
            and not Path(dataset).expanduser().exists()
        ):
            c.problems.append(
                f"{c.key('dataset')}: expected a `datasets` hub name or an existing local "
                f"directory, found {dataset!r} (no such directory)"
            )
        if self.weight is not None and self.count is not None:
            c.problems.append(
                f"{prefix}: expected weight or count, not both, found weight={self.weight!r}, "
                f"count={self.count!r}"
            )
        if self.weight is not None:
            c.need(self.weight > 0, "weight", "a number > 0")
        if self.count is not None:
            c.need(self.count >= 1, "count", "an integer >= 1")
        return c.problems


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

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section and of each source, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(len(self.sources) >= 1, "sources", "at least one source")
        for i, source in enumerate(self.sources):
            c.problems += source.problems(f"{c.key('sources')}[{i}]")
        c.need(self.max_length >= 8, "max_length", "an integer >= 8")
        c.need(self.held_out >= 0, "held_out", "an integer >= 0")
        if self.max_samples is not None:
            c.need(self.max_samples >= 1, "max_samples", "an integer >= 1 or null")
        return c.problems


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_TARGETS))

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.rank >= 1, "rank", "an integer >= 1")
        c.need(self.alpha > 0, "alpha", "a number > 0")
        c.need(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)")
        c.need(len(self.targets) >= 1, "targets", "at least one module name")
        return c.problems


@dataclass
class PLoRAConfig:
    # Unload (merge + reset) every `unload_every` optimizer steps or training samples. A
    # sample-based point that falls inside a step fires at the first step boundary at or after it.
    unload_every: int = 4800
    unload_unit: UnloadUnit = "samples"
    # Fraction of the adapter's update that the adapter keeps across an unload, in [0, 1).
    momentum: float = 0.1
    # "exact": W += (1-m)·ΔW and the adapter keeps m·ΔW (function-preserving, the default).
    # "paper_literal": A and B each scaled by m, as the paper's text says; drops m(1-m)·ΔW.
    variant: UnloadVariant = "exact"
    # How the fp32 update is added into a low-precision backbone: round-to-nearest, stochastic
    # rounding (unbiased, no extra memory of backbone size), or from_base: W = round_nearest(W_0 +
    # all merged updates), W_0 re-read from model.path's *.safetensors (a .bin checkpoint is
    # refused) or a saved copy of the tiny model's, so the error is one rounding, not a random
    # walk (README; benchmarks/merge_precision.py). Recommended for runs; the default stays
    # stochastic because PLoRA(...) called without base_weights (the Python API's callers: tests,
    # benchmarks) cannot use from_base.
    merge_rounding: MergeRounding = "stochastic"
    # Effective rank of W_now - W_0: singular values above rank_threshold * the largest one.
    rank_threshold: float = 0.01
    # How many target layers to sample for the effective-rank metric (0 = none).
    rank_sample_layers: int = 2
    # Settings that change at unloads: [{at: 2, optim.lr: 5.0e-5, plora.momentum: 0.3}, ...].
    # An entry holds from stage `at` on (stage k starts right after unload k); a stage's momentum
    # is the one of the unload ending it, its unload_every its length. Which keys may change,
    # and why the others cannot: plora_ray/config/stages.py.
    stages: list[dict[str, Any]] = field(default_factory=list)

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.unload_every >= 1, "unload_every", "an integer >= 1")
        c.need(0.0 <= self.momentum < 1.0, "momentum", "a number in [0, 1)")
        c.need(0.0 < self.rank_threshold < 1.0, "rank_threshold", "a number in (0, 1)")
        c.need(self.rank_sample_layers >= 0, "rank_sample_layers", "an integer >= 0")
        return c.problems


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    # constant (the paper's), warmup_restart (linear warmup then constant, restarted at each
    # unload), cosine_restart (warmup then cosine decay to min_lr_ratio over a stage).
    schedule: LrSchedule = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.lr > 0, "lr", "a number > 0")
        betas_ok = len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas)
        c.need(betas_ok, "betas", "two numbers in [0, 1)")
        c.need(self.eps > 0, "eps", "a number > 0")
        c.need(self.weight_decay >= 0, "weight_decay", "a number >= 0")
        c.need(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        c.need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "a number in [0, 1]")
        if self.grad_clip is not None:
            c.need(self.grad_clip > 0, "grad_clip", "a number > 0 or null")
        return c.problems


@dataclass
class BatchConfig:
    # Samples per optimizer step over all workers. gradient accumulation =
    # global_batch / (micro_batch * num_workers), which must be a whole number (checked by
    # RunConfig, which sees resources.num_workers).
    global_batch: int = 24
    micro_batch: int = 4

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.global_batch >= 1, "global_batch", "an integer >= 1")
        c.need(self.micro_batch >= 1, "micro_batch", "an integer >= 1")
        return c.problems


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

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.epochs > 0, "epochs", "a number > 0")
        if self.max_steps is not None:
            c.need(self.max_steps >= 1, "max_steps", "an integer >= 1 or null")
        c.need(self.log_every >= 1, "log_every", "an integer >= 1")
        c.need(self.divergence_loss_multiple > 1, "divergence_loss_multiple", "a number > 1")
        c.need(self.divergence_window >= 1, "divergence_window", "an integer >= 1")
        return c.problems


@dataclass
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: int = 2
    bf16: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.zero_stage in (0, 1, 2, 3), "zero_stage", "one of 0, 1, 2, 3")
        return c.problems


@dataclass
class ResourcesConfig:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        c.need(self.num_workers >= 1, "num_workers", "an integer >= 1")
        c.need(self.cpus_per_worker >= 0, "cpus_per_worker", "a number >= 0")
        c.need(self.gpus_per_worker >= 0, "gpus_per_worker", "a number >= 0")
        return c.problems


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

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        for i, task in enumerate(self.tasks):
            if task not in EVAL_TASKS:
                hint = difflib.get_close_matches(task, EVAL_TASKS, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                c.problems.append(
                    f"{c.key('tasks')}[{i}]: expected one of {', '.join(EVAL_TASKS)}, "
                    f"found {task!r}{extra}"
                )
        c.need(self.limit is None or self.limit >= 1, "limit", "an integer >= 1 or null")
        c.need(self.batch_size >= 1, "batch_size", "an integer >= 1")
        c.need(self.max_gen_toks >= 1, "max_gen_toks", "an integer >= 1")
        c.need(self.proxy_samples >= 0, "proxy_samples", "an integer >= 0")
        for task, n in self.num_fewshot.items():
            c.need(n >= 0, f"num_fewshot.{task}", "an integer >= 0", n)
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            c.problems.append(
                f"{c.key('data_dir')}: expected an existing directory, found {self.data_dir!r} "
                "(no such directory)"
            )
        return c.problems


@dataclass
class CheckpointConfig:
    at_unload: bool = True
    every_steps: int | None = None
    keep: int = 2
    export_model: bool = True

    def problems(self, prefix: str) -> list[str]:
        """Every problem of this section, keys under ``prefix``."""
        c = _Checks(self, prefix)
        if c.problems:
            return c.problems
        if self.every_steps is not None:
            c.need(self.every_steps >= 1, "every_steps", "an integer >= 1 or null")
        c.need(self.keep >= 1, "keep", "an integer >= 1")
        return c.problems


@dataclass
class RunConfig:
    seed: int = 0
    method: Method = "plora"
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

    def problems(self, prefix: str = "") -> list[str]:
        """Every problem of every section, in file order, plus the checks across two sections."""
        c = _Checks(self, prefix)
        c.problems += self.model.problems(c.key("model"))
        c.problems += self.data.problems(c.key("data"))
        c.problems += self.lora.problems(c.key("lora"))
        if self.model.tiny is not None and isinstance(self.lora.targets, list):
            # The tiny model is a LLaMA, so its layer names are known before it is built.
            unknown = [t for t in self.lora.targets if t not in LLAMA_LINEAR_TARGETS]
            names = ", ".join(LLAMA_LINEAR_TARGETS)
            c.need(not unknown, "lora.targets", f"names of LLaMA linear layers ({names})", unknown)
        c.problems += self.plora.problems(c.key("plora"))
        c.problems += self.optim.problems(c.key("optim"))
        c.problems += stage_problems(self, prefix)
        c.problems += self.batch.problems(c.key("batch"))
        c.problems += self.resources.problems(c.key("resources"))
        b, workers = self.batch, self.resources.num_workers
        if all(isinstance(n, int) and n >= 1 for n in (b.global_batch, b.micro_batch, workers)):
            per_step = b.micro_batch * workers
            c.need(
                b.global_batch % per_step == 0,
                "batch.global_batch",
                f"a multiple of {c.key('batch.micro_batch')} x {c.key('resources.num_workers')} "
                f"= {b.micro_batch} x {workers} = {per_step}",
                b.global_batch,
            )
        c.problems += self.train.problems(c.key("train"))
        c.problems += self.deepspeed.problems(c.key("deepspeed"))
        c.problems += self.eval.problems(c.key("eval"))
        c.problems += self.checkpoint.problems(c.key("checkpoint"))
        return c.problems


class Section(Protocol):
    """A config section: any dataclass above, which reports its own problems."""

    def problems(self, prefix: str) -> list[str]: ...


def check_section(section: Section, prefix: str) -> None:
    """Raise every problem of a section built in Python (the YAML loader collects them itself).

    Args:
        section: a config section, e.g. the ``PLoRAConfig`` given to ``PLoRA(...)``.
        prefix: the section's dotted key in a run config (``plora``), used in the messages.

    Raises:
        ConfigError: listing each problem, naming the key, the expected and the found value.
    """
    problems = section.problems(prefix)
    if problems:
        raise ConfigError(problems)
