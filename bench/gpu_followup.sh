#!/usr/bin/env bash
# The GPU-machine measurements that bench/gpu_check.sh does not take (issue 14 point 7), in one call:
#
#     bash bench/gpu_followup.sh [OUT_DIR]        (default bench/out/followup)
#
# Steps, each under its own time limit, each logged to OUT_DIR/<step>.log; a failing step does not stop the next:
#   kernels    pytest of the one-read scan kernel, the scan and block selection, compiled for this GPU
#   sel_cuda   python -m bench.selection_vs_scoring --device cuda: selection + statistics against scoring at the
#              issue's size (one Llama-3.1-8B-shaped layer, 1.3B float32 parameters, one 128-token window)
#   share      python -m bench.selection_share: the same share in a whole esa profile at the runbook's size
#              (random-weight Llama-3.1-8B, bf16, 64 windows of 2048 tokens, grad_x_weight per_layer)
#   share_gl   the same, --mode global
#   sel_cpu    bench.selection_vs_scoring on this machine's CPU cores (about 16 GB of host memory; SEL_CPU=0 skips it)
# Results: OUT_DIR/selection_vs_scoring_{cuda,cpu}.json, OUT_DIR/selection_share_*.json, the logs.
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

step kernels 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_blockscan.py tests/test_scorescan.py
step sel_cuda 150 "$PYTHON" -m bench.selection_vs_scoring --device cuda
cp bench/out/selection_vs_scoring_cuda.json "$OUT_DIR/" 2>/dev/null
step share 150 "$PYTHON" -m bench.selection_share --out-dir "$OUT_DIR/share"
cp "$OUT_DIR/share/selection_share_cuda.json" "$OUT_DIR/selection_share_cuda_per_layer.json" 2>/dev/null
step share_gl 120 "$PYTHON" -m bench.selection_share --mode global --out-dir "$OUT_DIR/share_global"
cp "$OUT_DIR/share_global/selection_share_cuda.json" "$OUT_DIR/selection_share_cuda_global.json" 2>/dev/null
rm -rf "$OUT_DIR/share" "$OUT_DIR/share_global"  # the profile runs themselves (CSV files of a random model)
if [ "${SEL_CPU:-1}" = 1 ]; then
    step sel_cpu "${SEL_CPU_LIMIT:-200}" "$PYTHON" -m bench.selection_vs_scoring --device cpu
    cp bench/out/selection_vs_scoring_cpu.json "$OUT_DIR/" 2>/dev/null
fi
exit 0
