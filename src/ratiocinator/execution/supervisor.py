"""The deadline keeper: a small process, one per orchestrator, that kills each run's process group
at its deadline even when nobody is watching any more (the orchestrator killed with ``kill -9``).

The orchestrator starts it once (`Supervisor.start`) and tells it about each run as it launches
(``add <pid> <start ticks> <deadline>``) and when it ends (``done <pid>``). At a deadline it checks
the run's leader is the same process (its start time, so a reused PID is never touched), sends
SIGTERM to the group, then SIGKILL after a grace. When the orchestrator goes away (its pipe closes)
the keeper goes on until every deadline it knows has passed, then exits. Its deadlines sit a little
after the orchestrator's own timeout, which normally acts first and classifies the run.

Run as ``python -m ratiocinator.execution.supervisor``; it imports nothing of the orchestrator.
"""

from __future__ import annotations

import heapq
import os
import select
import signal
import subprocess
import sys
import threading
import time

GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later
SLACK_S = 2.0  # after the run's own timeout: the orchestrator, when alive, acts first
# Having read, the keeper lets the next lines gather this long. A write to a pipe nobody waits on wakes
# nobody, so a busy orchestrator's two lines a run cost it a plain write, not a switch to the keeper
# (woken, the keeper would take the orchestrator's CPU at once). A deadline is kept this much later at most.
GATHER_S = 0.05


def _start_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rfind(b")") + 2:].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _kill(pid: int, start: int | None, sig: int) -> None:
    if start is not None and _start_ticks(pid) not in (None, start):
        return  # the PID now names another process: its group is not ours
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def serve(stream: int) -> None:
    """Read commands from the ``stream`` fd; enforce deadlines until told nothing more and none is left."""
    runs: dict[int, tuple[int | None, float]] = {}  # pid -> (start ticks, deadline)
    queue: list[tuple[float, int, int]] = []  # (when, pid, signal)
    buffer, open_pipe = b"", True
    while open_pipe or queue:
        now = time.time()
        while queue and queue[0][0] <= now:
            when, pid, sig = heapq.heappop(queue)
            if pid in runs and runs[pid][1] <= when:
                _kill(pid, runs[pid][0], sig)
                if sig == signal.SIGKILL:
                    runs.pop(pid, None)
        wait = max(0.0, queue[0][0] - now) if queue else None
        if not open_pipe:
            time.sleep(min(wait or 0.0, 1.0))
            continue
        ready, _, _ = select.select([stream], [], [], wait)
        if not ready:
            continue
        chunk = os.read(stream, 1 << 16)
        if not chunk:
            open_pipe = False  # the orchestrator is gone: keep the deadlines already known
            continue
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            parts = line.decode("ascii", "replace").split()
            if len(parts) == 4 and parts[0] == "add":
                pid, start, deadline = int(parts[1]), (int(parts[2]) if parts[2] != "-" else None), float(parts[3])
                runs[pid] = (start, deadline)
                heapq.heappush(queue, (deadline, pid, signal.SIGTERM))
                heapq.heappush(queue, (deadline + GRACE_S, pid, signal.SIGKILL))
            elif len(parts) == 2 and parts[0] == "done":
                runs.pop(int(parts[1]), None)
        queue = [entry for entry in queue if entry[1] in runs]
        heapq.heapify(queue)
        time.sleep(GATHER_S)


class Supervisor:
    """The orchestrator's handle on its deadline keeper (started on first use, one per process)."""

    _lock = threading.Lock()
    _proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def _pipe(cls) -> subprocess.Popen[bytes] | None:
        with cls._lock:
            if cls._proc is None or cls._proc.poll() is not None:
                try:
                    cls._proc = subprocess.Popen(
                        [sys.executable, "-m", "ratiocinator.execution.supervisor"], stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                        env={"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
                except OSError:
                    cls._proc = None
            return cls._proc

    @classmethod
    def _send(cls, line: str) -> None:
        proc = cls._pipe()
        if proc is None or proc.stdin is None:
            return  # no keeper: the orchestrator's own timeout still holds while it lives
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            with cls._lock:
                cls._proc = None

    @classmethod
    def watch(cls, pid: int, start: int | None, timeout_s: float) -> None:
        cls._send(f"add {pid} {start if start is not None else '-'} {time.time() + timeout_s + SLACK_S:.3f}")

    @classmethod
    def forget(cls, pid: int) -> None:
        cls._send(f"done {pid}")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the orchestrator is not for the keeper
    serve(sys.stdin.fileno())
