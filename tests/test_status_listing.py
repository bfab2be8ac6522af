"""`status` of a study with more runs than a screen lists what matters (every running run, the latest
failures, the latest runs) and says how many runs there are of each status; `runs` lists them all."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from ratiocinator.cli import STATUS_FAILURES_SHOWN, STATUS_RUNS_SHOWN, app
from ratiocinator.planning.plan import PlannedArm
from ratiocinator.store.ledger import Ledger

SPEC = {"name": "big", "topic": "many runs", "goal_metric": "score", "maximize": True, "repo_url": ".",
        "runner_script": "run.sh", "arms": [{"name": "a", "env": {"LR": "0.1"}}]}


def _study(home: Path, statuses: list[str]) -> str:
    """One arm, a run per status in order; a failed run's reason names its run."""
    ledger = Ledger(home / "ledger.db")
    ledger.create_experiment(id="big-00000001", name="big", spec_path="big.yaml", spec_text=yaml.safe_dump(SPEC),
                             spec_sha256="0" * 64, backend="local")
    ledger.update_experiment("big-00000001", status="running", commit_sha="b" * 40)
    ledger.record_arms("big-00000001", 1, [PlannedArm("a", {"LR": "0.1"})], "a")
    arm_id = ledger.arms("big-00000001")[0].id
    for replicate, status in enumerate(statuses):
        run_id = ledger.start_run(experiment_id="big-00000001", arm_id=arm_id, replicate=replicate, seed=replicate,
                                  host="local", slot="slot0", commit_sha="b" * 40, env={}, argv=["run.sh"],
                                  run_root=home / "runs")
        if status != "running":
            failed = status == "failed"
            ledger.finish_run(run_id, status=status, failure="runtime_error" if failed else None,
                              reason=f"crash in run {run_id}" if failed else "", exit_code=1 if failed else 0,
                              signal=None, final={"score": 1.0}, counts={"score": 1}, cost=0.0, points=[])
    ledger.close()
    return "big-00000001"


def _listed(output: str) -> list[int]:
    """The run ids of the table's rows (a row: run id, then the arm)."""
    rows = [line.split() for line in output.splitlines()]
    return [int(row[0]) for row in rows if len(row) > 1 and row[0].isdigit() and row[1] == "a"]


def test_a_big_study_lists_running_runs_latest_failures_and_latest_runs(tmp_path: Path) -> None:
    # runs 1-40 failed, 41-118 succeeded, 119 and 2 (an early one) still running
    statuses = ["failed"] * 40 + ["succeeded"] * 78 + ["running"]
    statuses[1] = "running"
    exp = _study(tmp_path, statuses)
    done = CliRunner().invoke(app, ["--home", str(tmp_path), "status", exp], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    listed = _listed(done.output)
    assert len(listed) == STATUS_RUNS_SHOWN and listed == sorted(listed)
    latest_failures = [n for n in range(40, 0, -1) if n != 2][:STATUS_FAILURES_SHOWN]
    assert {2, 119} | set(latest_failures) <= set(listed)
    assert listed[-(STATUS_RUNS_SHOWN - 2 - STATUS_FAILURES_SHOWN):] == list(range(92, 120))  # then the latest
    assert "119 runs: 78 succeeded, 39 failed, 2 running; 69 not shown here" in done.output
    assert f"`ratiocinator runs {exp}` lists every one" in done.output
    assert "failures by class: runtime_error 39" in done.output  # counted over every run, shown or not


def test_a_study_that_fits_lists_every_run_and_no_summary(tmp_path: Path) -> None:
    exp = _study(tmp_path, ["succeeded"] * STATUS_RUNS_SHOWN)
    done = CliRunner().invoke(app, ["--home", str(tmp_path), "status", exp], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert _listed(done.output) == list(range(1, STATUS_RUNS_SHOWN + 1))
    assert "not shown" not in done.output
