"""The experiment report: ``report.md`` and a self-contained ``report.html``.

Everything shown is read from the ledger at report time (the stored spec text, arms,
runs, final metrics, metric points, events, charges) or from the runs' log files;
nothing is carried over from the process that ran the experiment. The content is
built once as a list of blocks and rendered twice, so the Markdown and the HTML
cannot disagree.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from pydantic import ValidationError

from .analysis import ArmSummary, ExperimentSummary, Finals, MetricStats, summarize_experiment
from .errors import SpecError
from .ledger import Experiment, Ledger, RunRow
from .spec import Spec

GOAL_FIGURE = "fig_goal.png"
CURVES_FIGURE = "fig_curves.png"
LOG_TAIL_LINES = 20
# Only the end of a log is read, so a multi-gigabyte log costs no more than a small one.
LOG_TAIL_BYTES = 64 * 1024
LOG_LINE_CHARS = 400
FIGURE_DPI = 100
# Host facts shown first, in this order; any other recorded fields follow.
HOST_KEYS = ("name", "cpus", "gpus", "ram_gb", "cuda")

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


@dataclass(frozen=True)
class ReportPaths:
    md: Path
    html: Path
    figures: tuple[Path, ...]


# -- reading the ledger ----------------------------------------------------------


def experiment_spec(experiment: Experiment) -> Spec:
    """The spec the experiment ran under, re-validated from the text stored with it."""
    try:
        return Spec.model_validate(yaml.safe_load(experiment.spec_text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise SpecError(f"experiment {experiment.id}: its stored spec no longer validates: {exc}") from None


def summarize(ledger: Ledger, experiment_id: str) -> ExperimentSummary:
    """Per-arm statistics of one experiment, judged by its spec's goal metric."""
    spec = experiment_spec(ledger.experiment(experiment_id))
    return _summarize(ledger, experiment_id, spec, ledger.runs(experiment_id), ledger.run_metrics(experiment_id))


def _summarize(ledger: Ledger, experiment_id: str, spec: Spec, runs: Sequence[RunRow], finals: Finals) -> ExperimentSummary:
    return summarize_experiment(
        experiment_id, ledger.arms(experiment_id), runs, finals, goal_metric=spec.goal_metric, maximize=spec.maximize
    )


# -- the document model ----------------------------------------------------------


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int


@dataclass(frozen=True)
class _Paragraph:
    text: str


@dataclass(frozen=True)
class _Fields:
    rows: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class _Figure:
    filename: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class _Code:
    text: str


_Block = _Heading | _Paragraph | _Fields | _Table | _Figure | _Code
# One metric of one run as the ledger returns it: (seq, step, value) in order.
_Points = list[tuple[int, int | None, float | None]]


# -- formatting ------------------------------------------------------------------


def _num(value: float | None) -> str:
    """Metric values: 4 significant digits."""
    return "—" if value is None else f"{value:.4g}"


def _money(value: float) -> str:
    return f"${value:,.2f}" if value == 0 or abs(value) >= 0.01 else f"${value:.2g}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g} s"


def _mean_std(stats: MetricStats, n_expected: int) -> str:
    """``mean ± std``; no std below two values; per-metric n only where it differs."""
    if stats.mean is None:
        text = "—"
    else:
        text = _num(stats.mean) if stats.std is None else f"{_num(stats.mean)} ± {_num(stats.std)}"
    notes = [f"n={stats.n}"] if stats.n and stats.n != n_expected else []
    if stats.n_nonfinite:
        notes.append(f"{stats.n_nonfinite} non-finite")
    return f"{text} ({', '.join(notes)})" if notes else text


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {key}" for key, n in counts.items())


def _status_cell(status_counts: dict[str, int], failure_counts: dict[str, int]) -> str:
    text = _counts(status_counts) or "no runs"
    return f"{text}; failures: {_counts(failure_counts)}" if failure_counts else text


def _knobs(summary: ArmSummary) -> str:
    parts = [f"{k}={v}" for k, v in summary.arm.env.items()]
    if summary.arm.args:
        parts.append(" ".join(summary.arm.args))
    return ", ".join(parts) or "—"


def _arm_label(summary: ArmSummary, best: str | None) -> str:
    marks = [m for m, on in (("baseline", summary.arm.is_baseline), ("best", summary.name == best)) if on]
    return f"{summary.name} ({', '.join(marks)})" if marks else summary.name


def _value(value: Any) -> str:
    """A spec or event value in one line: floats at 4 significant digits, lists joined."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def _clean(text: str) -> str:
    """Printable text: terminal escapes and control characters removed, line ends unified."""
    text = _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text)


# -- sections --------------------------------------------------------------------


def _summary_text(summary: ExperimentSummary) -> str:
    goal = summary.goal_metric
    direction = "higher is better" if summary.maximize else "lower is better"
    head = f"Goal metric: {goal} ({direction})."
    if summary.n_attempts == 0:
        return f"{head} No run was recorded for this experiment, so there is no result and no best arm."
    others = {status: n for status, n in summary.status_counts.items() if status != "succeeded"}
    runs = f"{summary.n_succeeded} of {summary.n_attempts} runs succeeded" + (f" ({_counts(others)})." if others else ".")
    if summary.n_succeeded == 0:
        return f"{head} No run succeeded ({_counts(summary.status_counts)}), so there is no result and no best arm."
    best = summary.best
    if best is None:
        return f"{head} {runs} No succeeded run reported a finite {goal}, so there is no best arm."
    stats = best.metrics[goal]
    value = _num(stats.mean) if stats.std is None else f"{_num(stats.mean)} ± {_num(stats.std)}"
    no_std = ", no std" if stats.std is None else ""
    return f"{head} Best arm: {best.name} with {goal} = {value} (n={stats.n}{no_std}). {runs}"


def _setup(
    ledger: Ledger, experiment: Experiment, spec: Spec, summary: ExperimentSummary, runs: Sequence[RunRow]
) -> list[_Block]:
    run_commits = sorted({r.commit_sha for r in runs if r.commit_sha and r.commit_sha != experiment.commit_sha})
    commit = experiment.commit_sha or "not recorded"
    if run_commits:
        commit += f" (runs also used: {', '.join(run_commits)})"
    baseline = next((a.name for a in summary.arms if a.arm.is_baseline), "none")
    design = (
        f"{spec.design} over " + "; ".join(f"{k} ∈ {{{_value(v)}}}" for k, v in spec.factors.items())
        if spec.factors
        else "explicit arms"
    )
    spent, reserved = ledger.money(experiment.id)
    budget = f"{_money(spent)} spent of {_money(spec.max_dollars)}"
    if reserved:
        budget += f" ({_money(reserved)} reserved by unfinished runs)"
    metrics = spec.metrics.protocol
    if spec.metrics.protocol == "json_line":
        metrics += f" (prefix {spec.metrics.json_prefix})"
    elif spec.metrics.patterns:
        metrics += f" ({_value(spec.metrics.patterns)})"
    deps = spec.deps
    excluded = f" (excluding {', '.join(deps.exclude_from_requirements)})" if deps.exclude_from_requirements else ""
    rows = [
        ("Experiment", f"{experiment.id} ({experiment.name}), status {experiment.status}, backend {experiment.backend}"),
        ("Topic", spec.topic),
        ("Repository", _resolved_repo(ledger, experiment.id, spec.repo_url)),
        ("Branch", spec.repo_branch),
        ("Commit", commit),
        ("Runner script", spec.runner_script),
        ("Arms", f"{len(summary.arms)} ({design}); baseline: {baseline}"),
        ("Replicates per arm", str(spec.replicates) + (f" (seed in {spec.seed_env})" if spec.seed_env else "")),
        ("Iterations (max)", str(spec.max_iterations)),
        ("Hardware (spec)", _value(spec.hardware.model_dump(exclude_none=True))),
        *_host_rows(ledger, experiment.id),
        ("Data", spec.data.source + (f" ({spec.data.path})" if spec.data.path else "")),
        ("Dependencies: pre-install", "; ".join(deps.pre_install) or "none"),
        ("Dependencies: requirements", (deps.requirements or "none") + excluded),
        ("Dependencies: verify", deps.verify or "none"),
        ("Metrics protocol", metrics),
        ("Budget", budget),
        ("Timeouts", f"training {_seconds(spec.train_timeout_s)} per run, download {_seconds(spec.download_timeout_s)}"),
        ("Spec", f"{experiment.spec_path} (sha256 {experiment.spec_sha256})"),
    ]
    return [_Heading("Setup", 2), _Fields(tuple(rows))]


def _host_rows(ledger: Ledger, experiment_id: str) -> list[tuple[str, str]]:
    """The machines the pipeline recorded in 'host' events, each distinct one once."""
    hosts: list[dict[str, Any]] = []
    for event in ledger.events(experiment_id):
        if event["kind"] == "host" and event["data"] not in hosts:
            hosts.append(event["data"])
    if not hosts:
        return [("Host", "not recorded")]
    ordered = [{**{k: h[k] for k in HOST_KEYS if k in h}, **h} for h in hosts]
    if len(ordered) == 1:
        return [("Host", _value(ordered[0]))]
    return [(f"Host {i}", _value(h)) for i, h in enumerate(ordered, 1)]


def _results_table(summary: ExperimentSummary) -> _Table:
    goal = summary.goal_metric
    others = summary.metrics[1:]
    header = ("Arm", "Knobs", "n (succeeded / attempts)", f"{goal} (goal)", *others, "Runs by status")
    rows = tuple(
        (
            _arm_label(a, summary.best_arm),
            _knobs(a),
            f"{a.n_succeeded} / {a.n_attempts}",
            *(_mean_std(a.metrics[m], a.n_succeeded) for m in summary.metrics),
            _status_cell(a.status_counts, a.failure_counts),
        )
        for a in summary.arms
    )
    return _Table(header, rows)


def _results(summary: ExperimentSummary) -> list[_Block]:
    blocks: list[_Block] = [_Heading("Results", 2)]
    if not summary.arms:
        return [*blocks, _Paragraph("The ledger holds no arms for this experiment.")]
    blocks.append(
        _Paragraph(
            "Values are mean ± sample standard deviation (ddof=1) of each run's final value, over the arm's "
            "succeeded runs; a single value has no standard deviation. Non-finite final values are left out "
            "of the statistics and counted; (n=k) marks a metric with fewer values than the arm has succeeded runs."
        )
    )
    blocks.append(_results_table(summary))
    figure = _goal_figure(summary)
    if figure is not None:
        blocks.append(figure)
    return blocks


def _failed_runs(runs: Sequence[RunRow]) -> list[_Block]:
    blocks: list[_Block] = [_Heading("Failed and interrupted runs", 2)]
    failed = [r for r in runs if r.status in ("failed", "interrupted")]
    if not failed:
        return [*blocks, _Paragraph("No run failed or was interrupted.")]
    for run in failed:
        blocks.append(_Heading(f"Run {run.id}: arm {run.arm}, replicate {run.replicate}, attempt {run.attempt}", 3))
        blocks.append(
            _Fields(
                (
                    ("Status", run.status),
                    ("Failure", run.failure or "—"),
                    ("Reason", run.reason or "—"),
                    ("Exit code", "—" if run.exit_code is None else str(run.exit_code)),
                    ("Signal", "—" if run.signal is None else str(run.signal)),
                    ("Duration", _seconds(run.duration_s)),
                )
            )
        )
        tail = _log_tail(Path(run.log_dir)) if run.log_dir else None
        if tail is None:
            blocks.append(_Paragraph(f"No log output: stderr.log and stdout.log in {run.log_dir} are missing or empty."))
        else:
            path, text = tail
            blocks.append(_Paragraph(f"Last lines of {path}:"))
            blocks.append(_Code(text))
    return blocks


def _log_tail(log_dir: Path) -> tuple[Path, str] | None:
    """The last lines of stderr.log, or of stdout.log when stderr is missing or blank."""
    for name in ("stderr.log", "stdout.log"):
        path = log_dir / name
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(size - LOG_TAIL_BYTES, 0))
                data = fh.read()
        except OSError:
            continue
        lines = _clean(data.decode("utf-8", "replace")).split("\n")
        if size > LOG_TAIL_BYTES:
            lines = lines[1:]  # the first line was cut by the seek
        while lines and not lines[-1].strip():
            lines.pop()
        if lines:
            tail = lines[-LOG_TAIL_LINES:]
            return path, "\n".join(line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " …" for line in tail)
    return None


# -- figures ---------------------------------------------------------------------


def _arm_colors(summary: ExperimentSummary) -> dict[str, tuple[float, ...]]:
    cmap = colormaps["tab10" if len(summary.arms) <= 10 else "tab20"]
    return {a.name: cmap(i % cmap.N) for i, a in enumerate(summary.arms)}


def _png(fig: Figure) -> bytes:
    """Render with the Agg canvas; the figure is never registered with pyplot, so nothing stays open."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight")
    fig.clear()
    return buffer.getvalue()


def _goal_figure(summary: ExperimentSummary) -> _Figure | None:
    """Goal metric per arm: bars at the mean, std error bars, one dot per run."""
    goal = summary.goal_metric
    arms = [a for a in summary.arms if a.metrics[goal].n]
    if not arms:
        return None
    colors = _arm_colors(summary)
    fig = Figure(figsize=(min(3 + 0.8 * len(arms), 10), 4.2))
    ax = fig.add_subplot()
    for i, arm in enumerate(arms):
        stats = arm.metrics[goal]
        best = arm.name == summary.best_arm
        ax.bar(i, stats.mean, width=0.6, color=colors[arm.name], alpha=0.55,
               edgecolor="black", linewidth=2.0 if best else 0.6)
        if stats.std is not None:
            ax.errorbar(i, stats.mean, yerr=stats.std, fmt="none", ecolor="black", capsize=5, linewidth=1.2)
        offsets = np.linspace(-0.15, 0.15, stats.n) if stats.n > 1 else np.zeros(1)
        ax.scatter(i + offsets, stats.values, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(arms)), [_arm_label(a, summary.best_arm) for a in arms],
                  rotation=25 if len(arms) > 3 else 0, ha="right" if len(arms) > 3 else "center")
    ax.set_ylabel(goal)
    direction = "higher" if summary.maximize else "lower"
    ax.set_title(f"{goal} per arm ({direction} is better): mean ± std, dots are runs", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    zoomed = _zoom_to_data(ax, [v for a in arms for v in a.metrics[goal].values]
                           + [a.metrics[goal].mean + s * (a.metrics[goal].std or 0.0) for a in arms for s in (-1, 1)])
    omitted = len(summary.arms) - len(arms)
    caption = f"{goal} per arm: bar at the mean over succeeded runs, error bar ± one sample std, one dot per run."
    if zoomed:
        caption += " The axis is zoomed to the data and does not start at zero: compare bar tops, not bar lengths."
    if omitted:
        caption += f" {omitted} arm(s) without a finite {goal} are not shown."
    return _Figure(GOAL_FIGURE, _png(fig), caption)


def _resolved_repo(ledger: Ledger, experiment_id: str, written: str) -> str:
    """The repository as cloned (a relative path in the spec means little in a report)."""
    for event in ledger.events(experiment_id):
        repo = event["data"].get("repo") if event["kind"] == "code" else None
        if repo and repo != written:
            return f"{written} ({repo})"
    return written


def _zoom_to_data(ax: Any, values: Sequence[float]) -> bool:
    """Zoom the y axis when the spread between arms is tiny next to the values themselves.

    Bars from zero make a 0.92 vs 0.90 difference invisible; hiding it would mislead more
    than a truncated axis that the caption announces.
    """
    low, high = min(values), max(values)
    bottom, top = ax.get_ylim()
    spread = high - low
    if spread <= 0 or spread > 0.25 * (top - bottom):
        return False
    pad = 0.15 * spread
    ax.set_ylim(low - pad, high + pad)
    return True


def _curve_metric(ledger: Ledger, runs: Sequence[RunRow], names: Sequence[str]) -> tuple[str, dict[int, _Points]] | None:
    """The first metric (goal first) that some run reported at least twice, with its points per run."""
    for name in names:
        points = {r.id: ledger.points(r.id, name) for r in runs}
        if any(sum(v is not None for _, _, v in p) >= 2 for p in points.values()):
            return name, points
    return None


def _curves_figure(ledger: Ledger, summary: ExperimentSummary, runs: Sequence[RunRow], finals: Finals) -> _Figure | None:
    """One line per run of the goal metric (else the first metric with several points)."""
    reported = sorted({n for metrics in finals.values() for n in metrics} - set(summary.metrics))
    chosen = _curve_metric(ledger, runs, [*summary.metrics, *reported])
    if chosen is None:
        return None
    metric, points = chosen
    colors = _arm_colors(summary)
    fig = Figure(figsize=(7.5, 4.2))
    ax = fig.add_subplot()
    used_steps: set[bool] = set()
    for run in runs:
        series = points[run.id]
        if not series:
            continue
        has_steps = all(step is not None for _, step, _ in series)
        used_steps.add(has_steps)
        x = [step if has_steps else seq for seq, step, _ in series]
        y = [np.nan if v is None else v for _, _, v in series]
        ax.plot(x, y, color=colors[run.arm], linewidth=1.2, alpha=0.85, marker="." if len(series) < 30 else None,
                linestyle="-" if run.status == "succeeded" else "--")
    handles = [Line2D([], [], color=colors[a.name], label=a.name) for a in summary.arms if any(points[r.id] for r in runs if r.arm_id == a.arm.id)]
    if any(r.status != "succeeded" and points[r.id] for r in runs):
        handles.append(Line2D([], [], color="gray", linestyle="--", label="not succeeded"))
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel({frozenset({True}): "step", frozenset({False}): "point sequence index"}.get(frozenset(used_steps), "step (sequence index where a run gave no step)"))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} during training, one line per run", fontsize=10)
    ax.grid(alpha=0.3)
    caption = f"Learning curves of {metric}, one line per run, colored by arm; dashed lines are runs that did not succeed."
    if metric != summary.goal_metric:
        caption += f" ({summary.goal_metric} has fewer than two points per run.)"
    return _Figure(CURVES_FIGURE, _png(fig), caption)


# -- rendering -------------------------------------------------------------------


def _md(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", _clean(text))


def _md_cell(text: str) -> str:
    return _md(text).replace("\n", " ")


def _render_markdown(title: str, blocks: Sequence[_Block]) -> str:
    out = [f"# {_md_cell(title)}", ""]
    for block in blocks:
        if isinstance(block, _Heading):
            out += ["#" * block.level + " " + _md_cell(block.text), ""]
        elif isinstance(block, _Paragraph):
            out += [_md(block.text), ""]
        elif isinstance(block, _Fields):
            out += [f"- **{_md_cell(k)}:** {_md_cell(v)}" for k, v in block.rows] + [""]
        elif isinstance(block, _Table):
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, _Figure):
            out += [f"![{_md_cell(block.caption)}]({block.filename})", "", f"*{_md_cell(block.caption)}*", ""]
        else:
            text = _clean(block.text)
            fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
            out += [fence + "text", text, fence, ""]
    return "\n".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:.9em;margin:.8em 0}
.scroll{overflow-x:auto}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
table.fields th{width:14em;background:#fafafa;font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;height:auto}figcaption{font-size:.85em;color:#555}
pre{background:#f6f6f6;border:1px solid #e2e2e2;padding:.6em;overflow-x:auto;font-size:.82em}
"""


def _render_html(title: str, blocks: Sequence[_Block]) -> str:
    def esc(text: str) -> str:
        return html.escape(_clean(text))

    body: list[str] = [f"<h1>{esc(title)}</h1>"]
    for block in blocks:
        if isinstance(block, _Heading):
            body.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            body.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, _Fields):
            rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in block.rows)
            body.append(f'<table class="fields">{rows}</table>')
        elif isinstance(block, _Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>')
        elif isinstance(block, _Figure):
            data = base64.b64encode(block.png).decode("ascii")
            body.append(
                f'<figure><img alt="{esc(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
        else:
            body.append(f"<pre><code>{esc(block.text)}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _write(path: Path, data: bytes) -> None:
    """Write via a temporary file, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(ledger: Ledger, experiment_id: str, out_dir: Path) -> ReportPaths:
    """Write report.md, report.html and the figures' PNGs into ``out_dir``."""
    experiment = ledger.experiment(experiment_id)
    spec = experiment_spec(experiment)
    runs = ledger.runs(experiment_id)
    finals = ledger.run_metrics(experiment_id)
    summary = _summarize(ledger, experiment_id, spec, runs, finals)

    blocks: list[_Block] = [_Paragraph(_summary_text(summary))]
    blocks += _setup(ledger, experiment, spec, summary, runs)
    blocks += _results(summary)
    curves = _curves_figure(ledger, summary, runs, finals)
    if curves is not None:
        blocks += [_Heading("Learning curves", 2), curves]
    blocks += _failed_runs(runs)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [b for b in blocks if isinstance(b, _Figure)]
    for name in (GOAL_FIGURE, CURVES_FIGURE):  # a figure from an earlier report must not outlive its data
        if all(f.filename != name for f in figures):
            (out_dir / name).unlink(missing_ok=True)
    for figure in figures:
        _write(out_dir / figure.filename, figure.png)
    paths = ReportPaths(
        md=out_dir / "report.md",
        html=out_dir / "report.html",
        figures=tuple(out_dir / f.filename for f in figures),
    )
    _write(paths.md, _render_markdown(spec.title, blocks).encode("utf-8"))
    _write(paths.html, _render_html(spec.title, blocks).encode("utf-8"))
    return paths
