"""Every YAML shipped in search_spaces/ passes the validator and opens with how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

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
