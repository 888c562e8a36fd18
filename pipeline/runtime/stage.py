"""One runner for every stage entry: logging, error → exit code, process-group teardown.

    def main(argv=None) -> int:
        cfg, _ = parse_args(arg_parser("train", "..."), argv)
        return run_stage("train", lambda: train(cfg))

    if __name__ == "__main__":
        exit_now(main())

A project error (``pipeline.common.XlpipeError``: a config value, file, shard or checkpoint at
fault) is logged as one line and the stage exits 1; anything else is a bug and keeps its traceback.
A stage that may have started a process group leaves it while the interpreter is fully alive and
exits without interpreter teardown (``exit_now``), which keeps gloo's threads from aborting a
finished job.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from typing import Callable, Optional

import torch

from pipeline.common import XlpipeError
from pipeline.runtime import distributed


def setup_logging(stage: str, rank: Optional[int] = None) -> None:
    """``HH:MM:SS stage[rank]: message`` on stderr, INFO on rank 0 and WARNING elsewhere (unless
    the caller configured logging already); DeepSpeed's own INFO chatter is kept at WARNING."""
    rank = distributed.resolve_env().rank if rank is None else rank
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format=f"%(asctime)s {stage}[{rank}]: %(message)s", datefmt="%H:%M:%S")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_stage(stage: str, body: Callable[[], Optional[int]],
              reported: tuple[type[BaseException], ...] = ()) -> int:
    """Run a stage's body: 0 (or the body's own code) on success, 1 after a project error (or one
    of ``reported``, e.g. OSError for a user's file) logged as one line. The process group, if
    any, is left in every case."""
    setup_logging(stage)
    code = 1
    try:
        code = body() or 0
    except (XlpipeError, *reported) as exc:
        logging.getLogger(f"pipeline.{stage}").error("%s", exc)
    finally:
        release_process_group(clean=code == 0)
    return code


def release_process_group(clean: bool = True) -> None:
    """Leave the process group while the interpreter is fully alive.

    DeepSpeed's engine keeps the gloo groups alive through reference cycles; left to interpreter
    shutdown, gloo's worker threads free tensors after Python is gone and the process aborts
    ("terminate called without an active exception", exit -6; seen intermittently on CPU).
    Collecting the cycles first and then destroying the groups avoids that. ``clean=False``
    (an error, perhaps on this rank only) skips the barrier that could wait for a dead peer.
    """
    gc.collect()
    if clean:
        distributed.shutdown()
    elif distributed.is_initialized():
        torch.distributed.destroy_process_group()
    gc.collect()


def exit_now(code: int) -> None:
    """Exit without interpreter teardown once everything is flushed: a last line of defence
    against the gloo teardown abort above turning a finished job into a failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
