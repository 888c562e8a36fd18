"""The seed papers' claims at CPU scale, through the comparison harness (pipeline.compare).

On the standard-library corpus (always here; make demo's shards), eight members of about the
same size trained with the same budget and evaluated the same way, then five claims checked
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

    .venv/bin/python benchmarks/reproduce.py      # ~30 minutes on 2 cores; benchmarks/results/reproduce.json
"""
from __future__ import annotations

import json
import os
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
STEPS = 600
MEMBERS = [
    ("transformer_xl", []),
    ("no_memory", ["model.mem_len=0"]),
    ("absolute", ["model.attn_type=absolute"]),
    ("compressive", ["model.family=compressive", "model.mem_len=32", "model.compressive.cmem_len=16",
                     "model.compressive.ratio=2"]),         # 32 + 16 compressed rows: under the same 64-key cost
    ("infinite_former", ["model.family=infinite_former", "model.infinite_former.n_basis=64",
                         "model.infinite_former.n_samples=64"]),
    ("alrfou", ["model.family=vanilla", "model.attn_type=learned", "model.mem_len=63"]),
    ("alrfou_plain", ["model.family=vanilla", "model.attn_type=learned", "model.mem_len=63",
                      "model.vanilla.intermediate=false", "model.vanilla.next_next=false"]),
    ("lstm", ["model.family=lstm", "model.n_layer=2", "model.d_model=256", "model.lstm.proj_size=128",
              "model.mem_len=1"]),
]


def members_yaml() -> list[str]:
    items = ",".join("{name: %s, overrides: [%s]}" % (n, ",".join(o)) for n, o in MEMBERS)
    return [f"compare.members=[{items}]"]


def metric_at(member: dict, split: str, mem: int) -> float:
    return next(r["loss"] for r in member["eval"][split] if r["mem_len"] == mem)


def claims(report: dict) -> list[dict]:
    m = report["members"]
    out = []

    def claim(n, text, ok, numbers):
        out.append({"claim": n, "text": text, "holds": bool(ok), "numbers": numbers})

    txl, none = m["transformer_xl"], m["no_memory"]
    a, b = metric_at(txl, "valid", 64), metric_at(none, "valid", 0)
    claim(1, "Transformer-XL with memory beats the same model trained without memory", a < b,
          {"transformer_xl_valid_loss_mem64": a, "no_memory_valid_loss_mem0": b})
    rel = [metric_at(txl, "valid", k) for k in (64, 256)]
    ab = [metric_at(m["absolute"], "valid", k) for k in (64, 256)]
    claim(2, "relative positions keep improving past the training memory; absolute ones do not",
          rel[1] < rel[0] and ab[1] >= ab[0] - 1e-3,
          {"relative_mem64": rel[0], "relative_mem256": rel[1], "absolute_mem64": ab[0], "absolute_mem256": ab[1]})
    early = [m[k]["valid_curve"][0][1] if m[k]["valid_curve"] else float("nan") for k in ("alrfou", "alrfou_plain")]
    claim(3, "the Al-Rfou auxiliary losses lower the loss early in training", early[0] < early[1],
          {"with_aux_first_valid_loss": early[0], "without_first_valid_loss": early[1]})
    recl = report.get("recl", {}).get("table", {}).get("models", {})
    r = {k: recl.get(k, {}).get("0.1", {}).get("recl") for k in ("transformer_xl", "no_memory", "alrfou", "lstm")}
    ok = None not in r.values() and r["transformer_xl"] > r["no_memory"] > r["alrfou"]
    claim(4, "RECL (r = 0.1): Transformer-XL > without recurrence > Al-Rfou (LSTM placed)", ok, r)
    cost = {k: metric_at(m[k], "valid", 64) for k in ("transformer_xl", "compressive", "infinite_former")}
    claim(5, "the ∞-former and the Compressive Transformer against Transformer-XL at equal attention cost",
          min(cost["compressive"], cost["infinite_former"]) <= cost["transformer_xl"], cost)
    return out


def main() -> None:
    """``--claims-only``: judge an existing comparison in $XLPIPE_BENCH_DIR again (no training)."""
    work = Path(os.environ.get("XLPIPE_BENCH_DIR", "/tmp/xlpipe-reproduce"))
    overrides = [f"compare.output={work / 'compare'}", f"train.max_steps={STEPS}", f"train.save_every={STEPS}",
                 "eval.mem_lens=[0,64,256]", "compare.splits=[valid]", "train.eval_every=100",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.system_metrics=false",
                 *members_yaml()]
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
    write_result(RESULTS / "reproduce.json", {
        "benchmark": "reproduce", "machine": machine_info(), "steps": STEPS, "seconds": time.perf_counter() - tic,
        "claims": verdicts, "table": (work / "compare" / "report.md").read_text(),
        "members": {k: {x: v[x] for x in ("family", "parameters", "tokens_seen", "train_seconds", "eval",
                                          "valid_curve")} for k, v in report["members"].items()},
        "recl": report.get("recl", {}).get("text")})


if __name__ == "__main__":
    main()
