#!/usr/bin/env bash
# The bench on one NVIDIA GPU, in under 5 minutes: this package against transformers and timm on the same R50x1
# weights: batch-16 inference and the training step in fp32, TF32 and bf16 (autocast), eager and channels_last;
# then batch-16 inference compiled (optimize() against timm channels_last + torch.compile) in fp32 and bf16.
# Writes gpu_check_eager.json and gpu_check_compiled.json (under $OUT_DIR) and prints both tables.
#
#   bash benchmarks/gpu_check.sh            # needs: an NVIDIA GPU, a CUDA build of torch, transformers, timm
#   PYTHON=.venv/bin/python OUT_DIR=/tmp bash benchmarks/gpu_check.sh
#
# Exits 2 with one line saying why when there is no usable GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-.}
mkdir -p "$OUT_DIR"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds no device); this check needs one" >&2
    exit 2
fi
"$PYTHON" - <<'PY' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (a CPU-only build, or a driver mismatch)")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
for name in ("transformers", "timm"):
    try:
        __import__(name)
    except ImportError:
        sys.exit(f"gpu_check: {name} is not installed: pip install 'bigtransfer[dev]'")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

start=$(date +%s)
# 1) Eager and channels_last, batch-16 inference and the training step, three precisions (about 1.5 minutes).
timeout 130 "$PYTHON" benchmarks/bench_models.py --device cuda --precision fp32,tf32,bf16 --rounds 3 \
    --workloads infer-b16,train-b16 --no-compile --no-pipeline --json "$OUT_DIR/gpu_check_eager.json"
# 2) Compiled, batch-16 inference, fp32 and bf16: optimize() against timm channels_last + torch.compile
#    (compiles dominate: 30-60 s each).
timeout 160 "$PYTHON" benchmarks/bench_models.py --device cuda --precision fp32,bf16 --rounds 3 \
    --workloads infer-b16 --contenders "bigtransfer optimize(),timm channels_last compiled" --no-pipeline \
    --json "$OUT_DIR/gpu_check_compiled.json"
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT_DIR/gpu_check_eager.json and $OUT_DIR/gpu_check_compiled.json"
