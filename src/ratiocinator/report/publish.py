"""Writes an experiment's report directory: the paper in three formats, its figures,
``facts.json``, the exports, and the PDF when a LaTeX engine is installed.

Everything is rebuilt from the ledger each time; files an earlier report wrote and
this one does not (a figure whose data is gone, a PDF that no longer builds) are
removed so nothing stale sits beside the new paper.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ratiocinator.analysis.inference import Inference
from ratiocinator.report.document import fact_counts, render_html, render_latex, render_markdown
from ratiocinator.report.exports import (
    LedgerRows,
    json_records,
    write_atomic,
    write_results_tsv,
    write_runs_csv,
    write_runs_json,
)
from ratiocinator.report.paper import Paper, build_paper
from ratiocinator.store.ledger import Ledger

# The paper, and its appendix (detail tables and every number with its runs) that the paper's numbers link to.
DOCUMENTS = {"paper.md": "md", "paper.html": "html", "paper.tex": "tex",
             "appendix.md": "md", "appendix.html": "html", "appendix.tex": "tex"}
FACTS_FILE = "facts.json"
LATEX_ENGINE = "pdflatex"
LATEX_TIMEOUT_S = 180
PDF_CACHE = ".pdf-cache"  # the last PDF built from each .tex, by a hash of its inputs
# Files of earlier report layouts and of figures that may not be drawn this time.
_OWNED_GLOBS = ("fig_*.png", "fig_*.pdf", "paper.pdf", "paper.log", "appendix.pdf", "appendix.log", "report.md",
                "report.html")


@dataclass(frozen=True)
class ReportFiles:
    dir: Path
    md: Path
    html: Path
    tex: Path
    pdf: Path | None
    pdf_note: str
    facts: Path
    n_facts: int


def write_report(ledger: Ledger, experiment_id: str, out_dir: Path, *, pdf: bool = True) -> ReportFiles:
    paper = build_paper(ledger, experiment_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for pattern in _OWNED_GLOBS:
        for stale in out_dir.glob(pattern):
            stale.unlink()
    for figure in paper.figures:
        write_atomic(out_dir / f"{figure.stem}.png", figure.png)
        write_atomic(out_dir / f"{figure.stem}.pdf", figure.pdf)

    appendix_title = f"Appendix to: {paper.title}"
    rendered = {
        "paper.md": render_markdown(paper.title, paper.blocks, paper.book, facts_in="appendix.md"),
        "paper.html": render_html(paper.title, paper.blocks, paper.book, facts_in="appendix.html"),
        "paper.tex": render_latex(paper.title, paper.blocks, paper.book, facts_in="appendix.pdf"),
        "appendix.md": render_markdown(appendix_title, paper.appendix, paper.book),
        "appendix.html": render_html(appendix_title, paper.appendix, paper.book),
        "appendix.tex": render_latex(appendix_title, paper.appendix, paper.book),
    }
    for name, text in rendered.items():
        write_atomic(out_dir / name, text)
    head, facts = _facts_document(ledger, paper, rendered)
    write_atomic(out_dir / FACTS_FILE, json_records(head, "facts", facts))

    rows = LedgerRows(list(paper.runs), {a.summary.arm.id: a.summary.arm for a in paper.inference.goals},
                      dict(paper.finals))
    write_runs_json(ledger, experiment_id, out_dir / "runs.json", rows)
    write_runs_csv(ledger, experiment_id, out_dir / "runs.csv", rows)
    write_results_tsv(ledger, experiment_id, out_dir / "results.tsv", goal_metric=paper.spec.goal_metric,
                      arm_status=paper.inference.arm_keeps(), rows=rows)
    write_atomic(out_dir / "aggregated_metrics.json",
                 json.dumps(aggregated_metrics(paper.inference), indent=2, allow_nan=False) + "\n")

    pdf_path, note = build_pdf(out_dir / "paper.tex") if pdf else (None, "PDF build not requested")
    if pdf_path is not None:
        appendix_pdf, appendix_note = build_pdf(out_dir / "appendix.tex")
        if appendix_pdf is None:
            note += f"; the appendix: {appendix_note}"
    return ReportFiles(out_dir, out_dir / "paper.md", out_dir / "paper.html", out_dir / "paper.tex", pdf_path, note,
                       out_dir / FACTS_FILE, len(paper.book))


def _facts_document(ledger: Ledger, paper: Paper,
                    rendered: dict[str, str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every fact, and how often each appears in each document, for ``verify``."""
    occurrences = fact_counts(rendered, DOCUMENTS)
    head = {
        "experiment_id": paper.experiment.id,
        "ledger": str(ledger.path.resolve()),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "documents": occurrences,
    }
    return head, [f.to_json() for f in paper.book]


def aggregated_metrics(inference: Inference) -> dict[str, Any]:
    """The comparison summary other tools read: best proposed arm against the baseline.

    ``gap_percent`` is signed so that positive always means better in the goal's
    direction (for a minimized metric a lower proposed value gives a positive gap).
    """
    summary = inference.summary
    goal = summary.goal_metric
    metrics: dict[str, dict[str, float | None]] = {}
    for arm in summary.arms:
        for name, stats in arm.metrics.items():
            for run_id, value in zip(stats.run_ids, stats.values, strict=True):
                metrics.setdefault(name, {})[str(run_id)] = value
    arms = {
        g.name: {
            "n": g.describe.n, "mean": g.describe.mean, "std": g.describe.std,
            "ci95": [g.describe.ci.low, g.describe.ci.high] if g.describe.ci else None,
            "run_ids": list(g.stats.run_ids), "is_baseline": g.name == inference.baseline,
        }
        for g in inference.goals
    }
    base = inference.goal(inference.baseline) if inference.baseline else None
    proposed = [(g.describe.mean, g) for g in inference.goals
                if g.name != inference.baseline and g.describe.mean is not None]
    best_mean, best = ((max if summary.maximize else min)(proposed, key=lambda pair: pair[0]) if proposed
                       else (None, None))
    base_mean = base.describe.mean if base is not None else None
    gap = None
    if best_mean is not None and base_mean is not None and base_mean != 0:
        raw = (best_mean - base_mean) / abs(base_mean) * 100.0
        gap = raw if summary.maximize else -raw
    comparison = inference.comparison(best.name) if best is not None else None
    return {
        "experiment_id": summary.experiment_id,
        "primary_metric": goal,
        "maximize": summary.maximize,
        "metrics": metrics,
        "arms": arms,
        "best_proposed": (None if best is None
                          else {"arm": best.name, "value": best.describe.mean, "run_ids": list(best.stats.run_ids)}),
        "best_baseline": (None if base is None
                          else {"arm": base.name, "value": base.describe.mean, "run_ids": list(base.stats.run_ids)}),
        "gap_percent": gap,
        "gap_note": "(best proposed − baseline) / |baseline| × 100, sign flipped for a minimized metric: positive is"
                    " better",
        "verdict": None if comparison is None else comparison.verdict.value,
        "p_holm": None if comparison is None else comparison.p_holm,
    }


def _pdf_inputs_key(tex: Path, engine: str) -> str:
    """What the PDF is made of: the engine, the .tex and every figure beside it (figures are byte-stable)."""
    digest = hashlib.sha256(f"{engine}\0{tex.name}\0".encode())
    digest.update(tex.read_bytes())
    for figure in sorted(tex.parent.glob("fig_*")):
        digest.update(f"\0{figure.name}\0".encode())
        digest.update(figure.read_bytes())
    return digest.hexdigest()[:32]


def build_pdf(tex: Path) -> tuple[Path | None, str]:
    """Compile ``paper.tex`` next to its figures; (pdf path, note). Never raises for a LaTeX failure.

    Two LaTeX passes take seconds; a report rewritten with nothing changed (a resumed study, ``report``
    run again) reuses the PDF last built from the same inputs, kept under ``PDF_CACHE``.
    """
    engine = shutil.which(LATEX_ENGINE)
    if engine is None:
        return None, f"no PDF: {LATEX_ENGINE} is not installed; paper.tex compiles with any TeX Live"
    cache = tex.parent / PDF_CACHE
    key = _pdf_inputs_key(tex, engine)
    cached_pdf, cached_log = cache / f"{tex.stem}-{key}.pdf", cache / f"{tex.stem}-{key}.log"
    if cached_pdf.is_file() and cached_log.is_file():
        _share(cached_log, tex.with_suffix(".log"))
        _share(cached_pdf, tex.with_suffix(".pdf"))
        return tex.with_suffix(".pdf"), f"built with {LATEX_ENGINE} (unchanged since the last build: reused)"
    tex.with_suffix(".log").unlink(missing_ok=True)  # may be the cache's link: the build writes a new file
    built = _compile_pdf(tex, engine)
    if built[0] is not None:
        cache.mkdir(exist_ok=True)
        for stale in cache.glob(f"{tex.stem}-*"):
            stale.unlink()
        _share(tex.with_suffix(".log"), cached_log)
        _share(tex.with_suffix(".pdf"), cached_pdf)  # last: a cached PDF always has its log
    return built


def _share(src: Path, dest: Path) -> None:
    """``dest`` atomically becomes ``src``'s content: a hard link (the cache costs no disk space; files here
    are only ever replaced, never written in place), a copy where links are refused."""
    part = dest.with_name(f".{dest.name}.part")
    part.unlink(missing_ok=True)
    try:
        os.link(src, part)
    except OSError:
        shutil.copyfile(src, part)
    os.replace(part, dest)


def _compile_pdf(tex: Path, engine: str) -> tuple[Path | None, str]:
    with tempfile.TemporaryDirectory(prefix="ratiocinator-tex-") as build:
        command = [engine, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape",
                   f"-output-directory={build}", tex.name]
        for _ in range(2):  # the second pass resolves links and longtable widths
            try:
                done = subprocess.run(command, cwd=tex.parent, capture_output=True, timeout=LATEX_TIMEOUT_S,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                return None, f"no PDF: {LATEX_ENGINE} ran past {LATEX_TIMEOUT_S} s"
            if done.returncode != 0:
                log = Path(build) / f"{tex.stem}.log"
                if log.exists():
                    shutil.copyfile(log, tex.with_suffix(".log"))
                return None, f"no PDF: {LATEX_ENGINE} failed (exit {done.returncode}); see {tex.with_suffix('.log')}"
        pdf = tex.with_suffix(".pdf")
        write_atomic(pdf, (Path(build) / f"{tex.stem}.pdf").read_bytes())
        # Kept beside the PDF: its warnings (an overfull line, a missing glyph) are the typesetting's record.
        shutil.copyfile(Path(build) / f"{tex.stem}.log", tex.with_suffix(".log"))
    return pdf, f"built with {LATEX_ENGINE}"
