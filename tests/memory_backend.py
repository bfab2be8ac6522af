"""An in-memory compute backend: runs scripted in Python, so the executor and the pipeline run in-process.

It stands in for processes and hosts only. A launch starts no process: the run's
`Script` says what it prints (stdout and stderr lines, spread over its lifetime), how long
it lives, and how it ends (an exit code, a signal, a launch the backend refuses, a host lost
mid-run). Everything around it stays real: the executor, the SQLite ledger, the budget, the
failure classifier, and ``prepare``'s checkout of the real repository at the real commit
(the cached checkout ``inspect_code`` made; no dependencies are installed).

The backend also keeps what a test wants to check afterwards: every launch, the live runs
and the most that were ever live at once, cancelled runs, and whether two live runs were
ever given one slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from signal import SIGTERM

from ratiocinator.backends.base import (
    Backend,
    ExitInfo,
    HardwareFinding,
    Host,
    InstanceDeadlines,
    LaunchFailure,
    LaunchRequest,
    RunHandle,
    Slot,
    Stream,
    Workspace,
)
from ratiocinator.errors import UsageError
from ratiocinator.repo import workspace as ws
from ratiocinator.spec.models import LoadedSpec


@dataclass(frozen=True)
class Script:
    """What one launched run does."""

    stdout: Sequence[str] = ()
    stderr: Sequence[str] = ()
    seconds: float = 0.01  # how long the run lives; its lines are spread evenly over that time
    exit_code: int | None = 0
    signal: int | None = None
    launch_error: LaunchFailure | None = None  # the backend cannot start it: launch() raises this
    lost: LaunchFailure | None = None  # the host goes away at the end: wait() raises this instead of an exit


@dataclass(frozen=True)
class Launch:
    """One call to `MemoryBackend.launch`, as a script function sees it."""

    request: LaunchRequest
    arm: str
    seed: int
    attempt: int  # 1 for this backend's first launch of this (arm, seed), 2 for its retry, ...

    @property
    def env(self) -> dict[str, str]:
        return self.request.env


def metrics(**values: float) -> str:
    """A json_line metric line, as a runner prints it."""
    return "METRICS: " + json.dumps(values)


class MemoryRunHandle(RunHandle):
    """A scripted run: a task feeds its lines into a queue, then settles its exit."""

    def __init__(self, backend: MemoryBackend, request: LaunchRequest, script: Script) -> None:
        self.backend = backend
        self.request = request
        self.script = script
        self.cancelled = False
        self.exit: ExitInfo | None = None
        self._chunks: asyncio.Queue[tuple[Stream, bytes] | None] = asyncio.Queue()
        self._exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._exited.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits
        self._task = asyncio.create_task(self._play())

    async def _play(self) -> None:
        lines: list[tuple[Stream, str]] = [("stdout", s) for s in self.script.stdout]
        lines += [("stderr", s) for s in self.script.stderr]
        pause = self.script.seconds / (len(lines) + 1)
        for stream, line in lines:
            await asyncio.sleep(pause)
            self._chunks.put_nowait((stream, (line + "\n").encode()))
        await asyncio.sleep(pause)
        if self.script.lost is not None:
            self._end(error=self.script.lost)
        else:
            self._end(ExitInfo(exit_code=self.script.exit_code, signal=self.script.signal))

    def _end(self, exit_info: ExitInfo | None = None, error: BaseException | None = None) -> None:
        if self._exited.done():
            return
        self._chunks.put_nowait(None)
        if error is not None:
            self._exited.set_exception(error)
        else:
            self.exit = exit_info
            self._exited.set_result(exit_info)  # type: ignore[arg-type]
        self.backend._ended(self)

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        while (item := await self._chunks.get()) is not None:
            yield item
        self._chunks.put_nowait(None)  # a second reader ends too

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._exited)

    async def cancel(self, grace_s: float = 5.0) -> None:
        """The polite signal ends a scripted run at once."""
        if self._exited.done():
            return
        self.cancelled = True
        self._task.cancel()
        self._end(ExitInfo(exit_code=None, signal=SIGTERM))

    async def reap_strays(self) -> None:
        """A scripted run leaves nothing behind."""


class MemoryBackend(Backend, InstanceDeadlines):
    """Slots on no machine at all; each launch plays the `Script` that ``script`` gives it.

    ``script`` is one `Script` for every run, or a function of the `Launch` (its arm, seed,
    attempt and environment). ``home`` is the pipeline's --home: `prepare` checks out from
    its repos/ cache, as the local backend does. ``slots`` defaults to the spec's concurrency
    (as the local backend's do), ``price_per_hour`` to the spec's price. With
    ``refuse_secure_after``, the backend says the budget cannot keep a slot paid for once
    that many runs were launched.
    """

    name = "memory"

    def __init__(self, script: Script | Callable[[Launch], Script] = Script(), *, home: Path | None = None,
                 slots: int | None = None, price_per_hour: float | None = None,
                 refuse_secure_after: int | None = None) -> None:
        self.script = script
        self.home = home.expanduser().resolve() if home is not None else None
        self.n_slots = slots
        self.price = price_per_hour
        self.refuse_secure_after = refuse_secure_after
        self.launches: list[Launch] = []
        self.handles: dict[int, MemoryRunHandle] = {}  # run id -> its handle
        self.live: dict[int, Slot] = {}  # run id -> the slot it runs in
        self.peak_live = 0
        self.slot_clashes: list[tuple[int, int, str]] = []  # (run, run already there, slot)
        self.prepared: list[str] = []  # commits prepared
        self.released: list[Host] = []
        self.orphans_killed: list[tuple[int, int | None]] = []
        self.orchestrator: asyncio.Task[object] | None = None
        self._attempts: dict[tuple[str, int], int] = {}

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> MemoryBackend:
        raise UsageError("the in-memory backend is built by a test with its script, not from a spec")

    def deadlines(self) -> InstanceDeadlines | None:
        """Only when a test asks the budget to refuse keeping slots paid (``refuse_secure_after``)."""
        return self if self.refuse_secure_after is not None else None

    # -- what the executor and the pipeline call ----------------------------------------

    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        return [HardwareFinding("gpu", "not_applicable", "runs are scripted in memory")]

    async def acquire(self, loaded: LoadedSpec) -> Host:
        self.orchestrator = asyncio.current_task()  # what SIGTERM would cancel (see `interrupt`)
        count = self.n_slots or loaded.spec.concurrency or 1
        price = loaded.spec.hardware.price_per_hour if self.price is None else self.price
        return Host(name="memory", slots=tuple(Slot(i) for i in range(count)), price_per_hour=price,
                    info={"where": "in memory"})

    async def prepare(self, host: Host, loaded: LoadedSpec, commit: str, *,
                      on_output: Callable[[str], None] | None = None) -> Workspace:
        """The real checkout of ``commit`` (git, cached under the home's repos/); no dependencies installed."""
        assert self.home is not None, "MemoryBackend(home=...) to prepare a workspace"
        repo = ws.resolve_repo_url(loaded.spec.repo_url, loaded.path.parent)
        checkout = await asyncio.to_thread(ws.checkout, repo, commit, self.home / "repos",
                                           lfs_timeout_s=loaded.spec.download_timeout_s)
        self.prepared.append(commit)
        return Workspace(checkout=checkout, env={"MEMORY_BACKEND": "1"})

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        arm, seed = request.env["RATIOCINATOR_ARM"], int(request.env["RATIOCINATOR_SEED"])
        attempt = self._attempts[(arm, seed)] = self._attempts.get((arm, seed), 0) + 1
        launch = Launch(request, arm, seed, attempt)
        self.launches.append(launch)
        script = self.script(launch) if callable(self.script) else self.script
        if script.launch_error is not None:
            raise script.launch_error
        for other, slot in self.live.items():
            if slot == request.slot:
                self.slot_clashes.append((request.run_id, other, slot.label))
        self.live[request.run_id] = request.slot
        self.peak_live = max(self.peak_live, len(self.live))
        handle = self.handles[request.run_id] = MemoryRunHandle(self, request, script)
        return handle

    def _ended(self, handle: MemoryRunHandle) -> None:
        self.live.pop(handle.request.run_id, None)

    async def release(self, host: Host) -> None:
        self.released.append(host)

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        self.orphans_killed.append((pid, pid_start))
        return False  # no process was ever started

    async def secure(self, host: Host, slot: Slot, run_s: float) -> str | None:
        if self.refuse_secure_after is not None and len(self.launches) >= self.refuse_secure_after:
            return f"the budget cannot keep {slot.label} paid for {run_s:g}s more"
        return None

    # -- what a test calls -----------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop the orchestrator as SIGTERM or Ctrl-C does: its task is cancelled."""
        assert self.orchestrator is not None, "nothing acquired a host yet"
        self.orchestrator.cancel()

    async def until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (on the event loop) until ``predicate()`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.005)
