"""Reduced precision through the real trainer on CPU: tokens/s and final loss of bf16 (and fp16)
against fp32 after the same steps.

``python -m pipeline.train`` on bench_train's model and corpus (4 layers, d_model 256, segment and
memory 128, 8 streams, ZeRO-2, 1 rank, every core), once per precision that DeepSpeed's CPU
accelerator reports it supports on this machine (bf16 needs AVX512-BF16 or AMX to be fast; fp16
needs AVX512-FP16/AMX-FP16, absent on AMD EPYC, where it is reported and not run). Same seed, same
batches: the final losses show what the precision costs in the model, the tokens/s what it buys.

    .venv/bin/python benchmarks/bench_precision.py     # writes benchmarks/results/precision.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, prepare_shards, throughput  # noqa: E402
from machine import machine_info, write_result  # noqa: E402


def supported() -> dict[str, bool]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {"fp32": True, "bf16": bool(acc.is_bf16_supported()), "fp16": bool(acc.is_fp16_supported())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision.json"))
    args = ap.parse_args(argv)
    have = supported()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        work = Path(tmp)
        shards = prepare_shards(work)
        for precision, ok in have.items():
            if ok:
                runs[precision] = throughput(1, shards, work, args.steps, args.log_every, args.threads,
                                             extra=(f"train.precision={precision}", "train.seed=1111"),
                                             name=f"-{precision}")
                print(f"{precision}: {runs[precision]['tokens_per_s']:,.0f} tokens/s, "
                      f"final loss {runs[precision]['final_loss']:.4f}", flush=True)
    base = runs["fp32"]
    return write_result(Path(args.out), {
        "benchmark": "precision", "device": "cpu", "steps": args.steps, "supported": have,
        "runs": runs,
        "speed_over_fp32": {p: round(r["tokens_per_s"] / base["tokens_per_s"], 3) for p, r in runs.items()},
        "final_loss_minus_fp32": {p: round(r["final_loss"] - base["final_loss"], 4) for p, r in runs.items()},
        "machine": machine_info(),
        "note": "final_loss is the last logged window's mean training loss (same seed and batches for every run)",
    })


if __name__ == "__main__":
    main()
