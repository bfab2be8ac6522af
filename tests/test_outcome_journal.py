"""The outcome journal: one line per finished run, read back whole even after a torn or damaged line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ratiocinator.execution import outcomes
from ratiocinator.execution.outcomes import RunOutcome


def outcome(status: str = "succeeded", score: float = 1.0, charge: int = 1) -> RunOutcome:
    return RunOutcome(status=status, failure=None if status == "succeeded" else "crash", reason="exit 0",
                      exit_code=0, signal=None, final={"score": score, "loss": float("nan")}, counts={"score": 1},
                      cost=0.25, ended_at=1_700_000_000.5, charge=charge, evidence={}, transient=False)


def test_each_run_is_kept_and_read_back_and_a_later_line_wins(tmp_path: Path) -> None:
    outcomes.keep(tmp_path, 1, outcome(score=1.0))
    outcomes.keep(tmp_path, 2, outcome("failed", score=2.0, charge=2))
    outcomes.keep(tmp_path, 1, outcome(score=3.0))
    kept = outcomes.kept(tmp_path)
    assert sorted(kept) == [1, 2]
    assert kept[1].final["score"] == 3.0 and kept[2].status == "failed" and kept[2].charge == 2
    assert kept[2].ledger_fields()["cost"] == 0.25 and kept[1].final["loss"] != kept[1].final["loss"]  # NaN kept
    assert len((tmp_path / outcomes.JOURNAL).read_text().splitlines()) == 3


def test_a_torn_last_line_loses_only_itself(tmp_path: Path) -> None:
    """A machine crash (or a full disk) can leave part of a line: the next append starts a new line."""
    outcomes.keep(tmp_path, 1, outcome())
    with open(tmp_path / outcomes.JOURNAL, "ab") as journal:
        journal.write(b'{"run_id": 2, "status": "succ')
    outcomes.keep(tmp_path, 3, outcome(score=5.0))
    kept = outcomes.kept(tmp_path)
    assert sorted(kept) == [1, 3] and kept[3].final["score"] == 5.0


def test_damaged_lines_are_skipped(tmp_path: Path) -> None:
    record = {"run_id": 4, **vars(outcome())}
    lines = [b"\x00\x00garbage", b"[1, 2]", b'{"run_id": "5", "status": "succeeded"}',
             json.dumps({"run_id": 6, "status": "succeeded"}).encode(), b"",
             json.dumps(record).encode()]
    (tmp_path / outcomes.JOURNAL).write_bytes(b"\n".join(lines) + b"\n")
    assert list(outcomes.kept(tmp_path)) == [4]
    assert outcomes.kept(tmp_path / "missing") == {}


def test_a_folder_that_refuses_the_journal_loses_only_the_journal(tmp_path: Path) -> None:
    outcomes.keep(tmp_path / "missing", 1, outcome())  # the run will be run again on resume; nothing raises
    (tmp_path / outcomes.JOURNAL).mkdir()
    outcomes.keep(tmp_path, 1, outcome())
    assert outcomes.kept(tmp_path) == {}


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2]]
from test_outcome_journal import outcome
from ratiocinator.execution import outcomes
folder = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
limit = (folder / outcomes.JOURNAL).stat().st_size + 20
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
outcomes.keep(folder, 2, outcome())  # 20 bytes of its line fit
outcomes.keep(folder, 3, outcome())  # nothing fits
"""


@pytest.mark.subprocess
def test_a_disk_that_fills_mid_line_loses_only_that_line(tmp_path: Path) -> None:
    outcomes.keep(tmp_path, 1, outcome())
    before = (tmp_path / outcomes.JOURNAL).stat().st_size
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / outcomes.JOURNAL).stat().st_size == before + 20
    outcomes.keep(tmp_path, 4, outcome(score=4.0))  # space again: a line of its own
    kept = outcomes.kept(tmp_path)
    assert sorted(kept) == [1, 4] and kept[4].final["score"] == 4.0


def test_an_earlier_versions_run_folder_file_is_read(tmp_path: Path) -> None:
    (tmp_path / outcomes.LEGACY_FILE).write_text(json.dumps(vars(outcome(score=7.0))))
    found = outcomes.kept_in_run_folder(tmp_path)
    assert found is not None and found.final["score"] == 7.0
    (tmp_path / outcomes.LEGACY_FILE).write_text('{"status": "succeeded"}')
    assert outcomes.kept_in_run_folder(tmp_path) is None and outcomes.kept_in_run_folder(tmp_path / "x") is None
