"""Finding, sweeping and killing a sample's processes through /proc.

Why: a sample may fork, setsid() and outlive its main process. Normally its zygote kills and
reaps its whole tree; should the zygote itself die, the sandbox is swept from here: its
session and process group, and processes carrying the zygote's environment marker or, as
root, the sample's uid. As a normal user this also counts the user's tasks, which is what
RLIMIT_NPROC caps.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass

KILL_S = 5.0


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


@dataclass(frozen=True)
class _Proc:
    """One process, from /proc/PID/stat and the owner of /proc/PID (its euid while dumpable)."""

    pid: int
    state: bytes
    pgrp: int
    session: int
    threads: int
    owner: int

    @property
    def dead(self) -> bool:
        return self.state in (b"Z", b"X", b"x")


def _processes() -> Iterator[_Proc]:
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        data = _read_bytes(f"/proc/{name}/stat")
        if data is None:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        try:
            owner = os.stat(f"/proc/{name}").st_uid
            yield _Proc(int(name), fields[0], int(fields[2]), int(fields[3]), int(fields[17]), owner)
        except (OSError, IndexError, ValueError):
            continue


def _real_uid(pid: int) -> int | None:
    """The real uid from /proc/PID/status: slower than `_Proc.owner`, but right for undumpable processes."""
    data = _read_bytes(f"/proc/{pid}/status")
    for line in (data or b"").splitlines():
        if line.startswith(b"Uid:"):
            return int(line.split()[1])
    return None


def _tasks_of_user(uid: int) -> int:
    """Tasks (processes and threads, zombies included) owned by `uid`: what RLIMIT_NPROC counts.

    Only the user's own processes have their stat read: this runs once per sample as a normal user.
    """
    tasks = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
        except OSError:
            continue
        data = _read_bytes(f"/proc/{name}/stat")
        if data is None:
            continue
        with suppress(IndexError, ValueError):
            tasks += int(data[data.rfind(b")") + 2:].split()[17])
    return tasks


def _sweep(session: int | None, uid: int | None, marker: bytes) -> tuple[list[int], int]:
    """Live processes of one sandbox, and the zombies its uid still holds (root mode).

    A process belongs to the sandbox if it is in the sandbox's session or process group,
    or (as root) runs as the sandbox's uid, or (as a normal user) carries its marker in
    its environment, which is how daemons that called setsid() are still found.
    """
    alive, zombies = [], 0
    me, own_uid = os.getpid(), os.getuid()
    for proc in _processes():
        if proc.pid in (me, session):
            continue
        if proc.dead:
            zombies += uid is not None and proc.owner == uid
        elif session is not None and session in (proc.pgrp, proc.session):
            alive.append(proc.pid)
        elif uid is not None:
            if proc.owner == uid:
                alive.append(proc.pid)
        elif proc.owner == own_uid and marker:
            environ = _read_bytes(f"/proc/{proc.pid}/environ")
            if environ is not None and marker in environ.split(b"\0"):
                alive.append(proc.pid)
    return alive, zombies


def _kill_sandbox(session: int | None, uid: int | None, marker: bytes) -> tuple[int, int]:
    """SIGKILL every process of the sandbox until none is left; returns (killed, zombies left).

    The main process (`session`) is killed with its process group but not counted.
    """
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_S
    while True:
        alive, zombies = _sweep(session, uid, marker)
        if session is not None:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(session, signal.SIGKILL)
        if not alive or time.monotonic() > deadline:
            return len(killed), zombies
        for pid in alive:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.005)


def _kill_uid(uid: int) -> int:
    """Kill every live process whose real uid is `uid`, undumpable ones included."""
    killed = 0
    for _ in range(100):
        alive = [p.pid for p in _processes() if not p.dead and (p.owner == uid or _real_uid(p.pid) == uid)]
        if not alive:
            break
        for pid in alive:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        killed += len(alive)
        time.sleep(0.01)
    return killed
