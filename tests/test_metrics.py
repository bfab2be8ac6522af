"""Streaming metric parsing: line splitting, the three protocols, and summaries."""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import tracemalloc

import pytest

from ratiocinator.execution import metrics
from ratiocinator.execution.metrics import LineSplitter, MetricPoint, MetricSummary, make_parser


def split_all(chunks: list[bytes], **kwargs: int) -> tuple[list[str], LineSplitter]:
    splitter = LineSplitter(**kwargs)
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + splitter.flush(), splitter


def values(points: list[MetricPoint]) -> dict[str, float]:
    return {p.name: p.value for p in points}


# --- LineSplitter ---------------------------------------------------------------

STREAM = "héllo\r\nwörld\rprogress 50%\rprogress 100%\n\n日本語 → ok\r\nlast".encode()
STREAM_LINES = ["héllo", "wörld", "progress 50%", "progress 100%", "", "日本語 → ok", "last"]


def test_splitter_handles_all_line_endings_in_one_chunk():
    assert split_all([STREAM])[0] == STREAM_LINES


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64])
def test_splitter_is_independent_of_chunk_size(size):
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert split_all(chunks)[0] == STREAM_LINES


def test_splitter_is_independent_of_where_a_chunk_is_cut():
    # Every cut, including inside a multi-byte character and between '\r' and '\n'.
    for cut in range(len(STREAM) + 1):
        assert split_all([STREAM[:cut], STREAM[cut:]])[0] == STREAM_LINES, cut


def test_crlf_cut_between_chunks_is_one_line_ending():
    splitter = LineSplitter()
    assert splitter.feed(b"a\r") == ["a"]
    assert splitter.feed(b"") == []  # an empty read must not forget the pending '\r'
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\n") == [""]  # a second '\n' is a real empty line
    assert splitter.feed(b"b\r") == ["b"]
    assert splitter.feed(b"c\n") == ["c"]  # no '\n' after the '\r': nothing swallowed


def test_progress_bar_carriage_returns_split_lines():
    lines, _ = split_all([b"  0%|     |\r 50%|##   |\r100%|#####|\nloss: 1.0\n"])
    assert lines == ["  0%|     |", " 50%|##   |", "100%|#####|", "loss: 1.0"]


def test_multibyte_character_cut_across_chunks_decodes_whole():
    encoded = "val/loss → 0.5 ✓\n".encode()
    cut = encoded.index("→".encode()) + 1
    assert split_all([encoded[:cut], encoded[cut:]])[0] == ["val/loss → 0.5 ✓"]


def test_invalid_utf8_is_replaced_not_raised():
    assert split_all([b"ok \xff\xfe end\n"])[0] == ["ok \ufffd\ufffd end"]


def test_flush_returns_final_partial_line_once():
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntwo") == ["one"]
    assert splitter.flush() == ["two"]
    assert splitter.flush() == []


def test_flush_after_complete_lines_returns_nothing():
    for stream in (b"one\n", b"one\r", b"one\r\n", b""):
        splitter = LineSplitter()
        splitter.feed(stream)
        assert splitter.flush() == [], stream


def test_line_of_exactly_max_bytes_is_kept_whole():
    lines, splitter = split_all([b"01234", b"56789\n"], max_line_bytes=10)
    assert lines == ["0123456789"]
    assert splitter.truncated_lines == 0


@pytest.mark.parametrize(
    "chunks",
    [
        [b"0123456789ABCDEF\nok\n"],  # overlong line inside one chunk
        [b"01234", b"56789AB", b"CDEF\nok\n"],  # overflow while held across chunks
        [b"0123456789", b"A", b"BCDEF", b"\nok\n"],  # held buffer full, then more bytes
    ],
)
def test_overlong_line_is_truncated_and_counted_once(chunks):
    lines, splitter = split_all(chunks, max_line_bytes=10)
    assert lines == ["0123456789", "ok"]
    assert splitter.truncated_lines == 1


def test_overlong_final_line_is_truncated_at_flush():
    lines, splitter = split_all([b"0123456789ABC"], max_line_bytes=10)
    assert lines == ["0123456789"]
    assert splitter.truncated_lines == 1


def test_several_overlong_lines_in_one_chunk_are_each_counted():
    stream = b"x" * 25 + b"\n" + b"y" * 3 + b"\n" + b"z" * 11 + b"\n"
    lines, splitter = split_all([stream], max_line_bytes=10)
    assert lines == ["x" * 10, "yyy", "z" * 10]
    assert splitter.truncated_lines == 2


def test_ten_megabyte_line_without_newline_stays_bounded():
    chunk_size = 64 * 1024
    max_line = 1 << 20
    chunk = b"x" * chunk_size
    splitter = LineSplitter(max_line_bytes=max_line)
    parser = make_parser("json_line")
    tracemalloc.start()
    try:
        for _ in range(10 * 1024 * 1024 // chunk_size):
            assert splitter.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Unbounded buffering would hold all 10 MiB; the splitter keeps one capped line
    # (plus the bytearray's growth slack and a chunk slice in flight).
    assert peak < max_line + 4 * chunk_size
    lines = splitter.feed(b'\nMETRICS: {"step": 7, "loss": 0.25}\n')
    assert splitter.truncated_lines == 1
    assert lines[0] == "x" * max_line
    assert parser.feed_line(lines[0]) == []
    assert values(parser.feed_line(lines[1])) == {"loss": 0.25}


def test_binary_garbage_never_raises():
    rng = random.Random(1234)
    garbage = bytes(rng.randrange(256) for _ in range(200_000)) + b"\x00" * 1000
    splitter = LineSplitter(max_line_bytes=4096)
    parsers = [
        make_parser("json_line", json_prefix="\x00"),
        make_parser("json_line"),
        make_parser("key_value"),
        make_parser("regex", patterns={"x": r"([\x00-\xff]+)"}),
    ]
    position = 0
    while position < len(garbage):
        size = rng.randrange(1, 9000)
        lines = splitter.feed(garbage[position : position + size])
        position += size
        for line in lines:
            assert isinstance(line, str)
            assert len(line.encode("utf-8", "surrogatepass")) <= 4096 * 3
            for parser in parsers:
                parser.feed_line(line)
    splitter.flush()
    # The garbage did reach the parsers: NUL-prefixed lines were tried as JSON.
    assert parsers[0].problem_count > 0
    assert len(parsers[0].problems) <= 20


def test_max_line_bytes_must_be_positive():
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineSplitter(max_line_bytes=0)


# --- json_line --------------------------------------------------------------------


def test_json_line_numeric_fields_become_points_with_step():
    parser = make_parser("json_line")
    points = parser.feed_line('METRICS: {"step": 3, "loss": 1.5, "tokens": 4096}')
    assert points == [  # the step is the points' step, not a metric of its own
        MetricPoint("loss", 1.5, 3, 0),
        MetricPoint("tokens", 4096.0, 3, 0),
    ]
    assert all(type(p.value) is float for p in points)
    assert parser.problems == [] and parser.problem_count == 0


def test_metric_points_are_frozen():
    point = make_parser("json_line").feed_line('METRICS: {"loss": 1}')[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        point.value = 2.0  # type: ignore[misc]
    assert hash(point) == hash(MetricPoint("loss", 1.0, None, 0))


def test_json_line_seq_counts_metric_lines_only():
    parser = make_parser("json_line")
    first = parser.feed_line('METRICS: {"a": 1, "b": 2}')
    assert parser.feed_line("plain log output") == []
    assert parser.feed_line('METRICS: {"note": "no numbers"}') == []
    second = parser.feed_line('METRICS: {"a": 3}')
    assert [p.seq for p in first] == [0, 0]
    assert [p.seq for p in second] == [1]


def test_json_line_nested_objects_are_flattened_with_slash():
    points = make_parser("json_line").feed_line(
        'METRICS: {"val": {"loss": 1, "acc": {"top1": 0.5}}, "train": {}}'
    )
    assert values(points) == {"val/loss": 1.0, "val/acc/top1": 0.5}


def test_json_line_nonfinite_literals_and_strings():
    points = make_parser("json_line").feed_line(
        'METRICS: {"a": NaN, "b": Infinity, "c": -Infinity, '
        '"d": "nan", "e": "INF", "f": "-Inf", "g": "infinity", "h": "1.5"}'
    )
    got = values(points)
    assert set(got) == {"a", "b", "c", "d", "e", "f"}
    assert math.isnan(got["a"]) and math.isnan(got["d"])
    assert got["b"] == got["e"] == math.inf
    assert got["c"] == got["f"] == -math.inf


def test_json_line_ignores_bools_nulls_lists_and_other_strings():
    points = make_parser("json_line").feed_line(
        'METRICS: {"ok": true, "none": null, "xs": [1, 2], "name": "run", "loss": 2}'
    )
    assert values(points) == {"loss": 2.0}


def test_json_line_integer_too_large_for_float_is_infinite():
    points = make_parser("json_line").feed_line(f'METRICS: {{"big": {10**400}, "neg": -{10**400}}}')
    assert values(points) == {"big": math.inf, "neg": -math.inf}


@pytest.mark.parametrize(
    ("payload", "step"),
    [
        ('{"step": 5, "epoch": 2, "loss": 1}', 5),
        ('{"epoch": 2, "iter": 9, "loss": 1}', 2),
        ('{"iter": 9, "iteration": 10, "loss": 1}', 9),
        ('{"iteration": 10, "loss": 1}', 10),
        ('{"step": 1.5, "epoch": 3, "loss": 1}', 3),  # a float step is not a step
        ('{"step": true, "loss": 1}', None),
        ('{"loss": 1}', None),
        ('{"val": {"step": 4}, "loss": 1}', None),  # only top-level keys are steps
    ],
)
def test_json_line_step_key_preference(payload, step):
    points = make_parser("json_line").feed_line("METRICS: " + payload)
    assert points and {p.step for p in points} == {step}


@pytest.mark.parametrize(
    ("payload", "names"),
    [
        ('{"step": 5, "epoch": 2, "loss": 1}', {"epoch", "loss"}),  # epoch is a series over the steps
        ('{"epoch": 2, "iter": 9, "loss": 1}', {"epoch", "iter", "loss"}),  # epoch is the step, and a metric too
        ('{"step": 1.5, "loss": 1}', {"loss"}),  # "step" is never a metric name
        ('{"val": {"step": 4}, "loss": 1}', {"val/step", "loss"}),
    ],
)
def test_json_line_step_index_is_never_a_metric(payload, names):
    assert {p.name for p in make_parser("json_line").feed_line("METRICS: " + payload)} == names


def test_json_line_prefix_must_start_the_stripped_line():
    parser = make_parser("json_line")
    assert values(parser.feed_line('   \tMETRICS:{"a": 1}  ')) == {"a": 1.0}
    assert parser.feed_line('[rank0] METRICS: {"a": 1}') == []
    assert parser.feed_line('metrics: {"a": 1}') == []
    assert parser.problem_count == 0


def test_json_line_custom_prefix():
    parser = make_parser("json_line", json_prefix="@@m")
    assert values(parser.feed_line('@@m {"a": 1}')) == {"a": 1.0}
    assert parser.feed_line('METRICS: {"a": 1}') == []


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('METRICS: {"loss": ', "payload is not valid JSON: Expecting value"),
        ("METRICS:", "payload is not valid JSON: Expecting value"),
        ("METRICS: {'loss': 1}", "payload is not valid JSON: Expecting property name"),
        ('METRICS: {"a": 1} {"b": 2}', """not valid JSON: extra data after it: '{"b": 2}'"""),
        ("METRICS: [1, 2]", "payload is not a JSON object: '[1, 2]'"),
        ('METRICS: "loss"', "payload is not a JSON object"),
        ("METRICS: " + "[" * 100_000, "METRICS: payload is"),
        ("METRICS: " + '{"a":' * 100_000 + "1" + "}" * 100_000, "METRICS: payload is"),
    ],
)
def test_json_line_malformed_payload_is_a_problem_not_an_exception(line, fragment):
    parser = make_parser("json_line")
    parser.feed_line("starting run")
    assert parser.feed_line(line) == []
    assert parser.problem_count == 1
    assert parser.problems[0].startswith("line 2: METRICS: ")
    assert fragment in parser.problems[0]


def test_json_line_object_too_deep_to_flatten_is_a_problem(monkeypatch):
    # Python 3.12+ decodes JSON deeper than the Python recursion limit; stand in for
    # that decoder so the flattening limit is what gets hit.
    deep: dict = {"loss": 1}
    for _ in range(sys.getrecursionlimit() + 100):
        deep = {"a": deep}
    monkeypatch.setattr(metrics, "_decode_json", lambda payload: (deep, len(payload)))
    parser = make_parser("json_line")
    assert parser.feed_line("METRICS: {}") == []
    assert parser.problems == ["line 1: METRICS: payload is nested too deeply"]


def test_problem_notes_are_capped_but_counted():
    parser = make_parser("json_line")
    for _ in range(25):
        parser.feed_line("METRICS: {oops")
    assert parser.problem_count == 25
    assert len(parser.problems) == 20
    assert parser.problems[-1].startswith("line 20: ")
    assert values(parser.feed_line('METRICS: {"a": 1}')) == {"a": 1.0}


# --- key_value --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        ("val_bpb: 0.997900", "val_bpb", 0.9979),
        ("peak_vram_mb: 45060.2", "peak_vram_mb", 45060.2),
        ("loss = 1.5", "loss", 1.5),
        ("  lr=3e-4  ", "lr", 3e-4),
        ("delta: -1.5E+3", "delta", -1500.0),
        ("gain: +2", "gain", 2.0),
        ("val/acc.top-1: .5", "val/acc.top-1", 0.5),
        ("_n:7.", "_n", 7.0),
        ("loss: INF", "loss", math.inf),
        ("loss: -inf", "loss", -math.inf),
    ],
)
def test_key_value_metric_lines(line, name, value):
    assert make_parser("key_value").feed_line(line) == [MetricPoint(name, value, None, 0)]


def test_key_value_nan():
    (point,) = make_parser("key_value").feed_line("loss: NaN")
    assert point.name == "loss" and math.isnan(point.value)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "step 5: loss: 1.2",
        "loss: 1.2 (best)",
        "final loss: 1.2",
        "loss:",
        ": 1.0",
        "1loss: 2",
        "loss: 1.2.3",
        "loss: abc",
        "loss: 1,000",
        "loss: nanx",
        "loss -> 1.0",
        "Epoch 1/10",
        "loss: ١٢",  # non-ASCII digits are not a float literal here
    ],
)
def test_key_value_non_metric_lines(line):
    parser = make_parser("key_value")
    assert parser.feed_line(line) == []
    assert parser.problem_count == 0


def test_key_value_seq_counts_metric_lines():
    parser = make_parser("key_value")
    got = [parser.feed_line(line) for line in ["a: 1", "noise", "b = 2"]]
    assert got == [[MetricPoint("a", 1.0, None, 0)], [], [MetricPoint("b", 2.0, None, 1)]]


# --- regex ------------------------------------------------------------------------


def test_regex_pattern_captures_value():
    parser = make_parser("regex", patterns={"best_val_loss": r"Best validation loss: ([\d.]+)"})
    assert parser.feed_line("Epoch 3 done") == []
    assert parser.feed_line("Best validation loss: 0.8123 (epoch 3)") == [
        MetricPoint("best_val_loss", 0.8123, None, 0)
    ]


def test_regex_several_patterns_on_one_line_share_seq():
    parser = make_parser("regex", patterns={"loss": r"loss=(\S+)", "acc": r"acc=(\S+)"})
    assert parser.feed_line("loss=1.5 acc=0.25") == [
        MetricPoint("loss", 1.5, None, 0),
        MetricPoint("acc", 0.25, None, 0),
    ]
    assert parser.feed_line("acc=0.5") == [MetricPoint("acc", 0.5, None, 1)]


def test_regex_capture_that_is_not_a_number_is_a_problem():
    parser = make_parser("regex", patterns={"loss": r"loss: ([\d.]+)", "tag": r"tag(\d)?"})
    assert parser.feed_line("loss: ...") == []  # the optional 'tag' group is unset: no note
    assert parser.problem_count == 1
    assert parser.problems == ["line 1: pattern for 'loss' captured '...', not a number"]


def test_regex_nonfinite_capture():
    (point,) = make_parser("regex", patterns={"loss": r"loss (\S+)"}).feed_line("loss nan")
    assert math.isnan(point.value)


@pytest.mark.parametrize(
    ("patterns", "message"),
    [
        ({"loss": r"loss: ([\d.]+"}, "regex for metric 'loss' does not compile"),
        ({"loss": r"loss: [\d.]+"}, "'loss' must have exactly one capture group"),
        ({"loss": r"(loss): ([\d.]+)"}, "'loss' must have exactly one capture group"),
        ({}, "at least one pattern"),
        (None, "at least one pattern"),
    ],
)
def test_regex_patterns_are_validated_up_front(patterns, message):
    with pytest.raises(ValueError, match=message):
        make_parser("regex", patterns=patterns)


def test_unknown_protocol_names_the_valid_ones():
    with pytest.raises(ValueError, match="json_line, key_value, regex"):
        make_parser("csv")


def test_empty_json_prefix_is_rejected():
    with pytest.raises(ValueError, match="json_prefix"):
        make_parser("json_line", json_prefix="")


# --- MetricSummary ----------------------------------------------------------------


def test_summary_keeps_last_value_and_counts():
    summary = MetricSummary()
    summary.add([MetricPoint("loss", 2.0, 1, 0), MetricPoint("acc", 0.1, 1, 0)])
    summary.add([MetricPoint("loss", 1.0, 2, 1)])
    summary.add([])
    assert summary.final == {"loss": 1.0, "acc": 0.1}
    assert summary.counts == {"loss": 2, "acc": 1}
    assert summary.nonfinite == set() and summary.any_nonfinite == set()


def test_summary_tracks_final_and_transient_nonfinite():
    summary = MetricSummary()
    summary.add([MetricPoint("loss", math.nan, 1, 0), MetricPoint("grad", math.inf, 1, 0)])
    summary.add([MetricPoint("loss", 0.5, 2, 1), MetricPoint("lr", 1e-3, 2, 1)])
    assert summary.final["loss"] == 0.5
    assert summary.final["grad"] == math.inf
    assert summary.nonfinite == {"grad"}
    assert summary.any_nonfinite == {"loss", "grad"}
    summary.add([MetricPoint("lr", -math.inf, 3, 2)])
    assert summary.nonfinite == {"grad", "lr"}
    assert summary.any_nonfinite == {"loss", "grad", "lr"}


def test_end_to_end_stream_to_summary():
    stream = (
        b'METRICS: {"step": 1, "loss": 3.0}\r\n'
        b"epoch 1 \xe2\x96\x88\xe2\x96\x88 50%\r"
        b'METRICS: {"step": 2, "loss": NaN}\n'
        b'METRICS: {"step": 3, "loss": 1.0, "val": {"loss": 1.2}}'
    )
    splitter, parser, summary = LineSplitter(), make_parser("json_line"), MetricSummary()
    for i in range(0, len(stream), 5):
        for line in splitter.feed(stream[i : i + 5]):
            summary.add(parser.feed_line(line))
    for line in splitter.flush():
        summary.add(parser.feed_line(line))
    assert summary.final == {"loss": 1.0, "val/loss": 1.2}
    assert summary.counts == {"loss": 3, "val/loss": 1}
    assert summary.nonfinite == set()
    assert summary.any_nonfinite == {"loss"}


if __name__ == "__main__":
    # Timing sanity check, run by hand: `python tests/test_metrics.py`.
    import time

    n = 1_000_000
    data = b"".join(
        b'METRICS: {"step": %d, "loss": %.6f, "lr": 0.0003, "val": {"bpb": 0.9979}}\n'
        % (i, 1 / (i + 1))
        for i in range(n)
    )
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    splitter, parser, summary = LineSplitter(), make_parser("json_line"), MetricSummary()
    start = time.perf_counter()
    cpu_start = time.process_time()
    for chunk in chunks:
        for line in splitter.feed(chunk):
            summary.add(parser.feed_line(line))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    points = sum(summary.counts.values())
    print(f"{n:,} json lines ({points:,} points, {len(data) / 1e6:.0f} MB): "
          f"{wall:.2f} s wall, {cpu:.2f} s CPU, {wall / n * 1e6:.2f} us/line")
