"""Streaming metric parsing for a live runner process.

The orchestrator reads raw byte chunks from a runner's stdout/stderr pipes. A
`LineSplitter` turns them into text lines with bounded memory (a runner may print a
10 MB line with no newline, or binary garbage), a `MetricParser` turns lines into
`MetricPoint`s under one protocol, and a `MetricSummary` keeps each metric's final
value. A runner may print millions of lines, so the per-line paths are kept short:
regexes are precompiled and lines that cannot be metrics are rejected with a
substring test before any real work. The executor feeds whole blocks of lines
(`LineSplitter.feed_block`, `MetricParser.feed_block`) and gets a `PointBatch` of columns back:
``json_line`` and ``key_value`` pick out the common line shapes of a block with one regex
split, and any other line goes through the line-by-line parser, so a block yields exactly
the points, seqs and problem notes its lines would one by one.

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import re2

__all__ = [
    "PROTOCOLS",
    "LineSplitter",
    "MetricParser",
    "MetricPoint",
    "MetricSummary",
    "PointBatch",
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
_STEP_MIN, _STEP_MAX = -(2**63) + 1, 2**63 - 1  # the ledger's int64 steps (the smallest means none)
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
# A whole key_value line in a block, in the form the line-by-line parser reads it: the name and the
# number around the first separator, with spaces or tabs (other whitespace is left to that parser).
_KV_LINE = re.compile(rf"^[ \t]*({_KV_NAME.pattern})[ \t]*[:=][ \t]*({_KV_NUMBER.pattern})[ \t]*\n",
                      re.ASCII | re.IGNORECASE | re.MULTILINE)

# Pieces of a json_line shape (see `_JsonShape`): JSON tokens whose value each pattern pins down, so
# that every line a shape matches is valid JSON that decodes to the shape's keys and value types.
_WS = "[ \t]*"  # JSON whitespace within a line
# An integer that fits the ledger's int64 steps; "-0" is left out (0 as an int, -0.0 as a float).
_JSON_INT = "0|-?[1-9][0-9]{0,17}"
# A number JSON decodes to a float. Integer digits are bounded (long integers are refused by
# int(), which json uses for them), and so is a bare "-0" (see above): both are left to json.
_JSON_FLOAT = r"-?(?:0|[1-9][0-9]{0,63})(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[eE][-+]?[0-9]+)|NaN|-?Infinity"
_JSON_NUMBER = r"(?:-?[1-9][0-9]{0,63}|0|-0(?=[.eE]))(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|NaN|-?Infinity"
_JSON_NONFINITE = "[nN][aA][nN]|[iI][nN][fF]|-[iI][nN][fF]"  # the strings a point may hold, any case
_JSON_NO_POINT = rf'true|false|null|"(?!(?:{_JSON_NONFINITE})")[^"\\\x00-\x1f]*"'  # no escapes: json's own
_PLAIN_KEY = re.compile(r'[^"\\\x00-\x1f]*')
_MAX_SHAPES = 8  # shapes kept per run: a runner seldom prints more kinds of metric line
_MAX_SHAPE_MEMBERS = 256
_MAX_SHAPE_LINE = 4096
_LEARN_AFTER = 16  # metric lines read one by one after a shape is learnt, before the next is
_MAX_LEARN_PATIENCE = 1024  # and at most, after lines that have none
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


# One metric's points in a batch: seqs, steps (None where the line gave none) and values, in order.
Series = tuple[list[int], list[int | None], list[float]]


class PointBatch:
    """Metric points in columns: one series per name, names in the order they first appear.

    A runner may print a million points; as columns they cost a few list slots each rather
    than an object each, and columns are what the ledger stores (`Ledger.add_points` takes a
    batch as it takes points).
    """

    __slots__ = ("series", "size")

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[MetricPoint]:
        """The points one by one, series by series (so not in the order of their lines)."""
        for name, (seqs, steps, values) in self.series.items():
            for seq, step, value in zip(seqs, steps, values, strict=True):
                yield _point(name, value, step, seq)

    def add_points(self, points: Iterable[MetricPoint]) -> None:
        series = self.series
        for point in points:
            columns = series.get(point.name)
            if columns is None:
                columns = series[point.name] = ([], [], [])
            columns[0].append(point.seq)
            columns[1].append(point.step)
            columns[2].append(point.value)
            self.size += 1

    def add_series(self, name: str, seqs: list[int], steps: list[int | None], values: list[float]) -> None:
        columns = self.series.get(name)
        if columns is None:
            self.series[name] = (seqs, steps, values)
        else:
            columns[0].extend(seqs)
            columns[1].extend(steps)
            columns[2].extend(values)
        self.size += len(values)

    def extend(self, other: PointBatch) -> None:
        """Append ``other``'s points, which come after this batch's."""
        series = self.series
        for name, (seqs, steps, values) in other.series.items():
            columns = series.get(name)
            if columns is None:
                series[name] = (seqs.copy(), steps.copy(), values.copy())
            else:
                columns[0].extend(seqs)
                columns[1].extend(steps)
                columns[2].extend(values)
        self.size += other.size


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

    def feed_block(self, chunk: bytes) -> str:
        """The lines `feed` would return, as one text with each line ended by '\\n' ('' for none).

        A chunk of '\\n'-ended lines that is valid UTF-8 (most chunks) is decoded in one call: a
        valid whole decodes as its lines do one by one, since no multi-byte character holds '\\n'.
        """
        end = chunk.rfind(b"\n") + 1
        if (end and not self._after_cr and not self._discarding and len(self._pending) + end <= self._limit
                and b"\r" not in chunk):  # then no line is overlong, and '\n' is the only line ending
            region = chunk if end == len(chunk) else chunk[:end]
            if self._pending:
                region = bytes(self._pending) + region
            try:
                text = region.decode("utf-8")
            except UnicodeDecodeError:
                pass  # line by line below, each invalid byte replaced
            else:
                self._pending.clear()
                if end < len(chunk):
                    self._hold(chunk[end:])
                return text
        lines = self.feed(chunk)
        return "\n".join(lines) + "\n" if lines else ""

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

    def feed_block(self, block: str) -> PointBatch:
        """The points of `block`, whole lines each ended by '\\n' (as `LineSplitter.feed_block` gives
        them): what `feed_line` would give line by line, in one batch."""
        batch = PointBatch()
        self._feed_lines(block, batch)
        return batch

    def _feed_lines(self, block: str, batch: PointBatch) -> None:
        feed = self.feed_line
        for line in block.split("\n")[:-1]:
            found = feed(line)
            if found:
                batch.add_points(found)

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
    """`<prefix>{json object}` lines; numeric fields, flattened with '/', are points.

    A block is read in bulk by the shapes of metric line it has shown (`_JsonShape`): one regex
    split per shape picks out the lines of that shape and their values, and the lines no shape
    matches are read one by one. A shape is learnt from a line read one by one, and kept only
    when it reads that line exactly as `feed_line` did.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self._prefix = prefix
        # Shapes match a prefix after spaces or tabs, on one line: as `feed_line` reads it, unless
        # the prefix itself begins with whitespace or holds a line ending.
        self._shapes: list[_JsonShape] | None = (
            [] if prefix == prefix.lstrip() and "\n" not in prefix and "\r" not in prefix else None
        )
        # Metric lines read one by one before the next try at learning a shape. Not the first: many runners
        # print one metric line (their result) and nothing after, and learning costs more than reading it.
        self._patience = 1
        self._waited = 0
        self._learnt = False  # a shape was tried in this block

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
                if not _STEP_MIN <= candidate <= _STEP_MAX:
                    self._note(f"{prefix} {key} {candidate} does not fit a 64-bit integer: its points have no step")
                    break
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

    def feed_block(self, block: str) -> PointBatch:
        batch = PointBatch()
        if self._shapes is None or not block:
            self._feed_lines(block, batch)
        else:
            self._learnt = False
            self._feed_shaped("\n" + block[:-1], batch, 0)
        return batch

    def _feed_shaped(self, lines: str, batch: PointBatch, depth: int) -> None:
        """``lines`` (each led by its '\\n') that ``shapes[depth]`` matches, in bulk; the others by the
        next shapes, and those no shape matches one by one."""
        if self._prefix not in lines:  # ordinary output: only counted
            self._lineno += lines.count("\n")
            return
        assert self._shapes is not None
        if depth >= len(self._shapes):
            self._feed_learning(lines[1:] + "\n", batch)
            return
        shape = self._shapes[depth]
        stride = len(shape.captures) + 1
        parts = shape.regex.split(lines)
        gaps = parts[::stride]  # gaps[i]: the lines before match i; gaps[matches]: those after the last
        if any(gap[0] != "\n" for gap in gaps[1:] if gap):  # a match stopped short of its line's end
            parts = shape.whole_lines.split(lines)
            gaps = parts[::stride]
        matches = len(parts) // stride
        if not matches:
            self._feed_shaped(lines, batch, depth + 1)
            return
        start = 0
        if any(gaps):
            for index in [i for i, gap in enumerate(gaps) if gap]:
                if index > start:
                    self._take_shape(shape, parts, start, index, batch)
                self._feed_shaped(gaps[index], batch, depth + 1)
                start = index
        if matches > start:
            self._take_shape(shape, parts, start, matches, batch)

    def _take_shape(self, shape: _JsonShape, parts: list[str], first: int, end: int, batch: PointBatch) -> None:
        """Matches ``first`` to ``end`` of ``shape`` in ``parts`` (a split) into the batch: one seq a line."""
        stride = len(shape.captures) + 1
        count = end - first
        columns = [parts[1 + first * stride + i : end * stride : stride] for i in range(len(shape.captures))]
        steps: list[int | None] = (
            [None] * count if shape.step is None else list(map(int, columns[shape.step])))
        seqs = range(self._seq, self._seq + count)
        for name, column in zip(shape.captures, columns, strict=True):
            if name is not None:
                batch.add_series(name, list(seqs), steps.copy(), list(map(float, column)))
        self._seq += count
        self._lineno += count

    def _feed_learning(self, block: str, batch: PointBatch) -> None:
        """Lines no shape matches, one by one; a metric line may teach a shape for the next blocks.

        At most one shape is learnt per block and, after one is, not before `_LEARN_AFTER` more
        such lines (longer after a line that has none): a runner whose every line has a new
        shape costs little more than reading it line by line.
        """
        feed, shapes = self.feed_line, self._shapes
        assert shapes is not None
        learning = not self._learnt
        for line in block.split("\n")[:-1]:
            found = feed(line)
            if not found:
                continue
            batch.add_points(found)
            if not learning:
                continue
            self._waited += 1
            if self._waited <= self._patience:
                continue
            learning, self._learnt, self._waited = False, True, 0
            shape = _JsonShape.learn(self._prefix, line, found)
            if shape is None:
                self._patience = min(2 * self._patience + _LEARN_AFTER, _MAX_LEARN_PATIENCE)
            else:
                self._patience = _LEARN_AFTER
                shapes.insert(0, shape)  # takes effect from the next block
                del shapes[_MAX_SHAPES:]


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


class _JsonShape:
    """One shape of json_line line: its keys in order, its nesting, its spacing, and the kind of
    each value.

    ``whole_lines`` matches a line of this shape led by its '\\n' (and followed by the next one, or
    the end) as `feed_line` reads it: the prefix, then a JSON object whose leaves are each pinned to a
    token kind (any number, a float only, an int step, a non-finite string, or a value that is no
    point), so that every line it matches decodes to the same keys, the same step key and the
    same points. Spacing is the sample line's, kept literal: a regex with few variable parts scans
    fast, and a runner prints every line of a kind alike. ``regex`` is the same without looking
    past the line's end, which makes it faster: a match it finds is a whole line unless the text
    after it goes on without a '\\n'. Their groups capture the values; ``captures`` names the
    point each one is (None: the step alone), and ``step`` is the index of the group holding
    the lines' step.
    """

    __slots__ = ("regex", "whole_lines", "captures", "step")

    def __init__(self, body: str, captures: list[str | None], step: int | None) -> None:
        self.regex = re.compile(f"\\n{body}")
        self.whole_lines = re.compile(f"\\n{body}(?=\\n|\\Z)")
        self.captures = captures
        self.step = step

    @classmethod
    def learn(cls, prefix: str, line: str, found: list[MetricPoint]) -> _JsonShape | None:
        """The shape of ``line``, if it has one and reads it exactly as `feed_line` did (``found``).

        Every name the shape yields is then already among the parser's names: its lines never
        meet the cap on distinct names.
        """
        if len(line) > _MAX_SHAPE_LINE:
            return None
        try:
            obj = json.loads(line.lstrip()[len(prefix) :].strip())
        except (ValueError, RecursionError):
            return None
        captures: list[str | None] = []
        int_steps: dict[str, int] = {}
        pieces: list[str | None] = [None, re.escape(prefix), None]
        if not _shape_pieces(obj, "", pieces, captures, int_steps):
            return None
        pieces.append(None)
        points = [name for name in captures if name is not None]
        if not points or len(set(points)) != len(points):  # a name twice would not fit in columns
            return None
        # The sample's spacing: each whitespace piece as a named group, to be read off the line.
        slots = iter(range(len(pieces)))
        spaced = "".join(f"(?P<_w{next(slots)}>[ \t]*)" if piece is None else piece for piece in pieces)
        sample = re.fullmatch(spaced, line)
        if sample is None:  # the line spells its object otherwise (escapes, a key twice)
            return None
        spacing = iter(sample.group(f"_w{i}") for i in range(sample.re.groups - len(captures)))
        body = "".join(re.escape(next(spacing)) if piece is None else piece for piece in pieces)
        step = next((int_steps[key] for key in _STEP_KEYS if key in int_steps), None)
        shape = cls(body, captures, step)
        match = shape.whole_lines.fullmatch("\n" + line)
        if match is None:
            return None
        groups = match.groups()
        line_step = None if step is None else int(groups[step])
        read = [(name, repr(float(value)), line_step)
                for name, value in zip(captures, groups, strict=True) if name is not None]
        if read != [(p.name, repr(p.value), p.step) for p in found]:
            return None
        return shape


def _shape_pieces(obj: dict, path: str, pieces: list[str | None], captures: list[str | None],
                  int_steps: dict[str, int]) -> bool:
    """Append the regex of `obj` for `_JsonShape` to ``pieces`` (None where JSON allows whitespace)
    and its groups to ``captures``; False if it has no shape.

    ``int_steps`` gets the group of each top-level step key holding an integer.
    """
    if len(obj) > _MAX_SHAPE_MEMBERS:
        return False
    pieces += [r"\{", None]
    for index, (key, value) in enumerate(obj.items()):
        if not _PLAIN_KEY.fullmatch(key):
            return False
        if index:
            pieces += [None, ",", None]
        pieces += [f'"{re.escape(key)}"', None, ":", None]
        kind = type(value)
        name = path + key
        nonfinite = kind is str and len(value) <= 4 and value.lower() in _NONFINITE_STRINGS
        if kind is dict:
            if not _shape_pieces(value, f"{name}/", pieces, captures, int_steps):
                return False
            continue
        if kind is list:
            return False
        if kind is not int and kind is not float and not nonfinite:
            token = f"(?:{_JSON_NO_POINT})"
        elif path or key not in _STEP_KEYS:  # a point whatever kind of number
            token = f'"({_JSON_NONFINITE})"' if nonfinite else f"({_JSON_NUMBER})"
            captures.append(name)
        elif kind is int:  # a step key: the kind of number decides the step, so it is pinned
            token = f"({_JSON_INT})"
            int_steps[key] = len(captures)
            captures.append(None if key == "step" else name)
        elif key == "step":  # not the step, nor a point ("step" never is)
            token = f'"(?:{_JSON_NONFINITE})"' if nonfinite else f"(?:{_JSON_FLOAT})"
        else:
            token = f'"({_JSON_NONFINITE})"' if nonfinite else f"({_JSON_FLOAT})"
            captures.append(name)
        pieces.append(token)
    pieces += [None, r"\}"]
    return len(captures) <= _MAX_SHAPE_MEMBERS


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

    def feed_block(self, block: str) -> PointBatch:
        """One regex split picks out the plain ``name: value`` lines of the block; the other lines
        (ordinary output, or a metric with other whitespace around it) are read one by one."""
        batch = PointBatch()
        if ":" not in block and "=" not in block:
            self._lineno += block.count("\n")
            return batch
        parts = _KV_LINE.split(block)
        matches = len(parts) // 3
        gaps = parts[::3]  # gaps[i]: the lines before match i; gaps[matches]: those after the last
        start = 0
        if any(gaps):
            for index in [i for i, gap in enumerate(gaps) if gap]:
                if index > start:
                    self._take_lines(parts[1 + 3 * start : 3 * index : 3], parts[2 + 3 * start : 3 * index : 3], batch)
                self._feed_lines(gaps[index], batch)
                start = index
        if matches > start:
            self._take_lines(parts[1 + 3 * start :: 3], parts[2 + 3 * start :: 3], batch)
        return batch

    def _take_lines(self, names: list[str], numbers: list[str], batch: PointBatch) -> None:
        """Consecutive metric lines, one point each, into the batch."""
        count = len(names)
        values = list(map(float, numbers))
        known, distinct = self._names, set(names)
        fresh = distinct.difference(known)
        if fresh and len(known) + len(fresh) > MAX_METRIC_NAMES:  # at the cap: line by line, as `feed_line`
            for name, value in zip(names, values, strict=True):
                self._lineno += 1
                kept = self._capped([_point(name, value, None, self._seq)])
                if kept:
                    batch.add_points(kept)
                    self._seq += 1
            return
        known.update(fresh)
        seq = self._seq
        if len(distinct) == 1:  # one name throughout
            batch.add_series(names[0], list(range(seq, seq + count)), [None] * count, values)
        else:
            series = batch.series
            for name, value in zip(names, values, strict=True):
                columns = series.get(name)
                if columns is None:
                    columns = series[name] = ([], [], [])
                columns[0].append(seq)
                columns[1].append(None)
                columns[2].append(value)
                seq += 1
            batch.size += count
        self._seq += count
        self._lineno += count


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

    def add_batch(self, batch: PointBatch) -> None:
        """`add` for a batch: per name, its last value and how many it had."""
        final, counts, isfinite = self.final, self.counts, math.isfinite
        for name, (_, _, values) in batch.series.items():
            last = final[name] = values[-1]
            counts[name] = counts.get(name, 0) + len(values)
            if isfinite(last):
                self.nonfinite.discard(name)
            else:
                self.nonfinite.add(name)
            if not all(map(isfinite, values)):
                self.any_nonfinite.add(name)
