"""runs.json, runs.csv and results.tsv from the ledger of a real `ratiocinator research` run."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from conftest import Study
from gitrepo import GitRepo
from ratiocinator.errors import UsageError
from ratiocinator.report.exports import (
    RUN_COLUMNS,
    results_tsv_rows,
    run_records,
    write_results_tsv,
    write_runs_csv,
    write_runs_json,
)
from ratiocinator.store.ledger import Ledger, RunRow

pytestmark = pytest.mark.subprocess

RUNNER = """
import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--tag", default="")
args = parser.parse_args()
mode = os.environ.get("MODE", "ok")
note = os.environ.get("NOTE", "")
width = int(os.environ.get("WIDTH", "4"))
seed = int(os.environ["RATIOCINATOR_SEED"])
print("METRICS: " + json.dumps({"step": 1, "loss": 1.0 + seed}))
if mode == "crash":
    print("RuntimeError: CUDA out of memory", file=sys.stderr)
    sys.exit(3)
if mode == "nan":
    print('METRICS: {"score": NaN, "peak_vram_mb": 4096}')
    sys.exit(0)
final = {
    "score": {"ok": 0.8, "alt": 0.7}[mode] + width / 100 + seed * 0.0123456789,
    "peak_vram_mb": 1536 + 512 * seed,
    "tag_len": len(args.tag),
    "note_len": len(note),
}
if mode == "alt":
    final.update(memory_gb=3.3, grad_norm=float("inf"))
print("METRICS: " + json.dumps(final))
"""

NOTE = 'a,b "quoted"; x'  # a comma and a quote must survive CSV quoting
ARM_STATUS = {"base": "keep", "alt": "discard", "WIDTH=8": "discard"}


@dataclass
class Exported:
    study: Study
    ledger: Ledger
    exp_id: str
    runs: list[RunRow]
    head: str

    def run(self, arm: str, replicate: int) -> RunRow:
        return next(r for r in self.runs if r.arm == arm and r.replicate == replicate)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """One real study shared by the tests (each study is a real subprocess run; they read, never write)."""
    root = tmp_path_factory.mktemp("exports")
    repo = GitRepo(root / "repo")
    repo.commit({"README.md": "target\n"}, "init")
    study = Study(root=root, repo=repo, home=root / "home")  # as the `study` fixture builds it
    study.commit({"run.py": RUNNER})
    spec = study.spec(
        runner_script="run.py",
        replicates=2,
        concurrency=4,
        arms=[
            {"name": "base", "env": {"NOTE": NOTE}, "args": {"--tag": "two words"},
             "description": "the\tbaseline\nconfig"},
            {"name": "alt", "env": {"MODE": "alt"}, "description": "alternative"},
            {"name": "crash", "env": {"MODE": "crash"}},
            {"name": "nan", "env": {"MODE": "nan"}},
        ],
        factors={"WIDTH": [8]},
    )
    done = study.cli("research", str(spec), "--skip-check", timeout=180)  # some arms are meant to fail
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = study.ledger()
    exp_id = ledger.experiments()[-1].id
    runs = ledger.runs(exp_id)
    assert len(runs) == 10
    return Exported(study=study, ledger=ledger, exp_id=exp_id, runs=runs, head=repo.head())


def _strict_json(text: str) -> object:
    def refuse(token: str) -> object:
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_runs_json_has_one_faithful_record_per_run(exported: Exported, tmp_path: Path) -> None:
    path = tmp_path / "out" / "runs.json"
    write_runs_json(exported.ledger, exported.exp_id, path)
    document = _strict_json(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict) and document["experiment_id"] == exported.exp_id
    records = document["runs"]
    assert records == run_records(exported.ledger, exported.exp_id)
    assert [r["run_id"] for r in records] == [r.id for r in exported.runs]
    finals = exported.ledger.run_metrics(exported.exp_id)

    for record, run in zip(records, exported.runs, strict=True):
        assert (record["arm"], record["replicate"], record["attempt"]) == (run.arm, run.replicate, 1)
        assert record["seed"] == run.seed == run.replicate
        assert (record["status"], record["failure"], record["reason"]) == (run.status, run.failure, run.reason)
        assert (record["exit_code"], record["signal"], record["cost_usd"]) == (run.exit_code, run.signal, run.cost)
        assert record["commit"] == exported.head and record["experiment_id"] == exported.exp_id
        assert (record["host"], record["slot"]) == (run.host, run.slot)
        assert (record["log_dir"], record["out_dir"]) == (run.log_dir, run.out_dir)
        started, ended = (datetime.fromisoformat(record[k]) for k in ("started_at", "ended_at"))
        assert started.tzinfo == UTC and ended.tzinfo == UTC
        assert started.timestamp() == pytest.approx(run.started_at, abs=1e-6)
        assert ended.timestamp() == pytest.approx(run.ended_at, abs=1e-6)
        assert record["duration_s"] == pytest.approx(run.ended_at - run.started_at) and record["duration_s"] >= 0
        assert record["is_baseline"] is (run.arm == "base")
        assert record["iteration"] == 1  # the pipeline counts iterations from 1
        expected = finals.get(run.id, {})
        assert record["metrics"] == {name: value for name, (value, _) in sorted(expected.items())}
        assert record["nonfinite_metrics"] == sorted(name for name, (_, finite) in expected.items() if not finite)

    by = {(r["arm"], r["replicate"]): r for r in records}
    base = by["base", 1]
    assert base["status"] == "succeeded" and base["failure"] is None
    assert base["knobs"] == {"NOTE": NOTE} and base["args"] == ["--tag", "two words"] and base["factors"] == {}
    assert base["description"] == "the\tbaseline\nconfig"
    assert base["metrics"]["score"] == pytest.approx(0.84 + 0.0123456789)
    assert base["metrics"]["tag_len"] == len("two words") and base["metrics"]["note_len"] == len(NOTE)
    assert base["metrics"]["peak_vram_mb"] == 2048 and base["nonfinite_metrics"] == []
    width = by["WIDTH=8", 0]
    assert width["knobs"] == {"WIDTH": "8"} and width["factors"] == {"WIDTH": "8"} and width["args"] == []
    crash = by["crash", 0]
    assert (crash["status"], crash["failure"], crash["exit_code"]) == ("failed", "oom", 3)
    assert "CUDA out of memory" in crash["reason"] and "score" not in crash["metrics"]
    nan = by["nan", 1]
    assert (nan["status"], nan["failure"]) == ("failed", "nan_divergence")
    assert nan["metrics"]["score"] is None and nan["nonfinite_metrics"] == ["score"]
    alt = by["alt", 0]
    assert (alt["status"] == "succeeded" and alt["metrics"]["grad_norm"] is None
            and alt["nonfinite_metrics"] == ["grad_norm"])


def test_runs_csv_columns_and_values_round_trip(exported: Exported, tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    write_runs_csv(exported.ledger, exported.exp_id, path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    # "step" is the points' step index, not a metric of its own
    metrics = ["grad_norm", "loss", "memory_gb", "note_len", "peak_vram_mb", "score", "tag_len"]
    assert reader.fieldnames == [*RUN_COLUMNS, "knob.MODE", "knob.NOTE", "knob.WIDTH", "factor.WIDTH", "args",
                                 *(f"metric.{m}" for m in metrics)]
    assert [int(row["run_id"]) for row in rows] == [r.id for r in exported.runs]
    finals = exported.ledger.run_metrics(exported.exp_id)

    for row, run in zip(rows, exported.runs, strict=True):
        assert (row["arm"], row["status"], row["failure"]) == (run.arm, run.status, run.failure or "")
        assert (int(row["replicate"]), int(row["seed"]), int(row["attempt"])) == (run.replicate, run.seed, run.attempt)
        assert row["exit_code"] == ("" if run.exit_code is None else str(run.exit_code))
        assert row["reason"] == run.reason and row["commit"] == exported.head
        assert row["is_baseline"] == ("true" if run.arm == "base" else "false")
        assert float(row["duration_s"]) == run.ended_at - run.started_at  # repr round-trips exactly
        assert datetime.fromisoformat(row["started_at"]).timestamp() == pytest.approx(run.started_at, abs=1e-6)
        for name in metrics:
            value, _ = finals.get(run.id, {}).get(name, (None, True))
            assert row[f"metric.{name}"] == ("" if value is None else repr(value))
            if value is not None:
                assert float(row[f"metric.{name}"]) == value
        nonfinite = sorted(n for n, (_, finite) in finals.get(run.id, {}).items() if not finite)
        assert row["nonfinite_metrics"] == ";".join(nonfinite)

    by = {(row["arm"], int(row["replicate"])): row for row in rows}
    base = by["base", 0]
    assert base["knob.NOTE"] == NOTE and base["knob.MODE"] == "" and base["knob.WIDTH"] == ""
    assert base["args"] == "--tag 'two words'" and shlex.split(base["args"]) == ["--tag", "two words"]
    assert base["description"] == "the\tbaseline\nconfig"
    assert by["WIDTH=8", 1]["factor.WIDTH"] == "8" and by["WIDTH=8", 1]["knob.WIDTH"] == "8"
    assert by["WIDTH=8", 1]["args"] == "" and base["factor.WIDTH"] == ""
    assert by["nan", 0]["metric.score"] == "" and by["nan", 0]["nonfinite_metrics"] == "score"
    assert by["alt", 1]["metric.grad_norm"] == "" and by["alt", 1]["nonfinite_metrics"] == "grad_norm"
    assert by["crash", 1]["metric.score"] == "" and by["crash", 1]["failure"] == "oom"
    for row in rows:  # a metric cell is empty or a finite number, never the text nan/inf
        assert all(row[c] == "" or math.isfinite(float(row[c])) for c in row if c.startswith("metric."))


def test_results_tsv_is_the_autoresearch_format(exported: Exported, tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"
    write_results_tsv(exported.ledger, exported.exp_id, path, goal_metric="score", arm_status=ARM_STATUS)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 1 + len(exported.runs)
    assert lines[0] == "commit\tscore\tmemory_gb\tstatus\tdescription"
    rows = [tuple(line.split("\t")) for line in lines[1:]]
    assert all(len(row) == 5 for row in rows)
    assert rows == results_tsv_rows(exported.ledger, exported.exp_id, goal_metric="score", arm_status=ARM_STATUS)
    by = {(run.arm, run.replicate): row for run, row in zip(exported.runs, rows, strict=True)}
    sha = exported.head[:7]

    assert by["base", 0] == (sha, "0.840000", "1.5", "keep", "base: the baseline config (replicate 0, seed 0)")
    assert by["base", 1] == (sha, "0.852346", "2.0", "keep", "base: the baseline config (replicate 1, seed 1)")
    assert by["WIDTH=8", 1] == (sha, "0.892346", "2.0", "discard", "WIDTH=8: WIDTH = 8 (replicate 1, seed 1)")
    # memory_gb is preferred over peak_vram_mb
    assert by["alt", 0] == (sha, "0.740000", "3.3", "discard", "alt: alternative (replicate 0, seed 0)")
    crash = by["crash", 1]
    assert crash[:4] == (sha, "0.000000", "0.0", "crash")
    assert crash[4].startswith("crash (replicate 1, seed 1) — oom: ") and "CUDA out of memory" in crash[4]
    nan = by["nan", 0]
    assert nan[:4] == (sha, "0.000000", "0.0", "crash")  # its peak_vram_mb is not reported for a crash
    assert nan[4].startswith("nan (replicate 0, seed 0) — nan_divergence: ")
    for (arm, _), row in by.items():
        assert (row[3] == "crash") == (arm in ("crash", "nan"))
        assert len(row[1].split(".")[1]) == 6 and len(row[2].split(".")[1]) == 1


def test_results_tsv_goal_metric_decides_what_crashed(exported: Exported) -> None:
    rows = results_tsv_rows(exported.ledger, exported.exp_id, goal_metric="grad_norm", arm_status=ARM_STATUS)
    alt = rows[exported.runs.index(exported.run("alt", 0))]
    assert alt[1:4] == ("0.000000", "0.0", "crash") and "— nan_divergence: the final grad_norm is not finite" in alt[4]
    base = rows[exported.runs.index(exported.run("base", 0))]
    assert base[3] == "crash" and base[4].endswith("— no_metrics: no grad_norm was reported")
    # Only arms with a result need a status: every run crashed on this metric, so none is asked for.
    assert all(row[3] == "crash" for row in results_tsv_rows(
        exported.ledger, exported.exp_id, goal_metric="absent", arm_status={}))


def test_results_tsv_refuses_a_missing_or_unknown_arm_status(exported: Exported, tmp_path: Path) -> None:
    path = tmp_path / "results.tsv"
    write_results_tsv(exported.ledger, exported.exp_id, path, goal_metric="score", arm_status=ARM_STATUS)
    before = path.read_bytes()
    missing = {k: v for k, v in ARM_STATUS.items() if k != "alt"}
    with pytest.raises(ValueError, match="'alt'"):
        write_results_tsv(exported.ledger, exported.exp_id, path, goal_metric="score", arm_status=missing)
    with pytest.raises(ValueError, match=r"'base'.*'maybe'"):
        results_tsv_rows(exported.ledger, exported.exp_id, goal_metric="score",
                         arm_status={**ARM_STATUS, "base": "maybe"})
    assert path.read_bytes() == before  # a failed export leaves the previous file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tsv"]  # and no temporary file


def test_writes_are_atomic_and_readable(exported: Exported, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    for name, write in (("runs.json", write_runs_json), ("runs.csv", write_runs_csv)):
        target = tmp_path / name
        target.write_text("stale and longer than nothing " * 10_000)
        write(exported.ledger, exported.exp_id, target)
        assert "stale" not in target.read_text(encoding="utf-8")
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv", "runs.json"]


def test_an_unfinished_attempt_and_an_unknown_experiment(exported: Exported, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")  # a copy, so the shared study stays as it ran
    exported.ledger.db.backup(ledger.db)
    base = exported.run("base", 0)
    run_id = ledger.start_run(
        experiment_id=exported.exp_id, arm_id=base.arm_id, replicate=0, seed=0, host=base.host, slot=base.slot,
        commit_sha=base.commit_sha, env={"NOTE": NOTE}, argv=[], run_root=tmp_path / "runs",
    )
    record = run_records(ledger, exported.exp_id)[-1]
    assert (record["run_id"], record["status"], record["attempt"]) == (run_id, "running", 2)
    assert record["ended_at"] is None and record["duration_s"] is None
    assert record["metrics"] == {} and record["nonfinite_metrics"] == [] and record["failure"] is None
    write_runs_json(ledger, exported.exp_id, tmp_path / "runs.json")
    assert _strict_json((tmp_path / "runs.json").read_text())["runs"][-1]["ended_at"] is None  # type: ignore[index]
    write_runs_csv(ledger, exported.exp_id, tmp_path / "runs.csv")
    with (tmp_path / "runs.csv").open(newline="") as fh:
        last = list(csv.DictReader(fh))[-1]
    assert (last["status"], last["ended_at"], last["duration_s"]) == ("running", "", "")
    row = results_tsv_rows(ledger, exported.exp_id, goal_metric="score", arm_status=ARM_STATUS)[-1]
    assert row[1:4] == ("0.000000", "0.0", "crash") and row[4].endswith("(replicate 0, seed 0) — running")

    with pytest.raises(UsageError, match="no-such-experiment"):
        run_records(ledger, "no-such-experiment")
