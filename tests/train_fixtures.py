"""Real shards and a tiny training config for the training tests (test_train, test_slurm).

The shards come from the real prepare stage: corpus ``text`` over a generated JSONL file,
byte tokenizer. ``launch`` starts ``world`` real processes with plain env vars (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free port).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from corpus_fixtures import sentences

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PY = sys.executable

# A Transformer-XL small enough for a step in milliseconds, with dropout so RNG state matters.
TINY = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.d_head=16", "model.d_inner=64",
    "model.tgt_len=8", "model.mem_len=8", "model.dropout=0.1",
    "train.n_streams=4", "train.max_steps=6", "train.warmup_steps=2", "train.lr=0.003",
    "train.log_every=2", "train.eval_every=0", "train.save_every=3", "train.keep_last=5",
    "train.eval_max_steps=3", "train.eval_tgt_len=0", "train.zero_stage=0", "tracking.enabled=false",
]


def make_shards(root: Path, n_docs: int = 500, extra: Sequence[str] = ()) -> Path:
    """``root/shards`` from a generated JSONL corpus through ``pipeline.prepare`` (``extra``: more
    overrides, e.g. a small ``data.unit_bytes`` for several shards per split)."""
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    lines = sentences(7, n_docs * 4, lo=3, hi=12)
    with open(corpus, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": " ".join(lines[4 * i: 4 * i + 4]) + "\n"}) + "\n")
    out = root / "shards"
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["data.corpus=text", f"data.path={corpus}", f"data.output={out}", "data.workers=1",
                       "data.valid_fraction=0.15", "data.test_fraction=0.05", "tokenizer.kind=byte", *extra])
    prepare(cfg, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MLFLOW_")) and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    env.update(extra or {})
    return env


def launch(world: int, cmd: Sequence[str], cwd: Path, timeout: float = 240, env: Optional[dict] = None,
           wait: bool = True):
    """Start ``world`` ranks of ``cmd``; returns [(returncode, stdout+stderr)] (or the Popens)."""
    port = free_port()
    procs = []
    for r in range(world):
        e = clean_env(env) | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([PY, *cmd], cwd=cwd, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    if not wait:
        return procs
    return finish(procs, timeout)


def finish(procs, timeout: float = 240) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def split_tokens(shards: Path, split: str):
    """Every token of a split, read through the manifest and its shards (numpy array)."""
    from pipeline.data.shards import Manifest, SplitTokens

    reader = SplitTokens(shards, Manifest.load(shards), split)
    try:
        return reader.read(0, len(reader))
    finally:
        reader.close()
