"""The executor in-process over the in-memory backend: launch, stream, retry, stop, time out, cancel.

The runs are scripted (`memory_backend`), everything else is real: the SQLite ledger, the
budget's reservations, the failure classifier, the plan from a real spec over a real git
repository. Each test takes well under a second.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Study
from memory_backend import Launch, MemoryBackend, Script, metrics
from ratiocinator.backends.base import LaunchFailure, Workspace
from ratiocinator.execution import executor as executor_module
from ratiocinator.execution import outcomes
from ratiocinator.execution.executor import ExecutionSummary, Executor
from ratiocinator.planning.plan import Plan, PlannedRun, plan_iteration
from ratiocinator.spec.models import LoadedSpec, load_spec
from ratiocinator.store.budget import Budget
from ratiocinator.store.ledger import Ledger

RUNNER = """
#!/usr/bin/env bash
echo "METRICS: {\\"score\\": ${K:-0}}"
"""
TERMINAL = {"succeeded", "failed", "interrupted"}
TRACEBACK = ["Traceback (most recent call last):", '  File "train.py", line 1, in <module>',
             "    import torch", "ModuleNotFoundError: No module named 'torch'"]


@dataclass
class Rig:
    """One experiment in a real ledger, planned from a real spec, ready for an `Executor`."""

    study: Study
    loaded: LoadedSpec
    ledger: Ledger
    plan: Plan
    backend: MemoryBackend
    experiment_id: str = "exp"

    async def start(self) -> tuple[Executor, list[PlannedRun]]:
        host = await self.backend.acquire(self.loaded)
        executor = Executor(
            ledger=self.ledger, backend=self.backend, host=host,
            workspace=Workspace(checkout=self.study.repo.path, env={"FROM_WORKSPACE": "1"}),
            loaded=self.loaded, plan=self.plan, experiment_id=self.experiment_id, commit=self.study.repo.head(),
            arm_ids={a.name: a.id for a in self.ledger.arms(self.experiment_id)}, argv=("./run.sh",),
            runs_dir=self.study.home / "runs" / self.experiment_id,
            budget=Budget(self.ledger, self.experiment_id, self.loaded.spec.max_dollars), base_env={"PATH": "/usr/bin"},
        )
        return executor, self.plan.runs()

    def run(self) -> ExecutionSummary:
        async def go() -> ExecutionSummary:
            executor, pending = await self.start()
            return await executor.run(pending)

        return asyncio.run(go())

    def runs(self) -> list:
        return self.ledger.runs(self.experiment_id)

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.ledger.events(self.experiment_id) if e["kind"] == kind]

    def check_books(self) -> None:
        """Every run row is terminal and every reservation settled; what was spent is what the runs cost."""
        runs = self.runs()
        assert {r.status for r in runs} <= TERMINAL, Counter(r.status for r in runs)
        assert self.ledger.open_charges(self.experiment_id) == []
        spent, reserved = self.ledger.money(self.experiment_id)
        assert reserved == 0
        assert spent == pytest.approx(sum(r.cost or 0.0 for r in runs))
        assert not self.backend.live and self.backend.slot_clashes == []


@pytest.fixture
def rig(study: Study):
    made: list[Rig] = []

    def make(backend: MemoryBackend, **spec_fields: object) -> Rig:
        study.commit({"run.sh": RUNNER})
        loaded = load_spec(study.spec(**spec_fields))
        ledger = study.ledger()
        plan = plan_iteration(loaded)
        ledger.create_experiment(id="exp", name=loaded.name, spec_path=str(loaded.path), spec_text=loaded.text,
                                 spec_sha256=loaded.sha256, backend=backend.name)
        ledger.record_arms("exp", 1, plan.arms, plan.baseline)
        made.append(Rig(study, loaded, ledger, plan, backend))
        return made[-1]

    yield make
    for r in made:
        r.ledger.close()


def test_the_collector_leaves_out_what_existed_before_the_runs_only_while_they_run(rig) -> None:
    """What existed before the runs (the CLI, every library) is left out of full collections while runs run,
    and collected as before afterwards: a Python caller's process is left as it was."""
    frozen: list[int] = []

    def script(launch: Launch) -> Script:
        frozen.append(gc.get_freeze_count())
        return Script(stdout=[metrics(score=1.0)])

    r = rig(MemoryBackend(script), factors={"K": [1, 2]})
    gc.unfreeze()  # as in a caller that never froze anything
    r.run()
    assert len(frozen) == 2 and min(frozen) > 1000 and gc.get_freeze_count() == 0


def _steps(launch: Launch) -> Script:
    k = int(launch.env["K"])
    return Script(stdout=[metrics(step=1, loss=1.0), metrics(step=2, loss=0.5), metrics(score=k * 10 + launch.seed)],
                  stderr=["some stderr chatter"], seconds=0.04)


def test_every_run_ends_in_one_terminal_row_with_its_metrics_and_cost(rig) -> None:
    r = rig(MemoryBackend(_steps), factors={"K": [1, 2, 3]}, replicates=2, concurrency=2,
            hardware={"price_per_hour": 36.0}, max_dollars=100)
    summary = r.run()
    assert summary.budget_stop is None and summary.early_stop is None and summary.not_launched == []
    assert [(x.arm, x.replicate, x.status, x.goal) for x in summary.results] == [
        (arm, rep, "succeeded", k * 10 + rep) for rep in (0, 1) for k, arm in ((1, "K=1"), (2, "K=2"), (3, "K=3"))]
    runs = r.runs()
    expected = Counter({(f"K={k}", rep): 1 for k in (1, 2, 3) for rep in (0, 1)})
    assert Counter((x.arm, x.replicate) for x in runs) == expected
    finals = r.ledger.run_metrics("exp")
    for run in runs:
        assert run.status == "succeeded" and run.attempt == 1 and run.failure is None and run.exit_code == 0
        assert run.commit_sha == r.study.repo.head() and run.host == "memory"
        assert [(step, value) for _, step, value in r.ledger.points(run.id, "loss")] == [(1, 1.0), (2, 0.5)]
        assert finals[run.id]["score"] == (int(run.arm[2:]) * 10 + run.replicate, True)
        assert finals[run.id]["loss"] == (0.5, True)
        assert "some stderr chatter" in Path(run.log_dir, "stderr.log").read_text()
        assert Path(run.log_dir, "stdout.log").read_text().count("METRICS: ") == 3
        # price $36/h: a run's cost is its wall time at $0.01/s (it lived its scripted 0.04 s at least),
        # settled within its $0.30 reservation
        assert 0.04 * 0.01 <= run.cost <= run.duration_s * 0.01 + 1e-9 and run.cost <= 36.0 * 30 / 3600
    # the runner's environment: the workspace's, the arm's knobs and the run's identity
    by_run = {launch.request.run_id: launch for launch in r.backend.launches}
    for run in runs:
        env = by_run[run.id].env
        assert env["RATIOCINATOR_RUN_ID"] == str(run.id) and env["RATIOCINATOR_ARM"] == run.arm
        assert env["RATIOCINATOR_OUT_DIR"] == run.out_dir and env["K"] == run.arm[2:]
        assert env["FROM_WORKSPACE"] == "1" and env["RATIOCINATOR_TRIAL"] == "0"
        assert Path(run.out_dir).is_dir()
    r.check_books()


def test_run_files_are_made_in_a_worker_thread_while_making_them_is_slow(
        rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    made_on: list[bool] = []  # per run: whether its files were made on the event loop's thread
    real = executor_module._make_run_files

    def slow_then_fast(run_dir: Path, out_dir: Path):  # type: ignore[no-untyped-def]
        made_on.append(threading.current_thread() is threading.main_thread())
        logs, _ = real(run_dir, out_dir)
        return logs, 0.05 if len(made_on) <= 2 else 0.0  # a network file system for the first two runs

    monkeypatch.setattr(executor_module, "_make_run_files", slow_then_fast)
    r = rig(MemoryBackend(_steps), factors={"K": [1, 2, 3, 4, 5]}, concurrency=1)
    summary = r.run()
    assert [x.status for x in summary.results] == ["succeeded"] * 5
    # the first run's files on the loop (slow: the next in a thread), the second's in a thread (slow again),
    # the third's in a thread (fast: the fourth back on the loop)
    assert made_on == [True, False, False, True, True]
    r.check_books()


def test_metric_points_reach_the_ledger_while_the_run_is_alive(rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_module, "POINT_FLUSH_S", 0.05)
    r = rig(MemoryBackend(Script(stdout=[metrics(step=1, loss=3.0), metrics(score=1)], seconds=0.9)))

    async def go() -> tuple[ExecutionSummary, list, str]:
        executor, pending = await r.start()
        task = asyncio.create_task(executor.run(pending))
        await r.backend.until(lambda: bool(r.runs()) and bool(r.ledger.points(r.runs()[0].id, "loss")))
        live = (r.ledger.points(r.runs()[0].id, "loss"), r.runs()[0].status)
        assert r.backend.live  # the runner is still going
        return await task, *live

    summary, points, status_then = asyncio.run(go())
    assert status_then == "running" and [(step, v) for _, step, v in points] == [(1, 3.0)]
    assert summary.results[0].status == "succeeded" and summary.results[0].goal == 1
    assert [(step, v) for _, step, v in r.ledger.points(r.runs()[0].id, "loss")] == [(1, 3.0)]  # not written twice
    r.check_books()


def test_transient_failures_are_retried_as_new_attempts_up_to_max_attempts(rig) -> None:
    def script(launch: Launch) -> Script:
        if launch.arm == "flaky" and launch.attempt < 3:
            return Script(launch_error=LaunchFailure("connection reset by peer", transient=True))
        if launch.arm == "lost":
            return Script(stdout=[metrics(step=1, loss=2.0)], lost=LaunchFailure("the host vanished", transient=True))
        if launch.arm == "broken":
            return Script(stderr=TRACEBACK, exit_code=1)
        return Script(stdout=[metrics(score=5)])

    r = rig(MemoryBackend(script), arms=[{"name": m, "env": {"MODE": m}} for m in ("flaky", "lost", "broken")],
            concurrency=3,
            failure_policy={"max_attempts": 3, "retry_backoff_s": 0})
    summary = r.run()
    rows = {arm: [(x.attempt, x.status, x.failure, x.transient) for x in r.runs() if x.arm == arm]
            for arm in ("flaky", "lost", "broken")}
    assert rows["flaky"] == [(1, "failed", "infra", True), (2, "failed", "infra", True), (3, "succeeded", None, False)]
    assert rows["lost"] == [(n, "failed", "infra", True) for n in (1, 2, 3)]  # out of attempts: no 4th
    assert rows["broken"] == [(1, "failed", "missing_dependency", False)]  # deterministic: never retried
    assert Counter(x.arm for x in r.backend.launches) == Counter({"flaky": 3, "lost": 3, "broken": 1})
    lost = [x for x in r.runs() if x.arm == "lost"]
    assert all("lost the run's host" in x.reason and "the host vanished" in x.reason for x in lost)
    assert [v for _, _, v in r.ledger.points(lost[0].id, "loss")] == [2.0]  # output before the loss is kept
    assert "connection reset by peer" in r.runs()[0].reason
    assert len(r.events("retry")) == 4
    assert r.ledger.terminal_replicates("exp", 3) == {("flaky", 0), ("lost", 0), ("broken", 0)}
    assert r.ledger.transient_failures("exp") == {("flaky", 0): 2, ("lost", 0): 3}
    assert len(summary.results) == 7 and summary.early_stop is None
    r.check_books()


def test_the_first_runs_failing_alike_stop_the_experiment_early(rig) -> None:
    r = rig(MemoryBackend(Script(stderr=TRACEBACK, exit_code=1)), factors={"K": [1, 2, 3, 4, 5]}, concurrency=1,
            failure_policy={"stop_after": 2})
    summary = r.run()
    assert summary.early_stop is not None
    assert "the first 2 runs all failed with missing_dependency" in summary.early_stop
    assert [p.arm for p in summary.not_launched] == ["K=3", "K=4", "K=5"]
    assert [(x.arm, x.status, x.failure) for x in r.runs()] == [("K=1", "failed", "missing_dependency"),
                                                               ("K=2", "failed", "missing_dependency")]
    assert len(r.backend.launches) == 2
    assert [e["data"]["failure"] for e in r.events("early_stop")] == ["missing_dependency"]
    r.check_books()


def test_first_runs_failing_differently_do_not_stop_early(rig) -> None:
    def script(launch: Launch) -> Script:
        if launch.arm == "K=1":
            return Script(stderr=TRACEBACK, exit_code=1)
        if launch.arm == "K=2":
            return Script(stdout=["done"])  # exits 0 without the goal metric
        return Script(stdout=[metrics(score=int(launch.env["K"]))])

    r = rig(MemoryBackend(script), factors={"K": [1, 2, 3, 4]}, concurrency=1, failure_policy={"stop_after": 2})
    summary = r.run()
    assert summary.early_stop is None and summary.not_launched == [] and not r.events("early_stop")
    assert [(x.arm, x.failure) for x in r.runs()] == [("K=1", "missing_dependency"), ("K=2", "no_metrics"),
                                                      ("K=3", None), ("K=4", None)]
    r.check_books()


def test_the_timeout_kills_the_run_and_classifies_it(rig) -> None:
    r = rig(MemoryBackend(Script(stdout=[metrics(step=1, loss=1.0)], seconds=30)), train_timeout_s=0.3,
            hardware={"price_per_hour": 3600.0}, max_dollars=10)
    started = time.monotonic()
    summary = r.run()
    assert time.monotonic() - started < 3
    (run,) = r.runs()
    assert run.status == "failed" and run.failure == "timeout" and not run.transient
    assert "killed after the 0.3s train_timeout_s" in run.reason
    assert run.exit_code is None and run.signal == 15
    assert r.backend.handles[run.id].cancelled
    assert summary.results[0].failure == "timeout"
    assert 0 < run.cost <= 0.3 + 1e-9  # $1/s, never above the timeout's worth
    r.check_books()


def test_budget_refusal_stops_launching_and_leaves_no_reservation_open(rig) -> None:
    # $1/s and a 1 s timeout: each run reserves $1; $2.50 holds two reservations, not a third
    r = rig(MemoryBackend(lambda launch: Script(stdout=[metrics(score=int(launch.env["K"]))], seconds=0.2)),
            factors={"K": [1, 2, 3, 4, 5, 6]}, concurrency=3, train_timeout_s=1,
            hardware={"price_per_hour": 3600.0}, max_dollars=2.5)
    summary = r.run()
    assert summary.budget_stop is not None
    assert summary.budget_stop.startswith("budget: the next run could cost up to $1.0000")
    assert [p.arm for p in summary.not_launched] == ["K=3", "K=4", "K=5", "K=6"]
    assert [(x.arm, x.status) for x in r.runs()] == [("K=1", "succeeded"), ("K=2", "succeeded")]
    assert len(r.backend.launches) == 2 and r.backend.peak_live == 2  # a third slot stayed free
    assert len(r.events("budget_stop")) == 1
    spent, _ = r.ledger.money("exp")
    assert 0 < spent <= 2.5
    r.check_books()


def test_a_backend_that_cannot_keep_a_slot_paid_stops_launching(rig) -> None:
    r = rig(MemoryBackend(Script(stdout=[metrics(score=1)]), refuse_secure_after=2), factors={"K": [1, 2, 3, 4]},
            concurrency=1, hardware={"price_per_hour": 3600.0}, max_dollars=1000)
    summary = r.run()
    assert summary.budget_stop == "the budget cannot keep slot0 paid for 30s more"
    assert [x.arm for x in r.runs()] == ["K=1", "K=2"] and [p.arm for p in summary.not_launched] == ["K=3", "K=4"]
    charges = r.ledger.db.execute(
        "SELECT state, settled FROM charges WHERE experiment_id = 'exp' ORDER BY id").fetchall()
    assert [c["state"] for c in charges] == ["settled"] * 3 and charges[-1]["settled"] == 0.0  # the refused one costs 0
    r.check_books()


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_never_more_live_runs_than_slots(rig, concurrency: int) -> None:
    r = rig(MemoryBackend(lambda launch: Script(stdout=[metrics(score=int(launch.env["K"]))], seconds=0.03)),
            factors={"K": list(range(1, 9))}, concurrency=concurrency)
    summary = r.run()
    assert [x.status for x in summary.results] == ["succeeded"] * 8
    assert r.backend.peak_live == concurrency and r.backend.slot_clashes == []
    assert {x.slot for x in r.runs()} == {f"slot{i}" for i in range(concurrency)}
    # the ledger's own timeline agrees: at no instant more live rows than slots
    spans = [(x.started_at, x.ended_at) for x in r.runs()]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) <= concurrency
    r.check_books()


def test_cancelling_the_executor_marks_live_runs_interrupted(rig) -> None:
    r = rig(MemoryBackend(Script(stdout=[metrics(step=1, loss=4.0)], seconds=30)), factors={"K": [1, 2, 3, 4]},
            concurrency=2, hardware={"price_per_hour": 3600.0}, max_dollars=1000)

    async def go() -> None:
        executor, pending = await r.start()
        task = asyncio.create_task(executor.run(pending))
        await r.backend.until(lambda: len(r.backend.live) == 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - started < 3
    runs = r.runs()
    assert [(x.arm, x.status, x.failure) for x in runs] == [("K=1", "interrupted", None), ("K=2", "interrupted", None)]
    assert all(x.reason == "the orchestrator was interrupted" for x in runs)
    assert all(h.cancelled for h in r.backend.handles.values()) and len(r.backend.launches) == 2
    assert all(0 < x.cost < 30 for x in runs)  # settled at the time they ran, not their $30 reservations
    # an interrupted run does not count as done: a resume runs it again
    assert r.ledger.terminal_replicates("exp", 3) == set()
    r.check_books()


@pytest.mark.parametrize("price", [0.0, 36.0])
def test_a_free_host_starts_the_next_run_before_recording_the_last(rig, monkeypatch: pytest.MonkeyPatch,
                                                                   price: float) -> None:
    """The slot goes back once a run's outcome is decided and in the outcome journal, so on a free host the next
    run starts while the ledger records the last; on a paid host the last charge is settled first, and the
    next reservation sees it."""
    r = rig(MemoryBackend(Script(stdout=[metrics(score=1.0)])), factors={"K": [1, 2, 3]}, concurrency=1,
            hardware={"price_per_hour": price}, max_dollars=100, train_timeout_s=60)
    # Each run's files are made on the loop, as on a quick disk (on a busy machine they would go to a thread,
    # and the next launch would then wait a turn longer than the two the hand-on gives it).
    monkeypatch.setattr(executor_module, "SLOW_FILES_S", float("inf"))
    launches_when_recorded: list[int] = []
    finish_run = r.ledger.finish_run

    def recording(run_id: int, **fields: object) -> None:
        assert run_id in outcomes.kept(r.study.home / "runs" / "exp")
        launches_when_recorded.append(len(r.backend.launches))
        finish_run(run_id, **fields)

    monkeypatch.setattr(r.ledger, "finish_run", recording)
    summary = r.run()
    assert [x.status for x in summary.results] == ["succeeded"] * 3
    assert launches_when_recorded == ([2, 3, 3] if price == 0 else [1, 2, 3])
    assert r.backend.slot_clashes == [] and r.backend.peak_live == 1
    r.check_books()


def test_an_interruption_as_the_next_run_starts_keeps_the_finished_run(rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in the moment between a run handing its slot on and its ledger record: the run is recorded as
    it ended, and only the run cut short is run again by a resume."""
    r = rig(MemoryBackend(Script(stdout=[metrics(score=1.0)])), factors={"K": [1, 2]}, concurrency=1)
    put = executor_module.SlotPool.put

    def put_and_interrupt(pool: executor_module.SlotPool, slot: object) -> None:
        put(pool, slot)
        r.backend.interrupt()

    monkeypatch.setattr(executor_module.SlotPool, "put", put_and_interrupt)
    with pytest.raises(asyncio.CancelledError):
        r.run()
    assert [(x.arm, x.status) for x in r.runs()] == [("K=1", "succeeded")]
    assert r.ledger.terminal_replicates("exp", 1) == {("K=1", 0)}
    r.check_books()
