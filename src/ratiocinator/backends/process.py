"""Process helpers every backend that starts processes shares: telling a reused PID apart,
signalling a run's whole process group, and classifying a launch that failed."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from ratiocinator.backends.base import LaunchFailure

_T = TypeVar("_T")
_NS_PER_TICK = 1_000_000_000 // (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)  # /proc's clock ticks


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat): tells PID reuse apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def spawn_timed(spawn: Callable[[], _T], pid_of: Callable[[_T], int]) -> tuple[_T, int | None]:
    """``spawn()`` (it starts a child process) and that child's start time, as `process_start_time` gives it.

    The kernel stamps a child's start when it is forked, on the boot clock, and /proc reports it in whole
    clock ticks. When the boot clock reads the same tick before and after the spawn, that tick is the
    child's: no reading of /proc is needed. That reading would wait for the child's own start-up (reading
    /proc/PID/stat of a Python that is loading takes 2-3 ms). Only a spawn across a tick's edge reads it."""
    if sys.platform != "linux":
        made = spawn()
        return made, process_start_time(pid_of(made))
    before = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // _NS_PER_TICK
    made = spawn()
    after = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // _NS_PER_TICK
    return made, before if before == after else process_start_time(pid_of(made))


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def launch_failure(argv: tuple[str, ...], exc: OSError) -> LaunchFailure:
    """A missing or unusable runner/interpreter fails every attempt alike; anything else may pass."""
    what = f"cannot start {argv[0]}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOENT, errno.ENOEXEC, errno.EACCES, errno.ENOTDIR):
        hint = {errno.ENOENT: "the runner or the interpreter named in its #! line does not exist",
                errno.EACCES: "the runner is not executable (chmod +x) or its interpreter is not",
                errno.ENOEXEC: "the runner has no valid #! line or is not a program"}.get(exc.errno, "")
        return LaunchFailure(f"{what} ({hint})" if hint else what, transient=False, failure="missing_dependency")
    return LaunchFailure(what, transient=True)
