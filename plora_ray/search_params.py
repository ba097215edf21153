"""The ``params:`` block of a search space: one searched dotted key of the run config each.

A param names a leaf key of the run config (``optim.lr``, ``lora.rank``,
``data.sources[0].weight``), a distribution whose fields suit that key's type (an integer key
takes ``int``, ``choice`` or ``qloguniform``), and optionally a ``when:`` condition on earlier
params or on fixed run-config keys. Parsed here with every problem collected; asked of an Optuna
trial by ``suggest``. No Ray here.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from dataclasses import dataclass, field
from typing import Any, Union, get_args, get_origin, get_type_hints

from plora_ray.config import RunConfig
from plora_ray.config.conversion import yaml_number

__all__ = [
    "DISTRIBUTIONS",
    "ParamSpec",
    "dotted_value",
    "flatten_params",
    "parse_params",
    "read_conditions",
    "suggest",
]

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int", "qloguniform")
# Fields allowed per distribution (besides `distribution` and `when`), and the ones required.
_DIST_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "choice": ({"values"}, {"values"}),
    "uniform": ({"low", "high"}, {"low", "high"}),
    "loguniform": ({"low", "high"}, {"low", "high"}),
    "int": ({"low", "high", "step", "log"}, {"low", "high"}),
    "qloguniform": ({"low", "high", "q"}, {"low", "high", "q"}),
}


@dataclass
class ParamSpec:
    """One searched dotted key of the run config (its fields are written to ``search.json``)."""

    key: str
    distribution: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    q: float | None = None
    log: bool = False
    values: list[Any] | None = None
    # Sampled only when every listed key has one of the listed values (other params or run-config
    # keys); a condition on a param refers to its sampled value.
    when: dict[str, list[Any]] = field(default_factory=dict)
    # The run-config field's type: an int field rounds qloguniform samples to int.
    is_int: bool = False

    def contains(self, value: Any) -> bool:
        """Whether ``value`` can come out of this distribution (fixed points are checked so)."""
        if self.distribution == "choice":
            return value in (self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.distribution == "int":
            return (
                float(value).is_integer() and (int(value) - int(self.low)) % (self.step or 1) == 0
            )
        return True


# --------------------------------------------------------------------------- run-config keys


def _union_members(tp: Any) -> list[Any] | None:
    """The non-None members of ``X | Y | None``, or None when ``tp`` is not a union."""
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in get_args(tp) if a is not type(None)]
    return None


def _leaf_types(cls: Any = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of the run-config schema -> its type (sections are walked into)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "search":
            continue
        key = f"{prefix}{f.name}"
        tp = get_type_hints(cls)[f.name]
        inner = _union_members(tp) or [tp]
        section = next((a for a in inner if dataclasses.is_dataclass(a)), None)
        item = get_args(tp)[0] if get_origin(tp) is list and get_args(tp) else None
        if section is not None:
            out.update(_leaf_types(section, key + "."))
        elif item is not None and dataclasses.is_dataclass(item):
            # A list of sections (data.sources): searchable per index, data.sources[0].weight.
            out.update(_leaf_types(item, key + "[]."))
        else:
            out[key] = tp
    return out


_LEAVES = _leaf_types()


def _is_int_type(tp: Any) -> bool:
    members = _union_members(tp)
    if members is not None:
        return any(_is_int_type(a) for a in members)
    return tp is int


def _is_numeric_type(tp: Any) -> bool:
    members = _union_members(tp)
    if members is not None:
        return any(_is_numeric_type(a) for a in members)
    return tp in (int, float)


def _schema_key(key: str) -> str:
    """``data.sources[0].weight`` / ``data.sources.0.weight`` -> ``data.sources[].weight``."""
    return re.sub(r"(\[\d+\]|\.\d+(?=\.|$))", "[]", key)


def _key_problem(key: str) -> str | None:
    """Why ``key`` is not a searchable run-config key, or None when it is one."""
    key = _schema_key(key)
    if key in _LEAVES:
        return None
    sections = {k.rsplit(".", 1)[0] for k in _LEAVES if "." in k}
    if key in sections:
        leaves = sorted(k for k in _LEAVES if k.startswith(key + "."))[:4]
        return f"a section, expected a leaf key such as {', '.join(leaves)}"
    hint = difflib.get_close_matches(key, list(_LEAVES), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown run-config key{extra}"


def dotted_value(data: dict[str, Any], key: str) -> Any:
    """The value at dotted ``key`` of a run-config mapping (None where it is not set)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------- parsing


def flatten_params(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Params may be written dotted (``lora.rank:``) or nested (``lora: {rank: ...}``)."""
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if (
            isinstance(v, dict)
            and "distribution" not in v
            and v
            and all(isinstance(x, dict) for x in v.values())
        ):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_choice(spec: ParamSpec, raw: dict[str, Any], where: str, problems: list[str]) -> bool:
    values = raw["values"]
    if not isinstance(values, list) or not values:
        problems.append(f"{where}.values: expected a non-empty list, found {values!r}")
        return False
    if len({repr(v) for v in values}) != len(values):
        problems.append(f"{where}.values: expected distinct values, found {values!r}")
    spec.values = values
    return True


def _parse_int_fields(
    spec: ParamSpec, raw: dict[str, Any], where: str, problems: list[str]
) -> bool:
    """``int``: integer bounds, ``step`` (high - low a multiple of it) and ``log``."""
    assert spec.low is not None and spec.high is not None
    if not (spec.low.is_integer() and spec.high.is_integer()):
        problems.append(
            f"{where}: expected integer low and high, found low={raw['low']!r}, "
            f"high={raw['high']!r}"
        )
        return False
    low, high = int(spec.low), int(spec.high)
    spec.low, spec.high = low, high
    step = raw.get("step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        problems.append(f"{where}.step: expected an integer >= 1, found {step!r}")
        return False
    log = raw.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}.log: expected true or false, found {log!r}")
        return False
    if log and step != 1:
        problems.append(
            f"{where}: expected step 1 with log: true (Optuna cannot combine "
            f"them), found step={step!r}"
        )
        return False
    if (high - low) % step:
        problems.append(
            f"{where}: expected high - low to be a multiple of step, found "
            f"low={low}, high={high}, step={step}"
        )
        return False
    spec.step, spec.log = step, log
    return True


def _parse_numeric(
    spec: ParamSpec, tp: Any, raw: dict[str, Any], where: str, problems: list[str]
) -> bool:
    """``uniform``, ``loguniform``, ``int``, ``qloguniform``: bounds that suit the key's type."""
    dist, key = spec.distribution, spec.key
    if not _is_numeric_type(tp):
        problems.append(
            f"{where}.distribution: {dist!r} samples numbers but {key} expects "
            f"a non-numeric value; use distribution: choice"
        )
        return False
    if spec.is_int and dist not in ("int", "qloguniform"):
        problems.append(
            f"{where}.distribution: {key} is an integer; expected int, choice or "
            f"qloguniform, found {dist!r}"
        )
        return False
    lo, hi = yaml_number(raw["low"]), yaml_number(raw["high"])
    if lo is None:
        problems.append(f"{where}.low: expected a finite number, found {raw['low']!r}")
    if hi is None:
        problems.append(f"{where}.high: expected a finite number, found {raw['high']!r}")
    if lo is None or hi is None:
        return False
    if lo > hi:
        problems.append(
            f"{where}: expected low <= high, found low={raw['low']!r} > high={raw['high']!r}"
        )
        return False
    log_scale = dist in ("loguniform", "qloguniform") or (dist == "int" and raw.get("log"))
    if log_scale and lo <= 0:
        problems.append(f"{where}.low: expected a number > 0 for a log scale, found {raw['low']!r}")
        return False
    spec.low, spec.high = lo, hi
    if dist == "int" and not _parse_int_fields(spec, raw, where, problems):
        return False
    if dist == "qloguniform":
        q = yaml_number(raw["q"])
        if q is None or q <= 0:
            problems.append(f"{where}.q: expected a finite number > 0, found {raw['q']!r}")
            return False
        spec.q = q
    return True


def _parse_param(key: str, raw: Any, where: str, problems: list[str]) -> ParamSpec | None:
    if not isinstance(raw, dict):
        problems.append(
            f"{where}: expected a mapping with a 'distribution' (one of "
            f"{', '.join(DISTRIBUTIONS)}), found {raw!r}"
        )
        return None
    dist = raw.get("distribution")
    if dist not in DISTRIBUTIONS:
        hint = difflib.get_close_matches(str(dist), DISTRIBUTIONS, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(
            f"{where}.distribution: expected one of {', '.join(DISTRIBUTIONS)}, "
            f"found {dist!r}{extra}"
        )
        return None
    allowed, required = _DIST_FIELDS[dist]
    before = len(problems)
    for k in raw:
        if k not in allowed | {"distribution", "when"}:
            problems.append(
                f"{where}.{k}: unknown field for distribution {dist!r}; expected "
                f"{', '.join(sorted(allowed | {'when'}))}"
            )
    for k in sorted(required - set(raw)):
        problems.append(f"{where}.{k}: required for distribution {dist!r}, found nothing")
    if len(problems) > before:
        return None
    tp = _LEAVES.get(_schema_key(key))
    spec = ParamSpec(key=key, distribution=dist, is_int=_is_int_type(tp))
    if dist == "choice":
        ok = _parse_choice(spec, raw, where, problems)
    else:
        ok = _parse_numeric(spec, tp, raw, where, problems)
    return spec if ok else None


def parse_params(raw_params: Any, problems: list[str]) -> tuple[list[ParamSpec], dict[str, Any]]:
    """The searched params, in YAML order, and the flattened raw block (dotted key -> mapping)."""
    if not isinstance(raw_params, dict) or not raw_params:
        problems.append(
            f"search.params: expected a mapping of dotted run-config keys to "
            f"distributions, found {raw_params!r}"
        )
        return [], {}
    flat = flatten_params(raw_params)
    params: list[ParamSpec] = []
    for key, spec_raw in flat.items():
        where = f"search.params.{key}"
        why = _key_problem(key)
        if why is not None:
            problems.append(f"{where}: {why}")
            continue
        p = _parse_param(key, spec_raw, where, problems)
        if p is not None:
            params.append(p)
    return params, flat


def read_conditions(
    params: list[ParamSpec], raw_params: dict[str, Any], problems: list[str]
) -> None:
    """Read each param's ``when``: conditions on earlier params (values they can take) or on
    run-config keys."""
    seen: dict[str, ParamSpec] = {}
    for p in params:
        where = f"search.params.{p.key}.when"
        raw = raw_params[p.key].get("when")
        if raw is None:
            seen[p.key] = p
            continue
        if not isinstance(raw, dict) or not raw:
            problems.append(
                f"{where}: expected a mapping of key -> value or list of values, found {raw!r}"
            )
            seen[p.key] = p
            continue
        for ck, cv in raw.items():
            allowed = cv if isinstance(cv, list) else [cv]
            if ck == p.key:
                problems.append(f"{where}.{ck}: a parameter cannot depend on itself")
            elif ck in seen:
                dep = seen[ck]
                if dep.distribution == "choice":
                    bad = [v for v in allowed if v not in (dep.values or [])]
                    if bad:
                        problems.append(
                            f"{where}.{ck}: expected values among {dep.values}, found "
                            f"{bad!r} (the condition could never hold)"
                        )
            elif any(q.key == ck for q in params):
                problems.append(
                    f"{where}.{ck}: the condition's parameter must be listed before "
                    f"{p.key} in search.params (it is sampled first)"
                )
            else:
                why = _key_problem(ck)
                if why is not None:
                    problems.append(
                        f"{where}.{ck}: expected a search parameter or run-config key, "
                        f"found {ck!r}: {why}"
                    )
            p.when[ck] = allowed
        seen[p.key] = p


# --------------------------------------------------------------------------- sampling


def suggest(trial: Any, p: ParamSpec) -> Any:
    """Ask an Optuna trial for one param. qloguniform: Optuna samples log-uniformly and the value
    is rounded to a multiple of q here (Optuna cannot combine log and step); the study keeps the
    unrounded value, the run gets the rounded one."""
    if p.distribution == "choice":
        return trial.suggest_categorical(p.key, p.values)
    assert p.low is not None and p.high is not None
    if p.distribution == "uniform":
        return trial.suggest_float(p.key, p.low, p.high)
    if p.distribution == "loguniform":
        return trial.suggest_float(p.key, p.low, p.high, log=True)
    if p.distribution == "int":
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=p.step or 1, log=p.log)
    raw = trial.suggest_float(p.key, p.low, p.high, log=True)
    assert p.q is not None
    v = min(max(round(raw / p.q) * p.q, p.low), p.high)
    return int(round(v)) if p.is_int else v
