"""The shipped tiny pretrained base (``bundled:tiny_base``): its files, its loading through a
config, its quality against a random-initialised twin, and the script that makes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plora_ray.config import BUNDLED_DATA_DIR, ConfigError, ModelConfig, config_from_dict
from plora_ray.inputs_check import model_problems
from plora_ray.model import load_model, load_tokenizer
from plora_ray.tiny_base import MANIFEST_FILE, TINY_BASE_DIR, TINY_BASE_MODEL, file_sha256, main

BUNDLED = ModelConfig(path="bundled:tiny_base", dtype="float32")


def test_shipped_tiny_base_files_match_the_sha256_in_its_manifest() -> None:
    manifest = json.loads((TINY_BASE_DIR / MANIFEST_FILE).read_text())
    shipped = sorted(p.name for p in TINY_BASE_DIR.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["sha256"]) == shipped
    for name, digest in manifest["sha256"].items():
        assert file_sha256(TINY_BASE_DIR / name) == digest, name
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(shipped)
    assert manifest["command"].startswith("python -m plora_ray.tiny_base --out ")
    # A few MB at most: it ships inside the package.
    assert (TINY_BASE_DIR / "model.safetensors").stat().st_size < 4_000_000


def gsm8k_test_nll(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int) -> float:
    """Mean per-token NLL of the first ``n`` GSM8K *test* question+answer texts (never in the
    base's pretraining text)."""
    with open(BUNDLED_DATA_DIR / "gsm8k" / "test.jsonl") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = tokenizer(f"{r['question']}\n{r['answer']}", return_tensors="pt")["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return total / tokens


def test_bundled_tiny_base_loads_by_name_and_beats_random_init_on_gsm8k_test() -> None:
    tokenizer = load_tokenizer(BUNDLED)
    model = load_model(BUNDLED).eval()
    assert model.config.hidden_size == TINY_BASE_MODEL.hidden_size
    assert model.config.num_hidden_layers == TINY_BASE_MODEL.num_hidden_layers
    # The project's tiny tokenizer, chat template included: smoke.yaml trains chat dialogues.
    assert tokenizer.chat_template and "<|assistant|>" in tokenizer.chat_template
    random = load_model(ModelConfig(tiny=TINY_BASE_MODEL, dtype="float32"), seed=0).eval()
    trained_nll = gsm8k_test_nll(model, tokenizer, 8)
    random_nll = gsm8k_test_nll(random, tokenizer, 8)
    # Random init sits near ln(2048) = 7.6 nats; the base has learned the text well below that
    # (measured on the first 16 problems: 4.19 against 7.67).
    assert random_nll > 7.0
    assert trained_nll < random_nll - 3.0, (trained_nll, random_nll)


def test_pre_flight_reads_the_shipped_directory_for_a_bundled_name() -> None:
    cfg = config_from_dict({"model": {"path": "bundled:tiny_base"}})
    assert model_problems(cfg) == []


def test_unknown_bundled_model_name_is_an_error_naming_model_path() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": {"path": "bundled:tiny_bse"}}, source="run.yaml")
    text = str(err.value)
    assert "run.yaml" in text
    assert (
        "model.path: expected a local directory, a hub id or one of the shipped models "
        "(bundled:tiny_base), found 'bundled:tiny_bse' (did you mean 'bundled:tiny_base'?)"
    ) in text


def test_the_script_gives_identical_bytes_for_the_same_seed(tmp_path: Path) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        main(["--out", str(out), "--seed", "3", "--steps", "2"])
    a, b = (json.loads((d / MANIFEST_FILE).read_text()) for d in runs)
    assert a["sha256"] == b["sha256"]
    assert (runs[0] / "model.safetensors").read_bytes() == (
        runs[1] / "model.safetensors"
    ).read_bytes()
    assert a["pretrain"]["seed"] == 3 and a["pretrain"]["steps"] == 2
    # The seed matters: the shipped base (seed 0) has other bytes.
    assert a["sha256"]["model.safetensors"] != file_sha256(TINY_BASE_DIR / "model.safetensors")
