"""One fixed-budget experiment: the program's own shell line, a hard kill, and the metric read back.

The run command is the program author's shell line (``cargo build ... && ./x > run.log
2>&1``), so it runs under ``bash -c`` in its own process group with the worktree as its
working directory. The soft budget is only exported (``RATIOCINATOR_BUDGET_S``): the
script decides how to honour it, as the seed's training scripts do. The hard timeout
kills the whole group (SIGTERM, then SIGKILL after a grace period), and anything the run
left behind in its group is killed when it ends, so no stray process holds a GPU into
the next attempt.

The metric is parsed from the captured output and from ``log_file`` when the command
redirects there (a stale one is deleted before the run). A run is a crash when it timed
out, exited non-zero or was killed, or reported no finite metric; the log tail is kept
as the evidence.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ratiocinator.autoresearch.program import Metric
from ratiocinator.backends.process import kill_group, process_start_time
from ratiocinator.execution.metrics import LineSplitter, MetricSummary, make_parser
from ratiocinator.execution.supervisor import Supervisor

KILL_GRACE_S = 5.0
POLL_S = 0.05
TAIL_LINES = 50
TAIL_CHARS = 8000


@dataclass(frozen=True)
class RunOutcome:
    """What one run produced.

    ``status`` is ok, crash, interrupted (the session stopped) or over_budget (never started).
    """

    status: str
    metric: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float = 0.0
    log_tail: str = ""
    reason: str = ""


def kill_orphan(pid: int, pid_start: int | None) -> bool:
    """Kill the group of a run an earlier orchestrator left behind, unless the PID now means another process."""
    alive_start = process_start_time(pid)
    if alive_start is None or (pid_start is not None and alive_start != pid_start):
        return False
    killed = kill_group(pid)
    _await_group_gone(pid)
    return killed


def _await_group_gone(pgid: int, limit_s: float = 2.0) -> None:
    """Wait until no live (non-zombie) process is left in the group; a killed orphan's zombie waits on its reaper."""
    deadline = time.monotonic() + limit_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


def run_experiment(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float,
    capture: Path,
    metric: Metric,
    log_file: Path | None,
    stop: threading.Event,
    on_start: Callable[[int, int | None], None] = lambda pid, start: None,
) -> RunOutcome:
    """Run ``command`` once and judge it (module docstring)."""
    if log_file is not None:
        log_file.unlink(missing_ok=True)
    capture.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(capture, "wb") as out:
        try:
            proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return RunOutcome("crash", None, reason=f"could not start bash: {exc.strerror}")
        pid_start = process_start_time(proc.pid)
        Supervisor.watch(proc.pid, pid_start, timeout_s)  # the hard timeout holds if this process is killed
        on_start(proc.pid, pid_start)
        ending = _wait(proc, timeout_s, stop)
        Supervisor.forget(proc.pid)
    duration = time.monotonic() - started
    kill_group(proc.pid)  # strays the run left in its group
    _await_group_gone(proc.pid)
    metrics = _parse([capture, *([log_file] if log_file is not None else [])], metric)
    tail = _tail([capture, *([log_file] if log_file is not None else [])])
    rc = proc.returncode
    code, sig = (None, -rc) if rc is not None and rc < 0 else (rc, None)
    if ending == "interrupted":
        return RunOutcome("interrupted", None, metrics, code, sig, duration, tail,
                          "the session stopped during this run")
    if ending == "timeout":
        return RunOutcome("crash", None, metrics, code, sig, duration, tail,
                          f"killed at the {timeout_s:g} s hard timeout")
    value = metrics.get(metric.name)
    if sig is not None:
        reason = f"killed by signal {sig}"
    elif code:
        reason = f"exit code {code}"
    elif value is None:
        reason = f"no {metric.name} in the output"
    elif not math.isfinite(value):
        reason = f"{metric.name} is {value}"
    else:
        return RunOutcome("ok", value, metrics, code, sig, duration, tail, "")
    return RunOutcome("crash", None, metrics, code, sig, duration, tail, reason)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float, stop: threading.Event) -> str:
    """"exited", "timeout" or "interrupted"; the group is killed in the last two cases."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            proc.wait(timeout=POLL_S)
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        ending = "interrupted" if stop.is_set() else "timeout" if time.monotonic() >= deadline else None
        if ending is not None:
            kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
            return ending


def _parse(paths: list[Path], metric: Metric) -> dict[str, float]:
    """Final value of every metric in the files, later files winning (the seed greps run.log)."""
    summary = MetricSummary()
    for path in paths:
        if not path.is_file():
            continue
        parser = make_parser(metric.protocol, json_prefix=metric.json_prefix, patterns=metric.patterns or None)
        splitter = LineSplitter()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                for line in splitter.feed(chunk):
                    summary.add(parser.feed_line(line))
        for line in splitter.flush():
            summary.add(parser.feed_line(line))
    return dict(summary.final)


def _tail(paths: list[Path]) -> str:
    """The last lines of each non-empty output, labelled when there are two."""
    parts: list[tuple[str, str]] = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(fh.tell() - 64 * 1024, 0))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        lines = text.splitlines()[-TAIL_LINES:]
        if lines:
            parts.append((path.name, "\n".join(lines)[-TAIL_CHARS:]))
    if len(parts) == 1:
        return parts[0][1]
    return "\n".join(f"== {name} ==\n{text}" for name, text in parts)
