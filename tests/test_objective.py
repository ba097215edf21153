"""The one objective spec: the YAML block, search.json, the scalar value."""

from __future__ import annotations

import optuna
import pytest

from plora_ray.objective import (
    ObjectiveError,
    ObjectiveSpec,
    parse_objective_block,
)
from plora_ray.tune_adapter import proxy_as_intermediate


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


def test_a_maximised_study_ranks_pruned_trials_by_the_negated_proxy() -> None:
    """Every proxy is an NLL or a loss (lower is better); Optuna ranks PRUNED trials by their
    last intermediate value in the study's direction. In a study that maximises GSM8K accuracy,
    the raw gsm8k_nll would rank the worse-fitting pruned trial first."""
    maximise = ObjectiveSpec("weighted", ("gsm8k", "mmlu"), ("maximize", "maximize"), (0.5, 0.5))
    minimise = ObjectiveSpec("single", ("gsm8k_nll",), ("minimize",))
    study = optuna.create_study(direction="maximize")
    for nll in (2.0, 5.0):
        trial = study.ask()
        trial.report(proxy_as_intermediate(maximise, nll), step=2)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    best = max(pruned, key=lambda t: t.value)
    assert best.intermediate_values == {2: -2.0}  # the lower NLL ranks first
    assert proxy_as_intermediate(minimise, 2.0) == 2.0  # a minimised study keeps the raw proxy
