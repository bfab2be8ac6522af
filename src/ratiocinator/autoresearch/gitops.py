"""Every git operation of the loop, as argument lists (never a shell) and never a push.

The loop works in worktrees of the user's repository so the user's own checkout, its
branch and any uncommitted work stay untouched. Branches are moved only by commits made
in a worktree, ``reset --hard`` to a kept commit, or a compare-and-swap ``update-ref``
(so two workers can never both advance the shared branch from the same old tip). There
is deliberately no method that talks to a remote: the experiment branch stays local
until a human decides what to upstream.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ratiocinator.errors import RatiocinatorError

# Used only when the repository has no identity of its own, so a fresh CI machine works;
# a configured user.name/user.email always wins.
FALLBACK_IDENTITY = ("ratiocinator autoresearch", "autoresearch@ratiocinator.invalid")
EXCLUDE_MARK = "# ratiocinator autoresearch (loop-owned paths)"


class GitError(RatiocinatorError):
    """A git command failed; the message carries git's own words."""

    exit_code = 1


@dataclass(frozen=True)
class Change:
    """One path changed between two trees (status letter from ``--name-status``)."""

    status: str
    path: str


class Git:
    """git in one directory (a repository or one of its worktrees)."""

    def __init__(self, cwd: Path, env: Mapping[str, str] | None = None, *, keep: Sequence[str] = ()) -> None:
        """``keep``: untracked paths (linked data) that neither ``clean`` removes nor ``stage_all`` adds."""
        self.cwd = Path(cwd)
        self.keep = tuple(p.strip("/") for p in keep)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("GIT_TERMINAL_PROMPT", "0")
        self._identity: list[str] | None = None

    # -- plumbing ------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, input: bytes | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """``git ARGS`` in this directory; a failure (with ``check``) is a GitError quoting stderr."""
        done = subprocess.run(["git", *args], cwd=self.cwd, env={**self.env, **(env or {})}, input=input,
                              capture_output=True, stdin=None if input is not None else subprocess.DEVNULL, check=False)
        if check and done.returncode != 0:
            raise GitError(f"git {' '.join(args[:4])}{' ...' if len(args) > 4 else ''} failed in {self.cwd}: "
                           f"{self._words(done)}")
        return done

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.decode("utf-8", "replace").strip()

    @staticmethod
    def _words(done: subprocess.CompletedProcess[bytes]) -> str:
        text = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
        return text[-2000:] or f"exit code {done.returncode}"

    def identity(self) -> list[str]:
        """``-c user.name=... -c user.email=...`` when the repository has no identity, else nothing."""
        if self._identity is None:
            have = {key: self.run("config", key, check=False).stdout.strip() for key in ("user.name", "user.email")}
            env_ok = all(self.env.get(f"GIT_{who}_{what}") for who in ("AUTHOR", "COMMITTER")
                         for what in ("NAME", "EMAIL"))
            if all(have.values()) or env_ok:
                self._identity = []
            else:
                self._identity = ["-c", f"user.name={FALLBACK_IDENTITY[0]}", "-c", f"user.email={FALLBACK_IDENTITY[1]}"]
        return self._identity

    # -- refs ----------------------------------------------------------------------

    def is_repo(self) -> bool:
        return self.run("rev-parse", "--git-dir", check=False).returncode == 0

    def toplevel(self) -> Path:
        return Path(self.out("rev-parse", "--show-toplevel"))

    def resolve(self, ref: str) -> str | None:
        """The commit SHA ``ref`` names, or None."""
        done = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return done.stdout.decode().strip() or None if done.returncode == 0 else None

    def tree(self, ref: str) -> str:
        return self.out("rev-parse", f"{ref}^{{tree}}")

    def head(self) -> str:
        return self.out("rev-parse", "HEAD")

    def current_branch(self) -> str | None:
        done = self.run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        return done.stdout.decode().strip() or None if done.returncode == 0 else None

    def branch_exists(self, name: str) -> bool:
        return self.run("show-ref", "--verify", "--quiet", f"refs/heads/{name}", check=False).returncode == 0

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        return self.run("merge-base", "--is-ancestor", ancestor, descendant, check=False).returncode == 0

    def create_branch(self, name: str, commit: str) -> None:
        """A new branch; git itself refuses an existing one."""
        self.run("branch", "--no-track", name, commit)

    def move_branch(self, name: str, new: str, old: str | None) -> bool:
        """Compare-and-swap: point ``name`` at ``new`` only if it is still at ``old``."""
        args = ["update-ref", "-m", "autoresearch", f"refs/heads/{name}", new]
        if old is not None:
            args.append(old)
        return self.run(*args, check=False).returncode == 0

    def first_parent_log(self, ref: str, stop: str) -> list[str]:
        """Commits from ``ref`` back to (not including) ``stop``, newest first, along first parents."""
        text = self.out("rev-list", "--first-parent", ref, f"^{stop}")
        return text.split() if text else []

    def git_path(self, name: str) -> Path:
        """A path inside the repository's common git directory (shared by all worktrees)."""
        path = Path(self.out("rev-parse", "--git-common-dir"))
        return (path if path.is_absolute() else self.cwd / path) / name

    # -- worktrees -----------------------------------------------------------------

    def worktrees(self) -> set[Path]:
        text = self.out("worktree", "list", "--porcelain")
        return {Path(line[len("worktree "):]).resolve() for line in text.splitlines() if line.startswith("worktree ")}

    def ensure_worktree(self, path: Path, branch: str, commit: str) -> Git:
        """A worktree at ``path`` on ``branch`` (created or reset to ``commit``); returns its Git."""
        path = path.resolve()
        if path in self.worktrees() and (path / ".git").exists():
            tree = Git(path, self.env)
            if tree.current_branch() != branch:
                tree.run("checkout", "--quiet", "--force", "-B", branch, commit)
            return tree
        self.run("worktree", "prune")
        if path.exists():
            shutil.rmtree(path)  # a stale directory of ours that git no longer knows
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run("worktree", "add", "--quiet", "--force", "-B", branch, str(path), commit)
        return Git(path, self.env)

    def add_excludes(self, patterns: Sequence[str]) -> None:
        """Make loop-owned paths (prompt dir, run log, linked data) invisible to status and add."""
        exclude = self.git_path("info/exclude")
        exclude.parent.mkdir(parents=True, exist_ok=True)
        current = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
        present = set(current.splitlines())
        missing = [p for p in patterns if p not in present]
        if not missing:
            return
        block = ("" if not current or current.endswith("\n") else "\n")
        block += (EXCLUDE_MARK + "\n" if EXCLUDE_MARK not in present else "") + "\n".join(missing) + "\n"
        with open(exclude, "a", encoding="utf-8") as fh:
            fh.write(block)

    # -- the working tree ----------------------------------------------------------

    def reset_hard(self, commit: str) -> None:
        """The worktree becomes exactly ``commit`` (ignored files, such as build caches, survive)."""
        self.run("reset", "--quiet", "--hard", commit)
        self.run("clean", "--quiet", "-d", "--force", *(f"--exclude=/{p}" for p in self.keep))

    def stage_all(self) -> None:
        self.run("add", "--all", "--", ".", *(f":(top,exclude){p}" for p in self.keep))

    def staged_changes(self, parent: str) -> list[Change]:
        """Every path the index differs in from ``parent`` (renames as delete + add)."""
        done = self.run("diff", "--cached", "--name-status", "--no-renames", "-z", parent)
        raw = done.stdout.decode("utf-8", "replace")
        parts = raw.split("\0")
        return [Change(parts[i][0], parts[i + 1]) for i in range(0, len(parts) - 1, 2) if parts[i]]

    def staged_diff(self, parent: str) -> bytes:
        """The full, binary-safe diff of the index against ``parent``: enough to rebuild the commit."""
        return self.run("diff", "--cached", "--binary", "--full-index", "--no-renames", parent).stdout

    def commit(self, message: str) -> str:
        """Commit the index (hooks run, as in the seed contract); returns the new SHA."""
        self.run(*self.identity(), "commit", "--quiet", "--no-edit", "-m", message)
        return self.head()

    def snapshot(self, parent: str, message: str) -> str:
        """A commit object of the index on ``parent`` that no branch points to (for violations)."""
        tree = self.out("write-tree")
        return self.out(*self.identity(), "commit-tree", tree, "-p", parent, "-m", message)

    def fold_commits(self, parent: str) -> None:
        """Undo commits an agent made on its own, keeping their changes staged."""
        if self.head() != parent:
            self.run("reset", "--quiet", "--soft", parent)

    def apply(self, patch: bytes, *, check_only: bool = False) -> str | None:
        """Apply a patch to the working tree (``--check``: only test it); git's complaint, or None."""
        args = ["apply", "--binary", "--recount", "--whitespace=nowarn"]
        if check_only:
            args.append("--check")
        done = self.run(*args, "-", input=patch, check=False)
        return None if done.returncode == 0 else self._words(done)

    # -- integrating a candidate with a newer best --------------------------------

    def rebase_onto(self, commit: str, onto: str) -> str | None:
        """Replay ``commit``'s own changes on ``onto`` (HEAD ends there); None on conflict."""
        self.reset_hard(commit)
        done = self.run(*self.identity(), "rebase", "--quiet", onto, check=False)
        if done.returncode != 0:
            self.run("rebase", "--abort", check=False)
            return None
        return self.head()

    def merge_into(self, commit: str, onto: str, message: str) -> str | None:
        """A merge commit with parents (``onto``, ``commit``); None on conflict."""
        self.reset_hard(onto)
        done = self.run(*self.identity(), "merge", "--quiet", "--no-ff", "--no-edit", "-m", message, commit,
                        check=False)
        if done.returncode != 0:
            self.run("merge", "--abort", check=False)
            return None
        return self.head()

    # -- recovering a diff ---------------------------------------------------------

    def branch_with_diff(self, name: str, parent: str, diff: bytes, message: str) -> str:
        """New branch ``name`` = ``parent`` + ``diff``, built in a private index: no checkout is touched."""
        if self.branch_exists(name):
            raise GitError(f"branch '{name}' already exists in {self.cwd}; choose another --branch name")
        with tempfile.TemporaryDirectory(prefix="ratiocinator-apply-") as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self.run("read-tree", parent, env=env)
            if diff:
                done = self.run("apply", "--cached", "--binary", "-", input=diff, env=env, check=False)
                if done.returncode != 0:
                    raise GitError(f"the recorded diff does not apply to {parent[:12]}: {self._words(done)}")
            tree = self.run("write-tree", env=env).stdout.decode().strip()
        commit = self.out(*self.identity(), "commit-tree", tree, "-p", parent, "-m", message)
        self.create_branch(name, commit)
        return commit
