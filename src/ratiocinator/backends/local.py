"""The local backend: runs on this machine, one process group per run.

Each run gets its own session (so a timeout or Ctrl-C kills its children too), its
GPU slot through ``CUDA_VISIBLE_DEVICES``, and an argv that no shell ever parses.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratiocinator.backends.base import (
    Backend,
    ExitInfo,
    HardwareFinding,
    Host,
    LaunchFailure,
    LaunchRequest,
    RunHandle,
    Slot,
    Stream,
    Workspace,
)
from ratiocinator.backends.hardware import compare_local, oom_kill_count, probe_machine
from ratiocinator.backends.process import kill_group, launch_failure, process_start_time, spawn_timed
from ratiocinator.data.local_copy import prepared_copy
from ratiocinator.errors import BackendError, WorkspaceError
from ratiocinator.execution import contract
from ratiocinator.execution.environment import probe_environment
from ratiocinator.execution.supervisor import Supervisor
from ratiocinator.repo import workspace as ws
from ratiocinator.repo.copies import Snapshot, SpareCopies, snapshot
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.paths import Paths

READ_BYTES = 1 << 20  # at most this much of one stream is read and handed on at once
PIPE_BYTES = 1 << 18  # the child's output pipes (4 times the default): room to go on printing while a chunk is parsed
# After a chunk of a busy stream smaller than GATHER_BELOW, reading waits this long for more: a runner printing
# fast costs a few hundred chunks a second, not one per write (each chunk has a fixed cost: a wake-up, a thread
# hand-off), for 2 ms more latency. A chunk under GATHER_FROM (a few lines) is no sign of a busy stream, and a
# run that prints a line now and then must not wait at its end.
GATHER_S = 0.002
GATHER_FROM = 1 << 12
GATHER_BELOW = 1 << 16
PRUNE_EVERY = 64  # runs' working copies between two `git worktree prune`s
# A finished run's copy made with at most this many entries is checked (one stat each, stopping past that
# many) on the event loop; a bigger one in a worker thread, as is deleting a copy the run changed.
INLINE_COPY_ENTRIES = 64
FIRST_READ_BYTES = 1 << 16  # a pipe's first read of a wake-up: most hold a few lines (a 1 MiB buffer costs a mmap)


class LocalRunHandle(RunHandle):
    """A child process watched through a pidfd, so its exit is seen even while
    a stray grandchild still holds its pipes open (asyncio's own subprocess
    transport only reports exit once every pipe has closed)."""

    def __init__(self, proc: subprocess.Popen[bytes], copy: _RunCopy | None = None,
                 pid_start: int | None = None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pid_start = pid_start if pid_start is not None else process_start_time(proc.pid)
        self._copy = copy  # this run's working copy, handed on (or removed) once the run succeeded
        self.workdir = copy.path if copy else None
        self._exited = asyncio.get_running_loop().create_future()
        self._watch_exit()

    def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()

        def exited() -> None:
            if not self._exited.done():
                self._exited.set_result(None)

        try:
            pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):  # no pidfd: a thread blocks in waitpid instead
            threading.Thread(target=lambda: (self.proc.wait(), loop.call_soon_threadsafe(exited)), daemon=True).start()
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            exited()

        loop.add_reader(pidfd, readable)

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """The child's output, read when the consumer asks for more: all that waits in a ready pipe (up to
        `READ_BYTES`) at once. While the consumer parses a chunk, nothing reads; the pipe fills instead
        (`PIPE_BYTES`), so a chatty runner costs few, large chunks and the parsing thread keeps the GIL.
        After a small chunk of a busy stream, output gathers for `GATHER_S` before the next read."""
        loop = asyncio.get_running_loop()
        pipes: dict[Stream, Any] = {"stdout": self.proc.stdout, "stderr": self.proc.stderr}
        for pipe in pipes.values():
            os.set_blocking(pipe.fileno(), False)
            widen_pipe(pipe.fileno())
        try:
            while pipes:
                ready = await _readable(loop, pipes)
                for name in ready:  # every stream that is ready: neither starves the other
                    chunk, ended = read_available(pipes[name].fileno())
                    if ended:
                        pipes.pop(name).close()
                    if chunk:
                        yield name, chunk
                        if not ended and GATHER_FROM <= len(chunk) < GATHER_BELOW:  # a busy stream, and the
                            await asyncio.sleep(GATHER_S)  # consumer keeps up: let its output gather a moment
        finally:
            for pipe in pipes.values():
                pipe.close()

    async def wait(self) -> ExitInfo:
        await asyncio.shield(self._exited)
        code = self.proc.wait()
        Supervisor.forget(self.proc.pid)
        return ExitInfo(exit_code=None, signal=-code) if code < 0 else ExitInfo(exit_code=code, signal=None)

    async def cancel(self, grace_s: float = 5.0) -> None:
        kill_group(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
        except TimeoutError:
            pass
        kill_group(self.proc.pid, signal.SIGKILL)

    async def reap_strays(self) -> None:
        kill_group(self.proc.pid, signal.SIGKILL)
        if self._copy is not None and self.proc.poll() == 0:  # a failed run's copy stays, to look at
            copy, self._copy = self._copy, None
            # Kept for the next run when clean. A small copy is checked here (a few stat calls, cheaper than a
            # worker thread); deleting a changed one (it may hold all a run wrote) goes to a thread.
            if copy.seen is not None and len(copy.seen) <= INLINE_COPY_ENTRIES:
                if not copy.spares.keep(copy.path, copy.seen, copy.record):
                    await asyncio.to_thread(copy.spares.drop, copy.path)
            else:
                await asyncio.to_thread(copy.spares.put_back, copy.path, copy.seen, copy.record)


class LocalBackend(Backend):
    name = "local"

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> LocalBackend:
        return cls(home)

    def describe(self, loaded: LoadedSpec, findings: list[HardwareFinding]) -> list[str]:
        return []  # `validate` shows this machine's findings; plan adds nothing

    def __init__(self, home: Path) -> None:
        self.home = home
        self._checkout: Path | None = None  # the prepared (cached) checkout: runs get copies of it
        self._copy_inputs: tuple[list[str], list[str]] | None = None  # its LFS files and untracked entries
        self._spares: SpareCopies | None = None  # clean copies of it that finished runs handed on
        self._checkout_names: dict[str, tuple[Path | None, bool]] = {}  # cwd -> (checkout then, whether it is it)
        self._copies_made = 0

    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        return compare_local(loaded.spec.hardware, probe_machine(self.home))

    def slots(self, loaded: LoadedSpec) -> tuple[Slot, ...]:
        spec = loaded.spec
        per_run = spec.hardware.num_gpus
        if per_run:
            gpus = probe_machine(self.home).gpus
            capacity = len(gpus) // per_run
            if capacity == 0:
                raise BackendError(
                    f"the spec needs {per_run} GPU(s) per run, this machine has {len(gpus)}",
                    hint="set hardware.num_gpus: 0 to run on the CPU, or use a machine with GPUs",
                )
            count = min(spec.concurrency or capacity, capacity)
            return tuple(Slot(i, tuple(range(i * per_run, (i + 1) * per_run))) for i in range(count))
        return tuple(Slot(i) for i in range(spec.concurrency or 1))

    async def acquire(self, loaded: LoadedSpec) -> Host:
        facts = probe_machine(self.home)
        info = {"cpus": str(facts.cpus), "gpus": ", ".join(facts.gpus) or "none"}
        if facts.ram_gb is not None:
            info["ram_gb"] = f"{facts.ram_gb:.1f}"
        if facts.cuda_version:
            info["cuda"] = facts.cuda_version
        return Host(name=f"local:{os.uname().nodename}", slots=self.slots(loaded),
                    price_per_hour=loaded.spec.hardware.price_per_hour, info=info)

    async def prepare(
        self, host: Host, loaded: LoadedSpec, commit: str, *, on_output: Callable[[str], None] | None = None
    ) -> Workspace:
        spec = loaded.spec
        repo = ws.resolve_repo_url(spec.repo_url, loaded.path.parent)
        cache = Paths(self.home).repos
        checkout = await asyncio.to_thread(ws.checkout, repo, commit, cache, lfs_timeout_s=spec.download_timeout_s)
        deps = ws.DepsConfig(
            pre_install=tuple(spec.deps.pre_install),
            requirements=spec.deps.requirements,
            exclude_from_requirements=tuple(spec.deps.exclude_from_requirements),
            verify=spec.deps.verify,
            download_timeout_s=spec.download_timeout_s,
        )
        inherited = contract.inherited_env(os.environ, spec.pass_env)  # deps steps see no provider key either
        prepared = await asyncio.to_thread(ws.prepare_env, checkout, deps, Paths(self.home).envs, on_output=on_output,
                                           base_env=inherited)
        env = dict(prepared.env)
        if spec.deps.verify:
            await asyncio.to_thread(
                ws.run_verify, checkout, spec.deps.verify, {**inherited, **env}, timeout_s=spec.download_timeout_s
            )
        if self._spares is not None and self._spares.checkout != Path(checkout).resolve():
            await asyncio.to_thread(self._spares.close)  # copies of another commit
            self._spares = None
        self._checkout, self._copy_inputs = Path(checkout).resolve(), None
        started = time.monotonic()  # the data: in place (local), or fetched once into the home's cache
        copy = await asyncio.to_thread(prepared_copy, loaded, self.home)
        if copy is None:
            return Workspace(checkout=checkout, env=env)
        env[contract.DATA_DIR] = str(copy.directory)
        return Workspace(checkout=checkout, env=env, staging_s={host.name: time.monotonic() - started})

    async def environments(self, host: Host, workspace: Workspace, loaded: LoadedSpec) -> list[dict[str, Any]]:
        env = {**contract.inherited_env(os.environ, loaded.spec.pass_env), **workspace.env}
        found = await asyncio.to_thread(probe_environment, Path(workspace.checkout), env,
                                        loaded.spec.deps.requirements)
        return [] if found is None else [found]

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        env = dict(request.env)
        if request.slot.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, request.slot.gpus))
        argv, cwd, copy = request.argv, request.cwd, None
        if self._checkout is not None and self._is_checkout(request.cwd):
            copy = await self._working_copy(request.log_dir / "work")
            argv, cwd = _moved(argv, self._checkout, copy.path), copy.path
            env = _moved_env(env, self._checkout, copy.path)
        try:
            proc, pid_start = spawn_timed(lambda: subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            ), lambda made: made.pid)
        except OSError as exc:
            raise launch_failure(request.argv, exc) from None
        if request.timeout_s is not None:  # the hard timeout holds even if this orchestrator is killed
            Supervisor.watch(proc.pid, pid_start, request.timeout_s)
        return LocalRunHandle(proc, copy, pid_start)

    def _is_checkout(self, cwd: Path | str) -> bool:
        """Whether ``cwd`` names the prepared checkout; each name is resolved once (runs share one)."""
        known = self._checkout_names.get(str(cwd))
        if known is None or known[0] != self._checkout:
            known = self._checkout_names[str(cwd)] = (self._checkout, Path(cwd).resolve() == self._checkout)
        return known[1]

    async def _working_copy(self, dest: Path) -> _RunCopy:
        """The run's own copy of the prepared commit: a clean one a finished run handed on (see `repo.copies`),
        else a new one (see `repo.workspace.working_copy`)."""
        assert self._checkout is not None
        checkout = self._checkout
        if self._spares is None:
            self._spares = SpareCopies(checkout)
        spares = self._spares
        if len(spares):
            taken = spares.take(dest)  # a rename and a small write: cheaper than a worker thread
            if taken is not None:
                return _RunCopy(dest, spares, *taken)
        try:
            if self._copy_inputs is None:  # listed once: runs never write the cached checkout
                self._copy_inputs = await asyncio.to_thread(
                    lambda: (ws.lfs_files(checkout), ws.untracked_entries(checkout)))
            lfs, untracked = self._copy_inputs
            self._copies_made += 1
            # Dropped copies leave git records that are pruned in batches: git names each new worktree
            # past the existing ones, so thousands of stale records would slow every add.
            prune = self._copies_made % PRUNE_EVERY == 0

            def make() -> _RunCopy:
                if prune:
                    ws.prune_working_copies(checkout)
                made = ws.working_copy(checkout, dest, lfs, untracked)
                return _RunCopy(made, spares, snapshot(made))

            return await asyncio.to_thread(make)
        except (WorkspaceError, OSError) as exc:
            raise LaunchFailure(f"could not make the run's working copy: {exc}", transient=True) from None

    async def release(self, host: Host) -> None:
        """Nothing is rented locally; the spare copies go, and git forgets the working copies the runs dropped."""
        if self._spares is not None:
            await asyncio.to_thread(self._spares.close)
            self._spares = None
        if self._checkout is not None:
            await asyncio.to_thread(ws.prune_working_copies, self._checkout)

    def oom_kills(self, host: Host) -> int | None:
        return oom_kill_count()

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        alive_start = process_start_time(pid)
        if alive_start is not None and pid_start is not None and alive_start != pid_start:
            return False  # the PID now belongs to an unrelated process
        return kill_group(pid, signal.SIGKILL)


@dataclass(frozen=True)
class _RunCopy:
    """A run's working copy, what it held when the run started, and where it goes back when the run succeeds."""

    path: Path
    spares: SpareCopies
    seen: Snapshot | None
    record: Path | None = None  # its git record, where known (read from its .git file when it is kept)


async def _readable(loop: asyncio.AbstractEventLoop, pipes: dict[Stream, Any]) -> list[Stream]:
    """The streams whose pipes have something to read (or have ended), once one has."""
    ready: list[Stream] = []
    woken = loop.create_future()

    def readable(name: Stream) -> None:
        ready.append(name)
        if not woken.done():
            woken.set_result(None)

    for name, pipe in pipes.items():
        loop.add_reader(pipe.fileno(), readable, name)
    try:
        await woken
    finally:
        for pipe in pipes.values():
            loop.remove_reader(pipe.fileno())
    return ready


def read_available(fd: int) -> tuple[bytes, bool]:
    """What a non-blocking pipe holds now, up to `READ_BYTES`, and whether it has ended (EOF).

    A read that returns less than it asked for has emptied the pipe: no further read is tried."""
    parts: list[bytes] = []
    size = 0
    while size < READ_BYTES:
        wanted = min(READ_BYTES - size, READ_BYTES if parts else FIRST_READ_BYTES)
        try:
            data = os.read(fd, wanted)
        except BlockingIOError:
            break
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
        if len(data) < wanted:
            break
    return parts[0] if len(parts) == 1 else b"".join(parts), False


def widen_pipe(fd: int) -> None:
    """Give the pipe `PIPE_BYTES` of room (Linux), so a runner printing fast seldom waits while a chunk is
    parsed; where that is refused (over the system's limit for pipes), the pipe keeps its size."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except OSError:
        pass


def _moved(argv: tuple[str, ...], old: Path, new: Path) -> tuple[str, ...]:
    """Arguments naming a path in the cached checkout name the same path in the run's copy."""
    prefix = str(old) + os.sep
    return tuple(str(new) + a[len(str(old)):] if a == str(old) or a.startswith(prefix) else a for a in argv)


def _moved_env(env: dict[str, str], old: Path, new: Path) -> dict[str, str]:
    return dict(zip(env, _moved(tuple(env.values()), old, new), strict=True))
