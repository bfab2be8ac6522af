"""Typed read-only views of the ledger for whoever watches it: the terminal progress, the web
dashboard and the Python API.

Everything here only reads, so it is safe on a ledger opened with ``read_only=True`` while an
experiment writes to it. The spec an experiment ran under is stored with it; its goal, direction,
budget and retry policy come from there, so a view needs nothing but the ledger.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from ratiocinator.spec.models import Spec
from ratiocinator.spec.source import load_stored
from ratiocinator.store.ledger import NO_STEP, STEP_NAME, Experiment, Ledger
from ratiocinator.store.records import RunStatus

if TYPE_CHECKING:  # numpy only for whole series: a live read of the latest points goes without it
    import numpy as np


@dataclass(frozen=True)
class Goal:
    """What an experiment optimises, its budget and retry policy, from the spec stored with it."""

    metric: str
    maximize: bool
    max_dollars: float
    max_attempts: int
    design: str


@lru_cache(maxsize=256)
def _goal_of_text(spec_text: str) -> Goal | None:
    try:
        spec = Spec.model_validate(load_stored(spec_text))
    except (yaml.YAMLError, ValidationError, TypeError):
        return None
    return Goal(spec.goal_metric, spec.maximize, spec.max_dollars, spec.failure_policy.max_attempts, spec.design)


def goal_of(experiment: Experiment) -> Goal | None:
    """The experiment's goal; None when its stored spec no longer validates (an older Ratiocinator's)."""
    return _goal_of_text(experiment.spec_text)


def planned_replicates(ledger: Ledger, experiment_id: str) -> dict[str, int]:
    """Replicates planned per arm over every recorded iteration (a later plan may raise an arm's count)."""
    planned: dict[str, int] = {}
    for decision in ledger.decisions(experiment_id):
        plan = decision.plan
        if not plan:
            continue
        extra = plan.get("arm_replicates") or {}
        for arm in plan.get("arms", []):
            name = arm["name"]
            planned[name] = max(planned.get(name, 0), int(extra.get(name, plan.get("replicates", 1))))
    return planned


@dataclass(frozen=True)
class ExperimentOverview:
    """One line of the experiment list: where it stands, and what it cost against its budget."""

    experiment: Experiment
    goal: Goal | None
    spent: float
    reserved: float
    status_counts: dict[str, int]
    planned: int  # replicates planned over all iterations so far
    done: int  # replicates that reached a terminal state

    @property
    def running(self) -> int:
        return self.status_counts.get(RunStatus.RUNNING, 0)


def overview(ledger: Ledger, experiment: Experiment, *, planned: dict[str, int] | None = None,
             done: set[tuple[str, int]] | None = None) -> ExperimentOverview:
    """``planned`` (`planned_replicates`) and ``done`` (the ledger's `terminal_replicates`) where the caller
    has read them already."""
    goal = goal_of(experiment)
    spent, reserved = ledger.money(experiment.id)
    counts = {str(r[0]): int(r[1]) for r in ledger.db.execute(
        "SELECT status, COUNT(*) FROM runs WHERE experiment_id = ? GROUP BY status", (experiment.id,))}
    if planned is None:
        planned = planned_replicates(ledger, experiment.id)
    if done is None:
        done = ledger.terminal_replicates(experiment.id, goal.max_attempts if goal else 1)
    return ExperimentOverview(experiment, goal, spent, reserved, counts, sum(planned.values()),
                              sum(1 for arm, _ in done if arm in planned) if planned else len(done))


def overviews(ledger: Ledger) -> list[ExperimentOverview]:
    """Every experiment of the home, newest first."""
    return [overview(ledger, e) for e in reversed(ledger.experiments())]


@dataclass(frozen=True)
class Point:
    """One streamed metric point; ``step`` is None where the runner gave none, ``value`` None when non-finite."""

    seq: int
    step: int | None
    value: float | None


@dataclass(frozen=True)
class LastPoint:
    run_id: int
    metric: str
    point: Point


def _point(seq: int, step: int, value: float) -> Point:
    return Point(int(seq), None if step == NO_STEP else int(step), float(value) if math.isfinite(value) else None)


def _points(seqs: np.ndarray, steps: np.ndarray, vals: np.ndarray) -> list[Point]:
    return [_point(q, t, v) for q, t, v in zip(seqs, steps, vals, strict=True)]


def _last_point(seqs: bytes, steps: bytes, vals: bytes) -> Point:
    """The last point of a stored chunk (little-endian int64, int64, float64 columns), read without numpy."""
    (seq,), (step,), (value,) = (struct.unpack_from(fmt, blob, len(blob) - 8)
                                 for fmt, blob in (("<q", seqs), ("<q", steps), ("<d", vals)))
    return _point(seq, step, value)


def last_points(ledger: Ledger, run_ids: Iterable[int], metric: str | None = None) -> dict[int, LastPoint]:
    """Each run's latest streamed point of ``metric`` (or of whichever metric it streamed last)."""
    out: dict[int, LastPoint] = {}
    for run_id in run_ids:
        query = ("SELECT name, seqs, steps, vals FROM metric_chunks WHERE run_id = ?"
                 + (" AND name = ?" if metric else "") + " ORDER BY first_seq + n DESC LIMIT 1")
        row = ledger.db.execute(query, (run_id, metric) if metric else (run_id,)).fetchone()
        if row is None or row[0] == STEP_NAME:  # the goal is often printed only at the end: show what the run streams
            row = ledger.db.execute("SELECT name, seqs, steps, vals FROM metric_chunks WHERE run_id = ? AND name != ?"
                                    " ORDER BY first_seq + n DESC LIMIT 1", (run_id, STEP_NAME)).fetchone()
        if row is None:
            continue
        out[run_id] = LastPoint(run_id, str(row[0]), _last_point(row[1], row[2], row[3]))
    return out


def points_after(ledger: Ledger, run_id: int, metric: str, after_seq: int = -1) -> list[Point]:
    """The points of one run's metric with ``seq > after_seq``, in order: what a live chart has not shown yet."""
    rows = ledger.db.execute(
        "SELECT seqs, steps, vals FROM metric_chunks WHERE run_id = ? AND name = ? AND first_seq + n - 1 > ?"
        " ORDER BY first_seq", (run_id, metric, after_seq)).fetchall()
    if not rows:
        return []
    import numpy as np

    seqs, steps, vals = (np.concatenate([np.frombuffer(r[i], dtype=dt) for r in rows])
                         for i, dt in enumerate(("<i8", "<i8", "<f8")))
    keep = seqs > after_seq
    return _points(seqs[keep], steps[keep], vals[keep])


def points_per_run(ledger: Ledger, experiment_id: str) -> dict[str, int]:
    """Each streamed metric's most points in any one run: which metrics have a curve, and which are one final value."""
    return {str(r[0]): int(r[1]) for r in ledger.db.execute(
        "SELECT name, MAX(total) FROM (SELECT run_id, name, SUM(n) AS total FROM metric_chunks WHERE run_id IN"
        " (SELECT id FROM runs WHERE experiment_id = ?) AND name != ? GROUP BY run_id, name) GROUP BY name"
        " ORDER BY name", (experiment_id, STEP_NAME))}


def curve_metric(counts: dict[str, int], goal: str | None) -> str | None:
    """The metric to draw curves of by default: the goal where runs stream it, else the most streamed one."""
    if goal is not None and counts.get(goal, 0) > 1:
        return goal
    streamed = sorted(((n, name) for name, n in counts.items() if n > 1), key=lambda t: (-t[0], t[1]))
    return streamed[0][1] if streamed else goal
