"""One rank of the export tests: a DeepSpeed engine loads a training checkpoint and writes its
log-probabilities on a fixed batch (two segments, the second with the first's memory).

    python tests/export_worker.py OUT.npy -- --config F [k=v ...]     (every rank; rank 0 writes)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import build_model  # noqa: E402
from pipeline.config import arg_parser, parse_args  # noqa: E402
from pipeline.data.shards import Manifest  # noqa: E402
from pipeline.runtime import distributed  # noqa: E402
from pipeline.runtime.engine import build_engine  # noqa: E402
from pipeline.runtime.exports import resolve_checkpoint  # noqa: E402
from pipeline.runtime.stage import exit_now, release_process_group
from pipeline.train import resolve_config  # noqa: E402


def fixed_batch(n_token: int) -> torch.Tensor:
    """[2 segments, 3 rows, 12 tokens], the same in every process."""
    return torch.randint(0, n_token, (2, 3, 12), generator=torch.Generator().manual_seed(123))


def main(argv: list[str]) -> int:
    split = argv.index("--")
    out = Path(argv[0])
    cfg, _ = parse_args(arg_parser("export-worker", "test worker"), argv[split + 1:])
    env = distributed.init_distributed()
    cfg = resolve_config(cfg, Manifest.load(cfg.data.output), cfg.data.output)
    engine, _ = build_engine(cfg, build_model(cfg.model), env.world_size)
    path = resolve_checkpoint(cfg.train.output)
    engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.eval()
    ids = fixed_batch(cfg.model.n_token)
    memory = engine.module.init_memory(ids.shape[1])
    logprobs = []
    with torch.no_grad():
        for seg in ids:
            res = engine(seg, None, memory=memory, return_logprobs=True)
            memory = res.memory
            logprobs.append(res.logprobs.float().numpy())
    if env.rank == 0:
        np.save(out, np.stack(logprobs))
    release_process_group()
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))   # as `python -m pipeline.train` does
