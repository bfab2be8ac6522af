"""Runs' working copies made from lists taken once, and dropped without a git process per run."""

from __future__ import annotations

from pathlib import Path

from gitrepo import GitRepo
from ratiocinator.repo.workspace import (
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
