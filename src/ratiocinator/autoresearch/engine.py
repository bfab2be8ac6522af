"""Where an attempt's runs happen: the engine ``research`` uses, on the backend the program names.

The program's ``backend`` (local by default) and its settings (``hosts``, ``ray_address``,
``hardware``, ...) build the same `~ratiocinator.backends.base.Backend` a spec would, through
an engine spec made from the program (`engine_spec`). Each worker's runs go to its own slot.

* **Code.** Locally a run starts in its worker's worktree (its working copy at the attempt's
  commit, with the ``link`` paths). On an SSH host or a Ray node the attempt's commit ships as
  ``research`` ships code: a bundle of the commit, its Git LFS files, and a fresh working copy
  per run made there.
* **Contract.** The run command is the program author's shell line, so the runner is ``bash -c``
  around it (never a shell of ours: the line is an argument). Its environment is the run
  contract's allow-list plus the program's ``pass_env`` and the autoresearch variables; provider
  keys and tokens stay behind. The hard timeout is the backend's: a per-run deadline keeper
  kills the group even when the orchestrator is gone (``kill -9``).
* **Verdict.** The seed's rule decides ``ok`` or ``crash`` (timed out, killed, exited non-zero, or
  no finite metric); a crash also gets the engine's failure class with its evidence
  (`~ratiocinator.execution.failures.diagnose`). ``log_file``, which the command writes in its
  working copy, comes back with the run's artifacts (the wrapper copies it to
  ``$RATIOCINATOR_OUT_DIR`` on exit) and is parsed with the output.

The backends are asyncio; the loop's workers are threads. One event loop runs in a thread of
its own for the whole session, and each worker waits for its run there. Each worker has its own
backend instance (a *lane*: its connections, its host, the commit its workspace holds), since a
backend's workspace holds one commit at a time: workers ship and launch their commits side by
side, each into its own slot.

On rented GPUs (``backend: vast``) each lane rents one instance of the session's GPU model,
reused for every attempt, paid from the session's ``max_dollars`` and held through the agent's
turn while that is cheaper than renting again (see `ratiocinator.autoresearch.rented`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ratiocinator.autoresearch.processes import kill_orphan as kill_local_orphan
from ratiocinator.autoresearch.program import LoadedProgram, Metric
from ratiocinator.backends.base import Backend, ExitInfo, Host, LaunchFailure, LaunchRequest, RunHandle, Slot, Workspace
from ratiocinator.backends.registry import backend_price, make_backend
from ratiocinator.errors import BackendError, BudgetError
from ratiocinator.execution import contract
from ratiocinator.execution.failures import Failure, RunEvidence, diagnose, read_log
from ratiocinator.execution.metrics import LineSplitter, MetricSummary, make_parser
from ratiocinator.spec.models import LoadedSpec, Metrics, Spec
from ratiocinator.store.ledger import Ledger

if TYPE_CHECKING:  # the vast extra's modules load only for a program that rents
    from ratiocinator.autoresearch.rented import SessionAccount

T = TypeVar("T")

KILL_GRACE_S = 5.0
POLL_S = 0.05
LAUNCH_TRIES = 3  # a transient launch failure (a dropped connection) is tried again, then it is a crash
TAIL_LINES = 50
TAIL_CHARS = 8000
OUTPUT = "output.log"

# $1: log_file (relative to the working copy, or empty), $2: the program's run command.
WRAPPER = (
    'log="$1"; shift\n'
    'if [ -n "$log" ]; then\n'
    '  log="$PWD/$log"; rm -f -- "$log"\n'
    '  trap \'[ -e "$log" ] && cp -f -- "$log" "$RATIOCINATOR_OUT_DIR/" 2>/dev/null\' EXIT\n'
    'fi\n'
    'eval "$1"\n'
)


@dataclass(frozen=True)
class RunOutcome:
    """What one run produced.

    ``status`` is ok, crash, interrupted (the session stopped) or over_budget (never started);
    ``failure`` is the engine's class of a crash, with ``evidence`` (the diagnosis as JSON).
    """

    status: str
    metric: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    signal: int | None = None
    duration_s: float = 0.0
    log_tail: str = ""
    reason: str = ""
    failure: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    host: str = ""


@dataclass(frozen=True)
class RunRequest:
    """One run of an attempt's commit by one worker."""

    commit: str
    worker: int
    worktree: Path  # the worker's worktree, at ``commit`` (where a local run starts)
    env: dict[str, str]  # the attempt's own variables (RATIOCINATOR_BUDGET_S, ...)
    run_dir: Path  # output.log and out/ (the artifacts, log_file among them)
    run_id: int


def engine_spec(loaded: LoadedProgram) -> LoadedSpec:
    """The spec a backend reads, made from the program: its repository, backend settings, metric and limits.

    Built without validation: the program validated every field it takes, and ``runner_script``
    (which no backend reads) holds the run command for whoever prints the spec.
    """
    program = loaded.program
    hardware = program.hardware.model_copy(update={"price_per_hour": program.price_per_hour,
                                                   "num_gpus": 0 if program.backend == "local"
                                                   else program.gpus_per_worker})
    spec = Spec.model_construct(
        name=f"autoresearch-{program.tag}", topic=f"autoresearch {program.tag}", goal_metric=program.metric.name,
        maximize=program.metric.direction == "higher", repo_url=str(loaded.repo), runner_script=program.run,
        hardware=hardware, concurrency=program.workers, backend=program.backend, hosts=list(program.hosts),
        vast=program.vast, ray_address=program.ray_address, ray=program.ray, pass_env=list(program.pass_env),
        train_timeout_s=program.hard_timeout_s,
        metrics=Metrics(protocol=program.metric.protocol, json_prefix=program.metric.json_prefix,
                        patterns=dict(program.metric.patterns)))
    return LoadedSpec(spec=spec, path=loaded.path, text=loaded.text, sha256=loaded.sha256, lines=loaded.lines)


@dataclass
class _Lane:
    """One worker's backend and host, and the commit prepared there (prepare and launch hold the lock).

    ``busy``, ``idle_since`` and ``turns`` (its past idle gaps) say when a rented lane's instance
    is worth giving back between runs.
    """

    backend: Backend
    host: Host | None = None
    prepared: tuple[str, Workspace] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    busy: int = 0
    idle_since: float | None = None
    turns: list[float] = field(default_factory=list)


class Engine:
    """The session's backend, its host, and the runs on it (see the module docstring)."""

    def __init__(self, loaded: LoadedProgram, home: Path, environ: dict[str, str]) -> None:
        self.loaded = loaded
        self.program = loaded.program
        self.rented = self.program.backend == "vast"
        if self.rented:
            from ratiocinator.autoresearch import rented
            rented.check_program(loaded)
        self.spec = engine_spec(loaded)
        self.environ = environ
        self.home = Path(home)
        self._account: SessionAccount | None = None  # a rented session's, once `attach` names the session
        self._gpu_model: str | None = None  # every rented lane's
        self.backend: Backend = self._new_backend()  # worker 0's; it also kills orphans
        self.local = self.program.backend == "local"
        self._lanes: dict[int, _Lane] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        self.given_back = 0  # instances given back during the agent's turn (rented lanes)
        self.notes: list[str] = []  # what went wrong giving instances back mid-session

    def _new_backend(self) -> Backend:
        if not self.rented:
            return make_backend(self.spec, self.home)
        from ratiocinator.autoresearch import rented
        backend = rented.lane_backend(self.loaded, self.home, self.environ, gpu_model=self._gpu_model)
        if self._account is not None:
            backend.attach(self._account, reap_left=False)
        return backend

    @property
    def price_per_hour(self) -> float:
        """What a run is charged per hour, as the backend prices it (an SSH host's own price, say)."""
        return backend_price(self.spec)

    # -- the event loop's thread ---------------------------------------------------------------

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="autoresearch-engine", daemon=True)
            self._thread.start()
            self._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> list[str]:
        """Give the hosts back and stop the loop; returns what could not be given back (a rented instance
        that may still bill, with what to do), for the session to say."""
        self._closing = True
        problems = list(self.notes)
        if self._loop is None:
            self._close_account()
            return problems
        if self._watch is not None:
            self._submit(_cancelled(self._watch)).result(timeout=30)
            self._watch = None
        for lane in self._lanes.values():
            if lane.host is not None:
                host, lane.host = lane.host, None
                try:
                    self._submit(lane.backend.release(host)).result(timeout=120)
                except Exception as exc:  # noqa: BLE001 - closing must not hide the error that ended the session
                    hint = getattr(exc, "hint", None)
                    problems.append(f"giving the {lane.backend.name} host back failed: {exc}"
                                    + (f" ({hint})" if hint else ""))
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()
        self._loop = None
        self._close_account()
        return problems

    def _close_account(self) -> None:
        if self._account is not None:
            self._account.ledger.close()
            self._account = None

    def attach(self, session_id: int) -> list[str]:
        """Name the session whose money rented instances are (``backend: vast``; nothing otherwise).

        What a dead orchestrator of this session left rented is destroyed and paid first; returns
        a line for each such instance. Called before the session settles the reservations left open.
        """
        if not self.rented or self._account is not None:
            return []
        from ratiocinator.autoresearch.rented import SessionAccount
        from ratiocinator.backends.vast.backend import VastBackend
        from ratiocinator.store.paths import Paths

        self._account = SessionAccount(Ledger(Paths(self.home).ledger), session_id, self.program.max_dollars)
        assert isinstance(self.backend, VastBackend)
        self.backend.attach(self._account)
        return [f"instance {r.provider_id or '?'} left rented by the stopped orchestrator: {r.outcome}"
                + (f" ({r.detail})" if r.detail else "") for r in self.backend.reaped]

    # -- runs ----------------------------------------------------------------------------------

    def run(self, request: RunRequest, *, timeout_s: float, stop: threading.Event,
            on_start: Callable[[int | None, int | None, str], None] = lambda pid, start, host: None) -> RunOutcome:
        """Run the program's command once for ``request`` and judge it; blocks the calling worker thread.

        ``on_start(pid, pid_start, host)`` is called in the caller's thread once the run is live.
        """
        started: queue.Queue[tuple[int | None, int | None, str]] = queue.Queue()
        future = self._submit(self._run(request, timeout_s, stop, started))
        while True:
            try:
                outcome = future.result(timeout=POLL_S)
                break
            except concurrent.futures.TimeoutError:
                pass
            finally:
                while not started.empty():
                    on_start(*started.get_nowait())
        return outcome

    def start(self) -> None:
        """Acquire the host now (connect, size the slots), so a backend that cannot serve the workers is
        refused before the session records anything.

        Rented lanes rent nothing before the session names its account (`attach`): here the GPU
        model is chosen that ``workers`` instances can be rented of, or the session is refused.
        """
        if self.rented:
            from ratiocinator.backends.vast.backend import VastBackend
            assert isinstance(self.backend, VastBackend)
            self._gpu_model = self._submit(
                self.backend.choose_gpu_model(self.spec, self.program.workers)).result()
            return
        self._submit(self._acquired(0)).result()

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        """Kill a run a dead orchestrator left behind, wherever it ran."""
        if self.local:
            return kill_local_orphan(pid, pid_start)
        return self.backend.kill_orphan(pid, pid_start)

    async def _acquired(self, worker: int) -> tuple[_Lane, Host]:
        """The worker's lane with its host acquired (worker 0's backend is the one made first)."""
        lane = self._lanes.get(worker)
        if lane is None:
            lane = self._lanes[worker] = _Lane(self.backend if worker == 0 else self._new_backend())
        async with lane.lock:
            if self.rented and lane.host is not None and not self._usable(lane, lane.host):
                await self._give_back(lane, "its instance can take no more runs")
            if lane.host is None and self.rented:
                lane.host = await lane.backend.acquire(self.spec)  # one instance: this worker's
                lane.prepared = None
                if self._watch is None:
                    self._watch = asyncio.create_task(self._watch_idle())
            if lane.host is None:
                host = await lane.backend.acquire(self.spec)
                if len(host.slots) < self.program.workers:
                    await lane.backend.release(host)
                    raise BackendError(
                        f"workers: {self.program.workers} needs {self.program.workers} slots on the"
                        f" {self.backend.name} backend, which offers {len(host.slots)}",
                        hint=f"lower workers in {self.loaded.where('workers')}, or give the backend more slots")
                lane.host = host
            return lane, lane.host

    def _slot(self, host: Host, worker: int) -> Slot:
        if self.rented:  # the lane's own instance
            return host.slots[0]
        slot = host.slots[worker]
        per = self.program.gpus_per_worker
        if self.local and per:  # pinned by index, as the program says: this machine's GPUs are not probed
            return Slot(slot.index, tuple(range(worker * per, (worker + 1) * per)))
        return slot

    async def _workspace(self, lane: _Lane, host: Host, commit: str) -> Workspace:
        """The commit prepared on the host(s); the caller holds the lane's lock until its launch is done."""
        if lane.prepared is None or lane.prepared[0] != commit:
            lane.prepared = (commit, await lane.backend.prepare(host, self.spec, commit))
        return lane.prepared[1]

    async def _launch(self, lane: _Lane, host: Host, slot: Slot, request: RunRequest, out_dir: Path) -> RunHandle:
        async with lane.lock:
            if self.local:
                cwd, workspace_env = request.worktree, {contract.WORKSPACE: str(request.worktree)}
            else:
                workspace = await self._workspace(lane, host, request.commit)
                cwd, workspace_env = workspace.checkout, dict(workspace.env)
            env = {**contract.inherited_env(self.environ, self.program.pass_env), **workspace_env, **request.env,
                   contract.OUT_DIR: str(out_dir), contract.RUN_ID: str(request.run_id)}
            env.setdefault("PYTHONUNBUFFERED", "1")
            argv = ("bash", "-c", WRAPPER, "autoresearch-run", self.program.log_file or "", self.program.run)
            return await lane.backend.launch(host, LaunchRequest(
                run_id=request.run_id, argv=argv, cwd=cwd, env=env, slot=slot, log_dir=request.run_dir,
                out_dir=out_dir, timeout_s=self.program.hard_timeout_s))

    async def _run(self, request: RunRequest, timeout_s: float, stop: threading.Event,
                   started: queue.Queue[tuple[int | None, int | None, str]]) -> RunOutcome:
        try:
            lane, host = await self._acquired(request.worker)
        except BudgetError as exc:  # renting the worker's instance would overrun max_dollars: stop as the loop does
            return RunOutcome("over_budget", None, reason=exc.message)
        slot = self._slot(host, request.worker)
        out_dir = request.run_dir / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        if self.rented:
            refused = await self._secure(lane, host, slot)
            if refused is not None:
                return RunOutcome("over_budget", None, host=host.name, reason=refused)
        lane.busy += 1
        try:
            return await self._run_in(lane, host, slot, request, out_dir, began, timeout_s, stop, started)
        finally:
            lane.busy -= 1
            lane.idle_since = time.monotonic()

    async def _run_in(self, lane: _Lane, host: Host, slot: Slot, request: RunRequest, out_dir: Path, began: float,
                      timeout_s: float, stop: threading.Event,
                      started: queue.Queue[tuple[int | None, int | None, str]]) -> RunOutcome:
        if lane.idle_since is not None and lane.busy == 1:  # the agent's turn (or the wait for it) just ended
            lane.turns.append(time.monotonic() - lane.idle_since)
        for attempt in range(1, LAUNCH_TRIES + 1):
            try:
                handle = await self._launch(lane, host, slot, request, out_dir)
                break
            except LaunchFailure as exc:
                if exc.transient and attempt < LAUNCH_TRIES and not stop.is_set():
                    await asyncio.sleep(attempt)
                    continue
                (request.run_dir / OUTPUT).write_text(f"could not start the run: {exc}\n")
                return RunOutcome("crash", None, duration_s=time.monotonic() - began, host=host.name,
                                  reason=f"could not start the run: {exc}", failure=exc.failure,
                                  evidence={"class": exc.failure, "reason": str(exc), "evidence": [str(exc)[:300]],
                                            "detail": {}, "transient": exc.transient})
        started.put((handle.pid, handle.pid_start, host.name))
        ending, exit_info, lost = await self._follow(handle, request.run_dir / OUTPUT, timeout_s, stop)
        return self._judge(request, ending, exit_info, lost, time.monotonic() - began, timeout_s,
                           handle.workdir or request.worktree, host.name)

    # -- rented lanes --------------------------------------------------------------------------

    def _usable(self, lane: _Lane, host: Host) -> bool:
        elastic = lane.backend.elastic()
        return bool(host.slots) and (elastic is None or elastic.slot_usable(host.slots[0]))

    async def _secure(self, lane: _Lane, host: Host, slot: Slot) -> str | None:
        """Push the instance's self-destruct deadline past this run and the agent's turn after it."""
        from ratiocinator.autoresearch.rented import hold_s
        from ratiocinator.backends.vast.backend import VastBackend

        assert isinstance(lane.backend, VastBackend)
        async with lane.lock:
            return await lane.backend.secure(host, slot, self.program.hard_timeout_s + hold_s(lane.backend))

    async def _give_back(self, lane: _Lane, why: str) -> None:
        """Destroy the lane's instance (the caller holds the lane's lock); the next run rents another."""
        host, lane.host, lane.prepared = lane.host, None, None
        lane.idle_since = None
        if host is not None:
            await lane.backend.release(host)
            self.given_back += 1
            if self._account is not None:
                self._account.ledger.event(None, "ar_instance_given_back", f"session {self._account.session_id}:"
                                           f" gave an idle instance back: {why}")

    async def _watch_idle(self) -> None:
        """Give back each rented lane's instance once its agent's turn is expected to cost more than renting
        and preparing it again (`ratiocinator.autoresearch.rented.give_back`)."""
        from ratiocinator.autoresearch.rented import give_back, hold_s
        from ratiocinator.backends.vast.backend import VastBackend

        while not self._closing:
            await asyncio.sleep(1.0)
            for lane in list(self._lanes.values()):
                if lane.host is None or lane.busy or lane.idle_since is None or lane.lock.locked():
                    continue
                assert isinstance(lane.backend, VastBackend)
                idle = time.monotonic() - lane.idle_since
                reacquire = hold_s(lane.backend)
                if give_back(idle, lane.turns, reacquire, stopping=self._closing):
                    async with lane.lock:
                        if lane.host is not None and not lane.busy:
                            try:
                                await self._give_back(lane, f"idle {idle:.0f}s into the agent's turn, longer than"
                                                            f" renting it again takes ({reacquire:.0f}s)")
                            except BackendError as exc:  # its row stays live: the deadline and the reaper remain
                                self.notes.append(f"giving an idle instance back failed: {exc}")

    async def _follow(self, handle: RunHandle, output: Path, timeout_s: float,
                      stop: threading.Event) -> tuple[str, ExitInfo | None, LaunchFailure | None]:
        """Copy the output while waiting for the exit; at the timeout or a stop, kill the group.

        Returns how it ended ("exited", "timeout" or "interrupted"), the exit status, and the
        failure when the backend lost the run's host.
        """
        with open(output, "wb") as log:
            async def consume() -> None:
                async for _, chunk in handle.output():
                    log.write(chunk)
                    log.flush()

            consumer = asyncio.create_task(consume())
            waiter = asyncio.ensure_future(handle.wait())
            deadline = time.monotonic() + timeout_s
            ending = "exited"
            try:
                while not waiter.done():
                    await asyncio.wait({waiter}, timeout=POLL_S)
                    if waiter.done():
                        break
                    if stop.is_set():
                        ending = "interrupted"
                    elif time.monotonic() >= deadline:
                        ending = "timeout"
                    else:
                        continue
                    await handle.cancel(KILL_GRACE_S)
                    break
                try:
                    exit_info: ExitInfo | None = await waiter
                except LaunchFailure as exc:
                    await consumer
                    return ending, None, exc
                await handle.reap_strays()  # what the run left in its group must not hold a GPU into the next one
                await consumer
            except BaseException:
                consumer.cancel()
                waiter.cancel()
                raise
        return ending, exit_info, None

    def _judge(self, request: RunRequest, ending: str, exit_info: ExitInfo | None, lost: LaunchFailure | None,
               duration: float, timeout_s: float, workdir: Path, host: str) -> RunOutcome:
        metric = self.program.metric
        output = request.run_dir / OUTPUT
        log_copy = (request.run_dir / "out" / Path(self.program.log_file).name) if self.program.log_file else None
        files = [output, *([log_copy] if log_copy is not None else [])]
        metrics = _parse(files, metric)
        tail = _tail(files)
        code = exit_info.exit_code if exit_info else None
        sig = exit_info.signal if exit_info else None
        if ending == "interrupted":
            return RunOutcome("interrupted", None, metrics, code, sig, duration, tail,
                              "the session stopped during this run", host=host)
        if lost is not None:
            return RunOutcome("crash", None, metrics, code, sig, duration, tail, f"lost the run's host: {lost}",
                              failure=lost.failure, host=host,
                              evidence={"class": lost.failure, "reason": str(lost), "evidence": [str(lost)[:300]],
                                        "detail": {}, "transient": lost.transient})
        diagnosis = diagnose(RunEvidence(
            exit_code=code, signal=sig, timed_out=ending == "timeout", timeout_s=timeout_s, goal=metric.name,
            final=metrics, stdout=read_log(log_copy) if log_copy is not None else "", stderr=read_log(output),
            checkout=workdir))
        value = metrics.get(metric.name)
        if ending == "timeout":
            reason = f"killed at the {timeout_s:g} s hard timeout"
        elif sig is not None:
            reason = f"killed by signal {sig}"
        elif code:
            reason = f"exit code {code}"
        elif value is None:
            reason = f"no {metric.name} in the output"
        elif not math.isfinite(value):
            reason = f"{metric.name} is {value}"
        else:
            return RunOutcome("ok", value, metrics, code, sig, duration, tail, "", host=host)
        failure = diagnosis.failure or Failure.UNKNOWN
        return RunOutcome("crash", None, metrics, code, sig, duration, tail, reason, failure=failure.value,
                          evidence={**diagnosis.to_json(), "class": failure.value}, host=host)


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _parse(paths: list[Path], metric: Metric) -> dict[str, float]:
    """Final value of every metric in the files, later files winning (the seed greps run.log)."""
    summary = MetricSummary()
    for path in paths:
        if not path.is_file():
            continue
        parser = make_parser(metric.protocol, json_prefix=metric.json_prefix, patterns=metric.patterns or None)
        splitter = LineSplitter()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                for line in splitter.feed(chunk):
                    summary.add(parser.feed_line(line))
        for line in splitter.flush():
            summary.add(parser.feed_line(line))
    return dict(summary.final)


def _tail(paths: list[Path]) -> str:
    """The last lines of each non-empty output, labelled when there are two."""
    parts: list[tuple[str, str]] = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(fh.tell() - 64 * 1024, 0))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        lines = text.splitlines()[-TAIL_LINES:]
        if lines:
            parts.append((path.name, "\n".join(lines)[-TAIL_CHARS:]))
    if len(parts) == 1:
        return parts[0][1]
    return "\n".join(f"== {name} ==\n{text}" for name, text in parts)
