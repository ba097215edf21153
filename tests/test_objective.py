"""The one objective spec: the YAML block, search.json, the scalar value."""

from __future__ import annotations

import pytest

from plora_ray.objective import (
    ObjectiveError,
    ObjectiveSpec,
    parse_objective_block,
)


def test_each_objective_form_parses_and_round_trips_through_search_json() -> None:
    blocks = [
        {"metric": "gsm8k", "direction": "maximize"},
        {"weighted": {"gsm8k": 0.7, "mmlu": 0.3}, "direction": "maximize"},
        {"pareto": {"gsm8k": "maximize", "mmlu_nll": "minimize"}},
    ]
    for block in blocks:
        problems: list[str] = []
        spec = parse_objective_block(block, problems)
        assert not problems and spec is not None
        assert ObjectiveSpec.from_dict({"objective": spec.as_dict()}, "search.json") == spec


def test_weighted_value_and_tune_metric() -> None:
    problems: list[str] = []
    spec = parse_objective_block(
        {"weighted": {"gsm8k": 0.5, "mmlu": 0.5}, "direction": "maximize"}, problems
    )
    assert spec is not None
    assert spec.value({"gsm8k": 0.2, "mmlu": 0.4}) == pytest.approx(0.3)
    assert spec.value({"gsm8k": 0.2}) is None
    assert (spec.tune_metric, spec.tune_mode) == ("objective", "max")
    pareto = ObjectiveSpec("pareto", ("gsm8k", "mmlu"), ("maximize", "minimize"))
    assert pareto.value({"gsm8k": 1.0, "mmlu": 1.0}) is None
    assert (pareto.tune_metric, pareto.tune_mode) == (["gsm8k", "mmlu"], ["max", "min"])


def test_every_problem_of_a_block_is_reported_at_once() -> None:
    problems: list[str] = []
    spec = parse_objective_block({"pareto": {"gsm8kk": "up", "mmlu": "sideways"}}, problems)
    assert spec is None
    text = "\n".join(problems)
    assert "search.objective.pareto.gsm8kk" in text and "did you mean 'gsm8k'" in text
    assert "search.objective.pareto.mmlu: expected maximize or minimize, found 'sideways'" in text


def test_search_json_of_older_versions_reads_max_min_words() -> None:
    spec = ObjectiveSpec.from_dict({"metrics": ["gsm8k"], "mode": "max"}, "s.json")
    assert spec == ObjectiveSpec("single", ("gsm8k",), ("maximize",))
    with pytest.raises(ObjectiveError, match="s.json: objective.directions"):
        ObjectiveSpec.from_dict(
            {"metrics": ["gsm8k", "mmlu"], "weights": [1, 1], "directions": ["max", "min"]},
            "s.json",
        )
