"""Runs' working copies made from lists taken once, dropped without a git process per run, and handed on
to the next run of the same commit when a run left them as they were made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gitrepo import GitRepo, git
from ratiocinator.repo.copies import SPARE_PREFIX, SpareCopies, snapshot
from ratiocinator.repo.workspace import (
    WorkingCopyMover,
    drop_working_copy,
    lfs_files,
    prune_working_copies,
    untracked_entries,
    working_copy,
)


def records(checkout: Path) -> list[str]:
    worktrees = checkout / ".git" / "worktrees"
    return sorted(p.name for p in worktrees.iterdir()) if worktrees.exists() else []


def test_copies_from_listed_inputs_are_isolated_and_dropped_records_are_pruned_in_one_go(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "checkout")
    repo.commit({"train.py": "print('v1')\n", ".gitignore": "data/\n"}, "first")
    (repo.path / "data").mkdir()
    (repo.path / "data" / "x.csv").write_text("1,2\n")  # what a deps step leaves untracked
    assert untracked_entries(repo.path) == ["data"] and lfs_files(repo.path) == []

    copies = [working_copy(repo.path, tmp_path / f"run{i}" / "work", [], ["data"]) for i in range(3)]
    (copies[0] / "train.py").write_text("print('edited by run 0')\n")
    assert (copies[1] / "train.py").read_text() == "print('v1')\n"  # no run sees another's edit
    assert (copies[2] / "data").resolve() == (repo.path / "data").resolve()  # data linked, not copied

    for copy in copies:
        drop_working_copy(repo.path, copy, prune=False)
    assert not any(copy.exists() for copy in copies) and len(records(repo.path)) == 3
    assert (repo.path / "data" / "x.csv").read_text() == "1,2\n"  # dropping a copy leaves linked data alone
    again = working_copy(repo.path, tmp_path / "run3" / "work", [], ["data"])  # stale records do not block adds
    prune_working_copies(repo.path)
    assert len(records(repo.path)) == 1 and (again / "train.py").exists()
    assert repo.git("status", "--porcelain") == ""  # the checkout itself stays pristine


def _study_checkout(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "checkout")
    repo.commit({"train.py": "import helper\nprint(helper.VALUE)\n", "helper.py": "VALUE = 1\n"}, "first")
    return repo


@pytest.mark.subprocess
def test_a_clean_copy_moves_to_the_next_run_and_stays_a_git_worktree(tmp_path: Path) -> None:
    repo = _study_checkout(tmp_path)
    runs = tmp_path / "runs"
    spares = SpareCopies(repo.path.resolve())
    first = working_copy(repo.path, runs / "1" / "work", [], [])
    seen = snapshot(first)
    writes_bytecode = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "train.py"], cwd=first, check=True, capture_output=True,
                   env=writes_bytecode)  # writes __pycache__, as a runner does
    assert spares.put_back(first, seen) and not first.exists() and len(spares) == 1

    (runs / "2").mkdir()
    taken = spares.take(runs / "2" / "work")
    assert taken is not None and taken[0] == seen and len(spares) == 0
    second = runs / "2" / "work"
    assert (second / "train.py").read_text().startswith("import helper")
    git("worktree", "prune", cwd=repo.path)  # git's record follows the copy: a prune keeps it
    assert git("rev-parse", "HEAD", cwd=second) == repo.git("rev-parse", "HEAD")
    assert git("status", "--porcelain", "--untracked-files=no", cwd=second) == ""  # no tracked file changed
    assert (second / "__pycache__").is_dir()  # the bytecode came along: the next run need not compile again
    assert str(second.resolve()) in repo.git("worktree", "list", "--porcelain")
    assert taken[1] == WorkingCopyMover.record(second)  # its git record travels with it: kept without reading it
    assert spares.put_back(second, seen, taken[1]) and len(spares) == 1
    (runs / "3").mkdir()
    third = runs / "3" / "work"
    assert spares.take(third) is not None and git("rev-parse", "HEAD", cwd=third) == repo.git("rev-parse", "HEAD")
    assert spares.take(runs / "4" / "work") is None  # none left: the next run gets a fresh one


def test_a_copy_the_run_changed_is_deleted_not_handed_on(tmp_path: Path) -> None:
    repo = _study_checkout(tmp_path)
    spares = SpareCopies(repo.path.resolve())
    edited = working_copy(repo.path, tmp_path / "runs" / "1" / "work", [], [])
    seen = snapshot(edited)
    (edited / "helper.py").write_text("VALUE = 2\n")
    assert not spares.put_back(edited, seen) and not edited.exists()
    added = working_copy(repo.path, tmp_path / "runs" / "2" / "work", [], [])
    seen = snapshot(added)
    (added / "checkpoints").mkdir()
    assert not spares.put_back(added, seen) and not added.exists()
    assert len(spares) == 0 and len(records(repo.path)) == 2  # records pruned later, in one go


def test_spares_go_at_close_and_a_killed_process_s_spares_go_with_the_next_one(tmp_path: Path) -> None:
    repo = _study_checkout(tmp_path)
    runs = tmp_path / "runs"
    spares = SpareCopies(repo.path.resolve())
    copy = working_copy(repo.path, runs / "1" / "work", [], [])
    assert spares.put_back(copy, snapshot(copy))
    (folder,) = runs.glob(SPARE_PREFIX + "*")
    abandoned = runs / (SPARE_PREFIX + "gone")  # what a process killed with kill -9 left: its lock is free
    (abandoned / "1").mkdir(parents=True)
    (abandoned / ".owner.lock").touch()

    later = SpareCopies(repo.path.resolve())
    other = working_copy(repo.path, runs / "2" / "work", [], [])
    assert later.put_back(other, snapshot(other))
    assert not abandoned.exists() and folder.exists()  # a live process's spares are left alone
    spares.close()
    later.close()
    assert not list(runs.glob(SPARE_PREFIX + "*"))
    late = working_copy(repo.path, runs / "3" / "work", [], [])
    assert not spares.put_back(late, snapshot(late)) and not late.exists()  # closed: deleted, not kept


def test_a_copy_the_run_filled_is_found_changed_without_listing_it_all(tmp_path: Path) -> None:
    repo = _study_checkout(tmp_path)
    spares = SpareCopies(repo.path.resolve())
    filled = working_copy(repo.path, tmp_path / "runs" / "1" / "work", [], [])
    seen = snapshot(filled)
    assert seen is not None
    (filled / "checkpoints").mkdir()
    for i in range(500):  # what a run may write into its working directory
        (filled / "checkpoints" / f"{i}.pt").write_bytes(b"x")
    assert snapshot(filled, limit=len(seen)) is None  # stops once past what the copy held
    assert len(snapshot(filled) or {}) == len(seen) + 501
    assert not spares.keep(filled, seen) and filled.exists()  # not kept: the caller deletes it (off the loop)
    spares.drop(filled)
    assert not filled.exists() and len(spares) == 0
