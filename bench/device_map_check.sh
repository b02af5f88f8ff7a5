#!/usr/bin/env bash
# On a machine with a CUDA GPU and a copy of this working tree (no network needed):
#
#     bash bench/device_map_check.sh [--out-dir DIR]      (default bench/out/device_map_check)
#
# Installs esa from this tree (no dependencies fetched; accelerate must already be installed) and runs
# `python -m bench.device_map_check`: esa baseline and esa perturb on a small random Llama, on one GPU and split
# GPU/CPU with --device-map auto --max-memory 0=<half the weights>,cpu=4GiB, compared; the summary is printed and
# saved as DIR/summary.json. Exit 0 when every check passes. `--cpu` is the dry run without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

"$PYTHON" -c "import accelerate" \
    || { echo "device_map_check: accelerate is not installed (pip install 'accelerate>=1.0')" >&2; exit 3; }
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
    || { echo "device_map_check: 'pip install --no-deps --no-build-isolation -e .' failed (see above)" >&2; exit 3; }
exec "$PYTHON" -m bench.device_map_check "$@"
