"""Whether an orchestrator still holds its lock, read without taking it."""

from __future__ import annotations

import fcntl
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ratiocinator.store.liveness import lock_held

HOLDER = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(f"pid {os.getpid()}"); handle.flush()
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.subprocess
def test_a_lock_is_held_while_its_holder_lives_and_free_after_a_kill_9(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "e1.lock"
    assert not lock_held(lock)  # no file: nobody ran it
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert lock_held(lock)
        with open(lock) as probe:  # looking took no lock: an orchestrator starting now is not refused
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert not lock_held(lock)  # the kernel dropped the dead holder's lock
    assert lock.read_text().startswith("pid ")  # the dead holder's file stays, and says nothing alive
    with open(lock) as taker:
        fcntl.flock(taker, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the next orchestrator takes it at once


def test_status_shows_a_running_experiment_whose_orchestrator_died_as_orphaned(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from liveledger import ledger_with_runs
    from ratiocinator.cli import app
    from ratiocinator.pipeline import experiment_lock
    from ratiocinator.store.paths import Paths

    ledger, exp_id, _ = ledger_with_runs(tmp_path / "ledger.db")
    ledger.update_experiment(exp_id, status="running")
    with experiment_lock(Paths(tmp_path).lock(exp_id)):  # alive: its runs are running
        alive = CliRunner().invoke(app, ["--home", str(tmp_path), "status", exp_id])
    assert alive.exit_code == 0 and "orphaned" not in alive.output and "running" in alive.output
    dead = CliRunner().invoke(app, ["--home", str(tmp_path), "status", exp_id])
    assert dead.exit_code == 0, dead.output
    assert f"{exp_id} orphaned" in dead.output and "the same command (ratiocinator research s.yaml)" in dead.output
    assert "orphaned" in dead.output.split("why")[1]  # the run left running, in the table
    listed = CliRunner().invoke(app, ["--home", str(tmp_path), "status"])
    assert listed.exit_code == 0 and "orphaned" in listed.output
