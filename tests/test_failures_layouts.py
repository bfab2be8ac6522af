"""A runner that dies of a Python exception is a runtime error, whatever layout its traceback has:
an exception group, a launcher's per-line prefix (torchrun's "[rank0]: "), a rich traceback box."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ratiocinator.execution.failures import Failure, RunEvidence, diagnose, last_exception

RUNNER = '''
import sys
def check(width):
    if width % 2:
        {raise_}
{setup}
try:
    check(3)
except Exception:
    {report}
    sys.exit(3)
'''

LAYOUTS = {
    "exception group": ('raise ExceptionGroup("bad config", [ValueError(f"width {width} is odd")])', "",
                        "raise"),
    "rich box": ('raise ValueError(f"width {width} is odd")',
                 "from rich.console import Console\nconsole = Console(stderr=True, width=100)",
                 "console.print_exception()"),
    "plain, exit 3": ('raise ValueError(f"width {width} is odd")', "",
                      "import traceback; traceback.print_exc(); print('cleaning up', file=sys.stderr)"),
}


@pytest.mark.subprocess
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_traceback_in_any_layout_is_a_runtime_error_with_its_exception_as_evidence(layout: str) -> None:
    raise_, setup, report = LAYOUTS[layout]
    done = subprocess.run([sys.executable, "-c", RUNNER.format(raise_=raise_, setup=setup, report=report)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode in (1, 3) and "Traceback" in done.stderr, done.stderr
    diagnosis = diagnose(RunEvidence(exit_code=done.returncode, signal=None, timed_out=False, timeout_s=60,
                                     goal="acc", final={}, stderr=done.stderr))
    assert diagnosis.failure == Failure.RUNTIME_ERROR, (diagnosis, done.stderr)
    assert "ValueError: width 3 is odd" in diagnosis.evidence and diagnosis.detail["exception"] == "ValueError"
    assert "ValueError: width 3 is odd" in diagnosis.reason


@pytest.mark.subprocess
def test_a_launchers_prefix_on_every_line_keeps_the_frames() -> None:
    done = subprocess.run([sys.executable, "-c", RUNNER.format(raise_='raise ValueError(f"width {width} is odd")',
                                                               setup="", report="raise")],
                          capture_output=True, text=True, timeout=60)
    prefixed = "".join(f"[rank0]: {line}" for line in done.stderr.splitlines(keepends=True))  # as torchrun shows it
    exc = last_exception("starting 2 workers\n" + prefixed)
    assert exc is not None and exc.text == "ValueError: width 3 is odd" and exc.frames[-1].function == "check"
    diagnosis = diagnose(RunEvidence(exit_code=1, signal=None, timed_out=False, timeout_s=60, goal="acc", final={},
                                     stderr=prefixed))
    assert diagnosis.failure == Failure.RUNTIME_ERROR and diagnosis.detail["frame"].endswith("in check")


def test_without_a_traceback_an_error_like_line_is_no_exception() -> None:
    assert last_exception("ValueError: not from a traceback\n") is None
    assert last_exception("Traceback (most recent call last)\n  | return\n  | main\n") is None  # source lines
