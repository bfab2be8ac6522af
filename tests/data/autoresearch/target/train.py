"""A tiny 'training' run that prints the seed contract's summary lines.

val_bpb is deterministic given config.py, plus seed noise of -0.002, 0 or +0.002 chosen by
(hash of config.py + how many times this exact config has run before) mod 3. The run
counter lives outside the repository (AR_COUNTER_DIR), so a re-run of the same commit
draws the next value, and any three runs of one config average to its true value.
"""

import hashlib
import os
import pathlib
import time

import config
from evaluate import evaluate_bpb
from prepare import load_data

data = load_data()
time.sleep(float(os.environ.get("AR_TRAIN_SLEEP", "0")))
digest = hashlib.sha256(pathlib.Path("config.py").read_bytes()).hexdigest()
counters = pathlib.Path(os.environ["AR_COUNTER_DIR"])
counters.mkdir(parents=True, exist_ok=True)
counter = counters / digest
runs_before = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(runs_before + 1))
jitter = 0.002 * (((int(digest, 16) + runs_before) % 3) - 1)
print("step 100 | loss 2.3456 | budget", os.environ.get("RATIOCINATOR_BUDGET_S"))
print("cuda", os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
print(f"val_bpb: {evaluate_bpb(config, data) + jitter:.6f}")
print(f"peak_vram_mb: {config.WIDTH * 40.0:.1f}")
