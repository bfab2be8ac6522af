"""Execution-aware evaluation of generated code, in a sandbox: ``evaluate(samples)`` runs each
sample's program against its tests in isolation and labels the outcome.

The modules, each with one job: `samples` (what a sample, its limits and its result are, and
loading them), `instrument` (compiling, the tests' assertions counted), `processes` (a sample's
processes through /proc), `identities` (who each sample runs as), `sandbox` (the zygotes and a
running sandbox's streams), `judge` (a label with evidence from what a run left), `engine` (running
samples, one and many; its docstring is the overview); `sandbox_child` is the zygote and in-sandbox
harness.

The public surface (`evaluate`, `Sample`, `Limits`, `SampleResult`, `load_samples`, `summarize`,
`results_json`, `format_results`, `isolation`) loads on first use, so a sandbox's zygote, which
imports only `ratiocinator.execeval.sandbox_child`, carries none of the orchestrator's side into a
sample.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name and the module that defines it.
PUBLIC = {
    "Limits": "samples",
    "Sample": "samples",
    "SampleResult": "samples",
    "load_samples": "samples",
    "evaluate": "engine",
    "format_results": "engine",
    "isolation": "engine",
    "results_json": "engine",
    "summarize": "engine",
}


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(f"ratiocinator.execeval.{PUBLIC[name]}"), name)
    raise AttributeError(f"module 'ratiocinator.execeval' has no attribute {name!r}")


__all__ = list(PUBLIC)
