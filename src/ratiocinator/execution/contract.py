"""The runner contract, in one place: how a runner is started (`runner_argv`) and what its
environment holds (`runner_environment`, `data_env`), and the names of the ``RATIOCINATOR_*``
variables every backend, the smoke runs and autoresearch pass on.

=========================  ===================================================================
variable                   what it holds
=========================  ===================================================================
``RATIOCINATOR_ARM``       the arm's name
``RATIOCINATOR_RUN_ID``    the run's ledger id (one per attempt)
``RATIOCINATOR_SEED``      the replicate's seed (also in ``seed_env`` when the spec names one)
``RATIOCINATOR_OUT_DIR``   where the run's artifacts go (on a remote host: the host's path)
``RATIOCINATOR_TRIAL``     ``1`` in smoke runs (run briefly), else ``0``
``RATIOCINATOR_WORKSPACE`` the checkout the run starts in (set by the workspace's environment)
``RATIOCINATOR_DATA_DIR``  the spec's ``data.path`` when ``data.source: local``
=========================  ===================================================================

The arm's knobs are set as variables too; the orchestrator's own ``RATIOCINATOR_*`` settings
(``RATIOCINATOR_HOME``, ``RATIOCINATOR_LLM_*``) never reach a runner.
"""

from __future__ import annotations

import os
from pathlib import Path

from ratiocinator.backends.base import Workspace
from ratiocinator.errors import UsageError
from ratiocinator.spec.models import LoadedSpec

PREFIX = "RATIOCINATOR_"
ARM = "RATIOCINATOR_ARM"
RUN_ID = "RATIOCINATOR_RUN_ID"
SEED = "RATIOCINATOR_SEED"
OUT_DIR = "RATIOCINATOR_OUT_DIR"
TRIAL = "RATIOCINATOR_TRIAL"
WORKSPACE = "RATIOCINATOR_WORKSPACE"
DATA_DIR = "RATIOCINATOR_DATA_DIR"


def is_contract_variable(name: str) -> bool:
    """A ``RATIOCINATOR_*`` name: set by the contract for each run, never inherited from the orchestrator."""
    return name.startswith(PREFIX)


def runner_argv(checkout: Path, runner_script: str, python: str) -> tuple[str, ...]:
    """How to start the runner: its shebang if executable, else by file type."""
    path = checkout / runner_script
    if os.access(path, os.X_OK):
        with open(path, "rb") as fh:
            if fh.read(2) == b"#!":
                return (str(path),)
    if path.suffix == ".py":
        return (python, str(path))
    return ("bash", str(path))


def data_env(loaded: LoadedSpec) -> dict[str, str]:
    """The spec's data as every run sees it (``data.source: local``: the directory, resolved)."""
    data = loaded.spec.data
    if data.source != "local":
        return {}
    path = Path(data.path or "").expanduser()
    if not path.is_absolute():
        path = loaded.path.parent / path
    if not path.is_dir():
        raise UsageError(f"{loaded.where('data', 'path')}: data.path {path} is not a directory")
    return {DATA_DIR: str(path.resolve())}


def runner_environment(
    base: dict[str, str],
    workspace: Workspace,
    knobs: dict[str, str],
    *,
    arm: str,
    run_id: int,
    seed: int,
    seed_env: str | None,
    out_dir: Path,
    trial: bool,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The runner's environment: ours first, then the workspace, the knobs, and the run's identity."""
    env = {k: v for k, v in base.items() if not is_contract_variable(k)}
    env.update(workspace.env)
    env.update(extra or {})
    env.update(knobs)
    env.update({
        ARM: arm,
        RUN_ID: str(run_id),
        SEED: str(seed),
        OUT_DIR: str(out_dir),
        TRIAL: "1" if trial else "0",
        "PYTHONUNBUFFERED": env.get("PYTHONUNBUFFERED", "1"),
    })
    if seed_env:
        env[seed_env] = str(seed)
    return env
