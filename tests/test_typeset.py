"""The PDF typesets: Type 1 fonts, searchable words, tables inside the margins, numbers apart, minus signs whole."""

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
    assert (study.report_dir / "fig_interaction.pdf").exists() and "fig_interaction.pdf" in files.tex.read_text()


# Reads, in the browser, where each hover area of a figure sits relative to its image.
_HOVER_PROBE = """<script>
window.addEventListener("load", () => {
  const out = [];
  for (const map of document.querySelectorAll(".hovermap")) {
    const img = map.querySelector("img").getBoundingClientRect();
    for (const span of map.querySelectorAll(".hover")) {
      const r = span.getBoundingClientRect();
      out.push({left: (r.left - img.left) / img.width, top: (r.top - img.top) / img.height,
                right: (r.right - img.left) / img.width, bottom: (r.bottom - img.top) / img.height,
                imageWidth: img.width, title: span.title});
    }
  }
  document.body.setAttribute("data-probe", JSON.stringify(out));
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no headless chromium")
def test_heatmap_cells_show_their_interval_on_hover_in_a_narrow_window(tmp_path: Path) -> None:
    study = twenty_arm_study(tmp_path)
    files = write_report(study.ledger, study.id, study.report_dir, pdf=False)
    page = tmp_path / "probe.html"
    page.write_text(files.html.read_text().replace("</body>", _HOVER_PROBE + "</body>"))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=600,900",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r'data-probe="([^"]*)"', dom)
    assert match, dom[-2000:]
    areas = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert len(areas) == 20 and all(a["imageWidth"] < 600 for a in areas)  # the image is scaled down
    assert all(-0.001 <= a["left"] < a["right"] <= 1.001 and -0.001 <= a["top"] < a["bottom"] <= 1.001
               for a in areas)
    cells = {a["title"].split(":")[0].removesuffix(" (baseline)"): a for a in areas}
    assert cells["DEPTH=1,WIDTH=8"]["right"] == pytest.approx(cells["DEPTH=1,WIDTH=16"]["left"], abs=0.002)
    assert cells["DEPTH=1,WIDTH=8"]["bottom"] == pytest.approx(cells["DEPTH=2,WIDTH=8"]["top"], abs=0.002)
    assert "95% CI [" in cells["DEPTH=4,WIDTH=128"]["title"]


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


def autoresearch_session(home: Path) -> Path:
    """A finished noise-aware session in a real ledger: a baseline, kept, discarded, crashed and rejected edits."""
    from ratiocinator.autoresearch.decide import noise_aware, noise_floor
    from ratiocinator.autoresearch.results import write_outputs
    from ratiocinator.autoresearch.session_report import session_program
    from ratiocinator.autoresearch.store import Store
    from ratiocinator.store.ledger import Ledger

    program_text = ("repo: repo\ntag: night\neditable: [train.py]\nrun: python train.py\nreplicates: 3\n"
                    "metric: {name: val_bpb, direction: lower}\nbudget_s: 300\n"
                    "agent: {kind: command, command: 'true'}\n")
    store = Store(Ledger(home / "ledger.db"))
    session = store.create_session(tag="night", repo="/src/nanochat", branch="autoresearch/night", base_branch="main",
                                   base_commit="c0ffee1234567890", program_path="night.yaml", program_text=program_text,
                                   program_sha256="0" * 64, protected={})
    rng = np.random.default_rng(3)
    base_values = [0.9981, 1.0003, 0.9969]
    floor = noise_floor(base_values)
    base = store.add_attempt(session.id, worker=0, parent="c0ffee1234567890", baseline=True)
    store.finish_attempt(base.id, status="baseline", reason="the unmodified code", best_of=session.id,
                         values=base_values, metric=float(np.mean(base_values)), commit_sha="c0ffee1234567890")
    best = base_values
    for i in range(12):
        attempt = store.add_attempt(session.id, worker=i % 2, parent="c0ffee1234567890",
                                    hypothesis=f"try change {i}: raise the learning rate warmup to {100 * i} steps")
        if i % 5 == 4:
            store.finish_attempt(attempt.id, status="crash", reason="exit 1: CUDA error: out of memory")
            continue
        if i == 7:
            store.finish_attempt(attempt.id, status="violation", reason="changed protected prepare.py")
            continue
        values = list(np.mean(best) - 0.004 * (i % 3 - 0.5) + 0.002 * rng.standard_normal(3))
        decision = noise_aware(values, best, k=3, floor=floor, confidence=0.95, lower_is_better=True, name="val_bpb")
        if decision.action == "rerun":
            decision = noise_aware(values[:1], best, k=1, floor=floor, confidence=0.95, lower_is_better=True)
        keep = decision.keep
        store.finish_attempt(attempt.id, status="keep" if keep else "discard", reason=decision.reason,
                             best_of=session.id if keep else None, values=values, metric=float(np.mean(values)),
                             commit_sha=f"{i:07d}abcdef")
        if keep:
            best = values
    session = store.session(session.id)
    store.update_session(session.id, status="done", reason="max_iterations reached")
    session = store.session(session.id)
    directory = home / "autoresearch" / "night"
    directory.mkdir(parents=True)
    write_outputs(directory, session, store.attempts(session.id), session_program(session), floor=floor, spent=0.0,
                  ledger=home / "ledger.db")
    store.close()
    return directory


def test_an_autoresearch_report_is_traced_and_verified(tmp_path: Path) -> None:
    from ratiocinator.report.verify import verify_report
    from ratiocinator.store.ledger import Ledger

    directory = autoresearch_session(tmp_path)
    md = (directory / "report.md").read_text()
    facts = json.loads((directory / "facts.json").read_text())
    keys = {f["key"] for f in facts["facts"]}
    assert {"baseline.metric", "noise.floor", "attempts.n", "attempts.keep", "attempts.crash", "attempts.violation",
            "keep_rate", "spent"} <= keys
    assert sum(k.startswith("attempt[") and k.endswith("].val_bpb") for k in keys) == 1 + 9  # every measured one
    assert md.count("| crash |") == 2 and "| violation |" in md and "changed protected prepare.py" in md
    ledger = Ledger(tmp_path / "ledger.db")
    result = verify_report(ledger, directory)
    assert result.ok, result.mismatches
    assert result.documents == ["report.md", "report.html", "report.tex"]
    floor = next(f for f in facts["facts"] if f["key"] == "noise.floor")
    html = (directory / "report.html").read_text()
    (directory / "report.html").write_text(html.replace(f'">{floor["text"]}</a>', '">0.000001</a>', 1))
    forged = verify_report(ledger, directory)
    assert any("shows 0.000001" in m for m in forged.mismatches)


@pytest.mark.latex
@needs_tools
def test_an_autoresearch_report_typesets(tmp_path: Path) -> None:
    directory = autoresearch_session(tmp_path)
    pdf, note = build_pdf(directory / "report.tex")
    assert pdf is not None, note
    words = assert_typeset(directory, "report", ("floor", "confidence", "unmodified"))
    assert "try change 11" in words.replace("\n", " ")
    assert "Cost: none." in words  # it spent nothing: a note, no table of zeros


@pytest.mark.latex
@needs_tools
def test_an_autoresearch_report_with_a_cost_table_typesets(tmp_path: Path) -> None:
    from test_autoresearch_costs import costed_session

    directory, _ = costed_session(tmp_path)
    pdf, note = build_pdf(directory / "report.tex")
    assert pdf is not None, note
    words = assert_typeset(directory, "report", ("diffs", "stretch"))
    assert "after keep #4" in words and "Empty" in words  # the cost table, header and rows


def test_number_columns_align_on_the_decimal_point_and_text_columns_wrap() -> None:
    book = FactBook()
    seeds = ", ".join(map(str, range(30)))  # numbers, but a list: it wraps like text
    rows = tuple((name, book.cite(f"{name}.v", value, Kind.METRIC, "a value", [1]), "a long note " * 3, seeds)
                 for name, value in (("a", 0.5), ("b", 12.25), ("c", -3.125)))
    tex = render_latex("t", [Table(("Arm", "Value", "Note", "Seeds"), rows)], book)
    lines = {line.split(" & ")[0]: line for line in tex.splitlines() if " & " in line and "textbf" not in line}
    # 0.5 lacks two digits of the column's longest tail (.125), 12.25 one; -3.125 none.
    assert r"\fact{f1}{0.5}\hspace{1.00em}" in lines["a"]
    assert r"\fact{f2}{12.25}\hspace{0.50em}" in lines["b"]
    assert r"\fact{f3}{$-$3.125} &" in lines["c"]
    spec = re.search(r"\\begin\{longtable\}\{(.*)\}\n", tex)
    assert spec and spec.group(1).count("p{") == 3 and re.search(r"\}r>", spec.group(1))  # Value: r, the rest wrap


@pytest.mark.subprocess
@pytest.mark.latex
@needs_tools
def test_the_quickstart_main_pdf_has_at_most_six_pages(quickstart_home: Path) -> None:
    (report,) = (quickstart_home / "reports").iterdir()
    info = subprocess.run(["pdfinfo", str(report / "paper.pdf")], capture_output=True, text=True, check=True).stdout
    pages = re.search(r"^Pages:\s+([0-9]+)$", info, re.MULTILINE)
    assert pages is not None, info
    assert int(pages[1]) <= 6, f"the quickstart's main PDF has {pages[1]} pages (the full tables go to the appendix)"
