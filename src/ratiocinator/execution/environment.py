"""The runs' software environment, read with the interpreter the runs use, so a paper can say
what produced its numbers: Python version, every installed distribution (and a hash of that
set, so two studies can tell whether they ran the same packages), the versions of the
packages the requirements file lists, the GPU model, driver and CUDA version, and the host.

``probe_environment`` runs ``python -c PROBE`` in the prepared workspace with the runs'
environment; it never raises: a probe that cannot run records nothing, and the paper says so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 60.0

# Runs inside the runs' interpreter: standard library only.
PROBE = r"""# ratiocinator environment probe
import hashlib, importlib.metadata as md, json, platform, sys
packages = sorted({f"{(d.metadata['Name'] or '').lower()}=={d.version}" for d in md.distributions()
                   if d.metadata['Name']})
print(json.dumps({
    "python": platform.python_version(), "implementation": platform.python_implementation(),
    "platform": f"{platform.system()} {platform.release()} {platform.machine()}", "node": platform.node(),
    "packages": packages, "freeze_sha256": hashlib.sha256("\n".join(packages).encode()).hexdigest(),
}))
"""

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._\-]*)")


def requirement_names(path: Path) -> list[str]:
    """The distribution names a requirements file lists (options, includes and URLs skipped)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    names = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-") or "://" in line:
            continue
        match = _NAME.match(line)
        if match:
            names.append(match.group(1))
    return names


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_environment(env: Mapping[str, str]) -> dict[str, str]:
    """GPU model, driver and CUDA version from nvidia-smi, where there is one."""
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return {}
    try:
        query = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=20, stdin=subprocess.DEVNULL)
        header = subprocess.run([smi], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[str, str] = {}
    rows = [r.split(",") for r in query.stdout.strip().splitlines() if "," in r]
    if query.returncode == 0 and rows:
        out["gpu"] = "; ".join(sorted({r[0].strip() for r in rows}))
        out["driver"] = rows[0][1].strip()
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", header.stdout)
    if cuda:
        out["cuda"] = cuda.group(1)
    return out


def probe_environment(checkout: Path, env: Mapping[str, str], requirements: str | None) -> dict[str, Any] | None:
    """What the runs' ``python`` in ``checkout`` with ``env`` has installed, or None when it cannot be read."""
    python = shutil.which("python", path=env.get("PATH")) or shutil.which("python3", path=env.get("PATH"))
    if python is None:
        return None
    try:
        done = subprocess.run([python, "-c", PROBE], cwd=checkout, env=dict(env), capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        data = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() \
            else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError):
        return None
    if not isinstance(data, dict):
        return None
    installed = {_normal(p.split("==", 1)[0]): p.split("==", 1)[1] for p in data.get("packages", []) if "==" in p}
    if requirements:
        data["requirements"] = {name: installed.get(_normal(name))
                                for name in requirement_names(Path(checkout) / requirements)}
    data.update(gpu_environment(env))
    return data
