"""Autoresearch throughput: attempts per hour with 1, 2 and 4 workers against the one-worker loop.

A throwaway git repository holds a `train.py` that sleeps ``--run-s`` seconds (the fixed-budget
experiment) and prints `val_bpb:` from `config.py`; a `kind: command` agent sleeps ``--think-s``
seconds (the model's turn) and then sets one number in `config.py` at random. Each session runs
``--attempts`` agent attempts, through the same engine, ledger and git worktrees as a real
session, on SSH hosts on loopback (``--backend ssh``, the default: a real sshd on 127.0.0.1, one
slot per worker, each run shipped as a bundle into its own working copy there) or on this
machine (``--backend local``); the figures come from the session's ledger:

* attempts per hour: agent attempts / the session's wall time (the baseline included);
* billed-idle share: of the time the workers' GPUs are held (workers × wall), the part no
  training script was running on them (agent turns, git, shipping the commit, the baseline's
  wait) — what a rented GPU per worker bills for nothing;
* overhead per run: the ledger's run time (launch request to exit: shipping the commit and
  making the run's working copy included) minus the script's own time;
* cost per attempt: GPUs held × ``--price`` $/h ÷ attempts, plus ``--llm-cost`` per agent turn.

The one-worker session is the sequential loop (think, run, decide, repeat); the ratios are each
session's attempts per hour over it. Prints the machine, one row per worker count.

Usage: python bench/autoresearch.py [--attempts 12] [--think-s 2] [--run-s 2] [--workers 1,2,4]
                                   [--backend ssh|local]
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ratiocinator.autoresearch import AutoResearch, load_program
from ratiocinator.autoresearch.store import Store
from ratiocinator.store.ledger import Ledger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd import Sshd, free_port, keygen  # noqa: E402 - the tests' loopback sshd

TRAIN = """\
import time
started = time.monotonic()
import os
import config
time.sleep(float(os.environ["BENCH_RUN_S"]))
print(f"val_bpb: {1.0 + (config.X - 37) ** 2 / 1000:.6f}")
print(f"train_s: {time.monotonic() - started:.3f}")
"""

AGENT = """\
import os, pathlib, random, re, time
time.sleep(float(os.environ["BENCH_THINK_S"]))
path = pathlib.Path("config.py")
value = random.randrange(100)
path.write_text(re.sub(r"X = \\d+", f"X = {value}", path.read_text()))
pathlib.Path(os.environ["RATIOCINATOR_HYPOTHESIS_FILE"]).write_text(f"X = {value} is closer to the optimum\\n")
"""

GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org", "GIT_COMMITTER_NAME": "bench",
           "GIT_COMMITTER_EMAIL": "bench@example.org"}


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN)
    (repo / "config.py").write_text("X = 0\n")
    env = {**os.environ, **GIT_ENV}
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "base"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    return repo


@contextlib.contextmanager
def loopback_sshd(root: Path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 with its own keys (as the tests start one)."""
    binary = os.environ.get("RATIOCINATOR_SSHD", "/usr/sbin/sshd")
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"--backend ssh needs an OpenSSH server ({binary}); install openssh-server or use"
                         " --backend local")
    root.mkdir()
    root.chmod(0o755)
    host_key, client_key = root / "host_ed25519", root / "client_ed25519"
    keygen(host_key, "bench host key")
    keygen(client_key, "bench client key")
    (root / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    server = Sshd(binary=binary, root=root, port=free_port(), user=getpass.getuser(), client_key=client_key,
                  host_key=host_key)
    server.write_config()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def backend_fields(server: Sshd | None, root: Path, workers: int) -> dict[str, Any]:
    if server is None:
        return {}
    known = root / "known_hosts"
    known.write_text(server.known_hosts_line())
    return {"backend": "ssh", "hosts": [{"host": "127.0.0.1", "port": server.port, "user": server.user,
                                         "identity_file": str(server.client_key), "known_hosts": str(known),
                                         "workdir": str(root / "remote"), "slots": workers}]}


def session(root: Path, repo: Path, workers: int, args: argparse.Namespace, server: Sshd | None) -> dict[str, float]:
    agent = root / "agent.py"
    agent.write_text(AGENT)
    tag = f"w{workers}"
    program = root / f"{tag}.yaml"
    program.write_text(yaml.safe_dump({
        "repo": str(repo), "tag": tag, "editable": ["config.py"], "run": f"{sys.executable} train.py",
        "metric": "val_bpb", "budget_s": args.run_s, "timeout_s": args.run_s * 10 + 30, "workers": workers,
        "max_iterations": args.attempts, "pass_env": ["BENCH_*"], "secondary_metrics": ["train_s"],
        "agent": {"kind": "command", "command": f"{sys.executable} {agent}"},
        **backend_fields(server, root, workers)}))
    env = {**os.environ, **GIT_ENV, "BENCH_RUN_S": str(args.run_s), "BENCH_THINK_S": str(args.think_s)}
    home = root / "home"
    started = time.monotonic()
    outcome = AutoResearch(load_program(program), home, environ=env).run()
    wall = time.monotonic() - started
    if outcome.exit_code != 0:
        raise SystemExit(f"the {workers}-worker session failed: {outcome.reason}")
    store = Store(Ledger(home / "ledger.db"))
    try:
        found = store.session_by_tag(tag)
        assert found is not None
        attempts = store.attempts(found.id)
    finally:
        store.close()
    agent_attempts = sum(1 for a in attempts if not a.is_baseline)
    training = [t for a in attempts for t in a.secondary.get("train_s", [])]
    measuring = sum(training)
    held = workers * wall
    return {"workers": workers, "attempts": agent_attempts, "wall_s": wall,
            "per_hour": agent_attempts / wall * 3600, "idle_share": 1 - measuring / held,
            "compute_per_attempt": held / 3600 * args.price / agent_attempts,
            "kept": sum(1 for a in attempts if a.status == "keep"),
            "overhead_s": (sum(a.run_s for a in attempts) - measuring) / max(len(training), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=12, help="agent attempts per session")
    parser.add_argument("--think-s", type=float, default=2.0, help="the agent's turn, seconds")
    parser.add_argument("--run-s", type=float, default=2.0, help="one run, seconds")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--price", type=float, default=2.0, help="$/h of one worker's GPU")
    parser.add_argument("--llm-cost", type=float, default=0.05, help="$ per agent turn")
    parser.add_argument("--backend", choices=("ssh", "local"), default="ssh",
                        help="where the runs go: SSH hosts on loopback, or this machine")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"{args.attempts} attempts per session; agent turn {args.think_s:g} s, run {args.run_s:g} s; "
          f"${args.price:g}/h per worker GPU, ${args.llm_cost:g} per agent turn; {args.backend} backend"
          + (" (an sshd on 127.0.0.1)" if args.backend == "ssh" else "") + ", one slot per worker")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-autoresearch-") as tmp, contextlib.ExitStack() as stack:
        server = stack.enter_context(loopback_sshd(Path(tmp) / "sshd")) if args.backend == "ssh" else None
        for workers in counts:
            root = Path(tmp) / f"w{workers}"
            root.mkdir()
            rows.append(session(root, make_repo(root), workers, args, server))
    base = next((r for r in rows if r["workers"] == 1), rows[0])
    print(f"{'workers':>7} {'attempts':>8} {'wall s':>7} {'attempts/h':>10} {'vs 1 worker':>11} {'billed idle':>11}"
          f" {'$/attempt (GPU)':>15} {'$/attempt (+LLM)':>16} {'overhead/run s':>14} {'kept':>4}")
    for r in rows:
        print(f"{r['workers']:>7} {r['attempts']:>8} {r['wall_s']:>7.1f} {r['per_hour']:>10.0f}"
              f" {r['per_hour'] / base['per_hour']:>10.2f}x {r['idle_share']:>10.0%}"
              f" {r['compute_per_attempt']:>15.4f} {r['compute_per_attempt'] + args.llm_cost:>16.4f}"
              f" {r['overhead_s']:>14.2f} {r['kept']:>4}")


if __name__ == "__main__":
    main()
