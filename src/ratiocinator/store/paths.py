"""Where everything lives under a home (``--home``, ``RATIOCINATOR_HOME``): one place for each
file and folder, so no module spells a path of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ratiocinator.errors import UsageError


@dataclass(frozen=True)
class Paths:
    """Everything under ``--home``."""

    home: Path

    @property
    def ledger(self) -> Path:
        return self.home / "ledger.db"

    @property
    def repos(self) -> Path:
        return self.home / "repos"

    def runs(self, experiment_id: str) -> Path:
        return self.home / "runs" / experiment_id

    def report(self, experiment_id: str) -> Path:
        return self.home / "reports" / experiment_id

    def lock(self, experiment_id: str) -> Path:
        return self.home / "locks" / f"{experiment_id}.lock"

    @property
    def envs(self) -> Path:
        """Virtual environments built for a commit's deps (reused while they stay the same)."""
        return self.home / "envs"

    def checks(self, name: str) -> Path:
        """A standalone ``check``'s smoke runs."""
        return self.home / "checks" / name

    def autoresearch(self, tag: str) -> Path:
        return self.home / "autoresearch" / tag

    @property
    def ssh_known_hosts(self) -> Path:
        """Host keys pinned on first use."""
        return self.home / "ssh_known_hosts"

    @property
    def ssh_bundles(self) -> Path:
        """Git bundles of commits, sent to hosts that clone without credentials."""
        return self.home / "ssh_bundles"

    @property
    def data(self) -> Path:
        """The spec's data fetched from URLs (one folder per source), and digests of local data directories."""
        return self.home / "data"

    def backend(self, name: str) -> Path:
        """A backend's own files (a rented instance's key pair, its pinned host keys)."""
        return self.home / name


def no_ledger(ledger: Path, *, hint: str = "run `ratiocinator research SPEC` first, or pass --home") -> UsageError:
    """The error for a ledger that is not there, saying so plainly when the home itself is a file."""
    home = ledger.parent
    if home.exists() and not home.is_dir():
        return UsageError(f"{home}: the home is a file, not a folder",
                          hint="pass --home (or RATIOCINATOR_HOME) a folder; it holds the ledger and every run's files")
    return UsageError(f"no ledger at {ledger}", hint=hint)
