#!/usr/bin/env bash
# Runs every benchmark; each writes its JSON to benchmarks/results/. Not tests: run on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for b in benchmarks/bench_*.py; do
  echo "== $b"
  "$PY" "$b"
done
