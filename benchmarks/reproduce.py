"""The seed papers' claims at CPU scale, through the comparison harness (pipeline.compare).

On the standard-library corpus (always here; make demo's shards), eight members of about the
same size trained with the same budget (the Al-Rfou pair: half of it, validated often) and
evaluated the same way, each on two seeds, then five claims checked on each seed
against what was measured (each verdict with its numbers; a claim that does not hold at this scale
says so rather than failing the script):

1. Transformer-XL with memory beats the same model trained without memory (Dai et al. 2019).
2. Its perplexity keeps falling as the evaluation memory grows past the training memory, while
   absolute positions with recurrence do not improve, or get worse (the relative-position ablation).
3. The Al-Rfou auxiliary losses lower the loss early in training against the same model without them.
4. RECL orders Transformer-XL above the same model without recurrence above the Al-Rfou model,
   and places the LSTM.
5. The ∞-former and the Compressive Transformer against Transformer-XL at equal attention cost
   (segment and memory 64 for all three).

    .venv/bin/python benchmarks/reproduce.py      # two seeds; 23 min on 2 cores (AMD EPYC); results/reproduce.json
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = ROOT / "configs" / "compare_stdlib.yaml"
STEPS = 500                  # every member's budget (16 x 64 tokens a step) but the Al-Rfou pair's
EARLY_STEPS = 200            # claim 3 is about early training: the Al-Rfou pair, validated every 25 steps
SEEDS = [1111, 2222]
MEMBERS = [
    ("transformer_xl", []),
    ("no_memory", ["model.mem_len=0"]),
    ("absolute", ["model.attn_type=absolute"]),
    ("compressive", ["model.family=compressive", "model.mem_len=32", "model.compressive.cmem_len=16",
                     "model.compressive.ratio=2"]),         # 32 + 16 compressed rows: under the same 64-key cost
    ("infinite_former", ["model.family=infinite_former", "model.infinite_former.n_basis=64",
                         "model.infinite_former.n_samples=64"]),
    ("alrfou", ["model.family=vanilla", "model.attn_type=learned", "model.mem_len=63",
                f"train.max_steps={EARLY_STEPS}", f"train.save_every={EARLY_STEPS}", "train.eval_every=25"]),
    ("alrfou_plain", ["model.family=vanilla", "model.attn_type=learned", "model.mem_len=63",
                      "model.vanilla.intermediate=false", "model.vanilla.next_next=false",
                      f"train.max_steps={EARLY_STEPS}", f"train.save_every={EARLY_STEPS}", "train.eval_every=25"]),
    # no projection (oneDNN has no LSTMP: slow on CPU); 192 units for about the same size
    ("lstm", ["model.family=lstm", "model.n_layer=2", "model.d_model=192", "model.mem_len=1"]),
]


def members_yaml() -> list[str]:
    items = ",".join("{name: %s, overrides: [%s]}" % (n, ",".join(o)) for n, o in MEMBERS)
    return [f"compare.members=[{items}]"]


def metric_at(run: dict, split: str, mem: int) -> float:
    return next(r["loss"] for r in run["eval"][split] if r["mem_len"] == mem)


def early_loss(run: dict) -> float:
    """Mean validation loss over the first half of training (the points at or before half the budget)."""
    half = run["tokens_seen"] / 2
    points = [loss for tokens, loss in run["valid_curve"] if tokens <= half]
    return sum(points) / len(points) if points else float("nan")


def claims(report: dict) -> list[dict]:
    """Each claim judged on every seed: it holds when it holds for each of them. The numbers are the
    mean over the seeds and, under ``seeds``, every seed's own."""
    seeds = [str(s) for s in report.get("seeds", [None])]
    members = report["members"]

    def run(name: str, seed: str) -> dict:
        return members[name]["seeds"][seed] if "seeds" in members[name] else members[name]

    def recl(name: str, seed: str):
        tables = report.get("recl_seeds") or {seed: report.get("recl", {}).get("table", {})}
        return tables.get(seed, {}).get("models", {}).get(name, {}).get("0.1", {}).get("recl")

    def judge(seed: str) -> list[tuple[bool, dict]]:
        txl, none = run("transformer_xl", seed), run("no_memory", seed)
        out = []
        a, b = metric_at(txl, "valid", 64), metric_at(none, "valid", 0)
        out.append((a < b, {"transformer_xl_valid_loss_mem64": a, "no_memory_valid_loss_mem0": b}))
        rel = [metric_at(txl, "valid", k) for k in (64, 256)]
        ab = [metric_at(run("absolute", seed), "valid", k) for k in (64, 256)]
        out.append((rel[1] < rel[0] and ab[1] >= ab[0] - 1e-3,
                    {"relative_mem64": rel[0], "relative_mem256": rel[1], "absolute_mem64": ab[0],
                     "absolute_mem256": ab[1]}))
        early = [early_loss(run(k, seed)) for k in ("alrfou", "alrfou_plain")]
        out.append((early[0] < early[1], {"with_aux_early_valid_loss": early[0], "without_early_valid_loss": early[1]}))
        r = {k: recl(k, seed) for k in ("transformer_xl", "no_memory", "alrfou", "lstm")}
        out.append((None not in r.values() and r["transformer_xl"] > r["no_memory"] > r["alrfou"], r))
        cost = {k: metric_at(run(k, seed), "valid", 64) for k in ("transformer_xl", "compressive", "infinite_former")}
        out.append((min(cost["compressive"], cost["infinite_former"]) < cost["transformer_xl"], cost))
        return out

    texts = ["Transformer-XL with memory beats the same model trained without memory",
             "relative positions keep improving past the training memory; absolute ones do not",
             "the Al-Rfou auxiliary losses lower the loss early in training (mean valid loss, first half)",
             "RECL (r = 0.1): Transformer-XL > without recurrence > Al-Rfou (LSTM placed)",
             "the ∞-former or the Compressive Transformer beats Transformer-XL at equal attention cost"]
    per_seed = {seed: judge(seed) for seed in seeds}
    out = []
    for i, text in enumerate(texts):
        each = {seed: per_seed[seed][i] for seed in seeds}
        keys = next(iter(each.values()))[1]
        mean = {k: (sum(e[1][k] for e in each.values()) / len(each)
                    if all(isinstance(e[1][k], (int, float)) for e in each.values()) else None) for k in keys}
        out.append({"claim": i + 1, "text": text, "holds": all(ok for ok, _ in each.values()),
                    "holds_per_seed": {seed: ok for seed, (ok, _) in each.items()}, "numbers": mean,
                    "seeds": {seed: numbers for seed, (_, numbers) in each.items()}})
    return out


def main() -> None:
    """``--claims-only``: judge an existing comparison in $XLPIPE_BENCH_DIR again (no training)."""
    work = Path(os.environ.get("XLPIPE_BENCH_DIR", "/tmp/xlpipe-reproduce"))
    overrides = [f"compare.output={work / 'compare'}", f"train.max_steps={STEPS}", f"train.save_every={STEPS}",
                 f"compare.seeds=[{','.join(map(str, SEEDS))}]",
                 # every evaluation memory scores the same tokens, each with a full memory (warm start)
                 "eval.mem_lens=[0,64,256]", "eval.warm_tokens=256", "eval.max_steps=40", "compare.splits=[valid]",
                 "train.eval_every=100", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                 "tracking.system_metrics=false", *members_yaml()]
    tic = time.perf_counter()
    if "--claims-only" not in sys.argv:
        if not (ROOT / "demo" / "shards" / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "pipeline.prepare", "--config", str(CONFIG)], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "-m", "pipeline.compare", "--config", str(CONFIG), *overrides], cwd=ROOT,
                       check=True)
    report = json.loads((work / "compare" / "report.json").read_text())
    verdicts = claims(report)
    for v in verdicts:
        print(f"claim {v['claim']}: {'holds' if v['holds'] else 'does not hold'} — {v['text']}: {v['numbers']}")
    keep = ("family", "parameters", "tokens_seen", "train_seconds", "eval", "valid_curve")
    write_result(RESULTS / "reproduce.json", {
        "benchmark": "reproduce", "machine": machine_info(), "steps": STEPS, "early_steps": EARLY_STEPS,
        "seeds": report.get("seeds"), "seconds": time.perf_counter() - tic, "claims": verdicts,
        "table": (work / "compare" / "report.md").read_text(),
        "members": {k: {x: v[x] for x in keep} for k, v in report["members"].items()},
        "recl": {seed: t for seed, t in report.get("recl_seeds", {}).items()}})
    for name, path in report.get("plots", {}).items():   # the README shows them
        shutil.copyfile(work / "compare" / path, RESULTS / f"reproduce_{name}.png")


if __name__ == "__main__":
    main()
