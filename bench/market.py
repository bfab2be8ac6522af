"""A simulated Vast.ai marketplace: one instance per arm against instance reuse, same 24 runs.

The reuse strategies run the real `Executor` (its work queue, its idle-slot rule from
`capacity.py`, its ledger writes) against a simulated marketplace backend, in scaled
time: one simulated second lasts ``--scale`` real seconds. Every instance is billed from
the rent call to its destruction (Vast bills per second; storage is billed while the
instance exists). The executor's own per-run work (ledger rows, run directories) is
billed too, magnified by the scale, so the reuse figures are if anything pessimistic.

Typical figures used (Vast.ai, on-demand, consumer GPUs), each drawn uniformly:

* boot, rent → SSH answers (image pull of a CUDA/PyTorch image on a host with a
  cached base layer, container start): 60–180 s;
* setup on a fresh instance (clone the bundle, create the venv, pip install the
  requirements, ``deps.verify``): 120–300 s;
* one run: 5–15 min;
* price: $0.25–0.60/h per machine (RTX 3090/4090 range), storage $0.10/GB/month × 50 GB; the
  market offers 2 machines per run and every renter takes the cheapest still free, as the
  backend's offer search does.

Strategies:

* ``per-arm``: every run rents its own instance (boot + setup + run, then destroy): what
  the published Ratiocinator does; computed directly from the same draws;
* ``reuse, held``: N instances rented once, runs queued onto each as soon as it is ready;
  every instance is held until the experiment's last run ends;
* ``reuse, early release``: what `VastBackend` does: the executor gives an idle instance
  back when the experiment's last iteration has no work left for it, or mid-experiment
  when the iteration's remaining runs are expected to outlast renting one again; the next
  iteration rents what it needs.

Two experiments: 24 runs in one iteration, and 12 + 12 runs in two iterations (the seed
spec's ``max_iterations: 2``). Billed-idle fraction = billed instance time not spent
inside runner processes / billed time. Targets: idle < 10 %, cost ≤ 50 % of per-arm.

Usage: python bench/market.py [--runs 24] [--instances 4] [--trials 6] [--seed 1] [--scale 0.001]
       [--boot 60 180] [--setup 120 300] [--run-min 5 15]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ratiocinator.backends.base import (
    Backend,
    ElasticCapacity,
    ExitInfo,
    HardwareFinding,
    Host,
    LaunchRequest,
    RunHandle,
    Slot,
    Stream,
    Workspace,
)
from ratiocinator.errors import UsageError
from ratiocinator.execution.executor import Executor
from ratiocinator.planning.plan import plan_iteration
from ratiocinator.spec.models import LoadedSpec, load_spec
from ratiocinator.store.budget import Budget
from ratiocinator.store.ledger import Ledger

sys.path.insert(0, str(Path(__file__).parent))
from overhead import NOOP_RUNNER, make_repo, write_spec  # noqa: E402 - the bench's shared helpers

STORAGE_DPH = 0.10 * 50 / (30 * 24)
PRICE_RANGE = (0.25, 0.60)  # $/h of one machine on offer (RTX 3090/4090, on-demand)


@dataclass
class Result:
    billed_s: float
    run_s: float
    cost: float

    @property
    def idle(self) -> float:
        return (self.billed_s - self.run_s) / self.billed_s


@dataclass
class Draws:
    """One trial's world: how long each run takes, what the market offers, and each rental's boot + setup."""

    runs: dict[str, float]  # arm name -> run seconds
    prices: list[float]  # $/h of the machines on offer, cheapest first (the offer search's order)
    rentals: list[tuple[float, float]]  # (boot s, setup s) of the 1st, 2nd, ... rental

    def price(self, k: int) -> float:
        """The k-th cheapest machine: with k machines rented at once, the next renter gets this one."""
        return self.prices[k]


def offer_prices(rng: random.Random, machines: int) -> list[float]:
    """What the market asks for each of ``machines`` machines, $/h, cheapest first (the offer search's order)."""
    return sorted(rng.uniform(*PRICE_RANGE) for _ in range(machines))


def draw(rng: random.Random, arms: list[str], args: argparse.Namespace) -> Draws:
    runs = {arm: rng.uniform(*args.run_min) * 60 for arm in arms}
    prices = offer_prices(rng, len(arms) * 2)
    rentals = [(rng.uniform(*args.boot), rng.uniform(*args.setup)) for _ in range(len(arms) * 2)]
    return Draws(runs, prices, rentals)


def per_arm(d: Draws) -> Result:
    """Every run on its own rental, all at once as the runs are independent: the cheapest len(runs) machines."""
    billed = cost = 0.0
    for k, (run, (boot, setup)) in enumerate(zip(d.runs.values(), d.rentals, strict=False)):
        life = boot + setup + run
        billed += life
        cost += life / 3600 * (d.price(k) + STORAGE_DPH)
    return Result(billed, sum(d.runs.values()), cost)


# -- the simulated marketplace backend --------------------------------------------------------


@dataclass
class _Instance:
    slot: Slot
    price: float
    boot_s: float
    setup_s: float
    rented_at: float
    destroyed_at: float | None = None
    busy_s: float = 0.0


@dataclass
class _SimHandle(RunHandle):
    seconds: float
    scale: float
    score: float
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(self.seconds * self.scale)
        self._done.set()

    async def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        await self._done.wait()
        yield "stdout", f'METRICS: {{"score": {self.score}}}\n'.encode()

    async def wait(self) -> ExitInfo:
        await self._done.wait()
        return ExitInfo(exit_code=0, signal=None)

    async def cancel(self, grace_s: float = 5.0) -> None:
        self.task.cancel()
        self._done.set()

    async def reap_strays(self) -> None:
        return None


class SimMarket(Backend, ElasticCapacity):
    """Instances with one slot each; rent = boot then setup (scaled sleeps); billing by the clock.
    Elastic like the Vast backend; ``early_release`` says whether idle instances are given back."""

    name = "sim-market"

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> SimMarket:
        raise UsageError("the simulated market is built by this benchmark from its draws, not from a spec")

    def elastic(self) -> SimMarket:
        return self

    def __init__(self, draws: Draws, n: int, scale: float, *, early_release: bool) -> None:
        self.draws, self.n, self.scale = draws, n, scale
        self.idle_billed = early_release
        self.instances: list[_Instance] = []
        self._rentals = iter(draws.rentals)
        self._arrivals: dict[asyncio.Task[None], _Instance] = {}
        self._grew = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() / self.scale  # simulated seconds

    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        return []

    def _rent(self, k: int) -> list[_Instance]:
        batch = []
        for _ in range(k):
            boot, setup = next(self._rentals)
            rented = {i.price for i in self.instances if i.destroyed_at is None}
            price = next(p for p in self.draws.prices if p not in rented)  # the cheapest machine still on offer
            batch.append(_Instance(Slot(len(self.instances)), price, boot, setup, self.now()))
            self.instances.append(batch[-1])
        return batch

    def _host(self) -> Host:
        now = self.now()
        return Host("sim", tuple(i.slot for i in self.instances
                                 if i.destroyed_at is None and i.rented_at + i.boot_s + i.setup_s <= now), 0.0)

    async def acquire(self, loaded: LoadedSpec) -> Host:
        """As the Vast backend: all rented at once, back when the first is ready; the rest join via `grown`."""
        batch = sorted(self._rent(self.n), key=lambda i: i.boot_s + i.setup_s)
        await asyncio.sleep((batch[0].boot_s + batch[0].setup_s) * self.scale)
        self._grew = asyncio.Event()
        for i in batch[1:]:
            self._arrivals[asyncio.create_task(self._arrive(i, grow=True))] = i
        return self._host()

    async def _arrive(self, instance: _Instance, *, grow: bool) -> None:
        await asyncio.sleep(max(instance.rented_at + instance.boot_s + instance.setup_s - self.now(), 0.0) * self.scale)
        if grow:
            self._grew.set()

    async def grown(self) -> Host:
        await self._grew.wait()
        self._grew.clear()
        return self._host()

    async def prepare(self, host: Host, loaded: LoadedSpec, commit: str, *,
                      on_output: Callable[[str], None] | None = None) -> Workspace:
        return Workspace(Path("."), {})

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        arm = request.env["RATIOCINATOR_ARM"]
        seconds = self.draws.runs[arm]
        self.instances[request.slot.index].busy_s += seconds
        return _SimHandle(seconds, self.scale, seconds)

    def slot_usable(self, slot: Slot) -> bool:
        return self.instances[slot.index].destroyed_at is None

    def reacquire_s(self) -> float:
        return statistics.fmean(i.boot_s + i.setup_s for i in self.instances)

    async def release_slot(self, host: Host, slot: Slot) -> None:
        self.instances[slot.index].destroyed_at = self.now()

    async def replenish(self, host: Host, loaded: LoadedSpec, runs_left: int) -> Host:
        """As the Vast backend: replacements are rented together and waited for (unless stopped meanwhile)."""
        live = sum(i.destroyed_at is None for i in self.instances)  # those still arriving included
        missing = min(self.n, runs_left) - live
        if missing > 0:
            batch = {asyncio.create_task(self._arrive(i, grow=False)): i for i in self._rent(missing)}
            self._arrivals.update(batch)
            await asyncio.wait(batch)
        return self._host()

    def arriving(self) -> int:
        return sum(not t.done() for t in self._arrivals)

    async def stop_arrivals(self, why: str) -> None:
        for task, instance in self._arrivals.items():
            if not task.done():
                task.cancel()
                instance.destroyed_at = self.now()

    async def release(self, host: Host) -> None:
        await self.stop_arrivals("work ended")
        for i in self.instances:
            if i.destroyed_at is None:
                i.destroyed_at = self.now()

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        return False

    def result(self) -> Result:
        billed = cost = run = 0.0
        for i in self.instances:
            assert i.destroyed_at is not None
            life = i.destroyed_at - i.rented_at
            billed += life
            run += i.busy_s
            cost += life / 3600 * (i.price + STORAGE_DPH)
        return Result(billed, run, cost)


async def reuse(loaded: LoadedSpec, home: Path, draws: Draws, args: argparse.Namespace, *, iterations: int,
                early_release: bool) -> Result:
    """The real executor over the simulated market, iteration by iteration, as `research` drives it."""
    backend = SimMarket(draws, args.instances, args.scale, early_release=early_release)
    ledger = Ledger(home / "ledger.db")
    try:
        plan = plan_iteration(loaded)
        exp = ledger.create_experiment(id="market", name="market", spec_path=str(loaded.path), spec_text=loaded.text,
                                       spec_sha256=loaded.sha256, backend="sim-market")
        ledger.record_arms(exp.id, 1, plan.arms, plan.baseline)
        host = await backend.acquire(loaded)
        workspace = await backend.prepare(host, loaded, "0" * 40)
        runs = plan.runs()
        per = len(runs) // iterations
        for it in range(iterations):
            executor = Executor(
                ledger=ledger, backend=backend, host=host, workspace=workspace, loaded=loaded, plan=plan,
                experiment_id=exp.id, commit="0" * 40, arm_ids={a.name: a.id for a in ledger.arms(exp.id)},
                argv=("run.sh",), runs_dir=home / "runs", budget=Budget(ledger, exp.id, 0.0),
                last_iteration=it == iterations - 1,
            )
            summary = await executor.run(runs[it * per:(it + 1) * per])
            if sum(r.status == "succeeded" for r in summary.results) != per:
                raise SystemExit(f"iteration {it + 1}: not every run succeeded: {summary}")
            host = executor.host
        await backend.release(host)
    finally:
        ledger.close()
    return backend.result()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=0.001, help="real seconds per simulated second")
    ap.add_argument("--boot", type=float, nargs=2, default=(60, 180))
    ap.add_argument("--setup", type=float, nargs=2, default=(120, 300))
    ap.add_argument("--run-min", type=float, nargs=2, default=(5, 15))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    names = ("per-arm", "reuse, held", "reuse, early release")
    print(f"{args.runs} runs of {args.run_min[0]:g}-{args.run_min[1]:g} min; boot {args.boot[0]:g}-{args.boot[1]:g} s,"
          f" setup {args.setup[0]:g}-{args.setup[1]:g} s; reuse on {args.instances} instances through the real executor"
          f" at {args.scale:g} s per simulated s; mean of {args.trials} trials")
    for iterations in (1, 2):
        results: dict[str, list[Result]] = {n: [] for n in names}
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            spec = write_spec(root, make_repo(root, NOOP_RUNNER), {"K": list(range(args.runs))}, args.instances,
                              timeout_s=args.run_min[1] * 60 * 2)
            loaded = load_spec(spec)
            arms = [a.name for a in plan_iteration(loaded).arms]
            for trial in range(args.trials):
                draws = draw(rng, arms, args)
                results["per-arm"].append(per_arm(draws))
                for name, early in (("reuse, held", False), ("reuse, early release", True)):
                    home = root / f"home-{iterations}-{trial}-{early}"
                    home.mkdir()
                    results[name].append(asyncio.run(reuse(loaded, home, draws, args, iterations=iterations,
                                                           early_release=early)))
        base_cost = statistics.mean(r.cost for r in results["per-arm"])
        split = "one iteration" if iterations == 1 else f"{iterations} iterations of {args.runs // iterations}"
        print(f"\n{args.runs} runs, {split}")
        print(f"{'strategy':<22} {'billed h':>9} {'idle':>7} {'cost $':>8} {'cost/per-arm':>13}  targets (idle<10%,"
              " cost<=50%)")
        for name, rs in results.items():
            idle = statistics.mean(r.idle for r in rs)
            cost = statistics.mean(r.cost for r in rs)
            ratio = cost / base_cost
            verdict = "" if name == "per-arm" else (
                f"idle {'MET' if idle < 0.10 else 'missed'}, cost {'MET' if ratio <= 0.5 else 'missed'}")
            print(f"{name:<22} {statistics.mean(r.billed_s for r in rs) / 3600:>9.2f} {idle:>6.1%} {cost:>8.3f}"
                  f" {ratio:>12.1%}  {verdict}")


if __name__ == "__main__":
    main()
