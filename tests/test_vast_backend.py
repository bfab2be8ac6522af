"""The Vast backend end to end: a fake Vast API on loopback (vastserver.py) whose instances'
SSH endpoints are a real sshd (sshd.py), so rent → boot → deploy → run → destroy really happens.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.vast import reaper
from ratiocinator.backends.vast.api import VastApi
from ratiocinator.backends.vast.backend import VastBackend, VastSettings, offer_query, pick_offers, watchdog
from ratiocinator.errors import BackendError, CredentialsError
from ratiocinator.pipeline import Research, ResearchOutcome
from ratiocinator.spec.models import load_spec
from ratiocinator.store import instances as inst
from ratiocinator.store.budget import Budget
from ratiocinator.store.ledger import Ledger
from sshd import Sshd, free_port
from vastserver import API_KEY, FakeVast, Fault, VastServer, offer

RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
echo 'METRICS: {"step": 1, "loss": 2.0}'
if [ "${MODE:-fast}" = slow ]; then sleep "${SLEEP_S:-20}"; fi
echo "METRICS: {\\"score\\": $(( ${BONUS:-0} + ${SEED:-0} ))}"
"""


@pytest.fixture
def vast(sshd: Sshd) -> Iterator[VastServer]:
    server = VastServer(FakeVast(ssh_port=sshd.port, authorized_keys=sshd.root / "authorized_keys"))
    try:
        yield server
    finally:
        server.close()


def _settings(server: VastServer, sshd: Sshd, study: Study, **fields: object) -> VastSettings:
    base = VastSettings(base_url=server.url, boot_timeout_s=10, setup_allowance_s=60, poll_s=0.1, ssh_probe_s=2,
                        ssh_user=sshd.user, workdir=str(study.root / "remote"), api_backoff_s=0.05)
    return replace(base, **fields)  # type: ignore[arg-type]


def _backend(server: VastServer, sshd: Sshd, study: Study, **fields: object) -> VastBackend:
    return VastBackend(study.home, settings=_settings(server, sshd, study, **fields), api_key=API_KEY,
                       ssh_options={"reconnect_budget_s": 3, "connect_timeout_s": 5, "alive_check_s": 1})


def _spec(study: Study, **fields: object) -> Path:
    study.commit({"run.sh": RUNNER})
    return study.spec(**{"seed_env": "SEED", "train_timeout_s": 60, "max_dollars": 5.0,
                         "hardware": {"gpu": "RTX_4090", "num_gpus": 1, "min_cuda_version": "12.1", "max_dph": 1.0,
                                      "disk_gb": 50, "min_cpu_ram_gb": 16, "min_inet_down": 100},
                         **fields})


def _runner_pids(study: Study) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in (study.root / "remote" / "runs").glob("*/pid")]


def _kill_runners(study: Study) -> None:
    for pid in _runner_pids(study):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def test_offer_query_honours_every_hardware_field(study: Study) -> None:
    loaded = load_spec(_spec(study))
    q = offer_query(loaded, VastSettings(min_reliability=0.98))
    assert q["gpu_name"] == {"eq": "RTX_4090"} and q["num_gpus"] == {"gte": 1}
    assert q["cpu_ram"] == {"gte": 16 * 1024} and q["inet_down"] == {"gte": 100}
    assert q["cuda_max_good"] == {"gte": 12.1} and q["dph_total"] == {"lte": 1.0} and q["disk_space"] == {"gte": 50}
    assert q["reliability2"] == {"gte": 0.98} and q["verified"] == {"eq": True} and q["order"] == [["dph_total", "asc"]]
    offers = [offer(1, "A", 0.3), offer(2, "B", 0.2), offer(3, "A", 0.35), offer(4, "B", 0.9)]
    assert [o["id"] for o in pick_offers(offers, 2, allow_mixed=False)] == [1, 3]  # one model, cheapest pair
    assert [o["id"] for o in pick_offers(offers, 2, allow_mixed=True)] == [2, 1]
    assert "RC_DEADLINE=1234 RC_DEADLINE_FILE=~/w/deadline" in watchdog(1234.5, "ratiocinator-7", "~/w/deadline")


@pytest.mark.latex
def test_full_experiment_reuses_one_instance_and_destroys_it(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "low", "env": {"BONUS": 10}}, {"name": "high", "env": {"BONUS": 20}}],
                 replicates=2)
    backend = _backend(vast, sshd, study)
    now = int(time.time())
    vast.fake.charges += [  # the account's other charges, around this one's: never counted as this instance's
        {"start": now, "end": now + 60, "type": "instance", "source": "instance-424242", "amount": 9.5},
        {"start": now, "end": now + 60, "type": "volume", "source": "volume-7", "amount": 3.25}]
    vast.fake.charges_page_size = 1  # one charge per page: the client follows next_token
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == "completed", outcome.message
    fake = vast.fake
    assert [c for c in fake.calls if c[0] == "PUT"] == [("PUT", "/api/v0/asks/1/")]  # one rent: the cheap 4090
    assert fake.live() == [] and len(fake.destroyed) == 1
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert len(runs) == 4 and all(r.status == "succeeded" for r in runs)
    assert all(":RTX_4090/" in r.slot and r.slot.startswith(f"vast{fake.destroyed[0]}") for r in runs)  # GPU per run
    (row,) = inst.rows(ledger)
    assert row.state == "destroyed" and row.provider_id == str(fake.destroyed[0]) and row.gpu_name == "RTX_4090"
    assert row.created_at < row.deadline and row.cost is not None and row.cost > 0
    # The cost is the provider's charge for this instance (GPU and bandwidth items), not lifetime × price.
    (charge,) = [c for c in fake.charges if c["source"] == f"instance-{row.provider_id}"]
    assert row.cost_source == "provider billing" and row.cost == pytest.approx(charge["amount"])
    assert len([p for m, p in fake.calls if m == "GET" and p.startswith("/api/v0/charges/")]) == 2  # two pages
    rent_body = next(b for (m, _), b in zip(fake.calls, fake.bodies, strict=True) if m == "PUT")
    assert rent_body["label"] == row.label and f"RC_DEADLINE={int(row.deadline)}" in rent_body["onstart"]
    assert rent_body["disk"] == 50 and rent_body["runtype"] == "ssh"
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(row.cost) and spent <= 5.0
    # Only the public key went to the provider.
    assert all("PRIVATE" not in json.dumps(b) for b in fake.bodies if b)
    # The paper counts money per instance, and gives each arm its runs' share of it.
    assert outcome.report is not None
    paper = outcome.report.md.read_text()
    assert "Rented instances" in paper and f"vast:{row.provider_id}" in paper and "split by wall time" in paper
    # The instance's environment, read over its SSH connection with the runs' interpreter, is in the paper.
    (found,) = [e["data"] for e in ledger.events(exp.id) if e["kind"] == "environment"]
    assert found["host"] == f"vast:{row.provider_id}" and len(found["freeze_sha256"]) == 64
    assert f"{found['implementation']} {found['python']} on {found['platform']} (host vast:{row.provider_id}," in \
        paper.replace("\\_", "_")
    by_key = {f["key"]: f for f in json.loads(outcome.report.facts.read_text())["facts"]}
    arm_costs = [by_key[f"cost.arm[{arm}]"]["value"] for arm in ("low", "high")]
    assert all(c > 0 for c in arm_costs) and sum(arm_costs) == pytest.approx(row.cost)
    assert by_key[f"instance[{row.id}].cost"]["value"] == pytest.approx(row.cost)


@pytest.mark.latex  # the research writes its paper
def test_an_offer_taken_between_search_and_rent_is_replaced_and_costs_nothing(sshd: Sshd, vast: VastServer,
                                                                              study: Study) -> None:
    # On a live market another renter can take the cheapest offer after our search: the provider
    # answers 404 no_such_ask, nothing is rented, and the next cheapest offer that fits is rented.
    vast.fake.offers.append(offer(3, dph=0.45))
    vast.fake.taken_by_others = {1}
    spec = _spec(study, arms=[{"name": "only", "env": {"BONUS": 10}}])
    outcome = Research(load_spec(spec), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    fake = vast.fake
    assert [p for m, p in fake.calls if m == "PUT"] == ["/api/v0/asks/1/", "/api/v0/asks/3/"]
    assert fake.live() == [] and len(fake.destroyed) == 1
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    taken, used = inst.rows(ledger)
    assert (taken.provider_id, taken.state, taken.cost) == (None, "destroyed", 0.0) and "was taken" in taken.note
    assert used.state == "destroyed" and used.provider_id == str(fake.destroyed[0]) and used.cost
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(used.cost)  # the taken offer cost nothing
    assert any(e["kind"] == "instance_offer_taken" for e in ledger.events(exp.id))


def test_no_matching_offer_rents_nothing(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, hardware={"gpu": "H100_SXM", "num_gpus": 1})
    backend = _backend(vast, sshd, study)
    findings = backend.check_hardware(load_spec(spec))
    assert any(f.status == "unmet" and "no 1 offer(s) match" in f.detail for f in findings)
    with pytest.raises(Exception, match="(?i)hardware|offer"):
        Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert not [c for c in vast.fake.calls if c[0] == "PUT"] and inst.rows(study.ledger()) == []


def _acquire_only(backend: VastBackend, spec: Path, study: Study) -> tuple[Ledger, str]:
    """An experiment row to charge against, then acquire (expected to fail) outside the pipeline."""
    import asyncio

    from ratiocinator.pipeline import open_experiment

    ledger = study.ledger()
    loaded = load_spec(spec)
    exp, _ = open_experiment(ledger, loaded, new=True)
    backend.attach(Budget(ledger, exp.id, loaded.spec.max_dollars))
    asyncio.run(backend.acquire(loaded))
    return ledger, exp.id


def test_arrivals_stopped_twice_at_once_are_noted_once(vast: VastServer, study: Study) -> None:
    """A second stop while the first is still cancelling (its rentals destroying what they rented) finds
    nothing coming: one `arrivals_stopped` event, and a replenish would not count those instances."""
    import asyncio

    from ratiocinator.pipeline import open_experiment

    backend = VastBackend(study.home, settings=VastSettings(base_url=vast.url), api_key=API_KEY)
    ledger = study.ledger()
    loaded = load_spec(_spec(study))
    exp, _ = open_experiment(ledger, loaded, new=True)
    backend.attach(Budget(ledger, exp.id, loaded.spec.max_dollars))

    async def renting() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # destroying what it rented
            raise

    async def go() -> tuple[int, int]:
        backend._arrivals[asyncio.create_task(renting())] = 2
        await asyncio.sleep(0)
        before = backend.arriving()
        first = asyncio.create_task(backend.stop_arrivals("no work left"))
        await asyncio.sleep(0.05)
        during = backend.arriving()
        await asyncio.gather(first, backend.stop_arrivals("no work left"))
        return before, during

    assert asyncio.run(go()) == (2, 0)
    (stopped,) = _events(ledger, exp.id, "arrivals_stopped")
    assert stopped["data"]["instances"] == 2


def test_boot_timeout_destroys_the_instance(sshd: Sshd, vast: VastServer, study: Study) -> None:
    vast.fake.boot_s = math.inf
    backend = _backend(vast, sshd, study, boot_timeout_s=1.0)
    with pytest.raises(BackendError, match="did not boot within 1s"):
        _acquire_only(backend, _spec(study), study)
    assert vast.fake.live() == [] and len(vast.fake.destroyed) == 1
    (row,) = inst.rows(study.ledger())
    assert row.state == "destroyed" and row.note == "renting failed" and row.cost is not None


def test_ssh_refused_destroys_the_instance(sshd: Sshd, vast: VastServer, study: Study) -> None:
    vast.fake.ssh_port = free_port()  # nothing listens there
    vast.fake.charge_lag_s = 3600  # its charge, when settled, is listed but does not cover its lifetime yet
    backend = _backend(vast, sshd, study, boot_timeout_s=8.0)  # it lives past BILLING_SLACK_S
    with pytest.raises(BackendError, match="SSH to the rented instance"):
        _acquire_only(backend, _spec(study), study)
    assert vast.fake.live() == []
    (row,) = inst.rows(study.ledger())
    assert row.state == "destroyed"
    assert row.cost_source == "lifetime × price (the provider's charges do not cover this instance's lifetime yet)"


@pytest.mark.subprocess
@pytest.mark.latex
def test_billing_error_falls_back_to_lifetime_times_price(sshd: Sshd, vast: VastServer, study: Study) -> None:
    vast.fake.billing_fails = True
    spec = _spec(study)
    backend = _backend(vast, sshd, study)
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == "completed", outcome.message
    (row,) = inst.rows(study.ledger())
    assert row.cost_source.startswith("lifetime × price (billing unavailable: Vast.ai API GET /charges/"
                                      " answered HTTP 500")
    expected = (row.destroyed_at - row.created_at) / 3600 * (row.dph + backend.storage_dph)  # type: ignore[operator]
    assert row.cost == pytest.approx(expected, rel=1e-6)
    assert any("billing unavailable" in n for n in backend.notes)

    # Later, `instances --reconcile` records what the provider billed in place of the estimate.
    env = {"VAST_API_KEY": API_KEY, "VAST_API_URL": vast.url}
    down = study.cli("instances", "--reconcile", env=env)
    assert down.returncode == 1 and "the provider's charges could not be read" in down.stderr
    assert "Traceback" not in down.stderr and inst.get(study.ledger(), row.id).cost == row.cost  # nothing lost
    vast.fake.billing_fails = False
    done = study.cli("instances", "--reconcile", env=env)
    assert done.returncode == 0, done.stderr
    (charge,) = [c for c in vast.fake.charges if c["source"] == f"instance-{row.provider_id}"]
    assert f"${charge['amount']:.4f} billed" in done.stdout
    ledger = study.ledger()
    billed = inst.get(ledger, row.id)
    assert billed.cost == pytest.approx(charge["amount"]) and billed.cost_source.startswith("provider billing"
                                                                                            " (reconciled")
    exp = ledger.experiments()[-1]
    assert ledger.money(exp.id) == (pytest.approx(charge["amount"]), 0.0)
    (event,) = _events(ledger, exp.id, "instance_reconciled")
    assert (event["data"]["estimated"] == pytest.approx(row.cost)
            and event["data"]["billed"] == pytest.approx(charge["amount"]))
    again = study.cli("instances", "--reconcile", env=env)
    assert again.returncode == 0 and "nothing to reconcile" in again.stdout


def _research_while_the_instance_vanishes(vast: VastServer, study: Study, spec: Path, backend: VastBackend,
                                          host_dies: Callable[[], None],
                                          provider: Callable[[int], None] | None = None) -> ResearchOutcome:
    """Run the study; once a run has started, the provider loses its instance (or ``provider`` does
    something else to it), then ``host_dies``."""
    def vanish() -> None:
        deadline = time.time() + 30
        while time.time() < deadline and not _runner_pids(study):
            time.sleep(0.05)
        time.sleep(0.3)
        (live,) = vast.fake.live()
        (provider or vast.fake.vanish)(live["id"])
        host_dies()

    thread = threading.Thread(target=vanish)
    thread.start()
    try:
        return Research(load_spec(spec), study.home, backend=backend, check=False).run()
    finally:
        thread.join()
        _kill_runners(study)


@pytest.mark.latex
def test_instance_vanishing_mid_run_ends_the_run_as_infra(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 20}}],
                 failure_policy={"max_attempts": 1})
    backend = _backend(vast, sshd, study)

    def host_dies() -> None:  # its connections die and its SSH endpoint stops answering
        sshd.drop_connections()
        sshd.stop()

    outcome = _research_while_the_instance_vanishes(vast, study, spec, backend, host_dies)
    ledger = study.ledger()
    (run,) = ledger.runs(ledger.experiments()[-1].id)
    assert run.status == "failed" and run.failure == "infra" and "vanished" in run.reason, (
        run.status, run.reason, outcome)
    (row,) = inst.rows(ledger)
    assert row.state == "lost" and row.cost is not None
    assert vast.fake.live() == []


ORCHESTRATOR = """
import json, sys
from pathlib import Path
from ratiocinator.backends.vast.backend import VastBackend, VastSettings
from ratiocinator.pipeline import Research, ResearchOutcome
from ratiocinator.spec.models import load_spec
spec, home, settings, key = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
backend = VastBackend(Path(home), settings=VastSettings(**settings), api_key=key)
Research(load_spec(Path(spec)), Path(home), backend=backend, check=False).run()
"""


def _orchestrate(vast: VastServer, sshd: Sshd, study: Study, spec: Path, **fields: object) -> subprocess.Popen[str]:
    settings = _settings(vast, sshd, study, **fields).__dict__
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, str(spec), str(study.home), json.dumps(settings),
                             API_KEY],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_run(study: Study, proc: subprocess.Popen[str]) -> None:
    deadline = time.time() + 40
    while time.time() < deadline and not _runner_pids(study):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    assert _runner_pids(study), "the run never started"


@pytest.mark.subprocess
def test_kill_9_then_reap_leaves_nothing_live(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 30}}])
    proc = _orchestrate(vast, sshd, study, spec)
    try:
        _wait_for_run(study, proc)
        assert len(vast.fake.live()) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_runners(study)
    assert len(vast.fake.live()) == 1  # the orchestrator died without destroying it
    ledger = study.ledger()
    (row,) = inst.rows(ledger, live=True)
    assert row.deadline > time.time()  # the TTL is recorded
    reaped = reaper.reap(ledger, VastApi(API_KEY, vast.url))
    assert [(r.provider_id, r.outcome) for r in reaped] == [(row.provider_id, "destroyed")]
    assert vast.fake.live() == [] and inst.rows(ledger, live=True) == []
    exp_id = ledger.experiments()[-1].id
    assert ledger.money(exp_id)[1] == pytest.approx(0.0)  # no reservation left open: the instance is paid
    assert reaper.reap(ledger, VastApi(API_KEY, vast.url)) == []  # idempotent


@pytest.mark.subprocess
def test_ttl_destroys_the_instance_when_nobody_reaps(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 30}}], train_timeout_s=5)
    proc = _orchestrate(vast, sshd, study, spec, boot_timeout_s=2, setup_allowance_s=4, work_s=1)
    try:
        _wait_for_run(study, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_runners(study)
    (row,) = inst.rows(study.ledger(), live=True)
    while time.time() < row.deadline + 1.0:
        time.sleep(0.1)
    assert vast.fake.live() == []  # the host's watchdog fired: nothing survives a kill -9
    reaped = reaper.reap(study.ledger(), VastApi(API_KEY, vast.url), expired_only=True)
    assert [r.outcome for r in reaped] == ["already_gone"] and reaped[0].detail == "past its self-destruct deadline"


def test_reap_finds_an_instance_rented_before_the_ledger_learnt_its_id(sshd: Sshd, vast: VastServer,
                                                                        study: Study) -> None:
    ledger = study.ledger()
    row = inst.record_requested(ledger, experiment_id=None, provider="vast", offer=offer(1), deadline=time.time() + 60,
                                charges=[])
    api = VastApi(API_KEY, vast.url)
    api.rent(1, {"client_id": "me", "image": "x", "disk": 10, "onstart": "", "runtype": "ssh", "label": row.label})
    stray = inst.record_requested(ledger, experiment_id=None, provider="vast", offer=offer(1),
                                  deadline=time.time() + 60,
                                  charges=[])  # crashed before renting at all
    reaped = {r.row_id: r.outcome for r in reaper.reap(ledger, api)}
    assert reaped == {row.id: "destroyed", stray.id: "already_gone"} and vast.fake.live() == []
    assert {r.state for r in inst.rows(ledger)} == {"destroyed"}


@pytest.mark.subprocess
def test_plan_shows_matching_offers_and_rents_nothing(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, backend="vast", vast={"base_url": vast.url, "boot_timeout_s": 10})
    env = {"VAST_API_KEY": API_KEY}
    shown = study.cli("plan", str(spec), "--json", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    data = json.loads(shown.stdout)
    assert data["backend"] == "vast"
    assert any(f["status"] == "ok" and "matching offer(s); cheapest RTX_4090" in f["detail"] for f in data["hardware"])
    assert not [c for c in vast.fake.calls if c[0] == "PUT"]  # plan rents nothing
    listed = study.cli("instances", env=env)
    assert listed.returncode == 2 and "no ledger" in listed.stderr  # plan wrote nothing: no ledger, no instance


def _events(ledger: Ledger, exp_id: str, kind: str) -> list:
    return [e for e in ledger.events(exp_id) if e["kind"] == kind]


def _three_4090s(server: VastServer) -> None:
    server.fake.offers = [offer(1, dph=0.40), offer(3, dph=0.45), offer(4, dph=0.50), offer(2, "A100", 1.10)]


@pytest.mark.latex
def test_idle_instance_is_given_back_while_the_last_run_goes_on(sshd: Sshd, vast: VastServer, study: Study) -> None:
    _three_4090s(vast)
    spec = _spec(study, arms=[{"name": "fast", "env": {"BONUS": 20}},
                              {"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 8}}], concurrency=2)
    outcome = Research(load_spec(spec), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = {r.arm: r for r in ledger.runs(exp.id)}
    assert {a: r.status for a, r in runs.items()} == {"fast": "succeeded", "slow": "succeeded"}
    rows = {row.provider_id: row for row in inst.rows(ledger)}
    assert len(rows) == 2 and all(row.state == "destroyed" for row in rows.values()) and vast.fake.live() == []
    fast_box = rows[runs["fast"].slot.split(":")[0].removeprefix("vast")]
    slow_box = rows[runs["slow"].slot.split(":")[0].removeprefix("vast")]
    # The last iteration has nothing more for the fast run's instance: it is destroyed at once, not held.
    assert fast_box.destroyed_at is not None and runs["slow"].ended_at is not None
    assert fast_box.destroyed_at < runs["slow"].ended_at - 4
    assert fast_box.note == "no work left for it" and slow_box.destroyed_at >= runs["slow"].ended_at
    released = _events(ledger, exp.id, "slot_released")  # each instance the moment its work ended
    assert [e["data"]["slot"].split(":")[0] for e in released] == [
        f"vast{fast_box.provider_id}", f"vast{slow_box.provider_id}"]
    assert all("last iteration" in e["message"] for e in released)
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(sum(row.cost for row in rows.values()))


@pytest.mark.latex
def test_capacity_given_back_mid_experiment_is_rented_again_for_the_next_iteration(
        sshd: Sshd, vast: VastServer, study: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    from ratiocinator.execution import executor

    _three_4090s(vast)
    monkeypatch.setattr(executor, "IDLE_CHECK_S", 0.5)
    spec = _spec(study, arms=[{"name": "fast", "env": {"BONUS": 20}},
                              {"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 20}}], concurrency=2,
                 max_iterations=2, search={"space": {"BONUS": {"choices": [20]}}, "arms_per_iteration": 1,
                                           "confirm_top": 1, "confirm_replicates": 2},
                 failure_policy={"max_attempts": 1})
    outcome = Research(load_spec(spec), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert sorted((r.arm, r.replicate, r.status) for r in runs) == [
        ("fast", 0, "succeeded"), ("fast", 1, "succeeded"), ("fast", 2, "succeeded"), ("slow", 0, "succeeded")]
    slow = next(r for r in runs if r.arm == "slow")
    first, held, again = inst.rows(ledger)  # in rent order
    fast_box = first if slow.slot.startswith(f"vast{held.provider_id}:") else held
    # Iteration 1: the fast run's instance idled while the slow run still had ~15 s to go, more than
    # renting one again costs here (a second or two): it was given back.
    assert fast_box.destroyed_at is not None and fast_box.destroyed_at < slow.ended_at - 5
    released = _events(ledger, exp.id, "slot_released")
    assert "getting it back costs" in released[0]["message"]
    # Iteration 2 wants two slots for its two confirmation runs: one instance is rented back, same GPU model.
    assert again.created_at > slow.ended_at and again.gpu_name == fast_box.gpu_name == "RTX_4090"
    assert _events(ledger, exp.id, "capacity")
    # The held instance starts them at once; the one rented back joins when it is ready.
    assert {r.slot.split(":")[0] for r in runs if r.replicate > 0} <= {f"vast{p}" for p in (
        again.provider_id, (held if fast_box is first else first).provider_id)}
    assert vast.fake.live() == [] and all(row.state == "destroyed" for row in inst.rows(ledger))
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(sum(row.cost for row in inst.rows(ledger)))


@pytest.mark.latex
def test_vanished_instance_is_replaced_and_the_run_retried(sshd: Sshd, vast: VastServer, study: Study) -> None:
    _three_4090s(vast)
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 6, "BONUS": 3}}],
                 failure_policy={"max_attempts": 2, "retry_backoff_s": 0})
    backend = _backend(vast, sshd, study)

    def host_dies() -> None:
        _kill_runners(study)  # the machine died with its processes
        sshd.drop_connections()
        sshd.listen_only("127.0.0.2", "127.0.0.3")  # its endpoint stops answering; other machines still do

    outcome = _research_while_the_instance_vanishes(vast, study, spec, backend, host_dies)
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    lost_run, retried = ledger.runs(ledger.experiments()[-1].id)
    assert lost_run.status == "failed" and lost_run.failure == "infra" and "vanished" in lost_run.reason
    assert retried.status == "succeeded" and retried.attempt == 2
    lost, replacement = inst.rows(ledger)
    assert lost.state == "lost" and replacement.state == "destroyed"
    assert retried.slot.startswith(f"vast{replacement.provider_id}:RTX_4090/")
    assert vast.fake.live() == []


@pytest.mark.latex
def test_deadline_is_extended_before_a_run_would_outlive_it(sshd: Sshd, vast: VastServer, study: Study) -> None:
    # TTL 2 + 4 + 1 = 7 s: without an extension the host's watchdog would kill the 10 s run.
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 10}}], train_timeout_s=15)
    backend = _backend(vast, sshd, study, boot_timeout_s=2, setup_allowance_s=4, work_s=1)
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    (run,) = ledger.runs(exp.id)
    assert run.status == "succeeded", run.reason
    (row,) = inst.rows(ledger)
    assert row.deadline >= run.started_at + 15 + 100 and len(row.charges) == 2
    assert int((study.root / "remote" / "deadline").read_text()) == int(row.deadline)  # what the watchdog reads
    (extended,) = _events(ledger, exp.id, "instance_extended")
    assert extended["data"]["provider_id"] == row.provider_id
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(row.cost)


def test_extension_the_budget_cannot_pay_stops_without_launching(sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 10}}], train_timeout_s=15,
                 max_dollars=0.005)  # the 7 s rental fits; another 135 s at $0.40/h does not
    backend = _backend(vast, sshd, study, boot_timeout_s=2, setup_allowance_s=4, work_s=1)
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == "budget_exhausted" and "keeping instance" in outcome.message, outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert ledger.runs(exp.id) == []
    (row,) = inst.rows(ledger)
    assert row.state == "destroyed" and vast.fake.live() == []
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent <= 0.005


@pytest.mark.latex
def test_runs_start_on_the_first_instance_up_and_a_slow_one_joins_when_ready(
        sshd: Sshd, vast: VastServer, study: Study) -> None:
    _three_4090s(vast)
    vast.fake.boot_s_by_offer = {3: 5.0}  # the second cheapest machine boots slowly
    spec = _spec(study, factors={"BONUS": [1, 2, 3, 4, 5], "MODE": ["slow"], "SLEEP_S": [3]}, concurrency=2)
    outcome = Research(load_spec(spec), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = sorted(ledger.runs(exp.id), key=lambda r: r.started_at)
    assert len(runs) == 5 and all(r.status == "succeeded" for r in runs)
    fast, slow = sorted(inst.rows(ledger), key=lambda row: row.running_at or 0)
    assert fast.offer["id"] == 1 and slow.offer["id"] == 3
    # Nobody waited for the slow machine: runs began before it had even booted ...
    assert slow.running_at is not None and runs[0].started_at < slow.running_at
    # ... and it took runs once it was ready.
    assert any(r.slot.startswith(f"vast{slow.provider_id}:") for r in runs)
    assert any(e["message"].startswith("ready:") for e in _events(ledger, exp.id, "capacity"))
    assert vast.fake.live() == [] and {row.state for row in inst.rows(ledger)} == {"destroyed"}


@pytest.mark.latex
def test_instance_still_booting_when_the_queue_runs_dry_is_not_waited_for(
        sshd: Sshd, vast: VastServer, study: Study) -> None:
    _three_4090s(vast)
    vast.fake.boot_s_by_offer = {3: 100.0}  # the second machine would come up long after the work ran out
    spec = _spec(study, arms=[{"name": "short", "env": {"MODE": "slow", "SLEEP_S": 2}},
                              {"name": "long", "env": {"MODE": "slow", "SLEEP_S": 8}}], concurrency=2)
    backend = _backend(vast, sshd, study, boot_timeout_s=120)
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = sorted(ledger.runs(exp.id), key=lambda r: r.started_at)
    assert [r.status for r in runs] == ["succeeded", "succeeded"]
    up, booting = sorted(inst.rows(ledger), key=lambda row: row.offer["id"])
    assert booting.offer["id"] == 3 and booting.running_at is None
    assert all(r.slot.startswith(f"vast{up.provider_id}:") for r in runs)
    # The second run took the last queued work: the machine still booting was destroyed then, not
    # when the experiment ended (~8 s later) or when it would have finished booting.
    assert booting.destroyed_at is not None and booting.destroyed_at < runs[1].ended_at - 4
    assert booting.note == "no work left in the experiment's last iteration"
    (stopped,) = _events(ledger, exp.id, "arrivals_stopped")
    assert stopped["data"]["instances"] == 1
    assert vast.fake.live() == [] and {row.state for row in inst.rows(ledger)} == {"destroyed"}
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(sum(row.cost for row in inst.rows(ledger)))


# -- the provider's errors, end to end ------------------------------------------------------------


@pytest.mark.latex
def test_an_experiment_rides_out_a_storm_of_429s_5xx_and_dropped_connections(
        sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "low", "env": {"BONUS": 10}}, {"name": "high", "env": {"BONUS": 20}}],
                 replicates=2)
    # Every other API call of the experiment fails first: throttled, a gateway error, a reset, a lost answer.
    storm = [Fault(429, retry_after=0.05), None, Fault(503), None, Fault(drop=True), None, Fault(502, after=True), None]
    vast.fake.inject(storm * 8)
    outcome = Research(load_spec(spec), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    assert len(vast.fake.faults_served) >= 8  # the storm really hit the experiment's calls
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert [r.status for r in ledger.runs(exp.id)] == ["succeeded"] * 4
    (row,) = inst.rows(ledger)  # one instance: no rent was repeated after a lost answer
    assert row.state == "destroyed" and vast.fake.destroyed == [int(row.provider_id or 0)] and vast.fake.live() == []
    spent, reserved = ledger.money(exp.id)
    assert reserved == 0 and spent == pytest.approx(row.cost)


@pytest.mark.latex
def test_a_rent_whose_answer_is_lost_is_adopted_not_rented_twice(sshd: Sshd, vast: VastServer, study: Study) -> None:
    vast.fake.inject([Fault(503, after=True)], method="PUT", path="/api/v0/asks/.*")  # rented, then "503"
    outcome = Research(load_spec(_spec(study)), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    (row,) = inst.rows(study.ledger())
    assert [m for m, _ in vast.fake.calls if m == "PUT"] == ["PUT"]  # rented once, found again by its label
    assert row.state == "destroyed" and vast.fake.destroyed == [int(row.provider_id or 0)] and vast.fake.live() == []


@pytest.mark.latex
def test_a_key_revoked_mid_experiment_stops_it_and_destroys_nothing_by_mistake(
        sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 2}}], replicates=3)
    backend = _backend(vast, sshd, study, health_check_s=0)  # every launch re-reads its instance

    def revoke() -> None:
        deadline = time.time() + 30
        while time.time() < deadline and not _runner_pids(study):
            time.sleep(0.05)
        vast.fake.api_keys.clear()  # the user rotated the key at the provider

    thread = threading.Thread(target=revoke)
    thread.start()
    try:
        with pytest.raises(CredentialsError, match="refused the API key") as err:
            Research(load_spec(spec), study.home, backend=backend, check=False).run()
    finally:
        thread.join()
        _kill_runners(study)
    assert "instances --reap" in str(err.value)
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert exp.status == "failed" and "refused the API key" in exp.note
    assert not [r for r in ledger.runs(exp.id) if r.failure == "infra"]  # not mistaken for a lost host
    # Nothing was taken for gone: the instance still exists and its row is live, deadline and all.
    (live,) = vast.fake.live()
    (row,) = inst.rows(ledger, live=True)
    assert row.provider_id == str(live["id"]) and row.deadline > time.time()
    assert any(e["kind"] == "instance_destroy_failed" for e in ledger.events(exp.id))
    # Once the key works again, the reaper destroys it and the money is settled.
    vast.fake.api_keys.add(API_KEY)
    assert [r.outcome for r in reaper.reap(ledger, VastApi(API_KEY, vast.url))] == ["destroyed"]
    assert vast.fake.live() == [] and ledger.money(exp.id)[1] == pytest.approx(0.0)


@pytest.mark.latex
def test_an_instance_stopped_at_the_provider_is_destroyed_not_taken_for_gone(
        sshd: Sshd, vast: VastServer, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "SLEEP_S": 20}}],
                 failure_policy={"max_attempts": 1})
    backend = _backend(vast, sshd, study)

    def host_dies() -> None:  # the machine stops: its connections go first, so no exit report can come back
        sshd.drop_connections()
        sshd.stop()
        _kill_runners(study)

    outcome = _research_while_the_instance_vanishes(vast, study, spec, backend, host_dies, provider=vast.fake.stop)
    ledger = study.ledger()
    (run,) = ledger.runs(ledger.experiments()[-1].id)
    assert run.status == "failed" and run.failure == "infra", (run.reason, outcome)
    (row,) = inst.rows(ledger)
    # A stopped instance still bills its storage: it was destroyed by us, not recorded as lost.
    assert row.state == "destroyed" and "exited at the provider" in row.note
    assert vast.fake.destroyed == [int(row.provider_id or 0)] and vast.fake.live() == []


@pytest.mark.latex
def test_a_destroy_the_provider_does_not_do_keeps_the_instance_live_for_the_reaper(
        sshd: Sshd, vast: VastServer, study: Study) -> None:
    vast.fake.refuse_destroys = 100
    with pytest.raises(BackendError, match="could not be destroyed and may still bill") as err:
        Research(load_spec(_spec(study)), study.home, backend=_backend(vast, sshd, study), check=False).run()
    assert '"success": false' in str(err.value) and "instances --reap" in str(err.value)
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert [r.status for r in ledger.runs(exp.id)] == ["succeeded"]  # the work was done
    (row,) = inst.rows(ledger, live=True)
    assert row.state == "destroying" and len(vast.fake.live()) == 1
    vast.fake.refuse_destroys = 0
    assert [r.outcome for r in reaper.reap(ledger, VastApi(API_KEY, vast.url))] == ["destroyed"]
    assert vast.fake.live() == [] and ledger.money(exp.id)[1] == pytest.approx(0.0)
