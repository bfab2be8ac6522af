"""Reading YAML while remembering where every key and value came from.

Pydantic reports errors by location path (``("hardware", "num_gpus")``); users need
``spec.yaml:23``. This module loads YAML into plain Python objects together with a map
from location path to line number, refuses duplicate keys (PyYAML silently keeps the
last one), and turns pydantic validation errors into messages with file, line, key and
the nearest valid key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from ratiocinator.errors import SpecError

Loc = tuple[str | int, ...]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that keeps the node tree so marks survive construction."""


def read_mapping(path: Path, what: str) -> tuple[bytes, str, dict[str, Any], dict[Loc, int]]:
    """A YAML file that must be a mapping: its bytes, text, data and key lines; errors say which file and why."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the {what}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") from None
    data, lines = load_yaml_with_lines(text, path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: the {what} must be a mapping of keys to values, got {type(data).__name__}")
    return raw, text, data, lines


def load_yaml_with_lines(text: str, path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse ``text`` and return (data, {location path: 1-based line})."""
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{where}: not valid YAML: {problem}") from None
    if node is None:
        raise SpecError(f"{path}: the spec is empty", hint="see the README for the spec format")
    lines: dict[Loc, int] = {}
    _index(node, (), lines, path)
    loader = _LineLoader(text)
    try:
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    return data, lines


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int], path: Path) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise SpecError(
                    f"{path}:{line}: duplicate key '{key}' (first defined on line {seen[key]})",
                    hint="YAML keeps only one of them; delete the duplicate",
                )
            seen[key] = line
            lines[loc + (key,)] = line
            _index(value_node, loc + (key,), lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _index(item, loc + (i,), lines, path)


def line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    """Line of the deepest known prefix of ``loc``."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], path: Path, lines: dict[Loc, int]
) -> SpecError:
    """One SpecError listing every problem with file:line, key and a fix."""
    problems: list[tuple[int, str]] = []
    for err in exc.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        line = line_for(loc, lines)
        where = f"{path}:{line}" if line else str(path)
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            key = str(loc[-1])
            valid = _valid_keys(model, loc[:-1])
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            suggestion = f"did you mean '{near[0]}'?" if near else f"valid keys here: {', '.join(sorted(valid))}"
            problems.append((line or 0, f"{where}: unknown key '{dotted}' — {suggestion}"))
        elif err["type"] == "missing":
            problems.append((line or 0, f"{where}: missing required key '{dotted}'"))
        else:
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            problems.append((line or 0, f"{where}: '{dotted}': {_expected(err)}{shown}"))
    problems.sort(key=lambda item: item[0])
    head = f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''} in the spec"
    body = "\n  ".join(text for _, text in problems)
    return SpecError(f"{head}\n  {body}", hint="see the README section 'The spec' for every field")


def _is_union_tag(part: str | int) -> bool:
    """Pydantic inserts union member names (``str``, ``function-after[...]``) into locs."""
    return isinstance(part, str) and (part in {"str", "int", "float", "bool"} or "[" in part)


def _expected(err: ErrorDetails) -> str:
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    return msg[0].lower() + msg[1:] if msg else msg


def _valid_keys(model: type[BaseModel], loc: Iterable[str | int]) -> list[str]:
    """Field names (and aliases) of the sub-model found at ``loc``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", {})
    return [f.alias or name for name, f in fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel inside an annotation like ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
