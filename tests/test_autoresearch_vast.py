"""Autoresearch on rented GPUs: the fixture's patch loop with ``backend: vast`` against the fake Vast API
(vastserver.py), whose instances' SSH endpoints are the test sshd, so rent → boot → ship each commit →
run → destroy really happens. Each worker rents one instance of the session's GPU model and reuses it
for every attempt; the instances' money is the session's (``ar_charges``) and survives a kill -9.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CLI, process_alive
from ratiocinator.autoresearch.log import session_record
from ratiocinator.autoresearch.rented import give_back
from ratiocinator.autoresearch.store import Store
from ratiocinator.store import instances as inst
from ratiocinator.store.ledger import Ledger
from sshd import Sshd
from test_autoresearch import PATCHES, Lab, new_lab, running_attempt, wait_for
from test_autoresearch_backends import assert_same_as_local
from vastserver import API_KEY, FakeVast, VastServer, offer


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


@pytest.fixture
def vast(sshd: Sshd) -> Iterator[VastServer]:
    offers = [offer(1, "RTX_4090", 0.40), offer(2, "RTX_4090", 0.45), offer(3, "A100", 1.10),
              offer(4, "RTX_3090", 0.20)]  # the cheapest GPU, but only one: two workers need two of one model
    server = VastServer(FakeVast(ssh_port=sshd.port, authorized_keys=sshd.root / "authorized_keys", offers=offers,
                                 boot_s=0.0))
    try:
        yield server
    finally:
        server.close()


def rented(lab: Lab, vast: VastServer, sshd: Sshd, **fields: object) -> dict[str, object]:
    """A program's ``backend: vast`` settings for the fake, and the key in the session's environment."""
    return {"backend": "vast", "vast": {"base_url": vast.url, "ssh_user": sshd.user,
                                        "workdir": str(lab.root / "remote"), "boot_timeout_s": 10,
                                        "setup_allowance_s": 60, "api_backoff_s": 0.05, "destroy_confirm_s": 5,
                                        **fields}}


def env(lab: Lab, vast: VastServer, **extra: str) -> dict[str, str]:
    return lab.env(VAST_API_KEY=API_KEY, VAST_API_URL=vast.url, **extra)


def rents(vast: VastServer) -> list[str]:
    return [path for method, path in vast.fake.calls if method == "PUT" and "/asks/" in path]


def session_money(lab: Lab, tag: str) -> tuple[int, list[inst.InstanceRow], list[tuple[str, str]], tuple[float, float]]:
    """The session's id, its instance rows, its charges (kind, state) and (spent, reserved)."""
    store = Store(Ledger(lab.home / "ledger.db"))
    try:
        session = store.session_by_tag(tag)
        assert session is not None
        rows = inst.rows(store.ledger, ar_session_id=session.id)
        charges = [(r[0], r[1]) for r in store.db.execute(
            "SELECT kind, state FROM ar_charges WHERE session_id = ? ORDER BY id", (session.id,))]
        research = store.db.execute("SELECT COUNT(*) FROM charges").fetchone()[0]
        assert research == 0  # nothing of this session is settled on a research experiment's row
        return session.id, rows, charges, store.money(session.id)
    finally:
        store.close()


def test_an_instance_is_held_through_an_agent_turn_cheaper_than_renting_again() -> None:
    # No turn measured yet: the rest of this one is taken to be as long as it has lasted so far.
    assert not give_back(20.0, [], reacquire_s=60.0, stopping=False)
    assert give_back(61.0, [], reacquire_s=60.0, stopping=False)
    # The worker's agent takes about 5 minutes a turn: two minutes in, three are left, more than
    # the minute renting again takes, so the instance goes back; with 30 s turns it is held.
    assert give_back(120.0, [300.0, 310.0], reacquire_s=60.0, stopping=False)
    assert not give_back(10.0, [30.0, 30.0], reacquire_s=60.0, stopping=False)
    assert give_back(0.0, [30.0], reacquire_s=60.0, stopping=True)  # the session is ending


@pytest.mark.subprocess  # the session starts its runs
def test_one_worker_reuses_one_instance_and_decides_as_the_local_loop(lab: Lab, sshd: Sshd,
                                                                     vast: VastServer) -> None:
    # Every attempt ships its own commit to the same instance: a run of an older commit would measure the
    # baseline again, and the decisions would differ from the local loop's.
    vast.fake.boot_s = 5  # renting again outlasts a patch turn, even on a busy machine: the instance is held
    assert_same_as_local(lab, "overvast", backend=rented(lab, vast, sshd), VAST_API_KEY=API_KEY)
    assert len(rents(vast)) == 1 and vast.fake.live() == []
    session_id, (row,), charges, (spent, reserved) = session_money(lab, "overvast")
    assert row.ar_session_id == session_id and row.experiment_id is None and row.state == "destroyed"
    assert row.gpu_name == "RTX_3090" and row.cost is not None and row.cost > 0
    assert {kind for kind, _ in charges} == {"compute", "instance"} and all(s == "settled" for _, s in charges)
    assert reserved == pytest.approx(0.0) and spent == pytest.approx(row.cost)  # the instance is what was paid

    # What each kept improvement cost: the instance's time from the previous keep to it, all of it accounted for.
    store = Store(Ledger(lab.home / "ledger.db"))
    try:
        session = store.session(session_id)
        costs = session_record(session, store.attempts(session_id), store)["costs"]
    finally:
        store.close()
    kept = costs["kept"]
    assert [k["attempts"] for k in kept] == [1, 5, 1]  # keep; discard, 2 crashes, violation, keep; keep
    assert [k["previous_metric"] for k in kept[1:]] == [k["metric"] for k in kept[:-1]]
    assert all(k["instances_usd"] > 0 and k["total_usd"] == k["instances_usd"] for k in kept)  # no LLM, $0 runs
    stretches = [costs["baseline"], *kept, costs["after_last_keep"]]
    assert sum(s["total_usd"] for s in stretches) == pytest.approx(spent) == pytest.approx(costs["spent_usd"])
    # The final report was written after the instance was paid for: every dollar in it verifies.
    checked = lab.cli("verify", str(lab.home / "autoresearch" / "overvast"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.subprocess  # the session starts its runs
def test_two_workers_rent_two_instances_of_one_model_and_reuse_them(lab: Lab, sshd: Sshd, vast: VastServer) -> None:
    vast.fake.boot_s = 5  # renting again outlasts a patch turn, even on a busy machine: each instance is held
    patches = lab.patches("parallel", "01", "02", "06", "07")
    program = lab.program("vastpar", patches=patches, workers=2, gpus_per_worker=1, timeout_s=20,
                          **rented(lab, vast, sshd))
    outcome = lab.run(program, **env(lab, vast, AR_TRAIN_SLEEP="0.3"))
    assert outcome.exit_code == 0, outcome.reason
    attempts = lab.attempts("vastpar")
    workers = {a.worker for a in attempts if not a.is_baseline}
    assert workers == {0, 1}
    hosts_of = {w: {a.host for a in attempts if a.worker == w and a.host} for w in workers}
    assert all(len(h) == 1 for h in hosts_of.values()) and hosts_of[0] != hosts_of[1]  # each its own, every attempt
    assert all(a.status in ("baseline", "keep", "discard") for a in attempts)
    assert len(rents(vast)) == 2 and vast.fake.live() == []
    _, rows, _, (_, reserved) = session_money(lab, "vastpar")
    # The cheapest GPU (RTX_3090) has one offer; two workers get the model two instances can be rented of.
    assert len(rows) == 2 and {r.gpu_name for r in rows} == {"RTX_4090"} and all(r.state == "destroyed" for r in rows)
    assert reserved == pytest.approx(0.0)
    for a in attempts:  # each worker's runs went to its instance's GPU
        assert a.status not in ("keep", "discard", "baseline") or "cuda 0" in a.log_tail


def slow_program(lab: Lab, vast: VastServer, sshd: Sshd, tag: str) -> Path:
    # Renting again (boot included) takes longer than a patch turn even on a busy machine, so each
    # orchestrator holds its one instance between attempts: the rents counted below are the rule's.
    vast.fake.boot_s = 5
    hang = (PATCHES / "04-hang.patch").read_text()
    patches = lab.patches(tag, "01", extra={"02-slow.patch": hang.replace("# prefetch", "# slow: prefetch"),
                                            "03-wider.patch": (PATCHES / "07-wider.patch").read_text()})
    return lab.program(tag, patches=patches, timeout_s=60, **rented(lab, vast, sshd))


def kill_mid_attempt(lab: Lab, vast: VastServer, program: Path, tag: str) -> list[int]:
    first = subprocess.Popen([*CLI, "--home", str(lab.home), "autoresearch", str(program)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env(lab, vast), cwd=lab.root)
    wait_for(lambda: running_attempt(lab, tag, "02-slow.patch"), timeout=120, what="the slow run")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert len(vast.fake.live()) == 1  # the orchestrator died without destroying its instance
    return [int(p) for p in (lab.root / "pids").read_text().split()]


def assert_nothing_lost(lab: Lab, tag: str) -> None:
    attempts = lab.attempts(tag)
    assert [(a.status, a.agent_ref) for a in attempts] == [
        ("baseline", ""), ("keep", "01-deeper.patch"), ("interrupted", "02-slow.patch"), ("keep", "03-wider.patch")]
    assert "orchestrator stopped" in attempts[2].reason
    assert lab.kept_history(tag) == [attempts[1].commit_sha, attempts[3].commit_sha]


@pytest.mark.subprocess  # the session starts its runs
def test_kill_9_mid_attempt_then_the_same_command_loses_nothing(lab: Lab, sshd: Sshd, vast: VastServer) -> None:
    program = slow_program(lab, vast, sshd, "vastkill")
    orphans = kill_mid_attempt(lab, vast, program, "vastkill")
    listed = lab.cli("instances", env=env(lab, vast))
    assert listed.returncode == 0 and "autoresearch session" in listed.stdout, listed.stdout + listed.stderr

    done = lab.cli("autoresearch", str(program), env=env(lab, vast), timeout=180)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "left rented by the stopped orchestrator: destroyed" in done.stdout + done.stderr
    assert not any(process_alive(p) for p in orphans)
    assert_nothing_lost(lab, "vastkill")
    assert vast.fake.live() == [] and len(rents(vast)) == 2  # the dead one's instance, then the resumed one's
    _, rows, charges, (spent, reserved) = session_money(lab, "vastkill")
    assert [r.state for r in rows] == ["destroyed", "destroyed"] and all(s == "settled" for _, s in charges)
    assert reserved == pytest.approx(0.0)
    # The dead orchestrator's instance was paid at its lifetime (not its whole reserved TTL) before the rest.
    first_charges = rows[0].charges
    store = Store(Ledger(lab.home / "ledger.db"))
    try:
        paid = [store.db.execute("SELECT reserved, settled FROM ar_charges WHERE id = ?", (c,)).fetchone()
                for c in first_charges]
    finally:
        store.close()
    assert sum(p[1] for p in paid) == pytest.approx(rows[0].cost)
    assert rows[0].cost is not None and rows[0].cost < sum(p[0] for p in paid)


@pytest.mark.subprocess  # the session starts its runs
def test_instances_reap_after_a_kill_9_leaves_nothing_live_and_pays_the_session(lab: Lab, sshd: Sshd,
                                                                               vast: VastServer) -> None:
    program = slow_program(lab, vast, sshd, "vastreap")
    orphans = kill_mid_attempt(lab, vast, program, "vastreap")
    reaped = lab.cli("instances", "--reap", env=env(lab, vast))
    assert reaped.returncode == 0, reaped.stderr + reaped.stdout
    assert vast.fake.live() == []
    _, (row,), charges, _ = session_money(lab, "vastreap")
    assert row.state == "destroyed" and row.cost is not None
    instance_charges = [s for k, s in charges if k == "instance"]  # its TTL, and the extension the run needed
    assert len(instance_charges) == len(row.charges) == 2 and set(instance_charges) == {"settled"}  # paid
    again = lab.cli("instances", env=env(lab, vast))
    assert "no live instances" in again.stdout

    done = lab.cli("autoresearch", str(program), env=env(lab, vast), timeout=180)  # and the session goes on
    assert done.returncode == 0, done.stderr + done.stdout
    assert not any(process_alive(p) for p in orphans)
    assert_nothing_lost(lab, "vastreap")
    assert vast.fake.live() == [] and inst.rows(Ledger(lab.home / "ledger.db"), live=True) == []


@pytest.mark.subprocess  # the session's git work
def test_an_instance_max_dollars_cannot_pay_for_is_never_rented(lab: Lab, sshd: Sshd, vast: VastServer) -> None:
    program = lab.program("vastpoor", max_dollars=0.001, **rented(lab, vast, sshd))
    outcome = lab.run(program, VAST_API_KEY=API_KEY)
    assert outcome.exit_code == 0 and "renting RTX_3090 at $0.2/h" in outcome.reason, outcome.reason
    assert "max_dollars $0.00" in outcome.reason  # the session's own limit, not a research experiment's
    assert rents(vast) == [] and inst.rows(Ledger(lab.home / "ledger.db")) == []
    assert [a.status for a in lab.attempts("vastpoor")] == ["interrupted"]


SLOW_AGENT = """
import os, pathlib, re, time
time.sleep(20)  # thinking: far longer than renting and preparing an instance again takes here
config = pathlib.Path("config.py")
text = config.read_text()
depth = int(re.search(r"DEPTH = (\\d+)", text).group(1))
if depth >= 5:
    pathlib.Path(os.environ["RATIOCINATOR_GIVE_UP_FILE"]).write_text("depth 5 will do")
    raise SystemExit(0)
config.write_text(text.replace(f"DEPTH = {depth}", f"DEPTH = {depth + 1}"))
pathlib.Path(os.environ["RATIOCINATOR_HYPOTHESIS_FILE"]).write_text("a deeper model fits better\\n")
"""


@pytest.mark.subprocess  # the agent and the runs
def test_an_agent_turn_longer_than_renting_again_gives_the_instance_back(lab: Lab, sshd: Sshd,
                                                                        vast: VastServer) -> None:
    script = lab.root / "agent.py"
    script.write_text(SLOW_AGENT)
    program = lab.program("vastslow", agent={"kind": "command", "command": f"{sys.executable} {script}"},
                          overlap=False,  # nothing is measured behind a turn: the instance idles through it
                          **rented(lab, vast, sshd))
    outcome = lab.run(program, VAST_API_KEY=API_KEY)
    assert outcome.exit_code == 0 and "the agent gave up: depth 5 will do" in outcome.reason, outcome.reason
    assert [a.status for a in lab.attempts("vastslow")] == ["baseline", "keep"]
    # The baseline's instance went back during the first turn; the keep's run rented another, which went back
    # early in the second turn (the first one showed how long a turn takes), not when the session ended.
    assert len(rents(vast)) == 2 and vast.fake.live() == []
    ledger = Ledger(lab.home / "ledger.db")
    given_back = [e["message"] for e in ledger.db.execute("SELECT message FROM events WHERE kind = ?",
                                                          ("ar_instance_given_back",))]
    assert len(given_back) == 2 and all("into the agent's turn" in m for m in given_back)


def test_the_providers_bill_for_a_session_instance_corrects_the_sessions_charge(tmp_path: Path) -> None:
    from ratiocinator.autoresearch.rented import SessionAccount
    from ratiocinator.backends.vast import reaper
    from ratiocinator.backends.vast.api import VastApi

    ledger = Ledger(tmp_path / "ledger.db")
    store = Store(ledger)
    session = store.create_session(tag="t", repo="r", branch="b", base_branch="main", base_commit="c",
                                   program_path="p", program_text="", program_sha256="", protected={})
    account = SessionAccount(ledger, session.id, limit=1.0)
    charge = account.reserve(0.5, kind="instance")
    assert charge is not None
    # A research experiment's charge with the same id must never be touched by this instance's settling.
    ledger.create_experiment(id="e1", name="e", spec_path="s", spec_text="", spec_sha256="", backend="vast")
    research = ledger.reserve("e1", amount=0.5, limit=1.0, kind="compute")
    assert research == charge
    row = inst.record_requested(ledger, experiment_id=None, ar_session_id=session.id, provider="vast",
                                offer={"dph_total": 0.36}, deadline=2e9, charges=[charge])
    inst.update(ledger, row.id, provider_id="7", state="destroyed", destroyed_at=row.created_at + 3600)
    cost, source = reaper.settle(ledger, inst.get(ledger, row.id), None, end=row.created_at + 3600)
    assert (cost, source) == (pytest.approx(0.36), "lifetime × price")
    assert store.money(session.id) == (pytest.approx(0.36), 0.0) and ledger.money("e1") == (0.0, 0.5)

    server = VastServer(FakeVast(ssh_port=1))
    try:
        server.fake.charges.append({"start": row.created_at, "end": row.created_at + 3600, "type": "instance",
                                    "source": "instance-7", "amount": 0.40, "description": "", "metadata": {},
                                    "items": []})
        (reconciled,) = reaper.reconcile_billing(ledger, VastApi(API_KEY, server.url))
    finally:
        server.close()
    assert reconciled.billed == pytest.approx(0.40) and inst.get(ledger, row.id).cost == pytest.approx(0.40)
    assert store.money(session.id) == (pytest.approx(0.40), 0.0) and ledger.money("e1") == (0.0, 0.5)
    ledger.close()
