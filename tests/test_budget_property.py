"""Property: over thousands of random experiments, spend never exceeds ``max_dollars``.

Each experiment mixes the two ways money is committed: per-run reservations (`Budget`,
price × train timeout, settled with price × actual duration, which a failure or a
kill can cut short or a hang can stretch to the timeout) and rented-instance
reservations (price × TTL, settled by `reaper.settle` with lifetime × price or a
billed amount). Reservations interleave as concurrent runs would. Real `Ledger`.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ratiocinator.backends.vast import reaper
from ratiocinator.store import instances as inst
from ratiocinator.store.budget import Budget, run_cost
from ratiocinator.store.ledger import Ledger

EXPERIMENTS = 2000


def _experiment(ledger: Ledger, rng: random.Random, index: int) -> None:
    exp_id = f"exp-{index}"
    ledger.db.execute(
        "INSERT INTO experiments (id, name, spec_path, spec_text, spec_sha256, backend, status, note, created_at,"
        " updated_at) VALUES (?, 'p', '', '', '', 'vast', 'running', '', 0, 0)", (exp_id,))
    limit = rng.choice([0.0, rng.uniform(0.01, 5.0), rng.uniform(5, 50)])
    budget = Budget(ledger, exp_id, limit)
    open_runs: list[tuple[int, float, float, float]] = []
    open_instances: list[inst.InstanceRow] = []
    for _ in range(rng.randint(1, 12)):
        action = rng.random()
        if action < 0.45:  # a run starts: reserve its worst case
            price, timeout = rng.uniform(0, 3), rng.uniform(1, 7200)
            charge = budget.reserve_run(price, timeout)
            if charge is not None:
                open_runs.append((charge, price, timeout, rng.choice([rng.uniform(0, timeout), timeout * 3, 0.0])))
        elif action < 0.75:  # an instance is rented: reserve dph × TTL before the rent
            dph, ttl = rng.uniform(0.05, 4), rng.uniform(60, 20000)
            charge = ledger.reserve(exp_id, amount=dph * ttl / 3600, limit=limit, kind="instance")
            if charge is not None:
                now = time.time()
                row = inst.record_requested(ledger, experiment_id=exp_id, provider="vast",
                                            offer={"id": 1, "gpu_name": "X", "dph_total": dph}, deadline=now + ttl,
                                            charges=[charge])
                inst.update(ledger, row.id, created_at=now - rng.uniform(0, ttl * 1.5))  # some outlive their TTL
                open_instances.append(inst.get(ledger, row.id))
        elif open_runs:  # a run ends (succeeded, failed early, hung to its timeout, killed)
            charge, price, timeout, duration = open_runs.pop(rng.randrange(len(open_runs)))
            ledger.settle(charge, run_cost(price, duration, timeout))
        elif open_instances:  # an instance is destroyed, lost, or reaped
            row = open_instances.pop(rng.randrange(len(open_instances)))
            reaper.settle(ledger, row, None, end=time.time() + rng.choice([0.0, 1e6]))
    for charge, price, timeout, duration in open_runs:
        ledger.settle(charge, run_cost(price, duration, timeout))
    for row in open_instances:
        reaper.settle(ledger, row, None, end=time.time())
    spent, reserved = ledger.money(exp_id)
    assert reserved == 0.0
    assert spent <= limit + 1e-9, (exp_id, spent, limit)


def test_spend_never_exceeds_max_dollars(tmp_path: Path) -> None:
    rng = random.Random(20261122)
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.db.execute("PRAGMA synchronous=OFF")  # speed only; atomicity is the same
    for i in range(EXPERIMENTS):
        _experiment(ledger, rng, i)


def test_one_ledger_shared_by_threads_keeps_reservations_atomic(tmp_path: Path) -> None:
    """The executor's loop and backend worker threads (instance destroy, settle) share one Ledger.

    With one connection for all threads, a worker's BEGIN failed ("cannot start a transaction
    within a transaction") whenever the loop was inside one; each thread now has its own.
    """
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.db.execute(
        "INSERT INTO experiments (id, name, spec_path, spec_text, spec_sha256, backend, status, note, created_at,"
        " updated_at) VALUES ('e', 'p', '', '', '', 'vast', 'running', '', 0, 0)")
    limit, amount, per_thread = 10.0, 0.25, 40
    start = threading.Barrier(8)

    def reserve_and_settle() -> list[int]:
        start.wait()
        kept = []
        for i in range(per_thread):
            charge = ledger.reserve("e", amount=amount, limit=limit, kind="run")
            if charge is not None and i % 2:
                ledger.settle(charge, 0.0)  # a run that cost nothing frees its reservation
            elif charge is not None:
                kept.append(charge)
        return kept

    with ThreadPoolExecutor(8) as pool:
        kept = [c for got in pool.map(lambda _: reserve_and_settle(), range(8)) for c in got]
    spent, reserved = ledger.money("e")
    assert spent == 0.0
    assert reserved == len(kept) * amount <= limit
    assert len(kept) == limit / amount  # every reservation the limit allowed was granted, none beyond
    ledger.close()
