"""What ``train.compile`` buys on this machine: tokens/s of the real trainer, compile off vs on.

``python -m pipeline.train`` (DeepSpeed, streams, memory) on the demo's shards and model
(configs/demo.yaml: a 4-layer Transformer-XL, d_model 128, segments and memory of 64 tokens,
16 streams, fp32, ZeRO-2), one rank, once with ``train.compile=false`` and once with ``true``.
tokens/s is what the stage logs per window; windows up to ``--warmup`` steps (compilation and
its recompiles: the empty first memory, the full one) are left out, the median of the rest is
reported, with the compiled run's extra wall time (compilation and recompiles, net of any gain).

    .venv/bin/python benchmarks/bench_compile.py     # writes benchmarks/results/compile.json

Needs demo/shards (``make demo``, or ``python -m pipeline.prepare --config configs/demo.yaml``).
Run it on a quiet machine; ``machine.load_avg_1m`` says how quiet this one was.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine import machine_info, write_result  # noqa: E402  (benchmarks/machine.py)

RESULT = REPO / "benchmarks" / "results" / "compile.json"
CONFIG = REPO / "configs" / "demo.yaml"
LINE = re.compile(r"step (\d+)/\d+ \|.*\| tok/s ([\d,]+)")


def run(compile_: bool, shards: Path, work: Path, steps: int, log_every: int, threads: int) -> dict:
    argv = [sys.executable, "-m", "pipeline.train", "--config", str(CONFIG), f"data.output={shards}",
            f"train.output={work / ('compiled' if compile_ else 'eager')}", f"train.max_steps={steps}",
            f"train.log_every={log_every}", "train.eval_every=0", "train.save_every=0", "tracking.enabled=false",
            f"train.compile={str(compile_).lower()}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_", "RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    tic = time.perf_counter()
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode:
        raise SystemExit(f"train.compile={compile_} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return {"compile": compile_, "windows": [(int(s), float(v.replace(",", ""))) for s, v in
                                            LINE.findall(proc.stdout + proc.stderr)], "wall_s": round(wall, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out (compilation, recompiles)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--shards", default=str(REPO / "demo" / "shards"))
    args = ap.parse_args(argv)
    shards = Path(args.shards)
    if not (shards / "manifest.json").exists():
        raise SystemExit(f"{shards} has no manifest.json: run `make demo` or "
                         f"`python -m pipeline.prepare --config configs/demo.yaml` first, or pass --shards")
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        runs = [run(c, shards, Path(tmp), args.steps, args.log_every, args.threads) for c in (False, True)]
    for r in runs:
        rates = [v for s, v in r["windows"] if s > args.warmup]
        r["tokens_per_s"] = statistics.median(rates)
    eager, compiled = runs
    result = {
        "benchmark": "compile", "device": "cpu", "precision": "fp32", "world_size": 1,
        "model": "configs/demo.yaml (transformer_xl 4 x 128, tgt_len = mem_len = 64, 16 streams, ZeRO-2)",
        "steps": args.steps, "warmup_steps_dropped": args.warmup, "omp_threads": args.threads,
        "runs": runs,
        "speedup_compiled_over_eager": round(compiled["tokens_per_s"] / eager["tokens_per_s"], 3),
        "extra_wall_s_compiled": round(compiled["wall_s"] - eager["wall_s"], 1),
        "machine": machine_info(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return write_result(RESULT, result)


if __name__ == "__main__":
    main()
