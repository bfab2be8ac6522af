"""Ratiocinator: an autonomous ML-research pipeline.

A research spec becomes planned experiment arms, budgeted runs recorded in a SQLite
ledger, and a report whose every number traces back to a recorded run.

The Python API (`ratiocinator.api`) is re-exported here and imported on first use, so
``import ratiocinator`` stays as cheap as the CLI's start: ``ratiocinator.open_home()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_API = ("open_home", "Home", "Experiment", "ExperimentInfo", "Arm", "Run", "Series", "ArmVerdict", "Table")

if TYPE_CHECKING:
    from ratiocinator.api import Arm, ArmVerdict, Experiment, ExperimentInfo, Home, Run, Series, Table, open_home


def __getattr__(name: str) -> Any:
    if name in _API:
        from ratiocinator import api

        return getattr(api, name)
    raise AttributeError(f"module 'ratiocinator' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["Arm", "ArmVerdict", "Experiment", "ExperimentInfo", "Home", "Run", "Series", "Table", "__version__",
           "open_home"]
