"""Orchestrator overhead, measured side by side in one run.

1. 200 no-op arms through the local backend's executor against the same 200 runner
   invocations through `xargs -P` at the same concurrency. Prints the wall-clock ratio
   (target ≤ 1.15).
2. One runner printing 1,000,000 metric lines, under each of the json_line (`METRICS:`
   lines) and key_value (`loss: 0.5` lines) protocols: orchestrator wall time relative to
   the same runner writing to /dev/null (target ≤ 1.5), and the orchestrator's peak RSS
   (target: bounded, under 200 MB); median of --rounds alternating rounds.
3. End to end (bench/end_to_end.py): the whole `ratiocinator research` command on the
   peers' workload against `xargs -P` at concurrency 2 and 8, with its phases (start-up,
   runs, report) and the report of 200 arms timed alone; Optuna and Hydra when installed.

Usage: python bench/overhead.py [--arms 200] [--concurrency 2] [--lines 1000000] [--no-noop] [--no-end-to-end]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ratiocinator.backends.base import Workspace
from ratiocinator.backends.local import LocalBackend
from ratiocinator.execution.contract import runner_argv
from ratiocinator.execution.executor import Executor
from ratiocinator.planning.plan import plan_iteration
from ratiocinator.spec.models import load_spec
from ratiocinator.store.budget import Budget
from ratiocinator.store.ledger import Ledger

NOOP_RUNNER = '#!/usr/bin/env bash\necho "METRICS: {\\"score\\": ${K:-0}}"\n'
CHATTY_RUNNER = """#!/usr/bin/env python3
import os, sys
n = int(os.environ.get("LINES", "1000000"))
out = sys.stdout
for i in range(n):
    out.write('METRICS: {"step": %d, "loss": %.6f}\\n' % (i, 1.0 / (i + 1)))
out.write('METRICS: {"score": 1.0}\\n')
out.flush()
"""
CHATTY_KEY_VALUE_RUNNER = """#!/usr/bin/env python3
import os, sys
n = int(os.environ.get("LINES", "1000000"))
out = sys.stdout
for i in range(n):
    out.write('loss: %.6f\\n' % (1.0 / (i + 1)))
out.write('score: 1.0\\n')
out.flush()
"""
CHATTY_RUNNERS = {"json_line": CHATTY_RUNNER, "key_value": CHATTY_KEY_VALUE_RUNNER}


def make_repo(root: Path, script: str) -> Path:
    repo = root / "repo"
    repo.mkdir()
    (repo / "run.sh").write_text(script)
    (repo / "run.sh").chmod(0o755)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@x", "GIT_CONFIG_GLOBAL": os.devnull}
    for args in (["init", "-q", "--initial-branch=main"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    return repo


def write_spec(root: Path, repo: Path, factors: dict[str, list[int]], concurrency: int, timeout_s: float = 600,
               protocol: str = "json_line") -> Path:
    spec = root / "bench.yaml"
    lines = [
        "name: bench", "topic: orchestrator overhead", "goal_metric: score", "maximize: true",
        f"repo_url: {repo}", "repo_branch: main", "runner_script: run.sh", "replicates: 1",
        f"concurrency: {concurrency}", f"train_timeout_s: {timeout_s}", f"metrics: {{protocol: {protocol}}}",
        "factors:",
    ]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in factors.items()]
    spec.write_text("\n".join(lines) + "\n")
    return spec


async def run_executor(spec_path: Path, home: Path, goal: str = "score") -> tuple[float, int]:
    """Time only the execution phase: runs through the local backend into a real ledger."""
    loaded = load_spec(spec_path)
    if goal != loaded.spec.goal_metric:
        raise SystemExit("bench spec mismatch")
    plan = plan_iteration(loaded)
    backend = LocalBackend(home)
    ledger = Ledger(home / "ledger.db")
    exp = ledger.create_experiment(id="bench", name="bench", spec_path=str(spec_path), spec_text=loaded.text,
                                   spec_sha256=loaded.sha256, backend="local")
    host = await backend.acquire(loaded)
    workspace = Workspace(checkout=Path(loaded.spec.repo_url), env={})
    ledger.record_arms(exp.id, 1, plan.arms, plan.baseline)
    executor = Executor(
        ledger=ledger, backend=backend, host=host, workspace=workspace, loaded=loaded, plan=plan,
        experiment_id=exp.id, commit="0" * 40, arm_ids={a.name: a.id for a in ledger.arms(exp.id)},
        argv=runner_argv(workspace.checkout, loaded.spec.runner_script, "python3"), runs_dir=home / "runs",
        budget=Budget(ledger, exp.id, 0.0),
    )
    started = time.perf_counter()
    summary = await executor.run(plan.runs())
    elapsed = time.perf_counter() - started
    ok = sum(r.status == "succeeded" for r in summary.results)
    ledger.close()
    return elapsed, ok


def xargs_time(repo: Path, arms: int, concurrency: int) -> float:
    """The same runner, `arms` times, through xargs -P with the knob set per invocation."""
    started = time.perf_counter()
    subprocess.run(
        ["xargs", "-P", str(concurrency), "-I{}", "env", "K={}", str(repo / "run.sh")],
        input="\n".join(str(i) for i in range(arms)) + "\n", text=True, stdout=subprocess.DEVNULL, check=True, cwd=repo,
    )
    return time.perf_counter() - started


def bench_noop(arms: int, concurrency: int, rounds: int) -> None:
    ours, theirs = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            repo = make_repo(root, NOOP_RUNNER)
            spec = write_spec(root, repo, {"K": list(range(arms))}, concurrency)
            theirs.append(xargs_time(repo, arms, concurrency))
            elapsed, ok = asyncio.run(run_executor(spec, root / "home"))
            if ok != arms:
                raise SystemExit(f"only {ok} of {arms} no-op runs succeeded")
            ours.append(elapsed)
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"no-op arms: {arms} runs at concurrency {concurrency}, median of {rounds} alternating rounds")
    print(f"  xargs -P {concurrency}:          {t:7.3f} s")
    print(f"  ratiocinator executor: {o:7.3f} s   ({o / arms * 1000:.2f} ms per run incl. ledger)")
    print(f"  ratio: {o / t:.3f}  (target ≤ 1.15)")


def chatty_child(lines: int, protocol: str) -> None:
    """Run in a fresh process so ru_maxrss is the orchestrator's own peak."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        repo = make_repo(root, CHATTY_RUNNERS[protocol])
        spec = write_spec(root, repo, {"LINES": [lines]}, 1, protocol=protocol)
        elapsed, ok = asyncio.run(run_executor(spec, root / "home", goal="score"))
        points = Ledger(root / "home" / "ledger.db").db.execute("SELECT SUM(n) FROM metric_chunks").fetchone()[0]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"elapsed": elapsed, "peak_mb": peak_mb, "points": points, "ok": ok}))


def runner_alone(lines: int, protocol: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repo(Path(tmp), CHATTY_RUNNERS[protocol])
        started = time.perf_counter()
        subprocess.run([str(repo / "run.sh")], env={**os.environ, "LINES": str(lines)}, stdout=subprocess.DEVNULL,
                       check=True)
        return time.perf_counter() - started


def runner_orchestrated(lines: int, protocol: str) -> dict[str, float]:
    child = subprocess.run([sys.executable, __file__, "--chatty-child", str(lines), "--chatty-protocol", protocol],
                           capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(child.stdout.strip().splitlines()[-1])
    if result["ok"] != 1 or result["points"] != lines + 1:
        raise SystemExit(f"{protocol}: the chatty run did not succeed with every point: {result}")
    return result


def bench_chatty(lines: int, rounds: int) -> None:
    protocols = tuple(CHATTY_RUNNERS)
    alone: dict[str, list[float]] = {p: [] for p in protocols}
    ours: dict[str, list[dict[str, float]]] = {p: [] for p in protocols}
    for _ in range(rounds):  # A B A B: the box's load falls on both sides alike
        for protocol in protocols:
            alone[protocol].append(runner_alone(lines, protocol))
            ours[protocol].append(runner_orchestrated(lines, protocol))

    def row(label: str, cell: Callable[[str], str], note: str = "") -> None:
        print(f"  {label:<26}" + "".join(f"{cell(p):>14}" for p in protocols) + note)

    t = {p: statistics.median(alone[p]) for p in protocols}
    o = {p: statistics.median(r["elapsed"] for r in ours[p]) for p in protocols}
    print(f"chatty runner: {lines:,} metric lines, median of {rounds} alternating rounds")
    row("", lambda p: p)
    row("runner → /dev/null:", lambda p: f"{t[p]:.3f} s")
    row("runner → orchestrator:", lambda p: f"{o[p]:.3f} s")
    row("points in the ledger:", lambda p: f"{int(ours[p][-1]['points']):,}")
    row("ratio:", lambda p: f"{o[p] / t[p]:.2f}", "  (target ≤ 1.5)")
    row("  each round:", lambda p: " " + " ".join(f"{r['elapsed'] / a:.2f}"
                                                  for r, a in zip(ours[p], alone[p], strict=True)))
    row("orchestrator peak RSS:", lambda p: f"{max(r['peak_mb'] for r in ours[p]):.0f} MB", "  (target < 200 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the whole research command (bench/end_to_end.py)")
    parser.add_argument("--noop", action=argparse.BooleanOptionalAction, default=True,
                        help="time the no-op arms against xargs -P")
    parser.add_argument("--chatty-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chatty-protocol", default="json_line", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chatty_child:
        chatty_child(args.chatty_child, args.chatty_protocol)
        return
    if shutil.which("xargs") is None:
        raise SystemExit("xargs is needed for the side-by-side comparison")
    if args.noop:
        bench_noop(args.arms, args.concurrency, args.rounds)
    bench_chatty(args.lines, args.rounds)
    if args.end_to_end:
        from end_to_end import main as end_to_end  # this script's own folder is on sys.path

        end_to_end(args.arms, (args.concurrency, 8) if args.concurrency != 8 else (8,), args.rounds)


if __name__ == "__main__":
    main()
