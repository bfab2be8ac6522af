"""Makes the optional packages unimportable in a child interpreter, as in a core-only install.

A child started with this folder on ``PYTHONPATH`` and ``RATIOCINATOR_TEST_BLOCK=mod1,mod2`` loads
`sitecustomize` below, which puts a finder first on ``sys.meta_path`` that answers every import of
those packages with the ModuleNotFoundError Python raises for a package that is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent / "without_extras_site"
ENV = "RATIOCINATOR_TEST_BLOCK"
# Every package an extra brings that ratiocinator imports (ratiocinator.extras.EXTRAS).
EXTRA_PACKAGES = ("openai", "anthropic", "asyncssh", "tenacity", "optuna", "ray", "mlflow", "pandas", "huggingface_hub",
                  "pyarrow")


def env_without(packages: tuple[str, ...] = EXTRA_PACKAGES) -> dict[str, str]:
    """os.environ for a child in which ``packages`` cannot be imported."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, ENV: ",".join(packages)}
