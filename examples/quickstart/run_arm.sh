#!/usr/bin/env bash
# Ratiocinator runner for the quickstart study: one arm x one seed.
# Ratiocinator runs it from the repository root (any directory works). Knobs arrive as
# environment variables (defaults below); RATIOCINATOR_SEED / SEED, RATIOCINATOR_OUT_DIR
# and RATIOCINATOR_TRIAL come from the runner.
set -euo pipefail

DEPTH="${DEPTH:-1}"
WIDTH="${WIDTH:-16}"
EPOCHS="${EPOCHS:-40}"
LR="${LR:-0.003}"
SEED="${SEED:-${RATIOCINATOR_SEED:-0}}"
OUT_DIR="${RATIOCINATOR_OUT_DIR:-}"

# A smoke run only has to show that the pipeline works end to end.
if [[ "${RATIOCINATOR_TRIAL:-0}" == "1" ]]; then
  EPOCHS=1
fi

# Tiny matrices: BLAS threads only add overhead, and two runs share the machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

exec python "$(dirname "${BASH_SOURCE[0]}")/train.py" \
  --depth "$DEPTH" --width "$WIDTH" --epochs "$EPOCHS" --lr "$LR" \
  --seed "$SEED" --out-dir "$OUT_DIR"
