"""The rule remote backends share when they bring a run's out dir back: never follow a link out.

A symlink is recreated locally only if it can only descend (relative, no ``..``); anything
else is skipped and listed beside the run's logs, so nothing is silently lost.
"""

from __future__ import annotations

from pathlib import Path

SKIPPED_FILE = "artifacts_skipped.txt"


def safe_link(target: str) -> bool:
    """A link may be recreated only if it can only descend: relative, no ``..``."""
    return bool(target) and not target.startswith("/") and ".." not in target.split("/")


def write_skipped(log_dir: Path, where: str, skipped: list[str]) -> None:
    """List what was not copied (and why) in the run's log dir; nothing when all came back."""
    if skipped:
        (log_dir / SKIPPED_FILE).write_text(
            f"Not copied from the {where}'s RATIOCINATOR_OUT_DIR (links must be relative and stay inside it):\n"
            + "".join(f"  {line}\n" for line in skipped))
