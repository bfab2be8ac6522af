"""Autoresearch on the engine's other backends: the fixture's patch loop run over a real sshd on
loopback and over a local Ray cluster decides exactly as a local session with the same patches,
and results.tsv has the same rows and statuses; the failure class of each crash is in the ledger.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conftest import process_alive
from ratiocinator.autoresearch.store import Session, Store
from ratiocinator.errors import BackendError
from ratiocinator.store.ledger import Ledger
from raycluster import RayCluster
from sshd import Sshd
from test_autoresearch import PATCHES, Lab, assert_turns_overlap_runs, new_lab, running_attempt, wait_for

pytestmark = pytest.mark.subprocess  # every session here starts its runs (and the local twin's)

@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return new_lab(tmp_path)


EXPECTED_STATUSES = ["baseline", "keep", "discard", "crash", "crash", "violation", "keep", "keep"]
EXPECTED_FAILURES = {"03-crash.patch": "runtime_error", "04-hang.patch": "timeout"}


def results_without_commits(lab: Lab, tag: str) -> list[list[str]]:
    """results.tsv's rows without the commit column (two sessions make different commits of the same edits)."""
    return [row.split("\t")[1:] for row in lab.results(tag).splitlines()]


def assert_same_as_local(lab: Lab, tag: str, *, backend: dict[str, object], **env: str) -> None:
    local = lab.run(lab.program("local"), AR_COUNTER_DIR=str(lab.root / "counters-local"))
    remote_program = lab.program(tag, **backend)
    remote = lab.run(remote_program, **{**env, "AR_COUNTER_DIR": str(lab.root / f"counters-{tag}")})
    assert (remote.exit_code, remote.reason) == (local.exit_code, local.reason)
    assert local.exit_code == 0 and "the agent gave up: no patches left" in local.reason
    here, there = lab.attempts("local"), lab.attempts(tag)
    assert [a.status for a in there] == [a.status for a in here] == EXPECTED_STATUSES
    assert [(a.agent_ref, a.metric, a.values) for a in there] == [(a.agent_ref, a.metric, a.values) for a in here]
    assert results_without_commits(lab, tag) == results_without_commits(lab, "local")
    assert [lab.repo.git("show", f"{c}:config.py") for c in lab.kept_history(tag)] == [
        lab.repo.git("show", f"{c}:config.py") for c in lab.kept_history("local")]
    crashes = {a.agent_ref: a for a in there if a.status == "crash"}
    assert {ref: a.failure for ref, a in crashes.items()} == EXPECTED_FAILURES
    assert "ZeroDivisionError" in crashes["03-crash.patch"].evidence["reason"]
    assert all(a.failure is None for a in there if a.status != "crash")
    hosts = {a.host for a in there if a.status != "violation"}
    assert len(hosts) == 1 and hosts.pop().startswith(f"{backend['backend']}:")


def ssh_host(server: Sshd, root: Path) -> dict[str, object]:
    known = root / "known_hosts"
    known.write_text(server.known_hosts_line())
    return {"host": "127.0.0.1", "port": server.port, "user": server.user, "identity_file": str(server.client_key),
            "known_hosts": str(known), "workdir": str(root / "remote")}


def test_patch_loop_over_ssh_decides_as_the_local_loop(lab: Lab, sshd: Sshd) -> None:
    assert_same_as_local(lab, "overssh", backend={"backend": "ssh", "hosts": [ssh_host(sshd, lab.root)]})
    # Each run worked in its own copy of the commit on the host, never in the local worktree, and its
    # log_file came back with its artifacts.
    sessions = lab.home / "autoresearch"
    assert (sessions / "local" / "worker-0" / "run.log").exists()
    assert not (sessions / "overssh" / "worker-0" / "run.log").exists()
    assert len(list((lab.root / "remote" / "runs").iterdir())) == 7  # baseline + the six edits that ran
    assert all((Path(a.log_path).parent / "out" / "run.log").exists() for a in lab.attempts("overssh") if a.log_path)


def test_patch_loop_over_ray_decides_as_the_local_loop(lab: Lab, ray_cluster: RayCluster) -> None:
    assert_same_as_local(lab, "overray", backend={
        "backend": "ray", "ray_address": ray_cluster.address,
        "ray": {"num_cpus_per_run": 1, "workdir": str(lab.root / "ray-nodes"), "schedule_timeout_s": 240}})


def test_an_agents_turn_overlaps_its_previous_attempts_run_over_ssh(lab: Lab, sshd: Sshd) -> None:
    # The rebased commit the host runs lives on the measuring branch, which the host fetches by ref.
    assert_turns_overlap_runs(lab, "ovlssh", backend="ssh", hosts=[ssh_host(sshd, lab.root)])
    assert all(a.host and a.host.startswith("ssh:") for a in lab.attempts("ovlssh"))


def test_program_backend_settings_are_checked_like_a_specs(lab: Lab) -> None:
    from ratiocinator.autoresearch import load_program
    from ratiocinator.errors import SpecError, UsageError

    with pytest.raises(SpecError, match="backend: ssh needs hosts"):
        load_program(lab.program("nohosts", backend="ssh"))
    with pytest.raises(SpecError, match="with backend 'ssh' the runs happen elsewhere"):
        load_program(lab.program("linked", backend="ssh", hosts=[{"host": "gpu-box"}], link=["val.txt"]))
    with pytest.raises(SpecError, match="pass_env entry 'RATIOCINATOR_X'"):
        load_program(lab.program("reserved", pass_env=["RATIOCINATOR_X"]))
    with pytest.raises(SpecError, match="vast.yaml:[0-9]+: with autoresearch, workers decides the instances"):
        lab.run(lab.program("vast", backend="vast", vast={"instances": 2}))
    with pytest.raises(UsageError, match="backend: vast needs VAST_API_KEY"):
        lab.run(lab.program("nokey", backend="vast"), VAST_API_KEY="")
    assert not (lab.home / "ledger.db").exists() or sessions(lab) == []  # refused before anything was recorded


def test_kill_9_mid_attempt_over_ssh_then_the_same_command_kills_the_remote_orphan_and_loses_nothing(
        lab: Lab, sshd: Sshd) -> None:
    hang = (PATCHES / "04-hang.patch").read_text()
    patches = lab.patches("resume", "01", extra={"02-slow.patch": hang.replace("# prefetch", "# slow: prefetch"),
                                                 "03-wider.patch": (PATCHES / "07-wider.patch").read_text()})
    program = lab.program("sshkill", patches=patches, timeout_s=60, backend="ssh", hosts=[ssh_host(sshd, lab.root)])
    first = lab.popen("autoresearch", str(program))
    slow = wait_for(lambda: running_attempt(lab, "sshkill", "02-slow.patch"), timeout=120, what="the slow run")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    orphans = [int(p) for p in (lab.root / "pids").read_text().split()]
    assert all(process_alive(p) for p in orphans)  # the run goes on on its host without the orchestrator

    done = lab.cli("autoresearch", str(program), timeout=180)
    assert done.returncode == 0, done.stderr + done.stdout
    assert not any(process_alive(p) for p in orphans)  # the resume killed it there, found by its pid and start time
    attempts = lab.attempts("sshkill")
    assert [(a.status, a.agent_ref) for a in attempts] == [
        ("baseline", ""), ("keep", "01-deeper.patch"), ("interrupted", "02-slow.patch"), ("keep", "03-wider.patch")]
    assert attempts[2].id == slow.id and "orchestrator stopped" in attempts[2].reason
    assert lab.kept_history("sshkill") == [attempts[1].commit_sha, attempts[3].commit_sha]


def test_two_workers_over_ssh_each_run_in_their_own_slot_with_its_gpu(lab: Lab, sshd: Sshd) -> None:
    patches = lab.patches("parallel", "01", "02", "06", "07")
    host = {**ssh_host(sshd, lab.root), "slots": 2, "gpus": [0, 1]}
    program = lab.program("sshpar", patches=patches, workers=2, gpus_per_worker=1, timeout_s=20, backend="ssh",
                          hosts=[host])
    outcome = lab.run(program, AR_TRAIN_SLEEP="0.3")
    assert outcome.exit_code == 0, outcome.reason
    attempts = lab.attempts("sshpar")
    assert {a.worker for a in attempts if not a.is_baseline} == {0, 1}
    for a in attempts:  # worker i's runs went to slot i, pinned to GPU i of the host's list
        assert a.status not in ("keep", "discard", "baseline") or f"cuda {a.worker}" in a.log_tail
    with pytest.raises(BackendError, match="workers: 3 needs 3 slots on the ssh backend, which offers 2"):
        lab.run(lab.program("toomany", patches=patches, workers=3, backend="ssh", hosts=[host]))
    assert [s.tag for s in sessions(lab)] == ["sshpar"]  # refused before anything was recorded


def sessions(lab: Lab) -> list[Session]:
    store = Store(Ledger(lab.home / "ledger.db"))
    try:
        return [store.session(row[0]) for row in store.db.execute("SELECT id FROM ar_sessions ORDER BY id")]
    finally:
        store.close()
