"""What a session shows: ``results.tsv`` in the seed's exact format, the progress chart, the report
(built by ``session_report`` with the paper's document pipeline).

``results.tsv`` is what people's notebooks read (``analysis.ipynb``: keep rate, running
best, progress chart), so it is byte-compatible with the seed: a header ``commit``,
the metric's name, ``memory_gb``, ``status``, ``description``; one row per finished
attempt in order; the short (7-character) commit; the metric with 6 decimals; memory
in GB with 1 decimal; status ``keep``, ``discard`` or ``crash``; tab-separated, no
quoting, newline-terminated.

The seed knows three statuses; the ledger knows more. An attempt that produced no
measurement — a crash, an edit rejected for touching a protected or non-editable path
(``violation``), an interrupted run, an agent that made no usable edit — is written as
``crash`` with ``0.000000`` and ``0.0``, and its description says which, e.g.
``tweak eval (violation: changed protected prepare.py)``. That is the seed's meaning of
``crash`` (no valid result; the notebook drops those rows before plotting and from the
keep rate), whereas a ``discard`` row's metric is read as a real measurement — a
violation written as ``discard 0.000000`` would plot as the best result ever seen. The
ledger keeps the exact status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ratiocinator.autoresearch.program import Program
from ratiocinator.autoresearch.store import Attempt, Session, Store
from ratiocinator.report.exports import write_atomic
from ratiocinator.store.ledger import Ledger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_TSV_BREAKS = re.compile(r"[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]+")
PLOT_NAME = "progress.png"
TSV_NAME = "results.tsv"
REPORT_NAME = "report.md"
COLORS = {"baseline": "#0072B2", "keep": "#009E73", "discard": "#999999"}
FAILED = ("crash", "violation", "interrupted")


def _cell(text: str) -> str:
    return _TSV_BREAKS.sub(" ", text).strip()


def memory_gb(attempt: Attempt, memory_metric: str | None) -> float:
    """Peak memory in GB: the memory metric's largest value over the attempt's runs (MB unless it ends in _gb)."""
    if memory_metric is None or attempt.status in FAILED:
        return 0.0
    values = [v for v in attempt.secondary.get(memory_metric, []) if math.isfinite(v)]
    if not values:
        return 0.0
    peak = max(values)
    return peak if memory_metric.endswith("_gb") else peak / 1024.0


def description(attempt: Attempt) -> str:
    if attempt.is_baseline:
        return "baseline"
    if attempt.status == "crash":
        return f"{attempt.hypothesis} ({attempt.reason})" if attempt.reason else attempt.hypothesis
    if attempt.status in ("violation", "interrupted"):
        return (f"{attempt.hypothesis} ({attempt.status}: {attempt.reason})" if attempt.reason
                else f"{attempt.hypothesis} ({attempt.status})")
    return attempt.hypothesis


def tsv_status(attempt: Attempt) -> str:
    return {"baseline": "keep", "keep": "keep", "discard": "discard"}.get(attempt.status, "crash")


def results_tsv(attempts: Sequence[Attempt], program: Program) -> str:
    """The whole file (module docstring for the format)."""
    lines = ["\t".join(("commit", _cell(program.metric.name), "memory_gb", "status", "description"))]
    for a in attempts:
        if a.status == "running":
            continue
        status = tsv_status(a)
        measured = status != "crash" and a.metric is not None
        commit = (a.commit_sha or a.parent_commit)[:7]
        value = f"{a.metric:.6f}" if measured else f"{0.0:.6f}"
        memory = f"{memory_gb(a, program.memory_metric):.1f}" if measured else f"{0.0:.1f}"
        lines.append("\t".join((commit, value, memory, status, _cell(description(a)))))
    return "\n".join(lines) + "\n"


def running_best(attempts: Sequence[Attempt], lower_is_better: bool) -> list[tuple[int, float]]:
    """(iteration, best so far) at the baseline and every keep."""
    points: list[tuple[int, float]] = []
    for a in attempts:
        if a.status in ("baseline", "keep") and a.metric is not None:
            best = a.metric if not points else (min if lower_is_better else max)(points[-1][1], a.metric)
            points.append((a.iteration, best))
    return points


def draw_progress(attempts: Sequence[Attempt], program: Program, *, floor: float | None) -> Figure:
    """Metric per attempt (dots by status), the running best (a step line), the baseline's noise band."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import MaxNLocator

    metric = program.metric
    fig = matplotlib.figure.Figure(figsize=(10, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [a for a in attempts if a.status != "running"]
    baseline = next((a for a in done if a.status == "baseline"), None)
    if baseline is not None and baseline.metric is not None and floor:
        ax.axhspan(baseline.metric - floor, baseline.metric + floor, color=COLORS["baseline"], alpha=0.12,
                   label=f"baseline ± noise floor ({program.k} runs)")
    for status in ("discard", "keep", "baseline"):
        group = [(a.iteration, a.metric) for a in done if a.status == status and a.metric is not None]
        if group:
            ax.scatter([i for i, _ in group], [m for _, m in group], s=46 if status != "discard" else 22,
                       c=COLORS[status], edgecolors="black" if status != "discard" else "none", linewidths=0.5,
                       zorder=3, label=status)
    failed = [a for a in done if a.status in FAILED]
    if failed:
        axis = ax.get_xaxis_transform()  # x in data, y in axes units: marks along the bottom edge
        ax.scatter([a.iteration for a in failed], [0.02] * len(failed), transform=axis, marker="x", c="#D55E00",
                   s=30, zorder=3, label="crash / violation / interrupted (no value)")
    steps = running_best(done, metric.lower_is_better)
    if steps:
        last = max(a.iteration for a in done)
        xs = [x for x, _ in steps] + [last]
        ys = [y for _, y in steps] + [steps[-1][1]]
        ax.step(xs, ys, where="post", color="#007355", linewidth=2, alpha=0.8, zorder=2, label="running best")
    kept = sum(a.status == "keep" for a in done)
    ax.set_title(f"autoresearch {program.tag}: {sum(not a.is_baseline for a in done)} attempts, {kept} kept")
    ax.set_xlabel("attempt")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric.name} ({metric.direction} is better)")
    ax.grid(True, alpha=0.25)
    if done:
        # A fixed corner away from the trend (\"best\" searches, and this is redrawn after every attempt).
        ax.legend(loc="upper right" if metric.lower_is_better else "lower right", fontsize=8)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=0.11)
    return fig


def write_outputs(directory: Path, session: Session, attempts: Sequence[Attempt], program: Program, *,
                  floor: float | None, spent: float, ledger: Path, repo_copy: Path | None = None) -> None:
    """results.tsv, progress.png and the report (report.md, .html, .tex, facts.json), each written atomically.

    The report's cost section is read from ``ledger`` (its charges and rented instances).
    The PDF is left to the command line, once the session has ended (``build_pdf`` on
    report.tex): pdflatex takes seconds, which an attempt every few minutes should not pay.
    """
    from ratiocinator.autoresearch.costs import session_costs
    from ratiocinator.autoresearch.session_report import FACTS_FILE, facts_document, progress_caption, render_session
    from ratiocinator.report.exports import json_records
    from ratiocinator.report.figures import Drawing, render

    tsv = results_tsv(attempts, program)
    write_atomic(directory / TSV_NAME, tsv)
    if repo_copy is not None:
        write_atomic(repo_copy, tsv)
    progress = render(Drawing(PLOT_NAME.removesuffix(".png"), draw_progress(attempts, program, floor=floor),
                              progress_caption(program)))
    write_atomic(directory / PLOT_NAME, progress.png)
    write_atomic(directory / f"{progress.stem}.pdf", progress.pdf)
    store = Store(Ledger(ledger, read_only=True))
    try:
        costs = session_costs(store, session, list(attempts))
    finally:
        store.close()
    report, rendered = render_session(session, attempts, program, spent=spent, costs=costs, progress=progress)
    for name, text in rendered.items():
        write_atomic(directory / name, text)
    head, facts = facts_document(session, report, rendered, ledger)
    write_atomic(directory / FACTS_FILE, json_records(head, "facts", facts))
