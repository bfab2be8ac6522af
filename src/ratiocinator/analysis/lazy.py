"""scipy.stats, imported on first use.

Importing it takes longer than the rest of the command line together (about 0.3 s on a quiet
machine): ``validate``, ``status`` and a study's start-up must not wait for it when they never
compute an interval or a test.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class _LazyModule:
    """Stands for a module; the first attribute read imports it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


scipy_stats: Any = _LazyModule("scipy.stats")
