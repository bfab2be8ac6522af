"""What a researcher sees while `research` runs: the live state read from the ledger, the plain lines
for logs, and the rich panel under a real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Study
from liveledger import ledger_with_runs
from ratiocinator.analysis.live import eta_seconds, live_state, peak_parallel
from ratiocinator.analysis.stats import describe
from ratiocinator.analysis.summary import summarize_experiment
from ratiocinator.errors import UsageError
from ratiocinator.execution.progress import summary_line
from ratiocinator.store.ledger import Ledger

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "quickstart.yaml"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\r")

def test_eta_counts_runs_in_flight_and_queued_over_the_measured_concurrency() -> None:
    assert eta_seconds([], remaining=5, running_elapsed=[], parallel=1) is None  # nothing measured yet
    assert eta_seconds([10.0], remaining=0, running_elapsed=[], parallel=2) == 0.0
    # mean 10 s; two in flight (4 s and 12 s in): 6 + 0 left; 3 queued: 30; over 2 at once
    assert eta_seconds([8.0, 12.0], remaining=5, running_elapsed=[4.0, 12.0], parallel=2) == pytest.approx(18.0)


def test_peak_parallel_is_the_most_runs_ever_in_flight_at_once() -> None:
    class Run:
        def __init__(self, start: float, end: float | None) -> None:
            self.started_at, self.ended_at = start, end
    runs = [Run(0, 10), Run(5, 15), Run(10, 20), Run(12, None)]
    assert peak_parallel(runs, now=30) == 3  # at 12: runs 2, 3 and 4 (run 1 ended at 10, as run 3 started)


def test_live_state_reads_planned_done_best_failures_and_the_latest_point(tmp_path: Path) -> None:
    ledger, exp_id, live = ledger_with_runs(tmp_path / "ledger.db")
    watcher = Ledger(tmp_path / "ledger.db", read_only=True)
    state = live_state(watcher, exp_id)
    assert (state.planned, state.done, len(state.running)) == (6, 4, 1)
    a, b = state.arms
    assert (a.planned, a.done, a.running, a.n, a.mean) == (3, 2, 1, 2, 1.5)
    assert a.ci is not None and a.ci.low < 1.5 < a.ci.high and b.ci is None  # an interval from n = 2 on
    assert state.best is not None and state.best.name == "a"
    assert state.failures == {"oom": 1}
    last = state.running[0].last
    assert state.running[0].run_id == live and last is not None and (last.point.step, last.point.value) == (2, 0.75)
    assert state.overview.goal is not None and state.overview.goal.max_dollars == 2.5
    assert state.overview.reserved == 0.5
    line = summary_line(state)
    assert line.startswith("done 4/6, running 1, ETA ")
    assert "best a score 1.5 ± " in line and "of $2.50" in line and "failures oom 1" in line
    # Between two reads, a line counts the runs seen to finish since the last one (never past what is planned).
    assert summary_line(state, finished_since=1).startswith("done 5/6, ")
    assert summary_line(state, finished_since=9).startswith("done 6/6, ")


def test_the_live_standing_is_the_reports_goal_statistics_arm_by_arm(tmp_path: Path) -> None:
    """NaN and infinite finals, failed, interrupted and running attempts, other metrics: the live view's n,
    mean and t interval per arm are the report's summary of the goal metric, number for number."""
    from small_ledger import EXPERIMENT, build

    ledger = build(tmp_path)
    state = live_state(ledger, EXPERIMENT)
    summary = summarize_experiment(EXPERIMENT, ledger.arms(EXPERIMENT), ledger.runs(EXPERIMENT),
                                   ledger.run_metrics(EXPERIMENT), goal_metric="score", maximize=True)
    for arm in state.arms:
        values = summary.arm(arm.name).metrics["score"].values
        expected = describe(values, bootstrap=False)
        assert (arm.n, arm.mean, arm.ci) == (expected.n, expected.mean, expected.ci), arm.name
    assert [arm.n for arm in state.arms] == [2, 0]  # b succeeded once, ending on NaN: no value, as in the report
    assert state.best is not None and state.best.name == summary.best_arm


@pytest.mark.subprocess
def test_a_sweep_of_one_replicate_per_arm_is_watched_without_loading_numpy(tmp_path: Path) -> None:
    """numpy and scipy take about 0.1 s to load, which a short study would pay inside its run phase; one
    value per arm needs neither (an interval takes two)."""
    ledger, exp_id, live = ledger_with_runs(tmp_path / "ledger.db")
    ledger.db.execute("DELETE FROM run_metrics WHERE run_id IN (SELECT id FROM runs WHERE replicate = 1)")
    ledger.db.commit()
    script = ("import sys; from pathlib import Path; from ratiocinator.analysis.live import live_state;"
              " from ratiocinator.store.ledger import Ledger;"
              f" state = live_state(Ledger(Path({str(tmp_path / 'ledger.db')!r}), read_only=True), {exp_id!r});"
              " print(state.best.name, state.best.mean, state.best.n, state.running[0].last.point.value,"
              " 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["a", "1.0", "1", "0.75", "False"]


def test_one_slow_read_does_not_hold_the_standing_still(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first read loads the modules it needs, and the first interval loads numpy: one slow read must not
    set how long the standing stays as read (a 22-second quickstart showed its first standing to the end).
    Two slow reads in a row are a big study's, and space the next one out to keep reading to its share."""
    from ratiocinator.execution import progress

    ledger_with_runs(tmp_path / "ledger.db")
    reads = 0

    def slow_reads(ledger: Ledger, experiment_id: str) -> object:
        nonlocal reads
        reads += 1
        time.sleep(0.5 if reads in (1, 3, 4) else 0.0)
        return live_state(ledger, experiment_id)

    monkeypatch.setattr(progress, "live_state", slow_reads)
    monkeypatch.setattr(progress, "STATE_MAX_AGE_S", 0.1)
    monkeypatch.setattr(progress, "STATE_READ_SHARE", 0.5)  # reads of 0.5 s hold the standing 1 s
    watch = progress._Watch()
    watch.open(tmp_path / "ledger.db", "live-1")
    seen = []
    try:
        for _ in range(5):
            watch.state()
            seen.append(reads)
            time.sleep(0.25)  # past STATE_MAX_AGE_S, and past a quick read's share on a busy machine
        assert seen == [1, 2, 3, 4, 4]  # slow, quick, slow, slow: only after the second slow one in a row a wait
        assert watch.state(fresh=True) is not None and reads == 5  # the final line reads regardless
    finally:
        watch.close()


def test_a_read_only_ledger_reads_while_another_writes_and_refuses_every_write(tmp_path: Path) -> None:
    ledger, exp_id, live = ledger_with_runs(tmp_path / "ledger.db")
    watcher = Ledger(tmp_path / "ledger.db", read_only=True)
    assert len(watcher.runs(exp_id)) == 5
    ledger.finish_run(live, status="succeeded", failure=None, reason="", exit_code=0, signal=None,
                      final={"score": 3.0}, counts={}, cost=None)
    assert watcher.run(live).status == "succeeded"  # sees the writer's commit at once
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        watcher.event(exp_id, "note", "a watcher must not write")
    with pytest.raises(UsageError, match="no ledger at"):
        Ledger(tmp_path / "missing" / "ledger.db", read_only=True)
    assert not (tmp_path / "missing").exists()


@pytest.mark.subprocess
def test_plain_lines_carry_done_of_planned_eta_and_best(study: Study) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        echo "METRICS: {\\"score\\": $(( ${DEPTH:-1} * 10 + ${SEED:-0} ))}"
    """})
    spec = study.spec(factors={"DEPTH": [1, 2]}, replicates=2, seed_env="SEED", concurrency=2)
    done = study.cli("research", str(spec), "--skip-check")
    assert done.returncode == 0, done.stdout + done.stderr
    finished = [line for line in done.stdout.splitlines() if " succeeded " in line and " — done " in line]
    assert len(finished) == 4
    assert re.search(r"— done 4/4, running 0, ETA 0:00:00, best DEPTH=2 score 20\.5 ± \S+ \(n=2\)", finished[-1])
    assert all(re.search(r"done [1-4]/4, running \d, ETA (\d:\d\d:\d\d|—), best ", line) for line in finished)


@pytest.mark.subprocess
def test_quickstart_under_a_pseudo_terminal_shows_runs_done_of_27_and_an_eta(tmp_path: Path) -> None:
    """The live panel, as a researcher at a terminal sees it (rich draws it only on a TTY)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-m", "ratiocinator", "--home", str(tmp_path / "home"), "research",
                             str(QUICKSTART)],
                            stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    screen = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    assert proc.returncode == 0, screen[-3000:]
    counts = {int(m) for m in re.findall(r"\b(\d{1,2})/27\b", screen)}
    assert len(counts) > 3 and max(counts) >= 20, screen[-3000:]  # the bar moved through the runs
    assert re.search(r"ETA \d:\d\d:\d\d", screen), screen[-3000:]
    assert re.search(r"best DEPTH=\d,WIDTH=\d+ val_r2 0\.\d+ ± ", screen), screen[-3000:]
    assert "running (latest point)" in screen and re.search(r"val_r2=0\.\d+@\d+", screen)


def test_a_plain_line_to_an_output_that_cannot_encode_it_is_written_with_replacements() -> None:
    import io

    from rich.console import Console

    from ratiocinator.execution.progress import PlainProgress

    raw = io.BytesIO()
    log = io.TextIOWrapper(raw, encoding="ascii")  # a log opened as ASCII: "—" and "é" cannot be written
    PlainProgress(Console(file=log, highlight=False, soft_wrap=True)).message("run 3 — K=é succeeded")
    assert raw.getvalue().decode().endswith("] run 3 ? K=? succeeded\n")
