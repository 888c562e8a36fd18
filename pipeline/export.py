"""Stage 4: a training checkpoint → a plain, DeepSpeed-free export (docs/architecture.md, contract 4).

    python -m pipeline.export --config configs/F.yaml [export.source=RUN_OR_CKPT] [export.output=DIR]

The files and their loader are in ``pipeline.runtime.exports`` (``load_export`` is also importable
from here, the documented path). Consolidation goes through ``deepspeed.utils.zero_to_fp32`` for
ZeRO stages 1-3 (stage 0 keeps whole weights in rank 0's file), see
``pipeline.runtime.checkpoint.consolidated_state_dict``.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import Config, arg_parser, check_values, parse_args
from pipeline.data.remote import shard_dir
from pipeline.data.shards import Manifest
from pipeline.data.tokenizers import load_tokenizer
from pipeline.runtime.exports import (
    check_output,
    consolidate,
    load_export,
    load_weights,
    model_config,
    resolve_checkpoint,
    run_dir_of,
    save_export,
)
from pipeline.runtime.stage import run_stage

__all__ = ["export", "load_export", "main"]   # load_export: the documented path of the loader

log = logging.getLogger("pipeline.export")

def _eval_metrics(run_dir: Path, step: int) -> dict:
    """Metrics of the evaluation reports of this step under ``<run>/eval`` (by split and setting)."""
    out = {}
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            rep = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if rep.get("format") == "xlpipe-eval" and rep.get("checkpoint", {}).get("step") == step:
            for row in rep.get("results", []):
                s = row["settings"]
                out[f"{s['split']}/tgt{s['tgt_len']}-mem{s['mem_len']}-{s['start']}"] = row["metrics"]
    return out


def export(cfg: Config) -> Path:
    """Export ``cfg.export.source`` (default: the latest checkpoint of ``train.output``)."""
    from models import build_model
    from pipeline.runtime import checkpoint as ckpt

    check_values(cfg)
    e = cfg.export
    path = resolve_checkpoint(e.source or cfg.train.output)
    meta = ckpt.load_meta(path)
    shards = shard_dir(cfg.data)       # data.output, or a URL's node-local cache
    manifest = Manifest.load(shards)
    ckpt.check_manifest(meta.manifest, manifest, cfg.data.output, path)
    tokenizer = load_tokenizer(shards, manifest)
    out = Path(e.output) if e.output else run_dir_of(path) / "export" / path.name
    check_output(out, e.overwrite)      # before consolidating: a refused output costs nothing

    t0 = time.perf_counter()
    model = build_model(model_config(meta.config))
    load_weights(model, consolidate(path), f"checkpoint {path}")
    info = {"step": meta.step, "tag": meta.tag, "source": str(path.resolve()),
            "mlflow_run_id": meta.mlflow_run_id, "manifest_sha256": meta.manifest_sha256,
            "corpus": meta.manifest.get("corpus"), "zero_stage": meta.zero_stage,
            "precision": meta.precision, "tokens_seen": meta.tokens_seen,
            "metrics": _eval_metrics(run_dir_of(path), meta.step)}
    info = save_export(model, meta.config, tokenizer, out, info, e.dtype, overwrite=e.overwrite)
    log.info("exported %s (step %d, %s parameters, %s) to %s in %.1fs", path, meta.step, f"{info.n_params:,}",
             e.dtype, out, time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = arg_parser("export", "checkpoint → model.safetensors + config.yaml + tokenizer + export.json (stage 4)")
    cfg, _ = parse_args(parser, argv)
    return run_stage("export", lambda: print(export(cfg)))


if __name__ == "__main__":
    sys.exit(main())
