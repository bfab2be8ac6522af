"""Whatever a runner prints, the orchestrator keeps its timeouts: parsing is linear per line (no
regex backtracking on a runner's digits), user patterns run on RE2, parsing happens off the event
loop, and a run that invents metric names without end is capped and fails with the reason.
"""

from __future__ import annotations

import math

import pytest

from conftest import Study
from ratiocinator.backends.local import LocalBackend
from ratiocinator.errors import SpecError
from ratiocinator.execution.metrics import MAX_METRIC_NAMES, compile_pattern, make_parser
from ratiocinator.pipeline import Research
from ratiocinator.spec.models import load_spec

# 32,000 digits and a letter: the old key_value regex took over a minute per line on this.
STALL = "a: " + "1" * 32_000 + "x"


def test_key_value_reads_numbers_and_refuses_lookalikes_whole() -> None:
    parser = make_parser("key_value")
    assert [(p.name, p.value) for p in parser.feed_line("val_bpb: 0.9979")] == [("val_bpb", 0.9979)]
    assert [(p.name, p.value) for p in parser.feed_line("  lr = 1e-3 ")] == [("lr", 0.001)]
    assert [(p.name, p.value) for p in parser.feed_line("loss: 1.")] == [("loss", 1.0)]
    assert math.isnan(parser.feed_line("loss: NaN")[0].value)
    for line in (STALL, "a: 1.2.3", "a b: 1", "a: 1 2", "time: 12:30", "a: ١٢", "a: 0x10", "a: 1e", "a:"):
        assert parser.feed_line(line) == [], line
    assert parser.feed_line("b: " + "1" * 100_000)[0].value == float("1" * 100_000)


def test_user_patterns_run_on_re2_and_unsupported_ones_are_refused_with_the_reason() -> None:
    parser = make_parser("regex", patterns={"loss": r"loss=((?:\d+)+)$"})  # exponential on a backtracking engine
    assert parser.feed_line("loss=" + "1" * 50_000 + "x") == []
    assert parser.feed_line("loss=42")[0].value == 42.0
    with pytest.raises(ValueError, match=r"cannot run in linear time.*backreferences or lookarounds"):
        compile_pattern("loss", r"(\d+) \1")
    with pytest.raises(ValueError, match=r"cannot run in linear time"):
        compile_pattern("loss", r"(?<=loss=)(\d+)")


def test_a_backreference_in_the_spec_is_refused_when_the_spec_is_read(study: Study) -> None:
    spec = study.spec(metrics={"protocol": "regex", "patterns": {"score": r"(\d+) \1"}})
    with pytest.raises(SpecError, match=r"metrics.patterns.score: regex for metric 'score' cannot run in linear time"):
        load_spec(spec)


def test_metric_names_past_the_cap_are_dropped_and_counted() -> None:
    parser = make_parser("json_line")
    kept = sum(len(parser.feed_line(f'METRICS: {{"m{i}": 1}}')) for i in range(MAX_METRIC_NAMES + 50))
    assert kept == MAX_METRIC_NAMES and parser.dropped_names == 50
    assert parser.feed_line('METRICS: {"m0": 2}')[0].value == 2  # names already seen still count
    assert any("distinct metric names" in p for p in parser.problems)


STALLING_RUNNER = f"""#!/usr/bin/env bash
for i in $(seq 1 400); do echo '{STALL}'; done
echo 'score: 1'
sleep 60
"""


@pytest.mark.latex
def test_a_run_printing_pathological_lines_is_still_killed_at_its_timeout(study: Study) -> None:
    study.commit({"run.sh": STALLING_RUNNER})
    spec = load_spec(study.spec(metrics={"protocol": "key_value"}, train_timeout_s=3,
                                failure_policy={"max_attempts": 1}))
    outcome = Research(spec, study.home, backend=LocalBackend(study.home), check=False).run()
    ledger = study.ledger()
    (run,) = ledger.runs(outcome.experiment_id)
    assert run.failure == "timeout", run.reason
    # The timeout held: the old parser spent minutes in these lines while the loop that kills runs waited.
    assert run.duration_s is not None and run.duration_s < 3 + 5


NAMING_RUNNER = f"""#!/usr/bin/env bash
python3 -c 'import json; [print("METRICS: " + json.dumps({{f"m{{i}}": 1.0}})) for i in range({MAX_METRIC_NAMES + 500})]'
echo 'METRICS: {{"score": 1.0}}'
"""


@pytest.mark.latex
def test_a_run_that_invents_metric_names_without_end_fails_with_the_reason(study: Study) -> None:
    study.commit({"run.sh": NAMING_RUNNER})
    spec = load_spec(study.spec(failure_policy={"max_attempts": 1}))
    outcome = Research(spec, study.home, backend=LocalBackend(study.home), check=False).run()
    (run,) = study.ledger().runs(outcome.experiment_id)
    assert run.status == "failed" and run.failure == "runtime_error"
    assert f"more than {MAX_METRIC_NAMES:,} distinct metric names" in run.reason
