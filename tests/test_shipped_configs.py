"""Every YAML shipped in search_spaces/ passes the validator and opens with how to run it; the
shipped 7B searches give every PLoRA trial at least 8 stages on the bundled data."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml

from plora_ray.config import BUNDLED_SOURCES
from plora_ray.validate import validate_file

SEARCH_SPACES = Path(__file__).resolve().parent.parent / "search_spaces"
SHIPPED = sorted(SEARCH_SPACES.glob("*.yaml")) + sorted(SEARCH_SPACES.glob("*.yml"))


def test_search_spaces_ship_at_least_the_smoke_config():
    assert SEARCH_SPACES / "smoke.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_passes_the_validator(path):
    assert validate_file(str(path)) == []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_opens_with_the_command_that_runs_it_and_its_time(path):
    # STYLE principle 10: the header comment names the exact command and the time it takes.
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#") and line.strip():
            break
        header.append(line)
    text = "\n".join(header)
    assert (
        f"plora-ray train search_spaces/{path.name}" in text
        or f"plora-ray search search_spaces/{path.name}" in text
    )
    assert "Time:" in text or "time:" in text


# --------------------------------------------------------------------------- PLoRA stages

# The shipped 7B searches: every PLoRA trial must have about as many stages as the paper's ~12.
SEVEN_B = ["paper_table1.yaml", "llama7b_plora.yaml", "llama7b_pbt.yaml"]
MIN_STAGES = 8
STAGE_KEYS = ("train.epochs", "batch.global_batch", "plora.unload_every", "data.held_out")


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _candidates(spec: dict) -> list:
    """The values of one searched parameter that bound the stage count: every choice, or a
    range's two ends (rounded outward to its q grid)."""
    if "values" in spec:
        return list(spec["values"])
    low, high, q = spec["low"], spec["high"], spec.get("q")
    if q:
        return [math.floor(low / q) * q, math.ceil(high / q) * q]
    return [low, high]


def _points(data: dict) -> list[dict]:
    """Every corner of the search space over STAGE_KEYS, plus the listed starting points."""
    search = data.get("search") or {}
    params = search.get("params") or {}
    base = {k: _get(data, k) for k in STAGE_KEYS}
    axes = [(k, _candidates(params[k])) for k in STAGE_KEYS if k in params]
    corners = [
        {**base, **dict(zip([k for k, _ in axes], combo))}
        for combo in itertools.product(*(v for _, v in axes))
    ]
    points = [
        {**base, **{k: v for k, v in p.items() if k in STAGE_KEYS}}
        for p in search.get("points", [])
    ]
    return corners + points


def _bundled_rows(data: dict) -> int:
    """Dialogues per epoch on the bundled data, counted in the bundled file itself."""
    sources = data["data"]["sources"]
    assert [s.get("path") for s in sources] == ["bundled:gsm8k"], (
        "the stage count is computed on the bundled GSM8K alone"
    )
    path, _ = BUNDLED_SOURCES["bundled:gsm8k"]
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


@pytest.mark.parametrize("name", SEVEN_B)
def test_shipped_7b_search_gives_every_plora_trial_at_least_8_stages(name):
    data = yaml.safe_load((SEARCH_SPACES / name).read_text())
    assert data["plora"]["unload_unit"] in ("samples", "steps")
    rows = _bundled_rows(data)
    assert rows == 7473  # the GSM8K train split the headers' arithmetic quotes
    points = _points(data)
    assert points
    for p in points:
        train_rows = rows - p["data.held_out"]
        # As training_run.total_steps: whole optimizer steps of global_batch samples.
        steps = math.floor(p["train.epochs"] * train_rows / p["batch.global_batch"])
        seen = steps * p["batch.global_batch"]
        counter = seen if data["plora"]["unload_unit"] == "samples" else steps
        unloads = counter // p["plora.unload_every"]
        assert unloads >= MIN_STAGES, f"{name}: {p} gives {unloads} unloads of PLoRA"


def test_stage_count_check_catches_the_old_one_unload_interval():
    # The check itself: 4,800-sample unloads over one epoch of bundled GSM8K were one stage.
    data = yaml.safe_load((SEARCH_SPACES / "paper_table1.yaml").read_text())
    data["plora"]["unload_every"] = 4800
    data["train"]["epochs"] = 1
    (p,) = _points(data)
    steps = math.floor((_bundled_rows(data) - p["data.held_out"]) / p["batch.global_batch"])
    assert steps * p["batch.global_batch"] // p["plora.unload_every"] == 1


def test_paper_table1_evaluates_zero_shot_as_table_1():
    data = yaml.safe_load((SEARCH_SPACES / "paper_table1.yaml").read_text())
    shots = data["eval"]["num_fewshot"]
    assert set(shots) >= set(data["eval"]["tasks"])
    assert all(n == 0 for n in shots.values())
