"""Runs planned runs on a backend's slots: budget, launch, stream, time out, record.

One asyncio task per live run. Output is written to the run's log files and parsed
into metric points while the process is alive; points reach the ledger in batches so a
runner printing a million lines costs little. Every run ends in exactly one terminal
ledger row (``succeeded``/``failed``, with its failure class and evidence), or
``interrupted`` when the orchestrator is stopped, in which case a resume re-runs it as a
new attempt. Transient failures are retried with backoff as new attempts; when the first
runs all fail with one deterministic class, nothing more is launched.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ratiocinator.backends.base import (
    Backend,
    ElasticCapacity,
    ExitInfo,
    Host,
    LaunchFailure,
    LaunchRequest,
    RunHandle,
    Slot,
    Stream,
    Workspace,
)
from ratiocinator.errors import BackendError, BudgetError, CredentialsError
from ratiocinator.execution import outcomes
from ratiocinator.execution.capacity import SlotPool, expected_wait_s, should_give_back
from ratiocinator.execution.contract import runner_environment
from ratiocinator.execution.failures import Diagnosis, Failure, LogExcerpt, RunEvidence, diagnose
from ratiocinator.execution.metrics import LineSplitter, MetricParser, MetricSummary, PointBatch, make_parser
from ratiocinator.execution.outcomes import RunOutcome
from ratiocinator.planning.plan import Plan, PlannedRun
from ratiocinator.spec.models import LoadedSpec
from ratiocinator.store.budget import Budget, run_cost
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.records import TERMINAL, RunStatus

POINT_BATCH = 5000
POINT_FLUSH_S = 1.0
# A chunk of output this small is logged and parsed on the event loop (well under a millisecond): handing
# it to a worker thread costs more than that. Bigger chunks (a flood, a megabyte line) go to a thread.
INLINE_CHUNK_BYTES = 16 * 1024
MONEY_REPORT_S = 0.25  # the display's spend is read from the ledger at most this often while runs come and go
SLOW_FILES_S = 0.002  # making a run's folders and logs took longer: a slow (network) file system
IDLE_CHECK_S = 15.0  # how often idle billed slots are weighed again while the last runs go on


@dataclass
class RunResult:
    run_id: int
    arm: str
    replicate: int
    status: str
    failure: str | None
    reason: str
    goal: float | None
    transient: bool = False


class ProgressSink:
    """What the executor tells the display; the default tells nobody."""

    def watch(self, ledger_path: Path, experiment_id: str) -> None:
        """The experiment is known: a display may read its standing from the ledger (read-only) from now on."""

    def run_started(self, run_id: int, arm: str, replicate: int, slot: Slot) -> None: ...

    def run_finished(self, result: RunResult) -> None: ...

    def money(self, spent: float, reserved: float) -> None: ...

    def message(self, text: str) -> None: ...


@dataclass
class ExecutionSummary:
    results: list[RunResult] = field(default_factory=list)
    not_launched: list[PlannedRun] = field(default_factory=list)
    budget_stop: str | None = None
    early_stop: str | None = None


class _Wake:
    """Queue token: a run ended for good, so the launch loop re-checks what is left; with ``error``,
    a run's task raised (the backend's credentials were refused, say) and the loop stops with it."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


WAKE = _Wake()
MAX_RETRY_BACKOFF_S = 300.0


@dataclass
class _Lease:
    """A slot lent to one run; it goes back once: when the run's outcome is safe on disk (see
    `Executor._hands_back_early`), or when the run's task ends."""

    slot: Slot
    returned: bool = False


class Executor:
    def __init__(
        self,
        *,
        ledger: Ledger,
        backend: Backend,
        host: Host,
        workspace: Workspace,
        loaded: LoadedSpec,
        plan: Plan,
        experiment_id: str,
        commit: str,
        arm_ids: dict[str, int],
        argv: tuple[str, ...],
        runs_dir: Path,
        budget: Budget,
        progress: ProgressSink | None = None,
        extra_env: dict[str, str] | None = None,
        base_env: dict[str, str] | None = None,
        last_iteration: bool = True,
    ) -> None:
        self.ledger = ledger
        self.backend = backend
        self.elastic = backend.elastic()  # rented capacity that comes and goes, or None
        self.deadlines = backend.deadlines()
        self.host = host
        self.workspace = workspace
        self.loaded = loaded
        self.spec = loaded.spec
        self.policy = loaded.spec.failure_policy
        self.plan = plan
        self.experiment_id = experiment_id
        self.commit = commit
        self.arm_ids = arm_ids
        self.argv = argv
        self.runs_dir = runs_dir
        self.budget = budget
        self.progress = progress or ProgressSink()
        self.extra_env = extra_env or {}
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.live: dict[int, bool] = {}  # run id -> another run shared the host while it was alive
        self.started_at: dict[int, float] = {}  # live run id -> when it started (for the idle-slot rule)
        self._workdirs: dict[int, Path] = {}  # live run id -> its working copy, when the backend made one
        self.last_iteration = last_iteration  # no later iteration will want the slots this one leaves idle
        self._giving_back: list[asyncio.Task[None]] = []
        self.transient_failures = ledger.transient_failures(experiment_id)
        # The experiment's first finished runs (transient failures aside), for the early stop.
        self.first_outcomes: list[str | None] = [
            r.failure for r in ledger.runs(experiment_id) if r.status in TERMINAL and not r.transient
        ][: self.policy.stop_after]
        self.early_stop: str | None = None
        self._money_reported = -math.inf
        self._slow_files = False  # making the last run's files took long: the next run's are made in a thread

    async def run(self, pending: list[PlannedRun]) -> ExecutionSummary:
        """Launch ``pending`` on free slots until done, the budget says stop, or failures say stop.

        A transiently failed run goes back into the queue after its backoff, as a new
        attempt; the loop ends when every run has ended for good. On a backend whose idle
        slots are billed, slots with no work left are given back (see `capacity`), and
        capacity is rented again when queued work finds none.
        """
        with _collector_spared():
            return await self._run(pending)

    async def _run(self, pending: list[PlannedRun]) -> ExecutionSummary:
        summary = ExecutionSummary()
        pool = SlotPool(s for s in self.host.slots if self._usable(s))
        work: asyncio.Queue[PlannedRun | _Wake] = asyncio.Queue()
        for queued in pending:
            work.put_nowait(queued)
        open_runs = len(pending)  # queued, live or waiting to retry
        live = 0
        launched: list[asyncio.Task[RunResult]] = []
        retries: dict[asyncio.Task[None], PlannedRun] = {}
        self._giving_back = []
        stopping = False

        def idle_check() -> None:
            self._give_back_idle(pool, queued=open_runs - live, stopping=stopping or bool(self.early_stop))

        def hand_back(lease: _Lease) -> None:
            nonlocal live
            if lease.returned:
                return
            lease.returned = True
            live -= 1
            if self._usable(lease.slot):
                pool.put(lease.slot)
            else:
                pool.drop(lease.slot)

        def ended(task: asyncio.Task[RunResult], planned: PlannedRun, lease: _Lease) -> None:
            nonlocal open_runs
            hand_back(lease)
            if task.cancelled():
                return
            if (error := task.exception()) is not None:
                work.put_nowait(_Wake(error))
                return
            result = task.result()
            if self._should_retry(result) and not (stopping or self.early_stop):
                retry = asyncio.create_task(self._retry_later(result, planned, work))
                retries[retry] = planned
                retry.add_done_callback(lambda t: retries.pop(t, None))
                return
            open_runs -= 1
            work.put_nowait(WAKE)
            idle_check()

        watchers: list[asyncio.Task[None]] = []
        if self.elastic is not None:
            watchers.append(asyncio.create_task(self._watch_growth(self.elastic, pool, idle_check)))
        if self._idle_billed:
            watchers.append(asyncio.create_task(self._watch_idle(idle_check)))
        topup: asyncio.Task[None] | None = None
        if self._idle_billed and pending and pool.usable:
            # Capacity given back earlier comes back while the slots still held start at once.
            topup = asyncio.create_task(self._top_up(pool, len(pending)))
            watchers.append(topup)
        try:
            while open_runs:
                planned = await work.get()
                if isinstance(planned, _Wake):
                    if planned.error is not None:
                        raise planned.error
                    if work.empty():  # the last queued run may have launched just before this wake
                        idle_check()
                    continue
                slot = await pool.take()
                stop: int | str | None = None  # a charge id to launch under, or why launching stops
                while slot is None and stop is None:  # every slot was lost or given back: rent again
                    if topup is not None and not topup.done():
                        await asyncio.shield(topup)  # what it rents may be enough
                    else:
                        try:
                            await self._replenish(pool, open_runs - live)
                        except BudgetError as exc:
                            stop = self._budget_stop(summary, exc.message)
                            break
                    slot = await pool.take()
                if stop is None:
                    assert slot is not None
                    stop = self.early_stop or self._reserve_or_stop(summary)
                if isinstance(stop, int) and self.deadlines is not None:
                    assert slot is not None
                    refused = await self.deadlines.secure(self.host, slot, self.spec.train_timeout_s)
                    if refused:
                        self.ledger.settle(stop, 0.0)
                        stop = self._budget_stop(summary, refused)
                if isinstance(stop, str):
                    stopping = True
                    if slot is not None:
                        pool.put(slot)
                    waiting = list(retries.values())
                    for retry in list(retries):
                        retry.cancel()
                    summary.not_launched = [planned, *waiting] + [p for p in _drain(work) if not isinstance(p, _Wake)]
                    if self.early_stop:
                        summary.early_stop = self.early_stop
                    idle_check()
                    break
                assert slot is not None
                lease = _Lease(slot)
                early = functools.partial(hand_back, lease) if self._hands_back_early else None
                task = asyncio.create_task(self._run_one(planned, slot, stop, early))
                live += 1
                task.add_done_callback(functools.partial(ended, planned=planned, lease=lease))
                launched.append(task)
                self._report_money()
                if work.empty():
                    idle_check()
            summary.results.extend(await asyncio.gather(*launched))
            await asyncio.gather(*self._giving_back)
            self._report_money(now=True)
        except BaseException:
            for unfinished in [*launched, *retries]:
                unfinished.cancel()
            await asyncio.gather(*launched, *retries, *self._giving_back, return_exceptions=True)
            raise
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)  # a cancelled rental destroys what it rented
        summary.results.sort(key=lambda r: r.run_id)
        return summary

    @property
    def _hands_back_early(self) -> bool:
        """Whether a finished run's slot may go to the next run before the ledger records it: where runs cost
        nothing and slots are not rented. Elsewhere the order of this run's settling and the next reservation
        would move the budget, and an early slot would reach the rented capacity's bookkeeping (idle slots,
        machines still booting) before the run it held had ended there; those runs are long anyway."""
        return self.host.price_per_hour == 0 and self.elastic is None and self.deadlines is None

    @property
    def _idle_billed(self) -> bool:
        return self.elastic is not None and self.elastic.idle_billed

    def _usable(self, slot: Slot) -> bool:
        return self.elastic is None or self.elastic.slot_usable(slot)

    async def _rent_back(self, pool: SlotPool, runs_left: int) -> None:
        """Capacity for ``runs_left`` runs (the backend rents and prepares it); `BudgetError` when money says no."""
        if self.elastic is None:  # a fixed host: what it has is all there is
            return
        self.host = await self.elastic.replenish(self.host, self.loaded, runs_left)
        added = pool.add(s for s in self.host.slots if self._usable(s))
        if added:
            message = f"capacity for {runs_left} queued run(s): {', '.join(s.label for s in added)}"
            self.ledger.event(self.experiment_id, "capacity", message, slots=[s.label for s in added])
            self.progress.message(message)

    async def _replenish(self, pool: SlotPool, runs_left: int) -> None:
        """`_rent_back` for queued runs that found no slot; `BackendError` when there is still none."""
        await self._rent_back(pool, runs_left)
        if not pool.usable:
            raise BackendError(f"the {self.backend.name} backend has no slot left to run {runs_left} queued run(s)",
                               hint="its instances were lost or could not be replaced; run the same command to resume")

    async def _top_up(self, pool: SlotPool, runs_left: int) -> None:
        """Rent back toward full capacity in the background; a refusal only means fewer slots."""
        try:
            await self._rent_back(pool, runs_left)
        except (BackendError, BudgetError) as exc:
            message = (f"could not rent capacity back ({exc.message.splitlines()[0]});"
                       f" going on with {len(pool.usable)} slot(s)")
            self.ledger.event(self.experiment_id, "capacity", message, level="warning")
            self.progress.message(message)

    async def _watch_growth(self, elastic: ElasticCapacity, pool: SlotPool, idle_check: Callable[[], None]) -> None:
        """Instances still booting when the runs began join the pool the moment they are ready."""
        while True:
            self.host = await elastic.grown()
            added = pool.add(s for s in self.host.slots if self._usable(s))
            if added:
                self.ledger.event(self.experiment_id, "capacity", f"ready: {', '.join(s.label for s in added)}",
                                  slots=[s.label for s in added])
                idle_check()  # arrived after the queue ran dry: nothing for it to do

    async def _watch_idle(self, check: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            check()

    def _give_back_idle(self, pool: SlotPool, *, queued: int, stopping: bool) -> None:
        """Free slots with no queued work left are given back when holding them costs more (see `capacity`).

        Capacity still arriving (booting, or rented back) is stopped on the same terms: it has no run to take.
        """
        elastic = self.elastic
        if elastic is None or not elastic.idle_billed:
            return
        arriving = elastic.arriving()
        if queued > 0 or not (pool.free or arriving):
            return
        durations = [d for r in self.ledger.runs(self.experiment_id)
                     if r.status in TERMINAL and (d := r.duration_s) is not None]
        wait = expected_wait_s(self.started_at.values(), durations, time.time(), self.spec.train_timeout_s)
        reacquire = elastic.reacquire_s()
        if not should_give_back(last_iteration=self.last_iteration, stopping=stopping, wait_s=wait,
                                reacquire_s=reacquire):
            return
        if stopping:
            why = "nothing more will be launched"
        elif self.last_iteration:
            why = "no work left in the experiment's last iteration"
        else:
            why = f"the iteration's last runs need ~{wait:.0f}s more, getting it back costs ~{reacquire:.0f}s"
        for slot in list(pool.free):
            pool.drop(slot)
            self.ledger.event(self.experiment_id, "slot_released", f"gave back {slot.label}: {why}",
                              slot=slot.label, expected_wait_s=wait, reacquire_s=reacquire)
            self._giving_back.append(asyncio.create_task(elastic.release_slot(self.host, slot)))
        if arriving:
            self._giving_back.append(asyncio.create_task(elastic.stop_arrivals(why)))

    def _reserve_or_stop(self, summary: ExecutionSummary) -> int | str:
        """A charge id for the next run, or why it may not launch."""
        charge = self.budget.reserve_run(self.host.price_per_hour, self.spec.train_timeout_s)
        if charge is not None:
            return charge
        spent, reserved = self.budget.spent_and_reserved()
        return self._budget_stop(summary, (
            f"budget: the next run could cost up to ${self.host.price_per_hour * self.spec.train_timeout_s / 3600:.4f}"
            f" and ${spent:.4f} spent + ${reserved:.4f} reserved of ${self.spec.max_dollars:.2f} leaves too little"
        ))

    def _budget_stop(self, summary: ExecutionSummary, why: str) -> str:
        summary.budget_stop = why
        self.ledger.event(self.experiment_id, "budget_stop", summary.budget_stop, level="warning")
        self.progress.message(summary.budget_stop)
        return summary.budget_stop

    def _should_retry(self, result: RunResult) -> bool:
        if not result.transient:
            return False
        key = (result.arm, result.replicate)
        self.transient_failures[key] = failures = self.transient_failures.get(key, 0) + 1
        return failures < self.policy.max_attempts

    async def _retry_later(self, result: RunResult, planned: PlannedRun,
                           work: asyncio.Queue[PlannedRun | _Wake]) -> None:
        failures = self.transient_failures[(result.arm, result.replicate)]
        delay = min(self.policy.retry_backoff_s * 2 ** (failures - 1), MAX_RETRY_BACKOFF_S)
        message = (f"run {result.run_id} ({result.arm} #{result.replicate}) failed transiently ({result.failure});"
                   f" attempt {failures + 1} of {self.policy.max_attempts} in {delay:g}s")
        self.ledger.event(self.experiment_id, "retry", message, run_id=result.run_id, failure=result.failure,
                          delay_s=delay)
        self.progress.message(message)
        await asyncio.sleep(delay)
        work.put_nowait(planned)

    def _note_outcome(self, result: RunResult) -> None:
        """The early stop: the experiment's first runs all failed with one deterministic class."""
        if result.transient or len(self.first_outcomes) >= self.policy.stop_after:
            return
        self.first_outcomes.append(result.failure)
        classes = set(self.first_outcomes)
        if len(self.first_outcomes) == self.policy.stop_after and len(classes) == 1 and None not in classes:
            failure = classes.pop()
            self.early_stop = (
                f"stopped early: the first {self.policy.stop_after} runs all failed with {failure}"
                f" (last: {result.reason[:200]}); fix the code and run again with --new"
            )
            self.ledger.event(self.experiment_id, "early_stop", self.early_stop, level="error", failure=failure)
            self.progress.message(self.early_stop)

    def _report_money(self, *, now: bool = False) -> None:
        """The spend for the display: read from the ledger at most every `MONEY_REPORT_S`, or ``now``."""
        moment = time.monotonic()
        if now or moment - self._money_reported >= MONEY_REPORT_S:
            self._money_reported = moment
            self.progress.money(*self.budget.spent_and_reserved())

    async def _open_run_dir(self, run_dir: Path, out_dir: Path) -> dict[str, BinaryIO]:
        """The run's folder, its out folder and its two logs: made here, where that takes a fraction of a
        millisecond (a worker thread's hand-off would cost more), or in a worker thread while making the last
        run's took longer than `SLOW_FILES_S` (a network file system), so launches overlap, not wait in turn."""
        if self._slow_files:
            logs, took = await asyncio.to_thread(_make_run_files, run_dir, out_dir)
        else:
            logs, took = _make_run_files(run_dir, out_dir)
        self._slow_files = took > SLOW_FILES_S
        return logs

    async def _run_one(self, planned: PlannedRun, slot: Slot, charge: int,
                       hand_back: Callable[[], None] | None = None) -> RunResult:
        """One run, from its ledger row to its recorded outcome. ``hand_back``, where given (see
        `_hands_back_early`), returns the slot early: once the outcome is decided and in the outcome journal, the
        next run starts while the ledger records this one (for a short run, the record takes about as long as
        the next launch)."""
        arm = self.plan.arm(planned.arm)
        run_id = self.ledger.start_run(
            experiment_id=self.experiment_id,
            arm_id=self.arm_ids[arm.name],
            replicate=planned.replicate,
            seed=planned.seed,
            host=self.host.name,
            slot=slot.label,
            commit_sha=self.commit,
            env=arm.env,
            argv=[*self.argv, *arm.args],
            run_root=self.runs_dir,
            charge_id=charge,
        )
        self.live[run_id] = bool(self.live)
        for other in self.live:
            if other != run_id and not self.live[other]:
                self.live[other] = True
        run_dir = self.runs_dir / str(run_id)
        out_dir = run_dir / "out"
        logs = await self._open_run_dir(run_dir, out_dir)
        env = runner_environment(
            self.base_env, self.workspace, arm.env,
            arm=arm.name, run_id=run_id, seed=planned.seed, seed_env=self.spec.seed_env,
            out_dir=out_dir, trial=False, extra=self.extra_env,
        )
        request = LaunchRequest(
            run_id=run_id, argv=(*self.argv, *arm.args), cwd=self.workspace.checkout, env=env,
            slot=slot, log_dir=run_dir, out_dir=out_dir, timeout_s=self.spec.train_timeout_s,
        )
        self.progress.run_started(run_id, arm.name, planned.replicate, slot)
        started = self.started_at[run_id] = time.time()
        oom_before = self.backend.oom_kills(self.host)
        parser = make_parser(self.spec.metrics.protocol, json_prefix=self.spec.metrics.json_prefix,
                             patterns=dict(self.spec.metrics.patterns))
        stream = _RunStream(self.ledger, run_id, logs, parser)
        handle: RunHandle | None = None
        try:
            try:
                handle = await self.backend.launch(self.host, request)
            except CredentialsError:  # handled below: the experiment stops
                raise
            except Exception as exc:  # the backend could not start the process at all
                cause = Diagnosis(
                    Failure(exc.failure) if isinstance(exc, LaunchFailure) else Failure.INFRA,
                    f"could not start the runner: {exc}", (str(exc)[:300],),
                    transient=exc.transient if isinstance(exc, LaunchFailure) else True,
                )
                return self._record(self._decide(planned, arm.name, run_id, charge, started, stream, None, False,
                                                 oom_before, cause))
            self.ledger.set_run_process(run_id, handle.pid or 0, handle.pid_start)
            if handle.workdir is not None:  # its own working copy: tracebacks point there
                self._workdirs[run_id] = handle.workdir
            try:
                exit_info, timed_out = await self._supervise(handle, stream)
            except LaunchFailure as exc:  # the backend lost the run's host mid-run
                lost = Diagnosis(Failure(exc.failure), f"lost the run's host: {exc}", (str(exc)[:300],),
                                 transient=exc.transient)
                return self._record(self._decide(planned, arm.name, run_id, charge, started, stream, None, False,
                                                 oom_before, lost))
            decided = self._decide(planned, arm.name, run_id, charge, started, stream, exit_info, timed_out, oom_before)
        except asyncio.CancelledError:
            if handle is not None:
                await asyncio.shield(handle.cancel(grace_s=2.0))
            self._interrupted(run_id, charge, stream, started, "the orchestrator was interrupted")
            raise
        except CredentialsError as exc:  # nothing more can be rented, checked or destroyed: the experiment stops
            if handle is not None:
                await asyncio.shield(handle.cancel(grace_s=2.0))
            self._interrupted(run_id, charge, stream, started, f"stopped: {exc.message}")
            raise
        if hand_back is not None:
            hand_back()
            try:
                # Two turns of the loop: the launch loop takes the slot and reserves, then the next run's task
                # starts its process; only then is this run's record written.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                self._record(decided)  # it finished: an interruption now must not turn it into a rerun
                raise
        return self._record(decided)

    def _interrupted(self, run_id: int, charge: int, stream: _RunStream, started: float, reason: str) -> None:
        """The run ends unfinished (a resume runs it again as a new attempt)."""
        stream.close()
        leftover = stream.drain()
        elapsed = time.time() - started
        self.live.pop(run_id, None)
        self.started_at.pop(run_id, None)
        self.ledger.finish_run(
            run_id, status=RunStatus.INTERRUPTED, failure=None, reason=reason,
            exit_code=None, signal=None, final=stream.summary.final, counts=stream.summary.counts,
            cost=run_cost(self.host.price_per_hour, elapsed, self.spec.train_timeout_s),
            points=leftover, settle_charge=charge,
        )

    async def _supervise(self, handle: RunHandle, stream: _RunStream) -> tuple[ExitInfo, bool]:
        """Stream output while waiting for exit; kill the whole group at the timeout."""
        consumer = asyncio.create_task(stream.consume(handle))
        timed_out = False
        try:
            exit_info = await asyncio.wait_for(asyncio.shield(handle.wait()), self.spec.train_timeout_s)
        except TimeoutError:
            timed_out = True
            await handle.cancel()
            exit_info = await handle.wait()
        except asyncio.CancelledError:
            consumer.cancel()
            raise
        except LaunchFailure:  # the host is gone: its output() has ended too
            await consumer
            raise
        # The runner is gone; whatever it left behind must not outlive it (nor hold its pipes open).
        await handle.reap_strays()
        await consumer
        return exit_info, timed_out

    def _decide(
        self,
        planned: PlannedRun,
        arm: str,
        run_id: int,
        charge: int,
        started: float,
        stream: _RunStream,
        exit_info: ExitInfo | None,
        timed_out: bool,
        oom_before: int | None,
        diagnosis: Diagnosis | None = None,
    ) -> _Decided:
        """The run's outcome, diagnosed, kept in the experiment's outcome journal (from there a resume records
        it should the orchestrator die before the ledger does) and counted for the early stop; not yet in the
        ledger."""
        stream.close()
        leftover = stream.drain()
        ended = time.time()
        goal = self.spec.goal_metric
        final = stream.summary.final
        shared = self.live.pop(run_id, False)
        self.started_at.pop(run_id, None)
        if diagnosis is None:
            assert exit_info is not None
            # Only a SIGKILL is ever put down to the OOM killer: other endings need no second reading.
            oom_after = self.backend.oom_kills(self.host) if exit_info.signal == signal.SIGKILL else oom_before
            diagnosis = diagnose(RunEvidence(
                exit_code=exit_info.exit_code, signal=exit_info.signal, timed_out=timed_out,
                timeout_s=self.spec.train_timeout_s, goal=goal, final=final,
                stdout=stream.excerpts["stdout"].text(), stderr=stream.excerpts["stderr"].text(),
                checkout=self._workdirs.pop(run_id, self.workspace.checkout), shared_host=shared,
                oom_kills=(oom_after - oom_before) if oom_before is not None and oom_after is not None else 0,
                malformed_metric_lines=stream.parser.problem_count, dropped_metric_names=stream.parser.dropped_names,
            ))
        failure = diagnosis.failure.value if diagnosis.failure else None
        status = RunStatus.FAILED if failure else RunStatus.SUCCEEDED
        cost = run_cost(self.host.price_per_hour, ended - started, self.spec.train_timeout_s)
        outcome = RunOutcome(
            status=status, failure=failure, reason=diagnosis.reason,
            exit_code=exit_info.exit_code if exit_info else None, signal=exit_info.signal if exit_info else None,
            final=dict(final), counts=dict(stream.summary.counts), cost=cost, ended_at=ended, charge=charge,
            evidence=diagnosis.to_json() if failure else {}, transient=diagnosis.transient,
        )
        outcomes.keep(self.runs_dir, run_id, outcome)  # survives a ledger write the disk refuses (see `reconcile`)
        value = final.get(goal)
        result = RunResult(run_id, arm, planned.replicate, status, failure, diagnosis.reason,
                           value if value is not None and math.isfinite(value) and not failure else None,
                           diagnosis.transient)
        self._note_outcome(result)
        return _Decided(result, outcome, leftover)

    def _record(self, decided: _Decided) -> RunResult:
        """The decided outcome into the ledger (its points, its charge settled), then the progress line."""
        result, outcome = decided.result, decided.outcome
        self.ledger.finish_run(result.run_id, points=decided.points, settle_charge=outcome.charge,
                               **outcome.ledger_fields())
        self.progress.run_finished(result)
        self._report_money()
        return result


@dataclass(frozen=True)
class _Decided:
    """A finished run's outcome, decided and on disk, waiting for its ledger record."""

    result: RunResult
    outcome: RunOutcome
    points: PointBatch


@contextmanager
def _collector_spared() -> Iterator[None]:
    """While runs run, the garbage collector's full passes leave out what existed before them (the CLI, the spec,
    the plan, every imported library: tens of thousands of objects). Each full pass would walk all of it, about
    25 ms on the loop that starts the next run, for cycles that only the runs' own objects can form. Afterwards
    everything is collected as before, unless the caller had frozen objects of its own: they stay frozen."""
    caller_froze = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not caller_froze:
            gc.unfreeze()


def _drain(queue: asyncio.Queue[PlannedRun | _Wake]) -> list[PlannedRun | _Wake]:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _make_run_files(run_dir: Path, out_dir: Path) -> tuple[dict[str, BinaryIO], float]:
    """The run's folders and open logs, and how long making them took (seconds)."""
    started = time.perf_counter()
    try:
        os.mkdir(run_dir)
    except FileExistsError:
        pass
    except FileNotFoundError:  # the experiment's first run: its runs folder too
        run_dir.mkdir(parents=True, exist_ok=True)
    os.mkdir(out_dir)
    logs: dict[str, BinaryIO] = {name: open(run_dir / f"{name}.log", "wb") for name in ("stdout", "stderr")}
    return logs, time.perf_counter() - started


class _RunStream:
    """Per-run sink: log files, line splitting, metric parsing, batched ledger writes."""

    def __init__(self, ledger: Ledger, run_id: int, logs: dict[str, BinaryIO], parser: MetricParser) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.parser = parser
        self.summary = MetricSummary()
        self.splitters: dict[Stream, LineSplitter] = {"stdout": LineSplitter(), "stderr": LineSplitter()}
        self.excerpts: dict[Stream, LogExcerpt] = {"stdout": LogExcerpt(), "stderr": LogExcerpt()}  # for diagnosis
        self.logs = logs
        self.pending = PointBatch()
        self.last_flush = time.monotonic()
        self._ticker: asyncio.TimerHandle | None = None

    async def consume(self, handle: RunHandle) -> None:
        """Log, split and parse each chunk; a big one in a worker thread, so no output (a megabyte line, a
        flood) holds the event loop that enforces timeouts and signals. Points reach the ledger from the loop."""
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(POINT_FLUSH_S, self._flush_if_quiet, loop)
        try:
            async for name, chunk in handle.output():
                if len(chunk) <= INLINE_CHUNK_BYTES:
                    self._take(self._ingest(name, chunk))
                else:
                    self._take(await asyncio.to_thread(self._ingest, name, chunk))
            for splitter in self.splitters.values():
                for line in splitter.flush():
                    self._take(self.parser.feed_block(line + "\n"))
        finally:
            if self._ticker is not None:
                self._ticker.cancel()

    def _ingest(self, name: Stream, chunk: bytes) -> PointBatch:
        """The chunk into its log (and the excerpt diagnosis reads), its lines into points."""
        log = self.logs[name]
        log.write(chunk)
        log.flush()
        self.excerpts[name].add(chunk)
        return self.parser.feed_block(self.splitters[name].feed_block(chunk))

    def _take(self, points: PointBatch) -> None:
        if not self.pending:
            self.pending = points
        elif points:
            self.pending.extend(points)
        if self.pending and (len(self.pending) >= POINT_BATCH or time.monotonic() - self.last_flush > POINT_FLUSH_S):
            self._flush_points()

    def _flush_if_quiet(self, loop: asyncio.AbstractEventLoop) -> None:
        """A run that prints a metric and then works silently for an hour still shows it within a second.
        A timer, not a task: a run of a few milliseconds would pay more for a task than for its output."""
        self._ticker = loop.call_later(POINT_FLUSH_S, self._flush_if_quiet, loop)
        if self.pending and time.monotonic() - self.last_flush >= POINT_FLUSH_S:
            self._flush_points()

    def _flush_points(self) -> None:
        """Mid-run: points reach the ledger while the run is alive (a crash keeps them)."""
        points = self.drain()
        if points:
            self.ledger.add_points(self.run_id, points)
        self.last_flush = time.monotonic()

    def drain(self) -> PointBatch:
        """Points not yet in the ledger, counted into the summary; the caller records them."""
        points, self.pending = self.pending, PointBatch()
        if points:
            self.summary.add_batch(points)
        return points

    def close(self) -> None:
        for log in self.logs.values():
            if not log.closed:
                log.close()
