"""Stage 3: perplexity / bits per character with the papers' evaluation settings.

    python -m pipeline.evaluate --config configs/F.yaml [eval.split=test eval.mem_len=640 ...]
    torchrun --nproc_per_node 2 -m pipeline.evaluate --config ...    (streams split over ranks)

What is scored. The split is cut into ``eval.n_streams`` streams (pipeline/data/streams.py); each runs in
segments of ``tgt_len`` tokens carrying its memory (``mem_len``; ``clamp_len`` and ``same_length``
as configured, Dai et al. §3.2: longer memory at test time). Every target of every stream is scored
once; only the split's first token and ``(T - 1) mod n_streams`` tail tokens are not. Warm start
(``warm_tokens``, default = mem_len, NVIDIA's): each stream first runs unscored over the tokens
that precede it, so every scored token has a full memory and the result does not depend on the
number of streams; ``warm_tokens=0`` is the reference's cold start (each stream from empty
memory). Ranks score disjoint blocks of streams; NLL sums and token counts are added across ranks.

Metrics (token-weighted: total NLL / scored tokens, in nats): ``ppl = exp(loss)`` for word-level
and sentencepiece tokens, ``bpc = loss / ln 2`` for char/byte tokens. For sentencepiece also the
per-word perplexity and bits per byte / character of the source text: the mean NLL per scored
token times the split's tokens per word (byte, char), i.e. total NLL / words when every token is
scored; words, characters and bytes of each split are recorded by prepare in the manifest.

Sources (``eval.source``): a run directory (its latest checkpoint), a checkpoint directory, or an
export; the model is rebuilt from the saved resolved config, never from ``--config``'s model
section, and the shards must be the ones it was trained on (manifest sha256).

Outputs: a JSON report (settings, warm/cold, tokens, checkpoint step, manifest hash, metrics) in
``eval.output`` (default ``<run>/eval``); an MLflow run nested under the training run with the
report (and plots) as artifacts; an optional per-token NLL dump (``eval.dump``, .npz); with
``eval.mem_lens`` a sweep and a perplexity-vs-memory plot; with ``eval.speed.attn_lens`` the
eval-speed comparison (pipeline/evaluation/speed.py); with ``eval.recl.sources`` the RECL of that group
(pipeline/evaluation/recl.py). Sources, settings, metrics and the dump are in pipeline/evaluation/sources.py.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from models.diagnostics import attention_metrics
from models.modules.attention import set_memory_kv_cache
from pipeline.common import DTYPES, atomic_write_json, git_commit
from pipeline.config import Config, EvalConfig, arg_parser, check_values, parse_args
from pipeline.data.remote import shard_dir
from pipeline.data.shards import Manifest, SplitTokens
from pipeline.evaluation.sources import (
    EvalError,
    Source,
    headline,
    load_source,
    main_metric,
    metrics,
    resolve_settings,
    score,
    task_metrics,
    write_dump,
)
from pipeline.runtime import distributed
from pipeline.runtime.engine import apply_tf32
from pipeline.runtime.exports import is_export, resolve_checkpoint, run_dir_of
from pipeline.runtime.shard_check import verify_splits
from pipeline.runtime.stage import exit_now, run_stage

log = logging.getLogger("pipeline.evaluate")

FORMAT = "xlpipe-eval"
VERSION = 1
# ----------------------------------------------------------------------------- plots


def plot_sweep(rows: list[dict], metric: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["settings"]["mem_len"] for r in rows]
    ys = [r["metrics"][metric] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(xs, ys, marker="o")
    for x, y in zip(xs, ys):
        ax.annotate(f"{y:.3f}" if metric in ("bpc", "bpb") else f"{y:.2f}", (x, y), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("memory length (mem_len)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- the stage


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _tracker(cfg: Config, source: Optional[Source], rank: int):
    """A Tracker for this evaluation: nested under the training run when that run is in the store."""
    from pipeline.runtime.tracking import Tracker

    tcfg = copy.deepcopy(cfg.tracking)
    parent = source.mlflow_run_id if source is not None else None
    if parent and tcfg.enabled and rank == 0:
        try:
            import mlflow

            from pipeline.runtime.tracking import _quiet_store_logs, tracking_uri

            _quiet_store_logs()
            client = mlflow.MlflowClient(tracking_uri(tcfg))
            tcfg.experiment = client.get_experiment(client.get_run(parent).info.experiment_id).name
        except Exception as exc:  # noqa: BLE001 - another store: a top-level run that names it
            log.warning("training run %s is not in the MLflow store %s (%s); the evaluation run is not nested",
                        parent, tracking_uri(tcfg), type(exc).__name__)
            parent = None
    parent = distributed.broadcast_object(parent)
    return Tracker(tcfg, rank=rank), parent


def evaluate(cfg: Config) -> dict:
    """Run every evaluation ``cfg.eval`` asks for; returns the report (written by rank 0)."""
    check_values(cfg)
    e = cfg.eval
    check_request(e)
    if distributed.resolve_env().world_size > 1:      # torchrun, srun or env vars
        distributed.init_distributed()
    rank = distributed.get_rank()
    device = _device()
    dtype = DTYPES[e.dtype]
    apply_tf32(device.type, e.dtype, e.tf32)     # off by default: reported figures stay strict fp32
    shards = shard_dir(cfg.data)       # data.output, or a URL's node-local cache
    manifest = Manifest.load(shards)
    kind = manifest.tokenizer["kind"]
    if e.perplexity or e.recl.sources:
        verify_splits(shards, manifest, [e.split])     # a damaged shard stops us now, by name
    tic = time.perf_counter()

    source = None
    if e.perplexity or e.speed.attn_lens:
        source = load_source(e.source or cfg.train.output, manifest, cfg.data.output, device, dtype)
        set_memory_kv_cache(source.model, e.kv_cache)

    report: dict = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "command": " ".join(sys.argv), "git_commit": git_commit(),
                    "world_size": distributed.get_world_size(), "device": str(device), "dtype": e.dtype,
                    "kv_cache": e.kv_cache,
                    "manifest": {"sha256": manifest.sha256(), "corpus": manifest.corpus, "tokenizer": kind},
                    "results": []}
    if source is not None:
        report["source"] = source.describe()
        report["checkpoint"] = {"step": source.step, "tag": source.tag}
    split = manifest.split(e.split)
    report["split"] = {"name": e.split, "tokens": split.total_tokens, "text": split.text}

    rows = []
    if e.perplexity:
        mem_lens = list(e.mem_lens) or [None]
        reset = cfg.train.document_reset if e.document_reset is None else e.document_reset
        if reset and not manifest.boundaries:
            raise EvalError(f"eval.document_reset=true (or train.document_reset) but the shards of {cfg.data.output} "
                            f"record no document starts; set eval.document_reset=false or prepare with them")
        # every setting refused before any work
        plan = [resolve_settings(e, source.model, m) | {"document_reset": reset} for m in mem_lens]
        for m, settings in zip(mem_lens, plan):
            res = score(source, shards, manifest, settings, device, dump=bool(e.dump) and m == mem_lens[0],
                        attention_buckets=e.attention_buckets)
            row = {"name": f"mem{settings['mem_len']}", "settings": settings,
                   "metrics": metrics(res["nll_sum"], res["tokens"], kind, split.total_tokens, split.text)
                   | task_metrics(manifest, res),
                   **{k: res[k] for k in ("nll_sum", "tokens", "unscored_tokens", "seconds", "tokens_per_s")}}
            if res["attention"] is not None:
                row["attention"] = res["attention"]
            rows.append(row)
            if rank == 0:
                log.info("%s | tgt %d mem %d | %s start | %s tokens | %s | %.0f tok/s", e.split,
                         settings["tgt_len"], settings["mem_len"], settings["start"], f"{res['tokens']:,}",
                         headline(row["metrics"]), res["tokens_per_s"])
                shares = row.get("attention", {}).get("regions")
                if shares:
                    log.info("attention: %s", " | ".join(f"{r} {v:.3f}" for r, v in shares.items()))
            if "dump" in res and res["dump"] is not None:
                tokens = SplitTokens(shards, manifest, e.split)
                try:
                    ids = tokens.read(0, split.total_tokens)
                finally:
                    tokens.close()
                row["dump"] = str(write_dump(e.dump, res["dump"], ids, settings, source))
        report["results"] = rows
        report["settings"] = rows[0]["settings"]
    else:
        report["settings"] = {"split": e.split}

    if e.speed.attn_lens and rank == 0:
        from pipeline.evaluation.speed import format_rows, measure

        s = e.speed
        report["speed"] = measure(source.model, s.attn_lens, s.tgt_len or e.tgt_len or source.model.cfg.tgt_len,
                                  s.batch_size, s.cached_tokens, s.sliding_windows, s.repeats, device=device)
        log.info("eval speed (per token, cached memory vs Al-Rfou sliding window):\n%s", format_rows(report["speed"]))

    out_dir = Path(e.output) if e.output else (source.report_dir if source is not None else
                                              _report_dir(e.recl.sources[0]))
    stem = _stem(e, source, rows)
    if e.recl.sources and rank == 0:
        report["recl"] = run_recl(cfg, shards, manifest, device, dtype,
                                  out_dir / (f"{stem}-recl.png" if source is not None else f"{stem}.png"))
    distributed.barrier()
    report["seconds"] = time.perf_counter() - tic
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        report["path"] = str(out_dir / f"{stem}.json")
        artifacts = []
        if len(rows) > 1:
            metric = main_metric(kind)
            start = "cold" if e.warm_tokens == 0 else "warm"
            title = (f"{manifest.corpus} {e.split}, step {source.step}: {metric} vs memory "
                     f"(tgt_len {rows[0]['settings']['tgt_len']}, {start} start)")
            png = plot_sweep(rows, metric, title, out_dir / f"{stem}.png")
            report["plot"] = str(png)
            artifacts.append(png)
        if "recl" in report:
            artifacts.append(Path(report["recl"]["plot"]))
        atomic_write_json(report["path"], report)
        artifacts.insert(0, Path(report["path"]))
    else:
        artifacts = []
    _track(cfg, source, report, rows, artifacts, rank, kind)
    return report


def check_request(e: EvalConfig) -> None:
    """Fail before any work (and on every rank) when the request cannot run."""
    if not (e.perplexity or e.speed.attn_lens or e.recl.sources):
        raise EvalError("nothing to evaluate: eval.perplexity=false, no eval.speed.attn_lens, no eval.recl.sources")
    r = e.recl
    if r.sources:
        if len(r.contexts) < 2 or sorted(set(r.contexts)) != list(r.contexts) or r.contexts[0] < 1:
            raise EvalError(f"eval.recl.contexts={r.contexts}: give at least two increasing context lengths >= 1")
        if r.names and len(r.names) != len(r.sources):
            raise EvalError(f"eval.recl.names has {len(r.names)} names for {len(r.sources)} sources")
    bad = [a for a in e.speed.attn_lens if a < 2]
    if bad:
        raise EvalError(f"eval.speed.attn_lens={e.speed.attn_lens}: attention lengths must be >= 2")
    # Where the results go is checked now, not after the evaluation has run.
    if e.output and Path(e.output).exists() and not Path(e.output).is_dir():
        raise EvalError(f"eval.output={e.output} is a file, not a directory for the reports; choose a directory")
    if e.dump and Path(e.dump).is_dir():
        raise EvalError(f"eval.dump={e.dump} is a directory; give a file name for the .npz dump")
    for key, value, directory in (("eval.output", e.output, Path(e.output)),
                                  ("eval.dump", e.dump, Path(e.dump).parent)):
        existing = next((p for p in (directory, *directory.parents) if p.exists()), None) if value else None
        if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK)):
            raise EvalError(f"{key}={value}: {existing} is not a writable directory; choose another {key}")


def _report_dir(path: str) -> Path:
    """Where reports of a source go when eval.output is not set: <run>/eval or <export>/eval."""
    return (Path(path) if is_export(path) else run_dir_of(resolve_checkpoint(path))) / "eval"


def _stem(e: EvalConfig, source: Optional[Source], rows: list[dict]) -> str:
    parts = [e.split, source.tag if source is not None else "recl"]
    if rows:
        s = rows[0]["settings"]
        parts.append(f"tgt{s['tgt_len']}")
        parts.append("sweep" if len(rows) > 1 else f"mem{s['mem_len']}")
        parts.append("cold" if e.warm_tokens == 0 else "warm")
    elif e.speed.attn_lens:
        parts.append("speed")
    return "-".join(parts)


def _track(cfg: Config, source: Optional[Source], report: dict, rows: list[dict], artifacts: list[Path],
           rank: int, kind: str) -> None:
    if not cfg.tracking.enabled:
        return
    tracker, parent = _tracker(cfg, source, rank)
    step = source.step if source is not None else 0
    params = {"eval." + k: v for k, v in (rows[0]["settings"] if rows else report["settings"]).items()}
    params |= {"eval.source": report.get("source", {}).get("path", ""), "eval.dtype": cfg.eval.dtype,
               "eval.world_size": report["world_size"]}
    if len(rows) > 1:
        params["eval.mem_lens"] = [r["settings"]["mem_len"] for r in rows]
    name = f"eval-{Path(report.get('path', 'eval')).stem}"
    tracker.start(run_name=name, parent_run_id=parent, params=params,
                  tags={"stage": "evaluate", "source_kind": source.kind if source else "recl",
                        "checkpoint_step": step, "training_run_id": source.mlflow_run_id if source else ""})
    split = cfg.eval.split
    with tracker:
        for i, row in enumerate(rows):
            m = row["metrics"] | {"tokens": row["tokens"], "tokens_per_s": row["tokens_per_s"]}
            if i == 0:
                m |= attention_metrics(row.get("attention") or {})
                tracker.log_metrics({f"{split}_{k}": v for k, v in m.items()}, step)
            if len(rows) > 1:   # the sweep: x = mem_len, so MLflow draws the curve as well
                tracker.log_metrics({f"sweep_{split}_{k}": v for k, v in row["metrics"].items()},
                                    row["settings"]["mem_len"])
        for r in report.get("speed", {}).get("rows", []):
            tracker.log_metrics({"eval_speed_ratio": r["ratio"], "cached_tokens_per_s": r["cached_tokens_per_s"],
                                 "sliding_tokens_per_s": r["sliding_tokens_per_s"]}, r["attn_len"])
        for path in artifacts:
            tracker.log_artifact(path, "eval")
    if rank == 0 and tracker.run_id:
        report["mlflow_run_id"] = tracker.run_id
        atomic_write_json(report["path"], report)


# ----------------------------------------------------------------------------- RECL


def run_recl(cfg: Config, shards: Path, manifest: Manifest, device: torch.device, dtype: torch.dtype,
             plot_path: Path) -> dict:
    """Per-token losses of every model of ``eval.recl.sources`` at ``contexts``, RECL table and plot."""
    from pipeline.evaluation.recl import context_losses, format_table, plot_table, recl_table, sample_positions

    r = cfg.eval.recl
    names = list(r.names) or [_short_name(s) for s in r.sources]
    if len(set(names)) != len(names):
        raise EvalError(f"RECL model names {names} are not unique; set eval.recl.names")
    split = manifest.split(cfg.eval.split)
    tokens = SplitTokens(shards, manifest, cfg.eval.split)
    try:
        ids = tokens.read(0, split.total_tokens).astype(np.int64)
    finally:
        tokens.close()
    positions = sample_positions(len(ids), max(r.contexts), r.positions, seed=0)
    losses, sources = {}, {}
    for name, path in zip(names, r.sources):
        src = load_source(path, manifest, cfg.data.output, device, dtype)
        settings = resolve_settings(cfg.eval, src.model)
        tic = time.perf_counter()
        losses[name] = context_losses(src.model, ids, positions, r.contexts, r.batch_size,
                                      clamp_len=settings.get("clamp_len"), device=device)
        sources[name] = src.describe() | {"clamp_len": settings.get("clamp_len"),
                                          "seconds": time.perf_counter() - tic}
        log.info("RECL: per-token losses of %s at %d contexts x %d positions (%.1fs)", name, len(r.contexts),
                 len(positions), sources[name]["seconds"])
        del src
    table = recl_table(losses, r.ratios, r.threshold)
    text = format_table(table)
    log.info("RECL (%s, %d positions, threshold %g):\n%s", cfg.eval.split, len(positions), r.threshold, text)
    plot = plot_table(table, plot_path)
    mean_loss = {n: {str(c): float(np.mean(v)) for c, v in per.items()} for n, per in losses.items()}
    return {"table": table, "text": text, "plot": str(plot), "sources": sources, "mean_loss": mean_loss,
            "split": cfg.eval.split}


def _short_name(path: str) -> str:
    p = Path(path).resolve()
    if p.name.startswith("global_step"):
        p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return p.name


# ----------------------------------------------------------------------------- entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = arg_parser("evaluate", "perplexity / bpc, eval speed and RECL of a checkpoint or export (stage 3)")
    cfg, _ = parse_args(parser, argv)

    def body() -> None:
        report = evaluate(cfg)
        if distributed.get_rank() == 0:
            print(report["path"])

    return run_stage("evaluate", body)


if __name__ == "__main__":
    exit_now(main())   # skip interpreter teardown after gloo (see pipeline.runtime.stage)
