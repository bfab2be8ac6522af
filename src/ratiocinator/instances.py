"""Rented instances: the Vast.ai REST client, the ``instances`` ledger rows, and the reaper.

Safety rests on three things: a ledger row is written (``requested``) *before* the rent
call, and the instance carries a label naming that row, so a crash between the call and
the ledger update still leaves it findable by listing the account's instances; every
instance has a self-destruct deadline (its TTL), recorded in the row; and `reap`
destroys every instance the ledger thinks may be live (plus any labelled instance the
provider lists that the ledger has closed), and settles its money.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from .errors import BackendError
from .ledger import Ledger

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
LABEL_PREFIX = "ratiocinator-"
LIVE_STATES = ("requested", "booting", "running", "destroying")
DOWN_STATUSES = ("exited", "offline", "stopped", "deleted")
MAX_CHARGE_PAGES = 100
BILLING_SLACK_S = 5.0  # clock skew and whole seconds: a charge ending this close to the end covers it


class VastError(BackendError):
    """The Vast.ai API refused or failed a call."""


class BillingUnavailable(Exception):
    """The billing endpoint failed: costs fall back to lifetime × price, and say so."""


class VastApi:
    """The handful of Vast.ai endpoints the backend uses (stdlib HTTP, sync; async callers use a thread).

    The key travels only in the ``Authorization`` header and never appears in an error.
    """

    def __init__(self, api_key: str, base_url: str = DEFAULT_BASE_URL, *, timeout_s: float = 30.0) -> None:
        if not api_key:
            raise BackendError("no Vast.ai API key", hint="export VAST_API_KEY=... (from https://cloud.vast.ai/account/)")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json",
                         "Content-Type": "application/json"}

    def __repr__(self) -> str:  # never the key
        return f"VastApi({self.base_url!r})"

    def _call(self, method: str, path: str, *, body: Any = None, missing_ok: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        where = path.split("?", 1)[0]  # errors name the endpoint, not its (long) query
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self._headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise VastError(f"Vast.ai API {method} {where} answered HTTP {exc.code}: {detail}",
                            hint="an HTTP 401/403 means the API key is wrong or lacks permission") from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise VastError(f"Vast.ai API {method} {where} failed: {getattr(exc, 'reason', exc)}",
                            hint="check the network and the API base URL") from None
        try:
            return json.loads(text)
        except ValueError:
            raise VastError(f"Vast.ai API {method} {where} answered non-JSON: {text[:200]}") from None

    def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self._call("POST", "/bundles/", body=query).get("offers", []))

    def rent(self, offer_id: int, body: dict[str, Any]) -> int:
        reply = self._call("PUT", f"/asks/{offer_id}/", body=body)
        if not reply.get("success") or reply.get("new_contract") is None:
            raise VastError(f"renting offer {offer_id} failed: {json.dumps(reply)[:300]}",
                            hint="the offer may have been taken; searching again picks another")
        return int(reply["new_contract"])

    def show(self, instance_id: int | str) -> dict[str, Any] | None:
        """The instance, or None when the provider no longer knows it."""
        reply = self._call("GET", f"/instances/{instance_id}/", missing_ok=True)
        if not reply:
            return None
        inst = reply.get("instances")
        return inst if isinstance(inst, dict) and inst else None

    def list(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/instances/").get("instances", []))

    def destroy(self, instance_id: int | str) -> bool:
        """True when destroyed now, False when it was already gone."""
        return self._call("DELETE", f"/instances/{instance_id}/", missing_ok=True) is not None

    def attach_ssh_key(self, instance_id: int | str, public_key: str) -> None:
        if "PRIVATE" in public_key:
            raise BackendError("refusing to send a private key to Vast.ai")  # only the .pub ever leaves
        self._call("POST", f"/instances/{instance_id}/ssh/", body={"ssh_key": public_key.strip()})

    def instance_charges(self, start: float, end: float) -> list[dict[str, Any]]:
        """The account's instance charges for the days of [start, end] (``GET /charges/``, every page).

        Each is ``{start, end, type, source: "instance-<id>", description, amount, metadata, items}``;
        the charge of a day may still be missing shortly after it (then the instance is not listed).
        """
        day = 86_400
        filters = {"day": {"gte": int(start) // day * day, "lte": (int(end) // day + 1) * day - 1},
                   "type": {"in": ["instance"]}}
        results: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(MAX_CHARGE_PAGES):
            query = {"select_filters": json.dumps(filters), **({"next_token": token} if token else {})}
            try:
                reply = self._call("GET", "/charges/?" + urllib.parse.urlencode(query))
            except VastError as exc:
                raise BillingUnavailable(str(exc)) from None
            page = reply.get("results") if isinstance(reply, dict) else None
            if not isinstance(page, list):
                raise BillingUnavailable(f"unexpected charges reply: {json.dumps(reply)[:200]}")
            results += [r for r in page if isinstance(r, dict)]
            token = reply.get("next_token")
            if not token:
                return results
        raise BillingUnavailable(f"the charges did not end within {MAX_CHARGE_PAGES} pages")


# -- ledger rows ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRow:
    id: int
    experiment_id: str | None
    provider: str
    provider_id: str | None
    label: str
    offer: dict[str, Any]
    gpu_name: str
    dph: float
    state: str
    deadline: float
    created_at: float
    running_at: float | None
    destroyed_at: float | None
    cost: float | None
    cost_source: str
    charges: list[int]
    note: str


def _row(r: sqlite3.Row) -> InstanceRow:
    d = dict(r)
    d["offer"] = json.loads(d.pop("offer_json"))
    d["charges"] = json.loads(d.pop("charges_json"))
    return InstanceRow(**d)


def record_requested(ledger: Ledger, *, experiment_id: str | None, provider: str, offer: dict[str, Any],
                     deadline: float, charges: list[int]) -> InstanceRow:
    """The row written before renting; its id names the instance (label) so a crash leaves it findable."""
    now = time.time()
    with ledger.transaction() as db:
        cur = db.execute(
            "INSERT INTO instances (experiment_id, provider, label, offer_json, gpu_name, dph, state, deadline,"
            " created_at, charges_json) VALUES (?, ?, '', ?, ?, ?, 'requested', ?, ?, ?)",
            (experiment_id, provider, json.dumps(offer), str(offer.get("gpu_name", "")),
             float(offer.get("dph_total", 0.0)), deadline, now, json.dumps(charges)))
        row_id = int(cur.lastrowid)
        db.execute("UPDATE instances SET label = ? WHERE id = ?", (f"{LABEL_PREFIX}{row_id}", row_id))
    return get(ledger, row_id)


def get(ledger: Ledger, row_id: int) -> InstanceRow:
    r = ledger.db.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()
    if r is None:
        raise BackendError(f"no instance row {row_id} in {ledger.path}")
    return _row(r)


def update(ledger: Ledger, row_id: int, **fields: Any) -> None:
    if "charges" in fields:
        fields["charges_json"] = json.dumps(fields.pop("charges"))
    cols = ", ".join(f"{k} = ?" for k in fields)
    with ledger.transaction() as db:
        db.execute(f"UPDATE instances SET {cols} WHERE id = ?", (*fields.values(), row_id))


def rows(ledger: Ledger, *, live: bool = False, experiment_id: str | None = None) -> list[InstanceRow]:
    query, args = "SELECT * FROM instances WHERE 1", []
    if live:
        query += f" AND state IN ({','.join('?' * len(LIVE_STATES))})"
        args += list(LIVE_STATES)
    if experiment_id is not None:
        query += " AND experiment_id = ?"
        args.append(experiment_id)
    return [_row(r) for r in ledger.db.execute(query + " ORDER BY id", args)]


# -- money ------------------------------------------------------------------------------------


def lifetime_cost(row: InstanceRow, end: float, storage_dph: float = 0.0) -> float:
    """What the instance cost by the clock: (end − rent time) × (GPU price + storage), capped at its deadline."""
    hours = max(0.0, min(end, row.deadline) - row.created_at) / 3600.0
    return hours * (row.dph + storage_dph)


def billed_cost(api: VastApi, row: InstanceRow, end: float) -> float | None:
    """The provider's own charge for this instance (GPU, storage, bandwidth); None until the charges
    listed cover its whole lifetime (they lag), so a partial bill never understates what was spent."""
    return _billed(api.instance_charges(row.created_at, end), row, end)


def _billed(listed: list[dict[str, Any]], row: InstanceRow, end: float) -> float | None:
    source = f"instance-{row.provider_id}"
    charges = [r for r in listed if r.get("source") == source]
    try:
        amount = sum(float(r["amount"]) for r in charges)
        covered_until = max((float(r["end"]) for r in charges), default=0.0)
    except (KeyError, TypeError, ValueError):
        raise BillingUnavailable(f"a charge of {source} lacks a numeric amount or end: {charges[:2]}") from None
    return amount if covered_until >= end - BILLING_SLACK_S else None


def settle(ledger: Ledger, row: InstanceRow, api: VastApi | None, *, end: float, storage_dph: float = 0.0) -> tuple[float, str]:
    """Fix the instance's cost (billing when available, else lifetime × price) and settle its reservations.

    Reservations are filled in order and each is capped at what it reserved: the TTL
    bounds the lifetime, so the clock cost never exceeds the sum reserved.
    """
    cost, source = lifetime_cost(row, end, storage_dph), "lifetime × price"
    if api is not None and row.provider_id is not None:
        try:
            billed = billed_cost(api, row, end)
            if billed is not None:
                cost, source = billed, "provider billing"
            else:
                source += " (the provider's charges do not cover this instance's lifetime yet)"
        except BillingUnavailable as exc:
            source += f" (billing unavailable: {str(exc)[:200]})"
    _fill_charges(ledger, row, cost, state="reserved")
    update(ledger, row.id, cost=cost, cost_source=source)
    return cost, source


def _fill_charges(ledger: Ledger, row: InstanceRow, cost: float, *, state: str) -> None:
    """Spread ``cost`` over the instance's charges in ``state``, in order, each capped at what it reserved."""
    left = cost
    for charge_id in row.charges:
        r = ledger.db.execute("SELECT reserved, state FROM charges WHERE id = ?", (charge_id,)).fetchone()
        if r is None or r["state"] != state:
            continue
        part = min(left, float(r["reserved"]))
        if state == "reserved":
            ledger.settle(charge_id, part)
        else:
            ledger.resettle(charge_id, part)
        left -= part


@dataclass(frozen=True)
class Reconciled:
    row_id: int
    provider_id: str
    experiment_id: str | None
    estimated: float  # what was settled at the end: lifetime × price
    billed: float


def reconcile_billing(ledger: Ledger, api: VastApi, *, experiment_id: str | None = None) -> list[Reconciled]:
    """Replace the lifetime × price estimate of ended instances by the provider's charge, once listed.

    At destroy time the provider's charges usually lag, so the cost settled then is the clock's;
    this records what the provider billed (instances.cost, and the experiment's charges, each
    still capped at what it reserved), with an ``instance_reconciled`` event.
    """
    ended = [row for row in rows(ledger, experiment_id=experiment_id)
             if row.state not in LIVE_STATES and row.provider_id is not None and row.destroyed_at is not None
             and row.cost_source.startswith("lifetime × price")]
    if not ended:
        return []
    # One listing for them all (BillingUnavailable: the caller says so).
    listed = api.instance_charges(min(r.created_at for r in ended), max(r.destroyed_at or 0.0 for r in ended))
    out: list[Reconciled] = []
    for row in ended:
        assert row.destroyed_at is not None and row.provider_id is not None
        billed = _billed(listed, row, row.destroyed_at)
        if billed is None:
            continue
        _fill_charges(ledger, row, billed, state="settled")
        update(ledger, row.id, cost=billed, cost_source=f"provider billing (reconciled {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)")
        estimated = row.cost or 0.0
        if row.experiment_id is not None:
            ledger.event(row.experiment_id, "instance_reconciled",
                         f"instance {row.provider_id}: ${estimated:.4f} (lifetime × price) → ${billed:.4f} billed",
                         provider_id=row.provider_id, estimated=estimated, billed=billed)
        out.append(Reconciled(row.id, row.provider_id, row.experiment_id, estimated, billed))
    return out


def runs_on(row: InstanceRow, slots: dict[int, str]) -> list[int]:
    """The run ids whose slot (``vast<provider id>:<gpu>/...``) names this instance."""
    prefix = f"vast{row.provider_id}:"
    return [run_id for run_id, slot in slots.items() if row.provider_id and slot.startswith(prefix)]


def run_shares(instance_rows: list[InstanceRow], runs: dict[int, tuple[str, float]]) -> dict[int, float]:
    """Each instance's settled cost split over the runs it served, by wall time (boot, setup and idle included).

    ``runs``: run id -> (slot label, wall seconds). An instance that served no run keeps its cost
    to itself (it shows in the instances table, not in any arm).
    """
    shares: dict[int, float] = {}
    slots = {run_id: slot for run_id, (slot, _) in runs.items()}
    for row in instance_rows:
        served = runs_on(row, slots)
        total = sum(runs[r][1] for r in served)
        for run_id in served:
            shares[run_id] = shares.get(run_id, 0.0) + (row.cost or 0.0) * (
                runs[run_id][1] / total if total > 0 else 1.0 / len(served))
    return shares


# -- the reaper -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reaped:
    row_id: int | None
    provider_id: str
    outcome: str  # destroyed | already_gone | orphan_destroyed | error
    detail: str = ""


def _destroy_row(ledger: Ledger, api: VastApi, row: InstanceRow, listed: dict[str, dict[str, Any]], why: str) -> Reaped:
    provider_id = row.provider_id
    if provider_id is None:  # crashed between the rent call and the ledger update: find it by label
        match = next((i for i in listed.values() if i.get("label") == row.label), None)
        provider_id = str(match["id"]) if match else None
    now = time.time()
    if provider_id is None:
        update(ledger, row.id, state="destroyed", destroyed_at=now, note=f"{why}; never rented (no instance has its label)")
        settle(ledger, get(ledger, row.id), None, end=row.created_at)
        return Reaped(row.id, "", "already_gone", "never rented")
    update(ledger, row.id, provider_id=provider_id, state="destroying")
    try:
        gone_now = api.destroy(provider_id)
    except VastError as exc:
        return Reaped(row.id, provider_id, "error", str(exc))
    update(ledger, row.id, state="destroyed", destroyed_at=now, note=why)
    settle(ledger, get(ledger, row.id), api, end=now)
    return Reaped(row.id, provider_id, "destroyed" if gone_now else "already_gone", why)


def reap(ledger: Ledger, api: VastApi, *, experiment_id: str | None = None, expired_only: bool = False) -> list[Reaped]:
    """Destroy every instance the ledger knows may be live (``expired_only``: only those past their deadline).

    Also destroys instances the provider lists with one of our labels whose ledger row is
    closed or missing (left by a crash); with ``experiment_id`` only that experiment's.
    """
    listed = {str(i.get("id")): i for i in api.list()}
    out: list[Reaped] = []
    now = time.time()
    for row in rows(ledger, live=True, experiment_id=experiment_id):
        if expired_only and row.deadline > now:
            continue
        why = "past its self-destruct deadline" if row.deadline <= now else "reaped"
        out.append(_destroy_row(ledger, api, row, listed, why))
    handled = {r.provider_id for r in out}
    if experiment_id is None and not expired_only:
        known = {r.label: r for r in rows(ledger)}
        for inst in listed.values():
            label = str(inst.get("label") or "")
            if (not label.startswith(LABEL_PREFIX) or inst.get("actual_status") in ("deleted",)
                    or str(inst.get("id")) in handled):
                continue
            row = known.get(label)
            if row is not None and row.state in LIVE_STATES:
                continue  # handled above
            try:
                api.destroy(inst["id"])
                out.append(Reaped(row.id if row else None, str(inst["id"]), "orphan_destroyed", label))
            except VastError as exc:
                out.append(Reaped(row.id if row else None, str(inst["id"]), "error", str(exc)))
    return out


def reconcile_at_startup(ledger: Ledger, api: VastApi, experiment_id: str) -> list[Reaped]:
    """What ``research`` does first on resume: the dead orchestrator's instances are destroyed and paid."""
    return reap(ledger, api, experiment_id=experiment_id)


__all__ = ["BillingUnavailable", "InstanceRow", "Reaped", "VastApi", "VastError", "get", "lifetime_cost", "reap",
           "reconcile_at_startup", "record_requested", "rows", "run_shares", "runs_on", "settle", "update"]
