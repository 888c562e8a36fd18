"""Compare model families on the same data, budget and evaluation: one report.

    python -m pipeline.compare --config configs/compare_stdlib.yaml [key=value ...]

The config is an ordinary one (``data`` names the prepared shards, ``train`` the shared budget and
recipe, ``eval`` the shared evaluation settings, ``tracking`` the store) plus ``compare``: the
output directory and the members, each a name and the overrides that make it
(``model.family=lstm``, its sizes, ...). For every member, in order: ``pipeline.train`` (as its
own process, its run nested under one MLflow parent run), then ``pipeline.evaluate`` on each of
``compare.splits`` (with ``eval.mem_lens`` if set); then RECL over the group (Dai et al. §4.3);
then ``report.json``, ``report.md`` (a table: parameters, tokens, training time, loss and ppl/bpc
per split and evaluation memory, RECL at each ratio) and plots (validation loss against tokens
seen, from MLflow; the metric against evaluation memory; RECL's gain curves) in
``compare.output``, all logged to the parent run. Training is seeded, so a re-run gives the same
numbers; a finished member (its final checkpoint present) is not trained again. With
``compare.seeds`` every member is trained and evaluated once per seed and the report gives the
mean and each seed's value (the seed-to-seed spread).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from models import build_model
from pipeline.common import XlpipeError, atomic_write_bytes, atomic_write_json
from pipeline.config import Config, arg_parser, check_values, load_config, parse_args
from pipeline.data.remote import shard_dir
from pipeline.data.shards import Manifest
from pipeline.runtime import checkpoint as ckpt
from pipeline.runtime.exports import model_config
from pipeline.runtime.stage import exit_now, run_stage
from pipeline.runtime.tracking import Tracker

log = logging.getLogger("pipeline.compare")
FORMAT, VERSION = "xlpipe-compare", 1


class CompareError(XlpipeError, RuntimeError):
    """A member that cannot be trained or evaluated, or a comparison config that names none."""


def _stage(stage: str, config: str, overrides: Sequence[str], log_path: Path) -> float:
    """``python -m pipeline.<stage>`` in its own process (fresh DeepSpeed and MLflow state); seconds."""
    tic = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        rc = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--config", config, *overrides],
                            stdout=out, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise CompareError(f"{stage} failed (exit {rc}) with overrides {list(overrides)}; its log is "
                           f"{log_path}:\n{tail}")
    return time.perf_counter() - tic


def _parameters(meta_config: dict) -> int:
    """Parameters inference uses (tied ones once; training-only heads such as Al-Rfou's left out)."""
    with torch.device("meta"):
        model = build_model(model_config(meta_config))
    only = tuple(model.training_only)
    return sum(p.numel() for n, p in model.named_parameters() if not (only and n.startswith(only)))


def _valid_curve(tracker: Tracker, run_id: Optional[str], tokens_per_step: float) -> list[list[float]]:
    """``[[tokens seen, valid loss], ...]`` of a training run from the MLflow store."""
    if not tracker.active or not run_id:
        return []
    import mlflow

    client = mlflow.MlflowClient(tracker.uri)
    return [[m.step * tokens_per_step, m.value] for m in sorted(client.get_metric_history(run_id, "valid_loss"),
                                                              key=lambda m: m.step)]


def compare(cfg: Config, config_path: str, overrides: Sequence[str] = ()) -> dict:
    """Train, evaluate and compare every member of ``cfg.compare``; returns the report."""
    check_values(cfg)
    c = cfg.compare
    if not c.members:
        raise CompareError("compare.members is empty: list the members to compare (name + overrides)")
    names = [m.name for m in c.members]
    if len(set(names)) != len(names) or not all(names):
        raise CompareError(f"compare.members need distinct, non-empty names; got {names}")
    if len(set(c.seeds)) != len(c.seeds):
        raise CompareError(f"compare.seeds={list(c.seeds)} repeats a seed: give distinct seeds")
    seeds = list(c.seeds) or [cfg.train.seed]
    out = Path(c.output)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(shard_dir(cfg.data))
    tracker = Tracker(cfg.tracking).start(run_name=cfg.tracking.run_name or "compare", params=cfg,
                                          tags={"stage": "compare", "members": ",".join(names)})
    report: dict = {"format": FORMAT, "version": VERSION, "config": str(config_path), "overrides": list(overrides),
                    "manifest": {"sha256": manifest.sha256(), "corpus": manifest.corpus}, "seeds": seeds,
                    "members": {}, "parent_run_id": tracker.run_id}
    with tracker:
        for member in c.members:
            runs = {seed: _member(cfg, config_path, overrides, member, _run_dir(out, member.name, seed, c.seeds),
                                  seed, tracker) for seed in seeds}
            report["members"][member.name] = _combine(runs)
        if c.recl and cfg.eval.recl.contexts:
            recl = {seed: _recl(config_path, overrides, names,
                                [report["members"][n]["seeds"][str(seed)]["checkpoint"] for n in names],
                                out / ("recl" if not c.seeds else f"recl-seed-{seed}")) for seed in seeds}
            report["recl"] = recl[seeds[0]]
            report["recl_seeds"] = {str(seed): r["table"] for seed, r in recl.items()}
        report["plots"] = _plots(report, out, manifest)
        atomic_write_json(out / "report.json", report)
        atomic_write_bytes(out / "report.md", _markdown(report).encode())
        for name in ["report.json", "report.md", *report["plots"].values()]:
            tracker.log_artifact(out / name)
    log.info("comparison of %s written to %s", ", ".join(names), out / "report.md")
    return report


def _run_dir(out: Path, name: str, seed: int, seeds: Sequence[int]) -> Path:
    """``<output>/<name>`` with the config's own seed; ``<output>/<name>/seed-<s>`` with compare.seeds."""
    return out / name / f"seed-{seed}" if seeds else out / name


def _member(cfg: Config, config_path: str, overrides: Sequence[str], member, run: Path, seed: int,
            tracker: Tracker) -> dict:
    common = [*overrides, *member.overrides, f"train.output={run}", f"train.seed={seed}"]
    # A member may change the budget itself (train.max_steps=...): its final checkpoint is its own.
    own = load_config(config_path, common)
    final = run / "checkpoints" / ckpt.tag_for(own.train.max_steps)
    timing = run / "train_seconds.json"
    if not (final / "xlpipe" / "meta.json").is_file():
        seconds = _stage("train", config_path, [*common, f"tracking.run_name={member.name}-seed{seed}",
                                                f"tracking.parent_run_id={tracker.run_id or ''}"],
                         run / "train.log")
        atomic_write_json(timing, {"seconds": seconds})
        log.info("%s (seed %d): trained in %.0fs", member.name, seed, seconds)
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    meta = ckpt.load_meta(final)
    rows = {}
    for split in cfg.compare.splits:
        _stage("evaluate", config_path, [*common, f"eval.split={split}", f"eval.source={final}",
                                         f"eval.output={run / 'eval'}", "eval.recl.sources=[]"], run / "eval.log")
        reports = sorted((run / "eval").glob(f"{split}-*.json"), key=lambda p: p.stat().st_mtime)
        if not reports:
            raise CompareError(f"{member.name}: the evaluation of {split} wrote no report under {run / 'eval'}")
        rows[split] = [{"mem_len": r["settings"]["mem_len"], **r["metrics"], "tokens": r["tokens"]}
                       for r in json.loads(reports[-1].read_text())["results"]]
    t = meta.config["train"]
    tokens_per_step = t["n_streams"] * t["tgt_len"]
    return {"run": str(run), "checkpoint": str(final), "family": meta.config["model"]["family"],
            "overrides": list(member.overrides), "parameters": _parameters(meta.config),
            "tokens_seen": meta.tokens_seen, "steps": meta.step, "train_seconds": seconds,
            "mlflow_run_id": meta.mlflow_run_id, "eval": rows,
            "valid_curve": _valid_curve(tracker, meta.mlflow_run_id, tokens_per_step)}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _combine(runs: dict[int, dict]) -> dict:
    """One member over its seeds: the first seed's description, each metric's mean over the seeds
    with every seed's value beside it (``<metric>_seeds``), the mean validation curve, and each
    seed's own result under ``seeds``."""
    first = next(iter(runs.values()))
    member = {k: first[k] for k in ("family", "overrides", "parameters", "tokens_seen", "steps")}
    member["run"], member["checkpoint"], member["mlflow_run_id"] = first["run"], first["checkpoint"], \
        first["mlflow_run_id"]
    times = [r["train_seconds"] for r in runs.values()]
    member["train_seconds"] = None if None in times else _mean(times)
    member["eval"] = {}
    for split, rows in first["eval"].items():
        member["eval"][split] = []
        for i, row in enumerate(rows):
            each = [r["eval"][split][i] for r in runs.values()]
            combined = {"mem_len": row["mem_len"], "tokens": row["tokens"]}
            for key, value in row.items():
                if key not in combined and isinstance(value, (int, float)):
                    combined[key] = _mean([e[key] for e in each])
                    combined[f"{key}_seeds"] = [e[key] for e in each]
            member["eval"][split].append(combined)
    curves = [r["valid_curve"] for r in runs.values()]
    same_steps = all([p[0] for p in c] == [p[0] for p in curves[0]] for c in curves)
    member["valid_curve"] = ([[p[0], _mean([c[i][1] for c in curves])] for i, p in enumerate(curves[0])]
                             if same_steps else curves[0])
    member["seeds"] = {str(seed): r for seed, r in runs.items()}
    return member


def _recl(config_path: str, overrides: Sequence[str], names: list[str], sources: list[str], out: Path) -> dict:
    _stage("evaluate", config_path, [*overrides, "eval.perplexity=false", f"eval.recl.sources=[{','.join(sources)}]",
                                     f"eval.recl.names=[{','.join(names)}]", f"eval.output={out}",
                                     "tracking.enabled=false"], out.parent / f"{out.name}.log")
    report = sorted(out.glob("*.json"), key=lambda p: p.stat().st_mtime)[-1]
    return json.loads(report.read_text())["recl"]


def _metric(rows: list[dict]) -> str:
    return "bpc" if rows and "bpc" in rows[0] and "ppl" not in rows[0] else "ppl"


def _plots(report: dict, out: Path, manifest: Manifest) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    members = report["members"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for name, m in members.items():
        if m["valid_curve"]:
            x, y = zip(*m["valid_curve"])
            ax.plot(x, y, marker="o", ms=3, label=name)
            drawn = True
    if drawn:
        ax.set(xlabel="tokens seen", ylabel="validation loss (nats/token)", title=f"{manifest.corpus}: validation")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "valid_loss.png", dpi=120)
        plots["valid_loss"] = "valid_loss.png"
    plt.close(fig)
    split = next(iter(next(iter(members.values()))["eval"]), None)
    if split is not None:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        metric = _metric(next(iter(members.values()))["eval"][split])
        for name, m in members.items():
            rows = sorted(m["eval"][split], key=lambda r: r["mem_len"])
            x, y = [r["mem_len"] for r in rows], [r[metric] for r in rows]
            # Over several seeds the bars span the lowest and the highest seed.
            spread = [[v - min(r.get(f"{metric}_seeds", [v])) for r, v in zip(rows, y)],
                      [max(r.get(f"{metric}_seeds", [v])) - v for r, v in zip(rows, y)]]
            ax.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=name)
        ax.set(xlabel="evaluation memory (mem_len)", ylabel=f"{split} {metric}", title=f"{manifest.corpus}: {split}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=120)
        plt.close(fig)
        plots["memory"] = "memory.png"
    if "recl" in report and report["recl"].get("plot"):
        plots["recl"] = os.path.relpath(report["recl"]["plot"], out)
    return plots


def _markdown(report: dict) -> str:
    members = report["members"]
    splits = list(next(iter(members.values()))["eval"])
    metric = _metric(next(iter(members.values()))["eval"][splits[0]]) if splits else "ppl"
    head = ["member", "family", "parameters", "tokens", "train s"]
    for split in splits:
        head.append(f"{split} {metric} (mem_len)")
    ratios = report["recl"]["table"]["ratios"] if "recl" in report else []
    head += [f"RECL r={r:g}" for r in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in members.items():
        cells = [name, m["family"], f"{m['parameters']:,}", f"{m['tokens_seen']:,}",
                 "-" if m["train_seconds"] is None else f"{m['train_seconds']:.0f}"]
        for split in splits:
            cells.append(", ".join(f"{_with_spread(r, metric)} ({r['mem_len']})" for r in m["eval"][split]))
        tables = report.get("recl_seeds") or ({"-": report["recl"]["table"]} if "recl" in report else {})
        for r in ratios:
            found = [t["models"].get(name, {}).get(str(r)) for t in tables.values()]
            cells.append("/".join("-" if res is None else ("≥" if res["capped"] else "") + str(res["recl"])
                                  for res in found))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = report.get("seeds", [])
    spread = (f" Over seeds {', '.join(map(str, seeds))}: each value is the mean ± half the range between the "
              f"seeds; RECL gives each seed's value." if len(seeds) > 1 else "")
    return (f"# Comparison on {report['manifest']['corpus']}\n\nConfig `{report['config']}`, shards "
            f"{report['manifest']['sha256'][:12]}…, the same budget and evaluation for every member.{spread}\n\n"
            + "\n".join(lines) + "\n")


def _with_spread(row: dict, metric: str) -> str:
    each = row.get(f"{metric}_seeds", [])
    if len(each) < 2:
        return f"{row[metric]:.3f}"
    return f"{row[metric]:.3f} ±{(max(each) - min(each)) / 2:.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = arg_parser("compare", "train and evaluate every member of compare.members on the same data")
    cfg, args = parse_args(parser, argv)
    return run_stage("compare", lambda: compare(cfg, args.config, args.overrides) and 0)


if __name__ == "__main__":
    exit_now(main())
