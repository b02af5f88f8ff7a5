#!/usr/bin/env bash
# The GPU-machine measurements that bench/gpu_check.sh does not take (issue 14 point 7, issue 16), in one call:
#
#     bash bench/gpu_followup.sh [OUT_DIR]        (default bench/out/followup)
#
# Steps, each under its own time limit, each logged to OUT_DIR/<step>.log; a failing step does not stop the next:
#   kernels    pytest tests/test_kernels_moments.py tests/test_scorescan.py, the kernels compiled for this GPU
#   sel_cuda   python -m bench.selection_vs_scoring --device cuda: selection + statistics against scoring at the
#              issue's size (one Llama-3.1-8B-shaped layer, 1.3B float32 parameters, one 128-token window)
#   devmap     bash bench/device_map_check.sh: esa baseline and perturb on one GPU and split GPU/CPU with
#              --device-map auto --max-memory, compared
#   sel_cpu    the same selection benchmark on this machine's CPU cores (about 16 GB of host memory)
# Results: OUT_DIR/selection_vs_scoring_{cuda,cpu}.json, OUT_DIR/device_map/summary.json, the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${1:-bench/out/followup}"
mkdir -p "$OUT_DIR"
export ESA_PROGRESS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" \
    || { echo "gpu_followup: no CUDA device; run it on a machine with one CUDA GPU" >&2; exit 2; }
"$PYTHON" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . \
    || { echo "gpu_followup: 'pip install --no-deps --no-build-isolation -e .' failed (see above)" >&2; exit 3; }

step() {  # step NAME LIMIT_S COMMAND...
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    tail -n 4 "$OUT_DIR/$name.log"
}

step kernels 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_moments.py tests/test_scorescan.py
step sel_cuda 150 "$PYTHON" -m bench.selection_vs_scoring --device cuda
cp bench/out/selection_vs_scoring_cuda.json "$OUT_DIR/" 2>/dev/null
step devmap 150 bash bench/device_map_check.sh --out-dir "$OUT_DIR/device_map"
step sel_cpu "${SEL_CPU_LIMIT:-240}" "$PYTHON" -m bench.selection_vs_scoring --device cpu
cp bench/out/selection_vs_scoring_cpu.json "$OUT_DIR/" 2>/dev/null
exit 0
