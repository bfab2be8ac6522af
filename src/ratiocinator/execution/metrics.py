"""Streaming metric parsing for a live runner process.

The orchestrator reads raw byte chunks from a runner's stdout/stderr pipes. A
`LineSplitter` turns them into text lines with bounded memory (a runner may print a
10 MB line with no newline, or binary garbage), a `MetricParser` turns lines into
`MetricPoint`s under one protocol, and a `MetricSummary` keeps each metric's final
value. A runner may print millions of lines, so the per-line paths are kept short:
regexes are precompiled and lines that cannot be metrics are rejected with a
substring test before any real work.

Whatever a runner prints, parsing a line takes time linear in its length: ``key_value`` is
parsed by a split and an unambiguous number pattern (no backtracking), and the user's
``regex`` patterns run on RE2, which guarantees linear time (a pattern RE2 cannot run, such
as a backreference, is refused when the spec is validated). A run may name at most
`MAX_METRIC_NAMES` distinct metrics; points of further names are dropped and counted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import re2

__all__ = [
    "PROTOCOLS",
    "LineSplitter",
    "MetricParser",
    "MetricPoint",
    "MetricSummary",
    "MAX_METRIC_NAMES",
    "compile_pattern",
    "make_parser",
]

PROTOCOLS = ("json_line", "key_value", "regex")

_MAX_PROBLEMS = 20
MAX_METRIC_NAMES = 10_000  # distinct names per run: a million made-up names would cost the ledger 150 MB
# Step keys of a json_line object, in order of preference: the first one holding an integer is the
# step of the line's points. A top-level "step" is never a metric; "epoch" and the others stay metrics too.
_STEP_KEYS = ("step", "epoch", "iter", "iteration")
_NONFINITE_STRINGS = frozenset({"nan", "inf", "-inf"})
# raw_decode skips json.loads' wrapper, a large share of the cost of a short object.
_decode_json = json.JSONDecoder().raw_decode
# ASCII so that neither the name nor the number can pick up look-alike Unicode
# letters or digits (float() would accept e.g. Arabic-Indic digits).
# Each is matched whole against one side of the line; neither can backtrack more than linearly
# (the dot is what enters the fraction, so digits split only one way).
_KV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*", re.ASCII)
_KV_NUMBER = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|nan|inf(?:inity)?)", re.ASCII | re.IGNORECASE)
_KV_SEPARATORS = re.compile(r"[:=]")
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is our error message, not a line on stderr


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One value of one metric, as read from the runner's output."""

    name: str
    value: float
    step: int | None
    seq: int


_alloc_point = object.__new__
_set_name, _set_value, _set_step, _set_seq = (
    MetricPoint.__dict__[field].__set__ for field in ("name", "value", "step", "seq")
)


def _point(name: str, value: float, step: int | None, seq: int) -> MetricPoint:
    """Build a MetricPoint at about half the cost of its frozen __init__.

    The generated __init__ looks up and calls object.__setattr__ once per field; the
    json_line path builds several points per line, millions of lines per run.
    """
    point = _alloc_point(MetricPoint)
    _set_name(point, name)
    _set_value(point, value)
    _set_step(point, step)
    _set_seq(point, seq)
    return point


class LineSplitter:
    """Turns byte chunks into decoded text lines; bounded memory.

    Bytes are split before decoding, so a multi-byte character cut by a chunk
    boundary decodes whole. '\\n', '\\r\\n' and a lone '\\r' (progress bars) each end a
    line, including a '\\r\\n' cut between two chunks. At most `max_line_bytes` of the
    pending line are held; the rest of an overlong line is dropped until its newline.
    """

    def __init__(self, max_line_bytes: int = 1 << 20) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
        self.truncated_lines = 0
        self._limit = max_line_bytes
        self._pending = bytearray()
        self._discarding = False  # the pending line overflowed; drop bytes until EOL
        self._after_cr = False  # the last chunk ended in '\r'; a leading '\n' is its pair

    def feed(self, chunk: bytes) -> list[str]:
        """Return the lines that `chunk` completes, without their line endings."""
        if not chunk:
            return []
        if self._after_cr and chunk[0] == 0x0A:
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r")) + 1
        if not end:
            self._hold(chunk)
            return []
        lines = (chunk[:end] if end < len(chunk) else chunk).splitlines()
        if self._pending:  # never empty while discarding
            lines[0] = self._complete(lines[0])
        limit = self._limit
        if end > limit:  # only then can a line inside this chunk be overlong
            for i, line in enumerate(lines):
                if len(line) > limit:
                    lines[i] = line[:limit]
                    self.truncated_lines += 1
        if end < len(chunk):
            self._hold(chunk[end:])
        return [line.decode("utf-8", "replace") for line in lines]

    def flush(self) -> list[str]:
        """Return the final line if the stream ended without a line ending."""
        self._after_cr = False
        if not self._pending:
            return []
        return [self._complete(b"").decode("utf-8", "replace")]

    def _hold(self, data: bytes) -> None:
        """Keep the start of an unfinished line, up to the line limit."""
        if self._discarding:
            return
        room = self._limit - len(self._pending)
        if len(data) > room:
            self._pending += data[:room]
            self._discarding = True
            self.truncated_lines += 1
        else:
            self._pending += data

    def _complete(self, rest: bytes) -> bytes:
        """Join the held start of a line with its `rest` and reset the held state."""
        self._hold(rest)
        line = bytes(self._pending)
        self._pending.clear()
        self._discarding = False
        return line


class MetricParser:
    """Parses lines of one run under one protocol.

    Lines are numbered from 1 in the order fed, for problem notes. A line that yields
    points takes the next `seq`, so points of one line share it and seqs stay dense.
    Malformed metric lines become notes in `problems`, never exceptions: a runner's
    output must not be able to crash the orchestrator.
    """

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.problem_count = 0
        self.dropped_names = 0  # points of names past MAX_METRIC_NAMES, not recorded
        self._names: set[str] = set()
        self._lineno = 0
        self._seq = 0

    def feed_line(self, line: str) -> list[MetricPoint]:
        """Return the metric points in `line` (empty for ordinary output)."""
        raise NotImplementedError

    def _note(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"line {self._lineno}: {message}")

    def _capped(self, points: list[MetricPoint]) -> list[MetricPoint]:
        """``points`` less those that would name a metric past `MAX_METRIC_NAMES`."""
        names = self._names
        if len(names) < MAX_METRIC_NAMES - len(points) or all(p.name in names for p in points):
            names.update(p.name for p in points)
            return points
        kept = []
        for point in points:
            if point.name in names or len(names) < MAX_METRIC_NAMES:
                names.add(point.name)
                kept.append(point)
            else:
                if not self.dropped_names:
                    self._note(f"more than {MAX_METRIC_NAMES:,} distinct metric names; further names are dropped")
                self.dropped_names += 1
        return kept


class _JsonLineParser(MetricParser):
    """`<prefix>{json object}` lines; numeric fields, flattened with '/', are points."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix

    def feed_line(self, line: str) -> list[MetricPoint]:
        self._lineno += 1
        prefix = self._prefix
        if prefix not in line:
            return []
        text = line.lstrip()
        if not text.startswith(prefix):
            return []
        payload = text[len(prefix) :].strip()
        try:
            obj, end = _decode_json(payload)
        except (ValueError, RecursionError) as exc:
            self._note(f"{prefix} payload is not valid JSON: {exc}")
            return []
        if end != len(payload):
            extra = payload[end : end + 40].lstrip()
            self._note(f"{prefix} payload is not valid JSON: extra data after it: {extra!r}")
            return []
        if type(obj) is not dict:
            self._note(f"{prefix} payload is not a JSON object: {payload[:40]!r}")
            return []
        step = None
        for key in _STEP_KEYS:
            candidate = obj.get(key)
            if type(candidate) is int:
                step = candidate
                break
        points: list[MetricPoint] = []
        try:
            _flatten(obj, "", step, self._seq, points)
        except RecursionError:
            self._note(f"{prefix} payload is nested too deeply")
            return []
        if "step" in obj:  # "step" is the points' step index, never a metric of its own (an epoch may be both)
            points = [p for p in points if p.name != "step"]
        points = self._capped(points)
        if points:
            self._seq += 1
        return points


def _flatten(
    obj: dict, prefix: str, step: int | None, seq: int, out: list[MetricPoint]
) -> None:
    """Append a point for every numeric leaf of `obj`, named by its '/'-joined path."""
    for key, value in obj.items():
        kind = type(value)
        if kind is float:
            out.append(_point(prefix + key, value, step, seq))
        elif kind is int:
            try:
                number = float(value)
            except OverflowError:  # beyond float range, as float("1e400") is
                number = math.inf if value > 0 else -math.inf
            out.append(_point(prefix + key, number, step, seq))
        elif kind is dict:
            _flatten(value, f"{prefix}{key}/", step, seq, out)
        elif kind is str and len(value) <= 4 and value.lower() in _NONFINITE_STRINGS:
            out.append(_point(prefix + key, float(value), step, seq))


class _KeyValueParser(MetricParser):
    """Whole-line `name: value` or `name = value`; anything else is not a metric."""

    def feed_line(self, line: str) -> list[MetricPoint]:
        self._lineno += 1
        if ":" not in line and "=" not in line:
            return []
        split = _KV_SEPARATORS.search(line)
        assert split is not None
        name, value = line[: split.start()].strip(), line[split.end() :].strip()
        if _KV_NAME.fullmatch(name) is None or _KV_NUMBER.fullmatch(value) is None:
            return []
        points = self._capped([_point(name, float(value), None, self._seq)])
        if points:
            self._seq += 1
        return points


class _RegexParser(MetricParser):
    """User patterns, each with one capture group holding the metric's value."""

    def __init__(self, patterns: dict[str, Any]) -> None:
        super().__init__()
        self._patterns = tuple(patterns.items())  # RE2 patterns: linear time, whatever the line

    def feed_line(self, line: str) -> list[MetricPoint]:
        self._lineno += 1
        points: list[MetricPoint] = []
        for name, pattern in self._patterns:
            match = pattern.search(line)
            if match is None or match[1] is None:
                continue
            try:
                value = float(match[1])
            except ValueError:
                self._note(f"pattern for {name!r} captured {match[1][:40]!r}, not a number")
                continue
            points.append(_point(name, value, None, self._seq))
        if points:
            self._seq += 1
        return points


def make_parser(
    protocol: str, *, json_prefix: str = "METRICS:", patterns: dict[str, str] | None = None
) -> MetricParser:
    """Build the parser for `protocol`, rejecting a bad configuration up front.

    `json_prefix` applies to json_line and `patterns` to regex; each is ignored by the
    other protocols.
    """
    if protocol == "json_line":
        if not json_prefix:
            raise ValueError("json_line protocol needs a non-empty json_prefix")
        return _JsonLineParser(json_prefix)
    if protocol == "key_value":
        return _KeyValueParser()
    if protocol == "regex":
        if not patterns:
            raise ValueError("regex protocol needs at least one pattern (metric name -> regex)")
        return _RegexParser({name: compile_pattern(name, p) for name, p in patterns.items()})
    raise ValueError(
        f"unknown metric protocol {protocol!r}; expected one of: {', '.join(PROTOCOLS)}"
    )


def compile_pattern(name: str, pattern: str) -> Any:
    """The user's pattern for metric ``name`` on RE2 (linear time on any line), or why it cannot be used."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"regex for metric {name!r} does not compile: {exc}") from None
    try:
        compiled = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"regex for metric {name!r} cannot run in linear time on every line ({reason}); patterns run"
                         " on RE2: no backreferences or lookarounds") from None
    if compiled.groups != 1:
        raise ValueError(
            f"regex for metric {name!r} must have exactly one capture group (exactly one (group), the value);"
            f" found {compiled.groups}: {pattern!r}"
        )
    return compiled


class MetricSummary:
    """Accumulates points into per-metric final values (the last point of each name).

    Non-finite values are tracked apart so a report can flag a run that diverged
    (`any_nonfinite`) even when it ended finite, and one that ended diverged
    (`nonfinite`).
    """

    def __init__(self) -> None:
        self.final: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.nonfinite: set[str] = set()
        self.any_nonfinite: set[str] = set()

    def add(self, points: list[MetricPoint]) -> None:
        final, counts, isfinite = self.final, self.counts, math.isfinite
        for point in points:
            name, value = point.name, point.value
            final[name] = value
            counts[name] = counts.get(name, 0) + 1
            if isfinite(value):
                self.nonfinite.discard(name)
            else:
                self.nonfinite.add(name)
                self.any_nonfinite.add(name)
