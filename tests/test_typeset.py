"""The PDF typesets: Type 1 fonts, searchable words, tables inside the margins, numbers apart, minus signs whole."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from planted import PlantedStudy
from ratiocinator.report.document import Heading, Paragraph, Table, fact_occurrences, render_latex, tex_escape
from ratiocinator.report.facts import FactBook, Kind
from ratiocinator.report.publish import build_pdf, write_report
from typeset import assert_typeset, overfull

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "quickstart.yaml"

needs_tools = pytest.mark.skipif(
    (shutil.which("pdflatex") is None or shutil.which("pdffonts") is None)
    and os.environ.get("RATIOCINATOR_REQUIRE_LATEX") != "1",
    reason="no pdflatex or poppler-utils (CI installs them and sets RATIOCINATOR_REQUIRE_LATEX=1)",
)


def test_minus_signs_are_math_minus_and_read_back_as_hyphens() -> None:
    assert tex_escape("-0.5 and 1e-05, k-th run 3-5") == r"$-$0.5 and 1e$-$05,\allowbreak{} k-th run 3-5"
    book = FactBook()
    text = f"Δ = {book.cite('d', -0.004366, Kind.METRIC, 'a difference', [1])}"
    tex = render_latex("t", [Paragraph(text)], book)
    assert r"\fact{f1}{$-$0.004366}" in tex
    assert fact_occurrences("tex", tex) == [("f1", "-0.004366")]


def test_long_identifiers_get_places_to_break() -> None:
    escaped = tex_escape("c0ffee1234c0ffee1234c0ffee1234 examples/quickstart/run_arm.sh")
    assert escaped.count(r"\allowbreak{}") >= 4
    assert r"run\_\allowbreak{}arm.sh" in escaped


@pytest.mark.latex
@needs_tools
def test_a_table_too_wide_for_the_page_is_split_and_every_column_kept(tmp_path: Path) -> None:
    book = FactBook()
    header = ("Arm", *(f"metric_{i} (units)" for i in range(24)))
    def value(a: int, i: int) -> str:
        return book.cite(f"a{a}.m{i}", (-1) ** i * 1234.5678 / (a + 1) / (i + 1), Kind.METRIC, "x", [a])

    rows = tuple((f"ARM={a},WIDTH={a * 16}", *(value(a, i) for i in range(24))) for a in range(12))
    tex = render_latex("Wide", [Heading("A wide table", 1), Table(header, rows)], book)
    assert tex.count(r"\begin{longtable}") > 1  # split, with the arm column repeated
    assert tex.count("ARM=\\allowbreak{}0,") == tex.count(r"\begin{longtable}")
    (tmp_path / "paper.tex").write_text(tex)
    pdf, note = build_pdf(tmp_path / "paper.tex")
    assert pdf is not None, note
    assert overfull(tmp_path / "paper.log") == []
    shown = [text for _, text in fact_occurrences("tex", tex)]
    assert len(shown) == 12 * 24


TWENTY = {"DEPTH": ["1", "2", "3", "4"], "WIDTH": ["8", "16", "32", "64", "128"]}


def twenty_arm_study(home: Path) -> PlantedStudy:
    """A 4 × 5 grid with a planted interaction, streamed train and validation losses, and long arm names."""
    arms = PlantedStudy.grid(**TWENTY)
    study = PlantedStudy(home, arms, baseline_arm=arms[0].name, arms=None, factors=TWENTY, goal_metric="val_loss",
                         maximize=False, topic="Does depth help only when the network is wide enough?")
    rng = np.random.default_rng(7)
    for arm in arms:
        depth, width = int(arm.env["DEPTH"]), int(arm.env["WIDTH"])
        level = 1.0 - 0.04 * depth * np.log2(width) / 7 + (0.05 if depth == 4 and width == 128 else 0.0)
        for _ in range(3):
            final = level + 0.01 * rng.standard_normal()
            steps = np.arange(1, 21)
            val = final + 0.8 * np.exp(-steps / 4)
            train = final - 0.1 * depth * width / 512 + 0.8 * np.exp(-steps / 4)
            study.run(arm.name, final={"val_loss": float(final), "train_loss": float(train[-1]),
                                       "params": float(depth * width * width)},
                      curve={"val_loss": list(map(float, val)), "train_loss": list(map(float, train))})
    return study


@pytest.mark.latex
@needs_tools
def test_a_twenty_arm_study_typesets(tmp_path: Path) -> None:
    study = twenty_arm_study(tmp_path)
    files = write_report(study.ledger, study.id, study.report_dir, pdf=True)
    assert files.pdf is not None, files.pdf_note
    words = assert_typeset(study.report_dir)
    assert "DEPTH=4,WIDTH=128" in words.replace("\n", "")


@pytest.mark.subprocess
@pytest.mark.latex
@needs_tools
def test_the_quickstart_paper_typesets(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "ratiocinator", "--home", str(home), "research", str(QUICKSTART)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = next((home / "reports").iterdir())
    assert_typeset(report)


@pytest.mark.subprocess
@pytest.mark.latex
@needs_tools
def test_the_quickstart_main_pdf_has_at_most_six_pages(quickstart_home: Path) -> None:
    (report,) = (quickstart_home / "reports").iterdir()
    info = subprocess.run(["pdfinfo", str(report / "paper.pdf")], capture_output=True, text=True, check=True).stdout
    pages = re.search(r"^Pages:\s+([0-9]+)$", info, re.MULTILINE)
    assert pages is not None, info
    assert int(pages[1]) <= 6, f"the quickstart's main PDF has {pages[1]} pages (the full tables go to the appendix)"
