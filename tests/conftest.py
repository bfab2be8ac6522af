"""Shared fixtures: a real git repo holding a runner, a spec pointing at it, and the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gitrepo import GitRepo
from ratiocinator.store.ledger import Ledger

pytest_plugins = ("sshd", "raycluster")  # their fixtures: sshd, ray_cluster

CLI = [sys.executable, "-m", "ratiocinator"]


# Hashes the LFS-tracked data/blob.bin into its out dir and reports its size as the goal.
LFS_RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
echo "seed ${SEED}" >&2
sha256sum data/blob.bin | cut -d' ' -f1 > "$RATIOCINATOR_OUT_DIR/sha256.txt"
echo "METRICS: {\\"score\\": $(stat -c %s data/blob.bin)}"
"""


@dataclass
class Study:
    """A target repository, a spec file and a --home, in one temp dir."""

    root: Path
    repo: GitRepo
    home: Path

    def commit(self, files: dict[str, str], executable: tuple[str, ...] = ("run.sh",)) -> str:
        for name, content in files.items():
            target = self.repo.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(content).lstrip())
        for name in executable:
            if (self.repo.path / name).exists():
                (self.repo.path / name).chmod(0o755)
        return self.repo.commit({})

    def commit_lfs_blob(self, size: int = 4096) -> bytes:
        """`LFS_RUNNER` over a random data/blob.bin committed under Git LFS; returns the blob."""
        blob = os.urandom(size)
        self.commit({"run.sh": LFS_RUNNER})
        self.commit_lfs({"data/blob.bin": blob})
        assert self.repo.git("show", "HEAD:data/blob.bin").startswith("version https://git-lfs")  # git has a pointer
        return blob

    def commit_lfs(self, files: dict[str, bytes], pattern: str = "*.bin") -> str:
        """Commit ``files`` under Git LFS (content in the repo's LFS store, pointers in git)."""
        require_git_lfs()
        self.repo.git("lfs", "install", "--local")  # the test repo ignores the machine's git config
        self.repo.git("lfs", "track", pattern)
        return self.repo.commit(files, "data under LFS")

    def spec(self, name: str = "study", **fields: object) -> Path:
        data: dict[str, object] = {
            "name": name,
            "topic": "a test study",
            "goal_metric": "score",
            "maximize": True,
            "repo_url": str(self.repo.path),
            "repo_branch": "main",
            "runner_script": "run.sh",
            "replicates": 1,
            "train_timeout_s": 30,
        }
        data.update(fields)
        if "arms" not in data and "factors" not in data:
            data["arms"] = [{"name": "a"}]
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def cli(self, *args: str, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "--home", str(self.home), *args], capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(env or {})}, cwd=self.root,
        )

    def ledger(self) -> Ledger:
        return Ledger(self.home / "ledger.db")


def require_git_lfs() -> None:
    """git-lfs, or a skip (a failure when CI requires it: RATIOCINATOR_REQUIRE_GIT_LFS=1)."""
    if shutil.which("git-lfs") is not None:
        return
    if os.environ.get("RATIOCINATOR_REQUIRE_GIT_LFS") == "1":
        pytest.fail("git-lfs not found, and RATIOCINATOR_REQUIRE_GIT_LFS=1: install git-lfs")
    pytest.skip("git-lfs not found: install it to run the tests of data under Git LFS")


@pytest.fixture
def study(tmp_path: Path) -> Study:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"README.md": "target\n"}, "init")
    return Study(root=tmp_path, repo=repo, home=tmp_path / "home")


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its parent's wait() counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False
