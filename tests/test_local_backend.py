"""The local backend's hardware checks and GPU pinning.

This machine has no GPU, so a stand-in `nvidia-smi` executable on PATH reports two;
everything else (the probe's subprocess calls, slots, CUDA_VISIBLE_DEVICES) is real.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Study
from ratiocinator.backends.hardware import MachineFacts, compare_local
from ratiocinator.backends.local import LocalBackend
from ratiocinator.backends.process import process_start_time, spawn_timed
from ratiocinator.spec.models import Hardware

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
if [ "$1" = "--query-gpu=name" ]; then
  echo "NVIDIA GeForce RTX 4090"
  echo "NVIDIA GeForce RTX 4090"
else
  echo "| NVIDIA-SMI 550.54.14    Driver Version: 550.54.14    CUDA Version: 12.4 |"
fi
"""


def _fake_gpus(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_compare_local_reports_every_field() -> None:
    facts = MachineFacts(gpus=("NVIDIA GeForce RTX 4090",), cuda_version="12.4", ram_gb=24.0, disk_free_gb=100.0,
                         cpus=2)
    hw = Hardware(gpu="RTX 4090", num_gpus=2, min_cpu_ram_gb=32, min_inet_down=1000, min_cuda_version="12.0",
                  max_dph=0.4, disk_gb=50, image="pytorch/pytorch:2.7.0")
    findings = {f.field: f for f in compare_local(hw, facts)}
    assert set(findings) == {"gpu", "num_gpus", "min_cuda_version", "min_cpu_ram_gb", "disk_gb", "min_inet_down",
                             "image", "max_dph"}
    assert findings["gpu"].status == "ok"
    assert findings["num_gpus"].status == "unmet" and "1 usable" in findings["num_gpus"].detail
    assert findings["min_cuda_version"].status == "ok"
    assert findings["min_cpu_ram_gb"].status == "unmet" and "24.0 GB" in findings["min_cpu_ram_gb"].detail
    assert findings["disk_gb"].status == "ok"
    assert {findings[f].status for f in ("min_inet_down", "image", "max_dph")} == {"not_applicable"}
    old_driver = MachineFacts(gpus=("A100",), cuda_version="11.8", ram_gb=None, disk_free_gb=None, cpus=2)
    findings = {f.field: f
                for f in compare_local(Hardware(gpu="RTX 4090", min_cuda_version="12.0", min_cpu_ram_gb=1), old_driver)}
    assert findings["gpu"].status == "unmet" and findings["min_cuda_version"].status == "unmet"
    assert findings["min_cpu_ram_gb"].status == "unknown"
    priced = {f.field: f for f in compare_local(Hardware(max_dph=0.4, price_per_hour=0.5), old_driver)}
    assert priced["max_dph"].status == "unmet"


@pytest.mark.subprocess
def test_unmet_hardware_refuses_to_run(study: Study) -> None:
    study.commit({"run.sh": "#!/usr/bin/env bash\necho 'METRICS: {\"score\": 1}'\n"})
    spec = study.spec(hardware={"gpu": "RTX 4090", "num_gpus": 1, "min_cpu_ram_gb": 100000})
    done = study.cli("research", str(spec))
    assert done.returncode == 1
    assert "hardware.gpu" in done.stderr and "hardware.min_cpu_ram_gb" in done.stderr and "Traceback" not in done.stderr
    assert not (study.home / "ledger.db").exists()


@pytest.mark.subprocess
def test_each_gpu_run_is_pinned_to_its_own_gpu(study: Study, tmp_path: Path) -> None:
    study.commit({"run.sh": """
        #!/usr/bin/env bash
        echo "$CUDA_VISIBLE_DEVICES $(date +%s.%N)" > "$RATIOCINATOR_OUT_DIR/gpu"
        sleep 0.5
        echo "$(date +%s.%N)" >> "$RATIOCINATOR_OUT_DIR/gpu"
        echo "METRICS: {\\"score\\": ${K:-0}}"
    """})
    env = _fake_gpus(tmp_path)
    spec = study.spec(factors={"K": [1, 2, 3, 4]},
                      hardware={"gpu": "RTX 4090", "num_gpus": 1, "min_cuda_version": 12.0})
    validate = study.cli("validate", str(spec), env=env)
    assert validate.returncode == 0 and "2 × NVIDIA GeForce RTX 4090" in validate.stdout
    done = study.cli("research", str(spec), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    ledger = study.ledger()
    runs = ledger.runs(ledger.experiments()[-1].id)
    spans = []
    for run in runs:
        first, end = Path(run.out_dir, "gpu").read_text().splitlines()
        gpu, start = first.split()
        assert gpu in {"0", "1"} and run.slot == f"slot{gpu}:gpu{gpu}"
        spans.append((gpu, float(start), float(end)))
    # concurrency defaults to the number of GPU slots, and overlapping runs never share a GPU
    for gpu_a, s_a, e_a in spans:
        for gpu_b, s_b, e_b in spans:
            if (s_a, e_a) != (s_b, e_b) and s_a < e_b and s_b < e_a:
                assert gpu_a != gpu_b
    assert any(s_a < e_b and s_b < e_a for (_, s_a, e_a) in spans for (_, s_b, e_b) in spans if s_a != s_b)


def test_orphan_killer_never_kills_a_reused_pid() -> None:
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        start = process_start_time(proc.pid)
        assert start is not None
        backend = LocalBackend(Path("/tmp"))
        assert backend.kill_orphan(proc.pid, start + 1) is False  # a different process now has this PID
        time.sleep(0.1)
        assert proc.poll() is None
        assert backend.kill_orphan(proc.pid, start) is True
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()


def test_the_start_time_known_from_the_clock_is_the_one_proc_reports() -> None:
    """A run's identity (its start time) comes from the boot clock around the spawn when that reads one
    tick; a spawn across a tick's edge reads /proc instead. Either way it must be what /proc says."""
    from_clock = from_proc = 0
    for i in range(120):
        slow = i % 4 == 0  # spawns that take longer than a tick (10 ms): the clock cannot tell, /proc is read

        def spawn(slow: bool = slow) -> subprocess.Popen[bytes]:
            made = subprocess.Popen(["sleep", "5"], start_new_session=True)
            if slow:
                time.sleep(0.011)
            return made

        proc, start = spawn_timed(spawn, lambda made: made.pid)
        try:
            assert start is not None and start == process_start_time(proc.pid)
            from_proc += slow
            from_clock += not slow
        finally:
            proc.kill()
            proc.wait()
    assert from_clock and from_proc
