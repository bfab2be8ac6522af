"""A small experiment written straight into a real ledger: every run status, a failure with its
class, series with and without steps, NaN and infinity, a metric name MLflow refuses."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from ratiocinator.execution.metrics import MetricPoint
from ratiocinator.planning.plan import PlannedArm
from ratiocinator.store.ledger import Ledger

EXPERIMENT = "tiny-00000001"
COMMIT = "a" * 40
SPEC = {"name": "tiny", "topic": "does b beat a?", "goal_metric": "score", "maximize": True, "repo_url": ".",
        "runner_script": "run.sh", "replicates": 2,
        "arms": [{"name": "a", "env": {"LR": "0.1"}}, {"name": "b", "env": {"LR": "0.3"}}], "baseline": "a"}


def _points(name: str, values: list[float], steps: list[int | None], first_seq: int = 0) -> list[MetricPoint]:
    return [MetricPoint(name, v, s, first_seq + i) for i, (v, s) in enumerate(zip(values, steps, strict=True))]


def build(home: Path) -> Ledger:
    """The experiment `EXPERIMENT` in ``home/ledger.db``; returns the open ledger."""
    ledger = Ledger(home / "ledger.db")
    ledger.create_experiment(id=EXPERIMENT, name="tiny", spec_path="tiny.yaml", spec_text=yaml.safe_dump(SPEC),
                             spec_sha256="0" * 64, backend="local")
    ledger.update_experiment(EXPERIMENT, status="running", commit_sha=COMMIT)
    ledger.record_arms(EXPERIMENT, 1, [PlannedArm("a", {"LR": "0.1"}), PlannedArm("b", {"LR": "0.3"})], "a")
    arms = {a.name: a.id for a in ledger.arms(EXPERIMENT)}

    def run(arm: str, replicate: int, status: str, points: list[MetricPoint], *, failure: str | None = None,
            reason: str = "") -> int:
        run_id = ledger.start_run(experiment_id=EXPERIMENT, arm_id=arms[arm], replicate=replicate, seed=replicate,
                                  host="local:test", slot="slot0", commit_sha=COMMIT, env={"LR": "x", "SEED": "0"},
                                  argv=["run.sh"], run_root=home / "runs")
        if status == "running":
            ledger.add_points(run_id, points)
            return run_id
        final: dict[str, float] = {}
        counts: dict[str, int] = {}
        for p in points:
            final[p.name] = p.value
            counts[p.name] = counts.get(p.name, 0) + 1
        ledger.finish_run(run_id, status=status, failure=failure, reason=reason, exit_code=0 if not failure else 1,
                          signal=None, final=final, counts=counts, cost=0.0, points=points)
        return run_id

    run("a", 0, "succeeded", _points("score", [0.1, 0.2, 0.3], [1, 2, 3])
        + _points("loss", [2.0, 1.0, math.inf], [None, None, None], 3))
    run("a", 1, "succeeded", _points("score", [0.15, 0.25, 0.35], [1, 2, 3]) + _points("acc@1", [0.5], [1], 3))
    run("b", 0, "failed", _points("score", [0.1], [1]), failure="oom", reason="out of memory")
    run("b", 1, "interrupted", _points("score", [0.2], [1]))
    run("b", 1, "succeeded", _points("score", [0.4, math.nan], [1, 2]))
    run("a", 2, "running", _points("score", [0.05], [1]))
    return ledger
