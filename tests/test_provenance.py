"""The repository's remote, recorded so a paper can say what to clone (never a token, never a local path)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ratiocinator.execution.environment import probe_environment, requirement_names
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


FULL_PARSE = """
import importlib.metadata as md, json
print(json.dumps(sorted({f"{d.metadata['Name'].lower()}=={d.version}" for d in md.distributions()
                         if d.metadata['Name']})))
"""


@pytest.mark.subprocess
def test_the_runs_environment_is_read_with_their_own_interpreter(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# pinned\nnumpy>=1.20  # arrays\n-r other.txt\nnot-installed-pkg==1\n")
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.defpath])}
    found = probe_environment(tmp_path, env, "requirements.txt")
    assert found is not None
    assert found["python"] == platform.python_version() and found["implementation"] == "CPython"
    assert f"numpy=={np.__version__}" in found["packages"] and len(found["freeze_sha256"]) == 64
    # Read from each distribution's metadata headers: the same list a full parse of each file gives there.
    parsed = subprocess.run(["python", "-c", FULL_PARSE], env=env, cwd=tmp_path, capture_output=True, text=True,
                            check=True).stdout
    assert found["packages"] == json.loads(parsed)
    assert found["requirements"] == {"numpy": np.__version__, "not-installed-pkg": None}
    assert requirement_names(tmp_path / "missing.txt") == []
    assert probe_environment(tmp_path, {"PATH": str(tmp_path)}, None) is None  # no interpreter: nothing recorded


@pytest.mark.skipif(shutil.which("nice") is None or os.nice(0) != 0, reason="needs nice(1), from niceness 0")
def test_the_environment_probe_takes_only_cpu_the_runs_leave_idle(tmp_path: Path) -> None:
    """It reads every package's metadata while the first runs start: at the lowest priority."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "{\\"niceness\\": $(nice)}"\n')
    (bin_dir / "python").chmod(0o755)
    assert probe_environment(tmp_path, {"PATH": f"{bin_dir}{os.pathsep}{os.defpath}"}, None) == {"niceness": 19}
