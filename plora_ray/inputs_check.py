"""The run's inputs checked on the driver before Ray starts: data sources, eval data, the model.

A config can be valid and still name inputs a trial cannot use: a JSONL with a corrupt line, a
directory that is not a ``datasets`` dataset, a model directory without weights, a hub id on a
machine that cannot reach the hub. Found inside a trial, each costs a Ray start and a worker
(and, in a search, fails every trial the same way). ``check_inputs`` finds them first and raises
one ``ConfigError`` listing every problem, with the file and line or the key, the expected and
the found value. ``plora-ray validate``, ``train`` and ``search`` call it.

What is read:

* each ``data.sources[i]``: parsed and validated by the loader itself
  (``data.sources.load_source(..., sample=True)``: one reader, one set of rules), on its head
  only: the first ``SAMPLE_BYTES`` of a JSONL file, the first ``SAMPLE_ROWS`` rows of a dataset;
* ``eval.data_dir`` when set (the bundled benchmark files are checked by the test suite): every
  file the configured tasks need (``tasks.check_data``);
* ``model.path`` / ``model.tokenizer``: a local directory needs config.json, weights
  (``*.safetensors`` / ``*.bin``, or a sharded index whose every shard exists) and tokenizer
  files; a hub id must be in the local Hugging Face cache or, when the hub client is not offline
  (``HF_HUB_OFFLINE``), ``huggingface.co`` must answer within ``HUB_TIMEOUT_S``. The tiny model
  built from ``model.tiny`` needs no file; a ``bundled:`` name is checked as the shipped
  directory it stands for.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import try_to_load_from_cache

from plora_ray.config import ConfigError, RunConfig, resolve_model_path
from plora_ray.data.sources import SAMPLE_BYTES, SAMPLE_ROWS, load_source
from plora_ray.tasks import DataError, check_data

__all__ = [
    "HUB_TIMEOUT_S",
    "SAMPLE_BYTES",
    "SAMPLE_ROWS",
    "check_inputs",
    "data_problems",
    "model_problems",
]

# How long the reachability check of the hub waits: a refused hub id costs seconds, not the
# minute and more from_pretrained spends retrying.
HUB_TIMEOUT_S = 3.0
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_inputs(cfg: RunConfig, source: str | None = None) -> None:
    """Read the data sources, the eval data and the model's files of a validated run config.

    Args:
        cfg: a run config that passed ``load_config`` (source paths already absolute).
        source: the YAML file the config came from, named at the head of each problem.

    Raises:
        ConfigError: every problem found, each naming the key and the file (and line) at fault.
    """
    problems = data_problems(cfg) + model_problems(cfg)
    if problems:
        raise ConfigError(problems, source)


def data_problems(cfg: RunConfig) -> list[str]:
    """The problems of each training source (its head) and of ``eval.data_dir`` when set."""
    problems = []
    for i, source in enumerate(cfg.data.sources):
        try:
            load_source(source, skip_invalid=cfg.data.skip_invalid, sample=True)
        except (ValueError, FileNotFoundError) as exc:
            problems.append(f"data.sources[{i}]: {exc}")
    evaluates = cfg.eval.at_end or cfg.eval.proxy_samples > 0
    if cfg.eval.data_dir is not None and evaluates:
        try:
            check_data(cfg.eval.tasks, cfg.eval.data_dir)
        except (DataError, ValueError) as exc:
            problems.append(f"eval.data_dir: {exc}")
    return problems


def model_problems(cfg: RunConfig) -> list[str]:
    """The problems of ``model.path`` and ``model.tokenizer`` (none for the tiny model)."""
    m = cfg.model
    problems = []
    if m.path is not None:
        problems += _source_problems("model.path", m.path, tokenizer_too=m.tokenizer is None)
    if m.tokenizer is not None:
        problems += _source_problems("model.tokenizer", m.tokenizer, tokenizer_only=True)
    return problems


def _source_problems(
    key: str, value: str, *, tokenizer_too: bool = True, tokenizer_only: bool = False
) -> list[str]:
    local = Path(resolve_model_path(value)).expanduser()
    if local.is_dir():
        return _directory_problems(key, local, tokenizer_too, tokenizer_only)
    problem = _hub_problem(key, value, "tokenizer_config.json" if tokenizer_only else "config.json")
    return [problem] if problem else []


def model_dir_problems(key: str, d: Path) -> list[str]:
    """What a Hugging Face model directory lacks (config.json, weights, tokenizer files); [] when
    it has them. Shared by the run pre-flight and ``plora-ray eval --model``.

    Args:
        key: how the message names the setting (``model.path``, ``--model``).
        d: the directory.
    """
    if not d.is_dir():
        return [f"{key}: expected a model directory, found no directory at {str(d)!r}"]
    problems = _directory_problems(key, d, tokenizer_too=False, tokenizer_only=False)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        problems.append(
            f"{key}: expected a tokenizer ({' or '.join(TOKENIZER_FILES)}) in {str(d)!r}, "
            "found none"
        )
    return problems


def _directory_problems(key: str, d: Path, tokenizer_too: bool, tokenizer_only: bool) -> list[str]:
    """What a Hugging Face model directory lacks: config.json, weights, tokenizer files."""
    problems = []
    if not tokenizer_only:
        if not (d / "config.json").is_file():
            problems.append(f"{key}: expected config.json in {str(d)!r}, found none")
        problems += _weight_problems(key, d)
    if (tokenizer_too or tokenizer_only) and not any((d / f).is_file() for f in TOKENIZER_FILES):
        what = f"{key}" if tokenizer_only else f"{key} (model.tokenizer unset)"
        problems.append(
            f"{what}: expected tokenizer files ({' or '.join(TOKENIZER_FILES)}) in {str(d)!r}, "
            "found none (set model.tokenizer to a directory that has them)"
        )
    return problems


def _weight_problems(key: str, d: Path) -> list[str]:
    """No weights at all, or a sharded index that is unreadable or names missing shards."""
    for index_name in WEIGHT_INDEXES:
        index = d / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return [
                f"{index}: expected a JSON object with a 'weight_map' of tensor name -> shard "
                f"file, found {type(exc).__name__}: {exc}"
            ]
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            return [
                f"{index}: expected each shard it names in {str(d)!r}, found "
                f"{len(missing)} of {len(shards)} missing: {', '.join(missing[:5])}"
            ]
        return []
    if any((d / f).is_file() for f in WEIGHT_FILES) or any(d.glob("*.safetensors")):
        return []
    return [
        f"{key}: expected weights in {str(d)!r} ({' or '.join(WEIGHT_FILES)}, or shards with "
        f"{' or '.join(WEIGHT_INDEXES)}), found none"
    ]


def _offline() -> bool:
    """The hub client's offline switch, as it reads it (``plora_ray.tasks.offline`` sets it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable() -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``HUB_TIMEOUT_S``."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=HUB_TIMEOUT_S):
            return True
    except OSError:
        return False


def _hub_problem(key: str, repo_id: str, probe_file: str) -> str | None:
    """None when a hub id can be loaded here: in the local cache, or the hub is reachable."""
    try:
        cached = try_to_load_from_cache(repo_id, probe_file)
    except ValueError:  # not a valid repo id, so not a hub id either
        return (
            f"{key}: expected an existing local directory or a hub id 'org/name', found {repo_id!r}"
        )
    if isinstance(cached, str):
        return None
    hint = (
        f"download it (hf download {repo_id} --local-dir DIR) and set {key}: DIR (an absolute "
        "path, or one relative to the YAML file)"
    )
    if _offline():
        return (
            f"{key}: expected a local directory or a hub id in the local Hugging Face cache, "
            f"found hub id {repo_id!r}, which is not cached, and the hub is offline here "
            f"(HF_HUB_OFFLINE=1; plora-ray sets it unless HF_HUB_OFFLINE=0 is set): {hint}"
        )
    if not _hub_reachable():
        return (
            f"{key}: expected a local directory or a reachable hub id, found hub id "
            f"{repo_id!r} and no answer from the hub within {HUB_TIMEOUT_S:.0f} s: {hint}"
        )
    return None
