"""What a search optimises: one metric, a weighted sum, or a Pareto front of several.

One ``ObjectiveSpec`` serves the search (the YAML ``search.objective`` block, what Optuna and Tune
are told) and the leaderboard (what ``search.json`` says the search optimised, how trials rank).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from plora_ray.config.conversion import is_finite_number, yaml_number

__all__ = [
    "DIRECTIONS",
    "OBJECTIVE_METRICS",
    "Direction",
    "ObjectiveError",
    "ObjectiveSpec",
    "parse_objective_block",
]

Direction = Literal["maximize", "minimize"]
DIRECTIONS: tuple[Direction, ...] = ("maximize", "minimize")

# Metrics a trial can be judged on: the evaluation's objectives (plora_ray.evaluate) plus the
# training loss at the end. *_nll and final_loss are naturally minimised, the rest maximised.
OBJECTIVE_METRICS = (
    "gsm8k",
    "gsm8k_flexible",
    "mmlu",
    "mmlu_humanities",
    "mmlu_stem",
    "mmlu_social_sciences",
    "mmlu_other",
    "arc_easy",
    "arc_challenge",
    "gsm8k_nll",
    "mmlu_nll",
    "final_loss",
)

# Words accepted for a direction where a file written by an older version (or by hand) is read:
# search.json's "max"/"min" of early versions, British spelling.
_DIRECTION_WORDS: dict[str, Direction] = {
    "max": "maximize",
    "maximize": "maximize",
    "maximise": "maximize",
    "min": "minimize",
    "minimize": "minimize",
    "minimise": "minimize",
}


class ObjectiveError(ValueError):
    """An objective description (``search.json``'s ``objective``) that cannot be used."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What a trial is judged by.

    ``kind`` is ``single`` (one metric), ``weighted`` (the sum of weight x metric, optimised in the
    one shared direction) or ``pareto`` (several metrics, each with its own direction; no scalar).
    """

    kind: Literal["single", "weighted", "pareto"]
    metrics: tuple[str, ...]
    directions: tuple[Direction, ...]
    weights: tuple[float, ...] | None = None

    @property
    def pareto(self) -> bool:
        return self.kind == "pareto"

    @property
    def scalar_direction(self) -> Direction:
        """The direction of the scalar objective (single and weighted; Pareto: the first's)."""
        return self.directions[0]

    @property
    def tune_metric(self) -> str | list[str]:
        """What Tune and Optuna are told: single and weighted searches report one scalar under
        ``objective``; a Pareto search reports each metric under its own name."""
        return list(self.metrics) if self.pareto else "objective"

    @property
    def tune_mode(self) -> str | list[str]:
        modes = ["max" if d == "maximize" else "min" for d in self.directions]
        return modes if self.pareto else modes[0]

    def value(self, objectives: Mapping[str, Any]) -> float | None:
        """The scalar objective of a finished trial (None for Pareto or a missing metric)."""
        if self.pareto:
            return None
        values = [objectives.get(m) for m in self.metrics]
        if not all(is_finite_number(v) for v in values):
            return None
        nums = [float(v) for v in values]  # type: ignore[arg-type]
        if self.weights is None:
            return nums[0]
        return float(sum(w * v for w, v in zip(self.weights, nums)))

    def describe(self) -> str:
        """``maximize gsm8k``, ``maximize 0.7·gsm8k + 0.3·mmlu``, ``Pareto front of ...``."""
        if self.pareto:
            return "Pareto front of " + ", ".join(
                f"{m} ({d})" for m, d in zip(self.metrics, self.directions)
            )
        if self.weights is not None:
            terms = " + ".join(f"{w:g}·{m}" for w, m in zip(self.weights, self.metrics))
            return f"{self.scalar_direction} {terms}"
        return f"{self.scalar_direction} {self.metrics[0]}"

    def as_dict(self) -> dict[str, Any]:
        """The form written to ``search.json`` (read back by ``from_dict``)."""
        return {
            "kind": self.kind,
            "metrics": list(self.metrics),
            "directions": list(self.directions),
            "weights": dict(zip(self.metrics, self.weights)) if self.weights else None,
            "pareto": self.pareto,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> ObjectiveSpec:
        """Read an objective from a parsed ``search.json``.

        Accepts the spec under ``objective`` (or at the top level): ``metrics`` (a list, or one
        ``metric``), ``directions`` (a list, or one ``direction``/``mode``; maximize/minimize or
        max/min), optional ``weights`` (a list or a metric -> weight mapping) and ``pareto``.

        Raises:
            ObjectiveError: naming ``source``: no metric, an unknown direction, or lengths that
                do not match.
        """
        spec: Any = data.get("objective", data)
        if isinstance(spec, str):
            spec = {"metrics": [spec]}
        if not isinstance(spec, Mapping):
            raise ObjectiveError(
                f"{source}: objective: expected a mapping with metrics and directions, "
                f"found {spec!r}"
            )
        metrics = spec.get("metrics", spec.get("metric"))
        if isinstance(metrics, str):
            metrics = [metrics]
        if (
            not metrics
            or not isinstance(metrics, list)
            or not all(isinstance(m, str) for m in metrics)
        ):
            raise ObjectiveError(
                f"{source}: objective.metrics: expected a non-empty list of metric names, "
                f"found {metrics!r}"
            )
        raw_dirs = spec.get("directions", spec.get("direction", spec.get("mode", "maximize")))
        if isinstance(raw_dirs, str):
            raw_dirs = [raw_dirs] * len(metrics)
        if not isinstance(raw_dirs, list):
            raise ObjectiveError(
                f"{source}: objective.directions: expected a list of maximize/minimize, "
                f"found {raw_dirs!r}"
            )
        if len(raw_dirs) == 1 and len(metrics) > 1:
            raw_dirs = raw_dirs * len(metrics)
        dirs: list[Direction] = []
        for d in raw_dirs:
            word = _DIRECTION_WORDS.get(str(d).lower())
            if word is None:
                raise ObjectiveError(
                    f"{source}: objective.directions: expected maximize or minimize, found {d!r}"
                )
            dirs.append(word)
        if len(dirs) != len(metrics):
            raise ObjectiveError(
                f"{source}: objective: expected one direction per metric ({len(metrics)}), "
                f"found {len(dirs)}"
            )
        weights = spec.get("weights")
        if isinstance(weights, Mapping):
            weights = [weights.get(m) for m in metrics]
        if weights is not None and (
            not isinstance(weights, list)
            or len(weights) != len(metrics)
            or not all(is_finite_number(w) for w in weights)
        ):
            raise ObjectiveError(
                f"{source}: objective.weights: expected one number per metric "
                f"({len(metrics)}), found {weights!r}"
            )
        pareto = bool(spec.get("pareto", False)) or spec.get("kind") == "pareto"
        if len(metrics) > 1 and weights is None and not pareto:
            raise ObjectiveError(
                f"{source}: objective: several metrics need weights or pareto: true, found "
                f"metrics={metrics!r} without either"
            )
        if weights is not None and not pareto and len(set(dirs)) > 1:
            raise ObjectiveError(
                f"{source}: objective.directions: a weighted sum is optimised in one "
                f"direction, found {dirs!r}"
            )
        kind: Literal["single", "weighted", "pareto"] = (
            "pareto" if pareto else "weighted" if weights is not None else "single"
        )
        return cls(
            kind,
            tuple(metrics),
            tuple(dirs),
            None if pareto or weights is None else tuple(float(w) for w in weights),
        )


def _metric_ok(m: Any, key: str, problems: list[str]) -> bool:
    if m in OBJECTIVE_METRICS:
        return True
    hint = difflib.get_close_matches(str(m), OBJECTIVE_METRICS, n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    problems.append(f"{key}: expected one of {', '.join(OBJECTIVE_METRICS)}, found {m!r}{extra}")
    return False


def _direction_ok(d: Any, key: str, problems: list[str]) -> bool:
    if d in DIRECTIONS:
        return True
    problems.append(f"{key}: expected maximize or minimize, found {d!r}")
    return False


def parse_objective_block(raw: Any, problems: list[str]) -> ObjectiveSpec | None:
    """Parse the YAML ``search.objective`` block; each problem is appended to ``problems``.

    The block is one of ``{metric, direction}``, ``{weighted: {metric: weight}, direction}`` or
    ``{pareto: {metric: direction, ...}}``.
    """
    where = "search.objective"
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: expected a mapping with metric+direction, weighted+direction or pareto, "
            f"found {raw!r}"
        )
        return None
    allowed = ["metric", "weighted", "pareto", "direction"]
    kinds = [k for k in ("metric", "weighted", "pareto") if k in raw]
    for k in raw:
        if k not in allowed:
            hint = difflib.get_close_matches(str(k), allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(
                f"{where}.{k}: unknown key{extra}; expected metric, weighted, pareto, direction"
            )
    if len(kinds) != 1:
        problems.append(
            f"{where}: expected exactly one of metric, weighted, pareto, found {kinds or 'none'}"
        )
        return None
    kind = kinds[0]
    if kind == "pareto":
        if "direction" in raw:
            problems.append(
                f"{where}.direction: a Pareto objective gives a direction per metric "
                f"(pareto: {{gsm8k: maximize, mmlu: maximize}}), found direction: "
                f"{raw['direction']!r}"
            )
        p = raw["pareto"]
        if not isinstance(p, dict) or len(p) < 2:
            problems.append(
                f"{where}.pareto: expected a mapping of two or more metrics to "
                f"maximize/minimize, found {p!r}"
            )
            return None
        # Every metric is checked (not only up to the first bad one): all problems are reported.
        checks = [
            _metric_ok(m, f"{where}.pareto.{m}", problems)
            and _direction_ok(d, f"{where}.pareto.{m}", problems)
            for m, d in p.items()
        ]
        ok = all(checks)
        return ObjectiveSpec("pareto", tuple(p), tuple(p.values())) if ok else None
    direction = raw.get("direction")
    if kind == "metric" and not _metric_ok(raw["metric"], f"{where}.metric", problems):
        return None
    if direction is None:
        problems.append(f"{where}.direction: expected maximize or minimize, found nothing")
        return None
    if not _direction_ok(direction, f"{where}.direction", problems):
        return None
    if kind == "metric":
        return ObjectiveSpec("single", (raw["metric"],), (direction,))
    w = raw["weighted"]
    if not isinstance(w, dict) or not w:
        problems.append(f"{where}.weighted: expected a mapping of metric -> weight, found {w!r}")
        return None
    weights: dict[str, float] = {}
    for m, v in w.items():
        num = yaml_number(v)
        if _metric_ok(m, f"{where}.weighted.{m}", problems):
            if num is None:
                problems.append(f"{where}.weighted.{m}: expected a number, found {v!r}")
            else:
                weights[str(m)] = num
    if len(weights) != len(w):
        return None
    return ObjectiveSpec(
        "weighted", tuple(weights), (direction,) * len(weights), tuple(weights.values())
    )
