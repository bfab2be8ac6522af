"""The whole ``ratiocinator research`` command on the peers' workload, against ``xargs -P``.

Each arm is a fresh ``python noop_arm.py`` that prints one metrics line. Every tool uses the
same interpreter (this one), the readiness review is skipped, and each round alternates the
tools (A B A B) so a busy machine slows them alike: only the ratios are meant to be compared.

Phases of the research command come from the ledger's own clock: start-up is the command's
start to the first run's start, the run phase the first run's start to the last run's end,
the report the last run's end to the command's exit. Each round's home is fresh, so that
start-up includes cloning the repository; a second, two-arm study of the same commit in the
same home then gives the start-up with the workspace cached. The report for the same study is then
also timed alone without the PDF (``ratiocinator report --no-pdf``), and a second time with
the PDF when pdflatex is installed (nothing changed, so that build can be skipped).
``validate`` and ``status`` are timed beside the bare interpreter starting.

Optuna (in-memory storage) and Hydra (joblib launcher) run the same arms when they are
installed; they are optional peers, never installed by the project's test extra. A bare asyncio
driver (each arm spawned with its pipes and read to its end, nothing kept) always runs too: the
floor of any orchestrator built on an asyncio event loop.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

NOOP_ARM = 'import os\nprint(\'METRICS: {"score": %s}\' % os.environ.get("K", "0"), flush=True)\n'

OPTUNA_DRIVER = """
import os, subprocess, sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
arms, jobs, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def objective(trial):
    k = trial.suggest_int("K", 0, arms - 1)
    out = subprocess.run([sys.executable, script], env={**os.environ, "K": str(k)}, capture_output=True,
                         text=True, check=True).stdout
    return float(out.split("METRICS:")[1].split(":")[1].strip(" }\\n"))
study = optuna.create_study(sampler=optuna.samplers.GridSampler({"K": list(range(arms))}))
study.optimize(objective, n_trials=arms, n_jobs=jobs)
"""

# The floor of any asyncio orchestrator: each arm spawned with its pipes and read to the end; nothing is kept.
ASYNCIO_DRIVER = """
import asyncio, os, subprocess, sys
arms, jobs, script = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
async def main():
    gate = asyncio.Semaphore(jobs)
    async def one(k):
        async with gate:
            proc = await asyncio.create_subprocess_exec(sys.executable, script, env={**os.environ, "K": str(k)},
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, _ = await proc.communicate()
            return float(out.decode().split("METRICS:")[1].split(":")[1].strip(" }\\n"))
    await asyncio.gather(*(one(k) for k in range(arms)))
asyncio.run(main())
"""

HYDRA_APP = """
import os, subprocess, sys
import hydra
from omegaconf import DictConfig
@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg: DictConfig) -> float:
    out = subprocess.run([sys.executable, os.environ["NOOP_ARM"]], env={**os.environ, "K": str(cfg.K)},
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("METRICS:")[1].split(":")[1].strip(" }\\n"))
if __name__ == "__main__":
    main()
"""


@dataclass(frozen=True)
class Phases:
    """One research command's wall time split by the ledger's timestamps."""

    total: float
    startup: float
    runs: float
    report: float


def git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "b@x", "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(["git", *args], cwd=repo, env=env, check=True)


def make_study(root: Path, arms: int, concurrency: int) -> Path:
    """A git repo holding noop_arm.py and a spec with one factor of `arms` levels."""
    repo = root / "repo"
    repo.mkdir()
    (repo / "noop_arm.py").write_text(NOOP_ARM)
    git(repo, "init", "-q", "--initial-branch=main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "noop arm")
    return write_spec(root, "noop", arms, concurrency)


def write_spec(root: Path, name: str, arms: int, concurrency: int) -> Path:
    """A spec named ``name`` for the study's repo (see `make_study`), with one factor of `arms` levels."""
    repo = root / "repo"
    spec = root / f"{name}.yaml"
    spec.write_text("\n".join([
        f"name: {name}", "topic: orchestrator overhead on no-op arms", "goal_metric: score", "maximize: true",
        f"repo_url: {repo}", "repo_branch: main", "runner_script: noop_arm.py", "replicates: 1",
        f"concurrency: {concurrency}", "train_timeout_s: 600", "max_dollars: 0.0", "max_iterations: 1",
        "metrics:", "  protocol: json_line", "  json_prefix: 'METRICS:'",
        f"factors:\n  K: [{', '.join(str(i) for i in range(arms))}]",
    ]) + "\n")
    return spec


def same_python_env() -> dict[str, str]:
    """`python` on PATH is this interpreter, so the runner's `python noop_arm.py` matches xargs'.

    Bytecode caching stays on as on a user's machine: with PYTHONDONTWRITEBYTECODE set (some CI
    images set it) every command would compile the package's sources again at each start."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def ratiocinator_cli() -> list[str]:
    return [sys.executable, "-m", "ratiocinator"]


def research(spec: Path, home: Path) -> Phases:
    env = {**same_python_env(), "RATIOCINATOR_HOME": str(home)}
    started = time.time()
    done = subprocess.run([*ratiocinator_cli(), "research", str(spec), "--skip-check", "--new"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"ratiocinator research failed ({done.returncode}):\n{done.stdout[-3000:]}")
    with sqlite3.connect(home / "ledger.db") as db:  # the experiment this command made: the last one
        first, last, ok = db.execute(
            "SELECT MIN(started_at), MAX(ended_at), SUM(status = 'succeeded') FROM runs"
            " WHERE experiment_id = (SELECT experiment_id FROM runs ORDER BY id DESC LIMIT 1)").fetchone()
    return Phases(ended - started, first - started, last - first, ended - last), int(ok)


def report_alone(home: Path, *, pdf: bool) -> float:
    env = {**same_python_env(), "RATIOCINATOR_HOME": str(home)}
    started = time.perf_counter()
    subprocess.run([*ratiocinator_cli(), "report", "noop", "--pdf" if pdf else "--no-pdf"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def xargs(repo: Path, arms: int, concurrency: int) -> float:
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", str(concurrency), "-I{}", "env", "K={}", sys.executable, str(repo / "noop_arm.py")],
                   input="".join(f"{i}\n" for i in range(arms)), text=True, stdout=subprocess.DEVNULL, check=True,
                   cwd=repo)
    return time.perf_counter() - started


def driver_time(root: Path, source: str, arms: int, concurrency: int) -> float:
    """A driver script's wall time: it is given the arm count, the concurrency and the arm's script."""
    driver = root / "driver.py"
    driver.write_text(source)
    started = time.perf_counter()
    subprocess.run([sys.executable, str(driver), str(arms), str(concurrency), str(root / "repo" / "noop_arm.py")],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def optuna_time(root: Path, arms: int, concurrency: int) -> float:
    return driver_time(root, OPTUNA_DRIVER, arms, concurrency)


def asyncio_time(root: Path, arms: int, concurrency: int) -> float:
    return driver_time(root, ASYNCIO_DRIVER, arms, concurrency)


def hydra_time(root: Path, arms: int, concurrency: int) -> float:
    app = root / "hydra_app.py"
    app.write_text(HYDRA_APP)
    env = {**os.environ, "NOOP_ARM": str(root / "repo" / "noop_arm.py")}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(app), "--multirun", f"K=range(0,{arms})", "hydra/launcher=joblib",
                    f"hydra.launcher.n_jobs={concurrency}", f"hydra.sweep.dir={root / 'hydra'}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root, env=env)
    return time.perf_counter() - started


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


@dataclass
class Result:
    concurrency: int
    xargs: float
    phases: Phases
    peers: dict[str, float]
    startup_cached: float
    report_no_pdf: float | None
    report_pdf_cached: float | None


def bench_end_to_end(arms: int, concurrency: int, rounds: int, *, time_report: bool) -> Result:
    """`rounds` alternating rounds of xargs then research (then the peers); medians of each."""
    timers = {name: timer for name, timer, present in (
        ("bare asyncio loop", asyncio_time, True),
        ("Optuna in-memory", optuna_time, installed("optuna")),
        ("Hydra joblib", hydra_time, installed("hydra", "hydra_plugins.hydra_joblib_launcher"))) if present}
    xs: list[float] = []
    ours: list[Phases] = []
    startup_cached: list[float] = []
    theirs: dict[str, list[float]] = {name: [] for name in timers}
    report_no_pdf: list[float] = []
    report_pdf: list[float] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            spec = make_study(root, arms, concurrency)
            xs.append(xargs(root / "repo", arms, concurrency))
            phases, ok = research(spec, root / "home")
            if ok != arms:
                raise SystemExit(f"only {ok} of {arms} no-op runs succeeded")
            ours.append(phases)
            for name, times in theirs.items():
                times.append(timers[name](root, arms, concurrency))
            if time_report:
                report_no_pdf.append(report_alone(root / "home", pdf=False))
                if shutil.which("pdflatex"):
                    report_pdf.append(report_alone(root / "home", pdf=True))
            # A second study of the same commit in the same home: its workspace is cached (the first
            # command cloned the repository and made the checkout), as it is for a researcher's next run.
            again, _ = research(write_spec(root, "again", 2, concurrency), root / "home")
            startup_cached.append(again.startup)
    return Result(
        concurrency, statistics.median(xs),
        Phases(*(statistics.median(getattr(p, f) for p in ours) for f in ("total", "startup", "runs", "report"))),
        {name: statistics.median(ts) for name, ts in theirs.items()},
        statistics.median(startup_cached),
        statistics.median(report_no_pdf) if report_no_pdf else None,
        statistics.median(report_pdf) if report_pdf else None,
    )


def print_result(result: Result, arms: int, rounds: int) -> None:
    x, p = result.xargs, result.phases
    print(f"end to end: `ratiocinator research` on {arms} no-op python arms at concurrency {result.concurrency},"
          f" median of {rounds} alternating rounds")
    print(f"  xargs -P {result.concurrency}:                {x:7.3f} s   1.00")
    for name, t in result.peers.items():
        print(f"  {name + ':':<26}{t:7.3f} s   {t / x:.2f}")
    print(f"  ratiocinator research:      {p.total:7.3f} s   {p.total / x:.2f}")
    print(f"    start-up to first run:    {p.startup:7.3f} s   (a fresh home: the repository is cloned first)")
    print(f"    run phase:                {p.runs:7.3f} s   {p.runs / x:.3f} of xargs  (target ≤ 1.10)")
    print(f"    report (as research runs it): {p.report:7.3f} s")
    print(f"  start-up to first run, workspace cached: {result.startup_cached:7.3f} s   (target ≤ 0.3;"
          " a second study of the same commit)")
    if result.report_no_pdf is not None:
        print(f"  report of {arms} arms, no PDF:   {result.report_no_pdf:7.3f} s   (target < 2)")
    if result.report_pdf_cached is not None:
        print(f"  report again with the PDF, nothing changed: {result.report_pdf_cached:7.3f} s")


def bench_commands(arms: int, rounds: int) -> None:
    """`validate` and `status` on a finished study, beside the bare interpreter starting, alternating."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = make_study(root, arms, 2)
        home = root / "home"
        research(spec, home)
        env = {**same_python_env(), "RATIOCINATOR_HOME": str(home)}
        commands = {"python -c pass": [sys.executable, "-c", "pass"],
                    "ratiocinator validate": [*ratiocinator_cli(), "validate", str(spec)],
                    "ratiocinator status": [*ratiocinator_cli(), "status", "noop"]}
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(max(rounds, 5)):
            for name, argv in commands.items():
                started = time.perf_counter()
                subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - started)
    floor = statistics.median(times["python -c pass"])
    print(f"commands on a finished {arms}-arm study, median of {max(rounds, 5)} alternating rounds")
    for name, ts in times.items():
        print(f"  {name + ':':<26}{statistics.median(ts):7.3f} s   (interpreter start-up {floor:.3f} s; target ≤ 0.3)")


def main(arms: int = 200, concurrencies: tuple[int, ...] = (2, 8), rounds: int = 3) -> None:
    if shutil.which("xargs") is None:
        raise SystemExit("xargs is needed for the side-by-side comparison")
    bench_commands(arms, rounds)
    for i, concurrency in enumerate(concurrencies):
        result = bench_end_to_end(arms, concurrency, rounds, time_report=i == 0)
        print_result(result, arms, rounds)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.arms, tuple(args.concurrency), args.rounds)
