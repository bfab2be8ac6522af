"""`ratiocinator verify` and `ratiocinator compare` through the real CLI, on real ledger files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planted import PlantedStudy

pytestmark = pytest.mark.subprocess

CLI = [sys.executable, "-m", "ratiocinator"]
BASE = [0.712, 0.745, 0.688, 0.731]
FAST = [0.815, 0.861, 0.834, 0.842]


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps tables to the terminal width
    return subprocess.run([*CLI, "--home", str(home), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real report, written once; each test edits its own copy."""
    home = tmp_path_factory.mktemp("written")
    study = PlantedStudy(home, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base")
    study.plant({"base": BASE, "fast": FAST})
    done = cli(home, "report", study.id, "--no-pdf")
    assert done.returncode == 0, done.stderr
    assert "numbers traced to their runs" in done.stdout
    study.ledger.close()
    return home


@pytest.fixture
def reported(written: Path, tmp_path: Path) -> PlantedStudy:
    home = tmp_path / "home"
    shutil.copytree(written, home)
    return PlantedStudy.open(home, "exp-1")


def first_fact(text: str, pattern: str) -> re.Match[str]:
    match = re.search(pattern, text)
    assert match, pattern
    return match


def test_verify_passes_on_a_fresh_report(reported: PlantedStudy) -> None:
    done = cli(reported.home, "verify", str(reported.report_dir))
    assert done.returncode == 0, done.stderr
    assert re.search(r"verified: \d+ numbers, \d+ citations in paper.md, paper.html, paper.tex, appendix.md,"
                     r" appendix.html, appendix.tex match the ledger", done.stdout)


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("paper.md", r"\[(0\.[0-9]+)\]\(appendix\.md#f[0-9]+\)"),
        ("paper.html", r'<a class="fact" href="appendix\.html#f[0-9]+" title="[^"]*">(0\.[0-9]+)</a>'),
        ("paper.tex", r"\\fact\{f[0-9]+\}\{(0\.[0-9]+)\}"),
        ("appendix.md", r"\[(0\.[0-9]+)\]\(#f[0-9]+\)"),
        ("appendix.html", r'<a class="fact" href="#f[0-9]+" title="[^"]*">(0\.[0-9]+)</a>'),
    ],
)
def test_editing_one_number_makes_verify_fail(reported: PlantedStudy, name: str, pattern: str) -> None:
    path = reported.report_dir / name
    text = path.read_text()
    match = first_fact(text, pattern)
    forged = match.group(0).replace(match.group(1), "0.9999", 1)
    path.write_text(text[: match.start()] + forged + text[match.end():])

    done = cli(reported.home, "verify", str(reported.report_dir))
    assert done.returncode == 1
    assert f"mismatch: {name}:" in done.stderr and "shows 0.9999, the ledger gives" in done.stderr
    assert "Traceback" not in done.stderr


def test_untagging_a_number_makes_verify_fail(reported: PlantedStudy) -> None:
    path = reported.report_dir / "paper.md"
    text = path.read_text()
    match = first_fact(text, r"\[(0\.[0-9]+)\]\(appendix\.md#f[0-9]+\)")
    path.write_text(text[: match.start()] + "0.5" + text[match.end():])  # the link is gone, the number changed
    done = cli(reported.home, "verify", str(reported.report_dir))
    assert done.returncode == 1 and "a traced number was removed, untagged or added by hand" in done.stderr


def test_a_report_older_than_the_ledger_is_stale(reported: PlantedStudy) -> None:
    reported.run("fast", final={"acc": 0.99})
    done = cli(reported.home, "verify", str(reported.report_dir))
    assert done.returncode == 1
    assert "the ledger gives" in done.stderr and "rewrite it with `ratiocinator report exp-1`" in done.stderr


def test_verify_refuses_a_directory_that_is_not_a_report(tmp_path: Path) -> None:
    done = cli(tmp_path, "verify", str(tmp_path))
    assert done.returncode == 2
    assert "facts.json is missing" in done.stderr and "Traceback" not in done.stderr


def test_verify_finds_the_ledger_the_report_was_written_from(reported: PlantedStudy, tmp_path: Path) -> None:
    done = cli(tmp_path / "elsewhere", "verify", str(reported.report_dir))
    assert done.returncode == 0, done.stderr


def two_experiments(home: Path) -> tuple[PlantedStudy, PlantedStudy]:
    arms = PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}, slow={"LR": "0.01"})
    a = PlantedStudy(home, arms, baseline_arm="base", exp_id="exp-a", name="first")
    a.plant({"base": BASE, "fast": FAST, "slow": [0.5, 0.52, 0.51]})
    b = PlantedStudy(home, arms[:2], baseline_arm="base", exp_id="exp-b", name="second")
    b.plant({"base": [v + 0.2 for v in BASE], "fast": FAST})
    return a, b


def test_compare_puts_two_experiments_side_by_side(tmp_path: Path) -> None:
    two_experiments(tmp_path)
    done = cli(tmp_path, "compare", "exp-a", "exp-b", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    arms = {a["arm"]: a for a in result["arms"]}
    assert result["metric"] == "acc" and set(arms) == {"base", "fast", "slow"}
    assert arms["base"]["diff"] == pytest.approx(0.2)
    assert arms["base"]["verdict"] == "B better"
    assert arms["fast"]["diff"] == pytest.approx(0.0, abs=1e-12) and arms["fast"]["verdict"] == "within noise floor"
    assert arms["slow"]["b"] is None and arms["slow"]["verdict"] == "only in A"
    assert arms["base"]["a"]["mean"] == pytest.approx(np.mean(BASE))

    table = cli(tmp_path, "compare", "first", "second")
    assert table.returncode == 0 and "B better" in table.stdout and "only in A" in table.stdout


def test_compare_refuses_different_goal_metrics(tmp_path: Path) -> None:
    arms = PlantedStudy.arms(base={"LR": "0.1"})
    PlantedStudy(tmp_path, arms, baseline_arm="base", exp_id="exp-a").plant({"base": BASE})
    PlantedStudy(tmp_path, arms, baseline_arm="base", exp_id="exp-b", goal_metric="loss").plant({"base": BASE}, "loss")
    done = cli(tmp_path, "compare", "exp-a", "exp-b")
    assert done.returncode == 2 and "different goal metrics (acc and loss)" in done.stderr and "--metric" in done.stderr
    missing = cli(tmp_path, "compare", "exp-a", "exp-b", "--metric", "acc")
    assert missing.returncode == 2 and "has no succeeded run reporting acc" in missing.stderr


def test_compare_pairs_arms_by_knobs_when_their_names_differ(tmp_path: Path) -> None:
    a = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}, fast={"LR": "0.3"}), baseline_arm="base",
                     exp_id="exp-a")
    a.plant({"base": BASE, "fast": FAST})
    b = PlantedStudy(tmp_path, PlantedStudy.arms(lr_small={"LR": "0.1"}, lr_big={"LR": "0.3"}), baseline_arm="lr_small",
                     exp_id="exp-b")
    b.plant({"lr_small": [v + 0.2 for v in BASE], "lr_big": FAST})
    done = cli(tmp_path, "compare", "exp-a", "exp-b", "--json")
    assert done.returncode == 0, done.stderr
    arms = {a["a_arm"]: a for a in json.loads(done.stdout)["arms"]}
    assert set(arms) == {"base", "fast"}
    assert arms["base"]["b_arm"] == "lr_small" and arms["base"]["matched_by"] == "knobs"
    assert arms["base"]["arm"] == "base = lr_small" and arms["base"]["diff"] == pytest.approx(0.2)
    assert arms["fast"]["b_arm"] == "lr_big" and "warning" not in done.stderr


def test_compare_warns_when_nothing_matches_and_refuses_one_experiment_with_itself(tmp_path: Path) -> None:
    a = PlantedStudy(tmp_path, PlantedStudy.arms(base={"LR": "0.1"}), baseline_arm="base", exp_id="exp-a")
    a.plant({"base": BASE})
    b = PlantedStudy(tmp_path, PlantedStudy.arms(other={"LR": "0.5"}), baseline_arm="other", exp_id="exp-b")
    b.plant({"other": FAST})
    done = cli(tmp_path, "compare", "exp-a", "exp-b")
    assert done.returncode == 0, done.stderr
    assert "warning: no arm of exp-a matches an arm of exp-b by knobs or by name" in done.stderr
    assert "only in A" in done.stdout and "only in B" in done.stdout
    same = cli(tmp_path, "compare", "exp-a", "exp-a")
    assert same.returncode == 2 and "the same experiment (exp-a): there is nothing to compare" in same.stderr
    assert "Traceback" not in same.stderr
