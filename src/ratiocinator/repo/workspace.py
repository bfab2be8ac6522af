"""Preparing the experiment's code and dependencies on the local machine.

A run needs the user's repository at one exact commit plus the environment its
runner script expects. Both are cached so that arms of a study share them:

* one bare mirror per repository (``cache_dir/mirrors``), fetched, never re-cloned;
* one checkout per commit (``cache_dir/checkouts``), built in a temp dir and renamed
  into place, so a crash never leaves a half checkout that looks complete;
* one venv per (commit, deps) (``envs_dir``), marked complete by a ``.ready`` file
  because venvs cannot be renamed into place (their scripts hold absolute paths).

Every cache is guarded by an ``fcntl.flock`` lock so concurrent processes neither
race nor duplicate work. Git, venv and pip run as argument lists, never through a
shell; only the user's ``deps.pre_install`` and ``deps.verify`` strings, which are
shell commands by definition, run with ``bash -c`` (nothing is interpolated into them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ratiocinator.errors import WorkspaceError
from ratiocinator.execution import contract

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
FILTERED_REQUIREMENTS = "requirements.filtered.txt"
WORKTREES_LOCK = "ratiocinator-worktrees.lock"  # held while git's worktree records change

_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Variables that would point git at some other repository than the one we name
# (set, for instance, when the orchestrator runs from inside a git hook).
_GIT_REPO_VARS = frozenset(
    {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
     "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR", "GIT_NAMESPACE"}
)
_STDERR_TAIL = 20
_STEP_TAIL = 30
_VERIFY_TAIL = 50
_DRAIN_GRACE_S = 2.0


# --------------------------------------------------------------------------- repo


def resolve_repo_url(repo_url: str, spec_dir: Path) -> str:
    """Turn the spec's ``repo_url`` into what git should clone.

    URLs (``scheme://``, ``file://``, scp-like ``git@host:path``) pass unchanged; a
    local path becomes absolute (relative to the spec's directory, ``~`` expanded)
    and must be the top level of a git repository, so mistakes surface at plan time.
    """
    if repo_url.startswith("-"):  # git would read it as an option (--upload-pack=...)
        raise WorkspaceError(f"repo_url {repo_url!r} begins with '-'", hint="give a git URL or a path to a repository")
    if _looks_like_url(repo_url):
        return repo_url
    path = Path(repo_url).expanduser()
    if not path.is_absolute():
        path = Path(spec_dir).expanduser() / path
    path = path.resolve()
    if not path.is_dir():
        raise WorkspaceError(
            f"repo_url {repo_url!r} is neither a URL nor an existing directory (looked at {path})",
            hint="give a git URL (https://..., git@host:path, file://...) or a path to a local "
            "git repository, relative to the spec file's directory",
        )
    marker = _repository_marker(path)
    if marker is not None and _CONFIRMED_TOPLEVELS.get(path) == marker:
        return str(path)
    bare = _git(["rev-parse", "--is-bare-repository"], cwd=path)
    if bare.returncode != 0:
        raise WorkspaceError(
            f"repo_url {repo_url!r} points to {path}, which is not a git repository",
            hint=f"run `git init` there and commit the code, or point repo_url at a repository; "
            f"git said: {_tail(bare.stderr, 3)}",
        )
    top = _git(["rev-parse", "--absolute-git-dir" if bare.stdout.strip() == "true" else "--show-toplevel"],
               cwd=path)
    toplevel = Path(top.stdout.strip()).resolve() if top.returncode == 0 and top.stdout.strip() else None
    if toplevel != path:
        raise WorkspaceError(
            f"repo_url {repo_url!r} points to {path}, which is inside a git repository but not its top level",
            hint=f"set repo_url to {toplevel}" if toplevel else "set repo_url to the repository's top level",
        )
    if marker is not None:
        _CONFIRMED_TOPLEVELS[path] = marker
    return str(path)


# Repositories confirmed as a top level in this process, with their marker (see `_repository_marker`) at the
# time: a command resolves one spec's repo_url several times (validate, plan, prepare), two git processes each.
_CONFIRMED_TOPLEVELS: dict[Path, tuple[int, int]] = {}


def _repository_marker(path: Path) -> tuple[int, int] | None:
    """What changes when the repository at ``path`` is made, moved or removed (and not when git writes in
    it): its ``.git``'s (or a bare repository's ``HEAD``'s) device and inode; None when neither exists."""
    for name in (".git", "HEAD"):
        try:
            info = os.stat(path / name)
        except OSError:
            continue
        return info.st_dev, info.st_ino
    return None


def resolve_commit(repo_url: str, ref: str, cache_dir: Path, *, timeout_s: float = 600) -> str:
    """Resolve ``ref`` (branch, tag, ``HEAD`` or a full/abbreviated SHA) to a full commit SHA.

    Branches move, so the mirror is fetched first; a full SHA already in the mirror
    cannot change and needs no network.
    """
    mirror = _mirror_path(repo_url, cache_dir)
    with _locked(_lock_path(mirror)):
        return _resolve_in_mirror(repo_url, ref, mirror, timeout_s)


class LfsContentMissing(WorkspaceError):
    """The checkout holds Git LFS pointers where content should be (its code can still be read)."""


def checkout(repo_url: str, commit: str, cache_dir: Path, *, lfs_timeout_s: float = 600,
             require_lfs: bool = True) -> Path:
    """Return a checkout of ``commit`` (full SHA), creating it once and reusing it after.

    The checkout's ``origin`` is the real ``repo_url`` so that ``git lfs`` (and the
    user's scripts) fetch from the actual remote, not from the local mirror. Files
    still holding LFS pointers are fatal: a run on them trains on nothing and exits 0.
    ``lfs_timeout_s`` bounds the network steps (fetching a missing commit, LFS pull). With
    ``require_lfs=False`` the pointers are left as they are: enough to read the code, never to run it.
    """
    if not _FULL_SHA.fullmatch(commit):
        raise ValueError(f"checkout needs a full 40-hex commit SHA (use resolve_commit), got {commit!r}")
    mirror = _mirror_path(repo_url, cache_dir)
    dest = mirror.parent.parent / "checkouts" / mirror.stem / commit
    with _locked(_lock_path(dest)):
        if not dest.is_dir():
            with _staging_dir(dest) as tmp:
                with _locked(_lock_path(mirror)):
                    _resolve_in_mirror(repo_url, commit, mirror, lfs_timeout_s)
                    _git_ok(["clone", "--quiet", "--no-checkout", "--", str(mirror), str(tmp)],
                            what=f"cloning {repo_url} from its mirror {mirror}")
                # Skip the smudge filter: it would fetch LFS objects from the mirror,
                # which has none; `git lfs pull` below fetches them from the real remote.
                _git_ok(["checkout", "--quiet", "--detach", commit], cwd=tmp,
                        extra_env={"GIT_LFS_SKIP_SMUDGE": "1"},
                        what=f"checking out {commit} of {repo_url} in {tmp}")
                _git_ok(["remote", "set-url", "origin", repo_url], cwd=tmp,
                        what=f"setting origin of {tmp}")
        if require_lfs:
            _ensure_lfs_content(dest, repo_url, lfs_timeout_s)
    return dest


def lfs_files(checkout: Path) -> list[str]:
    """Files under Git LFS in the checkout: a bundle of the commit carries only their pointers,
    so a backend that clones from one ships these files' content alongside."""
    attributes = [p for p in checkout.rglob(".gitattributes") if ".git" not in p.relative_to(checkout).parts]
    if not any("filter=lfs" in p.read_text(errors="replace") for p in attributes):
        return []
    listed = _git(["lfs", "ls-files", "--name-only"], cwd=checkout)
    if listed.returncode != 0:
        return []
    return [line for line in listed.stdout.splitlines() if line.strip()]


def untracked_entries(checkout: Path) -> list[str]:
    """The untracked top-level entries the deps steps left in the checkout (data, build outputs)."""
    others = _git(["ls-files", "--others", "--directory", "--no-empty-directory", "-z"], cwd=checkout).stdout
    return sorted({p.split("/", 1)[0] for p in others.split("\0") if p})


def working_copy(checkout: Path, dest: Path, lfs: Iterable[str] | None = None,
                 untracked: Iterable[str] | None = None) -> Path:
    """A run's own working copy of the cached checkout's commit, at ``dest``: a git worktree (tracked
    files written afresh, git's objects shared), the content of files under Git LFS copied in, and the
    untracked top-level entries the deps steps left in the checkout (data) linked, not copied. The
    cached checkout is never written by a run, and concurrent runs never share a file.

    ``lfs`` and ``untracked`` may be given when known (``lfs_files``, ``untracked_entries``): the
    checkout does not change while its runs go, so a backend lists them once rather than per run."""
    checkout = Path(checkout).resolve()
    with _worktrees_locked(checkout):
        _git_ok(["-c", "core.hooksPath=/dev/null", "worktree", "add", "--detach", "--quiet", "--force", "--",
                 str(dest), "HEAD"], cwd=checkout, what=f"making a working copy of {checkout}",
                extra_env={"GIT_LFS_SKIP_SMUDGE": "1"})
    for name in lfs_files(checkout) if lfs is None else lfs:
        shutil.copyfile(checkout / name, dest / name)
    for entry in untracked_entries(checkout) if untracked is None else untracked:
        if not (dest / entry).exists():
            (dest / entry).symlink_to(checkout / entry)
    return dest


def drop_working_copy(checkout: Path, dest: Path, *, prune: bool = True) -> None:
    """Remove a run's working copy (and git's record of it); what is left of a failed removal is pruned later.

    With ``prune=False`` only the files go, without starting git: the stale record costs nothing until
    ``prune_working_copies`` (a backend that drops many copies prunes once, when it is done)."""
    checkout = Path(checkout).resolve()
    if not prune:
        shutil.rmtree(dest, ignore_errors=True)
        return
    with _worktrees_locked(checkout):
        _git(["worktree", "remove", "--force", "--force", str(dest)], cwd=checkout)
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
            _git(["worktree", "prune"], cwd=checkout)


def move_working_copy(checkout: Path, copy: Path, dest: Path) -> None:
    """Rename a working copy to ``dest`` (on the same file system) and point git's record of it there."""
    with WorkingCopyMover(checkout) as mover:
        mover.move(copy, dest, mover.record(copy))


class WorkingCopyMover:
    """Moves one checkout's working copies about (see `repo.copies`, which moves one twice per run).

    A move renames the copy and rewrites its record's back link (``worktrees/<id>/gitdir``), which is what
    ``git worktree prune`` checks: left naming the old place, a prune would drop the record and the moved
    copy would stop being a git worktree. Both happen under the worktrees lock, which every prune here
    holds too. The lock file stays open and each copy's record is read once (`record`), so a move costs a
    rename and one small write in place. The back link is overwritten, never truncated: a shorter path is
    padded with newlines, which git strips. (Creating a file costs 0.1 ms on some file systems, and ext4
    starts writing a file truncated to nothing back to disk when it is closed: about 1 ms a move while runs
    write their logs.)"""

    def __init__(self, checkout: Path) -> None:
        self.checkout = Path(checkout).resolve()
        self._lock = open(self.checkout / ".git" / WORKTREES_LOCK, "w")

    def __enter__(self) -> WorkingCopyMover:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def record(copy: Path) -> Path:
        """Git's record of the working copy at ``copy`` (its ``.git`` file names it)."""
        link = (copy / ".git").read_text().strip()
        record = Path(link.removeprefix("gitdir:").strip())
        if not link.startswith("gitdir:") or not record.is_absolute():  # a relative link would break on the move
            raise OSError(f"{copy / '.git'} is not an absolute git worktree link")
        return record

    def move(self, copy: Path, dest: Path, record: Path) -> None:
        """Rename ``copy`` (whose git record is ``record``) to ``dest``; OSError when that cannot be done."""
        back_link = f"{os.path.join(os.path.abspath(dest), '.git')}\n".encode()
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            os.rename(copy, dest)
            try:
                fd = os.open(record / "gitdir", os.O_WRONLY)
                try:
                    os.pwrite(fd, back_link.ljust(os.fstat(fd).st_size, b"\n"), 0)
                finally:
                    os.close(fd)
            except OSError:
                os.rename(dest, copy)  # the copy stays where its record says it is
                raise
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        self._lock.close()


def prune_working_copies(checkout: Path) -> None:
    """Forget the records of working copies whose files are gone."""
    checkout = Path(checkout).resolve()
    with _worktrees_locked(checkout):
        _git(["worktree", "prune"], cwd=checkout)


@contextmanager
def _worktrees_locked(checkout: Path) -> Iterator[None]:
    """Git changes a repository's worktree records one at a time: adding one while another is removed (two
    runs of one experiment, one starting as another ends) fails on git's own lock files."""
    with open(checkout / ".git" / WORKTREES_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def find_lfs_pointers(checkout: Path) -> list[str]:
    """Tracked files that are still Git LFS pointers instead of their content."""
    listed = _git_ok(["ls-files", "-z"], cwd=checkout, what=f"listing files of {checkout}")
    pointers = []
    for name in listed.split("\0"):
        path = Path(checkout) / name
        if not name or path.is_symlink() or not path.is_file() or path.stat().st_size >= 1024:
            continue
        with open(path, "rb") as fh:
            if fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
                pointers.append(name)
    return pointers


def _ensure_lfs_content(dest: Path, repo_url: str, timeout_s: float) -> None:
    """Pull LFS objects if pointers are present and git-lfs exists; fail if any remain."""
    pointers = find_lfs_pointers(dest)
    if not pointers:
        return
    if _git(["lfs", "version"]).returncode != 0:
        why = "git-lfs is not installed on this machine"
    else:
        pulled = _git(["lfs", "pull"], cwd=dest, timeout_s=timeout_s)
        pointers = find_lfs_pointers(dest)
        if not pointers:
            return
        why = f"`git lfs pull` did not fetch them: {_tail(pulled.stderr or pulled.stdout, 5)}"
    shown = ", ".join(pointers[:10]) + (f" (and {len(pointers) - 10} more)" if len(pointers) > 10 else "")
    raise LfsContentMissing(
        f"{len(pointers)} file(s) in the checkout {dest} are Git LFS pointers, not content: "
        f"{shown}; {why}",
        hint=f"install git-lfs (https://git-lfs.com) and make sure the LFS objects of {repo_url} "
        "are reachable from this machine; a run on pointer files trains on zero samples and "
        "still exits 0",
    )


def uncommitted_changes(repo_url: str, ref: str, *, ignore: Iterable[Path] = ()) -> tuple[str | None, list[str]]:
    """Files of a local repository's working tree that differ from the commit ``ref`` names, when that
    commit is the one checked out there: edited, staged, deleted or new (not ignored) files, which the
    runs will not see. Paths in ``ignore`` (the spec file, the home directory) are left out; a URL, or a
    ``ref`` other than what is checked out, has no working tree to differ from. Returns (the commit, files)."""
    if _looks_like_url(repo_url):
        return None, []
    root = Path(repo_url)
    head, target = _rev_parse(root, "HEAD"), _rev_parse(root, ref)
    if head is None or head != target:
        return None, []
    listed = _git(["status", "--porcelain=v1", "-z", "--untracked-files=normal"], cwd=root)
    if listed.returncode != 0:
        return head, []
    skipped = [Path(p).resolve() for p in ignore]
    files: list[str] = []
    entries = iter(listed.stdout.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        if entry[0] in "RC":  # a rename: the original path follows as its own entry
            next(entries, None)
        name = entry[3:]
        path = (root / name).resolve()
        if any(path == s or s in path.parents for s in skipped):
            continue
        files.append(name)
    return head, sorted(files)


def changed_files(repo_url: str, old: str, new: str, cache_dir: Path) -> list[str]:
    """Files that differ between two commits of the repository, read from its mirror (both are there
    once ``resolve_commit`` has fetched the newer)."""
    mirror = _mirror_path(repo_url, cache_dir)
    done = _git(["diff", "--name-only", "-z", old, new, "--"], cwd=mirror)
    return sorted(n for n in done.stdout.split("\0") if n) if done.returncode == 0 else []


def _looks_like_url(repo_url: str) -> bool:
    """Git's own rule: a scheme, or a colon before the first slash (scp-like ``host:path``)."""
    if _URL_SCHEME.match(repo_url):
        return True
    colon, slash = repo_url.find(":"), repo_url.find("/")
    return colon > 0 and (slash == -1 or colon < slash)


def _mirror_path(repo_url: str, cache_dir: Path) -> Path:
    url_hash = hashlib.sha256(repo_url.encode()).hexdigest()[:16]
    return Path(cache_dir).resolve() / "mirrors" / f"{url_hash}.git"


def _resolve_in_mirror(repo_url: str, ref: str, mirror: Path, timeout_s: float) -> str:
    """Clone or fetch the mirror as needed and resolve ``ref``; caller holds the mirror lock."""
    if not ref or ref.startswith("-"):
        raise WorkspaceError(
            f"invalid git ref {ref!r} for {repo_url}",
            hint="set repo_branch to a branch, tag, HEAD or commit SHA",
        )
    if mirror.is_dir() and _FULL_SHA.fullmatch(ref) and _rev_parse(mirror, ref):
        return ref
    if mirror.is_dir():
        _git_ok(["fetch", "--prune", "--quiet", "origin"], cwd=mirror, timeout_s=timeout_s,
                what=f"fetching {repo_url} into {mirror}", hint=_reach_hint(repo_url))
    else:
        with _staging_dir(mirror) as tmp:
            _git_ok(["clone", "--mirror", "--quiet", "--", repo_url, str(tmp)], timeout_s=timeout_s,
                    what=f"cloning {repo_url}", hint=_reach_hint(repo_url))
    commit = _rev_parse(mirror, ref)
    if commit:
        return commit
    branches = _git(["for-each-ref", "--sort=-committerdate", "--format=%(refname:short)",
                     "refs/heads"], cwd=mirror).stdout.split()
    listed = ", ".join(branches[:10]) + (f" (and {len(branches) - 10} more)" if len(branches) > 10 else "")
    raise WorkspaceError(
        f"{ref!r} is not a branch, tag or commit of {repo_url}; its branches are: {listed or '(none)'}",
        hint="fix repo_branch in the spec, or push the branch first",
    )


def _rev_parse(repo: Path, ref: str) -> str | None:
    found = _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=repo)
    return found.stdout.strip() if found.returncode == 0 else None


def _reach_hint(repo_url: str) -> str:
    return (f"check the URL and that `git ls-remote {repo_url}` works from this machine "
            "(network, credentials, SSH keys)")


# --------------------------------------------------------------------------- deps


@dataclass(frozen=True)
class DepsConfig:
    """The spec's ``deps`` section."""

    pre_install: tuple[str, ...] = ()
    requirements: str | None = None  # path relative to the checkout
    exclude_from_requirements: tuple[str, ...] = ()
    verify: str | None = None
    download_timeout_s: float = 600


@dataclass(frozen=True)
class PreparedEnv:
    """Where the runner's dependencies live and how to point the runner at them."""

    venv: Path | None  # None when there is nothing to install
    env: dict[str, str]  # environment overrides for the runner
    log_path: Path | None  # where install output went


def venv_base_python() -> str:
    """The interpreter run venvs are built from: this one's base, not the orchestrator's own venv."""
    return getattr(sys, "_base_executable", None) or sys.executable


def prepare_env(
    checkout: Path,
    deps: DepsConfig,
    envs_dir: Path,
    *,
    base_env: Mapping[str, str] | None = None,
    on_output: Callable[[str], None] | None = None,
) -> PreparedEnv:
    """Build (or reuse) the venv for this commit and deps and return how to use it.

    The venv sees system-wide packages but not the orchestrator's own venv, because
    ``exclude_from_requirements`` (say, torch) means "the base image provides it".
    It is reused while the commit, commands, requirements and excludes stay the same.
    """
    checkout = Path(checkout).resolve()
    overrides = {contract.WORKSPACE: str(checkout)}
    if not deps.pre_install and deps.requirements is None:
        return PreparedEnv(venv=None, env=overrides, log_path=None)

    base_env = dict(os.environ if base_env is None else base_env)
    base_python = venv_base_python()
    filtered = None
    if deps.requirements is not None:
        filtered = filter_requirements(checkout / deps.requirements, deps.exclude_from_requirements, root=checkout)
    material = {
        "commit": _git_ok(["rev-parse", "HEAD"], cwd=checkout, what=f"reading the commit of {checkout}").strip(),
        "python": [base_python, platform.python_version()],
        "pre_install": list(deps.pre_install),
        "requirements": deps.requirements,
        # The filtered text covers the file, the -r files it names and the excludes.
        "requirements_sha256": hashlib.sha256(filtered.encode()).hexdigest() if filtered is not None else None,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    venv = Path(envs_dir).resolve() / key[:16]
    log_path = venv / "install.log"
    overrides |= {
        "PATH": os.pathsep.join([str(venv / "bin"), base_env.get("PATH", os.defpath)]),
        "VIRTUAL_ENV": str(venv),
    }
    prepared = PreparedEnv(venv=venv, env=overrides, log_path=log_path)

    with _locked(_lock_path(venv)):
        if _is_ready(venv, key):
            return prepared
        shutil.rmtree(venv, ignore_errors=True)  # a crash or failure mid-install left it
        venv.mkdir(parents=True)
        env = base_env | overrides
        with open(log_path, "w", encoding="utf-8") as log:

            def emit(line: str) -> None:
                log.write(line + "\n")
                log.flush()
                if on_output is not None:
                    on_output(line)

            def step(title: str, argv: list[str], hint: str, timeout_s: float | None) -> None:
                _run_step(title, argv, cwd=checkout, env=env, timeout_s=timeout_s, emit=emit,
                          hint=f"{hint}; full log: {log_path}")

            # Local work, so not bounded by the download timeout.
            step(f"creating the venv {venv} with {base_python}",
                 [base_python, "-m", "venv", "--system-site-packages", str(venv)],
                 "make sure this Python can create venvs (Debian/Ubuntu: install python3-venv)", None)
            for index, command in enumerate(deps.pre_install):
                step(f"deps.pre_install[{index}] `{command}`", ["bash", "-c", command],
                     "fix or remove this command in the spec's deps.pre_install", deps.download_timeout_s)
            if filtered is not None:
                filtered_path = venv / FILTERED_REQUIREMENTS
                filtered_path.write_text(filtered, encoding="utf-8")
                step(f"pip install -r {deps.requirements} (filtered copy: {filtered_path})",
                     [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                      "--no-input", "-r", str(filtered_path)],
                     "fix the requirements file in the repository, or list packages the base image "
                     "already provides under deps.exclude_from_requirements", deps.download_timeout_s)
        (venv / ".ready").write_text(json.dumps({"key": key, **material}, indent=2) + "\n")
    return prepared


def within(root: Path, rel: str | Path, what: str) -> Path:
    """``root / rel`` resolved (symlinks followed), refused when it leaves ``root``: a spec names files
    of the repository, never ``../../etc/hostname`` nor a link out of it."""
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if path != base and base not in path.parents:
        raise WorkspaceError(f"{what} {str(rel)!r} leaves the repository (it resolves to {path})",
                             hint=f"name a file inside the repository, relative to its root ({base})")
    return path


def filter_requirements(path: Path, exclude: Iterable[str], *, root: Path | None = None) -> str:
    """The requirements file at ``path`` without the excluded packages.

    Names compare per PEP 503 (``torch_geometric`` excludes ``torch-geometric``).
    Option lines and comments are kept; nested ``-r`` files are inlined (and
    filtered) and ``-c`` paths made absolute, because the filtered copy lives in
    another directory and pip resolves those paths against the file that names them.
    """
    from packaging.utils import canonicalize_name

    root = Path(root if root is not None else Path(path).parent).resolve()
    excluded = {canonicalize_name(n.strip()) for n in exclude}
    return "".join(_filtered_lines(within(root, Path(path).resolve(), "deps.requirements"), excluded, set(), root))


def _filtered_lines(path: Path, excluded: AbstractSet[str], seen: set[Path], root: Path) -> Iterator[str]:
    path = within(root, path, "the requirements file")  # an -r or -c line may point anywhere
    if path in seen:
        return
    seen.add(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkspaceError(
            f"cannot read the requirements file {path}: {exc.strerror or exc}",
            hint="check deps.requirements in the spec (a path relative to the repository root) and "
            "the -r files it names; commit missing files to the branch",
        ) from exc
    for line in re.sub(r"\\\r?\n", "", text).splitlines():  # pip joins backslash continuations
        content = re.sub(r"(^|\s+)#.*$", "", line).strip()
        nested = re.match(r"(-r|--requirement|-c|--constraint)\s*=?\s*(\S+)$", content)
        if nested and not _URL_SCHEME.match(nested.group(2)):
            target = path.parent / nested.group(2)
            if nested.group(1) in ("-r", "--requirement"):
                yield f"# ratiocinator: inlined {line.strip()}\n"
                yield from _filtered_lines(target, excluded, seen, root)
            else:
                yield f"-c {within(root, target, 'a -c constraints file')}\n"
            continue
        if content and not content.startswith("-") and _requirement_name(content) in excluded:
            yield f"# ratiocinator: excluded by deps.exclude_from_requirements: {line.strip()}\n"
            continue
        yield line + "\n"


def _requirement_name(content: str) -> str | None:
    """The normalised project name of a requirement line; None for paths, URLs and the like."""
    # packaging's requirement parser compiles its grammar on import (about 0.03 s): only for a filtered file
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        return canonicalize_name(Requirement(re.split(r"\s+-", content, maxsplit=1)[0]).name)
    except InvalidRequirement:
        return None


def _is_ready(venv: Path, key: str) -> bool:
    try:
        return json.loads((venv / ".ready").read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_verify(checkout: Path, command: str, env: Mapping[str, str], *, timeout_s: float = 600) -> str:
    """Run ``deps.verify`` in the checkout and return its output, so a broken env fails
    before any money is spent on runs. ``env`` is its whole environment (the caller's inherited
    variables plus ``PreparedEnv.env``): nothing else of the orchestrator's leaks in.
    """
    code, lines = _stream(["bash", "-c", command], cwd=Path(checkout), env=dict(env),
                          timeout_s=timeout_s)
    if code == 0:
        return "\n".join(lines)
    raise WorkspaceError(
        f"deps.verify `{command}` {_outcome(code, timeout_s)} in {checkout}; "
        f"its output (last {_VERIFY_TAIL} lines):\n{_tail(lines, _VERIFY_TAIL)}",
        hint="the prepared environment lacks something the runner needs: fix deps.pre_install or "
        f"deps.requirements (or the verify command); reproduce with: cd {checkout} && {command}",
    )


# --------------------------------------------------------------------------- processes


def _run_step(title: str, argv: list[str], *, cwd: Path, env: Mapping[str, str], timeout_s: float | None,
              emit: Callable[[str], None], hint: str) -> None:
    """Run one install step, streaming its output; a failure stops the install."""
    emit(f"==> {title}")
    code, lines = _stream(argv, cwd=cwd, env=env, timeout_s=timeout_s, sink=emit)
    if code == 0:
        return
    if code is None:
        hint += "; if it was only slow, raise download_timeout_s"
    raise WorkspaceError(
        f"{title} {_outcome(code, timeout_s)} in {cwd}; last {_STEP_TAIL} lines of its output:\n"
        f"{_tail(lines, _STEP_TAIL)}",
        hint=hint,
    )


def _stream(argv: list[str], *, cwd: Path, env: Mapping[str, str], timeout_s: float | None,
            sink: Callable[[str], None] | None = None) -> tuple[int | None, list[str]]:
    """Run ``argv`` in its own process group, output (stdout+stderr) line by line to ``sink``.

    Returns the exit code (None on timeout) and all output lines. On timeout the whole
    group is killed, so children such as ``sleep 100 &`` die with the step. Background
    jobs that outlive the step while still holding its output pipe are ended too
    (after a short grace), since otherwise reading the output would never finish.
    """
    lines: list[str] = []
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot run {argv[0]} in {cwd}: {exc}",
                             hint=f"install {argv[0]} or check that {cwd} exists") from exc
    stdout = proc.stdout
    assert stdout is not None  # stdout=PIPE

    def pump() -> None:
        for raw in stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            lines.append(line)
            if sink is not None:
                sink(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        code = None
        _kill_group(proc.pid)
        proc.wait()
    reader.join(_DRAIN_GRACE_S)
    if reader.is_alive():
        _kill_group(proc.pid)
        reader.join(_DRAIN_GRACE_S)
    if not reader.is_alive():  # closing under a blocked reader would deadlock on its buffer lock
        stdout.close()
    return code, lines


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _outcome(code: int | None, timeout_s: float | None) -> str:
    if code is None:
        return f"timed out after {timeout_s:g}s"
    if code < 0:
        return f"was killed by signal {-code}"
    return f"failed with exit code {code}"


def _tail(output: str | list[str], count: int) -> str:
    lines = output.splitlines() if isinstance(output, str) else output
    return "\n".join(lines[-count:]) if lines else "(no output)"


def _git(args: list[str], *, cwd: Path | None = None, timeout_s: float | None = None,
         extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run git without a shell and without prompting for credentials.

    It runs in its own session, so ssh cannot ask on the terminal either, and a
    timeout ends git together with its helpers (ssh, git-remote-https).
    """
    env = {k: v for k, v in os.environ.items() if k not in _GIT_REPO_VARS}
    env |= {"GIT_TERMINAL_PROMPT": "0", **(extra_env or {})}
    try:
        proc = subprocess.Popen(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", start_new_session=True)
    except OSError as exc:
        if shutil.which("git") is None:
            raise WorkspaceError("git is not installed (or not on PATH)",
                                 hint="install git on this machine") from exc
        raise WorkspaceError(f"cannot run git in {cwd}: {exc}",
                             hint="check that the directory exists and is readable") from exc
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        err += f"\n(git {args[0]} timed out after {timeout_s:g}s and was stopped)"
        return subprocess.CompletedProcess(proc.args, -signal.SIGKILL, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _git_ok(args: list[str], *, what: str, cwd: Path | None = None, timeout_s: float | None = None,
            extra_env: Mapping[str, str] | None = None, hint: str | None = None) -> str:
    """Run git and return its stdout; a failure becomes a WorkspaceError with git's stderr."""
    done = _git(args, cwd=cwd, timeout_s=timeout_s, extra_env=extra_env)
    if done.returncode != 0:
        raise WorkspaceError(f"{what} failed: git said:\n{_tail(done.stderr, _STDERR_TAIL)}",
                             hint=hint or "see git's message above")
    return done.stdout


# --------------------------------------------------------------------------- caches


def _lock_path(target: Path) -> Path:
    return target.with_name(f"{target.name}.lock")


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the OS drops it if we crash."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _staging_dir(dest: Path) -> Iterator[Path]:
    """A temp dir next to ``dest`` that is renamed to ``dest`` only if the block succeeds.

    The caller holds ``dest``'s lock, so temp dirs already there are from crashed runs.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
