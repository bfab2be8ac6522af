"""The Python API: the docs' and README's examples run against the quickstart's home, and the typed
records tell every run status, non-finite values and missing steps as the ledger holds them."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ratiocinator
import small_ledger
from ratiocinator.api import Arm, ArmVerdict, Run, Series, open_home
from ratiocinator.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks(text: str) -> str:
    return "\n".join(PYTHON_BLOCK.findall(text))


def _run_example(code: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "RATIOCINATOR_HOME": str(home)})


@pytest.mark.subprocess
def test_docs_python_api_page_runs_against_the_quickstart_home(quickstart_home: Path) -> None:
    code = _blocks((ROOT / "docs" / "python-api.md").read_text())
    assert code.count("\n") > 30 and "home.research(" in code and "home.check(" in code
    done = _run_example(code, quickstart_home)
    assert done.returncode == 0, done.stderr
    assert re.search(r"quickstart-\w+ completed 27/27 runs succeeded", done.stdout)
    assert "best arm DEPTH=" in done.stdout and "vs DEPTH=1,WIDTH=16:" in done.stdout
    assert "\nready\n" in done.stdout and "completed 27 succeeded" in done.stdout


@pytest.mark.subprocess
def test_readme_python_api_section_runs_against_the_quickstart_home(quickstart_home: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    done = _run_example(_blocks(section), quickstart_home)
    assert done.returncode == 0, done.stderr
    assert "DEPTH=1,WIDTH=16" in done.stdout and "('DEPTH=4,WIDTH=64', " in done.stdout


@pytest.mark.subprocess
def test_import_ratiocinator_loads_the_api_only_when_used() -> None:
    probe = ("import sys, ratiocinator\n"
             "assert 'ratiocinator.api' not in sys.modules and 'pydantic' not in sys.modules, sorted(sys.modules)\n"
             "assert ratiocinator.open_home is __import__('ratiocinator.api').api.open_home\n"
             "assert 'open_home' in dir(ratiocinator)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_records_tell_statuses_nonfinite_values_and_missing_steps(tmp_path: Path) -> None:
    small_ledger.build(tmp_path).close()
    with open_home(tmp_path) as home:
        [info] = home.experiments()
        assert (info.id, info.goal_metric, info.runs, info.succeeded, info.failed, info.running) == (
            small_ledger.EXPERIMENT, "score", 6, 3, 1, 1)
        exp = home.experiment("tiny")
        assert exp.id == home.experiment().id == small_ledger.EXPERIMENT

        arms = exp.arms()
        assert [type(a) for a in arms] == [Arm, Arm]
        a, b = arms
        assert (a.name, a.is_baseline, a.n, a.run_ids, a.knobs) == ("a", True, 2, (1, 2), {"LR": "0.1"})
        assert a.mean == pytest.approx(0.325) and a.ci95_low is not None and a.ci95_low < a.mean < a.ci95_high
        assert (b.attempts, b.succeeded, b.failed, b.n, b.mean) == (3, 1, 1, 0, None)

        runs = exp.runs()
        assert all(isinstance(r, Run) for r in runs)
        assert [r.status for r in runs] == ["succeeded", "succeeded", "failed", "interrupted", "succeeded", "running"]
        assert runs[0].metrics == {"loss": None, "score": 0.3} and runs[0].nonfinite_metrics == ("loss",)
        assert (runs[2].failure, runs[2].reason) == ("oom", "out of memory") and runs[5].ended_at is None
        assert [r.id for r in exp.runs(status="failed")] == [3]

        series = exp.series("loss")
        assert len(series) == 1 and isinstance(series[0], Series)
        assert series[0].steps == (None, None, None) and series[0].values == (2.0, 1.0, math.inf)
        assert len(exp.series()) == 8 and len(exp.series(run_ids=[6])) == 1

        [verdict] = exp.verdicts()
        assert isinstance(verdict, ArmVerdict)
        assert (verdict.arm, verdict.baseline, verdict.verdict, verdict.n_arm) == ("b", "a", "too few runs", 0)

        flat = runs.to_dicts()
        assert flat[1]["knobs.LR"] == "0.1" and flat[1]["metrics.acc@1"] == 0.5 and "knobs" not in flat[1]
        points = series.to_dicts()
        assert [(p["run_id"], p["step"], p["value"]) for p in points] == [(1, None, 2.0), (1, None, 1.0),
                                                                          (1, None, math.inf)]
        frame = exp.series("score").to_pandas()
        assert len(frame) == 11 and frame["step"].isna().sum() == 0 and set(frame["status"]) == {
            "succeeded", "failed", "interrupted", "running"}
        assert arms[1:].to_dicts()[0]["name"] == "b"


def test_a_home_without_a_ledger_says_how_to_make_one(tmp_path: Path) -> None:
    home = ratiocinator.open_home(tmp_path / "nothing")
    with pytest.raises(UsageError, match="no ledger at") as caught:
        home.experiments()
    assert caught.value.exit_code == 2 and "research" in (caught.value.hint or "")
    assert not (tmp_path / "nothing").exists()
