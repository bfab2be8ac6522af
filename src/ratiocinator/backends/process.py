"""Process helpers every backend that starts processes shares: telling a reused PID apart,
signalling a run's whole process group, and classifying a launch that failed."""

from __future__ import annotations

import errno
import os
import signal

from ratiocinator.backends.base import LaunchFailure


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
