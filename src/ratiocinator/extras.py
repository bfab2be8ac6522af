"""Optional dependencies, imported where they are used, with the extra that installs each.

The core install is what a study on this machine needs. LLM providers, the SSH, Vast.ai and Ray
backends, the Optuna search, MLflow export and DataFrames come with extras
(``pip install 'ratiocinator[llm]'``); a command that needs one that is missing stops with a
`MissingExtra` naming the extra, never with an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ratiocinator.errors import UsageError

# extra -> the top-level modules it provides (pyproject.toml's optional-dependencies say the versions)
EXTRAS: dict[str, tuple[str, ...]] = {
    "llm": ("openai", "anthropic"),
    "ssh": ("asyncssh",),
    "vast": ("asyncssh", "tenacity"),
    "search": ("optuna",),
    "ray": ("ray",),
    "mlflow": ("mlflow",),
    "pandas": ("pandas", "pyarrow"),
    "hf": ("huggingface_hub",),
}


class MissingExtra(UsageError):
    """A feature needs a package of an extra that is not installed (exit 2: install it and run again)."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the package '{module}', which is not installed",
                         hint=f"pip install 'ratiocinator[{extra}]'")
        self.module = module
        self.extra = extra


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """``import module``, or a `MissingExtra` saying which extra installs it.

    Only the absence of ``module`` itself (or of a package it needs) becomes a `MissingExtra`; any
    other failure while importing it is a bug worth its traceback.
    """
    assert extra in EXTRAS, f"unknown extra {extra!r}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or module).partition(".")[0]
        raise MissingExtra(missing, extra, purpose) from None


def require_all(extra: str, *, purpose: str) -> None:
    """Every module of ``extra`` importable, or a `MissingExtra` for the first one that is not."""
    for module in EXTRAS[extra]:
        require(module, extra=extra, purpose=purpose)


__all__ = ["EXTRAS", "MissingExtra", "require", "require_all"]
