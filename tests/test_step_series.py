"""A ledger written when the json_line parser still stored each line's step index as a metric named
"step" reads like a new one: no reader offers "step" as a metric (curve menus, finals, exports)."""

from __future__ import annotations

from pathlib import Path

from planted import PlantedStudy
from ratiocinator.export.series import run_series
from ratiocinator.store.views import last_points, points_per_run


def test_a_stored_step_series_is_not_a_metric(tmp_path: Path) -> None:
    study = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base")
    # As the old parser recorded {"step": 10 * i, "loss": ...}: a "step" series equal to its own steps.
    runs = [study.run(arm, final={"acc": acc, "loss": 0.5, "step": 20.0},
                      curve={"loss": [0.9, 0.7, 0.5], "step": [0.0, 10.0, 20.0]})
            for arm, acc in (("base", 0.7), ("fast", 0.8))]
    ledger = study.ledger
    assert all(ledger.point_names(run) == ["loss"] for run in runs)
    assert all(set(finals) == {"acc", "loss"} for finals in ledger.run_metrics(study.id).values())
    assert points_per_run(ledger, study.id) == {"loss": 3}
    assert {p.metric for p in last_points(ledger, runs).values()} == {"loss"}
    assert {s.metric for s in run_series(ledger, study.id)} == {"loss"}
    assert [(step, value) for _, step, value in ledger.points(runs[0], "step")] == [(0, 0.0), (10, 10.0), (20, 20.0)]
