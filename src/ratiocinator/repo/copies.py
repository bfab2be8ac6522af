"""Runs' working copies handed on to the next run of the same commit instead of being made afresh.

Making a working copy starts git and writes every tracked file; for short runs that costs more than
the run itself. A run that exits 0 and leaves its copy exactly as it found it (the same entries, each
file and link with the same inode, mode, size, mtime and ctime) hands the copy on: it waits in this
process's spare folder next to the run directories, and the next run's copy is that folder renamed
to the new run's ``work``. So a run's copy is always at its own run directory's ``work`` while it runs,
as a fresh one would be; a copy found changed is deleted as before, and the next run gets a fresh one.

``__pycache__`` folders are left out of the comparison: Python writes them on import and checks
them against each source's size and mtime before use, and a reused copy's sources are the same files.

Spares live in a folder held under an ``flock`` by the process that made it; a folder whose lock is
free belongs to a process that is gone (killed with ``kill -9``) and is deleted by the next one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import IO

from ratiocinator.repo import workspace as ws

SPARE_PREFIX = ".spare-copies-"
LOCK_NAME = ".owner.lock"
IGNORED_DIRS = frozenset({"__pycache__"})

Snapshot = dict[str, tuple[int, ...]]


def snapshot(copy: Path, *, limit: int | None = None) -> Snapshot | None:
    """Every entry under ``copy`` with what changes when it is written; None when some entry cannot be read,
    or when there are more than ``limit`` of them.

    Folders are compared by the entries in them (their mtime moves whenever Python writes a cache)."""
    found: Snapshot = {}
    pending = [(str(copy), "")]
    try:
        while pending:
            folder, prefix = pending.pop()
            with os.scandir(folder) as entries:
                for entry in entries:
                    info = entry.stat(follow_symlinks=False)
                    name = prefix + entry.name
                    if stat.S_ISDIR(info.st_mode):
                        if entry.name in IGNORED_DIRS:
                            continue
                        found[name] = (info.st_mode, info.st_ino)
                        pending.append((entry.path, name + "/"))
                    else:
                        found[name] = (info.st_mode, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
                    if limit is not None and len(found) > limit:
                        return None
    except OSError:
        return None
    return found


class SpareCopies:
    """Clean working copies of one cached checkout, waiting for the next run; one instance per process and checkout.

    `take` and `put_back` may run in worker threads (a big copy's check is one stat per file); the list
    of spares is guarded by a lock, so a copy is never handed to two runs."""

    def __init__(self, checkout: Path) -> None:
        self.checkout = checkout
        self._lock = threading.Lock()
        self._spares: list[tuple[Path, Snapshot, Path]] = []  # (copy, its snapshot, its git record)
        self._mover: ws.WorkingCopyMover | None = None
        self._folders: dict[Path, tuple[Path, IO[str]]] = {}  # runs' parent folder -> (spare folder, its held lock)
        self._closed = False
        self._made = 0

    def __len__(self) -> int:
        return len(self._spares)

    def take(self, dest: Path) -> tuple[Snapshot, Path] | None:
        """Move a spare copy to ``dest``; its snapshot and git record (hand both back to `keep`), or None when
        there is none to take."""
        while True:
            with self._lock:
                if not self._spares or self._mover is None:
                    return None
                spare, seen, record = self._spares.pop()
                try:
                    self._mover.move(spare, dest, record)
                except OSError:  # another file system, say: that spare is of no use
                    pass
                else:
                    return seen, record
            shutil.rmtree(spare, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)  # the run's fresh copy goes there

    def put_back(self, copy: Path, seen: Snapshot | None, record: Path | None = None) -> bool:
        """Keep ``copy`` for a later run when it is as it was made (``seen``); otherwise delete it. True when kept."""
        if self.keep(copy, seen, record):
            return True
        self.drop(copy)
        return False

    def keep(self, copy: Path, seen: Snapshot | None, record: Path | None = None) -> bool:
        """Keep ``copy`` for a later run when it is as it was made (``seen``); True when kept. Its cost is
        bounded by ``seen``: a copy holding more entries than that is found changed without listing the rest.
        ``record``: its git record as `take` gave it (a copy made afresh has it read from its ``.git`` file)."""
        if seen is None or self._closed or snapshot(copy, limit=len(seen)) != seen:
            return False
        with self._lock:
            folder = None if self._closed else self._folder(copy.parent.parent)
            if folder is None:
                return False
            self._made += 1
            spare = folder / str(self._made)
            try:
                if record is None:
                    record = ws.WorkingCopyMover.record(copy)
                if self._mover is None:
                    self._mover = ws.WorkingCopyMover(self.checkout)
                self._mover.move(copy, spare, record)
            except OSError:
                return False
            self._spares.append((spare, seen, record))
            return True

    def drop(self, copy: Path) -> None:
        """Delete a copy not kept (however much the run wrote into it)."""
        ws.drop_working_copy(self.checkout, copy, prune=False)  # pruned at the backend's release

    def close(self) -> None:
        """Delete every spare and the spare folders; copies handed back later are deleted instead of kept."""
        with self._lock:
            self._closed = True
            spares, self._spares = self._spares, []
            folders, self._folders = self._folders, {}
            mover, self._mover = self._mover, None
        if mover is not None:
            mover.close()
        for spare, _, _ in spares:
            shutil.rmtree(spare, ignore_errors=True)
        for folder, held in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
            held.close()

    def _folder(self, parent: Path) -> Path | None:
        """This process's spare folder beside the run directories in ``parent`` (made once; the caller locks)."""
        known = self._folders.get(parent)
        if known is not None:
            return known[0]
        try:
            _remove_abandoned(parent)
            folder = Path(tempfile.mkdtemp(prefix=SPARE_PREFIX, dir=parent))
            held = open(folder / LOCK_NAME, "w")
        except OSError:
            return None
        fcntl.flock(held, fcntl.LOCK_EX)
        self._folders[parent] = (folder, held)
        return folder


def _remove_abandoned(parent: Path) -> None:
    """Spare folders whose owner is gone (its lock is free): what a killed process left behind."""
    for folder in parent.glob(SPARE_PREFIX + "*"):
        try:
            with open(folder / LOCK_NAME) as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held (a live process's), or its owner is making it this instant
        else:
            shutil.rmtree(folder, ignore_errors=True)
