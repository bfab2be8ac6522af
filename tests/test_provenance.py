"""The repository's remote, recorded so a paper can say what to clone (never a token, never a local path)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ratiocinator.repo.provenance import public_url, remote_url


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_local_repository_is_named_by_its_remote_without_credentials(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    assert remote_url(str(repo)) is None  # no remote: the paper keeps the spec's relative path
    git(repo, "remote", "add", "origin", "https://alice:ghp_secret@example.org/lab/study.git")
    assert remote_url(str(repo)) == "https://example.org/lab/study.git"
    git(repo, "remote", "set-url", "origin", str(tmp_path / "elsewhere"))
    assert remote_url(str(repo)) is None  # a remote that is a local path is no better than the spec's path
    assert remote_url("https://example.org/x.git") is None and remote_url(str(tmp_path / "missing")) is None
    assert public_url("git@example.org:lab/study.git") == "git@example.org:lab/study.git"
