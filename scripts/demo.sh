#!/usr/bin/env bash
# `make demo`: the pipeline end to end on CPU, on this Python's standard library (configs/demo.yaml).
# Extra arguments go to every stage as dotted overrides, e.g. `bash scripts/demo.sh data.workers=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/demo.yaml}

echo "== prepare: stdlib sources -> sentencepiece 4k -> demo/shards"
"$PY" -m pipeline.prepare --config "$CONFIG" "$@"
