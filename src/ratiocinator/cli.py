"""The ``ratiocinator`` command line.

Exit codes: 0 done, 1 the work failed (checks, all runs), 2 usage or spec error,
130 interrupted. A user error prints what, where and how to fix it — never a traceback.

Each command imports the modules it uses inside its function: every command starts this module,
and `--help`, `status` or `validate` should not wait for the pipeline, numpy or the report stack
(tests/test_cli_startup.py names any heavy library that comes back).
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ratiocinator.errors import BackendError, RatiocinatorError, UsageError, machine_fault, path_fault
from ratiocinator.store.paths import Paths, no_ledger
from ratiocinator.store.records import RunStatus
from ratiocinator.text_tables import print_fitted

if TYPE_CHECKING:  # each command imports what it uses: the spec's models, the pipeline, the report stack
    from ratiocinator.check.readiness import Readiness
    from ratiocinator.report.publish import ReportFiles
    from ratiocinator.spec.models import LoadedSpec
    from ratiocinator.store.ledger import Ledger, RunRow

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="Autonomous ML research: spec → arms → budgeted runs → ledger → report.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

P = ParamSpec("P")
R = TypeVar("R")
MAX_MISMATCHES_SHOWN = 50
RUNS_METRICS_SHOWN = 6
# `status` of a bigger study lists its running runs, its latest failures and its latest runs, up to this many
# rows (a table of 10,000 runs takes seconds to lay out and scrolls past what matters); `runs` lists every run.
STATUS_RUNS_SHOWN = 50
STATUS_FAILURES_SHOWN = 20


class _State:
    home: Path = Path(".ratiocinator")


state = _State()


def friendly(fn: Callable[P, R]) -> Callable[P, R]:
    """User errors become a message and an exit code; Ctrl-C becomes 130."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except RatiocinatorError as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None
        except (OSError, sqlite3.Error) as exc:  # the machine's faults: a read-only or full disk, a damaged ledger
            fault: RatiocinatorError | None = machine_fault(exc, str(Paths(state.home).ledger))
            if fault is None and isinstance(exc, OSError):
                fault = path_fault(exc)
            if fault is None:
                raise
            err.print(f"error: {fault}", markup=False)
            raise typer.Exit(fault.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def _print_version(asked: bool) -> None:
    """The installed distribution's version (what pip reports), else the source tree's."""
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        from ratiocinator import __version__

        try:
            installed = version("ratiocinator")
        except PackageNotFoundError:  # run from a source tree that was never installed
            installed = __version__
        out.print(f"ratiocinator {installed}", markup=False)
        raise typer.Exit(0)


@app.callback()
def main_options(
    home: Annotated[Path, typer.Option("--home", envvar="RATIOCINATOR_HOME",
                                       help="ledger, workspaces and reports")] = Path(".ratiocinator"),
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="print the version and exit")] = False,
) -> None:
    state.home = home.expanduser().resolve()


def _warn_uncommitted(loaded: LoadedSpec) -> None:
    """Say (on stderr) which local edits the runs will not see: they run the commit, not the working tree."""
    from ratiocinator.pipeline import uncommitted_warning

    warning = uncommitted_warning(loaded, Paths(state.home))
    if warning:
        err.print(f"[yellow]{escape(warning)}[/]")


SpecArg = Annotated[Path, typer.Argument(help="research spec (YAML)", show_default=False)]
WideOption = Annotated[bool, typer.Option("--wide", help="full knob names in arm names, however wide the table")]


@app.command()
@friendly
def validate(spec: SpecArg) -> None:
    """Parse and check a spec; summarise it (exit 2 on errors)."""
    from ratiocinator.data.probe import summary as data_summary
    from ratiocinator.pipeline import make_backend
    from ratiocinator.planning.plan import constants
    from ratiocinator.spec.advice import absolute_deps_paths, backend_advice
    from ratiocinator.spec.models import load_spec

    loaded = load_spec(spec)
    _warn_uncommitted(loaded)
    s = loaded.spec
    data_line = data_summary(loaded, state.home)  # size and reachability (HEAD); a missing path is an error
    direction = "maximize" if s.maximize else "minimize"
    out.print(f"[bold]{loaded.path}[/bold]: valid spec '{loaded.name}' (sha256 {loaded.sha256[:12]})")
    rows = [
        ("topic", s.topic if len(s.topic) < 160 else s.topic[:157] + "..."),
        ("goal", f"{direction} {s.goal_metric} ({s.metrics.protocol}"
                 + (f", prefix {s.metrics.json_prefix!r})" if s.metrics.protocol == "json_line" else ")")),
        ("code", f"{s.repo_url} @ {s.repo_branch}, runner {s.runner_script}"),
        ("deps", f"{len(s.deps.pre_install)} pre_install command(s), requirements {s.deps.requirements or '-'}"
                 f" (excluding {', '.join(s.deps.exclude_from_requirements) or 'nothing'}),"
                 f" verify {'yes' if s.deps.verify else 'no'}"),
        ("data", data_line),
        ("budget", f"${s.max_dollars:.2f}, {s.max_iterations} iteration(s), train_timeout_s {s.train_timeout_s:g},"
                   f" download_timeout_s {s.download_timeout_s:g}"),
        ("runs", _arms_line(loaded)),
        *([("constants", " ".join(f"{k}={v}" for k, v in constants(s).items()))] if s.env else []),
        ("backend", f"{s.backend}, concurrency {s.concurrency or 'auto'}"),
        ("paper", s.title),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    findings = make_backend(loaded, Paths(state.home)).check_hardware(loaded)
    if findings:
        hw = Table(title=f"hardware on the {s.backend} backend", title_justify="left", box=None, pad_edge=False)
        for col in ("field", "status", "detail"):
            hw.add_column(col)
        colors = {"ok": "green", "unmet": "red", "not_applicable": "yellow", "unknown": "yellow"}
        for f in findings:
            hw.add_row(f.field, f"[{colors[f.status]}]{f.status.replace('_', ' ')}[/]", f.detail)
        out.print(hw)
    for line in backend_advice(loaded, findings):
        out.print(line, markup=False)
    for line in absolute_deps_paths(loaded):
        err.print(f"[yellow]{escape(line)}[/]")


def _arms_line(loaded: Any) -> str:
    from ratiocinator.planning.plan import plan_iteration

    s = loaded.spec
    if not s.arms and not s.factors:
        if s.search is not None:
            return (f"no arms or factors: iteration 1 samples {s.search.arms_per_iteration} configuration(s) from"
                    f" search.space ({', '.join(s.search.space)})")
        if s.llm is not None:
            return f"no arms or factors: the LLM ({s.llm.model}) designs them from the topic"
        return "no arms or factors yet — `ratiocinator plan` explains how to add them"
    try:
        plan = plan_iteration(loaded)
    except RatiocinatorError as exc:
        return f"plan problem: {exc.message}"
    return f"{len(plan.arms)} arm(s) × {plan.replicates} replicate(s) = {plan.n_runs} runs, baseline {plan.baseline}"


@app.command()
@friendly
def plan(spec: SpecArg, as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
         wide: WideOption = False) -> None:
    """Arms, runs, knobs, commit and worst-case cost (compute and LLM); runs nothing.

    Without arms or factors in the spec and with an LLM configured, the LLM designs them
    now; the design is recorded, and `research` runs exactly that plan.
    """
    from ratiocinator.pipeline import Research, backend_price, inspect_code, make_backend, plan_summary
    from ratiocinator.planning.plan import (
        constants,
        find_ignored_knobs,
        own_knobs,
        plan_iteration,
        refuse_ignored_knobs,
    )
    from ratiocinator.spec.models import load_spec

    loaded = load_spec(spec)
    _warn_uncommitted(loaded)
    job = Research(loaded, state.home)
    designed_by = None
    if not (loaded.spec.arms or loaded.spec.factors) and (job.llm_config is not None or loaded.spec.search is not None):
        exp_id, the_plan, decision = job.plan_first_iteration()
        designed_by = {"experiment": exp_id, "planner": job.planner.name, "reason": decision.reason,
                       "model": job.llm_config.model if job.llm_config is not None else None,
                       "hypotheses": decision.record.get("hypotheses", [])}
    else:
        the_plan = plan_iteration(loaded)
    code = inspect_code(loaded, Paths(state.home))
    where = make_backend(loaded, Paths(state.home))
    findings = where.check_hardware(loaded)
    ignored = find_ignored_knobs(loaded, the_plan, code.knobs)
    price = backend_price(loaded)
    summary = plan_summary(the_plan, price, loaded.spec.train_timeout_s)
    llm = job.llm_estimate()
    where_lines = where.describe(loaded, findings)
    data = {
        "experiment": loaded.name,
        "commit": code.commit,
        "repo": code.repo,
        "runner_script": loaded.spec.runner_script,
        "baseline": the_plan.baseline,
        "constants": constants(loaded.spec),
        **summary,
        "max_dollars": loaded.spec.max_dollars,
        "price_per_hour": price,
        "arms": [
            {"name": a.name, "env": a.env, "args": list(a.args), "description": a.description,
             "ignored_knobs": [i.knob for i in ignored if i.arm == a.name]}
            for a in the_plan.arms
        ],
        "ignored_knobs": [{"arm": i.arm, "knob": i.knob, "where": i.where} for i in ignored],
        "designed_by": designed_by,
        "llm": llm,
        "backend": loaded.spec.backend,
        # Where runs would go: matching offers, cluster resources, hosts, this machine.
        "hardware": [f.__dict__ for f in findings],
        "where": where_lines,
    }
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        if ignored:  # the refusal alone: a table of arms that cannot run would read as a plan
            refuse_ignored_knobs(loaded, the_plan, code.knobs)
        out.print(f"[bold]{loaded.name}[/bold] at commit {code.commit[:12]} ({code.repo})")
        fixed = constants(loaded.spec)
        if fixed:
            out.print("constants (every arm): " + " ".join(f"{k}={v}" for k, v in fixed.items()), markup=False)
        shown = {a.name: " ".join(f"{k}={v}" for k, v in own_knobs(a, loaded.spec).items())
                 + (" " + " ".join(a.args) if a.args else "") for a in the_plan.arms}

        def arms_table(label: Callable[[str], str]) -> Table:
            table = Table(box=None, pad_edge=False)
            table.add_column("arm", overflow="fold")
            table.add_column("knobs", overflow="fold")
            table.add_column("runs")
            for a in the_plan.arms:
                mark = " (baseline)" if a.name == the_plan.baseline else ""
                table.add_row(escape(label(a.name) + mark), escape(label(shown[a.name]) or "-"),
                              str(the_plan.replicates_of(a.name)))
            return table

        print_fitted(out, arms_table, [*shown, *shown.values()], wide=wide)
        out.print(
            f"{summary['arms']} arms × {summary['replicates']} replicates = {summary['runs']} runs;"
            f" worst case ${summary['worst_case_dollars']:.4f}"
            f" (${price:g}/h × {loaded.spec.train_timeout_s:g}s per run)"
            f" against max_dollars ${loaded.spec.max_dollars:.2f}"
        )
        if designed_by:
            model = f" ({designed_by['model']})" if designed_by["model"] else ""
            out.print(f"designed by the {designed_by['planner']} planner{model}"
                      f" — {designed_by['reason']}; recorded in {designed_by['experiment']}, `research` runs this plan",
                      markup=False)
            for h in designed_by["hypotheses"]:
                out.print(f"  hypothesis: {h['statement']} — arms {', '.join(h['arms'])}", markup=False)
        for line in where_lines:
            out.print(line, markup=False)
        if llm:
            out.print(f"LLM: up to {llm['calls']} calls × ${llm['per_call_dollars']:.4f} worst case"
                      f" (~{llm['assumed_prompt_tokens']:,} prompt tokens + {llm['max_tokens']:,} reply tokens)"
                      f" = ${llm['worst_case_dollars']:.4f};"
                      f" compute + LLM ≤ ${summary['worst_case_dollars'] + llm['worst_case_dollars']:.4f}",
                      markup=False)
    if ignored:
        refuse_ignored_knobs(loaded, the_plan, code.knobs)


@app.command()
@friendly
def knobs(spec: SpecArg) -> None:
    """The knobs the runner reads (environment variables and flags), with defaults."""
    from ratiocinator.knob_listing import knob_table, split_knobs
    from ratiocinator.pipeline import inspect_code
    from ratiocinator.repo.workspace import LfsContentMissing
    from ratiocinator.spec.models import load_spec

    loaded = load_spec(spec)
    try:
        code = inspect_code(loaded, Paths(state.home))
    except LfsContentMissing as exc:  # listing knobs reads code, never the data
        err.print(f"[yellow]warning: {escape(exc.message)}; the knobs below are read from the code alone[/]")
        code = inspect_code(loaded, Paths(state.home), require_lfs=False)
    report = code.knobs
    own, given = split_knobs(report.knobs.values())
    out.print(knob_table(own, f"knobs read by {loaded.spec.runner_script} at {code.commit[:12]}"))
    if given:  # read by the runner, but set by the run contract or the platform: not the study's to vary
        out.print()
        out.print(knob_table(given, "also read: the run contract's variables and inherited settings (not knobs)",
                             marked=True))
    more = " ..." if len(report.files) > 8 else ""
    out.print(f"scanned {len(report.files)} file(s): {', '.join(report.files[:8])}{more}")
    if report.dynamic:
        out.print(f"[yellow]environment read with computed names at {', '.join(report.dynamic[:8])}[/]"
                  " — declare such knobs under extra_knobs")
    for problem in report.unreadable:
        out.print(f"[yellow]not scanned: {problem}[/]")


@app.command()
@friendly
def check(
    spec: SpecArg,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON")] = False,
    smoke: Annotated[bool, typer.Option("--smoke/--no-smoke", help="run each distinct arm once in trial mode")] = True,
    llm: Annotated[bool, typer.Option("--llm/--no-llm",
                                      help="add the configured LLM's review (claims verified)")] = True,
) -> None:
    """Readiness review: static checks, smoke runs, cross-arm comparison. Exit 0 ready, 1 not ready."""
    from ratiocinator.pipeline import check_spec
    from ratiocinator.spec.models import load_spec

    loaded = load_spec(spec)
    _warn_uncommitted(loaded)
    say = (lambda m: err.print(m, markup=False)) if as_json else (lambda m: out.print(m, markup=False))
    result = check_spec(loaded, state.home, smoke=smoke, use_llm=llm, on_message=say)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_readiness(result)
    raise typer.Exit(0 if result.is_code_ready else 1)


def _print_readiness(result: Readiness) -> None:
    colors = {"passed": "green", "failed": "red", "warning": "yellow", "skipped": "dim"}
    for c in result.checks:
        out.print(f"[{colors[c.status]}]{c.status:>7}[/] [bold]{c.name}[/]: ", end="")
        out.print(c.summary, markup=False)
        if c.status in ("failed", "warning"):
            for item in c.evidence[:8]:
                out.print("          " + _evidence_text(item), markup=False)
    verdict = "[green]ready[/]" if result.is_code_ready else "[red]not ready[/]"
    out.print(f"code at {(result.commit or '?')[:12]}: {verdict}")


def _evidence_text(item: dict[str, Any]) -> str:
    if "verdict" in item:  # an LLM claim
        return f"{item['verdict']}: {item.get('description', '')} — {item.get('evidence', '')}"
    if "class" in item:  # a smoke run
        lines = " | ".join(item.get("evidence", [])[:3])
        return f"{item['arm']}: {item['class'] or 'ok'} — {lines} (logs: {item.get('log_dir', '')})"
    where = f"{item['file']}:{item['line']}" if item.get("file") and item.get("line") else item.get("file") or ""
    text = item.get("message") or item.get("excerpt") or ", ".join(f"{k}={v}" for k, v in item.items())
    excerpt = f"  | {item['excerpt']}" if item.get("excerpt") and item.get("message") else ""
    return f"{where}: {text}{excerpt}" if where else f"{text}{excerpt}"


@app.command("exec-eval")
@friendly
def exec_eval(
    samples: Annotated[Path, typer.Argument(
        help="JSONL: {prompt, completion, test, entry_point} or {code, test} per line")],
    as_json: Annotated[bool, typer.Option("--json",
                                          help="print the summary and every sample's result as JSON")] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="samples at once (default: CPU count)")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", help="wall-clock seconds per sample (a sample's own timeout_s wins)")] = 10.0,
    memory_mb: Annotated[int, typer.Option("--memory-mb", help="address-space limit per sample")] = 1024,
    out_file: Annotated[Path | None, typer.Option("--out", help="also write the JSON document to this file")] = None,
) -> None:
    """Execution-aware evaluation: run each generated sample against its tests in a sandbox and label the outcome."""
    from ratiocinator.execeval.engine import evaluate, format_results, isolation, results_json, summarize
    from ratiocinator.execeval.samples import Limits, load_samples
    from ratiocinator.report.exports import write_atomic

    loaded = load_samples(samples)
    limits = Limits(timeout_s=timeout, memory_mb=memory_mb)
    done = 0

    def progress(_result: Any) -> None:
        nonlocal done
        done += 1
        if sys.stderr.isatty():
            err.print(f"\r{done}/{len(loaded)} evaluated", end="", markup=False)

    results = evaluate(loaded, limits=limits, workers=workers, on_result=progress)
    if sys.stderr.isatty():
        err.print()
    document = {"samples": str(samples), "limits": dataclasses.asdict(limits), **isolation(results),
                "summary": summarize(results), "results": results_json(results)}
    if out_file is not None:
        write_atomic(out_file, json.dumps(document, indent=2) + "\n")
    if as_json:
        print(json.dumps(document, indent=2))
    else:
        out.print(format_results(results), markup=False)
        if out_file is not None:
            out.print(f"results: {out_file}", markup=False)


@app.command()
@friendly
def research(
    spec: SpecArg,
    new: Annotated[bool, typer.Option("--new", help="start a fresh experiment instead of resuming")] = False,
    skip_check: Annotated[bool, typer.Option(
        "--skip-check", help="skip the readiness review (the report says so)")] = False,
    llm_review: Annotated[bool, typer.Option(
        "--llm-review/--no-llm-review", help="include the LLM in the readiness review")] = True,
    replay: Annotated[str | None, typer.Option(
        "--replay", metavar="EXP", help="answer every LLM call from EXP's recorded calls (no network)")] = None,
) -> None:
    """The whole pipeline: check, plan, prepare, run every arm, record, report. Resumable."""
    from ratiocinator.pipeline import Research
    from ratiocinator.spec.models import load_spec

    loaded = load_spec(spec)
    _warn_uncommitted(loaded)
    interactive = sys.stdout.isatty()
    from ratiocinator.execution.progress import LiveProgress, PlainProgress  # rich's live panel: research only

    progress = LiveProgress() if interactive else PlainProgress()
    job = Research(loaded, state.home, progress=progress, new=new, check=not skip_check, llm_review=llm_review,
                   replay_from=replay)
    with progress:
        outcome = job.run()
    out.print(f"experiment {outcome.experiment_id}: {outcome.status} — {outcome.succeeded} succeeded,"
              f" {outcome.failed} failed")
    if outcome.message:
        out.print(outcome.message, markup=False)
    if outcome.report is not None:
        _print_report(outcome.report)
    raise typer.Exit(outcome.exit_code)


@app.command()
@friendly
def status(experiment: Annotated[str | None, typer.Argument(help="experiment id, id prefix or name")] = None,
           wide: WideOption = False) -> None:
    """Experiments and their runs, from the ledger."""
    from ratiocinator.store.liveness import ORPHANED, ORPHANED_NOTE, orphaned

    ledger = _ledger()
    paths = Paths(ledger.path.parent)
    if experiment is None:
        table = Table(box=None, pad_edge=False)
        table.add_column("experiment", overflow="fold")  # what the user types next: never cut
        for col in ("status", "ok", "failed", "running", "spent", "updated"):
            table.add_column(col)
        for exp in ledger.experiments():
            runs = ledger.runs(exp.id)
            spent, _ = ledger.money(exp.id)
            table.add_row(
                exp.id, ORPHANED if orphaned(exp.status, paths.lock(exp.id)) else exp.status,
                str(sum(r.status == RunStatus.SUCCEEDED for r in runs)),
                str(sum(r.status == RunStatus.FAILED for r in runs)),
                str(sum(r.status == RunStatus.RUNNING for r in runs)),
                f"${spent:.4f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(exp.updated_at)),
            )
        out.print(table if table.row_count else "no experiments yet")
        _print_live_instances(ledger)
        return
    exp = ledger.find_experiment(experiment)
    spent, reserved = ledger.money(exp.id)
    gone = orphaned(exp.status, paths.lock(exp.id))
    out.print(f"[bold]{exp.id}[/bold] {ORPHANED if gone else exp.status} — commit {(exp.commit_sha or '?')[:12]},"
              f" ${spent:.4f} spent, ${reserved:.4f} reserved")
    if gone:
        out.print(ORPHANED_NOTE.format(command=f"ratiocinator research {exp.spec_path}"), markup=False)
    elif exp.note:
        out.print(exp.note, markup=False)
    goal = _goal(exp.spec_text)
    metrics = ledger.run_metrics(exp.id)
    runs = ledger.runs(exp.id)

    listed = _status_runs(runs)

    def runs_table(label: Callable[[str], str]) -> Table:
        table = Table(box=None, pad_edge=False)
        for col in ("run", "arm", "rep", "try", "status", goal or "goal", "time", "why"):
            table.add_column(col, overflow="fold" if col == "arm" else "ellipsis")
        for r in listed:
            value, finite = metrics.get(r.id, {}).get(goal, (None, True)) if goal else (None, True)
            shown = "-" if goal not in metrics.get(r.id, {}) else (f"{value:.6g}" if finite else "non-finite")
            color = {RunStatus.SUCCEEDED: "green", RunStatus.FAILED: "red", RunStatus.RUNNING: "cyan",
                     RunStatus.INTERRUPTED: "yellow"}.get(RunStatus(r.status), "")
            shown_status = r.status
            if gone and r.status == RunStatus.RUNNING:
                color, shown_status = "yellow", ORPHANED
            why = f"{r.failure}: {r.reason}" if r.failure else r.reason
            table.add_row(str(r.id), escape(label(r.arm)), str(r.replicate), str(r.attempt),
                          f"[{color}]{shown_status}[/]",
                          shown, f"{r.duration_s:.1f}s" if r.duration_s is not None else "-", escape(why[:100]))
        return table

    print_fitted(out, runs_table, {r.arm for r in listed}, wide=wide)
    if len(listed) < len(runs):
        counts = Counter(r.status for r in runs)
        out.print(f"{len(runs):,} runs: " + ", ".join(f"{n:,} {name}" for name, n in counts.most_common())
                  + f"; {len(runs) - len(listed):,} not shown here (`ratiocinator runs {exp.id}` lists every one)",
                  markup=False)
    classes = Counter(r.failure for r in runs if r.status == RunStatus.FAILED and r.failure)
    if classes:
        retried = sum(r.transient for r in runs if r.status == RunStatus.FAILED)
        out.print("failures by class: " + ", ".join(f"{name} {n}" for name, n in classes.most_common())
                  + (f" ({retried} transient, retried)" if retried else ""), markup=False)


def _status_runs(runs: list[RunRow]) -> list[RunRow]:
    """The runs `status` lists, in run order: all of them up to `STATUS_RUNS_SHOWN`; past that, every running
    run, then the latest failures (up to `STATUS_FAILURES_SHOWN`), then the latest runs, up to the limit."""
    if len(runs) <= STATUS_RUNS_SHOWN:
        return runs
    keep = {r.id for r in runs if r.status == RunStatus.RUNNING}
    failures = [r.id for r in reversed(runs) if r.status == RunStatus.FAILED]
    keep.update(failures[:max(0, min(STATUS_FAILURES_SHOWN, STATUS_RUNS_SHOWN - len(keep)))])
    for r in reversed(runs):
        if len(keep) >= STATUS_RUNS_SHOWN:
            break
        keep.add(r.id)
    return [r for r in runs if r.id in keep]


@app.command()
@friendly
def runs(
    experiment: Annotated[str, typer.Argument(help="experiment id, id prefix or name")],
    as_json: Annotated[bool, typer.Option("--json", help="print every run as JSON")] = False,
    metric_names: Annotated[str | None, typer.Option(
        "--metrics", metavar="NAMES", help="comma-separated metrics to show (default: the goal first, then the"
                                           " metrics related to it, up to 6)")] = None,
    wide: WideOption = False,
) -> None:
    """Every run of an experiment (all attempts), with config and final metrics."""
    ledger = _ledger()
    exp = ledger.find_experiment(experiment)
    metrics = ledger.run_metrics(exp.id)
    rows = []
    for r in ledger.runs(exp.id):
        rows.append({
            "run_id": r.id, "experiment": exp.id, "arm": r.arm, "replicate": r.replicate, "seed": r.seed,
            "attempt": r.attempt, "status": r.status, "failure": r.failure, "reason": r.reason,
            "exit_code": r.exit_code, "signal": r.signal, "started_at": r.started_at, "ended_at": r.ended_at,
            "duration_s": r.duration_s, "host": r.host, "slot": r.slot, "commit": r.commit_sha, "env": r.env,
            "argv": r.argv, "cost": r.cost, "log_dir": r.log_dir, "out_dir": r.out_dir,
            "evidence": r.evidence.get("evidence", []), "failure_detail": r.evidence.get("detail", {}),
            "transient": r.transient,
            "metrics": {k: (v if finite else None) for k, (v, finite) in metrics.get(r.id, {}).items()},
            "nonfinite_metrics": sorted(k for k, (_, finite) in metrics.get(r.id, {}).items() if not finite),
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    recorded = {name for row in rows for name in row["metrics"]}
    shown_names = _chosen_metrics(metric_names, recorded) if metric_names else metric_order(
        recorded, _goal(exp.spec_text))[:RUNS_METRICS_SHOWN]

    def runs_table(label: Callable[[str], str]) -> Table:
        table = Table(box=None, pad_edge=False)
        for col in ("run", "arm", "rep", "seed", "try", "status", "metrics"):
            table.add_column(col, overflow="fold" if col in ("arm", "metrics") else "ellipsis")
        for row in rows:
            values = row["metrics"]
            shown = ", ".join(f"{k}={values[k]:.4g}" if values[k] is not None else f"{k}=non-finite"
                              for k in shown_names if k in values)
            table.add_row(str(row["run_id"]), escape(label(row["arm"])), str(row["replicate"]), str(row["seed"]),
                          str(row["attempt"]), row["status"], escape(shown))
        return table

    print_fitted(out, runs_table, {row["arm"] for row in rows}, wide=wide)


def metric_order(names: set[str], goal: str | None) -> list[str]:
    """The goal metric first, then the metrics that share a word with it (``val_loss`` beside ``val_r2``),
    then the rest alphabetically: what a reader of ``runs`` looks for, in that order."""
    words = set(goal.lower().replace("-", "_").split("_")) if goal else set()

    def rank(name: str) -> tuple[int, str]:
        if name == goal:
            return 0, name
        shared = words & set(name.lower().replace("-", "_").split("_"))
        return (1 if shared else 2), name

    return sorted(names, key=rank)


def _chosen_metrics(option: str, recorded: set[str]) -> list[str]:
    chosen = [name.strip() for name in option.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in recorded]
    if unknown:
        import difflib

        near = {name: difflib.get_close_matches(name, sorted(recorded), n=1) for name in unknown}
        said = "; ".join(f"'{name}'" + (f" (did you mean '{near[name][0]}'?)" if near[name] else "")
                         for name in unknown)
        raise UsageError(f"--metrics: no run recorded {said}",
                         hint=f"recorded metrics: {', '.join(sorted(recorded)) or '(none)'}")
    return chosen


@app.command()
@friendly
def report(
    experiment: Annotated[str, typer.Argument(help="experiment id, id prefix or name")],
    pdf: Annotated[bool, typer.Option("--pdf/--no-pdf", help="build paper.pdf when pdflatex is installed")] = True,
) -> None:
    """(Re)write an experiment's paper, figures and exports from the ledger."""
    from ratiocinator.report.publish import write_report

    ledger = _ledger()
    exp = ledger.find_experiment(experiment)
    files = write_report(ledger, exp.id, Paths(state.home).report(exp.id), pdf=pdf)
    _print_report(files)


def _print_report(files: ReportFiles) -> None:
    out.print(f"paper:   {files.html}")
    out.print(f"         {files.md}")
    out.print(f"         {files.tex}")
    out.print(f"         {files.pdf}" if files.pdf else f"         ({files.pdf_note})")
    out.print(f"exports: runs.csv, runs.json, results.tsv, aggregated_metrics.json in {files.dir}")
    out.print(f"{files.n_facts} numbers traced to their runs in {files.facts.name};"
              f" check with `ratiocinator verify {files.dir}`")


@app.command()
@friendly
def verify(report_dir: Annotated[Path, typer.Argument(help="a report directory (holds facts.json)")]) -> None:
    """Recompute every number of a report from the ledger; exit 1 on any mismatch."""
    from ratiocinator.report.verify import read_facts, verify_report

    recorded = read_facts(report_dir)
    ledger = _ledger_for(recorded)
    result = verify_report(ledger, report_dir)
    if result.ok:
        out.print(f"verified: {result.facts} numbers, {result.citations} citations in {', '.join(result.documents)} "
                  f"match the ledger ({ledger.path})")
        return
    for line in result.mismatches[:MAX_MISMATCHES_SHOWN]:
        err.print(f"mismatch: {line}", markup=False)
    if len(result.mismatches) > MAX_MISMATCHES_SHOWN:
        err.print(f"... and {len(result.mismatches) - MAX_MISMATCHES_SHOWN} more", markup=False)
    rewrite = ("run the session's `ratiocinator autoresearch PROGRAM` again" if "experiment_id" not in recorded
               else f"rewrite it with `ratiocinator report {result.experiment_id}`")
    err.print(f"error: {len(result.mismatches)} mismatch(es) between {report_dir} and the ledger; {rewrite}",
              markup=False)
    raise typer.Exit(1)


class ExportTarget(str, Enum):
    MLFLOW = "mlflow"
    CSV = "csv"
    PARQUET = "parquet"


@app.command()
@friendly
def export(
    experiment: Annotated[str, typer.Argument(help="experiment id, id prefix or name")],
    to: Annotated[ExportTarget, typer.Option(
        "--to", help="mlflow: a run per attempt and per arm, the paper as an artifact; csv, parquet: every"
                     " streamed metric point, one row each")],
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's default store)")]
    = None,
    mlflow_experiment: Annotated[str | None, typer.Option(
        "--mlflow-experiment", help="MLflow experiment to write into (default: the experiment's name)")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="delete an earlier export of this experiment from that MLflow experiment first")] = False,
    out_file: Annotated[Path | None, typer.Option(
        "--out", help="csv/parquet: the file to write (default: series.csv or series.parquet in the report folder)")]
    = None,
) -> None:
    """Hand an experiment to other tools: MLflow runs, or its metric series as CSV or Parquet."""
    ledger = _ledger()
    exp = ledger.find_experiment(experiment)
    if to is ExportTarget.MLFLOW:
        if out_file is not None:
            raise UsageError("--out is for --to csv or parquet", hint="MLflow's store is set with --tracking-uri")
        _export_mlflow(ledger, exp.id, tracking_uri, mlflow_experiment, replace)
        return
    if tracking_uri is not None or mlflow_experiment is not None or replace:
        raise UsageError("--tracking-uri, --mlflow-experiment and --replace are for --to mlflow",
                         hint=f"ratiocinator export {experiment} --to {to.value} [--out FILE]")
    from ratiocinator.export.series import write_series_csv, write_series_parquet

    path = out_file or Paths(state.home).report(exp.id) / f"series.{to.value}"
    write = write_series_csv if to is ExportTarget.CSV else write_series_parquet
    points = write(ledger, exp.id, path)
    out.print(f"{path}: {points} metric points of {exp.id}, one row each", markup=False)


def _export_mlflow(ledger: Ledger, experiment_id: str, tracking_uri: str | None, name: str | None,
                   replace: bool) -> None:
    from ratiocinator.export.mlflow_export import export_mlflow
    from ratiocinator.extras import require
    from ratiocinator.report.publish import write_report

    require("mlflow", extra="mlflow", purpose="export --to mlflow")  # before a paper is written for it
    report_dir = Paths(state.home).report(experiment_id)
    if not (report_dir / "paper.html").exists():
        out.print(f"no paper yet; written to {write_report(ledger, experiment_id, report_dir).dir}", markup=False)
    done = export_mlflow(ledger, experiment_id, tracking_uri=tracking_uri, experiment_name=name,
                         report_dir=report_dir, replace=replace)
    replaced = f" (an earlier export's {done.replaced} runs deleted)" if done.replaced else ""
    out.print(f"exported {experiment_id} to MLflow experiment '{done.experiment_name}' (id {done.mlflow_experiment_id})"
              f" at {done.tracking_uri}{replaced}", markup=False)
    out.print(f"  1 experiment run ({done.experiment_run_id}), {done.arm_runs} arm runs, {done.attempt_runs} attempt"
              f" runs, {done.points} metric points; artifacts: {len(done.artifacts)} files (the paper under report/)",
              markup=False)
    for original, renamed in done.renamed_metrics.items():
        out.print(f"  metric '{original}' is '{renamed}' in MLflow (a name MLflow accepts)", markup=False)
    out.print(f"  browse it: mlflow ui --backend-store-uri {done.tracking_uri}", markup=False)


def _ledger_for(recorded: dict) -> Ledger:
    """The --home ledger if it holds the experiment (or session), else the ledger the report was written from."""
    from ratiocinator.autoresearch.session_report import SESSION_KEY
    from ratiocinator.autoresearch.store import Store
    from ratiocinator.store.ledger import Ledger

    candidates = [Paths(state.home).ledger]
    if recorded.get("ledger"):
        candidates.append(Path(recorded["ledger"]))
    tag = recorded.get(SESSION_KEY)
    for path in candidates:
        if path.exists():
            ledger = Ledger(path)
            if (Store(ledger).session_by_tag(tag) is not None if tag is not None
                    else ledger.has_experiment(recorded["experiment_id"])):
                return ledger
            ledger.close()
    what = f"autoresearch session {tag}" if tag is not None else f"experiment {recorded['experiment_id']}"
    raise UsageError(f"no ledger holds {what} (looked in {', '.join(map(str, candidates))})",
                     hint="pass --home with the directory it ran in")


@app.command()
@friendly
def compare(
    a: Annotated[str, typer.Argument(help="experiment A (id, id prefix or name)")],
    b: Annotated[str, typer.Argument(help="experiment B, compared against A")],
    metric: Annotated[str | None, typer.Option(
        "--metric", help="metric to compare (default: the shared goal metric)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    wide: WideOption = False,
) -> None:
    """Two experiments' arms side by side: n, mean, 95% CI, and B − A with Welch/Holm."""
    from ratiocinator.report.compare import compare_experiments, comparison_json

    result = compare_experiments(_ledger(), a, b, metric=metric)
    if as_json:
        out.print_json(json.dumps(comparison_json(result)))
        for warning in result.warnings:
            err.print(f"warning: {warning}", markup=False)
        return
    direction = "higher" if result.maximize else "lower"

    def pairs_table(label: Callable[[str], str]) -> Table:
        table = Table(title=f"{result.metric} ({direction} is better): A = {result.a}, B = {result.b}")
        columns = ("arm", "A n", "A mean [95% CI]", "B n", "B mean [95% CI]", "B − A [95% CI]", "p (Holm)", "g",
                   "verdict")
        for column in columns:
            table.add_column(column, overflow="fold")  # a number cut to "[0.519…" misleads as much as a name
        for pair in result.pairs:
            c = pair.comparison
            table.add_row(
                escape(label(pair.arm)), _n(pair.a), _mean_ci(pair.a), _n(pair.b), _mean_ci(pair.b),
                "—" if c is None or c.diff is None
                else f"{c.diff:.4g} " + (f"[{c.diff_ci.low:.4g}, {c.diff_ci.high:.4g}]" if c.diff_ci else ""),
                "—" if pair.p_holm is None else f"{pair.p_holm:.3g}",
                "—" if c is None or c.hedges_g is None else f"{c.hedges_g:.3g}",
                pair.verdict,
            )
        return table

    print_fitted(out, pairs_table, [pair.arm for pair in result.pairs], wide=wide)
    for warning in result.warnings:
        err.print(f"warning: {warning}", markup=False)


@app.command()
@friendly
def dashboard(
    home: Annotated[Path | None, typer.Option(
        "--home", help="the home to watch (default: the global --home)")] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="port on 127.0.0.1 (0: any free one)")] = 8750,
) -> None:
    """The live web dashboard over the ledger, on 127.0.0.1 (read-only: safe while experiments run)."""
    from ratiocinator.dashboard.server import serve

    serve(home or state.home, port, on_ready=lambda url: out.print(f"dashboard: {url}  (Ctrl-C stops it)",
                                                                   markup=False))


def _n(goal: Any) -> str:
    return "—" if goal is None else str(goal.describe.n)


def _mean_ci(goal: Any) -> str:
    if goal is None or goal.describe.mean is None:
        return "—"
    d = goal.describe
    return f"{d.mean:.4g}" + (f" [{d.ci.low:.4g}, {d.ci.high:.4g}]" if d.ci else "")


def _ledger() -> Ledger:
    from ratiocinator.store.ledger import Ledger

    path = Paths(state.home).ledger
    if not path.exists():
        raise no_ledger(path)
    return Ledger(path)


def _goal(spec_text: str) -> str | None:
    import yaml

    from ratiocinator.spec.source import load_stored

    try:
        data = load_stored(spec_text)
    except yaml.YAMLError:
        return None
    return data.get("goal_metric") if isinstance(data, dict) else None


def _print_live_instances(ledger: Ledger) -> int:
    """Rented instances still alive per the ledger, with age and cost so far; how many."""
    from ratiocinator.store import instances as inst

    live = inst.rows(ledger, live=True)
    now = time.time()
    for row in live:
        age = now - row.created_at
        out.print(f"instance {row.id}  {row.provider}:{row.provider_id or '?'}  {row.gpu_name or '?'}  ${row.dph:g}/h"
                  f"  {row.state}  age {age / 60:.1f} min  ~${row.dph * age / 3600:.4f} so far"
                  f"  deadline {time.strftime('%H:%M:%S', time.localtime(row.deadline)) if row.deadline else '-'}"
                  f"  for {inst.owner(row)}",
                  markup=False)
    return len(live)


def _print_left_alone(left: list[Any]) -> None:
    """Instances the reaper would not touch (another home's label), named so the user can act."""
    if not left:
        return
    table = Table(title=f"left alone: {len(left)} instance(s) that may be another Ratiocinator home's",
                  title_justify="left", box=None, pad_edge=False)
    for column in ("provider id", "label", "state", "$/h"):  # never cut: they are what the user acts on
        table.add_column(column, no_wrap=True)
    table.add_column("why", overflow="fold")
    for r in left:
        table.add_row(r.provider_id, r.label, r.status, "?" if r.dph is None else f"{r.dph:g}", r.detail)
    out.print(table)
    out.print("they may be another user's or project's; `ratiocinator instances --reap --all-homes` destroys them too",
              markup=False)


@app.command("instances")
@friendly
def instances_cmd(
    reap: Annotated[bool, typer.Option(
        "--reap", help="destroy what this home rented that may be live: its live rows, and listed instances"
                       " with its label whose row is closed or missing")] = False,
    all_homes: Annotated[bool, typer.Option(
        "--all-homes", help="with --reap: also destroy instances labelled by other Ratiocinator homes")] = False,
    reconcile: Annotated[bool, typer.Option(
        "--reconcile", help="replace ended instances' lifetime × price estimates by the provider's charges,"
                            " once listed")] = False,
) -> None:
    """Rented instances the ledger knows are live, with age and cost so far; --reap destroys this home's;
    --reconcile records what the provider billed for those that ended."""
    from ratiocinator.backends.registry import instance_provider

    if all_homes and not reap:
        raise UsageError("--all-homes widens --reap", hint="ratiocinator instances --reap --all-homes")
    ledger = _ledger()
    if not _print_live_instances(ledger):
        out.print("no live instances")
    if not (reap or reconcile):
        return
    reaper = instance_provider()  # the provider's client (the `vast` extra) only to act on what is listed
    api = reaper.api_from_env()
    if reap:
        results = reaper.reap(ledger, api, all_homes=all_homes)
        for r in results:
            if r.outcome != "left_alone":
                label = f" {r.label}" if r.label else ""
                out.print(f"{r.provider_id or '-'}: {r.outcome}{label} ({r.detail})", markup=False)
        _print_left_alone([r for r in results if r.outcome == "left_alone"])
        if any(r.outcome == "error" for r in results):
            raise typer.Exit(1)
    if reconcile:
        try:
            fixed = reaper.reconcile_billing(ledger, api)
        except reaper.BillingUnavailable as exc:
            raise BackendError(f"the provider's charges could not be read: {exc}",
                             hint="costs keep their lifetime × price estimate; run --reconcile again later") from None
        for r in fixed:
            out.print(f"{r.provider_id}: ${r.estimated:.4f} (lifetime × price) → ${r.billed:.4f} billed"
                      f" ({r.experiment_id or 'no experiment'})", markup=False)
        if not fixed:
            out.print("nothing to reconcile: every ended instance's cost is billed, or its charges are not listed yet")
        else:
            out.print("`ratiocinator report EXP` rewrites a paper with the billed costs")


# -- autoresearch: the keep/discard loop over an agent's code edits --------------------

ProgramArg = Annotated[Path, typer.Argument(help="autoresearch program (YAML)", show_default=False)]


@app.command()
@friendly
def autoresearch(
    program: ProgramArg,
    max_iterations: Annotated[int | None, typer.Option(
        "--max-iterations", min=0, help="stop after this many agent attempts in all (overrides the program)")] = None,
) -> None:
    """Edit, check, commit, run, keep or discard — until stopped; the same command resumes."""
    from ratiocinator.autoresearch import AutoResearch, load_program

    loaded = load_program(program)
    outcome = AutoResearch(loaded, state.home, max_iterations=max_iterations,
                           echo=lambda line: out.print(line, markup=False)).run()
    best = "" if outcome.best_metric is None else (f"; best {loaded.program.metric.name} {outcome.best_metric:.6f}"
                                                   f" at {(outcome.best_commit or '')[:7]}")
    out.print(f"autoresearch {outcome.tag}: {outcome.status} — {outcome.reason}{best}", markup=False)
    from ratiocinator.report.publish import build_pdf

    tex = outcome.report_dir / "report.tex"
    pdf, note = build_pdf(tex) if tex.exists() else (None, "no report was written")
    out.print(f"report: {outcome.report_dir / 'report.html'} (report.md, report.tex, results.tsv, progress.png"
              f" beside it); check with `ratiocinator verify {outcome.report_dir}`", markup=False)
    out.print(f"        {pdf}" if pdf else f"        ({note})", markup=False)
    raise typer.Exit(outcome.exit_code)


@app.command("autoresearch-log")
@friendly
def autoresearch_log(
    program: ProgramArg,
    as_json: Annotated[bool, typer.Option("--json", help="every attempt as JSON, diffs included")] = False,
    apply: Annotated[int | None, typer.Option(
        "--apply", metavar="ATTEMPT", help="recreate this attempt id as a new branch")] = None,
    branch: Annotated[str | None, typer.Option("--branch", help="name of the branch --apply creates")] = None,
) -> None:
    """Every attempt of a session from the ledger; --apply ID --branch NAME recreates any of them."""
    from ratiocinator.autoresearch import load_program
    from ratiocinator.autoresearch.log import apply_attempt, open_session, session_record

    loaded = load_program(program)
    if (apply is None) != (branch is None):
        raise UsageError("--apply and --branch go together: --apply ATTEMPT_ID --branch NEW_BRANCH")
    store, session = open_session(loaded, state.home)
    try:
        if apply is not None and branch is not None:
            commit = apply_attempt(store, session, apply, branch)
            out.print(f"branch {branch} at {commit[:12]}: attempt {apply} applied to its parent", markup=False)
            return
        attempts = store.attempts(session.id)
        if as_json:
            print(json.dumps(session_record(session, attempts, store), indent=2))
            return
        name = loaded.program.metric.name
        table = Table(title=f"autoresearch {session.tag} ({session.status}) on {session.branch}", title_justify="left",
                      box=None, pad_edge=False)
        for column in ("id", "#", "worker", "status", name, "commit", "hypothesis"):
            table.add_column(column)
        for a in attempts:
            table.add_row(str(a.id), str(a.iteration), str(a.worker), a.status,
                          "" if a.metric is None else f"{a.metric:.6f}",
                          (a.commit_sha or "")[:7], escape("baseline" if a.is_baseline else a.hypothesis))
        out.print(table)
    finally:
        store.close()


def _tolerate_narrow_encodings() -> None:
    """On a terminal or pipe whose encoding lacks a character we print (an ASCII-only ``PYTHONIOENCODING``,
    a Latin-1 locale), that character shows as ``?`` instead of a traceback after a finished study."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            try:
                "—…→×✓".encode(stream.encoding)
            except (UnicodeEncodeError, LookupError):
                stream.reconfigure(errors="replace")


def main() -> None:
    _tolerate_narrow_encodings()
    try:
        app()
    finally:
        # Everything the command made is written and closed by now. Interpreter shutdown would walk every
        # object left (a report's matplotlib and scipy: ~100k) in several collections, ~0.15 s for
        # nothing; frozen objects are skipped, and the memory goes back to the system with the process.
        gc.freeze()
