"""Whether an experiment's orchestrator is still alive, found without disturbing it.

An orchestrator holds an ``flock`` on ``<home>/locks/<id>.lock`` while it runs and writes its
pid there. A reader must not take that lock, even shared and for an instant: an orchestrator
starting at that moment would be refused as "already being run". So readers look instead: on
Linux ``/proc/locks`` lists every held flock with its file's device and inode; where it cannot
be read, the pid in the lock file is checked. A ledger whose runs say "running" while nobody
holds the lock was left by an orchestrator that died (``kill -9``, a lost machine): its runs are
orphans until the same command resumes the experiment.
"""

from __future__ import annotations

import os
from pathlib import Path


def _pid_in(lock: Path) -> int | None:
    try:
        words = lock.read_text().split()
    except OSError:
        return None
    return int(words[1]) if len(words) == 2 and words[0] == "pid" and words[1].isdigit() else None


def _pid_alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def lock_held(lock: Path) -> bool:
    """Whether some process holds an flock on ``lock`` (or, without ``/proc/locks``, whether its pid lives)."""
    try:
        info = os.stat(lock)
    except OSError:
        return False
    pid = _pid_in(lock)
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _pid_alive(pid)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" in fields[1] marks a waiter, not a holder
            continue
        dev_major, _, rest = fields[5].partition(":")
        dev_minor, _, inode = rest.partition(":")
        if inode != str(info.st_ino):
            continue
        if f"{dev_major}:{dev_minor}" == device or (pid is not None and fields[4] == str(pid)):
            return True
    return False


ORPHANED = "orphaned"  # what a reader shows for "running" when the orchestrator that would finish it is gone
ORPHANED_NOTE = ("the orchestrator stopped without finishing (killed, or its machine lost): the runs shown as"
                 " orphaned are not being watched; the same command ({command}) resumes it")


def orphaned(status: str, lock: Path) -> bool:
    """A running experiment or session whose orchestrator holds its lock no more."""
    return status == "running" and not lock_held(lock)


__all__ = ["ORPHANED", "ORPHANED_NOTE", "lock_held", "orphaned"]
