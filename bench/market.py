"""A simulated Vast.ai marketplace: one instance per arm against instance reuse, same 24 runs.

Discrete-event simulation, no network. Every instance is billed from the rent call to
its destruction (Vast bills per second; storage is billed while the instance exists).
Typical figures used (Vast.ai, on-demand, consumer GPUs), each drawn uniformly:

* boot, rent → SSH answers (image pull of a CUDA/PyTorch image on a host with a
  cached base layer, container start): 60–180 s;
* setup on a fresh instance (clone the bundle, create the venv, pip install the
  requirements, ``deps.verify``): 120–300 s;
* one run: 5–15 min;
* price: $0.25–0.60/h per instance (RTX 3090/4090 range), storage $0.10/GB/month × 50 GB.

Strategies:

* ``per-arm``: every run rents its own instance (boot + setup + run, then destroy);
* ``reuse, held``: N instances rented once, runs queued FIFO onto them; every instance is
  held until the experiment's last run ends (what `VastBackend.release` does today);
* ``reuse, early release``: as above, but an instance is destroyed as soon as the queue
  has nothing left for it (needs the executor to tell the backend; see the report).

Billed-idle fraction = billed instance time not spent inside runner processes / billed time.
Targets: idle < 10 %, cost ≤ 50 % of per-arm.

Usage: python bench/market.py [--runs 24] [--instances 4] [--trials 200] [--seed 1]
       [--boot 60 180] [--setup 120 300] [--run-min 5 15]
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from dataclasses import dataclass

STORAGE_DPH = 0.10 * 50 / (30 * 24)


@dataclass
class Result:
    billed_s: float
    run_s: float
    cost: float

    @property
    def idle(self) -> float:
        return (self.billed_s - self.run_s) / self.billed_s


def _draw(rng: random.Random, args: argparse.Namespace) -> tuple[list[float], list[tuple[float, float, float]]]:
    runs = [rng.uniform(*args.run_min) * 60 for _ in range(args.runs)]
    # Per possible instance: (boot, setup, price); the same draws serve both strategies.
    machines = [(rng.uniform(*args.boot), rng.uniform(*args.setup), rng.uniform(0.25, 0.60)) for _ in range(args.runs)]
    return runs, machines


def per_arm(runs: list[float], machines: list[tuple[float, float, float]]) -> Result:
    billed = cost = 0.0
    for run, (boot, setup, price) in zip(runs, machines):
        life = boot + setup + run
        billed += life
        cost += life / 3600 * (price + STORAGE_DPH)
    return Result(billed, sum(runs), cost)


def reuse(runs: list[float], machines: list[tuple[float, float, float]], n: int, *, early_release: bool) -> Result:
    # The backend rents the n cheapest of one model: take the n cheapest draws.
    chosen = sorted(machines, key=lambda m: m[2])[:n]
    ready = [(boot + setup, i) for i, (boot, setup, _) in enumerate(chosen)]
    heapq.heapify(ready)
    last_end = [0.0] * n
    for run in runs:  # FIFO: the next run goes to the first instance that is free
        t, i = heapq.heappop(ready)
        last_end[i] = t + run
        heapq.heappush(ready, (t + run, i))
    makespan = max(last_end)
    billed = cost = 0.0
    for i, (_, _, price) in enumerate(chosen):
        life = last_end[i] if early_release else makespan
        billed += life
        cost += life / 3600 * (price + STORAGE_DPH)
    return Result(billed, sum(runs), cost)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=24)
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--boot", type=float, nargs=2, default=(60, 180))
    ap.add_argument("--setup", type=float, nargs=2, default=(120, 300))
    ap.add_argument("--run-min", type=float, nargs=2, default=(5, 15))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, list[Result]] = {"per-arm": [], "reuse, held": [], "reuse, early release": []}
    for _ in range(args.trials):
        runs, machines = _draw(rng, args)
        results["per-arm"].append(per_arm(runs, machines))
        results["reuse, held"].append(reuse(runs, machines, args.instances, early_release=False))
        results["reuse, early release"].append(reuse(runs, machines, args.instances, early_release=True))
    base_cost = statistics.mean(r.cost for r in results["per-arm"])
    print(f"{args.runs} runs of {args.run_min[0]:g}-{args.run_min[1]:g} min; boot {args.boot[0]:g}-{args.boot[1]:g} s,"
          f" setup {args.setup[0]:g}-{args.setup[1]:g} s; reuse on {args.instances} instances; mean of {args.trials} trials")
    print(f"{'strategy':<22} {'billed h':>9} {'idle':>7} {'cost $':>8} {'cost/per-arm':>13}  targets (idle<10%, cost<=50%)")
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
