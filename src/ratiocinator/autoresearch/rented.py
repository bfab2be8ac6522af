"""Autoresearch on rented GPUs (``backend: vast``): one instance per worker, one GPU model, the session's money.

* **One instance per worker.** Each worker's lane has its own `VastBackend` renting one
  instance (``gpus_per_worker`` GPUs, all instances of the GPU model chosen once for the whole
  session: the model ``workers`` offers can be rented of, cheapest in total). A lane's backend
  holds one commit at a time; a new attempt's commit is prepared there per (instance, commit):
  its bundle, its checkout, each run's own copy.
* **Money.** The instances' reservations (price × TTL, then each deadline extension) are
  ``instance`` charges of the session in ``ar_charges``, under ``max_dollars`` with the LLM's
  turns; the instance rows name the session (``instances.ar_session_id``), so whoever settles
  them later (a resumed session, ``instances --reap``) settles the session's charges.
* **Holding through the agent's turn.** Between attempts a worker's instance is idle but billed
  while its agent thinks. It is held while the rest of the turn is expected to cost less than
  renting and preparing it again (`~ratiocinator.execution.capacity.should_give_back`, with the
  lane's past turns as the durations), and given back otherwise, and at the session's end. Each
  run first pushes the instance's self-destruct deadline past its timeout plus that holding time,
  so a dead orchestrator's instances stop billing on their own.
"""

from __future__ import annotations

import math
from pathlib import Path

from ratiocinator.autoresearch.program import LoadedProgram
from ratiocinator.autoresearch.store import Store
from ratiocinator.backends.vast.backend import VastBackend, VastSettings
from ratiocinator.errors import SpecError, UsageError
from ratiocinator.execution.capacity import remaining_s, should_give_back
from ratiocinator.store.ledger import Ledger

API_KEY_VARIABLE = "VAST_API_KEY"


class SessionAccount:
    """An autoresearch session's `~ratiocinator.store.instances.InstanceAccount`: instance money in ``ar_charges``,
    under the session's ``max_dollars`` together with its runs and LLM turns."""

    def __init__(self, ledger: Ledger, session_id: int, limit: float | None) -> None:
        self._ledger, self.session_id, self.limit = ledger, session_id, limit
        self._store = Store(ledger)

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def experiment_id(self) -> None:
        return None

    @property
    def ar_session_id(self) -> int:
        return self.session_id

    def reserve(self, amount: float, *, kind: str, note: str = "") -> int | None:
        return self._store.reserve(self.session_id, amount=amount, limit=self.limit, kind=kind)

    def settle(self, charge_id: int, amount: float) -> None:
        self._store.settle(charge_id, amount)

    def refusal(self, what: str, amount: float) -> str:
        spent, reserved = self._store.money(self.session_id)
        limit = "no max_dollars" if self.limit is None else f"max_dollars ${self.limit:.2f}"
        return (f"{what} could cost ${amount:.4f}, and ${spent:.4f} spent + ${reserved:.4f} reserved"
                f" of {limit} leaves too little")


def check_program(loaded: LoadedProgram) -> None:
    """What ``backend: vast`` refuses in a program: ``workers`` decides the instances, and the instances'
    cost is the truth (a per-run price would count the same dollars twice)."""
    program = loaded.program
    vast = program.vast
    if vast is not None and vast.instances not in (None, program.workers):
        raise SpecError(f"{loaded.where('vast', 'instances')}: with autoresearch, workers decides the instances"
                        f" (one per worker: {program.workers})", hint="remove vast.instances, or set workers")
    if vast is not None and vast.slots_per_instance != 1:
        raise SpecError(f"{loaded.where('vast', 'slots_per_instance')}: each worker has an instance of its own",
                        hint="remove vast.slots_per_instance; gpus_per_worker sizes each worker's instance")
    if program.price_per_hour:
        raise SpecError(f"{loaded.where('price_per_hour')}: with backend vast the rented instances' cost is"
                        " charged (price × lifetime, or the provider's bill); a per-run price would count it twice",
                        hint="remove price_per_hour")


def lane_backend(loaded: LoadedProgram, home: Path, environ: dict[str, str], *,
                 gpu_model: str | None = None) -> VastBackend:
    """One worker's backend: one instance, the program's ``vast:`` settings, the key from the session's environment."""
    program = loaded.program
    key = environ.get(API_KEY_VARIABLE, "")
    if not key:
        raise UsageError(f"backend: vast needs {API_KEY_VARIABLE} in the environment",
                               hint=f"export {API_KEY_VARIABLE}=... (console.vast.ai, Account > API keys)")
    fields = program.vast.model_dump() if program.vast is not None else {}
    fields.update(instances=1, slots_per_instance=1)
    if fields.get("work_s") is None:  # the first run's; each run extends the deadline it needs (`secure`)
        fields["work_s"] = program.hard_timeout_s
    backend = VastBackend(home, settings=VastSettings(**fields), api_key=key)
    backend.gpu_model = gpu_model
    return backend


def hold_s(backend: VastBackend) -> float:
    """How long an idle instance may be held after a run: what renting and preparing it again takes."""
    return backend.reacquire_s()


def give_back(idle_s: float, turns: list[float], reacquire_s: float, *, stopping: bool) -> bool:
    """Give an idle worker's instance back now, or hold it through its agent's turn.

    ``turns``: the worker's past idle gaps (run end → next launch). The rest of this turn is
    estimated from them as a run's rest is from finished runs (none yet: as long again as it
    has lasted), and the instance is given back when that exceeds ``reacquire_s``.
    """
    return should_give_back(last_iteration=False, stopping=stopping,
                            wait_s=remaining_s(idle_s, turns, math.inf), reacquire_s=reacquire_s)


__all__ = ["API_KEY_VARIABLE", "SessionAccount", "check_program", "give_back", "hold_s", "lane_backend"]
