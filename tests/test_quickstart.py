"""The README's quickstart, end to end: a real study of this repository, its paper, and verify."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "quickstart.yaml"
CLI = [sys.executable, "-m", "ratiocinator"]


def test_quickstart_paper_has_intervals_comparisons_factors_and_verifies(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run([*CLI, "--home", str(home), "research", str(QUICKSTART)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = next((home / "reports").iterdir())
    md = (report / "paper.md").read_text()

    appendix = (report / "appendix.md").read_text()
    assert "95% CI (t)" in md and "Comparison with the baseline DEPTH=1,WIDTH=16" in appendix
    assert "Main effects" in md and "| DEPTH | 4 |" in md and "| WIDTH | 64 |" in md and "Analysis of variance" in md
    assert "## Conclusion" in md and "## Threats to validity" in md and "## Reproducibility" in md
    # The paper answers the spec's three hypotheses, each with a verdict (in the abstract and in the results).
    abstract = md.split("## Hypotheses", 1)[0]
    verdicts = re.findall(r"^- (H[123]): (supported|contradicted|inconclusive)\.", md, re.MULTILINE)
    assert [h for h, _ in verdicts] == ["H1", "H2", "H3"]
    for hid, verdict in verdicts:
        assert re.search(rf"{hid} \([^)]*(\([^)]*\)[^)]*)*\) is {verdict}", abstract), hid
    assert dict(verdicts)["H1"] == "supported"  # every MLP clears the ridge baseline by a wide margin
    assert md.count("How should a fixed, small neural network spend its capacity") == 1  # the topic, once
    assert str(QUICKSTART.parents[2]) not in md + appendix  # no absolute local path
    # The runs' environment, read with their own interpreter: the results depend on it.
    assert re.search(r"CPython 3\.[0-9]+\.[0-9]+ on ", md) and re.search(r"requirements: numpy [0-9]", md)
    for name in ("fig_goal", "fig_curves", "fig_main_effects"):
        assert (report / f"{name}.png").exists() and (report / f"{name}.pdf").exists()
    assert not (report / "fig_cost.png").exists()  # a $0 study has no cost section and no cost figure
    aggregated = json.loads((report / "aggregated_metrics.json").read_text())
    assert aggregated["primary_metric"] == "val_r2" and aggregated["best_baseline"]["arm"] == "DEPTH=1,WIDTH=16"
    assert len((report / "results.tsv").read_text().splitlines()) == 1 + 27

    shown = subprocess.run([*CLI, "--home", str(home), "runs", "quickstart"], capture_output=True, text=True,
                           timeout=300)
    rows = [line for line in shown.stdout.splitlines() if "succeeded" in line]
    assert len(rows) == 27 and all("val_r2=" in row for row in rows), shown.stdout  # the goal, whatever its name

    verified = subprocess.run([*CLI, "--home", str(home), "verify", str(report)], capture_output=True, text=True,
                              timeout=300)
    assert verified.returncode == 0, verified.stderr

    match = re.search(r"\[(0\.[0-9]+)\]\(appendix\.md#f[0-9]+\)", md)
    assert match
    (report / "paper.md").write_text(md[: match.start(1)] + "0.1234" + md[match.end(1):])
    forged = subprocess.run([*CLI, "--home", str(home), "verify", str(report)], capture_output=True, text=True,
                            timeout=300)
    assert forged.returncode == 1 and "shows 0.1234" in forged.stderr
