"""`ratiocinator export`: MLflow runs written to a real SQLite tracking store and read back with MLflow's
own client, and the step-level series as CSV (standard library only) and Parquet."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import small_ledger
from ratiocinator.export.mlflow_export import export_mlflow
from ratiocinator.export.series import SERIES_COLUMNS, write_series_csv, write_series_parquet
from ratiocinator.store.ledger import Ledger

mlflow = pytest.importorskip("mlflow")
pq = pytest.importorskip("pyarrow.parquet")

CLI = [sys.executable, "-m", "ratiocinator"]
ATTEMPTS = "tags.`ratiocinator.kind` = 'attempt'"


def _uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _cli(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--home", str(home), "export", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "MLFLOW_TRACKING_URI": ""})


# -- the quickstart, through the CLI ------------------------------------------------------------------


@pytest.mark.subprocess
def test_quickstart_to_mlflow_reads_back_27_runs_with_knobs_goal_and_series(quickstart_home: Path,
                                                                            tmp_path: Path) -> None:
    uri = _uri(tmp_path)
    done = _cli(quickstart_home, "quickstart", "--to", "mlflow", "--tracking-uri", uri, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "9 arm runs, 27 attempt runs" in done.stdout and f"mlflow ui --backend-store-uri {uri}" in done.stdout

    mlflow.set_tracking_uri(uri)
    try:
        attempts = mlflow.search_runs(experiment_names=["quickstart"], filter_string=ATTEMPTS)
        arms = mlflow.search_runs(experiment_names=["quickstart"], filter_string="tags.`ratiocinator.kind` = 'arm'")
        top = mlflow.search_runs(experiment_names=["quickstart"],
                                 filter_string="tags.`ratiocinator.kind` = 'experiment'")
    finally:
        mlflow.set_tracking_uri(None)
    assert len(attempts) == 27 and len(arms) == 9 and len(top) == 1
    assert set(attempts["status"]) == {"FINISHED"} and set(attempts["tags.status"]) == {"succeeded"}
    assert attempts["metrics.val_r2"].notna().all()
    assert {(d, w) for d, w in zip(attempts["params.DEPTH"], attempts["params.WIDTH"], strict=True)} == {
        (d, w) for d in ("1", "2", "4") for w in ("4", "16", "64")}
    assert sorted(attempts["params.seed"].astype(int)) == sorted([0, 1, 2] * 9)
    assert len(set(attempts["tags.commit"])) == 1 and len(attempts["tags.commit"][0]) == 40

    # Nesting: attempt -> its arm's run -> the experiment's run.
    arm_run = dict(zip(arms["tags.arm"], arms["run_id"], strict=True))
    assert set(arms["tags.mlflow.parentRunId"]) == {top["run_id"][0]}
    assert all(arm_run[a] == p for a, p in zip(attempts["tags.arm"], attempts["tags.mlflow.parentRunId"],
                                               strict=True))
    baseline = arms[arms["tags.is_baseline"] == "true"]
    assert list(baseline["tags.arm"]) == ["DEPTH=1,WIDTH=16"] and baseline["metrics.val_r2.ci95_low"].notna().all()

    # Every streamed point with its step, as the ledger holds it.
    ledger = Ledger(quickstart_home / "ledger.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        for _, row in attempts.iterrows():
            run_id = int(row["tags.ratiocinator.run_id"])
            expected = [(step, value) for _, step, value in ledger.points(run_id, "val_r2")]
            history = sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], "val_r2"))
            assert len(expected) >= 10 and history == expected
            assert row["metrics.val_r2"] == pytest.approx(expected[-1][1])
        artifacts = {a.path for a in client.list_artifacts(top["run_id"][0], "report")}
        assert {"report/paper.html", "report/paper.md", "report/runs.csv"} <= artifacts
    finally:
        ledger.close()

    again = _cli(quickstart_home, "quickstart", "--to", "mlflow", "--tracking-uri", uri, cwd=tmp_path)
    assert again.returncode == 2 and "already in MLflow experiment 'quickstart'" in again.stderr
    assert "--replace" in again.stderr and "Traceback" not in again.stderr
    replaced = _cli(quickstart_home, "quickstart", "--to", "mlflow", "--tracking-uri", uri, "--replace", cwd=tmp_path)
    assert replaced.returncode == 0 and "37 runs deleted" in replaced.stdout
    assert len(client.search_runs([top["experiment_id"][0]], ATTEMPTS, max_results=1000)) == 27


@pytest.mark.subprocess
def test_quickstart_series_csv_and_parquet_hold_every_point(quickstart_home: Path, tmp_path: Path) -> None:
    done = _cli(quickstart_home, "quickstart", "--to", "csv", "--out", str(tmp_path / "s.csv"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    parquet = _cli(quickstart_home, "quickstart", "--to", "parquet", "--out", str(tmp_path / "s.parquet"),
                   cwd=tmp_path)
    assert parquet.returncode == 0, parquet.stderr
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ledger = Ledger(quickstart_home / "ledger.db")
    try:
        runs = ledger.runs(ledger.find_experiment("quickstart").id)
        expected = sum(len(ledger.points(r.id, name)) for r in runs for name in ledger.point_names(r.id))
        assert len(rows) == expected and f"{expected} metric points" in done.stdout
        curve = [(int(r["step"]), float(r["value"])) for r in rows if r["run_id"] == "1" and r["metric"] == "val_r2"]
        assert curve == [(s, v) for _, s, v in ledger.points(1, "val_r2")]
    finally:
        ledger.close()
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == list(SERIES_COLUMNS) and table.num_rows == len(rows)
    assert table.column("value").to_pylist() == [float(r["value"]) for r in rows]

    wrong = _cli(quickstart_home, "quickstart", "--to", "csv", "--replace", cwd=tmp_path)
    assert wrong.returncode == 2 and "are for --to mlflow" in wrong.stderr


# -- every status, non-finite values, odd names: in process -------------------------------------------


def test_series_files_keep_nan_inf_and_missing_steps(tmp_path: Path) -> None:
    ledger = small_ledger.build(tmp_path)
    n = write_series_csv(ledger, small_ledger.EXPERIMENT, tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert n == len(rows) == 15 and list(rows[0]) == list(SERIES_COLUMNS)
    loss = [(r["step"], r["value"]) for r in rows if r["metric"] == "loss"]
    assert loss == [("", "2.0"), ("", "1.0"), ("", "inf")]
    statuses = {(r["run_id"], r["status"]) for r in rows}
    assert {("3", "failed"), ("4", "interrupted"), ("6", "running")} <= statuses
    assert math.isnan(float(next(r["value"] for r in rows if r["run_id"] == "5" and r["step"] == "2")))

    assert write_series_parquet(ledger, small_ledger.EXPERIMENT, tmp_path / "s.parquet") == n
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [(r["step"], r["value"]) for r in table if r["metric"] == "loss"] == [(None, 2.0), (None, 1.0),
                                                                                  (None, math.inf)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_mlflow_export_keeps_every_status_failure_and_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = small_ledger.build(tmp_path)
    uri = _uri(tmp_path)
    done = export_mlflow(ledger, small_ledger.EXPERIMENT, tracking_uri=uri)
    assert (done.arm_runs, done.attempt_runs, done.points) == (2, 6, 15)
    assert done.renamed_metrics == {"acc@1": "acc_1"} and done.artifacts == ("spec.yaml",)

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = {r.data.tags["ratiocinator.run_id"]: r for r in client.search_runs([done.mlflow_experiment_id], ATTEMPTS)}
    assert {k: r.info.status for k, r in runs.items()} == {"1": "FINISHED", "2": "FINISHED", "3": "FAILED",
                                                          "4": "KILLED", "5": "FINISHED", "6": "RUNNING"}
    failed = runs["3"].data
    assert failed.tags["failure"] == "oom" and failed.tags["reason"] == "out of memory"
    assert failed.params == {"LR": "0.3", "seed": "0"} and failed.tags["arm"] == "b"
    assert runs["6"].info.end_time is None
    loss = [(m.step, m.value) for m in client.get_metric_history(runs["1"].info.run_id, "loss")]
    assert [s for s, _ in loss] == [0, 1, 2] and loss[0][1] == 2.0 and loss[2][1] > 1e300  # +inf, as MLflow keeps it
    assert [m.value for m in client.get_metric_history(runs["2"].info.run_id, "acc_1")] == [0.5]
    assert math.isnan(runs["5"].data.metrics["score"])

    arms = {r.data.tags["arm"]: r for r in client.search_runs([done.mlflow_experiment_id],
                                                                "tags.`ratiocinator.kind` = 'arm'")}
    assert arms["a"].data.tags["is_baseline"] == "true" and arms["a"].info.status == "RUNNING"  # run 6 is running
    assert arms["b"].data.tags["verdict"] == "too few runs" and arms["b"].data.metrics["score.n"] == 0
    assert arms["a"].data.metrics["score.mean"] == pytest.approx(0.325)
    top = client.get_run(done.experiment_run_id)
    assert top.info.status == "RUNNING" and top.data.params["goal_metric"] == "score"
    assert top.data.metrics["runs.failed"] == 1 and top.data.tags["commit"] == small_ledger.COMMIT
    assert (tmp_path / "mlartifacts").is_dir()  # a SQLite store's artifacts go beside it, not into the cwd

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # a relative SQLite URI: the database and its artifacts in the cwd
    relative = export_mlflow(ledger, small_ledger.EXPERIMENT, tracking_uri="sqlite:///rel.db",
                             experiment_name="other")
    assert relative.attempt_runs == 6 and (tmp_path / "cwd" / "rel.db").is_file()
    assert (tmp_path / "cwd" / "mlartifacts").is_dir()
