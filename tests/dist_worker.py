"""One rank of the two-process test of pipeline.runtime.distributed's helpers (env-var launch, gloo).

Prints one JSON line with what this rank saw. Rank 1 signals itself (SIGUSR1) before step 3;
both ranks must stop at step 3.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.runtime import distributed  # noqa: E402


def main() -> int:
    env = distributed.init_distributed()
    rank = env.rank
    out = {"rank": rank, "world": distributed.get_world_size(), "is_main": distributed.is_main()}
    out["sum_float"] = distributed.all_reduce_sum(float(rank + 1))
    out["sum_list"] = distributed.all_reduce_sum([rank, 1.5])
    t = torch.tensor([[rank, 2 * rank]], dtype=torch.float32)
    summed = distributed.all_reduce_sum(t)
    out["sum_tensor"] = summed.tolist()
    out["tensor_untouched"] = t.tolist()
    out["broadcast"] = distributed.broadcast_object({"run_id": "abc123", "from": rank} if rank == 0 else None)
    stop_step = None
    with distributed.StopSignal() as stop:
        for step in range(20):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if stop.should_stop():
                stop_step = step
                break
        out["local_flag"] = stop.requested
    out["stop_step"] = stop_step
    out["requeued"] = distributed.requeue()  # not under SLURM: False, nothing run
    print(json.dumps(out), flush=True)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
