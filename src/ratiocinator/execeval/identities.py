"""Who each sample runs as, and the zygote that forks it: one identity per concurrent worker.

Why: as root, each concurrent sample runs as its own unprivileged uid (from SANDBOX_UID_BASE,
claimed with lock files so concurrent evaluations do not share one), so RLIMIT_NPROC caps
exactly that sample and it can signal nothing but itself, nor read any file its uid may not.
As a normal user every identity is the caller's own uid. Each identity keeps its worker's
zygote, started on first use and replaced when it is lost.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ratiocinator.execeval.processes import _kill_sandbox, _kill_uid, _read_bytes, _tasks_of_user
from ratiocinator.execeval.samples import SandboxError
from ratiocinator.execeval.sandbox import _Zygote, _ZygoteLost

SANDBOX_UID_BASE = 2_000_000_000
SANDBOX_UID_SPAN = 4096


def _uid_range_mapped(start: int, count: int) -> bool:
    data = _read_bytes("/proc/self/uid_map")
    if data is None:
        return True
    for line in data.decode().splitlines():
        inside, _, length = (int(x) for x in line.split())
        if inside <= start and start + count <= inside + length:
            return True
    return False


@dataclass
class _Identity:
    """Who one sample runs as (`uid` None is the caller's own uid, not root), and the zygote that forks it."""

    uid: int | None = None
    # Tasks the uid still holds (killed, not yet reaped by init) from before it was claimed,
    # or from a sample whose zygote was lost: RLIMIT_NPROC counts them, so the next sample's
    # cap is raised by as many. A zygote itself reaps every process of its samples.
    zombies: int = 0
    zygote: _Zygote | None = None


class _Identities:
    """The identities of one evaluation: the caller's own, or (as root) one claimed unprivileged uid per slot."""

    def __init__(self, slots: int) -> None:
        self._locks: list[int] = []
        self._free: list[_Identity] = []
        self._all: list[_Identity] = []
        self._claimed: list[int] = []
        self._lock = threading.Lock()
        if os.geteuid() != 0:
            self._free = [_Identity() for _ in range(slots)]
            self._all = list(self._free)
            return
        if not _uid_range_mapped(SANDBOX_UID_BASE, SANDBOX_UID_SPAN):
            raise SandboxError(
                f"running as root, but uids {SANDBOX_UID_BASE}..{SANDBOX_UID_BASE + SANDBOX_UID_SPAN - 1} "
                "are not mapped in this user namespace, so samples cannot be confined",
                hint="run the evaluation as a non-root user")
        lock_dir = Path(tempfile.gettempdir()) / "ratiocinator-sandbox-uids"
        lock_dir.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(lock_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
            raise SandboxError(f"{lock_dir} is not a directory owned by root", hint="remove it and retry")
        for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SPAN):
            fd = os.open(lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._locks.append(fd)
            self._claimed.append(uid)
            if len(self._claimed) == slots:
                break
        if not self._claimed:
            raise SandboxError(f"all {SANDBOX_UID_SPAN} sandbox uids are claimed by other evaluations",
                               hint=f"wait for them, or remove stale locks in {lock_dir}")
        for uid in self._claimed:
            _kill_uid(uid)  # whatever an evaluator that died mid-sample left behind
            self._free.append(_Identity(uid, _tasks_of_user(uid)))
        self._all = list(self._free)

    @property
    def slots(self) -> int:
        return len(self._free)

    @contextmanager
    def lease(self) -> Iterator[_Identity]:
        with self._lock:
            identity = self._free.pop()
        try:
            yield identity
        finally:
            with self._lock:
                self._free.append(identity)

    def close(self) -> None:
        """Stop the zygotes, sweep each uid once more (undumpable processes included), and unlock it."""
        zygotes = [identity.zygote for identity in self._all if identity.zygote is not None]
        for zygote in zygotes:
            zygote.sock.close()  # all of them told first: each then ends in parallel
        for identity in self._all:
            identity.zygote = None
        for zygote in zygotes:
            zygote.close()
        for uid in self._claimed:
            _kill_uid(uid)
        for zygote in zygotes:
            zygote.remove_dir()
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()
        self._claimed.clear()


def _fork_sandbox(identity: _Identity, fds: Sequence[int]) -> tuple[_Zygote, int]:
    """Fork the sample's sandbox from its worker's zygote, starting a fresh zygote when there is none or it is gone."""
    hint = None
    for _ in range(2):
        if identity.zygote is None:
            identity.zygote = _Zygote(identity.uid)
        zygote = identity.zygote
        try:
            return zygote, zygote.start(fds)
        except _ZygoteLost:
            # Killed, or it retired because its limits were changed from outside (see sandbox_child).
            identity.zygote = None
            hint = zygote.discard()
            # Had it forked before it died, that fork must not live on beside the next one.
            _kill_sandbox(None, identity.uid, zygote.marker)
            zygote.remove_dir()
    raise SandboxError("the sandbox's fork server (zygote) died twice in a row", hint=hint)
