"""Advice on a valid spec: things that will run, but not the way the author most likely meant.

Errors stop a spec; these are warnings ``validate`` prints and the readiness review repeats:
a GPU spec that will run on this machine because ``backend`` defaults to local, and deps
steps that ``cd`` into a path that is not where the repository is checked out.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ratiocinator.spec.models import LoadedSpec

if TYPE_CHECKING:
    from ratiocinator.backends.base import HardwareFinding

WORKSPACE_VARIABLE = "RATIOCINATOR_WORKSPACE"
# Absolute paths a deps step may name on purpose: the system's own directories.
SYSTEM_ROOTS = frozenset({"bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "opt", "proc", "run", "sbin", "snap",
                          "sys", "tmp", "usr", "var"})
_ABSOLUTE = re.compile(r"(?:^|(?<=[=\s\"'(;&|]))(/[A-Za-z0-9_.+\-][A-Za-z0-9_.+\-/]*)")


def backend_advice(loaded: LoadedSpec, findings: Sequence[HardwareFinding]) -> list[str]:
    """For a spec that asks for a GPU and names no backend: where its runs will go, and how to rent the GPU."""
    spec = loaded.spec
    if "backend" in spec.model_fields_set or not (spec.hardware.gpu or spec.hardware.num_gpus):
        return []
    wanted = spec.hardware.gpu or f"{spec.hardware.num_gpus} GPU(s)"
    lines = [f"note: the spec names no backend, so it is local (the default): runs go to this machine, and the"
             f" hardware section ({wanted}) is checked against it"]
    unmet = [f for f in findings if f.status == "unmet" and f.field in ("gpu", "num_gpus")]
    if unmet:
        lines.append(f"note: this machine lacks it ({unmet[0].detail}); `backend: vast` rents {wanted} on"
                     " Vast.ai within max_dollars (key in VAST_API_KEY; see the Backends page of the docs),"
                     " `backend: ssh` uses a machine you have")
    return lines


def absolute_deps_paths(loaded: LoadedSpec) -> list[str]:
    """Warnings for deps steps (``pre_install``, ``verify``) that name an absolute path outside the checkout.

    Steps start in the checkout, whose path is in ``$RATIOCINATOR_WORKSPACE``; a hard-coded
    ``cd /workspace/experiment`` (a path from another tool's layout) runs somewhere else.
    """
    deps = loaded.spec.deps
    steps: list[tuple[tuple[str | int, ...], str, str]] = [
        (("deps", "pre_install", i), f"deps.pre_install[{i}]", command) for i, command in enumerate(deps.pre_install)
    ]
    if deps.verify:
        steps.append((("deps", "verify"), "deps.verify", deps.verify))
    warnings = []
    for loc, label, command in steps:
        paths = [p for p in _absolute_paths(command) if p.strip("/").split("/")[0] not in SYSTEM_ROOTS]
        if paths:
            warnings.append(
                f"warning: {loaded.where(*loc)}: {label} names {', '.join(paths)}, which is not where the repository"
                f" is checked out; every deps step starts in the checkout, whose path is in ${WORKSPACE_VARIABLE}"
                f" (e.g. cd \"${WORKSPACE_VARIABLE}\")"
            )
    return warnings


def _absolute_paths(command: str) -> list[str]:
    """Absolute paths in a shell command, outside URLs (``https://host/path`` is not a path here)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # unbalanced quotes: bash will say so when the step runs
        words = command.split()
    found: list[str] = []
    for word in words:
        if "://" in word:
            continue
        for match in _ABSOLUTE.finditer(word):
            path = match.group(1).rstrip("/;)")
            if path and path not in found:
                found.append(path)
    return found
