"""Autoresearch throughput: attempts per hour with 1, 2 and 4 workers, turns overlapping runs or not,
against the one-worker sequential loop.

A throwaway git repository holds a `train.py` that sleeps ``--run-s`` seconds (the fixed-budget
experiment) and prints `val_bpb:` from `config.py`; a `kind: command` agent sleeps ``--think-s``
seconds (the model's turn) and then sets one number in `config.py` at random. Each session runs
``--attempts`` agent attempts, through the same engine, ledger and git worktrees as a real
session, on SSH hosts on loopback (``--backend ssh``, the default: a real sshd on 127.0.0.1, one
slot per worker, each run shipped as a bundle into its own working copy there), on this
machine (``--backend local``), or on instances rented from a simulated market (``--backend vast``:
the tests' fake Vast.ai API on loopback, its machines priced as bench/market.py's market draws
them, each instance's SSH endpoint the loopback sshd; each worker rents one, boots, ships its
commits, and destroys it when the session ends). The figures come from the session's ledger:

* attempts per hour: agent attempts / the session's wall time (the baseline included);
* billed-idle share: of the time the workers' GPUs are billed, the part no training script was
  running on them (agent turns, git, shipping the commit, the baseline's wait, with vast also
  boot and setup). ssh and local take the GPUs as held for the whole session (workers × wall);
  vast bills each instance from the rent call to its destruction (the ledger's instance rows);
* overhead per run: the ledger's run time (launch request to exit: shipping the commit and
  making the run's working copy included) minus the script's own time;
* unrun: attempts that never ran (with overlap, mostly an edit that conflicts with the keep
  made while it was being written: this agent always edits the same line);
* cost per attempt: ssh and local: GPUs held × ``--price`` $/h ÷ attempts; vast: the
  instances' settled charges in the ledger ÷ attempts; plus ``--llm-cost`` per agent turn.

With vast, nothing may be left rented: after each session the bench counts the fake's live
instances (the "left live" column, 0 when the session gave every instance back) and reaps
whatever the ledger knows may still be live, as ``ratiocinator instances --reap`` does.

Each worker count runs twice by default (``--overlap both``): sequentially (``overlap: false``:
think, run, decide, repeat) and with each agent turn overlapping the worker's previous attempt's
runs (``overlap: true``, the default for command agents). The ratios are each session's attempts
per hour over the one-worker sequential loop's. Prints the machine, one row per session.

Usage: python bench/autoresearch.py [--attempts 12] [--think-s 2] [--run-s 2] [--workers 1,2,4]
                                   [--overlap both|on|off] [--backend ssh|local|vast] [--boot-s 0] [--seed 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
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
from ratiocinator.store import instances as inst
from ratiocinator.store.ledger import Ledger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from market import PRICE_RANGE, offer_prices  # noqa: E402 - the simulated market's prices
from sshd import Sshd, running_sshd  # noqa: E402 - the tests' loopback sshd
from vastserver import API_KEY, FakeVast, VastServer, offer  # noqa: E402 - the tests' fake Vast.ai API

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
def loopback_sshd(root: Path, machines: int = 1) -> Iterator[Sshd]:
    """A real sshd on loopback with its own keys (as the tests start one), listening on ``machines`` addresses
    (127.0.0.1, .2, ...) so each rented instance can have an endpoint of its own."""
    binary = os.environ.get("RATIOCINATOR_SSHD", "/usr/sbin/sshd")
    if not os.access(binary, os.X_OK):
        raise SystemExit(f"--backend ssh needs an OpenSSH server ({binary}); install openssh-server or use"
                         " --backend local")
    root.mkdir()
    with running_sshd(binary, root, "bench",
                      addresses=tuple(f"127.0.0.{k}" for k in range(1, max(machines, 1) + 1))) as server:
        yield server


class Market:
    """The tests' fake Vast.ai API on loopback, offering two machines per worker at the simulated market's prices
    (one GPU model, so the session's workers rent the cheapest); its instances answer SSH on the loopback sshd."""

    def __init__(self, sshd: Sshd, *, machines: int, boot_s: float, seed: int) -> None:
        prices = offer_prices(random.Random(seed), machines)
        self.sshd = sshd
        self.server = VastServer(FakeVast(
            ssh_port=sshd.port, authorized_keys=sshd.root / "authorized_keys", boot_s=boot_s,
            offers=[offer(k + 1, "RTX_4090", round(price, 3)) for k, price in enumerate(prices)],
            ssh_hosts=sshd.addresses))

    def fields(self, root: Path) -> dict[str, Any]:
        return {"backend": "vast", "vast": {"base_url": self.server.url, "ssh_user": self.sshd.user,
                                            "workdir": str(root / "remote"), "boot_timeout_s": 120,
                                            "setup_allowance_s": 60, "api_backoff_s": 0.05,
                                            "destroy_confirm_s": 10}}

    def env(self) -> dict[str, str]:
        return {"VAST_API_KEY": API_KEY, "VAST_API_URL": self.server.url}

    def live(self) -> int:
        return len(self.server.fake.live())

    def reap(self, home: Path) -> None:
        """Destroy what the home's ledger knows may be live (``instances --reap``), and say if any is left."""
        from ratiocinator.backends.vast.api import VastApi
        from ratiocinator.backends.vast.reaper import reap

        ledger = home / "ledger.db"
        if ledger.exists():
            with contextlib.closing(Ledger(ledger)) as opened:
                reap(opened, VastApi(API_KEY, self.server.url))
        if self.live():
            raise SystemExit(f"{self.live()} instance(s) of the fake market are still live after the reap")

    def close(self) -> None:
        self.server.close()


def backend_fields(server: Sshd | None, market: Market | None, root: Path, workers: int) -> dict[str, Any]:
    if market is not None:
        return market.fields(root)
    if server is None:
        return {}
    known = root / "known_hosts"
    known.write_text(server.known_hosts_line())
    return {"backend": "ssh", "hosts": [{"host": "127.0.0.1", "port": server.port, "user": server.user,
                                         "identity_file": str(server.client_key), "known_hosts": str(known),
                                         "workdir": str(root / "remote"), "slots": workers}]}


def session(root: Path, repo: Path, workers: int, overlap: bool, args: argparse.Namespace, server: Sshd | None,
            market: Market | None) -> dict[str, Any]:
    agent = root / "agent.py"
    agent.write_text(AGENT)
    tag = f"w{workers}-{'overlap' if overlap else 'sequential'}"
    program = root / f"{tag}.yaml"
    program.write_text(yaml.safe_dump({
        "repo": str(repo), "tag": tag, "editable": ["config.py"], "run": f"{sys.executable} train.py",
        "metric": "val_bpb", "budget_s": args.run_s, "timeout_s": args.run_s * 10 + 30, "workers": workers,
        "overlap": overlap,
        "max_iterations": args.attempts, "pass_env": ["BENCH_*"], "secondary_metrics": ["train_s"],
        "agent": {"kind": "command", "command": f"{sys.executable} {agent}"},
        **backend_fields(server, market, root, workers)}))
    env = {**os.environ, **GIT_ENV, "BENCH_RUN_S": str(args.run_s), "BENCH_THINK_S": str(args.think_s),
           **(market.env() if market is not None else {})}
    home = root / "home"
    started = time.monotonic()
    try:
        outcome = AutoResearch(load_program(program), home, environ=env).run()
        wall = time.monotonic() - started
        left_live = market.live() if market is not None else 0  # what the session itself did not give back
    finally:
        if market is not None:
            market.reap(home)
    if outcome.exit_code != 0:
        raise SystemExit(f"the {workers}-worker session failed: {outcome.reason}")
    store = Store(Ledger(home / "ledger.db"))
    try:
        found = store.session_by_tag(tag)
        assert found is not None
        attempts = store.attempts(found.id)
        # Rows of offers another renter took first were never rented (no provider id, $0): not counted.
        rented = [r for r in inst.rows(store.ledger, ar_session_id=found.id) if r.provider_id]
        (instance_usd,) = store.db.execute(
            "SELECT COALESCE(SUM(settled), 0) FROM ar_charges WHERE session_id = ? AND kind = 'instance'"
            " AND state = 'settled'", (found.id,)).fetchone()
    finally:
        store.close()
    agent_attempts = sum(1 for a in attempts if not a.is_baseline)
    training = [t for a in attempts for t in a.secondary.get("train_s", [])]
    measuring = sum(training)
    if market is not None:
        if any(r.destroyed_at is None or r.cost is None for r in rented):
            raise SystemExit(f"the {workers}-worker session left an instance unsettled in the ledger")
        billed = sum((r.destroyed_at or r.created_at) - r.created_at for r in rented)
        compute = float(instance_usd)
    else:
        billed = workers * wall  # a GPU per worker, held for the whole session
        compute = billed / 3600 * args.price
    return {"workers": workers, "overlap": overlap, "attempts": agent_attempts, "wall_s": wall,
            "per_hour": agent_attempts / wall * 3600, "billed_s": billed, "idle_share": 1 - measuring / billed,
            "compute_per_attempt": compute / agent_attempts, "rented": len(rented), "left_live": left_live,
            "kept": sum(1 for a in attempts if a.status == "keep"),
            "unrun": sum(1 for a in attempts if not a.is_baseline and not a.values),
            "overhead_s": (sum(a.run_s for a in attempts) - measuring) / max(len(training), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=12, help="agent attempts per session")
    parser.add_argument("--think-s", type=float, default=2.0, help="the agent's turn, seconds")
    parser.add_argument("--run-s", type=float, default=2.0, help="one run, seconds")
    parser.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    parser.add_argument("--overlap", choices=("both", "on", "off"), default="both",
                        help="agent turns overlapping the previous attempt's runs: each count both ways, or one")
    parser.add_argument("--price", type=float, default=2.0, help="$/h of one worker's GPU (ssh and local)")
    parser.add_argument("--llm-cost", type=float, default=0.05, help="$ per agent turn")
    parser.add_argument("--backend", choices=("ssh", "local", "vast"), default="ssh",
                        help="where the runs go: SSH hosts on loopback, this machine, or instances rented from the"
                             " simulated market")
    parser.add_argument("--boot-s", type=float, default=0.0,
                        help="vast: an instance's boot, rent to running (the backend polls every 5 s)")
    parser.add_argument("--seed", type=int, default=1, help="vast: the market's draw of prices")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    vast = args.backend == "vast"
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    where = {"ssh": " (an sshd on 127.0.0.1), one slot per worker", "local": ", one slot per worker",
             "vast": f" (the fake Vast.ai API on loopback: {2 * max(counts)} machines at ${PRICE_RANGE[0]:g}-"
                     f"{PRICE_RANGE[1]:g}/h drawn with seed {args.seed}, boot {args.boot_s:g} s), an instance per"
                     " worker"}[args.backend]
    price = "instances at their market price" if vast else f"${args.price:g}/h per worker GPU"
    print(f"{args.attempts} attempts per session; agent turn {args.think_s:g} s, run {args.run_s:g} s; "
          f"{price}, ${args.llm_cost:g} per agent turn; {args.backend} backend{where}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-autoresearch-") as tmp, contextlib.ExitStack() as stack:
        server = (stack.enter_context(loopback_sshd(Path(tmp) / "sshd", max(counts) if vast else 1))
                  if args.backend in ("ssh", "vast") else None)
        market = None
        if vast:
            assert server is not None
            market = Market(server, machines=2 * max(counts), boot_s=args.boot_s, seed=args.seed)
            stack.callback(market.close)
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.overlap]
        for workers in counts:
            for overlap in modes:
                root = Path(tmp) / f"w{workers}-{overlap}"
                root.mkdir()
                rows.append(session(root, make_repo(root), workers, overlap, args, server, market))
    base = next((r for r in rows if r["workers"] == 1 and not r["overlap"]), rows[0])
    print(f"{'workers':>7} {'overlap':>7} {'attempts':>8} {'wall s':>7} {'attempts/h':>10} {'vs 1 seq.':>10}"
          + (f" {'rented':>6} {'billed s':>8}" if vast else "")
          + f" {'billed idle':>11} {'$/attempt (GPU)':>15} {'$/attempt (+LLM)':>16} {'overhead/run s':>14}"
          f" {'kept':>4} {'unrun':>5}"
          + (f" {'left live':>9}" if vast else ""))
    for r in rows:
        print(f"{r['workers']:>7} {'yes' if r['overlap'] else 'no':>7} {r['attempts']:>8} {r['wall_s']:>7.1f}"
              f" {r['per_hour']:>10.0f} {r['per_hour'] / base['per_hour']:>9.2f}x"
              + (f" {r['rented']:>6} {r['billed_s']:>8.1f}" if vast else "")
              + f" {r['idle_share']:>10.0%}"
              f" {r['compute_per_attempt']:>15.5f} {r['compute_per_attempt'] + args.llm_cost:>16.5f}"
              f" {r['overhead_s']:>14.2f} {r['kept']:>4} {r['unrun']:>5}"
              + (f" {r['left_live']:>9}" if vast else ""))


if __name__ == "__main__":
    main()
