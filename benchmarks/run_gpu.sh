#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (a bare CUDA image: its python3 has torch, no
# DeepSpeed or MLflow; only torch and models/ are needed). Each stage is time-boxed so one that
# hangs cannot take the others' results with it; everything lands in $OUT (default /tmp/gpu_out).
#   1. benchmarks/bench_gpu.py: NVIDIA's WT103-base step, TF32 / AMP fp16 / AMP bf16, Zipf and uniform tokens
#   2. tests/test_cuda.py: every family's CUDA path against its reference (fp32, bf16, fp16)
#   3. bench_gpu.py --compile: AMP bf16 eager vs torch.compile, in one process
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; nvidia-smi -q -d CLOCK | head -40; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)"; } \
  >"$OUT/nvidia_smi.txt" 2>&1
timeout "${BENCH_S:-150}" "$PY" benchmarks/bench_gpu.py --out "$OUT/gpu_nvidia_h200.json" >"$OUT/bench.log" 2>&1
echo "bench_gpu rc=$?"
timeout "${TESTS_S:-100}" "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE -s --junitxml="$OUT/test_cuda.xml" \
  >"$OUT/test_cuda.log" 2>&1
echo "test_cuda rc=$?"
timeout "${COMPILE_S:-150}" "$PY" benchmarks/bench_gpu.py --compile --tokens zipf --precisions amp_bf16 \
  --out "$OUT/gpu_nvidia_h200_compile.json" >"$OUT/compile.log" 2>&1
echo "compile rc=$?"
tail -n 15 "$OUT/bench.log" "$OUT/test_cuda.log" "$OUT/compile.log"
