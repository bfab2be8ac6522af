"""A ledger holding one experiment in the middle of its runs, written through the ledger's own API."""

from __future__ import annotations

from pathlib import Path

import yaml

from ratiocinator.execution.metrics import MetricPoint
from ratiocinator.planning.plan import Plan, PlannedArm
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.records import DecisionRecord

SPEC = {"name": "live", "topic": "t", "goal_metric": "score", "maximize": True, "repo_url": ".",
        "runner_script": "run.sh", "replicates": 3, "max_dollars": 2.5, "arms": [{"name": "a"}, {"name": "b"}]}


def ledger_with_runs(path: Path) -> tuple[Ledger, str, int]:
    """Experiment ``live-1``: arms a and b planned × 3; a has scores 1 and 2 and a run in flight that has
    streamed two points, b has 0.5 and an oom failure; $0.50 reserved of $2.50. Returns (ledger, id, live run)."""
    ledger = Ledger(path)
    exp = ledger.create_experiment(id="live-1", name="live", spec_path="s.yaml", spec_text=yaml.safe_dump(SPEC),
                                   spec_sha256="0", backend="local")
    plan = Plan((PlannedArm("a", {}), PlannedArm("b", {})), "a", 3)
    ledger.record_decision(exp.id, DecisionRecord(1, "spec", "the spec's arms", plan.to_json()))
    ledger.record_arms(exp.id, 1, plan.arms, "a")
    arm_ids = {a.name: a.id for a in ledger.arms(exp.id)}

    def run(arm: str, replicate: int, **finish: object) -> int:
        run_id = ledger.start_run(experiment_id=exp.id, arm_id=arm_ids[arm], replicate=replicate, seed=replicate,
                                  host="h", slot="s0", commit_sha="c", env={}, argv=[], run_root=path.parent)
        if finish:
            ledger.finish_run(run_id, exit_code=0, signal=None, counts={}, cost=None, reason="",
                              **finish)  # type: ignore[arg-type]
        return run_id

    for replicate, score in enumerate((1.0, 2.0)):
        run("a", replicate, status="succeeded", failure=None, final={"score": score})
    run("b", 0, status="succeeded", failure=None, final={"score": 0.5})
    run("b", 1, status="failed", failure="oom", final={})
    live = run("a", 2)
    ledger.add_points(live, [MetricPoint("score", 0.25, 1, 0), MetricPoint("score", 0.75, 2, 1)])
    ledger.reserve(exp.id, amount=0.5, limit=2.5, kind="run")
    return ledger, exp.id, live
