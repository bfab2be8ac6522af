"""The Vast.ai REST client: today's endpoints, retries for what the provider really sends, and
answers that are checked rather than trusted.

Endpoints, each at the version the provider serves it today (checked against the official
``vastai`` client, 1.9):

========================================  =====  ==================================================
call                                      ver.   why this one
========================================  =====  ==================================================
``POST /bundles/``  (search offers)       v0     the live offer search; no v1 exists
``PUT /asks/<offer>/``  (rent)            v0     the live create-instance call; answers
                                                 ``{success, new_contract}``
``GET /instances/<id>/?owner=me``         v0     the live single-instance read; ``{"instances":
                                                 row}``, ``null`` or 404 once it is gone
``GET /instances/``  (list)               **v1** v0's list answers ``410 deprecated_endpoint`` since
                                                 mid-2026; v1 pages of at most 25 rows, keyset
                                                 cursor ``next_token`` sent back as ``after_token``
``DELETE /instances/<id>/``               v0     the live destroy; ``{"success": true}``
``POST /instances/<id>/ssh/``             v0     attach a public key
``GET /charges/``                         v0     billing, paged by ``next_token``
========================================  =====  ==================================================

The base URL (``VAST_API_URL``, ``vast.base_url``) is the v0 root, as documented; the v1 root
is derived from it by its last segment.

Errors: 429 (honouring ``Retry-After``), 5xx, timeouts and dropped connections are retried
with exponential backoff and jitter (tenacity). Renting is not idempotent, so a rent whose
outcome is unknown (the request may have reached the provider) looks its label up before it
is sent again. A 401/403, or a 404 whose body says ``auth_error`` (this API's answer to a
wrong key), is `VastAuthError`: never read as "instance gone". A destroy counts only when
the body says success and a re-read shows the instance gone.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_random_exponential

from ratiocinator.errors import BackendError, CredentialsError

DEFAULT_BASE_URL = "https://console.vast.ai/api/v0"
PAGE_SIZE = 25  # the most rows the v1 instance list returns per page
MAX_LIST_PAGES = 400  # 10,000 instances: beyond that the cursor is taken to be looping
MAX_CHARGE_PAGES = 100
# Billing has a fallback (lifetime × price, said so) and a later `instances --reconcile`: it is not
# worth the full retry budget while an experiment waits to finish.
BILLING_ATTEMPTS = 2
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
# Instance states that still bill (storage at least) although nothing runs: they stay live in
# the ledger until destroyed.
STILL_BILLING_DOWN = ("stopped", "frozen", "exited", "offline", "unknown")


class VastError(BackendError):
    """The Vast.ai API refused or failed a call."""


class VastAuthError(VastError, CredentialsError):
    """The API key is wrong, revoked or lacks permission: nothing can be rented, read or destroyed with it."""


class BillingUnavailable(Exception):
    """The billing endpoint failed: costs fall back to lifetime × price, and say so."""


class OfferTaken(VastError):
    """The offer was rented by someone else between our search and our rent (HTTP 404 ``no_such_ask``):
    nothing was rented or paid, and another offer may be tried."""


class _Refused(VastError):
    """An HTTP error answer that is neither transient nor about the key; ``code`` says which."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Transient(VastError):
    """A failure worth another try. ``sent``: the request may have reached the provider (its effect is unknown)."""

    def __init__(self, message: str, *, sent: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.sent = sent
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts per call, the backoff's first and largest wait, the longest
    ``Retry-After`` waited out, and a bound on one call's whole retrying."""

    attempts: int = 6
    first_wait_s: float = 1.0
    max_wait_s: float = 30.0
    max_retry_after_s: float = 120.0
    total_s: float = 300.0


def is_gone(shown: dict[str, Any] | None) -> bool:
    """Whether the provider no longer has the instance: not found, or unloaded."""
    return shown is None or shown.get("cur_state") == "unloaded"


def v1_root(base_url: str) -> str:
    """The v1 API root beside the v0 ``base_url`` (``…/api/v0`` → ``…/api/v1``)."""
    root = base_url.rstrip("/")
    head, _, version = root.rpartition("/")
    if version != "v0" or not head:
        raise BackendError(f"the Vast.ai API base URL {base_url!r} does not end in /v0",
                           hint="use the v0 root, e.g. https://console.vast.ai/api/v0 (VAST_API_URL or vast.base_url)")
    return f"{head}/v1"


class _Wait:
    """The provider's ``Retry-After`` when it gives one (capped), else exponential backoff with jitter."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.backoff = wait_random_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self.policy.max_retry_after_s)
        return float(self.backoff(state))


class VastApi:
    """The handful of Vast.ai endpoints the backend uses (sync; async callers use a thread).

    The key travels only in the ``Authorization`` header and never appears in an error.
    ``confirm_s``: how long a destroy waits to see the instance gone.
    """

    def __init__(self, api_key: str, base_url: str = DEFAULT_BASE_URL, *, timeout_s: float = 30.0,
                 retry: RetryPolicy | None = None, confirm_s: float = 60.0, poll_s: float = 1.0) -> None:
        if not api_key:
            raise BackendError("no Vast.ai API key", hint="export VAST_API_KEY=... (from https://cloud.vast.ai/account/)")
        self.base_url = base_url.rstrip("/")
        self.v1_url = v1_root(self.base_url)
        self.retry = retry or RetryPolicy()
        self.confirm_s, self.poll_s = confirm_s, poll_s
        self._http = httpx.Client(timeout=timeout_s, headers={
            "Authorization": f"Bearer {api_key}", "Accept": "application/json", "User-Agent": "ratiocinator"})

    def __repr__(self) -> str:  # never the key
        return f"VastApi({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    # -- transport ----------------------------------------------------------------------------

    def _retrying(self, retryable: Callable[[BaseException], bool], attempts: int | None = None) -> Retrying:
        policy = self.retry
        return Retrying(stop=stop_after_attempt(min(attempts or policy.attempts, policy.attempts))
                        | stop_after_delay(policy.total_s),
                        wait=_Wait(policy), retry=retry_if_exception(retryable), reraise=True)

    def _once(self, method: str, path: str, *, v1: bool = False, params: dict[str, str] | None = None,
              body: Any = None, missing_ok: bool = False) -> Any:
        """One exchange; `_Transient` for what may be tried again, `VastError` / `VastAuthError` otherwise.

        Errors name the endpoint (``GET /instances/1/``; ``GET v1 /instances/``), never its query.
        """
        where = f"{method} {'v1 ' if v1 else ''}{path}"
        url = (self.v1_url if v1 else self.base_url) + path
        try:
            resp = self._http.request(method, url, params=params, json=body)
        except httpx.ConnectError as exc:  # never reached the provider: safe to send again
            raise _Transient(f"Vast.ai API {where} failed: cannot connect ({exc})", sent=False) from None
        except httpx.ConnectTimeout:
            raise _Transient(f"Vast.ai API {where} failed: connecting timed out", sent=False) from None
        except httpx.TimeoutException:
            raise _Transient(f"Vast.ai API {where} timed out waiting for the answer", sent=True) from None
        except httpx.TransportError as exc:  # reset or closed mid-exchange
            raise _Transient(f"Vast.ai API {where} failed: {type(exc).__name__} ({exc})", sent=True) from None
        text = resp.text
        try:
            reply = resp.json() if text else None
        except ValueError:
            reply = None
        error = reply.get("error") if isinstance(reply, dict) else None
        code = resp.status_code
        if code in (401, 403) or error == "auth_error":
            raise VastAuthError(
                f"Vast.ai refused the API key ({where}: HTTP {code} {error or ''}):"
                " it is wrong, revoked or lacks permission",
                hint="set VAST_API_KEY to a valid key (https://cloud.vast.ai/account/). Instances already rented keep"
                     " their self-destruct deadline; `ratiocinator instances --reap` destroys them once the key works")
        if code in RETRYABLE_STATUS:
            raise _Transient(f"Vast.ai API {where} answered HTTP {code}: {text[:200]}", sent=code != 429,
                             retry_after=_retry_after(resp) if code == 429 else None)
        if code == 410:
            raise VastError(f"Vast.ai API {where} answered HTTP 410 (retired endpoint): {text[:300]}",
                            hint="this Ratiocinator uses an endpoint Vast.ai no longer serves; upgrade ratiocinator")
        if code == 404 and missing_ok:
            return None
        if code >= 400:
            raise _Refused(f"Vast.ai API {where} answered HTTP {code}: {text[:300]}", code=code)
        if reply is None and text:
            raise VastError(f"Vast.ai API {where} answered non-JSON: {text[:200]}")
        return reply

    def _call(self, method: str, path: str, *, v1: bool = False, params: dict[str, str] | None = None,
              body: Any = None, missing_ok: bool = False, attempts: int | None = None) -> Any:
        """An idempotent call, retried on every transient failure (at most ``attempts`` tries when given)."""
        try:
            for attempt in self._retrying(lambda exc: isinstance(exc, _Transient), attempts):
                with attempt:
                    return self._once(method, path, v1=v1, params=params, body=body, missing_ok=missing_ok)
        except _Transient as exc:
            raise _exhausted(exc) from None
        raise AssertionError("unreachable")  # reraise=True: the last failure propagates

    # -- endpoints ----------------------------------------------------------------------------

    def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        return list(self._call("POST", "/bundles/", body=query).get("offers", []))

    def rent(self, offer_id: int, body: dict[str, Any]) -> int:
        """Rent ``offer_id``; the new instance's id.

        A failure after the request may have reached the provider is not simply retried: the
        instance may exist. Its label (``body["label"]``, unique per home and row) is looked up
        first, and only when no instance carries it is the offer rented again.
        """
        label = body.get("label")
        try:
            for attempt in self._retrying(lambda exc: isinstance(exc, _Transient)):
                with attempt:
                    try:
                        reply = self._once("PUT", f"/asks/{offer_id}/", body=body)
                    except _Transient as exc:
                        if exc.sent and label and (found := self.find_label(str(label))) is not None:
                            return int(found["id"])
                        raise
        except _Transient as exc:
            raise _exhausted(exc) from None
        except _Refused as exc:
            if exc.code == 404:  # the provider's "no_such_ask": the offer is gone from the market
                raise OfferTaken(f"offer {offer_id} was taken before it could be rented ({exc.message})") from None
            raise
        if isinstance(reply, dict) and reply.get("error") == "no_such_ask":
            raise OfferTaken(f"offer {offer_id} was taken before it could be rented: {json.dumps(reply)[:200]}")
        if not isinstance(reply, dict) or not reply.get("success") or reply.get("new_contract") is None:
            raise VastError(f"renting offer {offer_id} failed: {json.dumps(reply)[:300]}",
                            hint="the offer may have been taken; searching again picks another")
        return int(reply["new_contract"])

    def show(self, instance_id: int | str) -> dict[str, Any] | None:
        """The instance, or None when the provider no longer knows it."""
        reply = self._call("GET", f"/instances/{instance_id}/", params={"owner": "me"}, missing_ok=True)
        row = reply.get("instances") if isinstance(reply, dict) else None
        return row if isinstance(row, dict) and row else None

    def _pages(self, path: str, params: dict[str, str], *, rows: str, cursor: str, max_pages: int, v1: bool = False,
               attempts: int | None = None) -> list[dict[str, Any]]:
        """Every row of a paged listing: the ``rows`` list of each page, following ``next_token`` (sent
        back as ``cursor``) until a page has none; a repeated or endless cursor is an error."""
        where = f"GET {'v1 ' if v1 else ''}{path}"
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        params = dict(params)
        for _ in range(max_pages):
            reply = self._call("GET", path, v1=v1, params=params, attempts=attempts)
            page = reply.get(rows) if isinstance(reply, dict) else None
            if not isinstance(page, list):
                raise VastError(f"Vast.ai API {where} answered an unexpected shape: {json.dumps(reply)[:200]}")
            out += [r for r in page if isinstance(r, dict)]
            token = reply.get("next_token")
            if not token:
                return out
            if token in seen:
                raise VastError(f"Vast.ai API {where} repeated a page cursor; the listing is incomplete")
            seen.add(token)
            params[cursor] = str(token)
        raise VastError(f"Vast.ai API {where} did not end within {max_pages} pages")

    def list(self) -> list[dict[str, Any]]:
        """Every instance of the account, through the v1 list's pages (cursor ``next_token`` → ``after_token``)."""
        params = {"select_filters": "{}", "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
                  "limit": str(PAGE_SIZE)}
        return self._pages("/instances/", params, rows="instances", cursor="after_token", max_pages=MAX_LIST_PAGES,
                           v1=True)

    def find_label(self, label: str) -> dict[str, Any] | None:
        """The account's instance carrying ``label`` (and not gone), if any."""
        return next((i for i in self.list() if i.get("label") == label and not is_gone(i)), None)

    def destroy(self, instance_id: int | str) -> bool:
        """Destroy and confirm: True when this call destroyed it, False when it was already gone.

        Raises `VastError` when the provider answers without success, or still shows the
        instance ``confirm_s`` later: then it may still bill, and must stay live in the ledger.
        """
        reply = self._call("DELETE", f"/instances/{instance_id}/", body={}, missing_ok=True)
        if reply is not None and not (isinstance(reply, dict) and reply.get("success")):
            raise VastError(f"destroying instance {instance_id} was not done:"
                            f" the provider answered {json.dumps(reply)[:300]}",
                            hint="it may still bill; `ratiocinator instances --reap` tries again")
        deadline = time.monotonic() + self.confirm_s
        while True:
            shown = self.show(instance_id)
            if is_gone(shown):
                return reply is not None
            if time.monotonic() >= deadline:
                assert shown is not None
                raise VastError(f"instance {instance_id} is still listed ({shown.get('actual_status')}, cur_state"
                                f" {shown.get('cur_state')}) {self.confirm_s:g}s after the provider accepted"
                                " its destroy",
                                hint="it may still bill; `ratiocinator instances --reap` tries again")
            time.sleep(self.poll_s)

    def attach_ssh_key(self, instance_id: int | str, public_key: str) -> None:
        if "PRIVATE" in public_key:
            raise BackendError("refusing to send a private key to Vast.ai")  # only the .pub ever leaves
        self._call("POST", f"/instances/{instance_id}/ssh/", body={"ssh_key": public_key.strip()})

    def instance_charges(self, start: float, end: float) -> builtins.list[dict[str, Any]]:  # VastApi.list shadows list
        """The account's instance charges for the days of [start, end] (``GET /charges/``, every page).

        Each is ``{start, end, type, source: "instance-<id>", description, amount, metadata, items}``;
        the charge of a day may still be missing shortly after it (then the instance is not listed).
        """
        day = 86_400
        filters = {"day": {"gte": int(start) // day * day, "lte": (int(end) // day + 1) * day - 1},
                   "type": {"in": ["instance"]}}
        try:  # a refused key too: the cost falls back to the clock, and says why
            return self._pages("/charges/", {"select_filters": json.dumps(filters)}, rows="results",
                               cursor="next_token", max_pages=MAX_CHARGE_PAGES, attempts=BILLING_ATTEMPTS)
        except VastError as exc:
            raise BillingUnavailable(str(exc)) from None


def _exhausted(exc: _Transient) -> VastError:
    return VastError(f"{exc.message} (still failing after retries)",
                     hint="the provider is throttling or failing; run the same command again later")


def _retry_after(resp: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (a number; an HTTP date is left to the backoff)."""
    try:
        return max(0.0, float(resp.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


__all__ = ["DEFAULT_BASE_URL", "STILL_BILLING_DOWN", "BillingUnavailable", "OfferTaken", "RetryPolicy", "VastApi",
           "VastAuthError", "VastError", "is_gone", "v1_root"]
