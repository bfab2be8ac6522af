"""Report generation time on a large ledger, printed beside the time to read that ledger alone.

The issue's target: a ledger of 10,000 runs x 100 metric points gets its report in
under 10 s. This benchmark measures, side by side in one process:

1. read ledger alone: everything the report needs from the ledger -- the experiment,
   its arms, runs, final metrics (``run_metrics``) and every run's series of the goal
   metric (``Ledger.series`` per run). That is the I/O floor no report can beat. (The
   report itself reads the series of at most the 8 arms the curve figure draws, so
   this floor is generous: it covers all 10,000 series, not ~800.)
2. report, no PDF: ``write_report(..., pdf=False)`` into a fresh temp dir: the
   statistics, the figures, the three documents, facts.json and the exports.
3. report with PDF: the same plus two ``pdflatex`` passes, only when ``pdflatex`` is
   on PATH.

The ledger is one experiment of succeeded runs over a full factorial grid of two
factors (``--arms-per-factor`` levels each: 10 x 10 = 100 arms, 100 replicates each
at the defaults), so the factor analysis, ANOVA, bootstrap intervals (n >= 10),
baseline comparisons and every figure do real work. One factor has a planted effect,
the other none. It is filled through the ledger's own write methods (create_experiment,
record_arms, start_run, add_points, finish_run), exactly as the pipeline records runs.

Building takes a while, so the ledger is built once in a child process (so it does not
count toward the measuring process's peak RSS) and cached under the system temp dir,
keyed by the parameters and the ledger schema version; ``--rebuild`` forces a fresh one.
The build time is printed separately and never mixed into the measured numbers.

Each measurement is repeated ``--repeat`` times in alternating rounds and the median
printed. Like every benchmark here it prints measured numbers and ratios and never
asserts on them: a missed target prints "target MISSED" and still exits 0.

Usage: python bench/report.py [--runs 10000] [--points 100] [--arms-per-factor 10] [--repeat 3] [--rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from ratiocinator.execution.metrics import MetricPoint
from ratiocinator.planning.plan import PlannedArm, factor_arm_name
from ratiocinator.report.publish import LATEX_ENGINE, write_report
from ratiocinator.store.ledger import SCHEMA_VERSION, Ledger

TARGET_S = 10.0
EXPERIMENT = "bench-report"
GOAL = "acc"
BUILD_FORMAT = 1  # bump when the planted ledger's layout changes, so old caches are not reused
FACTOR_A, FACTOR_B = "LR", "WIDTH"


def levels(n: int) -> tuple[list[str], list[str]]:
    """Level names of the two factors: a learning-rate-like one (effect) and a width-like one (null)."""
    return [f"{0.001 * 2 ** i:g}" for i in range(n)], [str(8 * (i + 1)) for i in range(n)]


def spec_text(a_levels: list[str], b_levels: list[str], replicates: int) -> str:
    return yaml.safe_dump({
        "name": "bench-report",
        "topic": "How do learning rate and width affect a tiny MLP's accuracy?",
        "goal_metric": GOAL,
        "maximize": True,
        "repo_url": "https://example.org/tiny-mlp.git",
        "repo_branch": "main",
        "runner_script": "train.py",
        "paper_title": "Report Benchmark: A Large Factorial Ledger",
        "replicates": replicates,
        "max_dollars": 1000,
        "train_timeout_s": 600,
        "hardware": {"gpu": "RTX 4090", "num_gpus": 1, "price_per_hour": 0.5},
        "factors": {FACTOR_A: [float(v) for v in a_levels], FACTOR_B: [int(v) for v in b_levels]},
        "baseline": {FACTOR_A: float(a_levels[0]), FACTOR_B: int(b_levels[0])},
    }, sort_keys=False)


def cache_dir(runs: int, points: int, per_factor: int) -> Path:
    key = f"f{BUILD_FORMAT}-s{SCHEMA_VERSION}-r{runs}-p{points}-a{per_factor}"
    return Path(tempfile.gettempdir()) / "ratiocinator-bench-report" / key


def build_ledger(home: Path, runs: int, points: int, per_factor: int) -> None:
    """Fill ``home/ledger.db`` through the ledger's own write methods; one run at a time, as the executor does."""
    a_levels, b_levels = levels(per_factor)
    arms = [PlannedArm(name=factor_arm_name({FACTOR_A: a, FACTOR_B: b}), env={FACTOR_A: a, FACTOR_B: b},
                       factors={FACTOR_A: a, FACTOR_B: b})
            for a, b in itertools.product(a_levels, b_levels)]
    replicates = max(1, runs // len(arms))
    text = spec_text(a_levels, b_levels, replicates)
    ledger = Ledger(home / "ledger.db")
    ledger.create_experiment(id=EXPERIMENT, name="bench-report", spec_path="bench-report.yaml", spec_text=text,
                             spec_sha256=hashlib.sha256(text.encode()).hexdigest(), backend="local")
    ledger.update_experiment(EXPERIMENT, commit_sha="c0ffee1234", status="completed")
    ledger.record_arms(EXPERIMENT, 1, arms, baseline=arms[0].name)
    ledger.event(EXPERIMENT, "host", "host probed", name="bench-box", cpus=16, gpus=["NVIDIA RTX 4090"], ram_gb=125.5)
    arm_ids = {a.name: a.id for a in ledger.arms(EXPERIMENT)}

    rng = np.random.default_rng(20240601)
    steps = np.arange(points) * 10
    shape = 1.0 - np.exp(-np.linspace(0.0, 5.0, points))  # a saturating learning curve from 0 to ~1
    for i in range(runs):
        arm = arms[i % len(arms)]
        replicate = i // len(arms)
        a_index = a_levels.index(arm.factors[FACTOR_A])
        final = 0.80 + 0.01 * a_index + 0.01 * rng.standard_normal()  # LR matters, WIDTH does not
        curve = 0.1 + (final - 0.1) * shape + 0.005 * rng.standard_normal(points)
        curve[-1] = final
        run_id = ledger.start_run(
            experiment_id=EXPERIMENT, arm_id=arm_ids[arm.name], replicate=replicate, seed=replicate, host="localhost",
            slot=f"slot{i % 2}", commit_sha="c0ffee1234", env=dict(arm.env), argv=["python", "/ck/train.py"],
            run_root=home / "runs",
        )
        ledger.add_points(run_id, [MetricPoint(name=GOAL, value=float(v), step=int(s), seq=k)
                                   for k, (s, v) in enumerate(zip(steps, curve, strict=True))])
        ledger.finish_run(run_id, status="succeeded", failure=None, reason="", exit_code=0, signal=None,
                          final={GOAL: float(final)}, counts={GOAL: points}, cost=0.01,
                          ended_at=time.time() + 60.0 + 30.0 * rng.random())
    ledger.close()


def ensure_ledger(runs: int, points: int, per_factor: int, rebuild: bool) -> tuple[Path, float, bool]:
    """(ledger path, build seconds, whether it was built now); the build runs in a child process."""
    home = cache_dir(runs, points, per_factor)
    done = home / "built.json"
    if done.exists() and not rebuild:
        return home / "ledger.db", json.loads(done.read_text())["build_s"], False
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--build-child", str(home), "--runs", str(runs), "--points", str(points),
                    "--arms-per-factor", str(per_factor)], check=True)
    build_s = time.perf_counter() - started
    done.write_text(json.dumps({"build_s": build_s}) + "\n")
    return home / "ledger.db", build_s, True


def read_everything(ledger: Ledger) -> int:
    """What the report needs from the ledger, read through its public API; returns the points read."""
    experiment = ledger.experiment(EXPERIMENT)
    ledger.arms(experiment.id)
    runs = ledger.runs(experiment.id)
    ledger.run_metrics(experiment.id)
    ledger.events(experiment.id)
    ledger.money(experiment.id)
    return sum(ledger.series(r.id, GOAL)[2].size for r in runs)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def verdict(seconds: float) -> str:
    return f"target met (< {TARGET_S:g} s)" if seconds < TARGET_S else f"target MISSED (≥ {TARGET_S:g} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--arms-per-factor", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached ledger")
    parser.add_argument("--build-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.runs, args.points, args.arms_per_factor, args.repeat) < 1:
        parser.error("--runs, --points, --arms-per-factor and --repeat must be at least 1")
    if args.build_child:
        build_ledger(Path(args.build_child), args.runs, args.points, args.arms_per_factor)
        return

    path, build_s, built_now = ensure_ledger(args.runs, args.points, args.arms_per_factor, args.rebuild)
    ledger = Ledger(path)
    n_arms = len(ledger.arms(EXPERIMENT))
    n_runs = len(ledger.runs(EXPERIMENT))
    size_mb = sum(p.stat().st_size for p in path.parent.glob("ledger.db*")) / 1e6
    print(f"ledger: {n_runs:,} succeeded runs x {args.points} points of '{GOAL}', {n_arms} arms "
          f"({args.arms_per_factor}x{args.arms_per_factor} grid), {size_mb:.1f} MB")
    print(f"  {'built' if built_now else 'cached'} at {path}")
    print(f"  build time: {build_s:.1f} s{'' if built_now else ' (when it was built; pass --rebuild to rebuild)'}")

    pdf_engine = shutil.which(LATEX_ENGINE)
    reads: list[float] = []
    plain: list[float] = []
    with_pdf: list[float] = []
    rss_after_read = 0.0
    n_points = 0
    files = None
    pdf_note = ""
    with tempfile.TemporaryDirectory(prefix="ratiocinator-bench-report-") as tmp:
        for round_ in range(args.repeat):  # alternating rounds, so drift hits every measurement alike
            seconds, n_points = timed(read_everything, ledger)
            reads.append(seconds)
            if round_ == 0:
                rss_after_read = rss_mb()
            out = Path(tmp) / f"plain-{round_}"
            seconds, files = timed(write_report, ledger, EXPERIMENT, out, pdf=False)
            plain.append(seconds)
            if pdf_engine:
                seconds, pdf_files = timed(write_report, ledger, EXPERIMENT, Path(tmp) / f"pdf-{round_}", pdf=True)
                with_pdf.append(seconds)
                pdf_note = pdf_files.pdf_note
        assert files is not None
        sizes = {p.name: p.stat().st_size for p in (files.md, files.html, files.tex)}
        figures = sorted(p.name for p in files.dir.glob("fig_*.png"))
        n_facts = files.n_facts
    rss_end = rss_mb()
    ledger.close()

    read = statistics.median(reads)
    report = statistics.median(plain)
    print(f"\nmedian of {args.repeat} alternating rounds, one process")
    print(f"  read ledger alone:  {read:7.3f} s   ({n_runs:,} runs, {n_points:,} points; "
          f"all: {', '.join(f'{s:.3f}' for s in reads)})")
    print(f"  report, no PDF:     {report:7.3f} s   (all: {', '.join(f'{s:.3f}' for s in plain)})")
    print(f"    ratio report/read: {report / read:.1f}   {verdict(report)}")
    if pdf_engine:
        pdf = statistics.median(with_pdf)
        print(f"  report with PDF:    {pdf:7.3f} s   (all: {', '.join(f'{s:.3f}' for s in with_pdf)}; {pdf_note})")
        print(f"    ratio report/read: {pdf / read:.1f}   {verdict(pdf)}")
    else:
        print(f"  report with PDF:    skipped ({LATEX_ENGINE} is not on PATH)")
    print(f"\npeak RSS: {rss_after_read:.0f} MB after the first read, {rss_end:.0f} MB after all reports")
    print("report: " + ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in sizes.items())
          + f"; {n_facts:,} facts; figures: {', '.join(figures) or 'none'}")


if __name__ == "__main__":
    main()
