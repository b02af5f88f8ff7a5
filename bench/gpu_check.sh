#!/usr/bin/env bash
# One command on a machine with one CUDA GPU and a fresh copy of this working tree (no network needed):
#
#     bash bench/gpu_check.sh [python -m bench gpu-check options, e.g. --budget-s 360 --layers 16]
#
# Stops at once without a CUDA device; otherwise installs esa from this tree without touching the network (the
# machine already holds torch, triton, transformers and the rest) and runs `python -m bench gpu-check`, which
# writes bench/out/gpu_check.json and gpu_check.md and prints the summary. PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m bench gpu-check --check-device "$@"
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
    || { echo "gpu-check: 'pip install --no-deps --no-build-isolation -e .' failed (see above)" >&2; exit 3; }
exec "$PYTHON" -m bench gpu-check "$@"
