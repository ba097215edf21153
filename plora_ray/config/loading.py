"""Loading a run config: YAML files, dotted-key overrides, relative paths, and back to YAML.

A sampled trial and ``--set KEY=VALUE`` are the same thing: the YAML mapping with dotted keys
overridden (``lora.rank=8``, ``data.sources[0].weight=2``) before the schema is built and checked,
so a problem an override causes is reported against that override.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from plora_ray.config.conversion import ConfigError, build_section
from plora_ray.config.schema import RunConfig


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one YAML mapping (raised by ``UniqueKeyLoader``)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        self.key, self.first_line, self.line = key, first_line, line
        super().__init__(
            f"key {key!r} given twice in one mapping (first at line {first_line}); expected each "
            "key once: merge the two, or YAML keeps only the last one's values"
        )


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    PyYAML keeps the last of two equal keys, so a section written twice (two ``lora:`` blocks)
    silently loses the first one's keys. Keys merged in with ``<<`` may still be overridden.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise DuplicateKeyError(key, first_line[key], line)
                first_line[key] = line
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                break
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(exc: yaml.YAMLError) -> int | None:
    """The 1-based line a YAML error points at, when it points at one."""
    if isinstance(exc, DuplicateKeyError):
        return exc.line
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return mark.line + 1 if mark is not None else None


def _yaml_error_text(exc: yaml.YAMLError) -> str:
    """The problem a YAML error names, without PyYAML's '<unicode string>' position lines."""
    if isinstance(exc, DuplicateKeyError):
        return str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        context = f" ({exc.context})" if exc.context else ""
        return f"{exc.problem or type(exc).__name__}{context}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=value``; the value is read as YAML (``8``, ``0.1``, ``[a, b]``, ``null``).

    Raises:
        ConfigError: when there is no ``=``, the key is empty, or the value is not plain YAML
            (a syntax error, a ``!!python/...`` tag, a key given twice).
    """
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected dotted.key=value, found no '='"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError([f"override {text!r}: expected dotted.key=value, found an empty key"])
    if not raw.strip():
        return key, None
    try:
        return key, yaml.load(raw, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(
            [
                f"override {key}: expected a YAML value (a number, a string, a [list] or a "
                f"{{mapping}}; quote a string that holds ':' or '{{'), found {raw!r} "
                f"({_yaml_error_text(exc)})"
            ]
        ) from None


_INDEX = re.compile(r"\[(\d+)\]")


def _split_dotted(dotted: str) -> list[str | int]:
    """Split a dotted key: ``data.sources[0].weight`` -> ['data', 'sources', 0, 'weight'].

    ``data.sources.0.weight`` gives the same parts.
    """
    parts: list[str | int] = []
    for part in _INDEX.sub(r".\1", dotted).split("."):
        if part == "":
            continue
        parts.append(int(part) if part.isdigit() else part)
    return parts


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each dotted key set (sections are created as needed).

    A numeric part indexes a list (``data.sources[0].weight=2`` or ``data.sources.0.weight=2``).

    Raises:
        ConfigError: a list index past the end of the list, or an index into something that is
            not a list.
    """
    out = copy.deepcopy(data)
    problems: list[str] = []
    for dotted, value in overrides.items():
        node: Any = out
        parts = _split_dotted(dotted)
        if not parts:
            problems.append(f"override {dotted!r}: expected dotted.key=value, found an empty key")
            continue
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(str(p) for p in parts[: depth + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    parent = ".".join(str(p) for p in parts[:depth])
                    found = (
                        f"a list of {len(node)} item(s)"
                        if isinstance(node, list)
                        else f"no list at {parent}"
                    )
                    problems.append(
                        f"override {dotted}: expected {where} to index an existing list "
                        f"item, found {found}"
                    )
                    break
            elif not isinstance(node, dict):
                problems.append(
                    f"override {dotted}: expected a section at {where}, found {type(node).__name__}"
                )
                break
            if last:
                node[part] = value
            else:
                nxt = parts[depth + 1]
                child = node[part] if isinstance(part, int) else node.get(part)
                if isinstance(nxt, str) and not isinstance(child, dict):
                    child = {}
                    node[part] = child
                if child is None:
                    child = {}
                    node[part] = child
                node = child
    if problems:
        raise ConfigError(problems)
    return out


def config_from_dict(
    data: dict[str, Any], source: str | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Build and validate a RunConfig; raise one ConfigError listing every problem.

    Args:
        data: the parsed YAML mapping.
        source: the file name, used in error messages.
        overrides: dotted keys to set before validation (a sampled trial, ``--set``).

    Raises:
        ConfigError: listing all problems, each naming the key, the expected and the found value.
    """
    problems: list[str] = []
    if overrides:
        try:
            data = apply_overrides(data or {}, overrides)
        except ConfigError as exc:
            raise ConfigError(exc.problems, source) from None
    cfg = build_section(RunConfig, data, "", problems)
    # Each section's checks run even after type problems (a bad field keeps its default), so the
    # user sees every problem of the file at once.
    problems += cfg.problems()
    if problems:
        raise ConfigError([_blame_override(p, overrides or {}) for p in problems], source)
    return cfg


def _blame_override(problem: str, overrides: dict[str, Any]) -> str:
    """Add ``(set by --set KEY=VALUE)`` to a problem about a key an override set, so the user
    looks at the command line rather than the file."""
    key = problem.split(":", 1)[0]
    norm = ".".join(str(p) for p in _split_dotted(key))
    for dotted, value in overrides.items():
        o = ".".join(str(p) for p in _split_dotted(dotted))
        if norm == o or norm.startswith(o + "."):
            shown = yaml.safe_dump(value, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()  # safe_dump ends scalars with '...'
            return f"{problem} (set by override {dotted}={shown})"
    return problem


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping (safe loading, a key given twice refused).

    Raises:
        ConfigError: the file is missing, not UTF-8, not YAML, holds a key twice in one mapping,
            or is not a mapping; a message with ``file:line`` where the YAML points at a line.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"expected an existing YAML file, found no file at {str(p)!r}"], str(p))
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [f"{p}:{bad_line}: expected UTF-8 text, found the byte 0x{raw[exc.start]:02x}"], str(p)
        ) from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        line = _yaml_error_line(exc)
        if isinstance(exc, DuplicateKeyError):
            problem = f"{p}:{line}: {exc}"
        else:
            at = f" at line {line}" if line is not None else ""
            problem = f"{p}: not valid YAML{at}: {_yaml_error_text(exc)}"
        raise ConfigError([problem], str(p)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"<top level>: expected a mapping, found {type(data).__name__}"], str(p))
    return data


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a run config (or the base config of a search space) from YAML.

    Relative ``data.sources[].path``, ``model.path`` and ``eval.data_dir`` are resolved against the
    YAML file's directory when such a file exists there, so a config can ship beside its data.

    Raises:
        ConfigError: every problem found, naming the file.
    """
    data = resolve_relative_paths(load_yaml(path), Path(path).resolve().parent)
    return config_from_dict(data, source=str(path), overrides=overrides)


def _resolve(value: Any, base_dir: Path, always: bool) -> Any:
    if not isinstance(value, str) or not value or value.startswith("bundled:"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute() or value.startswith("~"):
        return value
    candidate = base_dir / p
    # data.sources[].path is always a file path; the others may be hub ids ("org/name"), so they
    # are only rewritten when the YAML's directory really holds such a path.
    if always or candidate.exists():
        return str(candidate)
    return value


def resolve_relative_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Resolve relative paths of a parsed YAML mapping against ``base_dir`` (the YAML's directory).

    ``data.sources[].path`` is always resolved (it can only be a file); ``data.sources[].dataset``,
    ``model.path``, ``model.tokenizer`` and ``eval.data_dir`` only when that path exists under
    ``base_dir`` (otherwise they may be hub names). Malformed sections are left for validation.
    """
    out = copy.deepcopy(data)
    d = out.get("data")
    if isinstance(d, dict) and isinstance(d.get("sources"), list):
        for src in d["sources"]:
            if isinstance(src, dict):
                if "path" in src:
                    src["path"] = _resolve(src["path"], base_dir, always=True)
                if "dataset" in src:
                    src["dataset"] = _resolve(src["dataset"], base_dir, always=False)
    for section, key in (("model", "path"), ("model", "tokenizer"), ("eval", "data_dir")):
        sec = out.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = _resolve(sec[key], base_dir, always=False)
    return out


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML that ``load_config`` reads back to an equal config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "DuplicateKeyError",
    "UniqueKeyLoader",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "load_yaml",
    "parse_override",
    "resolve_relative_paths",
]
