"""The compute backend interface: acquire a host, prepare its workspace, launch a run,
stream its output, cancel it, release the host, and price it.

The executor only ever talks to this interface, so local, SSH, marketplace and
cluster backends are interchangeable. A host offers *slots*: one slot runs one
process at a time and owns a fixed set of GPU indices.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ratiocinator.spec.models import LoadedSpec

if TYPE_CHECKING:
    from ratiocinator.store.budget import Budget


@dataclass(frozen=True)
class Slot:
    index: int
    gpus: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"slot{self.index}" + (f":gpu{','.join(map(str, self.gpus))}" if self.gpus else "")


@dataclass
class Host:
    name: str
    slots: tuple[Slot, ...]
    price_per_hour: float
    info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HardwareFinding:
    """How the backend treats one hardware field of the spec."""

    field: str
    status: Literal["ok", "unmet", "not_applicable", "unknown"]
    detail: str


@dataclass(frozen=True)
class Workspace:
    """A prepared checkout on a host: where runs start and what their environment adds.

    With data in the spec, ``env`` holds ``RATIOCINATOR_DATA_DIR`` as this machine's copy; a
    remote backend gives each run its host's copy instead, and ``staging_s`` says how many
    seconds each host spent receiving it.
    """

    checkout: Path
    env: dict[str, str]
    staging_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchRequest:
    run_id: int
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str]
    slot: Slot
    log_dir: Path
    out_dir: Path
    timeout_s: float | None = None  # the run's hard limit: enforced on the host even with nobody watching


class LaunchFailure(Exception):
    """The backend could not start a run; ``transient`` says whether trying again could help.

    A lost connection is transient (``infra``); a runner whose interpreter does not exist
    is not, and its class says why (``missing_dependency``).
    """

    def __init__(self, message: str, *, transient: bool, failure: str = "infra") -> None:
        super().__init__(message)
        self.transient = transient
        self.failure = failure


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None
    signal: int | None


Stream = Literal["stdout", "stderr"]


class RunHandle(abc.ABC):
    """A live process on a host."""

    pid: int | None = None
    pid_start: int | None = None
    workdir: Path | None = None  # where the run started, when not the workspace's checkout (its own copy)

    @abc.abstractmethod
    def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        """Raw chunks as they arrive, until both streams are closed."""

    @abc.abstractmethod
    async def wait(self) -> ExitInfo:
        """Wait for the process to exit (its output may still be draining)."""

    @abc.abstractmethod
    async def cancel(self, grace_s: float = 5.0) -> None:
        """Stop the process and everything it started: polite signal, then a kill."""

    @abc.abstractmethod
    async def reap_strays(self) -> None:
        """Kill what the process left running after it exited (children holding pipes)."""


class FollowedRunHandle(RunHandle):
    """A handle whose follower task (polling a remote host or node) queues output and settles the exit.

    Subclasses start their follower after `_start_following`; it puts ``(stream, chunk)``
    items on ``_chunks``, a ``None`` when output ends, and settles ``_exited``.
    """

    def _start_following(self) -> None:
        self._chunks: asyncio.Queue[tuple[Stream, bytes] | None] = asyncio.Queue()
        self._exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self._exited.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody waits

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        while (item := await self._chunks.get()) is not None:
            yield item
        self._chunks.put_nowait(None)  # a second reader ends too

    async def wait(self) -> ExitInfo:
        """The exit status once the output is drained and the artifacts are back; a lost host raises `LaunchFailure`."""
        return await asyncio.shield(self._exited)


class ElasticCapacity(abc.ABC):
    """Capacity that comes and goes while runs go on (rented instances): a capability, not part of
    every backend. The executor asks `Backend.elastic` for it; a fixed machine has none.

    Slots join when late instances are ready (`grown`), stop being usable when their instance is
    lost or given back (`slot_usable`), and come back on request (`replenish`). When ``idle_billed``,
    an idle slot costs money like a busy one, so the executor gives back the slots it has no work
    for (`release_slot`, `stop_arrivals`), weighing the wait for more work against `reacquire_s`.
    """

    #: An idle slot is billed: give back what has no work.
    idle_billed: bool = True

    @abc.abstractmethod
    def slot_usable(self, slot: Slot) -> bool:
        """Whether a run may still start in ``slot`` (False once its instance was lost or given back)."""

    @abc.abstractmethod
    def reacquire_s(self) -> float:
        """Billed seconds to get a given-back slot back (boot + setup), weighed against holding one idle."""

    @abc.abstractmethod
    async def release_slot(self, host: Host, slot: Slot) -> None:
        """No more work for ``slot``; an instance is destroyed once none of its slots has any."""

    @abc.abstractmethod
    async def replenish(self, host: Host, loaded: LoadedSpec, runs_left: int) -> Host:
        """The host with capacity again for ``runs_left`` queued runs (rented, prepared); raises
        `~ratiocinator.errors.BudgetError` when the budget cannot pay for it."""

    @abc.abstractmethod
    async def grown(self) -> Host:
        """Wait until more slots are ready (instances still booting when the runs began) and return
        the host with them."""

    @abc.abstractmethod
    def arriving(self) -> int:
        """Instances rented but not ready yet (booting, or being prepared)."""

    @abc.abstractmethod
    async def stop_arrivals(self, why: str) -> None:
        """No queued run will use what is still arriving: stop renting it and destroy what was rented."""


class InstanceDeadlines(abc.ABC):
    """Hosts that destroy themselves at a deadline (a capability of rented instances): before a run
    starts, its slot's deadline must outlast it."""

    @abc.abstractmethod
    async def secure(self, host: Host, slot: Slot, run_s: float) -> str | None:
        """Make sure ``slot`` stays paid for ``run_s`` more seconds; None when it does, else why the
        budget refuses."""


class Backend(abc.ABC):
    """What every backend does: build itself from the spec, check the hardware, acquire a host,
    prepare its workspace, launch runs, release, price and describe itself. Capabilities only
    some have are asked for (`elastic`, `deadlines`), never stubbed here."""

    name: str

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> Backend:
        """The backend the spec asks for, its settings read from the spec (see `registry`)."""

    @classmethod
    def price_per_hour(cls, loaded: LoadedSpec) -> float:
        """What one run is charged per hour (``plan``'s estimate and each run's reservation)."""
        return loaded.spec.hardware.price_per_hour

    def describe(self, loaded: LoadedSpec, findings: list[HardwareFinding]) -> list[str]:
        """Lines ``plan`` prints about where runs would go, from the hardware findings."""
        pairs = sorted({(f.status, f.detail) for f in findings})
        return [f"{self.name}: {status} — {detail}" for status, detail in pairs]

    def attach(self, budget: Budget) -> None:  # noqa: B027  # an optional hook: most backends spend only per run
        """Before `acquire`: the experiment this backend works for, through its budget (and ledger), for a
        backend that spends beyond per-run prices (rented instances: reserved and charged through it, and
        what a dead orchestrator left is destroyed)."""

    def elastic(self) -> ElasticCapacity | None:
        """Capacity that comes and goes, when this backend has it."""
        return None

    def deadlines(self) -> InstanceDeadlines | None:
        """Self-destruct deadlines on its hosts, when this backend has them."""
        return None

    @abc.abstractmethod
    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        """Every hardware field: satisfied, unmet, unknown, or not applicable here."""

    @abc.abstractmethod
    async def acquire(self, loaded: LoadedSpec) -> Host:
        """A host with slots sized by the spec's GPUs and concurrency."""

    @abc.abstractmethod
    async def prepare(
        self, host: Host, loaded: LoadedSpec, commit: str, *, on_output: Callable[[str], None] | None = None
    ) -> Workspace:
        """Clone at ``commit``, install deps, run ``deps.verify``."""

    @abc.abstractmethod
    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        """Start the runner process in the slot; never through a shell. Raises `LaunchFailure`."""

    @abc.abstractmethod
    async def release(self, host: Host) -> None:
        """Give the host back (for rented hosts: stop paying)."""

    @abc.abstractmethod
    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        """Kill a run left behind by a dead orchestrator; True if something was killed."""

    async def environments(self, host: Host, workspace: Workspace, loaded: LoadedSpec) -> list[dict[str, Any]]:
        """The runs' software environment on each machine that prepared ``workspace`` (interpreter, packages,
        GPU, host; see `ratiocinator.execution.environment`), read with the runs' own interpreter there. A
        machine's ``host`` key names it where ``host`` spans several; none where it cannot be read, and the
        paper says so."""
        return []

    def oom_kills(self, host: Host) -> int | None:
        """The host's kernel OOM-kill counter (compared before and after a run); None when unknown."""
        return None
