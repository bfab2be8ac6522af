"""The Vast.ai backend (``backend: vast``): rent the cheapest matching offers, then run over SSH.

* **Offers** are searched with every hardware field of the spec (plus reliability and
  verified), cheapest first; all instances of an experiment share one GPU model unless
  ``allow_mixed_gpus``.
* **Money**: an instance's worst case is its price × its TTL (boot + setup + the work it
  may do); that is reserved against ``max_dollars`` before the rent call, and settled at
  destroy time with the provider's billing when it answers, else lifetime × price. The
  instance cost is the truth for the experiment, so the host's ``price_per_hour`` is 0:
  per-run reservations would count the same dollars twice.
* **Safety**: the ledger row exists before the rent call (see `instances`); the instance
  runs a watchdog from ``onstart`` that destroys it at the deadline in its deadline file
  even if the orchestrator is killed; `secure` pushes that deadline out (reserving the
  money first) before a run could outlive it; `release` destroys, and so does an
  ``atexit`` hook.
* **Reuse**: the instances are rented once per experiment; boot, clone and deps are paid
  once per instance; every later step is the SSH backend's.
* **Elastic**: an instance whose slots the executor gave back is destroyed at once
  (`release_slot`); `replenish` rents replacements (same GPU model) for given-back or
  lost ones when queued work needs them.
"""

from __future__ import annotations

import asyncio
import atexit
import math
import os
import shlex
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ratiocinator.backends.base import (
    Backend,
    ElasticCapacity,
    ExitInfo,
    HardwareFinding,
    Host,
    InstanceDeadlines,
    LaunchFailure,
    LaunchRequest,
    RunHandle,
    Slot,
    Stream,
    Workspace,
)
from ratiocinator.backends.ssh import SshBackend, SshSlot
from ratiocinator.backends.vast import reaper
from ratiocinator.backends.vast.api import (
    DEFAULT_BASE_URL,
    STILL_BILLING_DOWN,
    OfferTaken,
    RetryPolicy,
    VastApi,
    is_gone,
)
from ratiocinator.data.probe import rental_findings
from ratiocinator.errors import BackendError, BudgetError, CredentialsError
from ratiocinator.planning.plan import first_arm_count
from ratiocinator.spec.models import LoadedSpec, SshHost
from ratiocinator.store import instances as inst
from ratiocinator.store.ledger import Ledger
from ratiocinator.store.paths import Paths

DEFAULT_DISK_GB = 32.0  # an instance's disk when the spec sets no hardware.disk_gb
RENT_TRIES = 3  # offers tried for one instance when other renters take them first


@dataclass(frozen=True)
class VastSettings:
    """The ``vast:`` block of a spec; defaults follow Vast's usual figures."""

    base_url: str = DEFAULT_BASE_URL
    instances: int | None = None  # default: ceil(concurrency / slots_per_instance), else 1
    slots_per_instance: int = 1
    boot_timeout_s: float = 600.0
    setup_allowance_s: float = 900.0  # clone + deps, paid once per instance
    work_s: float | None = None  # billed work per instance; default: its share of the spec's runs × train_timeout_s
    min_reliability: float = 0.95
    verified: bool = True
    allow_mixed_gpus: bool = False
    ssh_user: str = "root"
    workdir: str = "~/.ratiocinator"  # on the instance
    storage_per_gb_month: float = 0.10  # $/GB/month, Vast's typical storage rate
    poll_s: float = 5.0
    ssh_probe_s: float = 5.0  # how long one SSH attempt may take while the instance boots
    health_check_s: float = 60.0  # a launch re-reads its instance from the API when the last read is older
    api_attempts: int = 6  # tries per API call on 429, 5xx, timeouts and dropped connections
    api_backoff_s: float = 1.0  # the first retry's wait (doubling, with jitter, up to 30 s)
    destroy_confirm_s: float = 60.0  # how long a destroy waits to see the instance gone


@dataclass(frozen=True)
class VastSlot(SshSlot):
    """A slot that names the instance and its GPU model, so each run's ledger row says what it ran on."""

    instance: str = ""

    @property
    def label(self) -> str:
        return f"{self.instance}/{super().label}"


def offer_query(loaded: LoadedSpec, settings: VastSettings) -> dict[str, Any]:
    """The ``POST /bundles/`` query for the spec's hardware: every field becomes a filter."""
    hw = loaded.spec.hardware
    q: dict[str, Any] = {"rentable": {"eq": True}, "rented": {"eq": False}, "type": "on-demand",
                         "order": [["dph_total", "asc"]], "num_gpus": {"gte": max(hw.num_gpus, 1)},
                         "reliability2": {"gte": settings.min_reliability}}
    if settings.verified:
        q["verified"] = {"eq": True}
    if hw.gpu:
        q["gpu_name"] = {"eq": hw.gpu}
    if hw.min_cpu_ram_gb is not None:
        q["cpu_ram"] = {"gte": hw.min_cpu_ram_gb * 1024}  # MB
    if hw.min_inet_down is not None:
        q["inet_down"] = {"gte": hw.min_inet_down}
    if hw.min_cuda_version is not None:
        q["cuda_max_good"] = {"gte": float(".".join(hw.min_cuda_version.split(".")[:2]))}
    if hw.max_dph is not None:
        q["dph_total"] = {"lte": hw.max_dph}
    if hw.disk_gb is not None:
        q["disk_space"] = {"gte": hw.disk_gb}
    return q


def matches(offer: dict[str, Any], query: dict[str, Any]) -> bool:
    """Re-check an offer against the query locally: a marketplace answer is not trusted blindly."""
    for key, cond in query.items():
        if not isinstance(cond, dict):
            continue
        value = offer.get(key)
        for op, want in cond.items():
            if value is None:
                return False
            if (op == "eq" and value != want) or (op == "gte" and value < want) or (op == "lte" and value > want):
                return False
    return True


def pick_offers(offers: list[dict[str, Any]], n: int, allow_mixed: bool) -> list[dict[str, Any]]:
    """The n cheapest offers; without mixing, from the GPU model whose n cheapest cost least in total."""
    offers = sorted(offers, key=lambda o: float(o.get("dph_total", math.inf)))
    if allow_mixed:
        return offers[:n]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for o in offers:
        by_model.setdefault(str(o.get("gpu_name")), []).append(o)
    full = [group[:n] for group in by_model.values() if len(group) >= n]
    if not full:
        return []
    return min(full, key=lambda g: sum(float(o["dph_total"]) for o in g))


def deadline_file(workdir: str) -> str:
    """Where an instance keeps its self-destruct deadline: under the workdir, which SSH resolves the same way."""
    return workdir.rstrip("/") + "/deadline"


def watchdog(deadline: float, label: str, path: str) -> str:
    """The ``onstart`` script: destroy this instance at the deadline in ``path``, re-read every 15 s so
    `VastBackend.secure` can extend it over SSH.

    Vast exposes ``CONTAINER_ID`` and ``CONTAINER_API_KEY`` inside instances; when the API call
    fails the container is stopped instead (``kill 1``), which at least ends GPU billing.
    """
    quoted = '"$HOME"/' + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)
    return (
        f"F={quoted}; mkdir -p \"$(dirname \"$F\")\"; echo {int(deadline)} > \"$F\"; "
        f"echo {label} > \"$(dirname \"$F\")/label\"; "
        "(while [ \"$(date +%s)\" -lt \"$(cat \"$F\" 2>/dev/null || echo 0)\" ]; do sleep 15; done; "
        "curl -s -X DELETE -H \"Authorization: Bearer $CONTAINER_API_KEY\" "
        "\"https://console.vast.ai/api/v0/instances/$CONTAINER_ID/\" || true; sleep 30; kill 1) "
        f">/dev/null 2>&1 & # RC_DEADLINE={int(deadline)} RC_DEADLINE_FILE={path}"
    )


@dataclass
class _Rented:
    row_id: int
    provider_id: str
    offer: dict[str, Any]
    ssh: SshHost | None = None
    slots: list[VastSlot] = field(default_factory=list)
    released: set[Slot] = field(default_factory=set)  # what release_slot was handed: slots of this instance
    ready_s: float | None = None  # rent call → workspace prepared: what getting it back would cost
    preparing: str | None = None  # the commit being prepared there
    commit: str | None = None  # the commit its workspace holds
    checked_at: float = 0.0  # monotonic time the API last showed it running

    @property
    def given_back(self) -> bool:
        return bool(self.slots) and set(self.slots) <= self.released


class VastRunHandle(RunHandle):
    """The SSH handle, plus: a host that stops answering is checked with the API; gone means ``lost``."""

    def __init__(self, inner: RunHandle, backend: VastBackend, rented: _Rented) -> None:
        self.inner, self.backend, self.rented = inner, backend, rented
        self.pid, self.pid_start = inner.pid, inner.pid_start

    def output(self) -> AsyncIterator[tuple[Stream, bytes]]:
        return self.inner.output()

    async def wait(self) -> ExitInfo:
        try:
            return await self.inner.wait()
        except LaunchFailure as exc:
            if await self.backend._vanished(self.rented):
                raise LaunchFailure(f"instance {self.rented.provider_id} vanished mid-run ({exc})", transient=True,
                                    failure="infra") from None
            raise

    async def cancel(self, grace_s: float = 5.0) -> None:
        await self.inner.cancel(grace_s)

    async def reap_strays(self) -> None:
        await self.inner.reap_strays()


DEADLINE_SLACK_S = 120.0  # a run's deadline covers its timeout plus collecting its artifacts


class VastBackend(Backend, ElasticCapacity, InstanceDeadlines):
    """Rented instances, run over SSH; elastic (idle ones given back) and with self-destruct deadlines."""

    name = "vast"

    def __init__(self, home: Path, *, settings: VastSettings | None = None, api_key: str | None = None,
                 ssh_options: dict[str, Any] | None = None) -> None:
        self.home = Path(home).expanduser().resolve()
        self.settings = settings or VastSettings()
        key = api_key if api_key is not None else os.environ.get("VAST_API_KEY", "")
        self.api = VastApi(key, self.settings.base_url, confirm_s=self.settings.destroy_confirm_s,
                           poll_s=min(self.settings.poll_s, 1.0),
                           retry=RetryPolicy(attempts=self.settings.api_attempts,
                                             first_wait_s=self.settings.api_backoff_s))
        self._budget: inst.InstanceAccount | None = None
        self.reaped: list[reaper.Reaped] = []  # what `attach` found a dead orchestrator had left rented
        self.experiment_id: str | None = None  # the research experiment renting (None for an autoresearch session)
        self.ssh_options = ssh_options or {}
        self.rented: list[_Rented] = []
        self.ssh: SshBackend | None = None
        self.storage_dph = 0.0
        self.notes: list[str] = []
        self.gpu_model: str | None = None  # every instance's, unless allow_mixed_gpus
        self._commit: str | None = None  # what prepare() deployed: replacements get the same
        self._info: dict[str, str] = {}
        # Rentals still coming up (the first batch's late instances, replacements), each with how many
        # instances it brings: `stop_arrivals` cancels them when no queued run needs them.
        self._arrivals: dict[asyncio.Task[Any], int] = {}
        self._stop_why: str | None = None  # why arrivals are being cancelled: the note on what they rented
        self._commit_event: asyncio.Event | None = None
        self._grew: asyncio.Event | None = None
        self._destroy_lock = threading.Lock()
        self._destroy_failures: dict[int, BackendError] = {}  # row id -> why its destroy failed (the row stays live)
        atexit.register(self._destroy_all_sync)

    @classmethod
    def from_spec(cls, loaded: LoadedSpec, home: Path) -> VastBackend:
        vast = loaded.spec.vast
        return cls(home, settings=VastSettings(**vast.model_dump()) if vast else VastSettings())

    def elastic(self) -> VastBackend:
        return self

    def deadlines(self) -> VastBackend:
        return self

    # -- plumbing ------------------------------------------------------------------------

    def attach(self, budget: inst.InstanceAccount, *, reap_left: bool = True) -> None:
        """Instances are reserved and charged through their owner's account (an experiment's budget, an
        autoresearch session's); what a dead orchestrator of that owner left rented is destroyed and paid
        now (in ``reaped``, and each an ``instance_reaped`` event). ``reap_left=False``: another backend of
        the same owner did that already, and its instances are live ones."""
        self._budget, self.experiment_id = budget, budget.experiment_id
        if not reap_left:
            return
        self.reaped = reaper.reconcile_at_startup(budget.ledger, self.api, budget.experiment_id,
                                                  budget.ar_session_id)
        for r in self.reaped:
            budget.ledger.event(budget.experiment_id, "instance_reaped", f"{r.provider_id}: {r.outcome}",
                                detail=r.detail)

    @property
    def budget(self) -> inst.InstanceAccount:
        if self._budget is None:
            raise BackendError("the vast backend reserves money through its experiment's budget, and none is attached",
                               hint="call backend.attach(budget) before acquire()")
        return self._budget

    @property
    def ledger(self) -> Ledger:
        return self.budget.ledger

    def ssh_key(self) -> Path:
        """This home's own key pair for instances; only the .pub is ever sent to Vast."""
        key = Paths(self.home).backend(self.name) / "id_ed25519"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ratiocinator-vast", "-f", str(key)],
                           check=True)
        return key

    # -- hardware ------------------------------------------------------------------------

    def check_hardware(self, loaded: LoadedSpec) -> list[HardwareFinding]:
        hw = loaded.spec.hardware
        query = offer_query(loaded, self.settings)
        try:
            offers = [o for o in self.api.search_offers(query) if matches(o, query)]
        except BackendError as exc:
            return [HardwareFinding("offers", "unknown", f"offer search failed: {exc}")]
        n = self._instance_count(loaded)
        picked = pick_offers(offers, n, self.settings.allow_mixed_gpus)
        out = []
        fields = {"gpu": hw.gpu, "num_gpus": hw.num_gpus or None, "min_cpu_ram_gb": hw.min_cpu_ram_gb,
                  "min_inet_down": hw.min_inet_down, "min_cuda_version": hw.min_cuda_version, "max_dph": hw.max_dph,
                  "disk_gb": hw.disk_gb}
        detail = (f"{len(offers)} matching offer(s); cheapest {picked[0]['gpu_name']} at ${picked[0]['dph_total']:g}/h"
                  if picked else f"no {n} offer(s) match (one GPU model unless allow_mixed_gpus): {query}")
        for name, value in fields.items():
            if value is not None:
                out.append(HardwareFinding(name, "ok" if picked else "unmet", detail))
        if hw.image:
            out.append(HardwareFinding("image", "ok", f"instances run {hw.image}"))
        if not out or not picked:
            out.append(HardwareFinding("offers", "ok" if picked else "unmet", detail))
        return out + rental_findings(loaded, self.home, hw.disk_gb or DEFAULT_DISK_GB)  # before anything is rented

    def _instance_count(self, loaded: LoadedSpec) -> int:
        if self.settings.instances:
            return self.settings.instances
        return math.ceil((loaded.spec.concurrency or 1) / self.settings.slots_per_instance)

    def ttl_s(self, loaded: LoadedSpec, n_instances: int) -> float:
        """An instance's whole life: boot + setup + its share of the runs (every attempt)."""
        spec = loaded.spec
        work = self.settings.work_s
        if work is None:
            runs = (max(first_arm_count(spec), 1) * spec.replicates * spec.failure_policy.max_attempts
                    * spec.max_iterations)
            waves = math.ceil(runs / (n_instances * self.settings.slots_per_instance))
            work = waves * spec.train_timeout_s
        return self.settings.boot_timeout_s + self.settings.setup_allowance_s + work

    # -- acquire -------------------------------------------------------------------------

    async def acquire(self, loaded: LoadedSpec) -> Host:
        """Rent the experiment's instances in parallel and return as soon as the first answers SSH.

        The others keep booting in the background and join through `grown` once prepared, so
        no instance idles (billed) waiting for the slowest one. One that fails is destroyed and
        noted; only when every one fails does acquire fail.
        """
        exp_id = self.budget.experiment_id
        n = self._instance_count(loaded)
        picked = await self._pick(loaded, n)
        ttl, disk = self.ttl_s(loaded, len(picked)), loaded.spec.hardware.disk_gb or DEFAULT_DISK_GB
        tasks = [asyncio.create_task(self._bring_up(loaded, exp_id, offer, ttl, disk)) for offer in picked]
        pending: set[asyncio.Task[list[_Rented]]] = set(tasks)
        errors: list[BaseException] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                errors += [exc for t in done if (exc := t.exception()) is not None]
                if any(t.exception() is None for t in done):
                    break
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if not any(t.done() and t.exception() is None for t in tasks):
            raise errors[0]
        for exc in errors:
            self._note_arrival_failure(exc)
        for t in pending:
            arrival = asyncio.create_task(self._arrive(loaded, t))
            arrival.add_done_callback(self._arrived)
            self._arrivals[arrival] = 1
        return self._host()

    async def _bring_up(self, loaded: LoadedSpec, exp_id: str | None, offer: dict[str, Any],
                        ttl: float, disk: float) -> list[_Rented]:
        """Rent one instance and connect to it; destroyed again when either fails."""
        batch: list[_Rented] = []
        try:
            await self._rent(loaded, exp_id, offer, ttl, disk, batch)
            await self._connect(loaded, batch)
        except BaseException:
            await self._scrap(batch, self._stop_why or "renting failed")
            raise
        return batch

    async def _arrive(self, loaded: LoadedSpec, connecting: asyncio.Task[list[_Rented]]) -> list[_Rented]:
        """An instance that was not up when acquire returned: once connected and the commit known, prepare it."""
        batch = await connecting
        try:
            await self._commit_known().wait()
            await self._prepare_batch(loaded, batch)
        except BaseException:
            await self._scrap(batch, self._stop_why or "preparing it failed")
            raise
        return batch

    async def _scrap(self, batch: list[_Rented], why: str) -> None:
        for r in batch:
            if self.ssh is not None and r.ssh is not None and r.slots:
                await self.ssh.drop_host(r.ssh.label)
        await asyncio.to_thread(self._destroy_sync, batch, why)

    def _commit_known(self) -> asyncio.Event:
        if self._commit_event is None:
            self._commit_event = asyncio.Event()
            if self._commit is not None:
                self._commit_event.set()
        return self._commit_event

    def _growth(self) -> asyncio.Event:
        if self._grew is None:
            self._grew = asyncio.Event()
        return self._grew

    def _arrived(self, task: asyncio.Task[list[_Rented]]) -> None:
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            self._note_arrival_failure(exc)
        self._growth().set()

    def _note_arrival_failure(self, exc: BaseException) -> None:
        note = f"an instance of the first batch failed and was destroyed: {str(exc).splitlines()[0][:300]}"
        self.notes.append(note)
        if self.experiment_id is not None:
            self.ledger.event(self.experiment_id, "instance_failed", note, level="warning")

    async def grown(self) -> Host:
        await self._growth().wait()
        self._grew = None
        return self._host()

    async def _prepare_batch(self, loaded: LoadedSpec, batch: list[_Rented]) -> None:
        """Prepare the current commit on the instances of ``batch`` that neither hold it nor are being given
        it (prepare() and arrivals share this)."""
        assert self._commit is not None
        await self._prepare_commit(loaded, self._commit, [r for r in batch if r.slots])

    async def _prepare_commit(self, loaded: LoadedSpec, commit: str, batch: list[_Rented], *,
                              on_output: Callable[[str], None] | None = None) -> Workspace | None:
        """Prepare ``commit`` on the instances of ``batch`` that do not hold it yet: per (instance, commit), as
        the SSH backend does (the commit's bundle, its checkout there, each run's own copy of it); None when
        every one already holds it or is being given it."""
        mine = [r for r in batch if r.commit != commit and r.preparing != commit]
        if not mine:
            return None
        for r in mine:
            r.preparing = commit
        try:
            workspace = await self._require_ssh().prepare_hosts([r.ssh.label for r in mine if r.ssh is not None],
                                                                loaded, commit, on_output=on_output)
        finally:
            for r in mine:
                r.preparing = None
        for r in mine:
            r.commit = commit
        self._mark_ready(mine)
        return workspace

    async def choose_gpu_model(self, loaded: LoadedSpec, n: int) -> str | None:
        """Choose the GPU model ``n`` instances can be rented of (cheapest in total), renting nothing: backends
        that rent one instance each for the same owner are given it (``gpu_model``) so all match."""
        await self._pick(loaded, n)
        return self.gpu_model

    async def _pick(self, loaded: LoadedSpec, n: int, *, besides: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
        """The ``n`` offers to rent (one GPU model: the experiment's, once chosen), none of ``besides``."""
        query = offer_query(loaded, self.settings)
        if self.gpu_model is not None and not self.settings.allow_mixed_gpus:
            query["gpu_name"] = {"eq": self.gpu_model}
        offers = [o for o in await asyncio.to_thread(self.api.search_offers, query)
                  if matches(o, query) and int(o["id"]) not in besides]
        picked = pick_offers(offers, n, self.settings.allow_mixed_gpus)
        if not picked:
            raise BackendError(f"no Vast.ai offer matches the spec's hardware ({len(offers)} offer(s)"
                               f" for {n} instance(s), one GPU model each unless allow_mixed_gpus); query: {query}",
                               hint="relax hardware (gpu, max_dph, min_cuda_version, ...) or vast.min_reliability")
        if self.gpu_model is None:
            self.gpu_model = str(picked[0].get("gpu_name"))
        disk = loaded.spec.hardware.disk_gb or DEFAULT_DISK_GB
        self.storage_dph = disk * self.settings.storage_per_gb_month / (30 * 24)
        return picked

    async def _rent_batch(self, loaded: LoadedSpec, exp_id: str | None, n: int, ttl: float) -> list[_Rented]:
        """Rent ``n`` instances and connect to them; whatever this call rented is destroyed when a step fails."""
        picked = await self._pick(loaded, n)
        disk = loaded.spec.hardware.disk_gb or DEFAULT_DISK_GB
        batch: list[_Rented] = []
        try:
            await asyncio.gather(*(self._rent(loaded, exp_id, offer, ttl, disk, batch) for offer in picked))
            await self._connect(loaded, batch)
        except BaseException:
            await self._scrap(batch, self._stop_why or "renting failed")
            raise
        return batch

    async def _rent(self, loaded: LoadedSpec, exp_id: str | None, offer: dict[str, Any], ttl: float, disk: float,
                    batch: list[_Rented]) -> None:
        """Rent ``offer``, or, when another renter takes it first, the next cheapest offer that fits.

        On a live market an offer can go between our search and our rent; the provider answers
        ``no_such_ask`` and nothing is rented or paid. Up to RENT_TRIES offers are tried; the GPU
        model stays the experiment's once any of its instances was rented.
        """
        tried: set[int] = set()
        for _ in range(RENT_TRIES - 1):
            try:
                return await self._rent_offer(loaded, exp_id, offer, ttl, disk, batch)
            except OfferTaken as exc:
                tried.add(int(offer["id"]))
                self.notes.append(f"{exc.message}; renting another offer")
                if exp_id is not None:
                    self.ledger.event(exp_id, "instance_offer_taken", exc.message, level="warning")
                if not any(r.provider_id for r in self.rented):
                    self.gpu_model = None  # nothing rented yet: the cheapest model that fits may change too
                taken = tried | {int(r.offer["id"]) for r in self.rented}
                (offer,) = await self._pick(loaded, 1, besides=frozenset(taken))
        await self._rent_offer(loaded, exp_id, offer, ttl, disk, batch)

    async def _rent_offer(self, loaded: LoadedSpec, exp_id: str | None, offer: dict[str, Any], ttl: float,
                          disk: float, batch: list[_Rented]) -> None:
        dph = float(offer["dph_total"])
        worst = (dph + self.storage_dph) * ttl / 3600.0
        charge = self.budget.reserve(worst, kind="instance",
                                     note=f"vast offer {offer['id']} {offer.get('gpu_name')} ${dph:g}/h × TTL {ttl:g}s")
        if charge is None:
            what = f"renting {offer.get('gpu_name')} at ${dph:g}/h for up to {ttl:g}s"
            raise BudgetError(self.budget.refusal(what, worst),
                              hint="raise max_dollars, lower train_timeout_s, or pick cheaper hardware")
        deadline = time.time() + ttl
        row = inst.record_requested(self.ledger, experiment_id=exp_id, provider="vast", offer=offer, deadline=deadline,
                                    charges=[charge], ar_session_id=self.budget.ar_session_id)
        rented = _Rented(row.id, "", offer)
        self.rented.append(rented)
        batch.append(rented)
        body = {"client_id": "me", "image": loaded.spec.hardware.image or "pytorch/pytorch:latest", "disk": disk,
                "onstart": watchdog(deadline, row.label, deadline_file(self.settings.workdir)), "runtype": "ssh",
                "label": row.label}
        try:
            rented.provider_id = str(await asyncio.to_thread(self.api.rent, int(offer["id"]), body))
        except OfferTaken as exc:
            await asyncio.to_thread(self._never_rented, rented, exc.message)
            self.rented.remove(rented)
            batch.remove(rented)
            raise
        inst.update(self.ledger, row.id, provider_id=rented.provider_id, state="booting")
        pub = self.ssh_key().with_suffix(".pub").read_text()
        await asyncio.to_thread(self.api.attach_ssh_key, rented.provider_id, pub)
        boot_deadline = time.monotonic() + self.settings.boot_timeout_s
        while True:
            shown = await asyncio.to_thread(self.api.show, rented.provider_id)
            if shown is None:
                raise BackendError(f"instance {rented.provider_id} disappeared while booting")
            if shown.get("actual_status") == "running" and shown.get("ssh_host") and shown.get("ssh_port"):
                rented.checked_at = time.monotonic()
                break
            if time.monotonic() > boot_deadline:
                raise BackendError(f"instance {rented.provider_id} did not boot within"
                                   f" {self.settings.boot_timeout_s:g}s (status {shown.get('actual_status')!r});"
                                   " destroyed",
                                   hint="raise vast.boot_timeout_s, or exclude slow hosts with a higher"
                                        " min_reliability")
            await asyncio.sleep(self.settings.poll_s)
        gpus = list(range(int(offer.get("num_gpus", 0)))) if loaded.spec.hardware.num_gpus else None
        # Validated from a mapping, as the spec is: the fields left out keep their Field defaults (which a type
        # checker without pydantic's plugin would take for required keywords).
        rented.ssh = SshHost.model_validate({
            "host": str(shown["ssh_host"]), "port": int(shown["ssh_port"]), "user": self.settings.ssh_user,
            "identity_file": str(self.ssh_key()),
            "known_hosts": str(Paths(self.home).backend(self.name) / "known_hosts"),
            "trust_on_first_use": True, "workdir": self.settings.workdir,
            "slots": self.settings.slots_per_instance, "gpus": gpus})
        inst.update(self.ledger, row.id, state="running", running_at=time.time(),
                    gpu_name=str(shown.get("gpu_name", "")))

    async def _connect(self, loaded: LoadedSpec, batch: list[_Rented]) -> None:
        """SSH into the batch's instances (sshd may come up after 'running'), and give them their slots."""
        hosts = [r.ssh for r in batch if r.ssh is not None]
        if self.ssh is None:
            self.ssh = SshBackend([], self.home, allow_empty=True, **self.ssh_options)
        deadline = time.monotonic() + self.settings.boot_timeout_s
        while True:
            try:
                slots, info = await self.ssh.add_hosts(hosts, loaded, probe_budget_s=self.settings.ssh_probe_s)
                break
            except BackendError as exc:
                if time.monotonic() > deadline:
                    message = f"SSH to the rented instance(s) failed for {self.settings.boot_timeout_s:g}s: {exc}"
                    hint = "the instances were destroyed; check the image runs sshd (runtype ssh)"
                    raise BackendError(message, hint=hint) from None
                await asyncio.sleep(self.settings.poll_s)
        by_label = {r.ssh.label: r for r in batch if r.ssh is not None}
        for s in slots:
            assert isinstance(s, SshSlot)
            r = by_label[s.machine]
            r.slots.append(VastSlot(s.index, s.gpus, s.machine, f"vast{r.provider_id}:{r.offer.get('gpu_name')}"))
        self._info.update(info)
        for r in batch:
            self._info[f"vast {r.provider_id}"] = (f"{r.offer.get('gpu_name')} x{r.offer.get('num_gpus')} at"
                                                   f" ${r.offer.get('dph_total')}/h, offer {r.offer.get('id')},"
                                                   f" ledger row {r.row_id}")

    def _live(self) -> list[_Rented]:
        """Instances that can take runs: connected, not given back, running, and prepared once prepare() ran."""
        return [r for r in self.rented
                if r.slots and not r.given_back and (self._commit is None or r.ready_s is not None)
                and inst.get(self.ledger, r.row_id).state == "running"]

    def _host(self) -> Host:
        """One host whose slots are every usable slot of every live instance."""
        live = self._live()
        names = ",".join(f"{r.provider_id}:{r.offer.get('gpu_name')}" for r in live)
        slots = tuple(s for r in live for s in r.slots if s not in r.released)
        return Host(name=f"vast:{names}", slots=slots, price_per_hour=0.0, info=dict(self._info))

    # -- elastic capacity ----------------------------------------------------------------

    def _owner(self, slot: Slot) -> _Rented | None:
        return next((r for r in self.rented if slot in r.slots), None)

    def slot_usable(self, slot: Slot) -> bool:
        rented = self._owner(slot)
        return (rented is not None and slot not in rented.released
                and inst.get(self.ledger, rented.row_id).state == "running")

    def reacquire_s(self) -> float:
        """Measured rent → prepared time of this experiment's instances (their mean)."""
        measured = [r.ready_s for r in self.rented if r.ready_s is not None]
        if measured:
            return sum(measured) / len(measured)
        return self.settings.boot_timeout_s + self.settings.setup_allowance_s

    async def release_slot(self, host: Host, slot: Slot) -> None:
        rented = self._owner(slot)
        if rented is None:
            return
        rented.released.add(slot)
        if rented.given_back:
            if self.ssh is not None and rented.ssh is not None:
                await self.ssh.drop_host(rented.ssh.label)
            await asyncio.to_thread(self._destroy_sync, [rented], "no work left for it")

    async def replenish(self, host: Host, loaded: LoadedSpec, runs_left: int) -> Host:
        """Rent (and prepare) instances given back or lost, up to what ``runs_left`` runs can use.

        Returns without new capacity when `stop_arrivals` cancelled the rental meanwhile.
        """
        live = self._live()
        per = self.settings.slots_per_instance
        want = min(self._instance_count(loaded), max(math.ceil(runs_left / per), 1))
        missing = want - len(live) - self.arriving()
        if missing <= 0 or self._commit is None:
            return self._host()
        spec = loaded.spec
        waves = math.ceil(runs_left * spec.failure_policy.max_attempts / (want * per))
        ttl = self.settings.boot_timeout_s + self.settings.setup_allowance_s + waves * spec.train_timeout_s
        renting = asyncio.create_task(self._replace(loaded, missing, ttl))
        self._arrivals[renting] = missing
        try:
            await asyncio.wait({renting})
        except BaseException:  # the caller gave up: so does the rental (it destroys what it rented)
            renting.cancel()
            await asyncio.gather(renting, return_exceptions=True)
            raise
        finally:
            self._arrivals.pop(renting, None)
        if not renting.cancelled():
            renting.result()  # its error, if any
        return self._host()

    async def _replace(self, loaded: LoadedSpec, n: int, ttl: float) -> None:
        batch = await self._rent_batch(loaded, self.budget.experiment_id, n, ttl)
        try:
            await self._prepare_batch(loaded, batch)
        except BaseException:
            await self._scrap(batch, self._stop_why or "preparing a replacement failed")
            raise

    def arriving(self) -> int:
        """Instances still coming up; a rental being cancelled (destroying what it rented) brings none."""
        return sum(n for task, n in self._arrivals.items() if not task.done() and not task.cancelling())

    async def stop_arrivals(self, why: str) -> None:
        coming = self.arriving()
        if coming and self.experiment_id is not None:
            self.ledger.event(self.experiment_id, "arrivals_stopped",
                              f"stopped renting {coming} instance(s) still coming up: {why}", instances=coming)
        await self._cancel_arrivals(why)

    async def _cancel_arrivals(self, why: str) -> None:
        """Cancel every rental still coming up; each destroys what it rented, noting ``why``."""
        tasks = [t for t in self._arrivals if not t.done()]
        self._stop_why = why
        try:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._stop_why = None
        for task in tasks:
            self._arrivals.pop(task, None)

    async def secure(self, host: Host, slot: Slot, run_s: float) -> str | None:
        """Push the instance's self-destruct deadline past this run's timeout when it is too close.

        The extension is reserved against ``max_dollars`` first (refused: the reason is
        returned and the budget stops the experiment), then written to the deadline file the
        watchdog re-reads. A failed write is noted and the run goes ahead: if the instance
        then dies at its old deadline, the run is lost as ``infra`` and retried elsewhere.
        """
        rented = self._owner(slot)
        if rented is None or self.ssh is None:
            return None
        row = inst.get(self.ledger, rented.row_id)
        needed = time.time() + run_s + DEADLINE_SLACK_S
        if row.deadline >= needed:
            return None
        extra_s = needed - row.deadline
        amount = (row.dph + self.storage_dph) * extra_s / 3600.0
        exp_id = self.budget.experiment_id
        charge = self.budget.reserve(amount, kind="instance",
                                     note=f"vast {rented.provider_id}: deadline +{extra_s:.0f}s")
        if charge is None:
            return "budget: " + self.budget.refusal(
                f"keeping instance {rented.provider_id} alive {extra_s:.0f}s longer for the next run", amount)
        machine = self.ssh._machine(slot)

        async def write(_: Any, sftp: Any) -> None:
            async with sftp.open(deadline_file(machine.workdir), "w") as fh:
                await fh.write(f"{int(needed)}\n")

        try:
            await machine.call(write)
        except (LaunchFailure, OSError, BackendError) as exc:
            self.budget.settle(charge, 0.0)
            self.notes.append(f"instance {rented.provider_id}: extending its deadline failed ({exc});"
                              " it may stop mid-run")
            return None
        inst.update(self.ledger, row.id, deadline=needed, charges=[*row.charges, charge])
        self.ledger.event(exp_id, "instance_extended", f"instance {rented.provider_id}: deadline +{extra_s:.0f}s",
                          provider_id=rented.provider_id, deadline=needed, reserved=amount)
        return None

    # -- the rest is SSH -----------------------------------------------------------------

    def _require_ssh(self) -> SshBackend:
        if self.ssh is None:
            raise LaunchFailure("no instance is rented (acquire() did not run)", transient=False)
        return self.ssh

    async def prepare(self, host: Host, loaded: LoadedSpec, commit: str, *,
                      on_output: Callable[[str], None] | None = None) -> Workspace:
        self._commit = commit
        self._commit_known().set()  # instances still arriving prepare themselves
        mine = [r for r in self.rented if r.slots and not r.given_back]
        workspace = await self._prepare_commit(loaded, commit, mine, on_output=on_output)
        if workspace is None:  # every instance holds the commit already: its workspace, as the SSH backend says it
            workspace = await self._require_ssh().prepare_hosts([], loaded, commit)
        return workspace

    async def environments(self, host: Host, workspace: Workspace, loaded: LoadedSpec) -> list[dict[str, Any]]:
        """Each prepared instance's environment, read over its SSH connection (see `SshBackend.environments`),
        named by the instance."""
        if self.ssh is None:
            return []
        instances = {r.ssh.label: f"vast:{r.provider_id}" for r in self.rented if r.ssh is not None}
        return [{**found, "host": instances.get(found["host"], found["host"]), "ssh": found["host"]}
                for found in await self.ssh.environments(host, workspace, loaded)]

    def _mark_ready(self, batch: list[_Rented]) -> None:
        now = time.time()
        for r in batch:
            if r.ready_s is None and r.slots:
                r.ready_s = now - inst.get(self.ledger, r.row_id).created_at

    async def launch(self, host: Host, request: LaunchRequest) -> RunHandle:
        ssh = self._require_ssh()
        rented = self._owner(request.slot)
        if rented is None:
            raise LaunchFailure(f"slot {request.slot.label} belongs to no instance this backend rented",
                                transient=False)
        row = inst.get(self.ledger, rented.row_id)
        if row.state not in ("running",):
            raise LaunchFailure(f"instance {rented.provider_id} is {row.state}", transient=False, failure="infra")
        if time.monotonic() - rented.checked_at >= self.settings.health_check_s and await self._vanished(rented):
            raise LaunchFailure(f"instance {rented.provider_id} is no longer running at the provider", transient=True)
        try:
            handle = await ssh.launch(host, replace(request, slot=request.slot))
        except LaunchFailure as exc:
            if await self._vanished(rented):
                raise LaunchFailure(f"instance {rented.provider_id} vanished: {exc}", transient=True) from None
            raise
        return VastRunHandle(handle, self, rented)

    async def _vanished(self, rented: _Rented) -> bool:
        """Ask the API whether the instance can still run anything.

        Gone at the provider: the row is ``lost`` and settled. Down but still billing
        (stopped, exited, offline, ...): it is destroyed first, and stays live in the ledger
        until that is confirmed. An API failure is no answer (False); a refused key
        (`CredentialsError`) stops the experiment: what cannot be seen is never taken for gone.
        """
        try:
            shown = await asyncio.to_thread(self.api.show, rented.provider_id)
        except CredentialsError:
            raise
        except BackendError:
            return False
        status = None if shown is None else shown.get("actual_status")
        if not is_gone(shown) and status not in STILL_BILLING_DOWN:
            rented.checked_at = time.monotonic()
            return False
        if not is_gone(shown):  # it cannot run, but it bills until destroyed
            await asyncio.to_thread(self._destroy_sync, [rented], f"{status} at the provider mid-experiment")
            return True
        now = time.time()
        inst.update(self.ledger, rented.row_id, state="lost", destroyed_at=now, note="vanished at the provider mid-run")
        await asyncio.to_thread(reaper.settle, self.ledger, inst.get(self.ledger, rented.row_id), self.api,
                                end=now, storage_dph=self.storage_dph)
        return True

    async def release(self, host: Host) -> None:
        """Destroy every instance; raise when any may still be billing (its row stays live for the reaper).

        The backend then holds no commit: a later `acquire` (autoresearch rents again after giving an
        idle instance back) starts over, and its instances take runs once `prepare` gives them a commit.
        """
        await self._cancel_arrivals("work ended")
        if self.ssh is not None:
            await self.ssh.release(host)
        await self._destroy_all("work ended")
        self._commit, self._commit_event = None, None
        left = [r for r in self.rented if inst.get(self.ledger, r.row_id).state in inst.LIVE_STATES]
        if left:
            failures = [self._destroy_failures.get(r.row_id) for r in left]
            why = "; ".join(f"instance {r.provider_id or '?'}: {f.message if f else 'not destroyed'}"
                            for r, f in zip(left, failures, strict=True))
            deadlines = ", ".join(f"{r.provider_id or '?'} at {_clock(inst.get(self.ledger, r.row_id).deadline)}"
                                  for r in left)
            error = CredentialsError if any(isinstance(f, CredentialsError) for f in failures) else BackendError
            raise error(f"{len(left)} rented instance(s) could not be destroyed and may still bill: {why}",
                        hint=f"each destroys itself at its deadline ({deadlines}); `ratiocinator instances --reap`"
                             " destroys them now (once the key works)")

    async def _destroy_all(self, why: str) -> None:
        await asyncio.to_thread(self._destroy_all_sync, why)

    def _destroy_all_sync(self, why: str = "orchestrator exiting") -> None:
        """Destroy every instance this backend rented that is still live, and settle it (idempotent)."""
        self._destroy_sync(list(self.rented), why)

    def _destroy_sync(self, batch: list[_Rented], why: str) -> None:
        for rented in batch:
            with self._destroy_lock:  # two worker threads (a give-back, a cancelled rental) never settle one twice
                self._destroy_one(rented, why)

    def _never_rented(self, rented: _Rented, why: str) -> None:
        """A row whose offer was taken before the rent: nothing existed, so it closes at $0 (its reservation freed)."""
        row = inst.get(self.ledger, rented.row_id)
        inst.update(self.ledger, row.id, state="destroyed", destroyed_at=row.created_at, note=why)
        reaper.settle(self.ledger, inst.get(self.ledger, row.id), None, end=row.created_at)

    def _destroy_one(self, rented: _Rented, why: str) -> None:
        try:
            row = inst.get(self.ledger, rented.row_id)
        except Exception:  # noqa: BLE001 - the ledger closed at exit: the reaper will finish
            return
        if row.state not in inst.LIVE_STATES:
            return
        now = time.time()
        if rented.provider_id:
            inst.update(self.ledger, row.id, state="destroying")
            try:
                self.api.destroy(rented.provider_id)
            except BackendError as exc:  # a refused key too: the row stays live, never taken for gone
                self._destroy_failures[row.id] = exc
                message = f"destroying instance {rented.provider_id} failed: {exc.message}"
                self.notes.append(f"{message}; `ratiocinator instances --reap` retries")
                if row.experiment_id is not None:
                    self.ledger.event(row.experiment_id, "instance_destroy_failed", message, level="error",
                                      provider_id=rented.provider_id)
                return
        self._destroy_failures.pop(row.id, None)
        inst.update(self.ledger, row.id, state="destroyed", destroyed_at=now, note=why)
        _, source = reaper.settle(self.ledger, inst.get(self.ledger, row.id), self.api if rented.provider_id else None,
                                end=now, storage_dph=self.storage_dph)
        if "unavailable" in source:
            self.notes.append(f"instance {rented.provider_id}: cost from {source}")
        if rented.ssh is not None:
            _forget_host_key(Paths(self.home).ssh_known_hosts, rented.ssh)

    def kill_orphan(self, pid: int, pid_start: int | None) -> bool:
        """Runs die with their instance; the reaper destroys instances, so only a live SSH record can be killed."""
        ssh = self.ssh or SshBackend([SshHost.model_validate({"host": "unused"})], self.home)
        return ssh.kill_orphan(pid, pid_start)


def _clock(at: float) -> str:
    """Local wall-clock time as HH:MM."""
    return time.strftime("%H:%M", time.localtime(at))


def _forget_host_key(pin_file: Path, host: SshHost) -> None:
    """A destroyed instance's SSH endpoint is reused by Vast for others: drop its pinned key."""
    try:
        lines = pin_file.read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return
    name = host.known_hosts_name + " "
    kept, skip_note = [], False
    for line in reversed(lines):
        if line.startswith(name):
            skip_note = True
            continue
        if skip_note and line.startswith("# pinned on first use") and host.label in line:
            skip_note = False
            continue
        skip_note = False
        kept.append(line)
    pin_file.write_text("".join(reversed(kept)))


__all__ = ["VastBackend", "VastRunHandle", "VastSettings", "VastSlot", "offer_query", "pick_offers", "watchdog"]
