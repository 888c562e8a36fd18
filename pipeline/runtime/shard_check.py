"""Every shard a job will read is verified (size and sha256 against the manifest) before it
starts, so a damaged byte stops the job at once, naming the shard, instead of hours into a run
(chunk CRC32s catch it only when that chunk is read). The shards are split between the ranks
(shard i by rank i mod W) and the failures gathered, so the cost is the split's bytes / W per rank
(benchmarks/results/shard_check.json: 0.28 s for a WikiText-103-size split on one rank). Shards
of a URL ``data.output`` are checked instead as each rank stages the ones it reads (data/remote.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.data.shards import REMOTE_MARKER, Manifest, ShardError, verify_shard
from pipeline.runtime import distributed


def verify_splits(shard_dir: str | Path, manifest: Manifest, splits: Sequence[str]) -> int:
    """Verify the shards of ``splits`` across the ranks (a collective); returns this rank's count
    of verified shards. Every rank raises the same ShardError when any shard is damaged."""
    if (Path(shard_dir) / REMOTE_MARKER).is_file():
        return 0    # a URL's cache: each rank verifies the shards it reads as it stages them (data/remote.py)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    shards = [s for name in dict.fromkeys(splits) for s in manifest.split(name).shards]
    mine = shards[rank::world]
    errors = []
    for info in mine:
        try:
            verify_shard(shard_dir, info)
        except ShardError as exc:
            errors.append(str(exc))
    found = [e for part in distributed.all_gather_object(errors) for e in part]
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ShardError(found[0] + more)
    return len(mine)
