"""The JSON the dashboard's pages receive: plain dicts built from the ledger's typed views.

Pure reads over a (read-only) ledger; the web layer only moves these documents to the browser.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ratiocinator.analysis.live import LiveState, live_state
from ratiocinator.autoresearch.program import Metric
from ratiocinator.autoresearch.store import MEASURED, Attempt, Session, Store
from ratiocinator.spec.source import load_stored
from ratiocinator.store.ledger import Ledger, RunRow
from ratiocinator.store.liveness import ORPHANED, ORPHANED_NOTE, orphaned
from ratiocinator.store.paths import Paths
from ratiocinator.store.records import RunStatus
from ratiocinator.store.views import Point, curve_metric, overviews, points_after, points_per_run

MAX_DIFF_BYTES = 200_000  # a diff past this is cut on the page (the ledger keeps all of it)
MAX_FIRST_POINTS = 5_000  # a long series reaches a page thinned to about this many points, then grows point by point


def _num(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return value if value is not None and math.isfinite(value) else None


def experiments_document(ledger: Ledger) -> dict[str, Any]:
    paths = Paths(ledger.path.parent)
    rows = []
    for v in overviews(ledger):
        e = v.experiment
        gone = orphaned(e.status, paths.lock(e.id))
        rows.append({
            "id": e.id, "name": e.name, "status": ORPHANED if gone else e.status,
            "note": ORPHANED_NOTE.format(command=f"ratiocinator research {e.spec_path}") if gone else e.note,
            "backend": e.backend, "created_at": e.created_at, "updated_at": e.updated_at,
            "goal": v.goal.metric if v.goal else None, "maximize": v.goal.maximize if v.goal else None,
            "budget": v.goal.max_dollars if v.goal else None, "spent": v.spent, "reserved": v.reserved,
            "planned": v.planned, "done": v.done, "running": 0 if gone else v.running,
            "orphaned": v.running if gone else 0, "status_counts": v.status_counts,
        })
    return {"experiments": rows, "sessions": [_session_row(s, Store(ledger)) for s in _sessions(ledger)]}


def _sessions(ledger: Ledger) -> list[Session]:
    store = Store(ledger)
    return [store.session(int(r[0])) for r in ledger.db.execute("SELECT id FROM ar_sessions ORDER BY id DESC")]


def _sessionorphaned(session: Session, ledger: Ledger) -> bool:
    return orphaned(session.status, Paths(ledger.path.parent).autoresearch(session.tag) / "lock")


def _session_row(session: Session, store: Store) -> dict[str, Any]:
    attempts = store.attempts(session.id)
    spent, _ = store.money(session.id)
    status = ORPHANED if _sessionorphaned(session, store.ledger) else session.status
    return {"tag": session.tag, "status": status, "reason": session.reason, "attempts": len(attempts),
            "kept": sum(a.status == "keep" for a in attempts), "spent": spent, "updated_at": session.updated_at}


def _run(run: RunRow, goal: str | None, finals: dict[int, dict[str, tuple[float | None, bool]]]) -> dict[str, Any]:
    value = finals.get(run.id, {}).get(goal) if goal else None
    return {
        "id": run.id, "arm": run.arm, "replicate": run.replicate, "attempt": run.attempt, "status": run.status,
        "failure": run.failure, "reason": run.reason, "transient": run.transient,
        "evidence": [str(line) for line in run.evidence.get("evidence", [])],
        "started_at": run.started_at, "ended_at": run.ended_at, "slot": run.slot, "host": run.host,
        "goal": _num(value[0]) if value else None, "cost": run.cost,
    }


def experiment_document(ledger: Ledger, experiment_id: str, home: Path) -> dict[str, Any]:
    """Everything the experiment page shows, except the curves (streamed apart, point by point)."""
    state: LiveState = live_state(ledger, experiment_id)
    v = state.overview
    e = v.experiment
    goal = v.goal.metric if v.goal else None
    finals = ledger.run_metrics(experiment_id)
    paper = Paths(home).report(experiment_id) / "paper.html"
    counts = points_per_run(ledger, experiment_id)
    gone = orphaned(e.status, Paths(home).lock(e.id))
    runs = [_run(r, goal, finals) for r in ledger.runs(experiment_id)]
    if gone:
        runs = [{**r, "status": ORPHANED} if r["status"] == RunStatus.RUNNING else r for r in runs]
    return {
        "id": e.id, "name": e.name, "status": ORPHANED if gone else e.status,
        "note": ORPHANED_NOTE.format(command=f"ratiocinator research {e.spec_path}") if gone else e.note,
        "backend": e.backend, "commit": e.commit_sha,
        "goal": goal, "maximize": v.goal.maximize if v.goal else None,
        "budget": v.goal.max_dollars if v.goal else None, "spent": v.spent, "reserved": v.reserved,
        "planned": state.planned, "done": state.done, "running": 0 if gone else len(state.running),
        "orphaned": len(state.running) if gone else 0, "eta_s": None if gone else _num(state.eta_s),
        "best": state.best.name if state.best else None, "failures": state.failures,
        "arms": [{"name": a.name, "baseline": a.is_baseline, "planned": a.planned, "done": a.done,
                  "running": a.running, "failed": a.failed, "n": a.n, "mean": _num(a.mean),
                  "ci": [_num(a.ci.low), _num(a.ci.high)] if a.ci else None} for a in state.arms],
        "runs": runs,
        "readiness": [{"commit": r.commit, "skipped": r.skipped, "ready": r.is_code_ready, "issue": r.code_issue,
                       "checks": [{"name": c.get("name"), "status": c.get("status"), "summary": c.get("summary")}
                                  for c in r.checks]}
                      for r in ledger.readiness_verdicts(experiment_id)],
        "decisions": [{"iteration": d.iteration, "planner": d.planner, "reason": d.reason,
                       "arms": [a["name"] for a in (d.plan or {}).get("arms", [])],
                       "replicates": (d.plan or {}).get("replicates")}
                      for d in ledger.decisions(experiment_id)],
        "paper": f"/reports/{e.id}/paper.html" if paper.is_file() else None,
        "metrics": sorted(counts),
        "curve_metric": curve_metric(counts, goal),
    }


class CurveCursor:
    """What one browser has been sent of an experiment's curves: per run, the last point's seq."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.sent: dict[int, int] = {}

    def new_points(self, ledger: Ledger, experiment_id: str) -> dict[str, Any]:
        """Points of the metric not sent yet, per run: ``{run_id: {arm, replicate, x, y}}``; x is the step
        where the runner gave one, else the point's position in the run's output."""
        out: dict[str, Any] = {}
        latest = {int(r[0]): int(r[1]) for r in ledger.db.execute(
            "SELECT run_id, MAX(first_seq + n - 1) FROM metric_chunks WHERE name = ? AND run_id IN"
            " (SELECT id FROM runs WHERE experiment_id = ?) GROUP BY run_id", (self.metric, experiment_id))}
        for run in ledger.runs(experiment_id):
            if latest.get(run.id, -1) <= self.sent.get(run.id, -1):
                continue
            points: list[Point] = points_after(ledger, run.id, self.metric, self.sent.get(run.id, -1))
            if not points:
                continue
            self.sent[run.id] = points[-1].seq
            if len(points) > MAX_FIRST_POINTS:  # a chart cannot show a million points; the ledger keeps them all
                stride = -(-len(points) // MAX_FIRST_POINTS)
                points = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
            out[str(run.id)] = {"arm": run.arm, "replicate": run.replicate, "status": run.status,
                                "x": [p.step if p.step is not None else p.seq for p in points],
                                "y": [p.value for p in points]}
        return out


def _metric_of(session: Session) -> Metric | None:
    try:
        data = load_stored(session.program_text)
        return Metric.model_validate(data["metric"]) if isinstance(data, dict) and "metric" in data else None
    except (yaml.YAMLError, ValidationError):
        return None


def _attempt(a: Attempt) -> dict[str, Any]:
    diff = a.diff[:MAX_DIFF_BYTES].decode("utf-8", "replace")
    return {"id": a.id, "worker": a.worker, "iteration": a.iteration, "status": a.status, "metric": _num(a.metric),
            "hypothesis": a.hypothesis, "reason": a.reason, "commit": a.commit_sha, "parent": a.parent_commit,
            "diff": diff, "diff_cut": len(a.diff) > MAX_DIFF_BYTES, "started_at": a.started_at,
            "ended_at": a.ended_at, "run_s": a.run_s, "cost": a.cost}


def session_document(ledger: Ledger, tag: str) -> dict[str, Any]:
    store = Store(ledger)
    session = store.session_by_tag(tag)
    if session is None:
        raise KeyError(tag)
    metric = _metric_of(session)
    attempts = store.attempts(session.id)
    spent, reserved = store.money(session.id)
    best: list[float | None] = []  # the running best of kept (and baseline) attempts, for the progress chart
    current: float | None = None
    lower = metric.lower_is_better if metric else True
    for a in attempts:
        if a.status in ("baseline", "keep") and a.metric is not None and math.isfinite(a.metric):
            current = a.metric if current is None or (a.metric < current if lower else a.metric > current) else current
        best.append(current)
    gone = _sessionorphaned(session, ledger)
    shown = [_attempt(a) for a in attempts]
    if gone:
        shown = [{**a, "status": ORPHANED} if a["status"] == "running" else a for a in shown]
    resume = f"ratiocinator autoresearch {session.program_path}"
    return {"tag": session.tag, "status": ORPHANED if gone else session.status,
            "reason": ORPHANED_NOTE.format(command=resume) if gone else session.reason, "repo": session.repo,
            "branch": session.branch, "base_commit": session.base_commit, "best_commit": session.best_commit,
            "metric": metric.name if metric else None, "direction": metric.direction if metric else None,
            "spent": spent, "reserved": reserved, "measured": list(MEASURED),
            "attempts": shown, "best": best}
