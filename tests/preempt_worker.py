"""A stand-in training loop for the SLURM preemption test (run under ``srun``, one per rank).

First run: each rank writes ``ready-<rank>.json`` (with its pid) and loops "steps"; the test
sends SIGUSR1 to one rank only. At every step boundary the ranks agree through
``StopSignal.should_stop()``; all write ``stop-<rank>.json`` ("save"), meet at a barrier, rank 0
requeues the job and everybody exits 0. The requeued run (SLURM_RESTART_COUNT=1) writes
``resumed-<rank>.json`` and finishes. ``--no-requeue`` stops after the "save".
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.runtime import distributed  # noqa: E402


def write(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def main(out: Path, requeue: bool = True) -> int:
    env = distributed.init_distributed()
    try:
        return run(env, out, requeue)
    finally:
        distributed.shutdown()


def run(env: distributed.DistEnv, out: Path, requeue: bool, max_steps: int = 600) -> int:
    rank = env.rank
    if env.restart_count > 0:
        total = distributed.all_reduce_sum(1.0)
        write(out / f"resumed-{rank}.json", {"rank": rank, "restart_count": env.restart_count,
                                             "world_size": env.world_size, "ranks_seen": total})
        return 0
    with distributed.StopSignal() as stop:
        write(out / f"ready-{rank}.json", {"rank": rank, "pid": os.getpid()})
        for step in range(max_steps):
            time.sleep(0.05)  # the "work" of one step
            if stop.should_stop():
                received = signal.Signals(stop.received).name if stop.received else None
                write(out / f"stop-{rank}.json", {"rank": rank, "step": step, "received": received,
                                                  "world_size": env.world_size})
                distributed.barrier()  # every rank has "saved" before the requeue
                requeued = stop.requeue() if rank == 0 and requeue else None
                write(out / f"requeue-{rank}.json", {"requeued": requeued})
                return 0
    write(out / f"stop-{rank}.json", {"rank": rank, "step": None, "received": None})
    return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), requeue="--no-requeue" not in sys.argv[2:]))
