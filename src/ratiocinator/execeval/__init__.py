"""Execution-aware evaluation of generated code, in a sandbox: ``evaluate(samples)`` runs each
sample's program against its tests in isolation and labels the outcome.

The public surface (`evaluate`, `Sample`, `Limits`, `SampleResult`, `load_samples`, `summarize`,
`results_json`, `format_results`, `isolation`) loads on first use, so a sandbox's zygote, which
imports only `ratiocinator.execeval.sandbox_child`, carries none of the orchestrator's side into a
sample.
"""

from __future__ import annotations

import importlib
from typing import Any

PUBLIC = ("Limits", "Sample", "SampleResult", "evaluate", "format_results", "isolation", "load_samples",
          "results_json", "summarize")


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module("ratiocinator.execeval.engine"), name)
    raise AttributeError(f"module 'ratiocinator.execeval' has no attribute {name!r}")


__all__ = list(PUBLIC)
