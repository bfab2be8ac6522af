"""The PDF is rebuilt only when its inputs change: the .tex, a figure beside it, or the engine."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ratiocinator.report.document import Heading, Paragraph, render_latex
from ratiocinator.report.facts import FactBook
from ratiocinator.report.publish import PDF_CACHE, build_pdf

needs_pdflatex = pytest.mark.skipif(
    shutil.which("pdflatex") is None and os.environ.get("RATIOCINATOR_REQUIRE_LATEX") != "1",
    reason="no pdflatex (CI installs it and sets RATIOCINATOR_REQUIRE_LATEX=1)",
)


def write_tex(directory: Path, text: str) -> Path:
    tex = directory / "paper.tex"
    tex.write_text(render_latex("Cached", [Heading("Result", 1), Paragraph(text)], FactBook()))
    return tex


@pytest.mark.latex
@needs_pdflatex
def test_an_unchanged_paper_reuses_its_pdf_and_a_changed_one_is_rebuilt(tmp_path: Path) -> None:
    tex = write_tex(tmp_path, "The first version.")
    pdf, note = build_pdf(tex)
    assert pdf is not None and "reused" not in note, note
    first = pdf.read_bytes()

    pdf.unlink()  # a report rewrite removes the old PDF before building again
    (tmp_path / "paper.log").unlink()
    again, note = build_pdf(tex)
    assert again == pdf and "reused" in note
    assert again.read_bytes() == first and (tmp_path / "paper.log").is_file()

    (tmp_path / "fig_goal.png").write_bytes(b"a figure beside the paper is one of its inputs")
    _, note = build_pdf(tex)
    assert "reused" not in note

    write_tex(tmp_path, "The second version.")
    rebuilt, note = build_pdf(tex)
    assert rebuilt is not None and "reused" not in note
    assert len(list((tmp_path / PDF_CACHE).glob("paper-*.pdf"))) == 1  # only the latest build is kept


@pytest.mark.latex
@needs_pdflatex
def test_a_failed_build_is_never_cached(tmp_path: Path) -> None:
    tex = tmp_path / "paper.tex"
    tex.write_text("\\documentclass{article}\\begin{document}\\undefinedcommand\\end{document}\n")
    for _ in range(2):
        pdf, note = build_pdf(tex)
        assert pdf is None and "failed" in note
    assert not (tmp_path / PDF_CACHE).exists()
