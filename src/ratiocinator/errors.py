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
