"""The report reads a real ledger: planted results must come out as the numbers shown."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest

from ratiocinator.analysis import best_arm, metric_stats
from ratiocinator.ledger import Ledger
from ratiocinator.metrics import MetricPoint
from ratiocinator.planning import PlannedArm
from ratiocinator.report import CURVES_FIGURE, GOAL_FIGURE, summarize, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

SPEC = """\
name: planted
topic: "Does a larger learning rate help a tiny MLP?"
goal_metric: acc
maximize: {maximize}
repo_url: https://example.org/tiny-mlp.git
repo_branch: main
runner_script: train.py
paper_title: "Planted Means: A Report Test"
replicates: 3
max_dollars: 5
train_timeout_s: 120
hardware:
  gpu: "RTX 4090"
  num_gpus: 1
arms:
  - {{name: base, env: {{LR: "0.1"}}}}
  - {{name: fast, env: {{LR: "0.3"}}}}
  - {{name: single, env: {{LR: "1.0"}}}}
"""


class Study:
    """A ledger with one experiment whose arms, runs, metrics and logs the test plants."""

    def __init__(self, tmp_path: Path, *, maximize: bool = True) -> None:
        self.tmp = tmp_path
        self.ledger = Ledger(tmp_path / "ledger.db")
        text = SPEC.format(maximize="true" if maximize else "false")
        self.sha = hashlib.sha256(text.encode()).hexdigest()
        self.id = "exp-1"
        self.ledger.create_experiment(
            id=self.id, name="planted", spec_path="planted.yaml", spec_text=text, spec_sha256=self.sha, backend="local"
        )
        self.ledger.update_experiment(self.id, commit_sha="c0ffee1234")
        arms = [PlannedArm(name=n, env={"LR": lr}) for n, lr in (("base", "0.1"), ("fast", "0.3"), ("single", "1.0"))]
        self.ledger.record_arms(self.id, 0, arms, baseline="base")
        self.arm_ids = {a.name: a.id for a in self.ledger.arms(self.id)}

    def run(
        self,
        arm: str,
        replicate: int,
        *,
        final: dict[str, float] | None = None,
        curve: dict[str, list[float]] | None = None,
        status: str = "succeeded",
        failure: str | None = None,
        reason: str = "",
        exit_code: int | None = 0,
        signal: int | None = None,
        stderr: str | None = None,
        stdout: str | None = None,
    ) -> int:
        run_id = self.ledger.start_run(
            experiment_id=self.id, arm_id=self.arm_ids[arm], replicate=replicate, seed=replicate, host="localhost",
            slot="slot0", commit_sha="c0ffee1234", env={}, argv=["python", "train.py"], run_root=self.tmp / "runs",
        )
        log_dir = Path(self.ledger.run(run_id).log_dir)
        log_dir.mkdir(parents=True)
        for name, text in (("stderr.log", stderr), ("stdout.log", stdout)):
            if text is not None:
                (log_dir / name).write_text(text)
        points = [
            MetricPoint(name=name, value=v, step=10 * i, seq=i)
            for name, values in (curve or {}).items()
            for i, v in enumerate(values)
        ]
        self.ledger.add_points(run_id, points)
        final = final or {}
        self.ledger.finish_run(
            run_id, status=status, failure=failure, reason=reason, exit_code=exit_code, signal=signal,
            final=final, counts={n: len((curve or {}).get(n, [1])) for n in final}, cost=0.01,
        )
        return run_id

    def report(self) -> tuple[object, str, str]:
        paths = write_report(self.ledger, self.id, self.tmp / "report")
        return paths, paths.md.read_text(), paths.html.read_text()


PLANTED = {
    "base": [0.712, 0.745, 0.688],
    "fast": [0.815, 0.861, 0.834],
    "single": [0.503],
}
LOSS = {"base": [1.31, 1.22, 1.40], "fast": [0.91, 0.87, 0.95], "single": [2.2]}


def plant(study: Study) -> dict[str, list[int]]:
    ids: dict[str, list[int]] = {}
    for arm, values in PLANTED.items():
        for r, (acc, loss) in enumerate(zip(values, LOSS[arm])):
            curve = {"acc": list(np.linspace(0.1, acc, 5)), "loss": list(np.linspace(3.0, loss, 5))}
            ids.setdefault(arm, []).append(study.run(arm, r, final={"acc": acc, "loss": loss}, curve=curve))
    return ids


def table_row(md: str, arm: str) -> list[str]:
    """The cells of the results-table row of ``arm`` in the Markdown report."""
    line = next(line for line in md.splitlines() if line.startswith(f"| {arm}"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.4g} ± {np.std(values, ddof=1):.4g}"


def test_planted_means_and_stds_appear_in_the_table(tmp_path: Path) -> None:
    study = Study(tmp_path)
    ids = plant(study)
    paths, md, html = study.report()

    for arm in ("base", "fast"):
        row = table_row(md, arm)
        assert row[2] == "3 / 3"
        assert row[3] == mean_std(PLANTED[arm])
        assert row[4] == mean_std(LOSS[arm])
        assert row[5] == "3 succeeded"
        assert mean_std(PLANTED[arm]) in html
    assert table_row(md, "base")[0] == "base (baseline)"
    assert table_row(md, "fast")[0] == "fast (best)"
    assert f"Best arm: fast with acc = {mean_std(PLANTED['fast'])} (n=3)" in md
    assert "Goal metric: acc (higher is better)" in md

    summary = summarize(study.ledger, study.id)
    stats = summary.arm("fast").metrics["acc"]
    assert stats.run_ids == tuple(ids["fast"])
    assert stats.values == tuple(PLANTED["fast"])
    assert stats.mean == pytest.approx(np.mean(PLANTED["fast"]))
    assert stats.std == pytest.approx(np.std(PLANTED["fast"], ddof=1))
    assert (stats.min, stats.max) == (min(PLANTED["fast"]), max(PLANTED["fast"]))
    assert stats.max_run_id == ids["fast"][1]
    assert paths.figures == (paths.md.parent / GOAL_FIGURE, paths.md.parent / CURVES_FIGURE)


def test_single_replicate_arm_has_no_std(tmp_path: Path) -> None:
    study = Study(tmp_path)
    plant(study)
    _, md, html = study.report()
    row = table_row(md, "single")
    assert row[2] == "1 / 1"
    assert row[3] == f"{PLANTED['single'][0]:.4g}"
    assert row[4] == f"{LOSS['single'][0]:.4g}"
    assert not re.search(r"\bnan\b", md + html, re.IGNORECASE)
    stats = summarize(study.ledger, study.id).arm("single").metrics["acc"]
    assert (stats.n, stats.std) == (1, None)


@pytest.mark.parametrize("maximize", [True, False])
def test_best_arm_follows_the_direction(tmp_path: Path, maximize: bool) -> None:
    study = Study(tmp_path, maximize=maximize)
    plant(study)
    means = {arm: np.mean(v) for arm, v in PLANTED.items()}
    expected = (max if maximize else min)(means, key=means.__getitem__)
    _, md, _ = study.report()
    assert summarize(study.ledger, study.id).best_arm == expected
    assert table_row(md, expected)[0].endswith("best)")
    assert sum("best)" in line for line in md.splitlines() if line.startswith("| ")) == 1
    assert f"({'higher' if maximize else 'lower'} is better)" in md


def test_failed_runs_are_listed_with_their_log_tails(tmp_path: Path) -> None:
    study = Study(tmp_path)
    plant(study)
    stderr = "".join(f"\x1b[31merror line {i}\x1b[0m <script>\n" for i in range(1, 51))
    crashed = study.run("fast", 3, status="failed", failure="exit_nonzero", reason="runner exited with code 3",
                        exit_code=3, stderr=stderr, stdout="stdout is not shown when stderr has text\n")
    timed_out = study.run("base", 3, status="failed", failure="timeout", reason="killed after 120 s",
                          exit_code=None, signal=9, stderr="", stdout="epoch 1\nepoch 2\n")
    lost = study.run("single", 1, status="interrupted", failure="infra", reason="host lost", exit_code=None)
    paths, md, html = study.report()

    section = md.split("## Failed and interrupted runs", 1)[1]
    assert f"Run {crashed}: arm fast, replicate 3, attempt 1" in section
    assert "- **Failure:** exit\\_nonzero" in section
    assert "runner exited with code 3" in section and "- **Exit code:** 3" in section
    for i in range(31, 51):
        assert f"error line {i} <script>" in section
    assert "error line 30 " not in section
    assert "stdout is not shown" not in section
    assert "\x1b" not in md and "\x1b" not in html
    assert "&lt;script&gt;" in html and "<script>" not in html

    assert f"Run {timed_out}: arm base, replicate 3" in section
    assert "- **Signal:** 9" in section and "epoch 2" in section
    assert f"Run {lost}: arm single, replicate 1" in section and "host lost" in section
    assert "No log output: stderr.log and stdout.log" in section

    row = table_row(md, "fast")
    assert row[2] == "3 / 4"
    assert row[3] == mean_std(PLANTED["fast"])  # the failed attempt is counted, not averaged
    assert row[5] == "3 succeeded, 1 failed; failures: 1 exit\\_nonzero"


def test_an_experiment_where_every_run_failed(tmp_path: Path) -> None:
    study = Study(tmp_path)
    for arm in ("base", "fast"):
        study.run(arm, 0, status="failed", failure="exit_nonzero", reason="ImportError", exit_code=1,
                  stderr="ModuleNotFoundError: No module named 'torch'\n")
    stale = tmp_path / "report" / GOAL_FIGURE
    stale.parent.mkdir()
    stale.write_bytes(PNG_SIGNATURE)
    paths, md, html = study.report()

    assert "No run succeeded (2 failed), so there is no result and no best arm." in md
    assert "Best arm" not in md and "best)" not in md
    assert summarize(study.ledger, study.id).best_arm is None
    assert paths.figures == () and not stale.exists()
    assert "<img" not in html
    assert table_row(md, "base")[2:4] == ["0 / 1", "—"]
    assert table_row(md, "single")[2] == "0 / 0"
    assert md.count("No module named 'torch'") == 2


def test_a_nan_final_metric_is_excluded_and_counted(tmp_path: Path) -> None:
    study = Study(tmp_path)
    plant(study)
    diverged = study.run("base", 3, final={"acc": math.nan, "loss": 1.25},
                         curve={"acc": [0.2, 0.4, math.nan], "loss": [2.0, 1.5, 1.25]})
    _, md, _ = study.report()

    stats = summarize(study.ledger, study.id).arm("base").metrics["acc"]
    assert stats.nonfinite_run_ids == (diverged,)
    assert diverged not in stats.run_ids and stats.n == 3
    assert table_row(md, "base")[3] == f"{mean_std(PLANTED['base'])} (n=3, 1 non-finite)"
    assert table_row(md, "base")[4] == mean_std([*LOSS["base"], 1.25])
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)


def test_html_is_self_contained_and_figures_are_pngs(tmp_path: Path) -> None:
    study = Study(tmp_path)
    plant(study)
    study.ledger.event(study.id, "host", "host probed", name="box-7", cpus=16, gpus=["NVIDIA A100"], ram_gb=125.5, cuda="12.4")
    charge = study.ledger.reserve(study.id, amount=1.0, limit=5.0, kind="compute")
    study.ledger.settle(charge, 0.25)
    paths, md, html = study.report()

    assert html.startswith("<!DOCTYPE html>")
    assert "<title>Planted Means: A Report Test</title>" in html and md.startswith("# Planted Means: A Report Test\n")
    assert "http://" not in html and 'src="file' not in html
    assert not re.search(r"<(link|script)\b", html)
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    for figure in paths.figures:
        assert figure.read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({figure.name})" in md

    for text in (md, html):
        assert "box-7" in text and "NVIDIA A100" in text and "125.5" in text
        assert "$0.25 spent of $5.00" in text
        assert study.sha in text and "c0ffee1234" in text
        assert "Does a larger learning rate help a tiny MLP?" in text


def test_curves_fall_back_to_a_metric_with_several_points(tmp_path: Path) -> None:
    study = Study(tmp_path)
    for r, acc in enumerate(PLANTED["base"]):
        study.run("base", r, final={"acc": acc, "loss": 1.0}, curve={"acc": [acc], "loss": [3.0, 2.0, 1.0]})
    paths, md, _ = study.report()
    assert "Learning curves of loss" in md and "(acc has fewer than two points per run.)" in md
    assert (paths.md.parent / CURVES_FIGURE).read_bytes().startswith(PNG_SIGNATURE)


def test_no_metric_points_means_no_curves(tmp_path: Path) -> None:
    study = Study(tmp_path)
    study.run("base", 0, final={"acc": 0.5})
    paths, md, _ = study.report()
    assert paths.figures == (paths.md.parent / GOAL_FIGURE,)
    assert "Learning curves" not in md


def test_metric_stats_edge_cases() -> None:
    finals = {1: {"m": (2.0, True)}, 2: {"m": (2.0, True)}, 3: {"m": (None, False)}, 4: {}}
    equal = metric_stats("m", [1, 2, 3, 4], finals)
    assert (equal.n, equal.mean, equal.std, equal.min, equal.max) == (2, 2.0, 0.0, 2.0, 2.0)
    assert (equal.nonfinite_run_ids, equal.missing_run_ids) == ((3,), (4,))
    empty = metric_stats("m", [3, 4], finals)
    assert (empty.n, empty.mean, empty.std, empty.min, empty.max, empty.min_run_id) == (0, None, None, None, None, None)
    inf = metric_stats("m", [5], {5: {"m": (math.inf, True)}})
    assert (inf.n, inf.nonfinite_run_ids) == (0, (5,))
    assert best_arm([], "m", maximize=True) is None
