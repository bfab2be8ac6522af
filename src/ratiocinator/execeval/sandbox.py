"""The sandbox as the parent sees it: the zygotes (fork servers) that fork one per sample, and its streams.

Why: `python -I` plus the harness import cost ~25 ms of CPU per sample; a fork of a process
that has done both costs ~1 ms. A zygote (`sandbox_child.serve`, one per worker) never runs
or reads sample code, so every sample starts from the same pristine interpreter state; it
is a child subreaper, so it kills and reaps exactly a sample's process tree and reports the
wait status and rusage. Here: starting and talking to a zygote, the sandbox's minimal
environment and dir, and reading a running sample's stdout, stderr and records.
"""

from __future__ import annotations

import errno
import os
import secrets
import selectors
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

# The harness: its protocol constants, and imported here so that the zygotes find its bytecode cached.
from ratiocinator.execeval import sandbox_child
from ratiocinator.execeval.processes import KILL_S
from ratiocinator.execeval.samples import SandboxError

MARKER_VARIABLE = "RATIOCINATOR_SANDBOX"
# The zygote imports the harness (from its cached bytecode) from the directory holding
# this package, which it then takes off sys.path again; `-I` keeps the environment and
# the cwd out of it. It then serves on the socket whose fd is its second argument, with the
# third as its sandbox dir.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
ZYGOTE_BOOTSTRAP = ("import sys; sys.path.insert(0, sys.argv[1]); import ratiocinator.execeval.sandbox_child as"
                    " harness; del sys.path[0]; harness.serve(int(sys.argv[2]), sys.argv[3])")
ZYGOTE_START_S = 60.0
RECORD_BYTES = 1024 * 1024
# How long a zygote may take to kill and reap a sample's processes once asked, before it
# is itself killed and the sample swept the slow way.
ZYGOTE_KILL_S = KILL_S + 5.0


class _Tail:
    """The last `limit` bytes of a stream, and how many bytes it had in all."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.total = 0
        self._data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self._data += chunk
        if len(self._data) > 2 * self.limit + 65536:
            del self._data[:-self.limit]

    def text(self) -> str:
        return bytes(self._data[-self.limit:] if self.limit else b"").decode("utf-8", errors="replace")


def _minimal_env(marker_value: str) -> dict[str, str]:
    """PATH, a UTF-8 locale, the marker; nothing from our environment. The sandbox adds HOME and TMPDIR."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # One BLAS/OpenMP thread: reproducible, and threads count against max_processes.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        MARKER_VARIABLE: marker_value,
    }


def _empty_dir(dir_fd: int) -> None:
    """Remove everything in the dir open as `dir_fd`, whatever modes a sample left; only through fds, never a path.

    Runs once the sample's processes are all gone. Raises OSError (RecursionError for an
    absurdly deep tree) when something cannot be removed.
    """
    for _ in range(3):
        names = os.listdir(dir_fd)
        if not names:
            return
        for name in names:
            if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=dir_fd)
                continue
            os.chmod(name, 0o700, dir_fd=dir_fd)  # a dir, not a link (the sample is gone: no race)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                _empty_dir(sub)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=dir_fd)
    if os.listdir(dir_fd):
        raise OSError(errno.ENOTEMPTY, "a sandbox dir cannot be emptied")


@dataclass(frozen=True)
class _Reply:
    """One message of a zygote (`sandbox_child.REPLY`)."""

    kind: bytes
    pid: int
    status: int
    utime: float
    stime: float
    maxrss_kb: int
    killed: int
    ended_first: bool


class _ZygoteLost(Exception):
    """The zygote died or stopped answering."""


class _Zygote:
    """One fork server (`sandbox_child.serve`): a started harness that forks a fresh sandbox per sample.

    Why: `python -I` plus the harness import cost ~25 ms of CPU per sample; a fork of a
    process that has done both costs ~1 ms. Its environment is the sandbox's minimal one
    with a marker unique to this zygote, which every process it forks carries in
    /proc/PID/environ: that is how a sample's processes are still found, as a normal user,
    should the zygote itself be killed.
      Its sandbox dir (`workdir`, owned by its samples' uid) is the cwd, HOME and TMPDIR of
    each sample it forks, one after the other, and with a private mount namespace also
    their /tmp: `clean` empties it after every sample. One dir per worker rather than per
    sample, so that no sample costs a mount (unmounting waits for an RCU grace period)
    nor a mkdir and rmdir.
    """

    def __init__(self, uid: int | None) -> None:
        marker_value = secrets.token_hex(12)
        self.marker = f"{MARKER_VARIABLE}={marker_value}".encode()
        self.uid = uid
        self.workdir = tempfile.mkdtemp(prefix="ratiocinator-exec-")
        # Held for its lifetime: the samples share the dir's owner, and as a normal user also
        # the evaluator's uid, so it is emptied through this fd, never by its path.
        self.dir_fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if uid is not None:
                os.fchown(self.dir_fd, uid, uid)
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except BaseException:
            self.remove_dir()
            raise
        argv = [sys.executable, "-I", "-c", ZYGOTE_BOOTSTRAP, PACKAGE_ROOT, str(theirs.fileno()), self.workdir]
        try:
            self.proc = _start_process(argv, _minimal_env(marker_value), theirs.fileno())
        except BaseException:
            ours.close()
            self.remove_dir()
            raise
        finally:
            theirs.close()
        self.sock = ours
        reply = self.receive(ZYGOTE_START_S)
        if reply is None or reply.kind != sandbox_child.READY:
            hint = self.discard()
            self.remove_dir()
            raise SandboxError("the sandbox's fork server (zygote) failed to start", hint=hint)
        # What its samples are isolated from (`sandbox_child._isolate`), for each result's evidence.
        self.isolation = {"network": "isolated" if reply.status & sandbox_child.NETWORK_ISOLATED else "open",
                          "tmp": "private" if reply.status & sandbox_child.TMP_PRIVATE else "shared"}

    def receive(self, timeout: float) -> _Reply | None:
        """Its next reply; None when it is gone, said nothing for `timeout` seconds, or said nonsense."""
        try:
            self.sock.settimeout(timeout)
            data = self.sock.recv(256)
        except OSError:
            return None
        if len(data) != sandbox_child.REPLY.size:
            return None
        return _Reply(*sandbox_child.REPLY.unpack(data))

    def start(self, fds: Sequence[int]) -> int:
        """Fork a sandbox with `fds` (its stdout, stderr, result pipe and job) and the dir; returns its pid."""
        for attempt in range(6):
            try:
                socket.send_fds(self.sock, [sandbox_child.REQUEST_RUN], [*fds, self.dir_fd])
            except OSError:
                raise _ZygoteLost() from None
            reply = self.receive(ZYGOTE_START_S)
            if reply is None or reply.kind not in (sandbox_child.STARTED, sandbox_child.FAILED):
                raise _ZygoteLost()
            if reply.kind == sandbox_child.STARTED:
                return reply.pid
            if reply.status != errno.EAGAIN or attempt == 5:
                raise SandboxError(f"cannot start a sandbox process: {os.strerror(reply.status)}")
            # The machine is briefly out of processes (another sandbox's fork bomb being killed).
            time.sleep(0.05 * 2 ** attempt)
        raise AssertionError("unreachable")

    def clean(self) -> bool:
        """Empty the sandbox dir once a sample's processes are all gone, for the next; False if the dir was replaced.

        Through the fd held since it was made: the dir itself cannot be swapped for a
        link to elsewhere. Its owner and mode are set again (the sample owned it).
        """
        try:
            os.fchmod(self.dir_fd, 0o700)
            _empty_dir(self.dir_fd)
            if self.uid is not None:
                os.fchown(self.dir_fd, self.uid, self.uid)
            return os.path.samestat(os.stat(self.workdir, follow_symlinks=False), os.fstat(self.dir_fd))
        except (OSError, RecursionError):
            return False

    def remove_dir(self) -> None:
        """Empty and remove the sandbox dir, once every process that could use it is gone."""
        if self.dir_fd < 0:
            return
        if self.clean():
            with suppress(OSError):
                os.rmdir(self.workdir)
        os.close(self.dir_fd)
        self.dir_fd = -1

    def kill(self) -> None:
        """Ask it to end the running sample now; its DONE reply follows once every process is reaped."""
        with suppress(OSError):
            self.sock.settimeout(1.0)
            self.sock.send(sandbox_child.REQUEST_KILL)

    def close(self) -> None:
        """Let it go: a closed socket ends its loop (killing a running sample first); SIGKILL if it lingers."""
        self.sock.close()
        try:
            self.proc.wait(timeout=ZYGOTE_KILL_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def discard(self) -> str | None:
        """SIGKILL it (it is lost or failed); returns the last of what it wrote to stderr."""
        with suppress(OSError):
            self.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=ZYGOTE_KILL_S)
        text = None
        stderr = self.proc.stderr  # a pipe: the zygote starts with stderr=PIPE
        with suppress(OSError, ValueError, TypeError):
            if stderr is not None:
                os.set_blocking(stderr.fileno(), False)
                text = (stderr.read(65536) or b"").decode("utf-8", errors="replace").strip()[-2000:] or None
        self.close()
        return text


def _anonymous_file() -> int:
    """A read-write fd on a file with no name (its own open file, never shared)."""
    try:
        return os.memfd_create("ratiocinator-job", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return os.dup(tempfile.TemporaryFile().fileno())


def _start_process(argv: list[str], env: dict[str, str], keep_fd: int) -> subprocess.Popen:
    for attempt in range(6):
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    cwd="/", env=env, start_new_session=True, pass_fds=(keep_fd,))
        except BlockingIOError:
            # The machine is briefly out of processes (another sandbox's fork bomb being killed).
            if attempt == 5:
                raise SandboxError("cannot start a sandbox process: the system is out of processes") from None
            time.sleep(0.05 * 2 ** attempt)
    raise AssertionError("unreachable")


@dataclass
class _Run:
    """What the parent saw of one sandbox: its output, its records, and how it ended."""

    selector: selectors.BaseSelector
    stdout: _Tail
    stderr: _Tail
    records: bytearray = field(default_factory=bytearray)
    timed_out: bool = False
    cancelled: bool = False

    def read(self, key: selectors.SelectorKey) -> None:
        chunk = os.read(key.fd, 65536)
        if not chunk:
            self.selector.unregister(key.fileobj)
        elif key.data == "records":
            if len(self.records) < RECORD_BYTES:
                self.records += chunk
        else:
            getattr(self, key.data).add(chunk)

    def drain(self, deadline: float) -> None:
        """Read what is left once no writer remains; give up at `deadline` on a leaked writer."""
        while self.selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in self.selector.select(remaining):
                self.read(key)
        self.selector.close()


def _watch(run: _Run, zygote: _Zygote, deadline: float, cancel: threading.Event | None) -> _Reply | None:
    """Read the sandbox's streams until its zygote reports the end; at the deadline or on cancel, ask it to kill.

    Returns the zygote's DONE reply (sent once every process of the sample is dead and
    reaped), or None when the zygote died or did not answer in time.
    """
    selector = run.selector
    selector.register(zygote.sock, selectors.EVENT_READ, "zygote")
    give_up: float | None = None
    try:
        while True:
            now = time.monotonic()
            if give_up is None:
                run.timed_out = now >= deadline
                run.cancelled = not run.timed_out and cancel is not None and cancel.is_set()
                if run.timed_out or run.cancelled:
                    zygote.kill()
                    give_up = now + ZYGOTE_KILL_S
            elif now >= give_up:
                return None
            wait = (give_up if give_up is not None else deadline) - now
            for key, _ in selector.select(max(0.0, min(wait, 0.25))):
                if key.data == "zygote":
                    reply = zygote.receive(1.0)
                    return reply if reply is not None and reply.kind == sandbox_child.DONE else None
                run.read(key)
    finally:
        selector.unregister(zygote.sock)
