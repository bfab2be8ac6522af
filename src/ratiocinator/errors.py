"""Errors a user can act on.

Every error the CLI shows without a traceback derives from `RatiocinatorError`; its
message says what went wrong, where, and how to fix it, and `exit_code` follows the
CLI contract (1: the work failed, 2: usage or spec error).
"""

from __future__ import annotations


class RatiocinatorError(Exception):
    """Base of all user-facing errors."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class SpecError(RatiocinatorError):
    """The spec file is malformed, has unknown keys or invalid values."""

    exit_code = 2


class UsageError(RatiocinatorError):
    """The command line asks for something that cannot be done as asked."""

    exit_code = 2


class PlanError(RatiocinatorError):
    """The spec is valid but yields no runnable plan (no arms, ignored knobs, ...)."""

    exit_code = 2


class WorkspaceError(RatiocinatorError):
    """Cloning, LFS, dependency install or verification failed."""

    exit_code = 1


class DataError(RatiocinatorError):
    """The spec's data cannot be used as given: a missing directory, an unreachable URL, a checksum
    that does not match, or a dataset that changed under an experiment being resumed."""

    exit_code = 2


class BackendError(RatiocinatorError):
    """The compute backend cannot provide what the spec requires."""

    exit_code = 1


class BudgetError(RatiocinatorError):
    """Launching would (or could) overrun the dollar budget."""

    exit_code = 1


class CredentialsError(BackendError):
    """A provider refused the credentials: nothing more can be rented, read or destroyed with them,
    so the experiment stops rather than treating what it cannot see as gone."""

    exit_code = 1


class MachineError(RatiocinatorError):
    """The machine refused: a read-only or full disk, a damaged ledger. Nothing recorded is lost."""

    exit_code = 1


def machine_fault(exc: BaseException, ledger_path: str) -> MachineError | None:
    """A `MachineError` naming the path and the fix for an OS or SQLite failure of the machine itself;
    None for anything else (a bug, which keeps its traceback)."""
    import errno
    import sqlite3

    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM):
        where = exc.filename or ledger_path
        if exc.errno == errno.EROFS:
            return MachineError(f"{where}: the file system is read-only", hint=_HOME_HINT)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return MachineError(f"{where}: the disk is full", hint=_FULL_HINT)
        return MachineError(f"{where}: permission denied ({exc.strerror})", hint=_HOME_HINT)
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "readonly database" in text or "read-only" in text:
            return MachineError(f"{ledger_path}: the ledger is read-only ({text})", hint=_HOME_HINT)
        if "disk is full" in text or "disk I/O error" in text:
            return MachineError(f"{ledger_path}: cannot write the ledger ({text})", hint=_FULL_HINT)
        if "unable to open database file" in text:
            why = "its file system is read-only" if _read_only_fs(ledger_path) else text
            return MachineError(f"{ledger_path}: cannot open the ledger ({why})", hint=_HOME_HINT)
    if isinstance(exc, sqlite3.DatabaseError) and ("malformed" in str(exc) or "not a database" in str(exc)):
        return MachineError(
            f"{ledger_path}: the ledger is damaged ({exc})",
            hint=(f"restore a backup of {ledger_path} (with its -wal file), or salvage it: sqlite3 {ledger_path}"
                  f" '.recover' | sqlite3 recovered.db, then move recovered.db into place; rows the damage hit are"
                  " lost, and runs the ledger no longer knows will run again on resume"))
    return None


def path_fault(exc: OSError) -> UsageError | None:
    """A `UsageError` for a path the user gave that the OS cannot use as given (a name too long, a file
    where a folder must be, a symlink loop); None for any other OS error."""
    import errno

    if exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EISDIR):
        return UsageError(f"{exc.filename}: {exc.strerror}",
                          hint="check the paths on the command line (--home, the spec, the report folder):"
                               " a home must be a folder, and each name in a path at most 255 bytes")
    return None


def _read_only_fs(path: str) -> bool:
    import os

    folder = os.path.dirname(path) or "."
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


_HOME_HINT = ("make the home writable (chmod/chown it, or remount it read-write) or pass another --home;"
              " what is recorded stays as it is, and the same command resumes")
_FULL_HINT = ("free some space and run the same command again: finished runs are kept (their outcomes are also in"
              " runs/<experiment>/outcomes.jsonl) and nothing recorded is lost")
