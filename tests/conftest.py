"""Shared fixtures: a real git repo holding a runner, a spec pointing at it, and the real CLI.

Markers (registered in pyproject.toml) set apart the tests that start interpreters or servers,
so that `make test-fast` can leave them out: ``subprocess`` (the CLI or another Python
interpreter as a child process), ``sshd`` and ``ray`` (added here to every test using the
fixture `sshd` or `ray_cluster`, so none can go unmarked; Ray's also start interpreters) and
``latex`` (runs pdflatex). A test
that starts a Python interpreter or pdflatex from the test process without its marker fails,
naming the marker it needs.
"""

from __future__ import annotations

import os
import re
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
from without_extras import env_without

# Their fixtures: sshd, ray_cluster, data_server (HTTP files), rsyncd, hub (a Hugging Face Hub).
pytest_plugins = ("sshd", "raycluster", "dataserver", "rsyncd", "hubserver")

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


# -- markers ------------------------------------------------------------------------

# Fixtures that start a server, and the markers each gives every test that uses it (Ray's nodes
# and workers are Python interpreters).
FIXTURE_MARKERS = {"sshd": ("sshd",), "ray_cluster": ("ray", "subprocess")}
_PYTHON = re.compile(r"python[0-9.]*")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            # Under pytest-xdist (`--dist loadgroup`) every Ray test runs in one worker: one cluster, not one each.
            item.add_marker(pytest.mark.xdist_group("ray"))
        for fixture, markers in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    if item.get_closest_marker(marker) is None:
                        item.add_marker(marker)


def _marker_for(argv: object) -> str | None:
    """The marker a test starting ``argv`` needs: a Python interpreter (named anywhere in the command line,
    as after ``bash -c`` or ``setpriv``, or as a script's ``#!``) or pdflatex; None for other programs."""
    words = [str(a) for a in (argv if isinstance(argv, (list, tuple)) else [argv])]
    tokens = [t for w in words for t in w.split()]
    if not tokens or "ratiocinator.execution.supervisor" in tokens:  # the deadline keeper: one per process
        return None
    if any(w.startswith("# ratiocinator environment probe") for w in words):  # one per prepared workspace
        return None
    if os.path.basename(tokens[0]) == "pdflatex":
        return "latex"
    if any(t == sys.executable or _PYTHON.fullmatch(os.path.basename(t)) for t in tokens):
        return "subprocess"
    try:
        with open(tokens[0], "rb") as fh:
            first = fh.readline(200)
    except OSError:
        return None
    return "subprocess" if first.startswith(b"#!") and b"python" in first else None


class _SpawnWatch:
    """What the test now running started from this process that its markers do not cover."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.unmarked: list[str] = []

    def audit(self, event: str, args: tuple) -> None:
        if event != "subprocess.Popen" or self.item is None:
            return
        marker = _marker_for(args[1])
        if marker is not None and self.item.get_closest_marker(marker) is None:
            argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            self.unmarked.append(f"@pytest.mark.{marker}: it starts {' '.join(map(str, argv))[:120]}")


_WATCH = _SpawnWatch()
sys.addaudithook(_WATCH.audit)


def _watched(item: pytest.Item):  # type: ignore[no-untyped-def]
    _WATCH.item, _WATCH.unmarked = item, []
    try:
        result = yield
    finally:
        _WATCH.item = None
    if _WATCH.unmarked:
        needed = "\n  ".join(dict.fromkeys(_WATCH.unmarked))
        pytest.fail(f"this test needs a marker (`make test-fast` would run it):\n  {needed}", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):  # type: ignore[no-untyped-def]
    return (yield from _watched(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):  # type: ignore[no-untyped-def]
    return (yield from _watched(item))


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


QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "quickstart.yaml"


@pytest.fixture(scope="session")
def quickstart_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The home of the README's quickstart (``make run``), run once by the CLI in an interpreter where no
    optional extra can be imported, as after a core-only ``pip install .``; tests only read it."""
    home = tmp_path_factory.mktemp("quickstart") / ".ratiocinator"
    done = subprocess.run([*CLI, "--home", str(home), "research", str(QUICKSTART)], capture_output=True, text=True,
                          timeout=900, env=env_without())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return home


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its parent's wait() counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False
