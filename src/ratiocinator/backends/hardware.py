"""Facts about this machine (GPUs, CUDA, RAM, disk) and how they meet a spec's hardware.

Probing never fails: a missing ``nvidia-smi`` means zero GPUs, an unreadable
``/proc/meminfo`` means unknown RAM. The comparison reports every hardware field,
including the ones a local machine cannot honour (image, bandwidth, $/hour).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from ratiocinator.backends.base import HardwareFinding
from ratiocinator.spec.models import Hardware


@dataclass(frozen=True)
class MachineFacts:
    gpus: tuple[str, ...]
    cuda_version: str | None
    ram_gb: float | None
    disk_free_gb: float | None
    cpus: int


def probe_machine(disk_path: Path) -> MachineFacts:
    gpus, cuda = _nvidia()
    return MachineFacts(gpus=gpus, cuda_version=cuda, ram_gb=_ram_gb(), disk_free_gb=_disk_free_gb(disk_path),
                        cpus=os.cpu_count() or 1)


def _nvidia() -> tuple[tuple[str, ...], str | None]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return (), None
    try:
        names = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
        header = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return (), None
    match = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return tuple(n.strip() for n in names.splitlines() if n.strip()), match.group(1) if match else None


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except (OSError, ValueError, IndexError):
        return None
    return None


def _disk_free_gb(path: Path) -> float | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free / 1024**3
    except OSError:
        return None


def _version_at_least(have: str, need: str) -> bool:
    try:
        return Version(have) >= Version(need)
    except InvalidVersion:
        return False


def compare_local(hw: Hardware, facts: MachineFacts) -> list[HardwareFinding]:
    """Every hardware field against this machine."""
    out: list[HardwareFinding] = []
    if hw.gpu is not None:
        matching = [g for g in facts.gpus if hw.gpu.lower() in g.lower()]
        if matching:
            out.append(HardwareFinding("gpu", "ok", f"{len(matching)} × {matching[0]}"))
        else:
            seen = ", ".join(facts.gpus) or "no NVIDIA GPU"
            out.append(HardwareFinding("gpu", "unmet", f"needs '{hw.gpu}', this machine has {seen}"))
    usable = len([g for g in facts.gpus if hw.gpu is None or hw.gpu.lower() in g.lower()])
    if hw.num_gpus:
        out.append(HardwareFinding("num_gpus", "ok" if usable >= hw.num_gpus else "unmet",
                                   f"needs {hw.num_gpus} per run, {usable} usable here"))
    if hw.min_cuda_version is not None:
        if facts.cuda_version is None:
            out.append(HardwareFinding("min_cuda_version", "unmet",
                                       f"needs CUDA ≥ {hw.min_cuda_version}, no NVIDIA driver found"))
        else:
            ok = _version_at_least(facts.cuda_version, hw.min_cuda_version)
            out.append(HardwareFinding("min_cuda_version", "ok" if ok else "unmet",
                                       f"needs ≥ {hw.min_cuda_version}, driver supports {facts.cuda_version}"))
    if hw.min_cpu_ram_gb is not None:
        if facts.ram_gb is None:
            out.append(HardwareFinding("min_cpu_ram_gb", "unknown", "could not read this machine's memory size"))
        else:
            ok = facts.ram_gb >= hw.min_cpu_ram_gb
            out.append(HardwareFinding("min_cpu_ram_gb", "ok" if ok else "unmet",
                                       f"needs {hw.min_cpu_ram_gb:g} GB, this machine has {facts.ram_gb:.1f} GB"))
    if hw.disk_gb is not None:
        if facts.disk_free_gb is None:
            out.append(HardwareFinding("disk_gb", "unknown", "could not read free disk space"))
        else:
            ok = facts.disk_free_gb >= hw.disk_gb
            out.append(HardwareFinding("disk_gb", "ok" if ok else "unmet",
                                       f"needs {hw.disk_gb:g} GB free, {facts.disk_free_gb:.1f} GB free under --home"))
    if hw.min_inet_down is not None:
        out.append(HardwareFinding("min_inet_down", "not_applicable",
                                   "download bandwidth is a rental filter; the local machine is used as it is"))
    if hw.image is not None:
        out.append(HardwareFinding("image", "not_applicable",
                                   "the local backend runs on this machine's own environment,"
                                   " not in a container image"))
    if hw.max_dph is not None:
        if hw.price_per_hour:
            ok = hw.price_per_hour <= hw.max_dph
            out.append(HardwareFinding("max_dph", "ok" if ok else "unmet",
                                       f"price_per_hour ${hw.price_per_hour:g} vs max_dph ${hw.max_dph:g}"))
        else:
            out.append(HardwareFinding("max_dph", "not_applicable",
                                       "the local machine is not rented (price_per_hour is 0)"))
    return out


def oom_kill_count() -> int:
    """Kernel OOM kills seen so far: machine-wide (/proc/vmstat) plus this process's memory cgroup.

    Only ever compared with an earlier reading: an increase while a run was alive, and the
    run dying of SIGKILL, means the OOM killer took it. Unreadable counters count as 0.
    Read before every run, so the files to read are found once per process.
    """
    return sum(_counter(path) for path in _oom_counters())


@functools.cache
def _oom_counters() -> tuple[Path, ...]:
    """/proc/vmstat and this process's memory cgroup's counter (v2 ``memory.events``, v1 ``memory.oom_control``)."""
    found = [Path("/proc/vmstat")]
    try:
        cgroups = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return tuple(found)
    for line in cgroups:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and not controllers:  # cgroup v2: subtree events
            found.append(Path("/sys/fs/cgroup") / relative / "memory.events")
        elif "memory" in controllers.split(","):  # cgroup v1
            found.append(Path("/sys/fs/cgroup/memory") / relative / "memory.oom_control")
    # A process's cgroup files are there from its start or never (a v2 line on a v1 machine, say).
    return tuple(path for path in found if os.access(path, os.R_OK))


def _read_small(path: Path) -> bytes:
    """A small kernel file read whole with plain system calls: read before every run, where Python's buffered
    file object (a position query, a buffer) costs as much as the kernel's work."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while chunk := os.read(fd, 1 << 16):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _counter(path: Path, name: bytes = b"oom_kill") -> int:
    try:
        data = b"\n" + _read_small(path)
    except OSError:
        return 0
    at = data.find(b"\n" + name + b" ")
    if at < 0:
        return 0
    start = at + len(name) + 2
    end = data.find(b"\n", start)
    try:
        return int(data[start:] if end < 0 else data[start:end])
    except ValueError:
        return 0
