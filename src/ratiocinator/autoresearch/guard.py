"""The tamper check: an agent's edit may touch only editable paths and never a protected one.

Prompts asking an agent not to edit the evaluation harness are not enforcement. Two
independent checks are made after every agent turn, before anything runs:

* every path the staged diff changes (tracked, untracked, deleted; ignored files aside)
  must match an ``editable`` pattern and no ``protected`` pattern;
* the content hash of every file a ``protected`` pattern matches on disk — tracked,
  untracked or git-ignored (a ``val.txt`` kept out of git), followed through links — must
  equal its hash when the session started; a protected file created or deleted counts.

Patterns are globs relative to the repository root: ``*`` and ``?`` stay within one path
segment, ``**`` spans any number of them, and a pattern naming a directory (``data`` or
``data/``) covers everything under it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ratiocinator.autoresearch.gitops import Change

_WILD = re.compile(r"[*?\[]")
HASH_CHUNK = 1 << 20


@lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern[str]:
    """A glob as a regex that also matches anything below a matching directory."""
    body = pattern.strip("/")
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if body.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = body.find("]", i + 2 if body[i + 1:i + 2] in ("!", "]") else i + 1)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                inner = body[i + 1:end]
                out.append("[" + ("^" + inner[1:] if inner.startswith("!") else inner).replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + "(?:/.*)?", re.DOTALL)


def matches(path: str, pattern: str) -> bool:
    return _compile(pattern).fullmatch(path) is not None


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    return any(matches(path, p) for p in patterns)


@dataclass(frozen=True)
class Verdict:
    """What an edit did wrong, in words for the ledger and the agent's next prompt; empty when clean."""

    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def summary(self) -> str:
        shown = "; ".join(self.problems[:3])
        return shown + (f"; and {len(self.problems) - 3} more" if len(self.problems) > 3 else "")


def protected_hashes(root: Path, patterns: Sequence[str]) -> dict[str, str]:
    """{relative path: sha256} of every file on disk that a protected pattern matches."""
    found: dict[str, str] = {}
    for pattern in patterns:
        for rel in _files_for(root, pattern):
            if rel not in found:
                found[rel] = _hash(root / rel)
    return dict(sorted(found.items()))


def _files_for(root: Path, pattern: str) -> Iterable[str]:
    """Files under ``root`` matching ``pattern``; walks only below its literal prefix, only as deep as it reaches."""
    parts = pattern.strip("/").split("/")
    literal: list[str] = []
    for part in parts:
        if _WILD.search(part):
            break
        literal.append(part)
    start = root.joinpath(*literal) if literal else root
    if len(literal) == len(parts):  # a plain path: one file, or everything under a directory
        if start.is_dir():
            yield from _walk(root, start, None, pattern)
        elif start.exists() or start.is_symlink():
            yield "/".join(literal)
    elif start.is_dir():
        yield from _walk(root, start, None if "**" in parts else len(parts) - len(literal), pattern)


def _walk(root: Path, directory: Path, remaining: int | None, pattern: str) -> Iterable[str]:
    """Matching files below ``directory``, descending ``remaining`` more segments (None: all)."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        rel = Path(entry.path).relative_to(root).as_posix()
        if rel == ".git":
            continue
        if entry.is_dir(follow_symlinks=False):
            if remaining is None or remaining > 1:
                yield from _walk(root, Path(entry.path), None if remaining is None else remaining - 1, pattern)
            elif matches(rel, pattern):  # the pattern's last segment names a directory: all of it
                yield from _walk(root, Path(entry.path), None, pattern)
        elif matches(rel, pattern):
            yield rel


def _hash(path: Path) -> str:
    """sha256 of a file's bytes (links followed; a dangling link hashes its target's name)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
    except IsADirectoryError:
        digest.update(b"directory")
    except OSError:
        digest.update(b"unreadable:" + os.fsencode(os.readlink(path) if path.is_symlink() else str(path)))
    return digest.hexdigest()


def check_edit(changes: Sequence[Change], *, editable: Sequence[str], protected: Sequence[str],
               expected: dict[str, str], actual: dict[str, str]) -> Verdict:
    """Both checks at once; ``expected``/``actual`` are :func:`protected_hashes` before and after."""
    problems: list[str] = []
    flagged: set[str] = set()
    for change in changes:
        if matches_any(change.path, protected):
            problems.append(f"{_verb(change.status)} protected {change.path}")
            flagged.add(change.path)
        elif not matches_any(change.path, editable):
            problems.append(f"{_verb(change.status)} {change.path}, which is not editable")
    for path in sorted(set(expected) | set(actual)):
        if path in flagged or expected.get(path) == actual.get(path):
            continue
        if path not in actual:
            problems.append(f"deleted protected {path}")
        elif path not in expected:
            problems.append(f"created protected {path}")
        else:
            problems.append(f"changed protected {path}")
    return Verdict(tuple(problems))


def _verb(status: str) -> str:
    return {"A": "added", "D": "deleted", "M": "changed", "T": "changed the type of"}.get(status[:1], "changed")
