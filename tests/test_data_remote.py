"""The spec's data on hosts other than this machine: a real sshd on loopback (uploaded over SFTP, resumed
after a dropped connection, checked by checksum) and a real local Ray cluster (through the object store)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Study
from dataserver import DataServer
from ratiocinator.backends.ssh import SshBackend, SshHost
from ratiocinator.backends.ssh_data import CHUNK, WINDOW, stage_over_sftp
from ratiocinator.backends.vast.backend import VastBackend, VastSettings
from ratiocinator.data.local_copy import local_copy
from ratiocinator.data.manifest import scan
from ratiocinator.errors import BackendError
from ratiocinator.pipeline import Research
from ratiocinator.report import publish
from ratiocinator.spec.models import load_spec
from ratiocinator.store import instances as inst
from ratiocinator.store.records import ExperimentStatus, RunStatus
from raycluster import RayCluster
from sshd import Sshd
from vastserver import API_KEY, FakeVast, VastServer

# Reports the first 8 hex digits of the data file's SHA-256 as a number, and where the data was.
RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
h=$(sha256sum "$RATIOCINATOR_DATA_DIR/${DATA_FILE:-train.txt}" | cut -c1-8)
echo "$RATIOCINATOR_DATA_DIR" > "$RATIOCINATOR_OUT_DIR/data_dir.txt"
if touch "$RATIOCINATOR_DATA_DIR/${DATA_FILE:-train.txt}" 2>/dev/null; then echo writable; else echo read-only; fi \
  > "$RATIOCINATOR_OUT_DIR/mode.txt"
echo "METRICS: {\\"score\\": $((16#$h))}"
"""


@pytest.fixture(autouse=True)
def no_pdflatex(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(publish, "LATEX_ENGINE", "pdflatex-not-installed-here")


def _prefix(data: bytes) -> int:
    return int(hashlib.sha256(data).hexdigest()[:8], 16)


def _dataset(root: Path) -> dict[str, bytes]:
    files = {"train.txt": os.urandom(20_000), "nested/deeper/labels.csv": b"id,label\n1,0\n"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _ssh_host(server: Sshd, tmp: Path) -> SshHost:
    known = tmp / "known_hosts"
    known.write_text(server.known_hosts_line())
    return SshHost(host="127.0.0.1", port=server.port, user=server.user, identity_file=str(server.client_key),
                   known_hosts=str(known), workdir=str(tmp / "remote"))


def test_local_data_reaches_an_ssh_host_and_every_run_reads_the_hosts_copy(sshd: Sshd, study: Study) -> None:
    files = _dataset(study.root / "dataset")
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "local", "path": "dataset"}, replicates=2,
                      arms=[{"name": "train"}, {"name": "labels", "env": {"DATA_FILE": "nested/deeper/labels.csv"}}])
    backend = SshBackend([_ssh_host(sshd, study.root)], study.home)
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    finals = ledger.run_metrics(exp.id)
    assert len(runs) == 4 and all(r.status == RunStatus.SUCCEEDED for r in runs)
    assert {(r.arm, finals[r.id]["score"][0]) for r in runs} == {
        ("train", _prefix(files["train.txt"])), ("labels", _prefix(files["nested/deeper/labels.csv"]))}
    tree_hash = scan(study.root / "dataset").tree_hash
    host_copy = study.root / "remote" / "data" / tree_hash
    for run in runs:  # the host's own copy, never the orchestrator's path, and read-only
        assert Path(run.out_dir, "data_dir.txt").read_text().strip() == str(host_copy)
        assert Path(run.out_dir, "mode.txt").read_text().strip() == ("writable" if os.geteuid() == 0 else "read-only")
    assert (host_copy / "nested/deeper/labels.csv").read_bytes() == files["nested/deeper/labels.csv"]
    (record,) = ledger.data_records(exp.id)
    assert record.tree_hash == tree_hash and list(record.staging_s) == [backend.hosts[0].label]
    assert [u.already_cached for u in backend.machines[0].uploads] == [False]
    # A second experiment on the same host finds the data in its cache: nothing is sent again.
    again = SshBackend([_ssh_host(sshd, study.root)], study.home)
    outcome = Research(load_spec(spec), study.home, backend=again, check=False, new=True).run()
    assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    assert [u.already_cached for u in again.machines[0].uploads] == [True]


def test_a_dropped_connection_mid_upload_resumes_without_resending_what_arrived(sshd: Sshd, study: Study) -> None:
    data = study.root / "dataset"
    data.mkdir()
    big = os.urandom(48 << 20)
    (data / "big.bin").write_bytes(big)
    (data / "small.txt").write_bytes(b"small\n")
    spec = study.spec(data={"source": "local", "path": "dataset"})
    copy = local_copy(load_spec(spec), study.home)
    assert copy is not None
    backend = SshBackend([_ssh_host(sshd, study.root)], study.home, reconnect_budget_s=30)
    machine = backend.machines[0]
    partial = study.root / "remote" / "data" / f".partial-{copy.tree_hash}" / "big.bin"
    seen: dict[str, int] = {}

    def drop_mid_upload() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if partial.exists() and partial.stat().st_size >= len(big) // 4:
                seen["at"] = partial.stat().st_size
                seen["dropped"] = sshd.drop_connections()
                return
            time.sleep(0.002)

    async def stage() -> tuple[str, object]:
        await machine.session()
        watcher = threading.Thread(target=drop_mid_upload)
        watcher.start()
        try:
            return await stage_over_sftp(machine, copy)
        finally:
            watcher.join(60)
            await machine.close()

    final, upload = asyncio.run(stage())
    assert seen.get("dropped", 0) >= 1 and seen["at"] < len(big), "the upload ended before a connection was dropped"
    assert machine.reconnects >= 1
    assert upload.resumed_files == 1  # big.bin was continued, not started over
    # At most the last window before the drop is sent twice.
    assert upload.sent_bytes <= len(big) + len(b"small\n") + WINDOW * CHUNK < 2 * len(big)
    assert Path(final, "big.bin").read_bytes() == big
    assert not partial.parent.exists()


def test_a_corrupted_upload_is_caught_by_the_host_and_sent_again(sshd: Sshd, study: Study) -> None:
    data = study.root / "dataset"
    data.mkdir()
    (data / "a.txt").write_bytes(b"the real content\n")
    spec = study.spec(data={"source": "local", "path": "dataset"})
    copy = local_copy(load_spec(spec), study.home)
    assert copy is not None
    partial = study.root / "remote" / "data" / f".partial-{copy.tree_hash}"
    partial.mkdir(parents=True)
    (partial / "a.txt").write_bytes(b"the fake content\n")  # same size: only its checksum tells
    backend = SshBackend([_ssh_host(sshd, study.root)], study.home)

    async def stage() -> tuple[str, object]:
        try:
            return await stage_over_sftp(backend.machines[0], copy)
        finally:
            await backend.machines[0].close()

    final, upload = asyncio.run(stage())
    assert Path(final, "a.txt").read_bytes() == b"the real content\n"
    assert upload.sent_bytes == len(b"the real content\n")  # sent once, after the host removed the bad one


def test_local_data_reaches_every_ray_node_through_the_object_store(ray_cluster: RayCluster, study: Study) -> None:
    pytest.importorskip("ray", reason="the Ray backend's tests need `pip install 'ratiocinator[ray]'`")
    from ratiocinator.backends.ray_backend import RayBackend

    files = _dataset(study.root / "dataset")
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "local", "path": "dataset"}, replicates=2, train_timeout_s=240,
                      arms=[{"name": "train"}, {"name": "labels", "env": {"DATA_FILE": "nested/deeper/labels.csv"}}])
    nodes_dir = study.root / "ray-nodes"
    backend = RayBackend(ray_cluster.address, study.home, num_cpus_per_run=1, workdir=str(nodes_dir),
                         schedule_timeout_s=240)
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    finals = ledger.run_metrics(exp.id)
    assert len(runs) == 4 and all(r.status == RunStatus.SUCCEEDED for r in runs), [(r.status, r.reason) for r in runs]
    assert {(r.arm, finals[r.id]["score"][0]) for r in runs} == {
        ("train", _prefix(files["train.txt"])), ("labels", _prefix(files["nested/deeper/labels.csv"]))}
    tree_hash = scan(study.root / "dataset").tree_hash
    copies = {Path(run.out_dir, "data_dir.txt").read_text().strip() for run in runs}
    for path in copies:  # each node's own copy, in its own cache
        assert Path(path).parent.parent.parent == nodes_dir / "nodes" and Path(path).name == tree_hash
        assert (Path(path) / "train.txt").read_bytes() == files["train.txt"]
    (record,) = ledger.data_records(exp.id)
    assert record.tree_hash == tree_hash and len(record.staging_s) == 2  # prepared on both workers


# -- Vast.ai: the fake API on loopback, whose instances' SSH endpoints are the loopback sshd ------------------------

VAST_HARDWARE = {"gpu": "RTX_4090", "num_gpus": 1, "max_dph": 1.0, "min_inet_down": 100}


def vast_backend(server: VastServer, sshd: Sshd, study: Study) -> VastBackend:
    """Quick to boot and to give up, as in test_vast_backend.py; instances' workdirs under the study."""
    settings = VastSettings(base_url=server.url, boot_timeout_s=10, setup_allowance_s=60, poll_s=0.1, ssh_probe_s=2,
                            ssh_user=sshd.user, workdir=str(study.root / "remote"), api_backoff_s=0.05)
    return VastBackend(study.home, settings=settings, api_key=API_KEY,
                       ssh_options={"reconnect_budget_s": 3, "connect_timeout_s": 5, "alive_check_s": 1})


@pytest.fixture
def vast(sshd: Sshd) -> Iterator[VastServer]:
    server = VastServer(FakeVast(ssh_port=sshd.port, authorized_keys=sshd.root / "authorized_keys"))
    try:
        yield server
    finally:
        server.close()


def test_data_larger_than_the_instance_disk_is_refused_before_renting(sshd: Sshd, vast: VastServer, study: Study,
                                                                      data_server: DataServer) -> None:
    data_server.files = {"corpus.txt": os.urandom(60_000)}
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "url", "url": data_server.url("corpus.txt")}, max_dollars=5.0,
                      hardware={**VAST_HARDWARE, "disk_gb": 0.00005}, download_timeout_s=0.001)  # 50 kB of disk
    backend = vast_backend(vast, sshd, study)
    findings = {f.field: f for f in backend.check_hardware(load_spec(spec)) if f.status == "unmet"}
    assert "disk_gb" in findings and "58.6 KiB" in findings["disk_gb"].detail
    assert "min_inet_down" in findings and "download_timeout_s" in findings["min_inet_down"].detail
    with pytest.raises(BackendError, match="disk_gb"):
        Research(load_spec(spec), study.home, backend=backend, check=False).run()
    assert not [c for c in vast.fake.calls if c[0] == "PUT"] and inst.rows(study.ledger()) == []  # nothing rented
    assert data_server.requests == {} and data_server.heads["corpus.txt"] >= 1  # its size came from HEAD alone


def test_data_reaches_a_rented_instance_and_its_runs(sshd: Sshd, vast: VastServer, study: Study) -> None:
    files = _dataset(study.root / "dataset")
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "local", "path": "dataset"}, max_dollars=5.0,
                      hardware={**VAST_HARDWARE, "disk_gb": 50},
                      arms=[{"name": "train"}, {"name": "labels", "env": {"DATA_FILE": "nested/deeper/labels.csv"}}])
    outcome = Research(load_spec(spec), study.home, backend=vast_backend(vast, sshd, study), check=False).run()
    assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    finals = ledger.run_metrics(exp.id)
    assert {(r.arm, finals[r.id]["score"][0]) for r in ledger.runs(exp.id)} == {
        ("train", _prefix(files["train.txt"])), ("labels", _prefix(files["nested/deeper/labels.csv"]))}
    (record,) = ledger.data_records(exp.id)
    assert len(record.staging_s) == 1 and next(iter(record.staging_s)).startswith(sshd.user)
    staging = ledger.db.execute("SELECT COUNT(*) FROM charges WHERE kind = 'staging'").fetchone()[0]
    assert staging == 0  # the instance's own bill covers its staging time
