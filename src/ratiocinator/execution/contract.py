"""The runner contract, in one place: how a runner is started (`runner_argv`) and what its
environment holds (`runner_environment`), and the names of the ``RATIOCINATOR_*``
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
``RATIOCINATOR_DATA_DIR``  the host's copy of the spec's ``data`` (unset with ``data.source: none``)
=========================  ===================================================================

The arm's knobs are set as variables too. Of the orchestrator's own environment a runner (and a
deps step: ``pre_install``, the requirements install, ``verify``) inherits only an allow-list
(`inherited_env`): the system's paths, locale, proxies, the GPU and thread-pool settings, caches
— never a provider key, a token or the orchestrator's ``RATIOCINATOR_*`` settings — plus what the
spec names on purpose in ``pass_env``.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the backends (and asyncio) are not needed to name the contract: a report reads it too
    from ratiocinator.backends.base import Workspace

PREFIX = "RATIOCINATOR_"
ARM = "RATIOCINATOR_ARM"
RUN_ID = "RATIOCINATOR_RUN_ID"
SEED = "RATIOCINATOR_SEED"
OUT_DIR = "RATIOCINATOR_OUT_DIR"
TRIAL = "RATIOCINATOR_TRIAL"
WORKSPACE = "RATIOCINATOR_WORKSPACE"
DATA_DIR = "RATIOCINATOR_DATA_DIR"


# What a runner inherits from the orchestrator's environment without being asked: how to find
# programs and libraries, who and where it is, locale, proxies, GPU/thread settings and caches.
INHERITED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "TZ", "TMPDIR", "LANG", "LANGUAGE", "HOSTNAME",
    "LD_LIBRARY_PATH", "LIBRARY_PATH", "CPATH", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CACHE_DIR",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_RUNTIME_DIR", "HF_HOME", "HF_DATASETS_CACHE",
    "TRANSFORMERS_CACHE", "TORCH_HOME", "MPLBACKEND", "MPLCONFIGDIR", "DISPLAY",
    "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
})
INHERITED_PREFIXES = ("LC_", "CUDA_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "OPENBLAS_NUM_", "CUBLAS_", "CUDNN_",
                      "TF_CPP_", "TORCH_CUDA_", "PYTORCH_CUDA_", "XLA_FLAGS")


def is_contract_variable(name: str) -> bool:
    """A ``RATIOCINATOR_*`` name: set by the contract for each run, never inherited from the orchestrator."""
    return name.startswith(PREFIX)


def is_inherited_name(name: str) -> bool:
    """A platform setting every runner inherits (``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``), not a study's knob."""
    return name in INHERITED_NAMES or name.startswith(INHERITED_PREFIXES)


def inherited_env(environ: Mapping[str, str], pass_env: Iterable[str] = ()) -> dict[str, str]:
    """What a runner or a deps step inherits from ``environ``: the allow-list, plus the variables
    (names or fnmatch patterns) the spec passes on purpose. Provider keys and tokens stay behind."""
    passed = tuple(pass_env)
    return {k: v for k, v in environ.items()
            if ((k in INHERITED_NAMES or k.startswith(INHERITED_PREFIXES)) and not is_contract_variable(k))
            or any(fnmatch.fnmatchcase(k, p) for p in passed)}


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
