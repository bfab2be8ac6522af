"""The Vast.ai client and the reaper against a loopback fake that answers as today's API does
(vastserver.py): the v1 instance list and its pages, the errors the provider really sends, and
labels that keep one home's reaper off another home's instances.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.vast import reaper
from ratiocinator.backends.vast.api import RetryPolicy, VastApi, VastAuthError, VastError, v1_root
from ratiocinator.errors import BackendError
from ratiocinator.store import instances as inst
from ratiocinator.store.ledger import Ledger
from vastserver import API_KEY, MAX_PAGE, FakeVast, Fault, VastServer, offer

FAST = RetryPolicy(attempts=4, first_wait_s=0.01, max_wait_s=0.05)


@pytest.fixture
def vast() -> Iterator[VastServer]:
    server = VastServer(FakeVast(ssh_port=1, offers=[offer(i, dph=0.2 + i / 100) for i in range(1, 6)]))
    try:
        yield server
    finally:
        server.close()


def _api(server: VastServer, key: str = API_KEY, **kwargs: object) -> VastApi:
    return VastApi(key, server.url, retry=kwargs.pop("retry", FAST), poll_s=0.02, **kwargs)  # type: ignore[arg-type]


def _rent_body(label: str) -> dict[str, object]:
    return {"client_id": "me", "image": "x", "disk": 10, "onstart": "", "runtype": "ssh", "label": label}


def _calls(server: VastServer, method: str, prefix: str) -> list[str]:
    return [p for m, p in server.fake.calls if m == method and p.startswith(prefix)]


# -- the wire format --------------------------------------------------------------------------


def test_the_instance_list_follows_v1_pages_and_never_the_retired_v0_list(vast: VastServer) -> None:
    ids = [vast.fake.add_instance(f"job-{i}") for i in range(60)]
    listed = _api(vast).list()
    assert [i["id"] for i in listed] == ids  # every page, in order, once
    pages = _calls(vast, "GET", "/api/v1/instances/")
    assert len(pages) == 3 and all(f"limit={MAX_PAGE}" in p for p in pages)
    assert "after_token" not in pages[0] and all("after_token=" in p for p in pages[1:])
    assert not _calls(vast, "GET", "/api/v0/instances/?") and ("GET", "/api/v0/instances/") not in vast.fake.calls


def test_the_retired_v0_list_is_a_clear_error(vast: VastServer) -> None:
    with pytest.raises(VastError, match=r"HTTP 410 \(retired endpoint\).*deprecated_endpoint") as err:
        _api(vast)._call("GET", "/instances/")
    assert "upgrade ratiocinator" in str(err.value)


def test_the_v1_root_is_derived_from_the_documented_v0_base_url() -> None:
    assert v1_root("https://console.vast.ai/api/v0") == "https://console.vast.ai/api/v1"
    assert v1_root("http://127.0.0.1:8080/api/v0/") == "http://127.0.0.1:8080/api/v1"
    with pytest.raises(BackendError, match="does not end in /v0"):
        v1_root("https://console.vast.ai/api")


# -- the errors the provider sends -------------------------------------------------------------


def test_429_waits_out_retry_after_then_succeeds(vast: VastServer) -> None:
    iid = vast.fake.add_instance("x")
    vast.fake.inject([Fault(429, retry_after=0.4)], path=r"/api/v0/instances/\d+/")
    started = time.monotonic()
    assert _api(vast).show(iid)["id"] == iid  # type: ignore[index]
    assert time.monotonic() - started >= 0.4  # the provider's wait, not the (shorter) backoff
    assert [f.status for _, _, f in vast.fake.faults_served] == [429]


def test_5xx_timeouts_and_dropped_connections_are_retried(vast: VastServer) -> None:
    iid = vast.fake.add_instance("x")
    vast.fake.inject([Fault(503), Fault(502), Fault(drop=True)], path=r"/api/v0/instances/\d+/")
    assert _api(vast).show(iid)["id"] == iid  # type: ignore[index]
    assert len(vast.fake.faults_served) == 3
    vast.fake.inject([Fault(503)] * 10)
    with pytest.raises(VastError, match="HTTP 503.*still failing after retries"):
        _api(vast).show(iid)
    assert len(vast.fake.faults_served) == 3 + FAST.attempts


def test_a_wrong_or_revoked_key_is_never_read_as_instance_gone(vast: VastServer) -> None:
    iid = vast.fake.add_instance("x")
    bad = _api(vast, key="revoked-key")
    for call in (lambda: bad.show(iid), lambda: bad.destroy(iid), bad.list, lambda: bad.search_offers({})):
        with pytest.raises(VastAuthError, match="refused the API key.*wrong, revoked or lacks permission"):
            call()
    assert [i["id"] for i in vast.fake.live()] == [iid]  # nothing was destroyed
    assert "revoked-key" not in repr(bad)


def test_a_destroy_counts_only_when_it_says_success_and_the_instance_is_gone(vast: VastServer) -> None:
    iid = vast.fake.add_instance("x")
    api = _api(vast, confirm_s=0.3)
    vast.fake.refuse_destroys = 1
    with pytest.raises(VastError, match='was not done: the provider answered.*"success": false'):
        api.destroy(iid)
    vast.fake.phantom_destroys = 1  # "success", but the instance stays
    with pytest.raises(VastError, match=r"still listed \(running, cur_state running\) 0.3s after"):
        api.destroy(iid)
    assert [i["id"] for i in vast.fake.live()] == [iid]
    assert api.destroy(iid) is True and vast.fake.live() == []
    assert api.destroy(iid) is False  # already gone


def test_a_rent_whose_answer_was_lost_is_found_by_its_label_not_rented_twice(vast: VastServer) -> None:
    api = _api(vast)
    vast.fake.inject([Fault(503, after=True)], method="PUT")  # the instance exists; the answer says 503
    iid = api.rent(1, _rent_body("ratiocinator-0123abcd-1"))
    assert [i["id"] for i in vast.fake.live()] == [iid] and len(_calls(vast, "PUT", "/api/v0/asks/")) == 1
    vast.fake.inject([Fault(drop=True, after=True)], method="PUT")
    second = api.rent(2, _rent_body("ratiocinator-0123abcd-2"))
    assert {i["id"] for i in vast.fake.live()} == {iid, second} and len(_calls(vast, "PUT", "/api/v0/asks/")) == 2


def test_a_rent_refused_before_it_was_done_is_sent_again(vast: VastServer) -> None:
    api = _api(vast)
    vast.fake.inject([Fault(429, retry_after=0.01), Fault(503)], method="PUT")  # neither did anything
    iid = api.rent(1, _rent_body("ratiocinator-0123abcd-1"))
    assert [i["id"] for i in vast.fake.live()] == [iid] and len(_calls(vast, "PUT", "/api/v0/asks/")) == 1
    assert [(m, f.status) for m, _, f in vast.fake.faults_served] == [("PUT", 429), ("PUT", 503)]
    # After the 429 the rent was simply sent again; after the 503 (the client cannot know nothing was done)
    # the label was looked up first, found on no instance, and only then was the offer rented again.
    assert len(_calls(vast, "GET", "/api/v1/instances/")) == 1


# -- labels and the reaper ----------------------------------------------------------------------


def test_a_home_gets_one_id_and_its_labels_carry_it(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    home = ledger.home_id()
    row = inst.record_requested(ledger, experiment_id=None, provider="vast", offer=offer(1), deadline=time.time() + 60,
                                charges=[])
    assert len(home) == 8 and row.label == f"ratiocinator-{home}-{row.id}"
    ledger.close()
    assert Ledger(tmp_path / "ledger.db").home_id() == home  # stored, not made again
    assert Ledger(tmp_path / "other.db").home_id() != home
    assert inst.label_owner(row.label, home) == "mine"
    assert inst.label_owner("ratiocinator-0badf00d-1", home) == "other"
    assert inst.label_owner("ratiocinator-1", home) == "other"  # the scheme before home ids cannot tell homes apart
    assert inst.label_owner("my-notebook", home) is None


def _rented_by(ledger: Ledger, api: VastApi, offer_id: int) -> inst.InstanceRow:
    row = inst.record_requested(ledger, experiment_id=None, provider="vast", offer=offer(offer_id),
                                deadline=time.time() + 600, charges=[])
    provider_id = api.rent(offer_id, _rent_body(row.label))
    inst.update(ledger, row.id, provider_id=str(provider_id), state="running")
    return inst.get(ledger, row.id)


def test_two_homes_on_one_account_each_reap_only_their_own(vast: VastServer, tmp_path: Path) -> None:
    a, b = Ledger(tmp_path / "a" / "ledger.db"), Ledger(tmp_path / "b" / "ledger.db")
    api = _api(vast)
    mine, theirs = _rented_by(a, api, 1), _rented_by(b, api, 2)
    assert mine.id == theirs.id == 1 and mine.label != theirs.label  # the old scheme named both "ratiocinator-1"
    inst.update(a, mine.id, state="destroyed", destroyed_at=time.time())  # A's row closed; the instance bills on
    reaped = reaper.reap(a, api)
    assert [(r.provider_id, r.outcome) for r in reaped] == [
        (mine.provider_id, "orphan_destroyed"), (theirs.provider_id, "left_alone")]
    # Offer 2 of the fixture.
    assert reaped[1].label == theirs.label and reaped[1].status == "loading" and reaped[1].dph == pytest.approx(0.22)
    assert [str(i["id"]) for i in vast.fake.live()] == [theirs.provider_id]
    assert inst.get(b, theirs.id).state == "running"  # B's books untouched
    assert [(r.provider_id, r.outcome) for r in reaper.reap(b, api)] == [(theirs.provider_id, "destroyed")]
    assert vast.fake.live() == [] and inst.rows(b, live=True) == []


def test_an_old_scheme_row_without_provider_id_adopts_nothing_without_all_homes(vast: VastServer,
                                                                                 tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    api = _api(vast)
    row = inst.record_requested(ledger, experiment_id=None, provider="vast", offer=offer(1), deadline=time.time() + 60,
                                charges=[])
    inst.update(ledger, row.id, label=f"ratiocinator-{row.id}")  # a row written before labels carried the home id
    stranger = vast.fake.add_instance(f"ratiocinator-{row.id}")  # ... and another home's instance by that label
    (left,) = reaper.reap(ledger, api)
    assert (left.row_id, left.provider_id, left.outcome) == (row.id, str(stranger), "left_alone")
    assert "may be another home's" in left.detail and inst.get(ledger, row.id).state == "requested"
    assert [i["id"] for i in vast.fake.live()] == [stranger]
    (taken,) = reaper.reap(ledger, api, all_homes=True)
    assert taken.outcome == "destroyed" and vast.fake.live() == [] and inst.rows(ledger, live=True) == []


def _account_of_30(vast: VastServer, study: Study) -> tuple[str, list[int]]:
    """26 instances of the account's other work, 3 of other homes, and this home's, rented 30th (page 2),
    whose ledger row lost its provider id (a crash between the rent call and the ledger update)."""
    for i in range(26):
        vast.fake.add_instance(None if i % 2 else f"notebook-{i}")
    others = [vast.fake.add_instance("ratiocinator-0badf00d-1", dph=0.5),
              vast.fake.add_instance("ratiocinator-0badf00d-2", status="exited", dph=0.25),
              vast.fake.add_instance("ratiocinator-4", dph=0.75)]  # the label scheme before home ids
    ledger = study.ledger()
    row = _rented_by(ledger, _api(vast), 1)
    inst.update(ledger, row.id, provider_id=None, state="requested")
    return str(row.provider_id), others


@pytest.mark.subprocess
def test_reap_destroys_only_this_homes_instance_on_page_2_and_names_the_others(vast: VastServer, study: Study) -> None:
    mine, others = _account_of_30(vast, study)
    env = {"VAST_API_KEY": API_KEY, "VAST_API_URL": vast.url}
    done = study.cli("instances", "--reap", env=env)
    assert done.returncode == 0, done.stderr
    assert f"{mine}: destroyed (reaped)" in done.stdout
    assert len(vast.fake.live()) == 29 and int(mine) in vast.fake.destroyed
    assert "left alone: 3 instance(s)" in done.stdout and "--all-homes" in done.stdout
    for iid, label in zip(others, ("ratiocinator-0badf00d-1", "ratiocinator-0badf00d-2", "ratiocinator-4"),
                          strict=True):
        assert str(iid) in done.stdout and label in done.stdout
    assert "exited" in done.stdout and "0.75" in done.stdout  # state and $/h, so the user can act
    assert "notebook-" not in done.stdout  # instances Ratiocinator never rented are not its business
    assert len(_calls(vast, "GET", "/api/v1/instances/")) == 2  # one listing, two pages
    wide = study.cli("instances", "--reap", "--all-homes", env=env)
    assert wide.returncode == 0, wide.stderr
    assert set(others) <= set(vast.fake.destroyed) and len(vast.fake.live()) == 26
    assert all(label in wide.stdout for label in ("ratiocinator-0badf00d-1", "ratiocinator-4"))


@pytest.mark.subprocess
def test_reap_on_a_home_that_never_rented_names_what_it_leaves(vast: VastServer, study: Study) -> None:
    other = vast.fake.add_instance("ratiocinator-0badf00d-1")
    study.ledger().close()  # a home with a ledger (local studies, say) and no instance row at all
    done = study.cli("instances", "--reap", env={"VAST_API_KEY": API_KEY, "VAST_API_URL": vast.url})
    assert done.returncode == 0, done.stderr
    assert "no live instances" in done.stdout and str(other) in done.stdout and "left alone: 1" in done.stdout
    assert [i["id"] for i in vast.fake.live()] == [other]
    misuse = study.cli("instances", "--all-homes", env={"VAST_API_KEY": API_KEY, "VAST_API_URL": vast.url})
    assert misuse.returncode == 2 and "--all-homes widens --reap" in misuse.stderr


@pytest.mark.subprocess
def test_reap_with_a_refused_key_stops_clearly_and_takes_nothing_for_gone(vast: VastServer, study: Study) -> None:
    ledger = study.ledger()
    row = _rented_by(ledger, _api(vast), 1)
    done = study.cli("instances", "--reap", env={"VAST_API_KEY": "revoked", "VAST_API_URL": vast.url})
    assert done.returncode == 1 and "refused the API key" in done.stderr and "Traceback" not in done.stderr
    assert len(vast.fake.live()) == 1 and inst.get(study.ledger(), row.id).state in inst.LIVE_STATES


def test_an_instances_lifetime_counts_the_arms_a_factor_design_makes(study: Study) -> None:
    from ratiocinator.backends.vast.backend import VastBackend, VastSettings
    from ratiocinator.spec.models import load_spec

    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"})
    settings = VastSettings(boot_timeout_s=10, setup_allowance_s=20)
    backend = VastBackend(study.home, settings=settings, api_key=API_KEY)
    once = {"max_attempts": 1}
    grid = load_spec(study.spec(factors={"A": [1, 2], "B": [1, 2]}, replicates=2, train_timeout_s=100,
                                failure_policy=once))
    one = load_spec(study.spec(name="one", arms=[{"name": "a"}], replicates=2, train_timeout_s=100,
                               failure_policy=once))
    # 4 arms × 2 replicates on one slot: 8 runs of 100 s, not the 2 a one-arm count would reserve.
    assert backend.ttl_s(grid, 1) == 10 + 20 + 8 * 100
    assert backend.ttl_s(one, 1) == 10 + 20 + 2 * 100
