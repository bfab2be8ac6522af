"""Vast.ai instances and money: settling an instance's cost (the provider's bill, else lifetime ×
price), reconciling estimates with bills once listed, and the reaper.

See `ratiocinator.store.instances` for the rows and labels this works over.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ratiocinator.backends.vast.api import (
    DEFAULT_BASE_URL,
    BillingUnavailable,
    VastApi,
    VastAuthError,
    VastError,
    is_gone,
)
from ratiocinator.store.instances import (
    LIVE_STATES,
    InstanceRow,
    get,
    is_legacy_label,
    label_owner,
    rows,
    settle_charges,
    update,
)
from ratiocinator.store.ledger import Ledger


def api_from_env() -> VastApi:
    """The client ``instances`` uses: the key from ``VAST_API_KEY``, the v0 root from ``VAST_API_URL``."""
    return VastApi(os.environ.get("VAST_API_KEY", ""), os.environ.get("VAST_API_URL", DEFAULT_BASE_URL))


BILLING_SLACK_S = 5.0  # clock skew and whole seconds: a charge ending this close to the end covers it


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


def settle(ledger: Ledger, row: InstanceRow, api: VastApi | None, *, end: float,
           storage_dph: float = 0.0) -> tuple[float, str]:
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
    settle_charges(ledger, row, cost, state="reserved")
    update(ledger, row.id, cost=cost, cost_source=source)
    return cost, source


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
        settle_charges(ledger, row, billed, state="settled")
        reconciled = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        update(ledger, row.id, cost=billed, cost_source=f"provider billing (reconciled {reconciled} UTC)")
        estimated = row.cost or 0.0
        if row.experiment_id is not None:
            ledger.event(row.experiment_id, "instance_reconciled",
                         f"instance {row.provider_id}: ${estimated:.4f} (lifetime × price) → ${billed:.4f} billed",
                         provider_id=row.provider_id, estimated=estimated, billed=billed)
        out.append(Reconciled(row.id, row.provider_id, row.experiment_id, estimated, billed))
    return out


# -- the reaper -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reaped:
    row_id: int | None
    provider_id: str
    outcome: str  # destroyed | already_gone | orphan_destroyed | left_alone | error
    detail: str = ""
    label: str = ""
    status: str = ""  # the provider's actual_status, for what is named rather than destroyed
    dph: float | None = None


class _Listing:
    """The account's instances, listed once per reap and only when needed."""

    def __init__(self, api: VastApi) -> None:
        self.api = api
        self._rows: list[dict[str, Any]] | None = None

    @property
    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = [i for i in self.api.list() if not is_gone(i)]
        return self._rows

    def labelled(self, label: str) -> dict[str, Any] | None:
        return next((i for i in self.rows if i.get("label") == label), None)


def _named(row_id: int | None, listed: dict[str, Any], outcome: str, detail: str) -> Reaped:
    dph = listed.get("dph_total")
    return Reaped(row_id, str(listed.get("id")), outcome, detail, label=str(listed.get("label") or ""),
                  status=str(listed.get("actual_status") or listed.get("cur_state") or "?"),
                  dph=float(dph) if isinstance(dph, (int, float)) else None)


def _destroy_row(ledger: Ledger, api: VastApi, row: InstanceRow, listing: _Listing, why: str, *,
                 all_homes: bool) -> Reaped:
    provider_id = row.provider_id
    if provider_id is None:  # crashed between the rent call and the ledger update: find it by label
        match = listing.labelled(row.label)
        if match is not None and label_owner(row.label, ledger.home_id()) != "mine" and not all_homes:
            return _named(row.id, match, "left_alone", "label from before home ids: may be another home's")
        provider_id = str(match["id"]) if match else None
    now = time.time()
    if provider_id is None:
        update(ledger, row.id, state="destroyed", destroyed_at=now,
               note=f"{why}; never rented (no instance has its label)")
        settle(ledger, get(ledger, row.id), None, end=row.created_at)
        return Reaped(row.id, "", "already_gone", "never rented")
    update(ledger, row.id, provider_id=provider_id, state="destroying")
    try:
        gone_now = api.destroy(provider_id)
    except VastAuthError:
        raise
    except VastError as exc:  # the row stays live (destroying): the next reap tries again
        return Reaped(row.id, provider_id, "error", str(exc))
    update(ledger, row.id, state="destroyed", destroyed_at=now, note=why)
    settle(ledger, get(ledger, row.id), api, end=now)
    return Reaped(row.id, provider_id, "destroyed" if gone_now else "already_gone", why)


def reap(ledger: Ledger, api: VastApi, *, experiment_id: str | None = None, ar_session_id: int | None = None,
         expired_only: bool = False, all_homes: bool = False) -> list[Reaped]:
    """Destroy every instance the ledger knows may be live (``expired_only``: only those past their deadline).

    ``experiment_id`` or ``ar_session_id`` (an autoresearch session) reaps only that owner's rows.
    Without either, or ``expired_only``, the account's whole list is swept too:
    instances carrying this home's label whose row is closed or missing (left by a crash) are
    destroyed; instances carrying another home's label (or the label scheme before home ids)
    are left alone and returned as ``left_alone``, unless ``all_homes``. Instances without a
    Ratiocinator label are never touched. A refused key (`VastAuthError`) stops the reap:
    what it destroyed so far is recorded, and nothing is taken for gone.
    """
    listing = _Listing(api)
    out: list[Reaped] = []
    now = time.time()
    for row in rows(ledger, live=True, experiment_id=experiment_id, ar_session_id=ar_session_id):
        if expired_only and row.deadline > now:
            continue
        why = "past its self-destruct deadline" if row.deadline <= now else "reaped"
        out.append(_destroy_row(ledger, api, row, listing, why, all_homes=all_homes))
    if experiment_id is not None or ar_session_id is not None or expired_only:
        return out
    handled = {r.provider_id for r in out}
    home = ledger.home_id()
    known = {r.label: r for r in rows(ledger)}
    for listed in listing.rows:
        label, provider_id = str(listed.get("label") or ""), str(listed.get("id"))
        owner = label_owner(label, home)
        own_row = known.get(label) if owner == "mine" else None
        if owner is None or provider_id in handled or (own_row is not None and own_row.state in LIVE_STATES):
            continue
        if owner == "other" and not all_homes:
            why = "label from before home ids" if is_legacy_label(label) else "another home's label"
            out.append(_named(None, listed, "left_alone", why))
            continue
        try:
            api.destroy(provider_id)
        except VastAuthError:
            raise
        except VastError as exc:
            out.append(_named(own_row.id if own_row else None, listed, "error", str(exc)))
            continue
        if owner == "mine":
            detail = "this home's label, its ledger row closed or missing"
        else:
            detail = "another home's (--all-homes)"
        out.append(_named(own_row.id if own_row else None, listed, "orphan_destroyed", detail))
    return out


def reconcile_at_startup(ledger: Ledger, api: VastApi, experiment_id: str | None,
                         ar_session_id: int | None = None) -> list[Reaped]:
    """What ``research`` (an experiment) or ``autoresearch`` (a session) does first on resume: the dead
    orchestrator's instances are destroyed and paid, each through its owner's charges."""
    if experiment_id is None and ar_session_id is None:
        raise ValueError("reconcile_at_startup needs an owner: an experiment or an autoresearch session")
    return reap(ledger, api, experiment_id=experiment_id, ar_session_id=ar_session_id)


__all__ = ["BillingUnavailable", "Reaped", "api_from_env", "Reconciled", "billed_cost", "lifetime_cost", "reap",
           "reconcile_at_startup", "reconcile_billing", "settle"]
