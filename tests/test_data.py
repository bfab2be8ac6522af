"""The spec's data on the local backend: a directory used in place, URLs fetched once into the home's
cache (a loopback HTTP server counts the requests), checksums, archives, resumes and provenance."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import Study
from dataserver import DataServer
from hubserver import Hub
from ratiocinator.data.download import fetch
from ratiocinator.data.local_copy import local_copy, prepared_copy
from ratiocinator.data.manifest import scan
from ratiocinator.errors import DataError, SpecError
from ratiocinator.pipeline import Research, check_spec
from ratiocinator.report import publish
from ratiocinator.spec.models import load_spec
from ratiocinator.store.records import ExperimentStatus, RunStatus
from rsyncd import Rsyncd

# Reports the first 8 hex digits of the data file's SHA-256 as a number, so the ledger shows what the run read.
RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
h=$(sha256sum "$RATIOCINATOR_DATA_DIR/${DATA_FILE:-train.txt}" | cut -c1-8)
ls -la "$RATIOCINATOR_DATA_DIR" >&2
echo "METRICS: {\\"score\\": $((16#$h))}"
"""


@pytest.fixture(autouse=True)
def no_pdflatex(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper's PDF is test_paper.py's business; here it is skipped as on a machine without LaTeX."""
    monkeypatch.setattr(publish, "LATEX_ENGINE", "pdflatex-not-installed-here")


def _prefix(data: bytes) -> int:
    return int(hashlib.sha256(data).hexdigest()[:8], 16)


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _research(study: Study, spec: Path, **kw: object):  # type: ignore[no-untyped-def]
    return Research(load_spec(spec), study.home, check=False, environ=dict(os.environ), **kw).run()  # type: ignore[arg-type]


@pytest.mark.subprocess
def test_url_data_is_fetched_once_checked_unpacked_and_read_by_every_run(study: Study, data_server: DataServer
                                                                         ) -> None:
    train = os.urandom(50_000)
    archive = _tar_gz({"train.txt": train, "sub/labels.csv": b"a,b\n"})
    extra = b"vocabulary\n" * 100
    data_server.files = {"d.tar.gz": archive, "vocab.txt": extra}
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "url", "url": [data_server.url("d.tar.gz"), data_server.url("vocab.txt")],
                            "sha256": [hashlib.sha256(archive).hexdigest(), hashlib.sha256(extra).hexdigest()]},
                      arms=[{"name": "a"}, {"name": "b", "env": {"DATA_FILE": "vocab.txt"}}], replicates=2)
    first = _research(study, spec)
    assert first.status == ExperimentStatus.COMPLETED, first.message
    again = _research(study, spec, new=True)  # a second experiment on the same home: the cache answers
    assert again.status == ExperimentStatus.COMPLETED, again.message
    assert data_server.requests == {"d.tar.gz": 1, "vocab.txt": 1}  # once per host, whatever the number of runs
    ledger = study.ledger()
    for exp in ledger.experiments():
        runs = ledger.runs(exp.id)
        finals = ledger.run_metrics(exp.id)
        assert len(runs) == 4 and all(r.status == RunStatus.SUCCEEDED for r in runs)
        assert {(r.arm, finals[r.id]["score"][0]) for r in runs} == {("a", _prefix(train)), ("b", _prefix(extra))}
        (record,) = ledger.data_records(exp.id)
        assert [(s["kind"], s["resolved"], s["size"], s["sha256"]) for s in record.sources] == [
            ("url", data_server.url("d.tar.gz"), len(archive), hashlib.sha256(archive).hexdigest()),
            ("url", data_server.url("vocab.txt"), len(extra), hashlib.sha256(extra).hexdigest())]
        assert record.files == 3 and record.size == len(train) + 4 + len(extra)
    assert first.report is not None
    paper = first.report.md.read_text().replace("\\_", "_")
    assert data_server.url("d.tar.gz") in paper and hashlib.sha256(archive).hexdigest() in paper
    cached = study.home / "data" / "url"
    (tree,) = [p / "tree" for p in cached.iterdir() if p.is_dir()]
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()) == [
        "sub/labels.csv", "train.txt", "vocab.txt"]
    assert not os.access(tree / "train.txt", os.W_OK) or os.geteuid() == 0  # read-only for the runs
    assert not (study.home / "data" / "downloads").exists() or not any((study.home / "data" / "downloads").iterdir())


@pytest.mark.subprocess
def test_a_wrong_sha256_stops_before_any_run_showing_both_hashes(study: Study, data_server: DataServer) -> None:
    served = b"not what the spec expects\n"
    data_server.files = {"train.txt": served}
    study.commit({"run.sh": RUNNER})
    expected = hashlib.sha256(b"the real data\n").hexdigest()
    spec = study.spec(data={"source": "url", "url": data_server.url("train.txt"), "sha256": expected})
    with pytest.raises(DataError) as raised:
        _research(study, spec)
    message = str(raised.value)
    assert expected in message and hashlib.sha256(served).hexdigest() in message
    ledger = study.ledger()
    (exp,) = ledger.experiments()
    assert ledger.runs(exp.id) == [] and exp.status == ExperimentStatus.FAILED
    assert expected in (exp.note or "")
    assert not list((study.home / "data").rglob("train.txt"))  # the wrong file is not kept


@pytest.mark.subprocess
def test_local_directory_is_used_in_place_and_a_changed_dataset_refuses_a_resume(study: Study) -> None:
    data = study.root / "dataset"
    (data / "nested").mkdir(parents=True)
    (data / "train.txt").write_bytes(b"first version\n")
    (data / "nested" / "x.bin").write_bytes(os.urandom(1000))
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "local", "path": "dataset"}, max_dollars=10.0,
                      hardware={"price_per_hour": 3.6})
    outcome = _research(study, spec)
    assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    (run,) = ledger.runs(exp.id)
    assert ledger.run_metrics(exp.id)[run.id]["score"][0] == _prefix(b"first version\n")
    (record,) = ledger.data_records(exp.id)
    assert record.sources[0]["resolved"] == str(data.resolve())
    assert record.tree_hash == scan(data).tree_hash
    staging = ledger.settled(exp.id, kind="staging")  # the host's price for the time the data took to arrive
    assert staging is not None and 0 <= staging <= 3.6 * 600 / 3600
    assert outcome.report is not None
    paper = outcome.report.md.read_text().replace("\\_", "_")  # as markdown escapes it
    assert f"tree hash {record.tree_hash}" in paper and str(data.resolve()) in paper  # the reproducibility section
    assert "went to staging the data on the hosts" in paper
    # The orchestrator dies mid-experiment (its status stays running), and the data changes before the resume.
    ledger.update_experiment(exp.id, status=ExperimentStatus.RUNNING)
    (data / "train.txt").write_bytes(b"second version\n")
    with pytest.raises(DataError) as raised:
        _research(study, spec)
    assert record.tree_hash in str(raised.value) and scan(data).tree_hash in str(raised.value)
    assert "--new" in (raised.value.hint or "")
    assert len(ledger.runs(exp.id)) == 1  # nothing ran on the changed data
    (data / "train.txt").write_bytes(b"first version\n")  # the data restored: the same command resumes
    resumed = _research(study, spec)
    assert resumed.status == ExperimentStatus.COMPLETED and resumed.experiment_id == exp.id, resumed.message
    assert len(ledger.runs(exp.id)) == 1


def test_missing_data_path_is_an_error_naming_the_path(study: Study) -> None:
    spec = study.spec(data={"source": "local", "path": "no/such/dir"})
    with pytest.raises(DataError) as raised:
        local_copy(load_spec(spec), study.home)
    assert str(study.root / "no/such/dir") in raised.value.message
    assert f"{spec}:" in raised.value.message  # file:line of data.path


def test_a_dropped_download_resumes_from_where_it_stopped(tmp_path: Path, data_server: DataServer) -> None:
    blob = os.urandom(300_000)
    data_server.files = {"big.bin": blob}
    data_server.cut_after["big.bin"] = 100_000
    dest = tmp_path / "big.bin"
    with httpx.Client() as client:
        with pytest.raises(DataError):
            fetch(data_server.url("big.bin"), dest, expected=None, deadline=time.monotonic() + 30, client=client)
        assert (tmp_path / "big.bin.part").stat().st_size == 100_000
        got = fetch(data_server.url("big.bin"), dest, expected=hashlib.sha256(blob).hexdigest(),
                    deadline=time.monotonic() + 30, client=client)
    assert dest.read_bytes() == blob and got.sha256 == hashlib.sha256(blob).hexdigest()
    assert data_server.ranges == [("big.bin", None), ("big.bin", "bytes=100000-")]  # only the rest was sent again


def test_archives_cannot_write_outside_the_data_directory(study: Study, data_server: DataServer) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    data_server.files = {"evil.tar.gz": buf.getvalue()}
    spec = study.spec(data={"source": "url", "url": data_server.url("evil.tar.gz")})
    with pytest.raises(DataError, match="cannot unpack the archive evil.tar.gz"):
        local_copy(load_spec(spec), study.home)
    assert not list(study.home.rglob("escape.txt"))


@pytest.mark.parametrize(("data", "message"), [
    ({"source": "url"}, "needs data.url"),
    ({"source": "url", "url": "ftp://example.org/x"}, r"is not an http\(s\):// URL"),
    ({"source": "url", "url": ["https://e.org/a", "https://e.org/b"], "sha256": "0" * 64}, "must match data.url"),
    ({"source": "url", "url": "https://e.org/a", "sha256": "xyz"}, "is not a SHA-256"),
    ({"source": "local"}, "needs data.path"),
    ({"source": "none", "path": "d"}, "only used with source: local"),
    ({"source": "local", "path": "d", "url": "https://e.org/a"}, "only used with source: url or rsync"),
    ({"source": "hf"}, "needs data.repo"),
    ({"source": "url", "url": "https://e.org/a", "sha256": 0}, "put the digest in quotes"),
    ({"source": "url", "url": "https://e.org/a", "revision": "v1"}, "only used with source: hf"),
])
def test_data_spec_errors_say_what_to_fix(study: Study, data: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError, match=message) as raised:
        load_spec(study.spec(data=data))
    assert f"{study.root / 'study.yaml'}:" in str(raised.value)


@pytest.mark.subprocess
def test_validate_reports_size_and_reachability_without_downloading(study: Study, data_server: DataServer) -> None:
    data_server.files = {"train.txt": b"x" * 5000}
    spec = study.spec(data={"source": "url", "url": data_server.url("train.txt")})
    done = study.cli("validate", str(spec))
    assert done.returncode == 0, done.stderr
    assert "reachable (HTTP 200)" in done.stdout and "4.9 KiB" in done.stdout, done.stdout
    assert data_server.requests == {} and data_server.heads == {"train.txt": 1}
    gone = study.spec(name="gone", data={"source": "url", "url": data_server.url("missing.txt")})
    done = study.cli("validate", str(gone))
    assert done.returncode == 2 and "HTTP 404" in done.stderr and f"{gone}:" in done.stderr, done.stderr
    missing = study.spec(name="missing", data={"source": "local", "path": "not-here"})
    done = study.cli("validate", str(missing))
    assert done.returncode == 2 and f"{study.root / 'not-here'} does not exist" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_check_reports_a_checksum_mismatch_before_acquiring_anything(study: Study, data_server: DataServer) -> None:
    served = b"the served bytes\n"
    data_server.files = {"train.txt": served}
    expected = hashlib.sha256(b"other bytes\n").hexdigest()
    spec = study.spec(data={"source": "url", "url": data_server.url("train.txt"), "sha256": expected})
    result = check_spec(load_spec(spec), study.home, smoke=False, use_llm=False)
    (data,) = [c for c in result.checks if c.name == "data"]
    assert data.status == "failed" and expected in data.summary and hashlib.sha256(served).hexdigest() in data.summary
    assert not result.is_code_ready


@pytest.mark.subprocess
def test_an_rsync_directory_is_mirrored_read_and_a_change_on_the_server_refuses_a_resume(study: Study,
                                                                                        rsyncd: Rsyncd) -> None:
    (rsyncd.root / "set" / "deep").mkdir(parents=True)
    (rsyncd.root / "set" / "train.txt").write_bytes(b"served over rsync\n")
    (rsyncd.root / "set" / "deep" / "b.bin").write_bytes(os.urandom(3000))
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "rsync", "url": rsyncd.url("set")})
    # validate reads the server's listing: reachable, its size, nothing copied
    done = study.cli("validate", str(spec), env={"COLUMNS": "300"})
    assert done.returncode == 0 and "reachable, 2 files" in done.stdout, done.stdout + done.stderr
    assert not (study.home / "data" / "rsync").exists()
    outcome = _research(study, spec)
    assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    (run,) = ledger.runs(exp.id)
    assert ledger.run_metrics(exp.id)[run.id]["score"][0] == _prefix(b"served over rsync\n")
    (record,) = ledger.data_records(exp.id)
    assert record.sources[0]["kind"] == "rsync" and record.tree_hash == scan(rsyncd.root / "set").tree_hash
    ledger.update_experiment(exp.id, status=ExperimentStatus.RUNNING)  # as if the orchestrator had died
    (rsyncd.root / "set" / "train.txt").write_bytes(b"changed on the server\n")
    with pytest.raises(DataError, match="the data changed since this experiment's runs read it"):
        _research(study, spec)
    assert len(ledger.runs(exp.id)) == 1


def test_rsync_spec_errors(study: Study) -> None:
    with pytest.raises(SpecError, match="needs data.url: rsync://"):
        load_spec(study.spec(data={"source": "rsync", "url": "https://e.org/x"}))
    with pytest.raises(SpecError, match="use source: rsync"):
        load_spec(study.spec(data={"source": "url", "url": "rsync://e.org/m"}))
    with pytest.raises(SpecError, match="tree hash"):
        load_spec(study.spec(data={"source": "rsync", "url": "rsync://e.org/m", "sha256": "0" * 64}))


@pytest.mark.subprocess
def test_a_hugging_face_dataset_is_fetched_once_at_its_resolved_commit(study: Study, hub: Hub,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")  # in the orchestrator's environment, but not passed on
    hub.files = {"train.txt": b"from the hub\n", "data/part-0.csv": b"x,y\n1,2\n"}
    study.commit({"run.sh": RUNNER})
    spec = study.spec(data={"source": "hf", "repo": "org/ds", "revision": "main", "endpoint": hub.endpoint})
    # validate looks the revision up: its commit, files and size; nothing is fetched
    done = study.cli("validate", str(spec), env={"COLUMNS": "300"})
    assert done.returncode == 0 and f"resolves to commit {hub.commit}, 2 files" in done.stdout, done.stdout
    assert hub.downloads == {}
    for new in (False, True):  # a second experiment reuses the home's Hub cache
        outcome = _research(study, spec, new=new)
        assert outcome.status == ExperimentStatus.COMPLETED, outcome.message
    assert hub.downloads == {"train.txt": 1, "data/part-0.csv": 1}
    assert set(hub.authorizations) == {None}  # HF_TOKEN was not in pass_env: never sent
    ledger = study.ledger()
    for exp in ledger.experiments():
        (run,) = ledger.runs(exp.id)
        assert ledger.run_metrics(exp.id)[run.id]["score"][0] == _prefix(b"from the hub\n")
        (record,) = ledger.data_records(exp.id)
        assert record.sources[0]["resolved"] == f"{hub.endpoint}/datasets/org/ds@{hub.commit}"
        assert record.sources[0]["location"] == "dataset org/ds@main"
    assert "hf_secret_token" not in (study.home / "ledger.db").read_bytes().decode("latin-1")


def test_a_private_hugging_face_repo_needs_the_token_passed_on_purpose(study: Study, hub: Hub,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    hub.token = "hf_secret_token"
    hub.files = {"train.txt": b"private\n"}
    spec = study.spec(data={"source": "hf", "repo": "org/ds", "endpoint": hub.endpoint})
    with pytest.raises(DataError) as refused:
        local_copy(load_spec(spec), study.home)
    assert "private or gated" in refused.value.message and "pass_env" in (refused.value.hint or "")
    passed = study.spec(name="passed", data={"source": "hf", "repo": "org/ds", "endpoint": hub.endpoint},
                        pass_env=["HF_TOKEN"])
    copy = local_copy(load_spec(passed), study.home)
    assert copy is not None and (copy.directory / "train.txt").read_bytes() == b"private\n"
    assert "Bearer hf_secret_token" in hub.authorizations


def test_a_revision_that_does_not_exist_is_a_clear_error(study: Study, hub: Hub) -> None:
    hub.files = {"train.txt": b"x\n"}
    spec = study.spec(data={"source": "hf", "repo": "org/ds", "revision": "v9", "endpoint": hub.endpoint})
    with pytest.raises(DataError, match="the revision does not exist"):
        local_copy(load_spec(spec), study.home)


def test_hosts_receive_the_copy_the_experiment_fetched_even_if_the_source_moved(study: Study, rsyncd: Rsyncd,
                                                                                hub: Hub) -> None:
    """Between the fetch before renting and a host's staging, an rsync directory or a Hub branch may move;
    the hosts get what the ledger records (`prepared_copy`), and the next start sees the move."""
    (rsyncd.root / "train.txt").write_bytes(b"one\n")
    hub.files = {"train.txt": b"one\n"}
    for data in ({"source": "rsync", "url": rsyncd.url()},
                 {"source": "hf", "repo": "org/ds", "endpoint": hub.endpoint}):
        loaded = load_spec(study.spec(name=str(data["source"]), data=data))
        fetched = local_copy(loaded, study.home)
        (rsyncd.root / "train.txt").write_bytes(b"second\n")  # another size: rsync compares size and mtime
        hub.files = {"train.txt": b"second\n"}
        staged = prepared_copy(loaded, study.home)
        assert staged is not None and fetched is not None and staged.tree_hash == fetched.tree_hash, data
        again = local_copy(loaded, study.home)  # the next start
        assert again is not None and (again.directory / "train.txt").read_bytes() == b"second\n", data
        (rsyncd.root / "train.txt").write_bytes(b"one\n")
        hub.files = {"train.txt": b"one\n"}
