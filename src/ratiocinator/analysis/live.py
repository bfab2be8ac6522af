"""Where a running experiment stands, computed from the ledger alone: runs done of planned, an ETA
from the measured run times, the goal per arm with its confidence interval, the best arm so far,
the runs in flight with their latest streamed point, and failures by class.

The terminal progress and the web dashboard both show this one state, so they never disagree.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ratiocinator.store.records import TERMINAL, RunStatus

if TYPE_CHECKING:  # numpy comes with stats: it is loaded only once an arm has two values (see `_standing`)
    from ratiocinator.analysis.stats import Interval
    from ratiocinator.store.ledger import Ledger, RunRow
    from ratiocinator.store.views import ExperimentOverview, LastPoint


@dataclass(frozen=True)
class ArmState:
    name: str
    is_baseline: bool
    planned: int
    done: int  # replicates in a terminal state
    running: int
    failed: int  # failed attempts, retried ones included
    n: int  # succeeded runs with a finite goal value
    mean: float | None
    ci: Interval | None  # t interval of the mean, from n >= 2


@dataclass(frozen=True)
class LiveRun:
    run_id: int
    arm: str
    replicate: int
    attempt: int
    slot: str
    elapsed_s: float
    last: LastPoint | None


@dataclass(frozen=True)
class LiveState:
    overview: ExperimentOverview
    arms: tuple[ArmState, ...]
    running: tuple[LiveRun, ...]
    failures: dict[str, int]  # failure class -> failed attempts
    best: ArmState | None
    eta_s: float | None  # None until a run has finished (nothing measured yet)
    mean_run_s: float | None
    parallel: int  # the most runs seen in flight at once

    @property
    def planned(self) -> int:
        return self.overview.planned

    @property
    def done(self) -> int:
        return self.overview.done


def peak_parallel(runs: Sequence[RunRow], now: float) -> int:
    """The most runs that were ever in flight at once: the concurrency the ETA can count on."""
    edges = sorted([(r.started_at, 1) for r in runs] + [(r.ended_at or now, -1) for r in runs],
                   key=lambda e: (e[0], e[1]))
    peak = level = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def eta_seconds(durations: Sequence[float], remaining: int, running_elapsed: Sequence[float],
                parallel: int) -> float | None:
    """Seconds until the planned runs are done: each run in flight needs the mean run time less what it has
    had, each run not started the whole mean, spread over the runs that go at once. None before any run ended."""
    if remaining <= 0:
        return 0.0
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    in_flight = sum(max(mean - e, 0.0) for e in running_elapsed)
    queued = max(remaining - len(running_elapsed), 0)
    return (in_flight + queued * mean) / max(parallel, 1)


def _goal_values(runs: Sequence[RunRow], finals: Mapping[int, Mapping[str, tuple[float | None, bool]]],
                metric: str) -> dict[int, list[float]]:
    """Each arm's finite final values of ``metric`` from its succeeded runs, in run order: what the report's
    summary averages (`analysis.summary.metric_stats`), gathered for the one metric a live view shows."""
    values: dict[int, list[float]] = {}
    for run in runs:
        if run.status != RunStatus.SUCCEEDED:
            continue
        value, finite = finals.get(run.id, {}).get(metric, (None, False))
        if finite and value is not None and math.isfinite(value):
            values.setdefault(run.arm_id, []).append(float(value))
    return values


def _standing(values: Sequence[float]) -> tuple[int, float | None, Interval | None]:
    """(n, mean, t interval) of one arm's goal values. One value is its own mean and has no interval, so a
    sweep of one replicate per arm is watched without loading numpy and scipy (about 0.1 s, which a short
    study would pay inside its run phase); the first arm with two values loads them."""
    if len(values) < 2:
        return len(values), (values[0] if values else None), None
    from ratiocinator.analysis.stats import describe

    # The t interval only: a bootstrap on every refresh would cost more than it tells a watcher.
    d = describe(values, bootstrap=False)
    return d.n, d.mean, d.ci


def live_state(ledger: Ledger, experiment_id: str, *, now: float | None = None) -> LiveState:
    from ratiocinator.store.views import goal_of, last_points, overview, planned_replicates

    now = time.time() if now is None else now
    experiment = ledger.experiment(experiment_id)
    goal = goal_of(experiment)
    planned = planned_replicates(ledger, experiment_id)
    terminal = ledger.terminal_replicates(experiment_id, goal.max_attempts if goal else 1)
    view = overview(ledger, experiment, planned=planned, done=terminal)
    runs = ledger.runs(experiment_id)
    arms = ledger.arms(experiment_id)
    states: list[ArmState] = []
    best: ArmState | None = None
    values = _goal_values(runs, ledger.run_metrics(experiment_id, goal.metric), goal.metric) if goal else {}
    done_by_arm = Counter(a for a, _ in terminal)
    running_by_arm = Counter(r.arm_id for r in runs if r.status == RunStatus.RUNNING)
    failed_by_arm = Counter(r.arm_id for r in runs if r.status == RunStatus.FAILED)
    for arm in arms:
        n, mean, ci = _standing(values.get(arm.id, ()))
        state = ArmState(
            name=arm.name, is_baseline=arm.is_baseline, planned=planned.get(arm.name, 0),
            done=done_by_arm[arm.name], running=running_by_arm[arm.id], failed=failed_by_arm[arm.id],
            n=n, mean=mean, ci=ci,
        )
        states.append(state)
        if state.mean is not None and goal is not None and (
                best is None or best.mean is None
                or (state.mean > best.mean if goal.maximize else state.mean < best.mean)):
            best = state
    in_flight = [r for r in runs if r.status == RunStatus.RUNNING]
    latest = last_points(ledger, [r.id for r in in_flight], goal.metric if goal else None)
    live = tuple(LiveRun(r.id, r.arm, r.replicate, r.attempt, r.slot, max(now - r.started_at, 0.0), latest.get(r.id))
                 for r in in_flight)
    durations = [r.ended_at - r.started_at for r in runs if r.status in TERMINAL and r.ended_at is not None]
    parallel = peak_parallel([r for r in runs if r.status != RunStatus.INTERRUPTED], now)
    return LiveState(
        overview=view,
        arms=tuple(states),
        running=live,
        failures=dict(Counter(r.failure for r in runs if r.status == RunStatus.FAILED and r.failure).most_common()),
        best=best,
        eta_s=eta_seconds(durations, view.planned - view.done, [r.elapsed_s for r in live], parallel),
        mean_run_s=sum(durations) / len(durations) if durations else None,
        parallel=parallel,
    )


def clock(seconds: float | None) -> str:
    """0:01:05; a dash where nothing is known yet."""
    if seconds is None:
        return "—"
    s = int(round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def mean_ci(arm: ArmState) -> str:
    """``0.6123 ± 0.0210 (n=3)``: the half-width of the 95% t interval once n >= 2."""
    if arm.mean is None:
        return "—"
    if arm.ci is None:
        return f"{arm.mean:.4g} (n={arm.n})"
    return f"{arm.mean:.4g} ± {(arm.ci.high - arm.ci.low) / 2:.2g} (n={arm.n})"
