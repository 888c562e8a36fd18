#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (a bare CUDA image: its python3 has torch, no
# DeepSpeed or MLflow; only torch and models/ are needed). Each stage is time-boxed so one that
# hangs cannot take the others' results with it; everything lands in $OUT (default /tmp/gpu_out).
#   bench    benchmarks/bench_gpu.py: NVIDIA's WT103-base step, TF32 / AMP fp16 / AMP bf16, Zipf and uniform
#   tests    tests/test_cuda.py: every family's CUDA path against its reference (fp32, bf16, fp16)
#   compile  bench_gpu.py --compile: AMP bf16 eager vs torch.compile, in one process (~80 s of compiling)
#   profile  bench_gpu.py --profile: device busy time per step, kernels per step, the top kernels
#   batch    bench_gpu.py --batch 128: TF32 and AMP bf16 at 4x NVIDIA's batch (is the step launch-bound?)
#   cpu      benchmarks/bench_flops.py on the host's CPU (an Intel Xeon with AMX on the H200 machines seen
#            so far; ours only, 2 threads: the port needs transformers 4.35, which the image lacks)
# STAGES="tests profile" bash benchmarks/run_gpu.sh runs a subset (the first four by default, ~4 min
# on an H200; batch ~1 min, cpu ~2 min more).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
PY=${PY:-python3}
STAGES=" ${STAGES:-bench tests compile profile} "
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; "$PY" -c "import torch; print(torch.__version__, torch.version.cuda)"; } >"$OUT/nvidia_smi.txt" 2>&1
stage() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [[ $STAGES == *" $name "* ]] || return 0
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "$name rc=$?"
}
stage bench 150 "$PY" benchmarks/bench_gpu.py --out "$OUT/gpu_nvidia_h200.json"
stage tests 100 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE -s --junitxml="$OUT/test_cuda.xml"
stage compile 150 "$PY" benchmarks/bench_gpu.py --compile --tokens zipf --precisions amp_bf16 \
  --out "$OUT/gpu_nvidia_h200_compile.json"
stage profile 100 "$PY" benchmarks/bench_gpu.py --profile --tokens zipf --precisions tf32 amp_bf16 --steps 20 \
  --out "$OUT/gpu_nvidia_h200_profile.json"
stage batch 120 "$PY" benchmarks/bench_gpu.py --batch 128 --tokens zipf --precisions tf32 amp_bf16 \
  --out "$OUT/gpu_nvidia_h200_batch128.json"
stage cpu 240 "$PY" benchmarks/bench_flops.py --threads 2 --out "$OUT/flops_gpu_host.json"
for f in "$OUT"/*.log; do echo "== $f"; grep -E "tok/s|passed|failed|Error" "$f" | tail -n 12; done
