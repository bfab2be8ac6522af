"""Start-up: the commands a researcher types most (``validate``, ``status``) and ``research`` up to its
first run load none of the heavy libraries they do not use. Each imports what it needs inside the
command, so one module-level import in the wrong place would cost every command a few tenths of a
second; these tests name the module that brought a heavy library back, and time nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import small_ledger
from conftest import Study

# Libraries none of these commands use before a run has finished: numbers and figures (the live state
# and the report), the LLM SDKs (no LLM is configured), the remote backends' clients, the data download.
HEAVY = ("numpy", "scipy", "matplotlib", "pandas", "optuna", "openai", "anthropic", "ray", "asyncssh", "httpx",
         "mlflow", "pyarrow")

# Runs the CLI in this interpreter and writes the modules it loaded (and the exit code) to argv[1].
IN_PROCESS = """
import json, sys
from ratiocinator.cli import app
try:
    app(sys.argv[2:])
except SystemExit as exc:
    code = exc.code
with open(sys.argv[1], "w") as fh:
    json.dump({"code": code, "modules": sorted(sys.modules)}, fh)
"""


def _loaded(tmp_path: Path, *args: str) -> tuple[int, set[str]]:
    record = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", IN_PROCESS, str(record), *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert record.exists(), done.stderr
    found = json.loads(record.read_text())
    return found["code"], set(found["modules"])


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.subprocess
def test_importing_the_cli_loads_no_command_s_modules() -> None:
    probe = ("import sys, ratiocinator.cli\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml') or m in"
             " ('ratiocinator.pipeline', 'ratiocinator.spec.models', 'ratiocinator.store.ledger')"
             f" or m.split('.')[0] in {HEAVY!r}))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # `--help` and `--version` need typer and rich alone


@pytest.mark.subprocess
def test_validate_loads_no_heavy_library(study: Study, tmp_path: Path) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"})
    code, modules = _loaded(tmp_path, "--home", str(study.home), "validate", str(study.spec()))
    assert code == 0
    assert "ratiocinator.spec.models" in modules  # it did validate the spec
    assert _heavy(modules) == []


@pytest.mark.subprocess
def test_status_loads_no_heavy_library_nor_the_spec_models(tmp_path: Path) -> None:
    """Nor pydantic: the goal comes from the stored spec as plain YAML, and the CLI's parser needs none."""
    small_ledger.build(tmp_path / "home").close()
    for args in (["status"], ["status", small_ledger.EXPERIMENT]):
        code, modules = _loaded(tmp_path, "--home", str(tmp_path / "home"), *args)
        assert code == 0
        assert "ratiocinator.store.ledger" in modules
        assert _heavy(modules) == []
        assert "ratiocinator.spec.models" not in modules and "ratiocinator.pipeline" not in modules
        assert not any(m.split(".")[0] == "pydantic" for m in modules)


@pytest.mark.subprocess
def test_research_reaches_its_first_run_without_numpy_or_the_report_stack() -> None:
    # What `research` imports before its first run; numpy loads with the first live state or metric series.
    probe = ("import sys\n"
             "import ratiocinator.cli, ratiocinator.pipeline, ratiocinator.execution.progress,"
             " ratiocinator.execution.executor, ratiocinator.backends.local\n"
             f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}"
             " or m.startswith(('ratiocinator.report', 'ratiocinator.analysis.stats', 'ratiocinator.check.'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['ratiocinator.check.memory']"  # the review's memory: a few lines, no parsers
