"""YAML values -> typed values: the generic conversion under the config schema.

``build_section`` turns a parsed YAML mapping into a config dataclass, converting each value to its
field's type annotation (``int``, ``float``, ``Literal``, ``list``, ``dict``, optional, nested
sections) and collecting a message per value that does not fit instead of stopping at the first.
It knows nothing of the schema's ranges; each section checks those itself (``schema``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """One or more problems in a config file; ``problems`` holds each message.

    Each message starts with the file name when one is known (``smoke.yaml: lora.rank: expected
    an integer >= 1, found 0``), so a message read on its own still says where to look.
    """

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        prefix = f"{source}: " if source else ""
        # A message may already start with the file (``run.yaml: ...``, ``run.yaml:12: ...``).
        self.problems = [
            p if not prefix or p.startswith((prefix, f"{source}:")) else prefix + p
            for p in problems
        ]
        self.source = source
        where = f" in {source}" if source else " in the config"
        head = f"{len(self.problems)} problem(s){where}"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


def is_finite_number(v: Any) -> bool:
    """A real number (not a bool), neither infinite nor NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def yaml_float(value: Any) -> float | None:
    """The number a YAML value means, finite or not; None when it is no number.

    YAML 1.1 reads ``1e-4`` (no dot) as a string: it is accepted as the number it means.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def yaml_number(value: Any) -> float | None:
    """``yaml_float`` for a finite number only: ``.inf`` and ``.nan`` read as no number (they would
    pass every range check written as a comparison, or fail it obscurely)."""
    number = yaml_float(value)
    return number if number is not None and math.isfinite(number) else None


def type_name(tp: Any) -> str:
    """How a message names what a field expects: ``an integer``, ``one of 'a', 'b'``, ..."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        name = " or ".join(type_name(a) for a in args)
        return name + (" or null" if len(args) < len(get_args(tp)) else "")
    if origin is list:
        return f"a list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        values = get_args(tp)[1]
        return "a mapping" if values is Any else f"a mapping of {type_name(values)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def convert_value(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
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
            return build_section(sections[0], value, key, problems)
        for a in inner:
            sub: list[str] = []
            out = convert_value(value, a, key, sub)
            if not sub:
                return out
            if any(": expected a finite number," in m for m in sub):
                problems += sub  # a number, but .inf/.nan: say that, not "expected a number"
                return None
        problems.append(f"{key}: expected {type_name(tp)}, found {value!r}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(f"{key}: expected {type_name(tp)}, found {value!r}{extra}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected {type_name(tp)}, found {value!r}")
            return None
        (item_tp,) = get_args(tp)
        return [convert_value(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected {type_name(tp)}, found {value!r}")
            return None
        _, val_tp = get_args(tp)
        return {str(k): convert_value(v, val_tp, f"{key}.{k}", problems) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, key, problems)
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
        number = yaml_float(value)
        if number is not None and math.isfinite(number):
            return number
        if number is not None:
            # .inf / .nan pass every range check written as a comparison, or fail it obscurely.
            problems.append(f"{key}: expected a finite number, found {value!r}")
            return None
    elif tp is str and isinstance(value, str):
        return value
    problems.append(f"{key}: expected {type_name(tp)}, found {value!r}")
    return None


def build_section(cls: Any, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build the dataclass ``cls`` from a YAML mapping; append a problem per bad or unknown key.

    A bad value is left out, so its field keeps the default and the section is still built: the
    checks that follow see the section's other values and report their problems too.
    """
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
        out = convert_value(v, hints[k], key, problems)
        # Keep a section even when a field inside it was bad (that field keeps its default), so
        # the range checks still see the section's other values.
        if len(problems) == before or dataclasses.is_dataclass(out):
            kwargs[k] = out
    return cls(**kwargs)


def _holds_sections(tp: Any) -> bool:
    """Whether a field's type is a section, an optional section or a list of sections."""
    if dataclasses.is_dataclass(tp):
        return True
    return get_origin(tp) in (Union, types.UnionType, list) and any(
        dataclasses.is_dataclass(a) for a in get_args(tp)
    )


def field_type_problems(section: Any, prefix: str) -> list[str]:
    """The fields of a built section whose value does not have the field's type.

    Fields holding sections are skipped (each section checks its own). A section built from YAML
    passes by construction (``build_section`` converted every value); this catches a bad value in
    a section built in Python, which gets no YAML leniency: a string for a number, or 8.0 for an
    integer, is reported.
    """
    problems: list[str] = []
    hints = get_type_hints(type(section))
    for f in dataclasses.fields(section):
        tp = hints[f.name]
        if _holds_sections(tp):
            continue
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        found: list[str] = []
        out = convert_value(value, tp, key, found)
        if found:
            problems += found
        elif type(out) is not type(value) and not (type(value) is int and type(out) is float):
            problems.append(f"{key}: expected {type_name(tp)}, found {value!r}")
    return problems


__all__ = [
    "ConfigError",
    "build_section",
    "convert_value",
    "field_type_problems",
    "is_finite_number",
    "type_name",
    "yaml_float",
    "yaml_number",
]
