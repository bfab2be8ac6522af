"""The dashboard's JSON documents, from a real ledger opened read-only, without a browser."""

from __future__ import annotations

import json
from pathlib import Path

from liveledger import ledger_with_runs
from ratiocinator.dashboard import documents
from ratiocinator.dashboard.documents import CurveCursor, experiment_document, experiments_document
from ratiocinator.execution.metrics import MetricPoint
from ratiocinator.pipeline import experiment_lock
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.paths import Paths
from ratiocinator.store.views import curve_metric


def test_experiment_document_holds_the_grid_goal_failures_and_decisions(tmp_path: Path) -> None:
    ledger_with_runs(tmp_path / "ledger.db")
    watcher = Ledger(tmp_path / "ledger.db", read_only=True)
    with experiment_lock(Paths(tmp_path).lock("live-1")):  # its orchestrator is alive
        doc = experiment_document(watcher, "live-1", tmp_path)
        listed = experiments_document(watcher)["experiments"]
    json.dumps(doc, allow_nan=False)  # what the page receives is strict JSON
    assert (doc["planned"], doc["done"], doc["running"], doc["best"]) == (6, 4, 1, "a")
    # b's oom failure is not transient: that replicate is done, without a value
    arms = [(a["name"], a["done"], a["planned"], a["n"], a["mean"]) for a in doc["arms"]]
    assert arms == [("a", 2, 3, 2, 1.5), ("b", 2, 3, 1, 0.5)]
    assert doc["arms"][0]["ci"][0] < 1.5 < doc["arms"][0]["ci"][1] and doc["arms"][1]["ci"] is None
    assert [(r["arm"], r["replicate"], r["status"], r["failure"]) for r in doc["runs"]] == [
        ("a", 0, "succeeded", None), ("a", 1, "succeeded", None), ("b", 0, "succeeded", None),
        ("b", 1, "failed", "oom"), ("a", 2, "running", None)]
    assert doc["decisions"] == [{"iteration": 1, "planner": "spec", "reason": "the spec's arms", "arms": ["a", "b"],
                                 "replicates": 3}]
    assert doc["paper"] is None and doc["metrics"] == ["score"] and doc["curve_metric"] == "score"
    assert doc["budget"] == 2.5
    assert [(e["id"], e["done"], e["planned"], e["running"], e["reserved"]) for e in listed] == [
        ("live-1", 4, 6, 1, 0.5)]


def test_a_running_experiment_whose_orchestrator_died_shows_its_runs_as_orphaned(tmp_path: Path) -> None:
    ledger, _, _ = ledger_with_runs(tmp_path / "ledger.db")
    ledger.update_experiment("live-1", status="running")
    watcher = Ledger(tmp_path / "ledger.db", read_only=True)
    with experiment_lock(Paths(tmp_path).lock("live-1")):
        pass  # an orchestrator ran it and is gone (its lock file stays; nobody holds it)
    doc = experiment_document(watcher, "live-1", tmp_path)
    assert (doc["status"], doc["running"], doc["orphaned"], doc["eta_s"]) == ("orphaned", 0, 1, None)
    assert "the same command (ratiocinator research s.yaml) resumes it" in doc["note"]
    assert [r["status"] for r in doc["runs"]][-1] == "orphaned"
    (listed,) = experiments_document(watcher)["experiments"]
    assert (listed["status"], listed["running"], listed["orphaned"]) == ("orphaned", 0, 1)


def test_curve_cursor_sends_each_point_once_and_thins_a_long_first_send(tmp_path: Path, monkeypatch) -> None:
    ledger, exp_id, live = ledger_with_runs(tmp_path / "ledger.db")
    watcher = Ledger(tmp_path / "ledger.db", read_only=True)
    cursor = CurveCursor("score")
    first = cursor.new_points(watcher, exp_id)
    assert first == {str(live): {"arm": "a", "replicate": 2, "status": "running", "x": [1, 2], "y": [0.25, 0.75]}}
    assert cursor.new_points(watcher, exp_id) == {}  # nothing new: nothing sent
    ledger.add_points(live, [MetricPoint("score", 0.9, 3, 2), MetricPoint("loss", 1.0, 3, 3)])
    assert cursor.new_points(watcher, exp_id)[str(live)]["x"] == [3]  # only the new point of this metric

    monkeypatch.setattr(documents, "MAX_FIRST_POINTS", 10)
    ledger.add_points(live, [MetricPoint("score", float(i), 4 + i, 4 + i) for i in range(95)])
    thinned = CurveCursor("score").new_points(watcher, exp_id)[str(live)]["x"]
    assert len(thinned) <= 11 and thinned[0] == 1 and thinned[-1] == 98  # first and last points kept


def test_curves_default_to_the_goal_where_runs_stream_it_else_the_most_streamed_metric() -> None:
    assert curve_metric({"val_r2": 40, "loss": 40}, "val_r2") == "val_r2"
    assert curve_metric({"score": 1, "loss": 6, "lr": 6, "acc": 3}, "score") == "loss"  # score: one final value
    assert curve_metric({"score": 1}, "score") == "score"
    assert curve_metric({}, None) is None
