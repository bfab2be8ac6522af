"""A loopback fake of the Vast.ai REST API as it answers today, for the Vast backend's tests.

Shapes follow the public API documentation (https://docs.vast.ai/api) and the official
``vastai`` client (1.9: ``vastai/api/instances.py``, ``vastai/api/client.py``,
``vastai/data/instance.py``):

* ``POST /api/v0/bundles/`` (search offers): query ``{field: {"eq"|"gte"|"lte": value}, "order": ...,
  "type": ...}`` → ``{"offers": [{id, gpu_name, num_gpus, cpu_ram (MB), inet_down (Mbps),
  cuda_max_good, dph_total, disk_space, reliability2, verified, rentable, rented}]}``;
* ``PUT /api/v0/asks/{offer_id}/`` (rent) body ``{client_id, image, disk, onstart, runtype, label}``
  → ``{"success": true, "new_contract": <instance id>}``;
* ``GET /api/v0/instances/{id}/?owner=me`` → ``{"instances": {id, actual_status, cur_state,
  intended_status, ssh_host, ssh_port, public_ipaddr, dph_total, gpu_name, num_gpus, label,
  start_date}}`` (404 ``no_such_instance`` once destroyed);
* ``GET /api/v0/instances/`` → **HTTP 410** ``deprecated_endpoint`` (retired in mid-2026);
* ``GET /api/v1/instances/?select_filters=...&order_by=...&limit=N[&after_token=T]`` →
  ``{"instances": [...], "next_token": T | null, "total_instances": n, "label_counts": {...}}``,
  at most 25 rows a page, keyset-paged by id;
* ``DELETE /api/v0/instances/{id}/`` → ``{"success": true}``;
* ``POST /api/v0/instances/{id}/ssh/`` body ``{"ssh_key": "<public key>"}``;
* ``GET /api/v0/charges/?select_filters={"day": {"gte", "lte"}, "type": {"in": [...]}}[&next_token=...]`` →
  ``{"success", "count", "total", "next_token", "results": [{start, end, type, source: "instance-<id>",
  description, amount, metadata, items}]}`` (docs.vast.ai/api-reference/billing/show-charges); a
  destroyed instance is billed its lifetime × $/h plus a bandwidth item; ``charge_lag_s`` lists it
  only up to that long before its end, as the provider's charges lag.

A key that is not in ``api_keys`` (a wrong or revoked one) gets this API's answer: HTTP 404
``{"success": false, "error": "auth_error", ...}``.

Every instance's SSH endpoint is what the test says (a real sshd on 127.0.0.1). Faults:
``boot_s`` (time in ``loading``; ``math.inf`` never boots), ``ssh_port`` (a closed port:
SSH refused), ``billing_fails`` (the charges endpoint answers 500), `vanish` (the host dies),
`stop` (the host stops it: down, still billing), ``refuse_destroys`` (a destroy answers 200
with ``"success": false`` and does nothing), ``phantom_destroys`` (it answers success and does
nothing), and `inject` (the next requests to a path answer
429 with ``Retry-After``, a 5xx, or drop the connection; before or after doing the work). The
fake honours the self-destruct deadline the ``onstart`` script carries
(``RC_DEADLINE=<epoch>``): past it, the instance is destroyed by the "host" itself, as the real
watchdog would; like the real watchdog, it re-reads the deadline file the script names
(``RC_DEADLINE_FILE=<path>``), so an extension written over SSH is honoured. Live instances get
distinct SSH host names for the one sshd (``ssh_hosts``), as real instances have distinct
endpoints.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_KEY = "test-vast-key"
MAX_PAGE = 25  # the v1 list's largest page


@dataclass(frozen=True)
class Fault:
    """One injected answer: HTTP ``status`` (with ``Retry-After`` when given), or ``drop`` (the connection
    closes unanswered); ``after``: the request's work is done first, so the client cannot know it was."""

    status: int = 503
    retry_after: float | None = None
    drop: bool = False
    after: bool = False


def offer(id: int, gpu_name: str = "RTX_4090", dph: float = 0.40, **fields: Any) -> dict[str, Any]:
    return {"id": id, "gpu_name": gpu_name, "num_gpus": 1, "cpu_ram": 64000, "inet_down": 800.0, "cuda_max_good": 12.4,
            "dph_total": dph, "disk_space": 200.0, "reliability2": 0.99, "verified": True, "rentable": True,
            "rented": False, **fields}


@dataclass
class FakeVast:
    ssh_port: int
    offers: list[dict[str, Any]] = field(default_factory=lambda: [offer(1, dph=0.40), offer(2, "A100", 1.10)])
    boot_s: float = 0.2
    taken_by_others: set[int] = field(default_factory=set)  # offers someone else rents just before our rent call
    billing_fails: bool = False
    instances: dict[int, dict[str, Any]] = field(default_factory=dict)
    destroyed: list[int] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    next_id: int = 1000
    authorized_keys: Path | None = None  # the test sshd's: an attached key is appended, as Vast installs it
    lock: threading.Lock = field(default_factory=threading.Lock)
    ssh_hosts: tuple[str, ...] = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    boot_s_by_offer: dict[int, float] = field(default_factory=dict)  # slower machines than ``boot_s``
    retired: set[str] = field(default_factory=set)  # endpoints of vanished hosts: never handed out again
    charges: list[dict[str, Any]] = field(default_factory=list)  # the account's, as GET /charges/ lists them
    charges_page_size: int = 20
    charge_lag_s: float = 0.0
    bandwidth_dollars: float = 0.0005  # each instance's bandwidth item: billing differs from lifetime × price
    api_keys: set[str] = field(default_factory=lambda: {API_KEY})  # the keys that work; others get auth_error
    page_size: int = MAX_PAGE  # the v1 list's page (capped at MAX_PAGE, as the provider caps it)
    refuse_destroys: int = 0  # the next N destroys answer 200 {"success": false} and do nothing
    # (method, path regex, fault), in order; a None fault lets its request through untouched
    faults: list[tuple[str, str, Fault | None]] = field(default_factory=list)
    faults_served: list[tuple[str, str, Fault]] = field(default_factory=list)
    phantom_destroys: int = 0  # the next N destroys answer {"success": true} and do nothing

    # -- state ------------------------------------------------------------------------

    def tick(self) -> None:
        """Boot what has waited long enough; the host kills an instance past its deadline."""
        now = time.time()
        with self.lock:
            for iid, inst in list(self.instances.items()):
                if inst["_deadline"] is not None and now >= self._deadline(inst):
                    self._remove(iid, "ttl")
                elif inst["actual_status"] == "loading" and now - inst["start_date"] >= self.boot_s_by_offer.get(
                        inst["_offer"], self.boot_s):
                    inst["actual_status"] = "running"

    @staticmethod
    def _deadline(inst: dict[str, Any]) -> float:
        path = inst["_deadline_file"]
        try:
            return float(Path(path).read_text().strip()) if path else inst["_deadline"]
        except (OSError, ValueError):
            return inst["_deadline"]

    def _remove(self, iid: int, why: str) -> None:
        inst = self.instances.pop(iid, None)
        self.destroyed.append(iid)
        if inst is not None:
            start = inst["start_date"]
            end = max(start, time.time() - self.charge_lag_s)
            gpu = round((end - start) / 3600 * inst["dph_total"], 6)
            self.charges.append({
                "start": int(start), "end": int(end), "type": "instance", "source": f"instance-{iid}",
                "description": f"Instance {iid} Charges", "amount": gpu + self.bandwidth_dollars,
                "metadata": {"label": inst["label"]},
                "items": [{"start": int(start), "end": int(end), "type": "gpu", "source": None,
                           "description": f"{(end - start) / 3600:.3f} hours at ${inst['dph_total']}/hour",
                           "amount": gpu, "metadata": {}, "items": []},
                          {"start": int(start), "end": int(end), "type": "bandwidth", "source": None,
                           "description": "bandwidth", "amount": self.bandwidth_dollars, "metadata": {}, "items": []}],
            })
            for o in self.offers:  # the machine is on the market again
                if o["id"] == inst["_offer"]:
                    o["rented"] = False

    def inject(self, faults: list[Fault | None], *, method: str = ".*", path: str = ".*") -> None:
        """The next requests matching ``method`` and ``path`` (regexes) get these faults, one each, in order
        (None: that request goes through)."""
        with self.lock:
            self.faults += [(method, path, f) for f in faults]

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for i, (m, p, fault) in enumerate(self.faults):
                if re.fullmatch(m, method) and re.fullmatch(p, urllib.parse.urlsplit(path).path):
                    del self.faults[i]
                    if fault is not None:
                        self.faults_served.append((method, path, fault))
                    return fault
        return None

    def add_instance(self, label: str | None, *, status: str = "running", dph: float = 0.30,
                     gpu_name: str = "RTX_3090") -> int:
        """An instance rented some other way (the account's other work, another home): never reached by SSH."""
        with self.lock:
            self.next_id += 1
            iid = self.next_id
            self.instances[iid] = {
                "id": iid, "actual_status": status, "cur_state": "running", "intended_status": "running",
                "ssh_host": "127.0.0.1", "ssh_port": 1, "public_ipaddr": "127.0.0.1", "dph_total": dph,
                "gpu_name": gpu_name, "num_gpus": 1, "label": label, "start_date": time.time(), "image_uuid": "x",
                "_deadline": None, "_onstart": "", "_ssh_keys": [], "_deadline_file": None, "_offer": None,
            }
        return iid

    def stop(self, iid: int) -> None:
        """The host stops the instance: nothing runs, but its storage still bills until it is destroyed."""
        with self.lock:
            inst = self.instances[iid]
            inst.update(actual_status="exited", cur_state="stopped", intended_status="stopped")
            self.retired.add(inst["ssh_host"])

    def vanish(self, iid: int) -> None:
        with self.lock:
            self.retired.add(self.instances[iid]["ssh_host"])
            self._remove(iid, "vanished")

    def live(self) -> list[dict[str, Any]]:
        self.tick()
        with self.lock:
            return list(self.instances.values())

    def _public(self, inst: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inst.items() if not k.startswith("_")}

    def _matches(self, o: dict[str, Any], query: dict[str, Any]) -> bool:
        for key, cond in query.items():
            if not isinstance(cond, dict):
                continue
            for op, want in cond.items():
                value = o.get(key)
                if value is None or (op == "eq" and value != want) or (op == "gte" and value < want) or (
                        op == "lte" and value > want):
                    return False
        return True

    # -- handlers ---------------------------------------------------------------------

    def handle(self, method: str, raw_path: str, body: Any) -> tuple[int, Any]:
        self.calls.append((method, raw_path))
        self.bodies.append(body)
        self.tick()
        url = urllib.parse.urlsplit(raw_path)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        if m := re.fullmatch(r"/api/v0/bundles/", path):
            found = [o for o in self.offers if self._matches(o, body or {})]
            return 200, {"offers": sorted(found, key=lambda o: o["dph_total"])}
        if (m := re.fullmatch(r"/api/v0/asks/(\d+)/", path)) and method == "PUT":
            o = next((o for o in self.offers if o["id"] == int(m.group(1))), None)
            if o is not None and o["id"] in self.taken_by_others:  # another renter was faster
                self.taken_by_others.discard(o["id"])
                o["rented"] = True
            if o is None or o["rented"]:
                return 404, {"success": False, "error": "no_such_ask"}
            deadline = re.search(r"RC_DEADLINE=(\d+)", body.get("onstart", ""))
            deadline_file = re.search(r"RC_DEADLINE_FILE=(/\S+)", body.get("onstart", ""))
            with self.lock:
                self.next_id += 1
                iid = self.next_id
                taken = {i["ssh_host"] for i in self.instances.values()} | self.retired
                name = next((h for h in self.ssh_hosts if h not in taken), self.ssh_hosts[0])
                o["rented"] = True  # one machine, one renter
                self.instances[iid] = {
                    "id": iid, "actual_status": "loading", "cur_state": "running", "intended_status": "running",
                    "ssh_host": name, "ssh_port": self.ssh_port,
                    "public_ipaddr": "127.0.0.1", "dph_total": o["dph_total"], "gpu_name": o["gpu_name"],
                    "num_gpus": o["num_gpus"], "label": body.get("label"), "start_date": time.time(),
                    "image_uuid": body.get("image"), "_deadline": float(deadline.group(1)) if deadline else None,
                    "_onstart": body.get("onstart", ""), "_ssh_keys": [],
                    "_deadline_file": deadline_file.group(1) if deadline_file else None, "_offer": o["id"],
                }
            return 200, {"success": True, "new_contract": iid}
        if m := re.fullmatch(r"/api/v0/instances/(\d+)/ssh/", path):
            inst = self.instances.get(int(m.group(1)))
            if inst is None:
                return 404, {"success": False}
            inst["_ssh_keys"].append(body["ssh_key"])
            if self.authorized_keys is not None:
                with open(self.authorized_keys, "a") as fh:
                    fh.write(body["ssh_key"].strip() + "\n")
            return 200, {"success": True}
        if m := re.fullmatch(r"/api/v0/instances/(\d+)/", path):
            iid = int(m.group(1))
            with self.lock:
                inst = self.instances.get(iid)
                if inst is None:
                    return 404, {"success": False, "error": "no_such_instance"}
                if method == "DELETE":
                    if self.refuse_destroys > 0:
                        self.refuse_destroys -= 1
                        return 200, {"success": False, "error": "destroy_failed", "msg": "could not destroy instance"}
                    if self.phantom_destroys > 0:
                        self.phantom_destroys -= 1
                        return 200, {"success": True}
                    self._remove(iid, "destroyed")
                    return 200, {"success": True}
                return 200, {"instances": self._public(inst)}
        if path == "/api/v0/instances/" and method == "GET":
            return 410, {"success": False, "error": "deprecated_endpoint",
                         "msg": "/api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."}
        if path == "/api/v1/instances/" and method == "GET":
            return self._list(query)
        if path == "/api/v0/charges/" and method == "GET":
            if self.billing_fails:
                return 500, {"error": "billing backend down"}
            return self._charges(query)
        return 404, {"error": f"no route {method} {path}"}

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        """One v1 page: rows by id after the cursor, at most ``page_size`` (≤ 25); the cursor encodes the last id."""
        try:
            limit = min(int(query.get("limit", [str(MAX_PAGE)])[0]), self.page_size, MAX_PAGE)
            after = int(base64.b64decode(query["after_token"][0])) if "after_token" in query else -1
            json.loads(query.get("select_filters", ["{}"])[0])
            json.loads(query.get("order_by", ["[]"])[0])
        except (ValueError, TypeError):
            return 400, {"success": False, "error": "invalid_args",
                         "msg": "bad limit, after_token, select_filters or order_by"}
        with self.lock:
            rows = sorted((i for i in self.instances.values()), key=lambda i: i["id"])
            page = [self._public(i) for i in rows if i["id"] > after][:limit]
            labels: dict[str, int] = {}
            for i in rows:
                labels[str(i["label"])] = labels.get(str(i["label"]), 0) + 1
        more = bool(page) and any(i["id"] > page[-1]["id"] for i in rows)
        token = base64.b64encode(str(page[-1]["id"]).encode()).decode() if more else None
        return 200, {"instances": page, "next_token": token, "total_instances": len(rows), "label_counts": labels}


    def _charges(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        try:
            filters = json.loads(query["select_filters"][0])
            gte, lte = int(filters["day"]["gte"]), int(filters["day"]["lte"])
        except (KeyError, ValueError, TypeError):
            return 400, {"success": False, "error": "select_filters with a day range (gte, lte) is required"}
        types = (filters.get("type") or {}).get("in")
        with self.lock:
            rows = [c for c in self.charges
                    if c["end"] >= gte and c["start"] <= lte and (types is None or c["type"] in types)]
        offset = int(base64.b64decode(query["next_token"][0])) if "next_token" in query else 0
        page = rows[offset:offset + self.charges_page_size]
        more = offset + self.charges_page_size < len(rows)
        return 200, {"success": True, "count": len(page), "total": len(rows),
                     "next_token": base64.b64encode(str(offset + self.charges_page_size).encode()).decode() if more
                     else None,
                     "results": page}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeVast

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        key = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if key not in self.fake.api_keys:  # this API's answer to a wrong or revoked key
            self._reply(404, {"success": False, "error": "auth_error", "msg": "Invalid user key"})
            return
        fault = self.fake.take_fault(self.command, self.path)
        if fault is not None and not fault.after:
            self._fault(fault)
            return
        code, reply = self.fake.handle(self.command, self.path, body)
        if fault is not None:
            self._fault(fault)
            return
        self._reply(code, reply)

    def _fault(self, fault: Fault) -> None:
        if fault.drop:
            self.close_connection = True  # no status line at all: the client sees the connection end
            return
        headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
        error = "rate_limited" if fault.status == 429 else "server_error"
        self._reply(fault.status, {"success": False, "error": error, "msg": "injected"}, headers)

    def _reply(self, code: int, reply: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(reply).encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = _serve

    def log_message(self, *args: Any) -> None:
        pass


class VastServer:
    """The fake on a free loopback port, in a daemon thread; ``url`` is the API base."""

    def __init__(self, fake: FakeVast) -> None:
        handler = type("Handler", (_Handler,), {"fake": fake})
        self.fake = fake
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self._stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, daemon=True)  # the TTL happens without API calls too
        self.ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            self.fake.tick()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/api/v0"

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


__all__ = ["API_KEY", "MAX_PAGE", "Fault", "FakeVast", "VastServer", "math", "offer"]
