#!/usr/bin/env bash
# `make demo`: the whole pipeline on CPU in about ten minutes, on this Python's standard library
# (configs/demo.yaml): prepare -> train (2 ranks, DeepSpeed ZeRO-2, MLflow in ./mlruns.db) ->
# evaluate valid/test with and without memory (+ eval speed) -> export -> generate -> summary.
# Extra arguments go to every stage as dotted overrides, e.g. `bash scripts/demo.sh train.max_steps=300`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-$(dirname "$PY")/torchrun}
CONFIG=${CONFIG:-configs/demo.yaml}
NPROC=${NPROC:-2}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}   # torch 2.13 vs DeepSpeed deprecation notices
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per rank (torchrun's default, without its banner)
start=$(date +%s)
stage() { printf '\n== %s  (%ds)\n' "$*" "$(( $(date +%s) - start ))"; }

stage "1/6 prepare: stdlib sources -> sentencepiece 4k -> demo/shards"
"$PY" -m pipeline.prepare --config "$CONFIG" "$@"

stage "2/6 train: Transformer-XL on $NPROC CPU ranks, DeepSpeed ZeRO-2, tracked in ./mlruns.db"
"$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m pipeline.train --config "$CONFIG" "$@"

stage "3/6 evaluate valid: memory 0 / 64 / 256 (plot) + eval speed vs the Al-Rfou sliding window"
"$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m pipeline.evaluate --config "$CONFIG" \
  eval.split=valid "eval.mem_lens=[0,64,256]" "$@"

stage "4/6 evaluate test: memory 0 / 256"
"$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m pipeline.evaluate --config "$CONFIG" \
  eval.split=test "eval.mem_lens=[0,256]" "eval.speed.attn_lens=[]" "$@"

stage "5/6 export: ZeRO checkpoint -> model.safetensors + config + tokenizer"
export_dir=$("$PY" -m pipeline.export --config "$CONFIG" export.overwrite=true "$@" | tail -n 1)

stage "6/6 generate: 200 tokens from the export, cached memory"
"$PY" -m pipeline.generate --config "$CONFIG" --export "$export_dir" "$@"

stage "summary"
"$PY" - "$CONFIG" "$export_dir" "$(( $(date +%s) - start ))" "$@" <<'EOF'
import json, sys
from pathlib import Path
from pipeline.config import load_config
from pipeline.runtime.checkpoint import load_meta
from pipeline.runtime.exports import resolve_checkpoint
from pipeline.runtime.tracking import tracking_uri, ui_url

config, export_dir, seconds, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
cfg = load_config(config, overrides)
ckpt = resolve_checkpoint(cfg.train.output)
meta = load_meta(ckpt)
reports = {}
for split in ("valid", "test"):
    found = sorted((ckpt.parent.parent / "eval").glob(f"{split}-{ckpt.name}-*-sweep-*.json"),
                   key=lambda p: p.stat().st_mtime)
    reports[split] = json.loads(found[-1].read_text())
rows = {r["settings"]["mem_len"]: r["metrics"] for r in reports["test"]["results"]}
vrows = {r["settings"]["mem_len"]: r["metrics"] for r in reports["valid"]["results"]}
mem = max(rows)
s = next(r["settings"] for r in reports["test"]["results"] if r["settings"]["mem_len"] == mem)
print(f"model: Transformer-XL, {cfg.model.n_layer} layers, d_model {cfg.model.d_model}, trained {meta.step} steps "
      f"({meta.tokens_seen:,} tokens) on {meta.world_size} ranks, ZeRO-{meta.zero_stage}")
print(f"evaluation: segments of {s['tgt_len']} tokens, memory {mem} with same_length={s['same_length']} and "
      f"warm-started streams, vs none; perplexity per token (bits per byte of source)")
print(f"{'':16}{'valid':>20}{'test':>20}")
for m, label in ((mem, f"memory {mem}"), (0, "no memory")):
    cells = [f"{r[m]['ppl']:7.2f} ({r[m]['bpb']:.3f})" for r in (vrows, rows)]
    print(f"{label:16}{cells[0]:>20}{cells[1]:>20}")
gain = 100 * (1 - rows[mem]["ppl"] / rows[0]["ppl"])
print(f"memory lowers test perplexity by {gain:.1f} %  (valid sweep plot: {reports['valid'].get('plot')})")
for r in reports["valid"].get("speed", {}).get("rows", []):
    print(f"eval speed at attention length {r['attn_len']:>4}: cached memory {r['cached_tokens_per_s']:8,.0f} tok/s, "
          f"sliding window {r['sliding_tokens_per_s']:6,.1f} tok/s -> {r['ratio']:,.0f}x faster")
print(f"export: {export_dir}")
uri = tracking_uri(cfg.tracking)
run_id = meta.mlflow_run_id
if run_id:
    import mlflow
    exp = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    print(f"MLflow: `make ui`, then {ui_url('http://127.0.0.1:5000', exp, run_id)} "
          f"(evaluation runs are nested under it; store {uri})")
print(f"demo took {seconds // 60} min {seconds % 60} s")
EOF
