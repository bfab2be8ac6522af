"""The Ray backend against a real local Ray cluster (see raycluster.py): experiments, streaming, lost nodes, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import Study, process_alive
from ratiocinator.backends.base import Host, LaunchRequest, RunHandle, Slot
from ratiocinator.pipeline import Research
from ratiocinator.spec.models import LoadedSpec, load_spec
from raycluster import RayCluster

pytest.importorskip("ray", reason="the Ray backend's tests need `pip install 'ratiocinator[ray]'`")
from ratiocinator.backends.ray_backend import RayBackend

RUNNER = """
#!/usr/bin/env bash
set -euo pipefail
echo 'METRICS: {"step": 1, "loss": 2.0}'
env | grep -E '^(RATIOCINATOR_|BONUS=)' | sort > "$RATIOCINATOR_OUT_DIR/env.txt"
mkdir -p "$RATIOCINATOR_OUT_DIR/sub"
echo nested > "$RATIOCINATOR_OUT_DIR/sub/file.txt"
ln -s sub/file.txt "$RATIOCINATOR_OUT_DIR/inside_link"
ln -s /etc/passwd "$RATIOCINATOR_OUT_DIR/escape_abs"
echo "$RATIOCINATOR_RAY_NODE $$" >> "$MARKS/started"
for i in $(seq 1 3000); do [ -e "$MARKS/go" ] && break; sleep 0.1; done  # outwaits the test's 240 s
[ -e "$MARKS/go" ] || { echo "never told to go" >&2; exit 3; }
if [ "${MODE:-}" = slow ] && [ ! -e "$MARKS/killed" ]; then sleep 120; fi
echo "stderr chatter" >&2
echo "METRICS: {\\"score\\": $(( ${BONUS:-0} + ${SEED:-0} ))}"
"""

SPAWN = """
#!/usr/bin/env bash
sleep 300 &
echo "$! $$" > "$MARKS/pids.tmp" && mv "$MARKS/pids.tmp" "$MARKS/pids"
wait
"""


def _spec(study: Study, marks: Path, **fields: object) -> Path:
    study.commit({"run.sh": RUNNER, "spawn.sh": SPAWN}, executable=("run.sh", "spawn.sh"))
    marks.mkdir(exist_ok=True)
    return study.spec(**{"seed_env": "SEED", "train_timeout_s": 420,
                         "failure_policy": {"retry_backoff_s": 0, "max_attempts": 3}, **fields})


def _backend(cluster: RayCluster, study: Study) -> RayBackend:
    return RayBackend(cluster.address, study.home, num_cpus_per_run=1, workdir=str(study.root / "ray-nodes"),
                      schedule_timeout_s=240)


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.latex
def test_full_experiment_over_the_cluster_streams_points_and_collects_artifacts(
        ray_cluster: RayCluster, study: Study) -> None:
    marks = study.root / "marks"
    spec = _spec(study, marks, arms=[{"name": "low", "env": {"BONUS": 10, "MARKS": str(marks)}},
                                     {"name": "high", "env": {"BONUS": 20, "MARKS": str(marks)}}], replicates=2)
    backend = _backend(ray_cluster, study)
    seen: dict[str, object] = {}

    def release_when_streamed() -> None:  # points must reach the ledger while every run still waits
        def streamed() -> bool:
            if not (marks / "started").exists() or len((marks / "started").read_text().splitlines()) < 4:
                return False
            ledger = study.ledger()
            exp = ledger.experiments()[-1]
            runs = ledger.runs(exp.id)
            return len(runs) == 4 and all(ledger.points(r.id, "loss") for r in runs)

        seen["streamed"] = _wait_for(streamed, 240)  # generous: a loaded 2-core box schedules slowly
        seen["running_then"] = [r.status for r in study.ledger().runs(study.ledger().experiments()[-1].id)]
        (marks / "go").touch()

    watcher = threading.Thread(target=release_when_streamed, daemon=True)
    watcher.start()
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    watcher.join(5)
    assert outcome.status == "completed", outcome.message
    assert seen["streamed"] is True and set(seen["running_then"]) == {"running"}, seen
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert len(runs) == 4 and all(r.status == "succeeded" for r in runs), [
        (r.status, r.failure, r.reason) for r in runs]
    finals = ledger.run_metrics(exp.id)
    assert {(r.arm, r.replicate): finals[r.id]["score"][0] for r in runs} == {
        ("low", 0): 10, ("low", 1): 11, ("high", 0): 20, ("high", 1): 21}
    nodes = {ray_cluster.ids["w1"], ray_cluster.ids["w2"]}  # type: ignore[attr-defined]
    for run in runs:
        out, logs = Path(run.out_dir), Path(run.log_dir)
        assert run.host == f"ray:{ray_cluster.address}"
        assert "stderr chatter" in (logs / "stderr.log").read_text()
        env = dict(line.split("=", 1) for line in (out / "env.txt").read_text().splitlines())
        node = env["RATIOCINATOR_RAY_NODE"]
        assert node in nodes  # never the head: it offers no CPUs
        assert env["RATIOCINATOR_OUT_DIR"].startswith(str(study.root / "ray-nodes" / "nodes" / node[:16] / "runs"))
        assert env["RATIOCINATOR_WORKSPACE"].startswith(  # the run's own copy of the node's checkout
            str(study.root / "ray-nodes" / "nodes" / node[:16] / "runs"))
        assert env["RATIOCINATOR_WORKSPACE"].endswith("/work")
        assert (out / "sub" / "file.txt").read_text() == "nested\n"
        assert os.readlink(out / "inside_link") == "sub/file.txt"
        assert not (out / "escape_abs").exists() and not (out / "escape_abs").is_symlink()
        assert "escape_abs -> /etc/passwd" in (logs / "artifacts_skipped.txt").read_text()
    # Each worker node's environment, read there with the runs' interpreter, and printed in the paper.
    found = [e["data"] for e in ledger.events(exp.id) if e["kind"] == "environment"]
    assert sorted(f["host"] for f in found) == sorted(f"ray node {n[:12]}" for n in nodes)
    assert all(f["python"] and len(f["freeze_sha256"]) == 64 for f in found)
    assert outcome.report is not None
    paper = outcome.report.md.read_text()
    assert all(f"(host ray node {n[:12]}, machine " in paper for n in nodes)
    # Each worker node prepared the commit once, in its own directory.
    checkouts = sorted((study.root / "ray-nodes" / "nodes").glob("*/checkouts/*"))
    assert [p.parent.parent.name for p in checkouts if not p.name.endswith(".lock")] == sorted(n[:16] for n in nodes)


async def _launch_spawner(backend: RayBackend, host: Host, loaded: LoadedSpec, study: Study,
                          marks: Path) -> tuple[RunHandle, list[int]]:
    """spawn.sh launched on the cluster, once it has written its own pid and its child's."""
    workspace = await backend.prepare(host, loaded, study.repo.head())
    out = study.root / "run" / "out"
    out.mkdir(parents=True)
    request = LaunchRequest(run_id=1, argv=(str(workspace.checkout / "spawn.sh"),), cwd=workspace.checkout,
                            env={"MARKS": str(marks)}, slot=Slot(0), log_dir=out.parent, out_dir=out)
    handle = await backend.launch(host, request)
    for _ in range(600):
        if (marks / "pids").exists():
            break
        await asyncio.sleep(0.1)
    return handle, [int(p) for p in (marks / "pids").read_text().split()]


def test_cancel_kills_the_remote_process_group(ray_cluster: RayCluster, study: Study) -> None:
    marks = study.root / "marks"
    spec = _spec(study, marks)
    loaded = load_spec(spec)
    backend = _backend(ray_cluster, study)

    async def scenario() -> tuple[list[int], object]:
        host = await backend.acquire(loaded)
        assert len(host.slots) == 4 and host.info["cpus"] == "4"
        handle, pids = await _launch_spawner(backend, host, loaded, study, marks)
        assert all(process_alive(p) for p in pids)
        await handle.cancel(grace_s=2.0)
        return pids, await asyncio.wait_for(handle.wait(), 10)

    pids, exit_info = asyncio.run(scenario())
    assert _wait_for(lambda: not any(process_alive(p) for p in pids), 10), pids
    assert exit_info.signal is not None


def test_orphan_of_a_dead_orchestrator_is_killed_on_its_node_by_pid_and_start_time(
        ray_cluster: RayCluster, study: Study) -> None:
    marks = study.root / "marks"
    loaded = load_spec(_spec(study, marks))
    backend = _backend(ray_cluster, study)

    async def scenario() -> tuple[list[int], object]:
        handle, pids = await _launch_spawner(backend, await backend.acquire(loaded), loaded, study, marks)
        # A later orchestrator knows only the ledger's (pid, pid start time), as after `kill -9` and a resume.
        later = _backend(ray_cluster, study)
        assert handle.pid_start is not None
        assert not await asyncio.to_thread(later.kill_orphan, handle.pid, handle.pid_start + 1)  # a reused pid
        assert not await asyncio.to_thread(later.kill_orphan, 999_999_999, 1)  # never recorded
        assert all(process_alive(p) for p in pids)
        assert await asyncio.to_thread(later.kill_orphan, handle.pid, handle.pid_start)
        return pids, await asyncio.wait_for(handle.wait(), 30)

    pids, exit_info = asyncio.run(scenario())
    assert _wait_for(lambda: not any(process_alive(p) for p in pids), 10), pids  # its whole process group
    assert exit_info.signal == signal.SIGKILL


@pytest.mark.latex
def test_killed_node_marks_its_run_infra_and_the_retry_succeeds_on_another_node(
        ray_cluster: RayCluster, study: Study) -> None:
    marks = study.root / "marks"
    spec = _spec(study, marks, arms=[{"name": "slow", "env": {"BONUS": 7, "MODE": "slow", "MARKS": str(marks)}}])
    backend = _backend(ray_cluster, study)
    by_id = {node_id: name for name, node_id in ray_cluster.ids.items()}  # type: ignore[attr-defined]
    seen: dict[str, object] = {}

    def kill_its_node() -> None:
        if not _wait_for(lambda: (marks / "started").exists() and (marks / "started").read_text().strip(), 90):
            (marks / "go").touch()
            return
        node, pid = (marks / "started").read_text().split()[:2]
        seen["first_node"], seen["first_pid"] = node, int(pid)
        ray_cluster.kill_node(by_id[node])
        (marks / "killed").touch()
        (marks / "go").touch()
        seen["runner_gone"] = _wait_for(lambda: not process_alive(int(pid)), 10)

    killer = threading.Thread(target=kill_its_node, daemon=True)
    killer.start()
    outcome = Research(load_spec(spec), study.home, backend=backend, check=False).run()
    killer.join(15)
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    runs = ledger.runs(ledger.experiments()[-1].id)
    assert [(r.status, r.failure) for r in runs] == [("failed", "infra"), ("succeeded", None)], \
        [(r.status, r.failure, r.reason) for r in runs]
    assert "lost the run's host" in runs[0].reason
    assert seen["runner_gone"] is True  # the lost node's runner did not linger
    started = [line.split()[0] for line in (marks / "started").read_text().splitlines()]
    assert len(started) == 2 and started[0] == seen["first_node"] and started[1] != started[0]
    assert ledger.run_metrics(ledger.experiments()[-1].id)[runs[1].id]["score"][0] == 7


def test_only_the_runs_own_and_named_variables_reach_the_node(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k")
    monkeypatch.setenv("UNRELATED", "u")
    backend = RayBackend("127.0.0.1:1", tmp_path, env_forward=("WANDB_*",))
    # as runner_environment builds it: the orchestrator's environment without its own RATIOCINATOR_* settings
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RATIOCINATOR_")}
    env = {**inherited, "RATIOCINATOR_RUN_ID": "3", "LR": "0.1", "PATH": "/elsewhere", "RAY_ADDRESS": "x"}
    assert backend._forwarded_env(env) == {"WANDB_API_KEY": "k", "RATIOCINATOR_RUN_ID": "3", "LR": "0.1"}


@pytest.mark.latex
def test_files_under_git_lfs_reach_every_node_with_their_content(
        ray_cluster: RayCluster, study: Study, monkeypatch: pytest.MonkeyPatch) -> None:
    from ratiocinator.backends import ray_backend

    monkeypatch.setattr(ray_backend, "LFS_CHUNK", 1000)  # the 4096-byte file travels as 5 objects
    blob = study.commit_lfs_blob()
    spec = study.spec(seed_env="SEED", train_timeout_s=120, replicates=2)
    outcome = Research(load_spec(spec), study.home, backend=_backend(ray_cluster, study), check=False).run()
    assert outcome.status == "completed", outcome.message
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs = ledger.runs(exp.id)
    assert len(runs) == 2 and all(r.status == "succeeded" for r in runs), [(r.failure, r.reason) for r in runs]
    finals = ledger.run_metrics(exp.id)
    for run in runs:
        assert finals[run.id]["score"][0] == len(blob)
        assert (Path(run.out_dir) / "sha256.txt").read_text().strip() == hashlib.sha256(blob).hexdigest()
    # Every node prepared (the cluster's live workers) holds the content, not the pointer.
    blobs = list((study.root / "ray-nodes" / "nodes").glob("*/checkouts/*/data/blob.bin"))
    assert blobs and all(p.read_bytes() == blob for p in blobs)


@pytest.mark.latex
def test_runs_on_ray_nodes_work_in_their_own_copies_and_node_checkouts_stay_pristine(
        ray_cluster: RayCluster, study: Study) -> None:
    import subprocess

    from test_confinement import WRITER

    study.commit({"run.sh": WRITER})
    spec = study.spec(factors={"K": [1, 2, 3]}, concurrency=3, failure_policy={"max_attempts": 1}, replicates=1,
                      train_timeout_s=120)
    Research(load_spec(spec), study.home, backend=_backend(ray_cluster, study), check=False).run()
    ledger = study.ledger()
    exp = ledger.experiments()[-1]
    runs, finals = ledger.runs(exp.id), ledger.run_metrics(exp.id)
    ok = [r for r in runs if r.status == "succeeded"]
    assert len(ok) == 2 and all(finals[r.id]["score"][0] == 1 for r in ok), [(r.status, r.reason) for r in runs]
    dirs = {Path(r.out_dir, "pwd").read_text().strip() for r in runs}
    assert len(dirs) == 3 and all(d.endswith("/work") for d in dirs)
    for checkout in {p.parent for p in (study.root / "ray-nodes").glob("nodes/*/checkouts/*/run.sh")}:
        status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=checkout, capture_output=True,
                                text=True, check=True)
        assert status.stdout == "", status.stdout
