"""Workspace preparation against real git repositories, venvs and pip (no network)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from gitrepo import GitRepo, git
from ratiocinator.errors import WorkspaceError
from ratiocinator.repo.workspace import (
    FILTERED_REQUIREMENTS,
    LFS_POINTER_PREFIX,
    DepsConfig,
    PreparedEnv,
    checkout,
    filter_requirements,
    find_lfs_pointers,
    prepare_env,
    resolve_commit,
    resolve_repo_url,
    run_verify,
)


@pytest.fixture
def upstream(tmp_path: Path) -> GitRepo:
    """main (2 commits, v1 tagged on the first) and a feature branch."""
    repo = GitRepo(tmp_path / "upstream")
    repo.commit({"train.py": "print('v1')\n"}, "first")
    repo.git("tag", "v1")
    repo.commit({"train.py": "print('v2')\n"}, "second")
    repo.git("branch", "feature/x")
    return repo


# --------------------------------------------------------------------------- resolve_repo_url


@pytest.mark.parametrize(
    "url",
    ["https://github.com/a/b.git", "git@github.com:a/b.git", "file:///srv/repo", "ssh://git@host/a/b"],
)
def test_urls_pass_through_unchanged(url: str, tmp_path: Path) -> None:
    assert resolve_repo_url(url, tmp_path) == url


def test_relative_path_resolves_against_the_spec_dir(upstream: GitRepo, tmp_path: Path) -> None:
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    assert resolve_repo_url("../upstream", spec_dir) == str(upstream.path)


def test_home_is_expanded(upstream: GitRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_repo_url("~/upstream", tmp_path / "elsewhere") == str(upstream.path)


def test_non_git_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(WorkspaceError, match="not a git repository"):
        resolve_repo_url("plain", tmp_path)


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="neither a URL nor an existing directory"):
        resolve_repo_url("nowhere", tmp_path)


def test_subdirectory_of_a_repo_names_the_top_level(upstream: GitRepo) -> None:
    (upstream.path / "sub").mkdir()
    with pytest.raises(WorkspaceError) as caught:
        resolve_repo_url("sub", upstream.path)
    assert caught.value.hint == f"set repo_url to {upstream.path}"


def test_a_repository_confirmed_once_is_not_asked_again_until_it_changes(
        upstream: GitRepo, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from ratiocinator.repo import workspace
    asked: list[list[str]] = []
    real_git = workspace._git
    monkeypatch.setattr(workspace, "_git", lambda args, **kw: asked.append(args) or real_git(args, **kw))
    assert resolve_repo_url(str(upstream.path), upstream.path) == str(upstream.path)
    first = len(asked)
    assert first == 2
    assert resolve_repo_url(str(upstream.path), upstream.path) == str(upstream.path)
    assert len(asked) == first  # a command resolves its spec's repo_url several times: git is asked once
    shutil.rmtree(upstream.path / ".git")  # the repository goes: the next call asks git, and says so
    with pytest.raises(WorkspaceError, match="not a git repository"):
        resolve_repo_url(str(upstream.path), upstream.path)


# --------------------------------------------------------------------------- resolve_commit


def test_resolves_branches_tags_head_and_short_shas(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    head, first = upstream.head(), upstream.git("rev-parse", "v1")
    assert resolve_commit(url, "main", cache) == head
    assert resolve_commit(url, "feature/x", cache) == head
    assert resolve_commit(url, "HEAD", cache) == head
    assert resolve_commit(url, "v1", cache) == first
    assert resolve_commit(url, first[:8], cache) == first
    assert [p.name for p in (cache / "mirrors").iterdir() if p.is_dir()] == [
        f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.git"
    ]


def test_unknown_ref_lists_existing_branches(upstream: GitRepo, tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError) as caught:
        resolve_commit(str(upstream.path), "no-such-branch", tmp_path / "cache")
    assert "'no-such-branch'" in caught.value.message
    assert "main" in caught.value.message and "feature/x" in caught.value.message


def test_new_upstream_commit_is_seen_on_the_next_resolve(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    before = resolve_commit(url, "main", cache)
    after = upstream.commit({"train.py": "print('v3')\n"}, "third")
    assert before != after
    assert resolve_commit(url, "main", cache) == after


def test_full_sha_in_the_mirror_needs_no_fetch(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    head = resolve_commit(url, "main", cache)
    shutil.rmtree(upstream.path)  # any fetch would now fail
    assert resolve_commit(url, head, cache) == head


def test_unreachable_repo_reports_gits_error(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError) as caught:
        resolve_commit(f"file://{tmp_path}/missing.git", "main", tmp_path / "cache")
    assert "git said" in caught.value.message and "missing.git" in caught.value.message
    assert "ls-remote" in caught.value.hint
    assert not [p for p in (tmp_path / "cache" / "mirrors").iterdir() if p.is_dir()], "no half mirror left"


# --------------------------------------------------------------------------- checkout


def test_checkout_is_idempotent_at_the_commit_with_the_real_origin(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    head = resolve_commit(url, "main", cache)
    path = checkout(url, head, cache)
    assert path.name == head and path.parent.parent == cache / "checkouts"
    assert git("rev-parse", "HEAD", cwd=path) == head
    assert git("remote", "get-url", "origin", cwd=path) == url
    assert (path / "train.py").read_text() == "print('v2')\n"
    (path / "marker").write_text("kept")  # reused, not rebuilt
    assert checkout(url, head, cache) == path
    assert (path / "marker").exists()
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == [head]


def _resolve_and_checkout(url: str, cache: Path) -> Path:
    return checkout(url, resolve_commit(url, "main", cache), cache)


def test_concurrent_processes_share_one_mirror_and_checkout(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("fork")) as pool:
        paths = set(pool.map(_resolve_and_checkout, [url] * 4, [cache] * 4))
    assert len(paths) == 1
    assert len([p for p in (cache / "mirrors").iterdir() if p.is_dir()]) == 1
    assert [p.name for p in next(iter(paths)).parent.iterdir() if p.is_dir()] == [upstream.head()]


def test_checkout_of_an_older_commit(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    first = resolve_commit(url, "v1", cache)
    assert (checkout(url, first, cache) / "train.py").read_text() == "print('v1')\n"


def test_checkout_fetches_a_commit_it_has_not_seen(upstream: GitRepo, tmp_path: Path) -> None:
    url, cache = str(upstream.path), tmp_path / "cache"
    resolve_commit(url, "main", cache)
    newer = upstream.commit({"train.py": "print('v3')\n"}, "third")
    assert git("rev-parse", "HEAD", cwd=checkout(url, newer, cache)) == newer


def test_lfs_pointer_files_are_rejected(tmp_path: Path) -> None:
    pointer = LFS_POINTER_PREFIX + b"\noid sha256:" + b"a" * 64 + b"\nsize 123456\n"
    repo = GitRepo(tmp_path / "lfs-repo")
    repo.commit({
        ".gitattributes": "*.pt filter=lfs diff=lfs merge=lfs -text\n",
        "model.pt": pointer,
        "data/train.pt": pointer,
        "big.bin": LFS_POINTER_PREFIX + b"x" * 2000,  # too large to be a pointer
        "train.py": "print('hi')\n",
    })
    url, cache = str(repo.path), tmp_path / "cache"
    head = resolve_commit(url, "main", cache)
    with pytest.raises(WorkspaceError) as caught:
        checkout(url, head, cache)
    assert "model.pt" in caught.value.message and "data/train.pt" in caught.value.message
    assert "big.bin" not in caught.value.message
    assert "git-lfs" in caught.value.hint and "zero samples" in caught.value.hint
    (path,) = (cache / "checkouts").glob(f"*/{head}")
    assert sorted(find_lfs_pointers(path)) == ["data/train.pt", "model.pt"]
    with pytest.raises(WorkspaceError, match="model.pt"):  # a reused checkout is checked again
        checkout(url, head, cache)


# --------------------------------------------------------------------------- prepare_env


def _wheel() -> tuple[str, bytes]:
    """A pure-Python wheel built by hand, so installing it needs no network or build backend."""
    dist = "ratio_tinypkg-0.1.dist-info"
    files = {
        "ratio_tinypkg/__init__.py": b"VALUE = 42\n",
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: ratio-tinypkg\nVersion: 0.1\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for name, data in files.items()
    ]
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return "ratio_tinypkg-0.1-py3-none-any.whl", buffer.getvalue()


REQUIREMENTS = """\
# what the experiment needs
--no-index
torch_geometric==9.9.9  # comes from the base image
./wheels/{wheel}
"""


@dataclass
class Prepared:
    checkout: Path
    deps: DepsConfig
    envs_dir: Path
    env: PreparedEnv
    output: list[str]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """One venv for the requirements tests: creating one takes seconds.

    ``--no-index`` makes pip fail if the excluded package were still listed.
    """
    root = tmp_path_factory.mktemp("prepared")
    wheel_name, wheel = _wheel()
    repo = GitRepo(root / "repo")
    repo.commit({"requirements.txt": REQUIREMENTS.format(wheel=wheel_name), f"wheels/{wheel_name}": wheel})
    deps = DepsConfig(requirements="requirements.txt", exclude_from_requirements=("Torch-Geometric",))
    lines: list[str] = []
    with contextlib.chdir(root):  # a relative envs_dir must still give absolute paths
        env = prepare_env(repo.path, deps, Path("envs"), on_output=lines.append)
    return Prepared(repo.path, deps, root / "envs", env, lines)


def _run_python(env: PreparedEnv, code: str) -> str:
    return subprocess.run([str(env.venv / "bin" / "python"), "-c", code], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_nothing_to_install_makes_no_venv(tmp_path: Path) -> None:
    env = prepare_env(tmp_path, DepsConfig(verify="true"), tmp_path / "envs")
    assert env.venv is None and env.log_path is None
    assert env.env == {"RATIOCINATOR_WORKSPACE": str(tmp_path)}
    assert not (tmp_path / "envs").exists()


@pytest.mark.subprocess
def test_requirements_install_without_the_excluded_package(prepared: Prepared) -> None:
    env = prepared.env
    assert env.venv.is_absolute() and env.venv.parent == prepared.envs_dir and (env.venv / ".ready").is_file()
    filtered = (env.venv / FILTERED_REQUIREMENTS).read_text()
    assert "--no-index" in filtered and "# what the experiment needs" in filtered
    assert not [line for line in filtered.splitlines() if line.startswith("torch")]
    assert _run_python(env, "import ratio_tinypkg; print(ratio_tinypkg.VALUE)") == "42"
    log = env.log_path.read_text()
    assert "ratio-tinypkg" in log and log.splitlines() == prepared.output


@pytest.mark.subprocess
def test_env_points_the_runner_at_the_venv(prepared: Prepared) -> None:
    env = prepared.env
    assert env.env["PATH"].split(os.pathsep)[0] == str(env.venv / "bin")
    assert env.env["VIRTUAL_ENV"] == str(env.venv)
    assert env.env["RATIOCINATOR_WORKSPACE"] == str(prepared.checkout)
    assert "include-system-site-packages = true" in (env.venv / "pyvenv.cfg").read_text()
    runner_path = _run_python(env, "import sys; print(sys.path)")
    if sys.prefix != sys.base_prefix:  # the orchestrator's own venv must stay invisible
        assert sys.prefix not in runner_path


@pytest.mark.subprocess
def test_a_ready_venv_is_reused(prepared: Prepared) -> None:
    env = prepared.env
    stamps = [(env.venv / name).stat().st_mtime_ns for name in (".ready", "install.log")]
    lines: list[str] = []
    assert prepare_env(prepared.checkout, prepared.deps, prepared.envs_dir, on_output=lines.append) == env
    assert lines == []
    assert [(env.venv / name).stat().st_mtime_ns for name in (".ready", "install.log")] == stamps


@pytest.mark.subprocess
def test_failing_pre_install_stops_and_a_retry_rebuilds(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"train.py": ""})
    deps = DepsConfig(pre_install=(
        "echo first > first.txt",
        "echo boom-detail; test -f fixed || exit 7",
        "touch third.txt",
    ), requirements=None)
    with pytest.raises(WorkspaceError) as caught:
        prepare_env(repo.path, deps, tmp_path / "envs")
    message = caught.value.message
    assert "deps.pre_install[1]" in message and "test -f fixed || exit 7" in message
    assert "exit code 7" in message and "boom-detail" in message
    assert "deps.pre_install" in caught.value.hint and "install.log" in caught.value.hint
    assert (repo.path / "first.txt").exists() and not (repo.path / "third.txt").exists()
    (venv,) = [p for p in (tmp_path / "envs").iterdir() if p.is_dir()]
    assert not (venv / ".ready").exists()

    (repo.path / "fixed").touch()
    (venv / "leftover").touch()
    env = prepare_env(repo.path, deps, tmp_path / "envs")
    assert env.venv == venv and (venv / ".ready").exists() and not (venv / "leftover").exists()
    assert (repo.path / "third.txt").exists()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, awaiting an init that may not reap, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.subprocess
def test_pre_install_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"train.py": ""})
    deps = DepsConfig(pre_install=("sleep 100 & echo $! > sleep.pid; wait",), download_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(WorkspaceError) as caught:
        prepare_env(repo.path, deps, tmp_path / "envs")
    assert time.monotonic() - started < 60
    assert "timed out after 1s" in caught.value.message
    assert "download_timeout_s" in caught.value.hint
    pid = int((repo.path / "sleep.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_missing_requirements_file_is_reported(tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"train.py": ""})
    with pytest.raises(WorkspaceError, match="requirements-gpu.txt"):
        prepare_env(repo.path, DepsConfig(requirements="requirements-gpu.txt"), tmp_path / "envs")
    assert not (tmp_path / "envs").exists(), "fails before creating anything"


def test_filter_requirements(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("torch>=2.1\nnumpy\n")
    (tmp_path / "constraints.txt").write_text("numpy<3\n")
    (tmp_path / "requirements.txt").write_text(
        "-r base.txt\n"
        "-c constraints.txt\n"
        "--extra-index-url https://download.pytorch.org/whl/cu121\n"
        "# a comment\n"
        "torch-geometric==2.5 ; python_version >= '3.10'\n"
        "TorchVision==0.18 --hash=sha256:abc\n"
        "torch_scatter \\\n    >=2.1\n"
        "pandas\n"
        "-e ./vendored\n"
    )
    out = filter_requirements(tmp_path / "requirements.txt", ["torch", "Torch_Geometric", "torchvision",
                                                               "torch-scatter"])
    kept = [line for line in out.splitlines() if not line.startswith("# ratiocinator:")]
    assert kept == [
        "numpy",
        f"-c {tmp_path / 'constraints.txt'}",
        "--extra-index-url https://download.pytorch.org/whl/cu121",
        "# a comment",
        "pandas",
        "-e ./vendored",
    ]
    assert out.count("# ratiocinator: excluded") == 4


# --------------------------------------------------------------------------- run_verify


def test_run_verify_returns_the_output(tmp_path: Path) -> None:
    out = run_verify(tmp_path, 'echo "PyG $FLAVOUR"; pwd; echo warn >&2', {"FLAVOUR": "2.5"})
    assert out.splitlines() == ["PyG 2.5", str(tmp_path), "warn"]


def test_run_verify_failure_shows_command_and_output(tmp_path: Path) -> None:
    command = "echo 'ModuleNotFoundError: torch_geometric'; exit 1"
    with pytest.raises(WorkspaceError) as caught:
        run_verify(tmp_path, command, {})
    assert command in caught.value.message and "exit code 1" in caught.value.message
    assert "ModuleNotFoundError: torch_geometric" in caught.value.message
    assert "deps.pre_install" in caught.value.hint


def test_run_verify_timeout(tmp_path: Path) -> None:
    with pytest.raises(WorkspaceError, match="timed out after 0.5s"):
        run_verify(tmp_path, "echo started; sleep 30", {}, timeout_s=0.5)
