"""One rank of the training tests: ``pipeline.train.train(cfg)`` with recording hooks.

    python tests/train_worker.py OUT_PREFIX [--record] [--wait-signal RANK:STEP] -- --config F [k=v ...]

Writes ``OUT_PREFIX.rank{r}.json``: the summary train() returned plus, with ``--record``, what
every micro-batch saw per stream id: ``{step: {stream_id: [mean nll, inputs]}}``.
``--wait-signal R:S``: after step S, rank R writes ``OUT_PREFIX.ready`` (its pid) and blocks until
the test has sent it a signal (``OUT_PREFIX.sent`` appears), so the signal lands mid-run.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import arg_parser, parse_args  # noqa: E402
from pipeline.runtime import distributed  # noqa: E402
from pipeline.runtime.stage import exit_now, release_process_group
from pipeline.train import Hooks, train  # noqa: E402


def main(argv: list[str]) -> int:
    split = argv.index("--")
    ours, stage_args = argv[:split], argv[split + 1:]
    prefix = Path(ours[0])
    record = "--record" in ours
    wait = None
    if "--wait-signal" in ours:
        r, s = ours[ours.index("--wait-signal") + 1].split(":")
        wait = (int(r), int(s))
    cfg, _ = parse_args(arg_parser("train", "test worker"), stage_args)
    env = distributed.init_distributed()
    seen: dict = {}

    def on_micro_batch(step, batch, out):
        per = seen.setdefault(step, {})
        for row, sid in enumerate(batch.stream_ids):
            per[sid] = [float(out.nll[row].detach().double().mean()), batch.inputs[row].tolist()]

    def on_step(step, info):
        if wait and (env.rank, step) == wait:
            prefix.with_suffix(".ready").write_text(json.dumps({"pid": os.getpid(), "step": step}))
            deadline = time.monotonic() + 120
            while not prefix.with_suffix(".sent").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    summary = train(cfg, Hooks(on_micro_batch=on_micro_batch if record else None, on_step=on_step))
    summary["rank"] = env.rank
    summary["world_size"] = env.world_size
    if record:
        summary["seen"] = seen
    path = Path(f"{prefix}.rank{env.rank}.json")
    path.write_text(json.dumps(summary))
    release_process_group()
    return 0


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))   # as `python -m pipeline.train` does
