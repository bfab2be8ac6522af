"""Killing what a dead orchestrator left on this machine: an agent's process group, or a local run's.

The ledger (or the agent's pid file) keeps a process's PID and its start time; a PID that now
names another process (its start time differs) is left alone. A killed group is waited for
until no live member is left, so the next attempt never shares the machine with it.
"""

from __future__ import annotations

import os
import time

from ratiocinator.backends.process import kill_group, process_start_time


def kill_orphan(pid: int, pid_start: int | None) -> bool:
    """Kill the group of a process an earlier orchestrator left behind, unless the PID now means another process."""
    alive_start = process_start_time(pid)
    if alive_start is None or (pid_start is not None and alive_start != pid_start):
        return False
    killed = kill_group(pid)
    await_group_gone(pid)
    return killed


def await_group_gone(pgid: int, limit_s: float = 2.0) -> None:
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
