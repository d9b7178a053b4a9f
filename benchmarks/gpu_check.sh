#!/usr/bin/env bash
# The bench (benchmarks/harness.py) on one NVIDIA GPU, in about 5 minutes (at most 8), offline: this package against transformers
# and timm on the same R50x1 weights, each contender in its own process, batch-16 inference and the batch-16
# training step.
#   1) eager, channels_last, in fp32, TF32 and bf16 (autocast): optimize(compile=False), prepare_for_training(),
#      transformers and timm in channels_last (at most 150 s);
#   2) compiled, in fp32 and bf16: optimize() against timm channels_last compiled, with and without inductor
#      freezing (the frozen rows verified frozen), and prepare_for_training(compile=True) against timm's compiled
#      training step (at most 300 s; the contenders of each workload compile at once).
# Writes one JSON file, $OUT_DIR/gpu_check.json ({"eager": report, "compiled": report}; a stage that did not finish
# is null), and prints both tables.
#
#   bash benchmarks/gpu_check.sh                          # needs an NVIDIA GPU, a CUDA build of torch, transformers, timm
#   PYTHON=/path/to/python OUT_DIR=/tmp bash benchmarks/gpu_check.sh
#
# Exits 2 with one line saying why when there is no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-.}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1  # this checkout; no network

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
for name in ("transformers", "timm", "triton"):
    try:
        __import__(name)
    except ImportError:
        sys.exit(f"gpu_check: {name} is not installed: pip install 'bigtransfer[dev]'")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

start=$(date +%s)
bench() {  # stage name, seconds, bench_models.py options
    local name=$1 seconds=$2
    shift 2
    timeout --kill-after=10 "$seconds" "$PYTHON" benchmarks/bench_models.py --device cuda --workloads infer-b16,train-b16 \
        --rounds 3 --no-onnx --no-pipeline --parallel-builds --json "$OUT_DIR/gpu_check_$name.json" "$@" \
        || echo "gpu_check: the $name stage did not finish (exit $?)" >&2
}
rm -f "$OUT_DIR/gpu_check_eager.json" "$OUT_DIR/gpu_check_compiled.json"
bench eager 150 --precision fp32,tf32,bf16 --no-compile --contenders "optimize(,prepare_for_training(),channels_last"
bench compiled 300 --precision fp32,bf16 \
    --contenders 'optimize(),dtype="bf16"),compile=True,timm channels_last compiled'
"$PYTHON" - "$OUT_DIR" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
stages = {name: out / f"gpu_check_{name}.json" for name in ("eager", "compiled")}
merged = {name: json.loads(path.read_text()) if path.exists() else None for name, path in stages.items()}
(out / "gpu_check.json.tmp").write_text(json.dumps(merged, indent=2) + "\n")
(out / "gpu_check.json.tmp").replace(out / "gpu_check.json")
for path in stages.values():
    path.unlink(missing_ok=True)
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $OUT_DIR/gpu_check.json"
