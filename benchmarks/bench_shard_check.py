"""What verifying every shard before a job costs, on a WikiText-103-size train split.

Training and evaluation verify the size and sha256 of every shard of the splits they read
(``pipeline.runtime.shard_check.verify_splits``; shard i by rank i mod W). This writes a split
of WikiText-103's size in prepare's format (103,227,021 tokens, uint32 as for its 267,735-word
vocabulary, chunks of 2^20 tokens, ~3.7M tokens per shard as 16 MiB input units give) and times
the verification on one rank from a warm page cache, median of 3, with the implied cost for 8 and
64 ranks (the shards are divided between them) beside a training step's order of magnitude.

    .venv/bin/python benchmarks/bench_shard_check.py   # writes benchmarks/results/shard_check.json
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from machine import machine_info, write_result  # noqa: E402  (benchmarks/machine.py)

RESULT = REPO / "benchmarks" / "results" / "shard_check.json"
WT103_TRAIN_TOKENS = 103_227_021
TOKENS_PER_SHARD = 3_700_000


def main() -> dict:
    from pipeline.data.shards import Manifest, SplitInfo, write_shard
    from pipeline.runtime.shard_check import verify_splits

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        infos, lo, i = [], 0, 0
        while lo < WT103_TRAIN_TOKENS:
            n = min(TOKENS_PER_SHARD, WT103_TRAIN_TOKENS - lo)
            infos.append(write_shard(tmp, "train", i, rng.integers(0, 267_735, n, dtype=np.uint32), 1 << 20,
                                     "uint32"))
            lo, i = lo + n, i + 1
        manifest = Manifest("wt103", {"kind": "word", "vocab_size": 267_735}, "uint32", 1 << 20, False,
                            {"train": SplitInfo(infos)})
        manifest.save(tmp)
        manifest = Manifest.load(tmp)
        size = sum(s.bytes for s in infos)
        verify_splits(tmp, manifest, ["train"])              # warm the page cache
        times = []
        for _ in range(3):
            tic = time.perf_counter()
            verify_splits(tmp, manifest, ["train"])
            times.append(time.perf_counter() - tic)
    one = statistics.median(times)
    result = {
        "what": "verify_splits (size + sha256 of every shard) of a WikiText-103-size train split, one rank",
        "tokens": WT103_TRAIN_TOKENS, "shards": len(infos), "bytes": size,
        "seconds_1_rank": round(one, 3), "mb_per_s": round(size / one / 1e6, 1),
        "seconds_per_rank_at_8_ranks": round(one / 8, 3), "seconds_per_rank_at_64_ranks": round(one / 64, 4),
        "machine": machine_info(),
    }
    return write_result(RESULT, result)


if __name__ == "__main__":
    main()
