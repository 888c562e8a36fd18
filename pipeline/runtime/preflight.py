"""What a cluster script checks on the batch host before it starts any task (or, for
``cluster/pipeline.sh``, on the login node before it submits anything):

    python -m pipeline.runtime.preflight STAGE --ntasks N --config F [key=value ...]

STAGE is prepare, train, evaluate, export or pipeline (the chain: every stage's checks that can
be made before prepare has run; with ``--skip-prepare`` the shards must exist already). Each problem
is one line naming the key, the path and the fix; exit 2 when there is any. A failure here costs a
second on one host instead of N tasks importing DeepSpeed to find the same thing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from pipeline.common import XlpipeError
from pipeline.config import Config, check_values, is_shard_url, load_config

STAGES = ("prepare", "train", "evaluate", "export", "pipeline")


def _writable(path: Path, key: str) -> Optional[str]:
    """``path`` can be created (its nearest existing parent is a writable directory)."""
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"{key}={path}: {parent} is not a writable directory; point {key} somewhere this job may write"
    return None


def _shards(cfg: Config) -> Optional[str]:
    where = cfg.data.output
    if is_shard_url(where):        # checked by sha256 as each rank stages it
        return None
    manifest = Path(where) / "manifest.json"
    if not manifest.is_file():
        return (f"data.output={where}: no manifest.json there (not prepared, or a wrong path); run "
                f"cluster/prepare.sh (or cluster/pipeline.sh without SKIP_PREPARE) first, or fix data.output")
    if not os.access(manifest, os.R_OK) or not os.access(where, os.R_OK | os.X_OK):
        return f"data.output={where}: the shard directory is not readable by this job (check its permissions)"
    return None


def _divides(n: int, key: str, ntasks: int, per_task: int = 1) -> Optional[str]:
    if n % (ntasks * per_task):
        what = f"{ntasks} tasks x {per_task} micro-batches" if per_task > 1 else f"{ntasks} tasks"
        return (f"{key}={n} does not split over {what}: ask for a task count that divides it "
                f"(--nodes x --ntasks-per-node) or set {key} to a multiple of {ntasks * per_task}")
    return None


def problems(stage: str, cfg: Config, ntasks: int, skip_prepare: bool = False) -> list[str]:
    """Every problem a stage would meet at once; [] when it may start."""
    check_values(cfg)
    found: list[Optional[str]] = []
    t, e = cfg.train, cfg.eval
    if stage in ("prepare", "pipeline") and not (stage == "pipeline" and skip_prepare):
        if cfg.data.path and not any(Path(p).exists() for p in _globs(cfg.data.path)):
            found.append(f"data.path={cfg.data.path}: nothing there to prepare; point data.path at the corpus")
        if is_shard_url(cfg.data.output):
            found.append(f"data.output={cfg.data.output}: prepare writes locally; set a local directory "
                         f"and upload it afterwards")
        else:
            found.append(_writable(Path(cfg.data.output), "data.output"))
    if stage in ("train", "evaluate", "export") or (stage == "pipeline" and skip_prepare):
        found.append(_shards(cfg))
    if stage == "train":
        found.append(_divides(t.n_streams, "train.n_streams", ntasks, t.micro_batches))
    if stage in ("train", "pipeline"):
        found.append(_writable(Path(t.output), "train.output"))
    if stage == "evaluate":
        found.append(_divides(e.n_streams, "eval.n_streams", ntasks))
    if stage in ("evaluate", "export"):
        key, source = ("eval.source", e.source) if stage == "evaluate" else ("export.source", cfg.export.source)
        where = Path(source or t.output)
        if not where.exists():
            found.append(f"{key or 'train.output'}={where}: no run or checkpoint there; train first, or point "
                         f"{key} at a run directory or a global_stepN checkpoint")
    return [p for p in found if p]


def _globs(path: str) -> list[str]:
    import glob

    return [m for part in path.split(",") for m in (glob.glob(part.strip()) or [part.strip()])]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runtime.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--ntasks", type=int, default=int(os.environ.get("SLURM_NTASKS", "1")))
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)   # overrides come after --config F
    try:
        found = problems(args.stage, load_config(args.config, args.overrides), args.ntasks, args.skip_prepare)
    except XlpipeError as exc:      # a config that does not load or validate
        found = [str(exc)]
    for p in found:
        print(f"error ({args.stage}, before any task started): {p}", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
