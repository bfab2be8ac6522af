"""Faults of the machine get a clear error (what, where, the fix; exit 1; no traceback) and lose
nothing: a read-only home, a full disk, a damaged ledger; and a run whose completion the disk
refused is recorded from its own outcome file on resume, not run again.

The read-only and full-disk cases mount a small tmpfs (root only; skipped elsewhere).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.local import LocalBackend
from ratiocinator.execution import outcomes
from ratiocinator.pipeline import Research, reconcile
from ratiocinator.spec.models import load_spec
from ratiocinator.store.ledger import Ledger

RUNNER = """#!/usr/bin/env bash
echo "run $RATIOCINATOR_ARM $RATIOCINATOR_SEED" >> "$INVOCATION_LOG"
echo "METRICS: {\\"score\\": ${K:-0}}"
"""


def _mount(path: Path, options: str) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount(disk, "size=4m")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _study(study: Study, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    study.commit({"run.sh": RUNNER})
    log = tmp_path / "invocations.log"
    spec = study.spec(factors={"K": [1, 2, 3]}, replicates=2, seed_env=None, pass_env=["INVOCATION_LOG"])
    return spec, {"INVOCATION_LOG": str(log)}


def _invocations(env: dict[str, str]) -> list[str]:
    path = Path(env["INVOCATION_LOG"])
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.subprocess
@pytest.mark.latex
def test_a_read_only_home_is_a_clear_error_and_the_study_resumes_once_writable(
        small_disk: Path, study: Study, tmp_path: Path) -> None:
    spec, env = _study(study, tmp_path)
    home = small_disk / "home"
    first = study.cli("--home", str(home), "research", str(spec), "--skip-check", env=env)
    assert first.returncode == 0, first.stderr
    ran = _invocations(env)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        again = study.cli("--home", str(home), "research", str(spec), "--new", "--skip-check", env=env)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
        assert "read-only" in again.stderr and str(home) in again.stderr and "hint:" in again.stderr
        status = study.cli("--home", str(home), "status", env=env)
        assert "Traceback" not in status.stderr
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    done = study.cli("--home", str(home), "research", str(spec), "--new", "--skip-check", env=env)
    assert done.returncode == 0, done.stderr
    assert len(_invocations(env)) == 2 * len(ran)  # the second experiment ran once, nothing twice


@pytest.mark.subprocess
@pytest.mark.latex
def test_a_full_disk_is_a_clear_error_and_a_finished_run_never_runs_again(
        small_disk: Path, study: Study, tmp_path: Path) -> None:
    spec, env = _study(study, tmp_path)
    home = small_disk / "home"
    home.mkdir()
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as fh:  # leave about 200 kB: enough to start, not to finish
        fh.write(b"\0" * max(free - 200_000, 0))
    failed = study.cli("--home", str(home), "research", str(spec), "--skip-check", env=env)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stdout + failed.stderr
    assert "disk is full" in failed.stderr or "cannot write the ledger" in failed.stderr, failed.stderr
    filler.unlink()  # the user frees space
    done = study.cli("--home", str(home), "research", str(spec), "--skip-check", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = Ledger(home / "ledger.db")
    runs = ledger.runs(ledger.experiments()[-1].id)
    finished = [r for r in runs if r.status in ("succeeded", "failed")]
    assert len(finished) == 6
    # Every replicate reached the runner at most once after it had finished once.
    started = _invocations(env)
    assert len(started) == len(set(started)) + sum(r.status == "interrupted" for r in runs)


@pytest.mark.latex
def test_a_run_whose_completion_the_ledger_refused_is_recorded_from_the_outcome_journal(
        study: Study, tmp_path: Path) -> None:
    spec, env = _study(study, tmp_path)
    os.environ["INVOCATION_LOG"] = env["INVOCATION_LOG"]
    try:
        outcome = Research(load_spec(spec), study.home, backend=LocalBackend(study.home), check=False).run()
    finally:
        del os.environ["INVOCATION_LOG"]
    assert outcome.status == "completed"
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    run = ledger.runs(exp.id)[0]
    recorded = outcomes.kept(Path(run.log_dir).parent).get(run.id)
    assert recorded is not None and recorded.status == run.status and recorded.final["score"] == 1
    # As if the disk had refused the completion: the ledger still says running.
    ledger.db.execute("UPDATE runs SET status = 'running', ended_at = NULL WHERE id = ?", (run.id,))
    ledger.db.execute("DELETE FROM run_metrics WHERE run_id = ?", (run.id,))
    again = reconcile(ledger, LocalBackend(study.home), ledger.experiment(exp.id), 0.0, 30)
    assert again == 0  # nothing to run again
    fixed = ledger.run(run.id)
    assert fixed.status == "succeeded" and ledger.run_metrics(exp.id)[run.id]["score"][0] == 1
    assert any(e["kind"] == "recovered" for e in ledger.events(exp.id))
    # A study an earlier version left so kept the outcome in the run's folder: it is recorded from there.
    journal = Path(run.log_dir).parent / outcomes.JOURNAL
    legacy = next(json.loads(line) for line in journal.read_text().splitlines() if json.loads(line)["run_id"] == run.id)
    del legacy["run_id"]
    journal.unlink()
    (Path(run.log_dir) / outcomes.LEGACY_FILE).write_text(json.dumps(legacy))
    ledger.db.execute("UPDATE runs SET status = 'running', ended_at = NULL WHERE id = ?", (run.id,))
    assert reconcile(ledger, LocalBackend(study.home), ledger.experiment(exp.id), 0.0, 30) == 0
    assert ledger.run(run.id).status == "succeeded"


@pytest.mark.subprocess
@pytest.mark.latex
def test_a_damaged_ledger_says_how_to_recover(study: Study) -> None:
    study.home.mkdir(parents=True)
    (study.home / "ledger.db").write_bytes(b"SQLite format 3\0" + os.urandom(4096))
    done = study.cli("status")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "damaged" in done.stderr and ".recover" in done.stderr and "backup" in done.stderr


HANGING = """#!/usr/bin/env bash
echo $$ > "$RATIOCINATOR_OUT_DIR/pid"
sleep 600
"""


@pytest.mark.subprocess
@pytest.mark.latex
def test_a_hung_run_is_gone_by_its_deadline_after_the_orchestrator_is_killed(study: Study) -> None:
    import signal
    import sys
    import time

    from conftest import process_alive

    study.commit({"run.sh": HANGING})
    spec = study.spec(train_timeout_s=3, failure_policy={"max_attempts": 1})
    proc = subprocess.Popen([sys.executable, "-m", "ratiocinator", "--home", str(study.home), "research", str(spec),
                             "--skip-check"], cwd=study.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(study.home.glob("runs/*/*/out/pid")):
            time.sleep(0.05)
        (pid_file,) = study.home.glob("runs/*/*/out/pid")
        time.sleep(0.2)
        runner = int(pid_file.read_text())
        started = time.monotonic()
        proc.send_signal(signal.SIGKILL)  # nobody is watching the run any more
        proc.wait(10)
        while process_alive(runner) and time.monotonic() - started < 30:
            time.sleep(0.1)
        assert not process_alive(runner), "the hung run outlived its deadline"
        assert time.monotonic() - started < 3 + 2 + 5 + 3  # timeout + slack + grace, whatever is left of it
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_ssh_hosts_supervisor_stops_a_run_at_its_deadline_on_its_own() -> None:
    import signal
    import time

    from ratiocinator.backends.remote import _wait

    hung = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 60 & wait"], start_new_session=True)
    started = time.monotonic()
    code = _wait(hung, 0.5)  # the host's supervisor, with no orchestrator to ask it
    assert code == -signal.SIGKILL  # TERM was ignored, so the group was killed 5 s later
    assert 5.0 <= time.monotonic() - started < 15
    quick = subprocess.Popen(["true"], start_new_session=True)
    assert _wait(quick, 30) == 0
