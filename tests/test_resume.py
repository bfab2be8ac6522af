"""Interrupting the orchestrator (kill -9, Ctrl-C) and resuming with the same command."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import CLI, Study, process_alive

pytestmark = pytest.mark.subprocess

SLOW_RUNNER = """
#!/usr/bin/env bash
if [ "$RATIOCINATOR_TRIAL" = 1 ]; then
  echo "smoke $RATIOCINATOR_ARM" >> "$INVOCATION_LOG"
  echo "METRICS: {\\"score\\": ${K:-0}}"
  exit 0
fi
echo "start $RATIOCINATOR_ARM $RATIOCINATOR_SEED $$" >> "$INVOCATION_LOG"
if [ -n "${GATE:-}" ]; then  # held until the test opens the gate (at most 60 s)
  for _ in $(seq 1200); do [ -e "$GATE" ] && break; sleep 0.05; done
else
  sleep "${NAP:-2}"
fi
echo "end $RATIOCINATOR_ARM $RATIOCINATOR_SEED $$" >> "$INVOCATION_LOG"
echo "METRICS: {\\"score\\": ${K:-0}}"
"""


def _statuses(db: Path) -> Counter[str]:
    if not db.exists():
        return Counter()
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return Counter(row[0] for row in conn.execute("SELECT status FROM runs"))
    except sqlite3.OperationalError:  # schema not created yet
        return Counter()


def _start(study: Study, spec: Path, log: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "--home", str(study.home), "research", str(spec)], cwd=study.root, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "INVOCATION_LOG": str(log), **env},
    )


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def _finished_replicates(study: Study) -> Counter[tuple[str, int]]:
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    return Counter((r.arm, r.replicate) for r in ledger.runs(exp.id) if r.status in ("succeeded", "failed"))


def test_kill_9_then_rerun_resumes_without_rerunning_finished_runs(study: Study) -> None:
    study.commit({"run.sh": SLOW_RUNNER})
    spec = study.spec(factors={"K": [1, 2, 3, 4, 5]}, replicates=2, concurrency=2, seed_env=None,
                      pass_env=["INVOCATION_LOG"])
    log = study.root / "invocations.log"
    db = study.home / "ledger.db"
    first = _start(study, spec, log)
    _wait_for(lambda: _statuses(db)["succeeded"] >= 3 and _statuses(db)["running"] >= 1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    before = {r.id: (r.arm, r.replicate) for r in ledger.runs(exp.id) if r.status == "succeeded"}
    orphans = [r for r in ledger.runs(exp.id) if r.status == "running"]
    assert orphans, "the kill should have left runs in flight"

    second = subprocess.run(
        [*CLI, "--home", str(study.home), "research", str(spec)], cwd=study.root, text=True, capture_output=True,
        env={**os.environ, "INVOCATION_LOG": str(log)}, timeout=120,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout

    ledger = study.ledger()
    runs = ledger.runs(exp.id)
    assert ledger.experiments()[-1].status == "completed" and len(ledger.experiments()) == 1
    finished = _finished_replicates(study)
    # every planned run recorded exactly once as finished, none twice
    assert finished == Counter({(f"K={k}", r): 1 for k in range(1, 6) for r in range(2)})
    # finished runs were kept as they were, not run again
    after = {r.id: (r.arm, r.replicate) for r in runs if r.status == "succeeded"}
    assert all(after[run_id] == key for run_id, key in before.items())
    starts = Counter(tuple(line.split()[1:3]) for line in log.read_text().splitlines() if line.startswith("start"))
    for arm, replicate in before.values():
        assert starts[(arm, str(replicate))] == 1, f"{arm} #{replicate} ran twice"
    # the readiness review passed before the kill: the resumed run does not repeat its smoke runs
    smoke = Counter(line.split()[1] for line in log.read_text().splitlines() if line.startswith("smoke"))
    assert smoke == Counter({f"K={k}": 1 for k in range(1, 6)})
    # the in-flight runs became `interrupted` attempts and were run again as new attempts
    for orphan in orphans:
        row = ledger.run(orphan.id)
        assert row.status == "interrupted" and "orchestrator stopped" in row.reason
        retry = [r for r in runs if (r.arm, r.replicate) == (orphan.arm, orphan.replicate) and r.status == "succeeded"]
        assert len(retry) == 1 and retry[0].attempt == orphan.attempt + 1
        assert not process_alive(orphan.pid)
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0


def test_ctrl_c_interrupts_cleanly_and_the_rerun_finishes(study: Study) -> None:
    study.commit({"run.sh": SLOW_RUNNER})
    spec = study.spec(factors={"K": [1, 2, 3]}, concurrency=2, pass_env=["INVOCATION_LOG"])
    log = study.root / "invocations.log"
    db = study.home / "ledger.db"
    first = _start(study, spec, log)
    _wait_for(lambda: _statuses(db)["running"] >= 2)
    time.sleep(0.3)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=30)
    assert first.returncode == 130, out + err
    assert "Traceback" not in err
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert exp.status == "interrupted"
    interrupted = ledger.runs(exp.id, status="interrupted")
    assert len(interrupted) == 2 and not ledger.runs(exp.id, status="running")
    for run in interrupted:
        assert not process_alive(run.pid)
    rerun = study.cli("research", str(spec), env={"INVOCATION_LOG": str(log)})
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _finished_replicates(study) == Counter({(f"K={k}", 0): 1 for k in (1, 2, 3)})


def test_a_second_orchestrator_on_the_same_experiment_is_refused(study: Study) -> None:
    study.commit({"run.sh": SLOW_RUNNER})
    spec = study.spec(factors={"K": [1, 2]}, concurrency=1, pass_env=["INVOCATION_LOG", "GATE"])
    log, gate = study.root / "invocations.log", study.root / "gate"
    first = _start(study, spec, log, GATE=str(gate))  # its runs last until the second command has answered
    try:
        _wait_for(lambda: _statuses(study.home / "ledger.db")["running"] >= 1)
        second = study.cli("research", str(spec), env={"INVOCATION_LOG": str(log)})
        assert second.returncode == 2 and "already being run" in second.stderr
    finally:
        gate.touch()
        first.communicate(timeout=60)
    assert first.returncode == 0
    assert _finished_replicates(study) == Counter({("K=1", 0): 1, ("K=2", 0): 1})
