"""``autoresearch-log``: every attempt of a session from the ledger, and any of them recreated as a branch.

The seed loses every discarded diff to ``git reset``. Here each attempt's full binary
diff against its parent is in the ledger, so any attempt — discarded, crashed,
violating, interrupted — can become a branch again: the parent commit plus the diff,
committed with the attempt's hypothesis, built in a private index so no checkout
(neither the user's nor a worker's) is touched.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ratiocinator.autoresearch.costs import costs_record
from ratiocinator.autoresearch.gitops import Git
from ratiocinator.autoresearch.program import LoadedProgram
from ratiocinator.autoresearch.store import Attempt, Session, Store
from ratiocinator.errors import UsageError
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.paths import Paths, no_ledger


def open_session(loaded: LoadedProgram, home: Path) -> tuple[Store, Session]:
    """The program's session in the ledger at ``home`` (a UsageError when there is none)."""
    path = Paths(home).ledger
    if not path.exists():
        raise no_ledger(path, hint="run `ratiocinator autoresearch PROGRAM` first, or pass --home")
    store = Store(Ledger(path))
    session = store.session_by_tag(loaded.program.tag)
    if session is None:
        store.close()
        raise UsageError(f"the ledger at {path} has no autoresearch session '{loaded.program.tag}'",
                         hint="run `ratiocinator autoresearch PROGRAM` first, or pass the --home that ran it")
    return store, session


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def attempt_record(a: Attempt) -> dict[str, Any]:
    """One attempt as JSON-ready data (the diff as text; ``git diff --binary`` output is ASCII for binary files)."""
    return {
        "id": a.id, "iteration": a.iteration, "worker": a.worker, "status": a.status, "metric": a.metric,
        "values": a.values, "secondary": a.secondary, "hypothesis": a.hypothesis, "reason": a.reason,
        "failure": a.failure, "evidence": a.evidence, "host": a.host,
        "commit": a.commit_sha, "parent": a.parent_commit, "agent_ref": a.agent_ref,
        "started_at": _iso(a.started_at), "ended_at": _iso(a.ended_at), "agent_s": a.agent_s, "run_s": a.run_s,
        "cost_usd": a.cost, "log_path": a.log_path, "log_tail": a.log_tail,
        "diff": a.diff.decode("utf-8", "replace"),
    }


def session_record(session: Session, attempts: list[Attempt], store: Store | None = None) -> dict[str, Any]:
    """The session as JSON-ready data; with its ``store``, also ``costs``: what each kept improvement cost."""
    record: dict[str, Any] = {
        "tag": session.tag, "repo": session.repo, "branch": session.branch, "base_branch": session.base_branch,
        "base_commit": session.base_commit, "best_commit": session.best_commit, "status": session.status,
        "reason": session.reason, "attempts": [attempt_record(a) for a in attempts],
    }
    if store is not None:
        record["costs"] = costs_record(store, session, attempts)
    return record


def apply_attempt(store: Store, session: Session, attempt_id: int, branch: str) -> str:
    """Branch ``branch`` = the attempt's parent + its diff, committed; returns the new commit."""
    attempt = store.attempt(attempt_id)
    if attempt.session_id != session.id:
        raise UsageError(f"attempt {attempt_id} belongs to another session, not '{session.tag}'",
                         hint="`ratiocinator autoresearch-log PROGRAM` lists this session's attempt ids")
    if not attempt.diff:
        raise UsageError(f"attempt {attempt_id} ({attempt.status}) changed nothing; there is no diff to apply")
    git = Git(Path(session.repo))
    if git.branch_exists(branch):
        raise UsageError(f"branch '{branch}' already exists in {session.repo}", hint="choose another --branch name")
    if git.resolve(attempt.parent_commit) is None:
        raise UsageError(f"the parent commit {attempt.parent_commit[:12]} of attempt {attempt_id} is gone from"
                         f" {session.repo}")
    message = (f"{attempt.hypothesis}\n\nrecreated from autoresearch {session.tag} attempt {attempt.iteration}"
               f" (id {attempt.id}, {attempt.status})")
    return git.branch_with_diff(branch, attempt.parent_commit, attempt.diff, message)
