"""Stream reader throughput: tokens/s of ``open_streams`` batches read from real shards, one core.

    .venv/bin/python benchmarks/bench_streams.py [--tokens 20000000] [--dir /tmp/xlpipe-bench-streams]

Writes a generated split (uint16 and uint32, chunks of 2^20 tokens, 4M-token shards) with
``write_shard``, then times full epochs of int64 ``(inputs, targets)`` batches (n_streams 64,
tgt_len 192 by default) including every verified chunk read. Goal: >= 5e7 tokens/s.
Results go to benchmarks/results/streams.json. Numbers on a shared machine are noisy; re-run on a
quiet one before quoting them.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.common import atomic_write_json
from pipeline.data.shards import Manifest, SplitInfo, write_shard  # noqa: E402
from pipeline.data.streams import open_streams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, regressions  # noqa: E402

GOAL = 5e7


def write_split(root: Path, dtype: str, tokens: int, chunk_tokens: int, shard_tokens: int,
                sentences: bool = False) -> float:
    rng = np.random.default_rng(0)
    high = 60_000 if dtype == "uint16" else 250_000
    infos, t0 = [], time.perf_counter()
    for i, lo in enumerate(range(0, tokens, shard_tokens)):
        n = min(shard_tokens, tokens - lo)
        starts = None
        if sentences:   # lm1b-like: ~27 tokens per sentence
            starts = np.unique(np.concatenate([[0], rng.integers(1, n, n // 27)]))
        infos.append(write_shard(root, "train", i, rng.integers(0, high, n).astype(dtype), chunk_tokens, dtype,
                                 sentence_starts=starts))
    Manifest("bench", {"kind": "synthetic", "vocab_size": high}, dtype, chunk_tokens, sentences,
             {"train": SplitInfo(infos)}).save(root)
    return time.perf_counter() - t0


def time_epoch(root: Path, epochs: int, **kw) -> dict:
    t0 = time.perf_counter()
    it = open_streams(root, "train", **kw)
    opened = time.perf_counter() - t0
    steps = it.steps_per_epoch * it.micro_batches * epochs
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        inputs, targets = next(it)
        n += inputs.numel()
    dt = time.perf_counter() - t0
    it.close()
    return {"tokens": n, "batches": steps, "seconds": round(dt, 4), "open_seconds": round(opened, 4),
            "tokens_per_s": n / dt, "meets_goal": n / dt >= GOAL}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000_000)
    ap.add_argument("--n-streams", type=int, default=64)
    ap.add_argument("--tgt-len", type=int, default=192)
    ap.add_argument("--chunk-tokens", type=int, default=1 << 20)
    ap.add_argument("--shard-tokens", type=int, default=1 << 22)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dir", default="", help="where to write the shards (default: a temp dir, removed after)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "streams.json"))
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a case misses the goal or falls under half the committed result (same CPU)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="xlpipe-bench-streams-"))
    common = dict(n_streams=args.n_streams, tgt_len=args.tgt_len)
    cases = [
        ("uint16", "ordered", dict(common)),
        ("uint32", "ordered", dict(common)),
        ("uint32", "long streams: n_streams=8, tgt_len=1536", dict(n_streams=8, tgt_len=1536)),
        ("uint16", "ordered+roll", dict(common, roll=True, seed=1)),
        ("uint16", "ordered, micro_batches=4", dict(common, micro_batches=4)),
        ("uint16", "eval: warm_tokens=1600, drop_last=False", dict(common, warm_tokens=1600, drop_last=False)),
        ("uint16+sentences", "shuffled_sentences", dict(common, mode="shuffled_sentences", seed=1)),
    ]
    results = []
    try:
        written = {}
        for dtype_key, name, kw in cases:
            if dtype_key not in written:
                root = base / dtype_key
                secs = write_split(root, dtype_key.split("+")[0], args.tokens, args.chunk_tokens,
                                   args.shard_tokens, sentences="sentences" in dtype_key)
                written[dtype_key] = root
                print(f"wrote {args.tokens:,} {dtype_key} tokens in {secs:.1f}s", flush=True)
            epochs = 1 if kw.get("drop_last") is False else args.epochs
            res = time_epoch(written[dtype_key], epochs, **kw)
            res.update(dtype=dtype_key, case=name, **{k: v for k, v in kw.items()})
            results.append(res)
            print(f"{dtype_key:18s} {name:42s} {res['tokens_per_s'] / 1e6:8.1f} M tokens/s "
                  f"({res['batches']} batches, open {res['open_seconds']:.3f}s)", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    report = {
        "benchmark": "streams", "goal_tokens_per_s": GOAL, "split_tokens": args.tokens,
        "chunk_tokens": args.chunk_tokens, "shard_tokens": args.shard_tokens, "threads": 1,
        "machine": machine_info() | {"numpy": np.__version__},
        "note": "tokens/s counts input tokens of yielded int64 batches, shard reads and CRC checks included; "
                "measured on a shared machine unless load_avg_1m is low",
        "results": results,
        # tokens/s per case, the names the regression check compares across runs
        "figures": {f"{r['dtype']} {r['case']}": r["tokens_per_s"] for r in results},
    }
    lost = regressions(Path(args.out), report["figures"], {name: GOAL for name in report["figures"]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    for line in lost:
        print(f"regression: {line}", file=sys.stderr)
    if args.check and lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
