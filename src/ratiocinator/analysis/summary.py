"""Per-arm statistics of an experiment: pure functions over ledger rows, no I/O.

Only succeeded runs enter a metric's statistics; failed and interrupted attempts are
counted, never averaged. Every number keeps the ids of the runs it was computed from,
so a report can trace it back to the ledger and later analyses (confidence intervals,
tests, factor effects) can start from the same values.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ratiocinator.store.records import RunStatus

if TYPE_CHECKING:
    from ratiocinator.store.ledger import ArmRow, RunRow

# A run's final value of one metric as the ledger returns it: (value, finite); the
# value is None when the run ended on NaN or ±inf.
FinalValue = tuple[float | None, bool]
Finals = Mapping[int, Mapping[str, FinalValue]]

# Display order of run statuses; statuses not listed here follow in name order.
STATUS_ORDER = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.RUNNING)


@dataclass(frozen=True)
class MetricStats:
    """One metric of one arm over its succeeded runs.

    ``values[i]`` came from run ``run_ids[i]``. Runs whose final value was non-finite,
    and runs that never reported the metric, are kept apart rather than dropped
    silently. ``std`` is the sample standard deviation (ddof=1), None below two values.
    """

    metric: str
    run_ids: tuple[int, ...]
    values: tuple[float, ...]
    nonfinite_run_ids: tuple[int, ...]
    missing_run_ids: tuple[int, ...]
    mean: float | None
    std: float | None
    min: float | None
    max: float | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def n_nonfinite(self) -> int:
        return len(self.nonfinite_run_ids)

    @property
    def min_run_id(self) -> int | None:
        return None if not self.values else self.run_ids[int(np.argmin(self.values))]

    @property
    def max_run_id(self) -> int | None:
        return None if not self.values else self.run_ids[int(np.argmax(self.values))]


@dataclass(frozen=True)
class ArmSummary:
    """An arm, every attempt it made, and statistics of its succeeded runs."""

    arm: ArmRow
    run_ids: tuple[int, ...]
    succeeded_run_ids: tuple[int, ...]
    status_counts: dict[str, int]
    failure_counts: dict[str, int]
    metrics: dict[str, MetricStats]

    @property
    def name(self) -> str:
        return self.arm.name

    @property
    def n_attempts(self) -> int:
        return len(self.run_ids)

    @property
    def n_succeeded(self) -> int:
        return len(self.succeeded_run_ids)


@dataclass(frozen=True)
class ExperimentSummary:
    """All arms of one experiment, judged by its goal metric.

    ``metrics`` lists the goal metric first (even when no run reported it), then every
    other metric a succeeded run reported. ``best_arm`` is None when no arm has a
    finite goal value; on a tied mean the earlier arm wins.
    """

    experiment_id: str
    goal_metric: str
    maximize: bool
    metrics: tuple[str, ...]
    arms: tuple[ArmSummary, ...]
    status_counts: dict[str, int]
    failure_counts: dict[str, int]
    best_arm: str | None

    @property
    def n_attempts(self) -> int:
        return sum(a.n_attempts for a in self.arms)

    @property
    def n_succeeded(self) -> int:
        return sum(a.n_succeeded for a in self.arms)

    def arm(self, name: str) -> ArmSummary:
        for summary in self.arms:
            if summary.name == name:
                return summary
        raise KeyError(f"no arm {name!r} in experiment {self.experiment_id}")

    @property
    def best(self) -> ArmSummary | None:
        return None if self.best_arm is None else self.arm(self.best_arm)


def metric_stats(metric: str, run_ids: Sequence[int], finals: Finals) -> MetricStats:
    """Statistics of ``metric`` over the final values of ``run_ids`` (non-finite excluded)."""
    used: list[int] = []
    values: list[float] = []
    nonfinite: list[int] = []
    missing: list[int] = []
    for run_id in run_ids:
        final = finals.get(run_id, {}).get(metric)
        if final is None:
            missing.append(run_id)
            continue
        value, finite = final
        if finite and value is not None and math.isfinite(value):
            used.append(run_id)
            values.append(float(value))
        else:
            nonfinite.append(run_id)
    array = np.asarray(values, dtype=float)
    return MetricStats(
        metric=metric,
        run_ids=tuple(used),
        values=tuple(values),
        nonfinite_run_ids=tuple(nonfinite),
        missing_run_ids=tuple(missing),
        mean=float(array.mean()) if array.size else None,
        std=float(array.std(ddof=1)) if array.size >= 2 else None,
        min=float(array.min()) if array.size else None,
        max=float(array.max()) if array.size else None,
    )


def ordered_counts(counter: Counter[str], order: Sequence[str] = ()) -> dict[str, int]:
    """Counts in a stable display order: ``order`` first, then by name."""
    keys = [k for k in order if counter[k]] + sorted(k for k in counter if k not in order)
    return {k: counter[k] for k in keys}


def summarize_arm(arm: ArmRow, runs: Sequence[RunRow], finals: Finals, metrics: Sequence[str]) -> ArmSummary:
    """Summarize one arm from all of its runs (every status, every attempt); other arms' runs are ignored."""
    runs = [r for r in runs if r.arm_id == arm.id]
    succeeded = tuple(r.id for r in runs if r.status == RunStatus.SUCCEEDED)
    return ArmSummary(
        arm=arm,
        run_ids=tuple(r.id for r in runs),
        succeeded_run_ids=succeeded,
        status_counts=ordered_counts(Counter(r.status for r in runs), STATUS_ORDER),
        failure_counts=ordered_counts(Counter(r.failure for r in runs if r.failure)),
        metrics={m: metric_stats(m, succeeded, finals) for m in metrics},
    )


def best_arm(arms: Sequence[ArmSummary], metric: str, maximize: bool) -> str | None:
    """The arm with the best mean of ``metric``; arms without a finite value never win."""
    best: ArmSummary | None = None
    for arm in arms:
        mean = arm.metrics[metric].mean if metric in arm.metrics else None
        if mean is None:
            continue
        current = best.metrics[metric].mean if best is not None else None
        if current is None or (mean > current if maximize else mean < current):
            best = arm
    return None if best is None else best.name


def summarize_experiment(
    experiment_id: str,
    arms: Sequence[ArmRow],
    runs: Sequence[RunRow],
    finals: Finals,
    *,
    goal_metric: str,
    maximize: bool,
) -> ExperimentSummary:
    """Summarize every arm and pick the best one by the goal metric's mean."""
    succeeded = {r.id for r in runs if r.status == RunStatus.SUCCEEDED}
    reported = {name for run_id in succeeded for name in finals.get(run_id, {})}
    metrics = (goal_metric, *sorted(reported - {goal_metric}))
    by_arm: dict[int, list[RunRow]] = {arm.id: [] for arm in arms}
    for run in runs:
        by_arm.setdefault(run.arm_id, []).append(run)
    summaries = tuple(summarize_arm(arm, by_arm[arm.id], finals, metrics) for arm in arms)
    return ExperimentSummary(
        experiment_id=experiment_id,
        goal_metric=goal_metric,
        maximize=maximize,
        metrics=metrics,
        arms=summaries,
        status_counts=ordered_counts(Counter(r.status for r in runs), STATUS_ORDER),
        failure_counts=ordered_counts(Counter(r.failure for r in runs if r.failure)),
        best_arm=best_arm(summaries, goal_metric, maximize),
    )
