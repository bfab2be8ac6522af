"""The SSH backend against a real sshd on 127.0.0.1 (see sshd.py): experiments, drops, host keys."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from conftest import Study, process_alive
from ratiocinator.backends.base import LaunchRequest
from ratiocinator.backends.remote import start_ticks
from ratiocinator.backends.ssh import HostLost, SshBackend, SshHost
from ratiocinator.errors import BackendError
from ratiocinator.pipeline import Research
from ratiocinator.spec.models import load_spec
from sshd import Sshd

SECRET = "s3cr3t-" + "x" * 12

RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
MODE="${MODE:-fast}"
python3 check.py > "$RATIOCINATOR_OUT_DIR/check.json"
env | grep -E '^(RATIOCINATOR_|MODE=|HOME=)' | sort > "$RATIOCINATOR_OUT_DIR/env.txt"
mkdir -p "$RATIOCINATOR_OUT_DIR/sub"
echo nested > "$RATIOCINATOR_OUT_DIR/sub/file.txt"
ln -s sub/file.txt "$RATIOCINATOR_OUT_DIR/inside_link"
ln -s /etc/passwd "$RATIOCINATOR_OUT_DIR/escape_abs"
ln -s ../../../.. "$RATIOCINATOR_OUT_DIR/escape_up"
echo 'METRICS: {"step": 1, "loss": 2.0}'
if [ "$MODE" = slow ]; then sleep "${SLEEP_S:-4}"; fi
echo "stderr chatter" >&2
echo "METRICS: {\\"score\\": $(( ${BONUS:-0} + ${SEED:-0} ))}"
"""

CHECK = """
import json, os
secret = os.environ.get("RC_TEST_SECRET", "")
hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if secret and secret.encode() in fh.read():
                    hits.append(pid)
        except OSError:
            pass
rundir = os.path.dirname(os.environ["RATIOCINATOR_OUT_DIR"])
print(json.dumps({"secret_seen": secret, "cmdline_hits": hits,
                  "env_file_left": os.path.exists(os.path.join(rundir, "env.json"))}))
"""


def _host(server: Sshd, tmp: Path, **fields: object) -> SshHost:
    known = tmp / "known_hosts"
    if not known.exists():
        known.write_text(server.known_hosts_line())
    return SshHost(**{"host": "127.0.0.1", "port": server.port, "user": server.user,
                      "identity_file": str(server.client_key), "known_hosts": str(known),
                      "workdir": str(tmp / "remote"), **fields})


def _spec(study: Study, **fields: object) -> Path:
    study.commit({"run.sh": RUNNER, "check.py": CHECK})
    return study.spec(**{"seed_env": "SEED", "train_timeout_s": 60, **fields})


def _backend(server: Sshd, study: Study, **options: object) -> SshBackend:
    host_fields = options.pop("host", {})
    return SshBackend([_host(server, study.root, **host_fields)], study.home, **options)  # type: ignore[arg-type]


@pytest.mark.latex
def test_full_experiment_runs_over_ssh(sshd: Sshd, study: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RC_TEST_SECRET", SECRET)
    spec = _spec(study, arms=[{"name": "low", "env": {"BONUS": 10}}, {"name": "high", "env": {"BONUS": 20}}],
                 replicates=2, pass_env=["RC_TEST_SECRET"])  # passed on purpose: runners inherit no secret otherwise
    backend = _backend(sshd, study, host={"slots": 2})
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert len(runs) == 4 and all(r.status == "succeeded" for r in runs), [(r.status, r.failure) for r in runs]
    finals = ledger.run_metrics(exp.id)
    assert {(r.arm, r.replicate): finals[r.id]["score"][0] for r in runs} == {
        ("low", 0): 10, ("low", 1): 11, ("high", 0): 20, ("high", 1): 21}
    assert all(r.host.startswith("ssh:") and r.slot.startswith(f"{sshd.user}@127.0.0.1:{sshd.port}/slot") for r in runs)
    remote = study.root / "remote"
    for run in runs:
        out, logs = Path(run.out_dir), Path(run.log_dir)
        assert [(s, v) for _, s, v in ledger.points(run.id, "loss")] == [(1, 2.0)]  # streamed points
        assert "stderr chatter" in (logs / "stderr.log").read_text()
        env = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines())
        assert env["RATIOCINATOR_OUT_DIR"].startswith(str(remote / "runs"))  # the host's own paths
        assert env["RATIOCINATOR_WORKSPACE"].startswith(str(remote / "runs"))  # the run's own copy
        assert env["RATIOCINATOR_WORKSPACE"].endswith("/work")
        assert env["RATIOCINATOR_RUN_ID"] == str(run.id)
        check = json.loads((out / "check.json").read_text())
        assert check == {"secret_seen": SECRET, "cmdline_hits": [], "env_file_left": False}  # secret by env only
        assert (out / "sub" / "file.txt").read_text() == "nested\n"
        assert os.readlink(out / "inside_link") == "sub/file.txt" and (out / "inside_link").read_text() == "nested\n"
        assert not (out / "escape_abs").exists() and not (out / "escape_abs").is_symlink()
        assert not (out / "escape_up").is_symlink()
        skipped = (logs / "artifacts_skipped.txt").read_text()
        assert "escape_abs -> /etc/passwd" in skipped and "escape_up -> ../../../.." in skipped
    events = {e["kind"]: e for e in ledger.events(exp.id)}
    assert any(key.startswith("ssh ") and "host key ssh-ed25519 SHA256:" in value
               for key, value in events["host"]["data"].items() if isinstance(value, str))
    # The host's environment, read there by the runs' interpreter, and printed in the paper.
    label = f"{sshd.user}@127.0.0.1:{sshd.port}"
    (found,) = [e["data"] for e in ledger.events(exp.id) if e["kind"] == "environment"]
    assert found["host"] == label and found["slots"] == [f"{label}/slot0", f"{label}/slot1"]
    assert re.fullmatch(r"3\.[0-9]+\.[0-9]+", found["python"]) and len(found["freeze_sha256"]) == 64
    assert outcome.report is not None
    assert f"{found['implementation']} {found['python']} on {found['platform']} (host {label}, machine" in \
        outcome.report.md.read_text().replace("\\_", "_")  # as read, without markdown's escapes
    # No private key material ever reached the host; secrets left no file behind.
    for path in remote.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            assert b"PRIVATE KEY" not in data, path
            if path.name != "check.json":  # the runner itself wrote the secret there, as evidence
                assert SECRET.encode() not in data, path


@pytest.mark.latex
def test_dropped_connection_does_not_kill_the_run_and_is_reattached(sshd: Sshd, study: Study) -> None:
    spec = _spec(study, arms=[{"name": "slow", "env": {"MODE": "slow", "BONUS": 7, "SLEEP_S": 4}}])
    backend = _backend(sshd, study, reconnect_budget_s=30)
    remote = study.root / "remote" / "runs"
    seen: dict[str, object] = {}

    def drop_mid_run() -> None:  # beside the orchestrator, which needs the main thread (signals)
        deadline = time.time() + 30
        while time.time() < deadline:  # the run is live and has printed its first line
            if any('"step": 1' in p.read_text() for p in remote.glob("*/stdout.log")):
                break
            time.sleep(0.05)
        else:
            return
        seen["pid"] = json.loads(next(remote.glob("*/pid")).read_text())["pid"]
        seen["dropped"] = sshd.drop_connections()
        time.sleep(0.3)
        seen["alive_after_drop"] = process_alive(seen["pid"])  # type: ignore[arg-type]

    thread = threading.Thread(target=drop_mid_run)
    thread.start()
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    thread.join(30)
    assert seen.get("dropped", 0) >= 1, "the run never started on the host, or no connection was dropped"
    assert seen["alive_after_drop"]  # the dropped connection did not take the run with it
    assert outcome.status == "completed", outcome.message
    assert backend.reconnects >= 1
    ledger = study.ledger()
    (run,) = ledger.runs(ledger.experiments()[-1].id)
    assert run.status == "succeeded" and ledger.run_metrics(run.experiment_id)[run.id]["score"][0] == 7
    stdout = Path(run.log_dir, "stdout.log").read_text()
    assert stdout.count('"step": 1') == 1 and stdout.count('"score"') == 1  # continued from the offset


def test_changed_host_key_is_refused(sshd: Sshd, study: Study) -> None:
    spec = _spec(study)
    loaded = load_spec(spec)
    old = sshd.host_key.with_suffix(".pub").read_text().split()[1]
    assert asyncio.run(_acquire(_backend(sshd, study), loaded)).slots
    sshd.new_host_key()
    with pytest.raises(BackendError) as caught:
        asyncio.run(_acquire(_backend(sshd, study), loaded))
    message = str(caught.value)
    assert "CHANGED" in message and f"127.0.0.1:{sshd.port}" in message and message.count("SHA256:") == 2
    assert old not in message and "ssh-keygen -R" in message


def test_unknown_key_refused_unless_trusted_on_first_use_then_pinned(sshd: Sshd, study: Study) -> None:
    loaded = load_spec(_spec(study))
    (study.root / "known_hosts").write_text("")
    with pytest.raises(BackendError, match="(?s)not in .*trust_on_first_use"):
        asyncio.run(_acquire(_backend(sshd, study), loaded))
    host = asyncio.run(_acquire(_backend(sshd, study, host={"trust_on_first_use": True}), loaded))
    assert any("pinned now" in v for v in host.info.values())
    pinned = (study.home / "ssh_known_hosts").read_text()
    assert sshd.host_key.with_suffix(".pub").read_text().split()[1] in pinned
    again = asyncio.run(_acquire(_backend(sshd, study, host={"trust_on_first_use": True}), loaded))
    assert not any("pinned now" in v for v in again.info.values())  # matched the pin, nothing new
    sshd.new_host_key()
    with pytest.raises(BackendError, match="CHANGED"):
        asyncio.run(_acquire(_backend(sshd, study, host={"trust_on_first_use": True}), loaded))


async def _acquire(backend: SshBackend, loaded):  # type: ignore[no-untyped-def]
    try:
        return await backend.acquire(loaded)
    finally:
        await backend.release(None)  # type: ignore[arg-type]


def _request(backend: SshBackend, host, workspace, study: Study, run_id: int, env: dict[str, str]) -> LaunchRequest:  # type: ignore[no-untyped-def]
    run_dir = study.home / "direct" / str(run_id)
    (run_dir / "out").mkdir(parents=True)
    return LaunchRequest(run_id=run_id, argv=(str(workspace.checkout / "run.sh"),), cwd=workspace.checkout,
                         env={**workspace.env, **env, "RATIOCINATOR_OUT_DIR": str(run_dir / "out")},
                         slot=host.slots[0], log_dir=run_dir, out_dir=run_dir / "out")


def test_lost_host_ends_the_run_as_transient_infra_and_orphans_are_killed(sshd: Sshd, study: Study) -> None:
    loaded = load_spec(_spec(study))
    slow = {"MODE": "slow", "SLEEP_S": "60"}

    async def lose_host() -> tuple[int, Exception]:
        backend = _backend(sshd, study, reconnect_budget_s=1.5, keepalive_s=0.5)
        host = await backend.acquire(loaded)
        workspace = await backend.prepare(host, loaded, study.repo.head())
        handle = await backend.launch(host, _request(backend, host, workspace, study, 1, slow))
        sshd.drop_connections()
        sshd.stop()  # the host is unreachable now: reconnecting is refused
        try:
            await handle.wait()
        except HostLost as exc:
            return handle.pid or 0, exc
        finally:
            await backend.release(host)
        raise AssertionError("wait() returned although the host was gone")

    pid, exc = asyncio.run(lose_host())
    assert exc.transient and exc.failure == "infra" and f"127.0.0.1:{sshd.port}" in str(exc)
    assert process_alive(pid)  # unreachable, not dead: a later orchestrator's reconcile kills it
    sshd.start()
    backend = _backend(sshd, study)
    assert backend.kill_orphan(pid, start_ticks(pid) + 1) is False  # a reused PID is left alone
    assert process_alive(pid)
    # The record lets reconcile find it.
    assert backend.kill_orphan(pid, start_ticks(pid)) is True, backend.orphan_errors
    deadline = time.time() + 5
    while process_alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid)

    async def launch_then_forget() -> tuple[int, int | None]:
        backend = _backend(sshd, study)
        host = await backend.acquire(loaded)
        workspace = await backend.prepare(host, loaded, study.repo.head())
        handle = await backend.launch(host, _request(backend, host, workspace, study, 2, slow))
        await backend.release(host)
        return handle.pid or 0, handle.pid_start

    pid2, start2 = asyncio.run(launch_then_forget())
    assert process_alive(pid2)
    killer = _backend(sshd, study)
    assert killer.kill_orphan(pid2, start2) is True, killer.orphan_errors
    deadline = time.time() + 5
    while process_alive(pid2) and time.time() < deadline:
        time.sleep(0.05)
    assert not process_alive(pid2)


def test_cancel_kills_the_remote_process_group(sshd: Sshd, study: Study) -> None:
    loaded = load_spec(_spec(study))

    async def cancel() -> tuple[int, object]:
        backend = _backend(sshd, study)
        host = await backend.acquire(loaded)
        workspace = await backend.prepare(host, loaded, study.repo.head())
        handle = await backend.launch(host, _request(backend, host, workspace, study, 3,
                                                     {"MODE": "slow", "SLEEP_S": "60"}))
        await asyncio.sleep(0.5)
        await handle.cancel(grace_s=2.0)
        info = await asyncio.wait_for(handle.wait(), 10)
        await backend.release(host)
        return handle.pid or 0, info

    pid, info = asyncio.run(cancel())
    assert info.signal == 15 or info.exit_code == 143  # type: ignore[attr-defined]
    assert not process_alive(pid)


@pytest.mark.subprocess
def test_backend_ssh_in_the_spec_runs_the_whole_pipeline_with_its_readiness_review(sshd: Sshd, study: Study) -> None:
    host = _host(sshd, study.root)
    spec = _spec(study, backend="ssh", hosts=[host.model_dump(exclude_none=True)],
                 arms=[{"name": "low", "env": {"BONUS": 10}}, {"name": "high", "env": {"BONUS": 20}}], replicates=1)
    done = study.cli("research", str(spec), timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    assert exp.backend == "ssh" and exp.status == "completed"
    (review,) = [e for e in ledger.events(exp.id) if e["kind"] == "readiness"]
    smoke = next(c for c in review["data"]["checks"] if c["name"] == "smoke")
    assert smoke["status"] == "passed" and len(smoke["evidence"]) == 2  # trial runs went over SSH too
    assert all(r.status == "succeeded" and r.slot.startswith(f"{sshd.user}@127.0.0.1") for r in ledger.runs(exp.id))
    bad = study.spec(name="nohosts", backend="ssh")
    refused = study.cli("validate", str(bad))
    assert refused.returncode == 2 and "backend: ssh needs hosts" in refused.stderr


@pytest.mark.latex
def test_files_under_git_lfs_reach_the_host_with_their_content(sshd: Sshd, study: Study) -> None:
    blob = study.commit_lfs_blob()
    spec = study.spec(seed_env="SEED", train_timeout_s=60)
    outcome = Research(load_spec(spec), study.home, backend=_backend(sshd, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    (run,) = ledger.runs(exp.id)
    assert run.status == "succeeded", (run.failure, run.reason)
    assert ledger.run_metrics(exp.id)[run.id]["score"][0] == len(blob)
    assert (Path(run.out_dir) / "sha256.txt").read_text().strip() == hashlib.sha256(blob).hexdigest()


@pytest.mark.latex
def test_runs_on_a_host_work_in_their_own_copies_and_its_checkout_stays_pristine(sshd: Sshd, study: Study) -> None:
    import subprocess

    from test_confinement import WRITER

    study.commit({"run.sh": WRITER})
    spec = study.spec(factors={"K": [1, 2, 3]}, concurrency=3, failure_policy={"max_attempts": 1}, replicates=1)
    backend = _backend(sshd, study, host={"slots": 3})
    Research(load_spec(spec), study.home, backend=backend, check=False).run()
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs, finals = ledger.runs(exp.id), ledger.run_metrics(exp.id)
    ok = [r for r in runs if r.status == "succeeded"]
    assert len(ok) == 2 and all(finals[r.id]["score"][0] == 1 for r in ok)  # no run saw another's file
    dirs = {Path(r.out_dir, "pwd").read_text().strip() for r in runs}
    assert len(dirs) == 3 and all(d.startswith(str(study.root / "remote" / "runs")) for d in dirs)
    (checkout,) = {p.parent for p in (study.root / "remote").glob("checkouts/*/run.sh")}
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=checkout, capture_output=True,
                            text=True, check=True)
    assert status.stdout == ""
    failed_dir = next(d for d in dirs if not any(Path(r.out_dir, "pwd").read_text().strip() == d for r in ok))
    assert Path(failed_dir, "leftover.tmp").exists() and not any(Path(d).exists() for d in dirs - {failed_dir})
