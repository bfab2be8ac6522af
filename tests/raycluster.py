"""A real local Ray cluster for tests: a head (no CPUs, so runs land on workers) plus worker nodes.

Every node is a ``ray start --block`` process in its own session, so a test can kill one
node (raylet and its workers together) the way a machine dies, and teardown kills only
what this fixture started (never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))
# Fast failure detection, so a killed node is declared dead within seconds.
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
       "RAY_health_check_failure_threshold": "5", "RAY_raylet_start_wait_time_s": "60"}
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (Ray starts some of a node's daemons in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            ppid = int(data[data.rfind(b")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _kill_tree(pid: int, sig: int) -> None:
    for member in _descendants(pid):
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


class RayCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, **ENV}

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.nodes[name] = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", f"--node-name={name}",
                 "--object-store-memory=200000000", *args],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def start_head(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                             f"--temp-dir={self.root / 'tmp'}", "--node-ip-address=127.0.0.1"])

    def add_worker(self, name: str, cpus: int = 2) -> None:
        self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", "--node-ip-address=127.0.0.1"])

    def wait_nodes(self, names: set[str]) -> dict[str, str]:
        """Node name -> node id, once every named node is alive (started from a subprocess: no ray.init here)."""
        code = (f"import json, ray; ray.init(address={self.address!r}, log_to_driver=False, configure_logging=False);"
                "print(json.dumps({n['NodeName']: n['NodeID'] for n in ray.nodes() if n['Alive']}))")
        deadline = time.time() + START_TIMEOUT_S
        last = ""
        while time.time() < deadline:
            for name, proc in self.nodes.items():
                if proc.poll() is not None and name in names:
                    raise RuntimeError(f"ray node {name} exited: {(self.root / f'{name}.log').read_text()[-2000:]}")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env,
                                  timeout=60, check=False)
            last = done.stderr[-1000:]
            if done.returncode == 0:
                import json

                alive = json.loads(done.stdout.strip().splitlines()[-1])
                if names <= set(alive):
                    return alive
            time.sleep(1)
        raise RuntimeError(f"the Ray cluster did not come up within {START_TIMEOUT_S:g}s: {last}")

    def kill_node(self, name: str) -> None:
        proc = self.nodes[name]
        _kill_tree(proc.pid, signal.SIGKILL)  # like a machine dying: raylet, agents and workers at once
        proc.wait()

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            proc = self.nodes[name]
            if proc.poll() is None:
                tree = _descendants(proc.pid)
                _kill_tree(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
                for member in tree:  # whatever ignored the polite signal
                    try:
                        os.kill(member, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("ray", reason="the Ray backend's tests need `pip install 'ratiocinator[ray]'`")
    root = tmp_path_factory.mktemp("ray")
    short = Path(f"/tmp/rc-ray-{os.getpid()}")  # Ray's socket paths must stay short
    short.mkdir(exist_ok=True)
    cluster = RayCluster(short)
    try:
        cluster.start_head()  # one at a time: two cores cannot start three nodes at once in time
        cluster.wait_nodes({"head"})
        cluster.add_worker("w1")
        cluster.wait_nodes({"head", "w1"})
        cluster.add_worker("w2")
        cluster.ids = cluster.wait_nodes({"head", "w1", "w2"})  # type: ignore[attr-defined]
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        cluster.stop()
        pytest.skip(f"could not start a local Ray cluster on this machine: {exc}")
    cluster.workdir = root  # type: ignore[attr-defined]
    yield cluster
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.stop()
