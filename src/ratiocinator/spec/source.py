"""Reading YAML while remembering where every key and value came from.

Pydantic reports errors by location path (``("hardware", "num_gpus")``); users need
``spec.yaml:23``. This module loads YAML into plain Python objects together with a map
from location path to line number, refuses duplicate keys (PyYAML silently keeps the
last one), and turns pydantic validation errors into messages with file, line, key and
the nearest valid key.

Whatever the file holds, reading it ends in data or in a `SpecError`, in bounded time and
memory: the document's size, nesting depth and alias expansion are bounded (a "billion
laughs" file is refused before it grows), recursive aliases and unreadable values (unknown
tags, integers past Python's digit limit, unhashable keys, malformed timestamps) are errors
with their line, and so is a NUL character anywhere.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ratiocinator.errors import SpecError

if TYPE_CHECKING:  # pydantic is only needed once a spec fails validation; `status` reads stored specs without it
    from pydantic import BaseModel, ValidationError
    from pydantic_core import ErrorDetails

Loc = tuple[str | int, ...]

MAX_BYTES = 1 << 20  # a spec or program is a page of YAML; a megabyte is not one
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 100_000  # nodes once every alias is expanded: what validation would walk
# libyaml's parser where PyYAML was built with it: the same nodes and data, several times faster than the
# pure-Python reader. It composes a spec's node tree (with every node's line); construction stays in Python
# (`_LineLoader`), where its errors get their line. Text the ledger stores is read with it whole.
_LIBYAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(yaml.SafeLoader):
    """Builds the data from a composed node tree (see `_LIBYAML`); its constructors' own failures (a malformed
    ``!!timestamp``, an integer past Python's digit limit) carry the node's line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            shown = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {str(shown)[:40]!r} as {node.tag.rsplit(':', 1)[-1]} ({str(exc)[:80]})",
                node.start_mark) from None


def load_stored(text: str) -> Any:
    """A YAML document the ledger stores (a spec or program read and validated before), as plain data;
    ``yaml.YAMLError`` when it does not parse."""
    return yaml.load(text, Loader=_LIBYAML)


def read_mapping(path: Path, what: str) -> tuple[bytes, str, dict[str, Any], dict[Loc, int]]:
    """A YAML file that must be a mapping: its bytes, text, data and key lines; errors say which file and why."""
    try:
        # Opened without blocking, then read blocking: a named pipe with no writer reads as empty
        # instead of freezing the command, while `<(...)` process substitution still works.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(f"{path}: {what} file not found") from None
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: cannot read the {what}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(raw) > MAX_BYTES:
        raise SpecError(f"{path}: the {what} is larger than {MAX_BYTES >> 20} MiB; a {what} is a page of YAML",
                        hint="keep data out of it: point at files (data.path, deps.requirements) instead")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: the {what} is not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise SpecError(f"{path}:{line}: the {what} holds a NUL character; it must be plain text")
    data, lines = load_yaml_with_lines(text, path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: the {what} must be a mapping of keys to values, got {type(data).__name__}")
    return raw, text, data, lines


def load_yaml_with_lines(text: str, path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse ``text`` and return (data, {location path: 1-based line})."""
    try:
        node = yaml.compose(text, Loader=_LIBYAML)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        if "nesting depth" in problem:  # libyaml's own limit, far above ours
            raise SpecError(f"{_where(path, exc)}: the YAML nests too deeply to read (more than {MAX_DEPTH} levels"
                            " are refused)") from None
        raise SpecError(f"{_where(path, exc)}: not valid YAML: {problem}") from None
    except RecursionError:
        raise SpecError(f"{path}: the YAML nests too deeply to read (more than {MAX_DEPTH} levels are refused)"
                        ) from None
    if node is None:
        raise SpecError(f"{path}: the spec is empty", hint="docs/spec.md lists every field")
    lines: dict[Loc, int] = {}
    _index(node, (), lines, path, _Walk())
    loader = _LineLoader(text)
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:  # an unknown or unsafe tag, an unhashable key
        raise SpecError(f"{_where(path, exc)}: cannot read this value: {getattr(exc, 'problem', None) or exc}",
                        hint="plain YAML only: no !!python tags, keys are strings; quote a value to keep it text"
                        ) from None
    finally:
        loader.dispose()
    _refuse_nul(data, (), lines, path)
    return data, lines


def _where(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"{path}:{mark.line + 1}" if mark is not None else str(path)


def _refuse_nul(value: Any, loc: Loc, lines: dict[Loc, int], path: Path) -> None:
    """A NUL written as an escape (``"a\\0b"``) would reach git, a path or an environment variable."""
    if isinstance(value, str):
        if "\x00" in value:
            line = line_for(loc, lines)
            raise SpecError(f"{path}:{line or 1}: '{'.'.join(map(str, loc)) or '(top level)'}' holds a NUL character")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(key, loc, lines, path)
            _refuse_nul(item, (*loc, str(key)), lines, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_nul(item, (*loc, i), lines, path)


class _Walk:
    """What `_index` has walked: nodes counted with every alias expanded, and the current path's nodes."""

    def __init__(self) -> None:
        self.nodes = 0
        self.open: set[int] = set()


def _index(node: yaml.Node, loc: Loc, lines: dict[Loc, int], path: Path, walk: _Walk) -> None:
    line = node.start_mark.line + 1
    walk.nodes += 1
    if walk.nodes > MAX_NODES:
        raise SpecError(f"{path}:{line}: the YAML expands to more than {MAX_NODES:,} values (aliases of aliases?)",
                        hint="write the values out; a spec needs no nested aliases")
    if len(loc) > MAX_DEPTH:
        raise SpecError(f"{path}:{line}: the YAML nests more than {MAX_DEPTH} levels deep")
    if id(node) in walk.open:
        raise SpecError(f"{path}:{line}: an alias refers to a value that contains it (a recursive alias)")
    lines.setdefault(loc, line)
    if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        return
    walk.open.add(id(node))
    try:
        _index_children(node, loc, lines, path, walk)
    finally:
        walk.open.discard(id(node))


def _index_children(node: yaml.Node, loc: Loc, lines: dict[Loc, int], path: Path, walk: _Walk) -> None:
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
            _index(value_node, loc + (key,), lines, path, walk)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[loc + (i,)] = item.start_mark.line + 1
            _index(item, loc + (i,), lines, path, walk)


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
        loc = _user_loc(err["loc"], lines)
        line = line_for(loc, lines)
        where = f"{path}:{line}" if line else str(path)
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden" and loc:
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
    return SpecError(f"{head}\n  {body}", hint="docs/spec.md lists every field")


def _user_loc(loc: tuple[str | int, ...], lines: dict[Loc, int]) -> Loc:
    """The error's location in the user's document: pydantic inserts union member names (``str``,
    ``function-after[...]``) into locs; a part the document has at that place (a key named ``int``,
    or ``a[b``) is the user's, whatever it looks like."""
    out: list[str | int] = []
    for part in loc:
        if (*out, part) not in lines and _is_union_tag(part):
            continue
        out.append(part)
    return tuple(out)


def _is_union_tag(part: str | int) -> bool:
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
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
