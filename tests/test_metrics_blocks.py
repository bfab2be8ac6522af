"""Metric parsing by blocks agrees with parsing line by line.

The executor reads a runner's output a chunk at a time: `LineSplitter.feed_block` decodes the
chunk's lines in one call, and `MetricParser.feed_block` reads the common line shapes of the
block in bulk. Whatever the output, the batch must hold exactly the points (names in order of
first appearance, seqs, steps, values to the bit), problem notes and counts that `feed` and
`feed_line` give line by line. Each test runs both readings side by side on the same stream.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from ratiocinator.execution.metrics import (
    MAX_METRIC_NAMES,
    LineSplitter,
    MetricParser,
    MetricSummary,
    PointBatch,
    make_parser,
)
from small_ledger import EXPERIMENT, build

ENDINGS = (b"\n", b"\n", b"\n", b"\r\n", b"\r")


def by_lines(protocol: str, chunks: list[bytes], max_line_bytes: int = 1 << 20) -> tuple[PointBatch, MetricParser,
                                                                                         LineSplitter]:
    splitter, parser, batch = LineSplitter(max_line_bytes), make_parser(protocol), PointBatch()
    for chunk in chunks:
        for line in splitter.feed(chunk):
            batch.add_points(parser.feed_line(line))
    for line in splitter.flush():
        batch.add_points(parser.feed_line(line))
    return batch, parser, splitter


def by_blocks(protocol: str, chunks: list[bytes], max_line_bytes: int = 1 << 20) -> tuple[PointBatch, MetricParser,
                                                                                          LineSplitter]:
    splitter, parser, batch = LineSplitter(max_line_bytes), make_parser(protocol), PointBatch()
    for chunk in chunks:
        batch.extend(parser.feed_block(splitter.feed_block(chunk)))
    for line in splitter.flush():
        batch.extend(parser.feed_block(line + "\n"))
    return batch, parser, splitter


def columns(batch: PointBatch) -> list[tuple[str, list[int], list[int | None], list[str]]]:
    """The batch as comparable lists; values by repr, so NaN equals NaN and -0.0 differs from 0.0."""
    return [(name, seqs, steps, [repr(v) for v in values]) for name, (seqs, steps, values) in batch.series.items()]


def assert_same(protocol: str, chunks: list[bytes], max_line_bytes: int = 1 << 20) -> MetricParser:
    expected, slow, slow_splitter = by_lines(protocol, chunks, max_line_bytes)
    got, fast, fast_splitter = by_blocks(protocol, chunks, max_line_bytes)
    assert columns(got) == columns(expected)
    assert len(got) == len(expected)
    assert fast.problems == slow.problems
    assert (fast.problem_count, fast.dropped_names) == (slow.problem_count, slow.dropped_names)
    assert fast_splitter.truncated_lines == slow_splitter.truncated_lines
    return fast


def stream(lines: list[str], rng: random.Random) -> bytes:
    return b"".join(line.encode("utf-8", "surrogatepass") + rng.choice(ENDINGS) for line in lines)


def cut(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    chunks, at = [], 0
    while at < len(data):
        size = rng.randint(1, largest)
        chunks.append(data[at : at + size])
        at += size
    return chunks


def train_line(i: int) -> str:
    return f'METRICS: {{"step": {i}, "loss": {1 / (i + 1):.6f}}}'


# Lines that each probe one rule of the json_line parser: unicode, NaN and infinities, nested
# objects, the step keys and their kinds, -0, long numbers, values that are no points, malformed
# payloads, whitespace json or str.strip reads and the shapes do not, and ordinary output.
JSON_LINES = [
    'METRICS: {"step": 3, "λ/ü": 0.5, "日本": 2, "emoji🙂": -1.5e-3}',
    'METRICS: {"\\u00fc": 1, "x": 2}',  # an escaped key: json reads "ü"
    'METRICS: {"loss": NaN, "grad": Infinity, "neg": -Infinity}',
    'METRICS: {"a": "nan", "b": "INF", "c": "-inf", "d": "Nan", "e": "nanx", "f": "inf ", "g": "İnf"}',
    'METRICS: {"train": {"loss": 1.5, "acc": {"top1": 0.5, "top5": 0.9}}, "step": 3}',
    'METRICS: {"step": 1.5, "epoch": 2, "loss": 1}',
    'METRICS: {"epoch": 3, "iter": 4, "loss": 1}',
    'METRICS: {"step": "a", "iteration": 7, "loss": 1}',
    'METRICS: {"step": true, "epoch": 1.0, "loss": 1}',
    'METRICS: {"step": "nan", "epoch": "inf", "loss": 1}',
    'METRICS: {"iter": {"inner": 1}, "loss": 1}',
    'METRICS: {"epoch": 3, "step": 5, "loss": 1}',
    'METRICS: {"iteration": 9, "iter": 2, "epoch": 3, "loss": 1}',
    'METRICS: {"step": -0, "x": -0}',
    'METRICS: {"step": 0, "x": -0.0, "y": -0e1, "z": 0}',
    'METRICS: {"step": 99999999999999999999, "x": 1}',
    'METRICS: {"step": -12, "x": 1}',
    'METRICS: {"x": 1' + "0" * 400 + ', "y": 1.' + "5" * 400 + "}",
    'METRICS: {"x": 1' + "0" * 5000 + "}",  # past int()'s digit limit: json refuses it
    'METRICS: {"x": 1e400, "y": -1e400, "z": 1e-400, "w": 123456789012345678901234567890}',
    'METRICS: {"x": true, "y": null, "z": 1, "s": "text"}',
    'METRICS: {"x": [1, 2], "y": 1}',
    'METRICS: {"a": 1, "a": 2}',
    'METRICS: {"a/b": 1, "a": {"b": 2}}',
    'METRICS: {"s": "a\\"b", "x": 1}',
    'METRICS: {"s": "tab\\there", "x": 1}',
    'METRICS: {"step": 5}',
    "METRICS: {}",
    'METRICS: {"a": 1',
    'METRICS: {"a": 1} trailing',
    "METRICS: [1, 2]",
    "METRICS: nope",
    'METRICS: {"a": 01}',
    'METRICS: {"a": 1.}',
    'METRICS: {"a": .5}',
    'METRICS: {"a": +1}',
    'METRICS: {"a": 1.5.3}',
    'METRICS: {"a": ١}',
    'METRICS:{"a":1}',
    '  METRICS:  {  "a" :1 ,"b":  2 }  ',
    '\tMETRICS: {"a": 1}\t',
    '\x0cMETRICS: {"a": 1}',
    'METRICS: {"a": 1}\x0c',
    '\u00a0METRICS: {"a": 1}',
    'METRICS: {"a": 1}\u2028',
    '[rank0] METRICS: {"a": 1}',
    'metrics: {"a": 1}',
    "hello world",
    "",
    "epoch 3: loss 0.5",
    'METRICS: {"pad": "' + "y" * 5000 + '", "x": 1}',
    'METRICS: {"step": 1, "loss": 1' + "1" * 32_000 + "x}",
    'METRICS: {"deep": ' + '{"d": ' * 40 + "1" + "}" * 40 + "}",
    'METRICS: {"deep": ' + "[" * 5000 + "]" * 5000 + "}",
    'METRICS: {"bad\\ud800": 1}',
    'METRICS: {"ctl": "\x01", "x": 1}',
]


# Lines of the common shapes with values at the edges of what a shape may take: read in bulk by a
# shape learnt from an ordinary line, each must be read as `feed_line` reads it (or left to it).
STEP_SPELLINGS = ["-0", "0", "-5", "99999999999999999999", "123456789012345678", "1.5", "-0.0", "1e3", "NaN",
                  '"a"', '"nan"', "true", "null", "{}", "[1]"]
VALUE_SPELLINGS = ["-0", "-0.0", "0", "-0e1", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", '"nan"', '"INF"',
                   '"-Inf"', '"inf "', '"x"', "true", "null", "1" + "0" * 70, "1" + "0" * 5000, "01", "1.", ".5",
                   "+1", "١", "1.5.3", "[1]", '{"in": 1}', '"\\u0031"']
TAG_SPELLINGS = ['"eval"', '"nan"', '"INF"', '"-inf"', '"Nan"', "true", "null", "1", "-0", '"a\\"b"',
                 '"\\u006e\\u0061\\u006e"']


def variant_lines() -> list[str]:
    lines = [f'METRICS: {{"step": {step}, "loss": 0.5}}' for step in STEP_SPELLINGS]
    lines += [f'METRICS: {{"epoch": {step}, "loss": 0.5}}' for step in STEP_SPELLINGS]
    lines += [f'METRICS: {{"step": 4, "loss": {value}}}' for value in VALUE_SPELLINGS]
    lines += [f'METRICS: {{"step": 4, "val": {{"loss": 1.0, "acc": {value}}}, "lr": 3e-4, "tag": "eval"}}'
              for value in VALUE_SPELLINGS]
    lines += [f'METRICS: {{"step": 4, "val": {{"loss": 1.0, "acc": "nan"}}, "lr": 3e-4, "tag": {tag}}}'
              for tag in TAG_SPELLINGS]
    return lines


def eval_line(i: int) -> str:
    return f'METRICS: {{"step": {i}, "val": {{"loss": {i / 7:.4f}, "acc": "nan"}}, "lr": 3e-4, "tag": "eval"}}'


VARIANTS = variant_lines()


def json_stream(seed: int, count: int) -> list[str]:
    """Mostly a few shapes (as a training loop prints them), with every probe line mixed in."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.6:
            lines.append(train_line(i))
        elif roll < 0.7:
            lines.append(eval_line(i))
        elif roll < 0.8:
            lines.append(f"iteration {i} done")
        elif roll < 0.9:
            lines.append(rng.choice(VARIANTS))
        else:
            lines.append(rng.choice(JSON_LINES))
    return lines


@pytest.mark.parametrize("seed", range(6))
def test_json_line_blocks_match_lines_on_a_mixed_stream(seed: int) -> None:
    rng = random.Random(seed)
    data = stream(json_stream(seed, 3000), rng)
    parser = assert_same("json_line", cut(data, rng, rng.choice([7, 300, 5000, 70_000])))
    assert parser._shapes  # type: ignore[attr-defined]  # shapes were learnt, so the bulk reading was tested


def test_json_line_every_probe_line_read_in_bulk_after_its_shape_is_learnt() -> None:
    # Each probe line, repeated in blocks of its own, so that a shape learnt from it reads the next blocks.
    for line in JSON_LINES:
        chunks = [(line + "\n") .encode("utf-8", "surrogatepass") * 5 for _ in range(40)]
        assert_same("json_line", chunks)


def test_json_line_edge_values_in_lines_of_a_learnt_shape() -> None:
    rng = random.Random(7)
    warm = "".join(f"{train_line(i)}\n{eval_line(i)}\n" + f'METRICS: {{"epoch": {i}, "loss": 0.5}}\n'
                   for i in range(40)).encode()
    for line in variant_lines():
        mixed = "".join(f"{train_line(i)}\n{eval_line(i)}\n{line}\n" for i in range(20)).encode()
        assert_same("json_line", [warm[:1000], warm[1000:], *cut(mixed, rng, 2000)])


def test_json_line_a_learnt_shape_followed_by_more_on_its_line_is_no_match() -> None:
    rng = random.Random(8)
    warm = "".join(f"{train_line(i)}\n" for i in range(60)).encode()
    for tail in (" trailing", "}", ",", "  ", "\x0c", "\u2028", " METRICS: {}", '{"x": 1}'):
        lines = [train_line(i) + (tail if i % 3 == 0 else "") for i in range(300)]
        data = "".join(f"{line}\n" for line in lines).encode()
        assert_same("json_line", [warm, *cut(data, rng, 3000)])


def test_json_line_blocks_read_the_common_shape_in_bulk() -> None:
    chunks = [("\n".join(train_line(i) for i in range(k * 100, k * 100 + 100)) + "\n").encode() for k in range(5)]
    got, parser, _ = by_blocks("json_line", chunks)
    assert len(parser._shapes) == 1  # type: ignore[attr-defined]
    assert columns(got) == columns(by_lines("json_line", chunks)[0])
    seqs, steps, values = got.series["loss"]
    assert seqs == steps == list(range(500)) and values[:2] == [1.0, 0.5]


def test_json_line_lines_cut_anywhere_across_chunks() -> None:
    lines = [train_line(i) if i % 3 else f'METRICS: {{"ü": {i}, "loss": NaN}}' for i in range(60)]
    data = stream(lines, random.Random(1))
    for at in range(0, len(data), 7):
        assert_same("json_line", [data[:at], data[at:]] * 3)


def test_json_line_long_lines_and_truncation() -> None:
    rng = random.Random(3)
    long_value = 'METRICS: {"x": ' + "1" * 3000 + "}"
    lines = [train_line(i) if i % 4 else long_value for i in range(200)]
    data = stream(lines, rng)
    for largest in (50, 2000, 100_000):
        assert_same("json_line", cut(data, rng, largest), max_line_bytes=100)
        assert_same("json_line", cut(data, rng, largest), max_line_bytes=4000)


def test_invalid_utf8_and_crlf_blocks_are_read_as_lines() -> None:
    rng = random.Random(4)
    parts = [train_line(i).encode() for i in range(300)]
    parts[10] = b'METRICS: {"bad": 1, "x\xff": 2}'
    parts[20] = b'METRICS: {"cut": "\xe2\x82", "loss": 1}'
    parts[30] = b"\xed\xa0\x80 surrogate bytes"
    data = b"".join(part + rng.choice(ENDINGS) for part in parts)
    for largest in (3, 64, 4096):
        assert_same("json_line", cut(data, rng, largest))
        assert_same("key_value", cut(data, rng, largest))


def test_the_splitter_gives_a_block_of_the_lines_feed_gives() -> None:
    rng = random.Random(5)
    data = "héllo\r\nwörld\rprogress 50%\rprogress 100%\n\n日本語 → ok\r\nlast".encode() * 50
    for largest in (1, 3, 17, 4096):
        chunks = cut(data, rng, largest)
        lines, blocks = LineSplitter(), LineSplitter()
        expected = [line for chunk in chunks for line in lines.feed(chunk)]
        got = "".join(blocks.feed_block(chunk) for chunk in chunks)
        assert got == "".join(line + "\n" for line in expected)
        assert blocks.flush() == lines.flush() == ["last"]


KEY_VALUE_LINES = [
    "loss: 0.5",
    "loss=0.25",
    "  lr = 1e-3 ",
    "\tacc:\t0.9\t",
    "val/bpb: 0.9979",
    "a.b-c_d: -1.5E+3",
    "loss: NaN",
    "loss: -inf",
    "loss: +Infinity",
    "loss: 1.",
    "loss: .5",
    "x: -0",
    "Epoch 1: starting",
    "time: 12:30",
    "a b: 1",
    "a: 1 2",
    "a: ١٢",
    "a: 0x10",
    "a: 1e",
    "a:",
    ": 1",
    "1a: 2",
    "ü: 1",
    "\x0closs: 1",
    "loss: 1\x0c",
    "\u00a0loss: 1",
    "loss\u00a0: 1",
    "a=b=1",
    "a: 1_000",
    "a: " + "1" * 32_000 + "x",
    "b: " + "1" * 5_000,
    "plain output",
    "",
]


@pytest.mark.parametrize("seed", range(6))
def test_key_value_blocks_match_lines_on_a_mixed_stream(seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(3000):
        roll = rng.random()
        if roll < 0.5:
            lines.append(f"loss: {1 / (i + 1):.6f}")
        elif roll < 0.65:
            lines.append(f"acc={i / 3000:.4f}")
        elif roll < 0.75:
            lines.append(f"step {i} done")
        else:
            lines.append(rng.choice(KEY_VALUE_LINES))
    data = stream(lines, rng)
    assert_same("key_value", cut(data, rng, rng.choice([7, 300, 5000, 70_000])))


def test_key_value_a_metric_never_spans_two_lines() -> None:
    for ending in (b"\n", b"\r\n", b"\r"):
        data = ending.join([b"loss:", b"1", b"loss =", b"  2", b"acc", b"= 3", b"x: 1", b""]) * 30
        assert_same("key_value", [data[:40], data[40:]])
        assert list(by_blocks("key_value", [data[:40], data[40:]])[0].series) == ["x"]


def test_key_value_every_probe_line_in_blocks_of_its_own() -> None:
    for line in KEY_VALUE_LINES:
        assert_same("key_value", [(line + "\n").encode() * 5 for _ in range(5)])


@pytest.mark.parametrize("protocol", ["json_line", "key_value"])
def test_the_cap_on_metric_names_holds_in_blocks(protocol: str) -> None:
    def line(i: int) -> str:
        return f'METRICS: {{"m{i}": 1, "loss": 2}}' if protocol == "json_line" else f"m{i}: 1"

    lines = [line(i) for i in range(MAX_METRIC_NAMES + 60)] + [line(i) for i in range(30)] * 3
    data = "".join(f"{text}\n" for text in lines).encode()
    parser = assert_same(protocol, cut(data, random.Random(6), 20_000))
    assert parser.dropped_names and "distinct metric names" in " ".join(parser.problems)


def test_regex_protocol_reads_blocks_line_by_line() -> None:
    chunks = [b"loss=1.5 acc=0.25\nnothing\nacc=0.5\r\n", b"loss=x\n"]
    splitter, parser = LineSplitter(), make_parser("regex", patterns={"loss": r"loss=(\S+)", "acc": r"acc=(\S+)"})
    got = PointBatch()
    for chunk in chunks:
        got.extend(parser.feed_block(splitter.feed_block(chunk)))
    assert columns(got) == [("loss", [0], [None], ["1.5"]), ("acc", [0, 1], [None, None], ["0.25", "0.5"])]
    assert parser.problems == ["line 4: pattern for 'loss' captured 'x', not a number"]


def test_a_prefix_the_shapes_cannot_hold_is_read_line_by_line() -> None:
    for prefix in (" M", "M\nX", "@@m"):
        lines = [f'{prefix}{{"a": {i}}}' for i in range(50)] + [f' {prefix}{{"a": 1}}']
        data = "".join(f"{line}\n" for line in lines).encode()
        chunks = [data[:100], data[100:]] * 3
        expected_parser, got_parser = make_parser("json_line", json_prefix=prefix), make_parser(
            "json_line", json_prefix=prefix)
        expected, got = PointBatch(), PointBatch()
        s1, s2 = LineSplitter(), LineSplitter()
        for chunk in chunks:
            for text in s1.feed(chunk):
                expected.add_points(expected_parser.feed_line(text))
            got.extend(got_parser.feed_block(s2.feed_block(chunk)))
        assert columns(got) == columns(expected), prefix


def test_summary_of_a_batch_equals_the_summary_of_its_points() -> None:
    lines = [train_line(i) for i in range(50)] + ['METRICS: {"loss": NaN, "g": Infinity}', 'METRICS: {"loss": 1}']
    data = "".join(f"{line}\n" for line in lines).encode()
    batch, _, _ = by_blocks("json_line", [data[:700], data[700:]])
    by_point, by_batch = MetricSummary(), MetricSummary()
    by_point.add(list(batch))
    by_batch.add_batch(batch)
    assert by_batch.final == by_point.final and list(by_batch.final) == list(by_point.final)
    assert by_batch.counts == by_point.counts == {"loss": 52, "g": 1}
    assert by_batch.nonfinite == by_point.nonfinite == {"g"}
    assert by_batch.any_nonfinite == by_point.any_nonfinite == {"loss", "g"}


def test_the_ledger_stores_a_batch_as_it_stores_its_points(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ledger = build(tmp_path)
    first, second = [r.id for r in ledger.runs(EXPERIMENT) if "loss" not in ledger.point_names(r.id)][:2]
    lines = [train_line(i) for i in range(20)] + ['METRICS: {"loss": NaN, "other": -0.0}', "loss_only: 1"]
    data = "".join(f"{line}\n" for line in lines).encode()
    batch, _, _ = by_blocks("json_line", [data])
    ledger.add_points(first, batch)
    ledger.add_points(second, list(batch))
    for name in ("loss", "other"):
        a, b = ledger.series(first, name), ledger.series(second, name)
        assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True)), name
    assert [v for _, _, v in ledger.points(first, "loss")][-1] is None  # NaN kept, read back as None
    assert math.copysign(1, ledger.series(first, "other")[2][0]) == -1


def test_a_step_past_64_bits_is_no_step_and_the_ledger_stores_the_points(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ledger = build(tmp_path)
    run = [r.id for r in ledger.runs(EXPERIMENT) if "loss" not in ledger.point_names(r.id)][0]
    data = b'METRICS: {"step": 99999999999999999999, "loss": 0.5}\nMETRICS: {"step": 3, "loss": 0.25}\n'
    batch, parser, _ = by_blocks("json_line", [data])
    assert parser.problem_count == 1 and "does not fit a 64-bit integer" in parser.problems[0]
    assert batch.series["loss"][1] == [None, 3]
    ledger.add_points(run, batch)  # this raised OverflowError when the step was kept
    assert ledger.points(run, "loss") == [(0, None, 0.5), (1, 3, 0.25)]


def test_shapes_decode_what_json_decodes() -> None:
    # The shape's number tokens, read by float() and int(), give what json gives for every spelling
    # a shape accepts, including those at the edges of its patterns.
    spellings = ["0", "7", "-7", "1.5", "-0.0", "-0e3", "0e-3", "1E+2", "123456789012345678", "-123456789012345678",
                 "1" + "0" * 63, "0.1" + "9" * 40, "NaN", "Infinity", "-Infinity", "5e-324", "1.7976931348623157e308"]
    for spelling in spellings:
        line = f'METRICS: {{"step": 1, "x": {spelling}}}'
        chunks = [f"{line}\n".encode() * 3] * 3
        got, parser, _ = by_blocks("json_line", chunks)
        assert parser._shapes, spelling  # type: ignore[attr-defined]
        expected = float(json.loads(f"[{spelling}]")[0])
        assert {repr(v) for v in got.series["x"][2]} == {repr(expected)}, spelling
