#!/usr/bin/env bash
# Runs every benchmark; each writes its JSON to benchmarks/results/. Not tests: run on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for b in benchmarks/bench_*.py; do
  if [ "$b" = benchmarks/bench_gpu.py ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "== $b: skipped (no CUDA device; it runs on a lent GPU machine)"
    continue
  fi
  echo "== $b"
  "$PY" "$b"
done
