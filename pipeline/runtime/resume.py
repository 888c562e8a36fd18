"""Where a training run continues from, and how its state comes back.

Same world size and micro-batch layout: DeepSpeed loads its own state, every rank reads its own
``rank{r}.pt`` (stream cursors, memory, RNG): bitwise the run that was not interrupted.

Another layout (elastic): the streams of all ranks are merged and reassigned by stream id,
memory rows are picked by stream id, ranks that existed keep their RNG. Optimizer state:
stage 0 keeps it whole in rank 0's model file (loads anywhere); ZeRO 1-3 partition it and
DeepSpeed's universal checkpoint re-partitions it; if that conversion fails, a warning and the
weights with a fresh optimizer state.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

from pipeline.config import Config, to_dict
from pipeline.data.shards import Manifest
from pipeline.runtime import checkpoint as ckpt
from pipeline.runtime import distributed
from pipeline.runtime.engine import fast_forward_schedule, retarget_schedule
from pipeline.runtime.rank_state import RankState, load_states

log = logging.getLogger("pipeline.train")


@dataclasses.dataclass
class ResumePoint:
    path: Path
    meta: ckpt.CheckpointMeta
    elastic: bool            # saved with another world size or micro-batch layout
    universal: bool = False  # optimizer state through DeepSpeed's universal checkpoint

    @property
    def step(self) -> int:
        return self.meta.step


def find_resume(cfg: Config, manifest: Manifest, world_size: int) -> Optional[ResumePoint]:
    """The latest checkpoint under ``train.output``, checked against this run; None to start fresh."""
    root = ckpt.root_dir(cfg.train.output)
    tag = ckpt.latest_tag(root)
    if tag is None:
        return None
    if not cfg.train.resume:
        raise ckpt.CheckpointError(f"{root} already holds checkpoints (latest {tag}) and train.resume=false; "
                                   f"resume (train.resume=true) or choose a new train.output")
    path = root / tag
    # DeepSpeed unpickles its files with weights_only=False: rank 0 checks every file first, and
    # every rank raises the same error.
    refused = None
    if distributed.is_main():
        try:
            ckpt.check_plain(path)
        except ckpt.CheckpointError as exc:
            refused = str(exc)
    refused = distributed.broadcast_object(refused)
    if refused:
        raise ckpt.CheckpointError(refused)
    meta = ckpt.load_meta(path)
    ckpt.check_manifest(meta.manifest, manifest, cfg.data.output, path)
    saved = meta.config
    if saved.get("model") != to_dict(cfg.model):
        changes = ckpt.config_changes(saved.get("model", {}), to_dict(cfg.model))
        raise ckpt.CheckpointError(f"the model config differs from checkpoint {path}: {'; '.join(changes)}; "
                                   f"resume with the saved model settings")
    changed = [c for c in ckpt.config_changes(saved, to_dict(cfg)) if not c.startswith("model.")]
    if changed and distributed.is_main():
        log.warning("resuming %s with changed settings: %s", path, "; ".join(changed))
    elastic = (meta.world_size, meta.micro_batches) != (world_size, cfg.train.micro_batches)
    point = ResumePoint(path, meta, elastic)
    if elastic and meta.world_size != world_size:
        _prepare_universal(point, cfg)
    return point


def _prepare_universal(point: ResumePoint, cfg: Config) -> None:
    """Rank 0 converts; every rank learns the outcome (it decides the DeepSpeed config)."""
    if cfg.train.zero_stage == 0:
        return
    result = None
    if distributed.is_main():
        try:
            ckpt.make_universal(point.path)
            result = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure falls back to weights only
            result = f"{type(exc).__name__}: {exc}"
    result = distributed.broadcast_object(result)
    point.universal = result == "ok"
    if not point.universal and distributed.is_main():
        log.warning("could not convert %s to DeepSpeed's universal checkpoint (%s); resuming with the weights "
                    "and a FRESH optimizer state (Adam moments restart)", point.path, result)


def restore(engine, cfg: Config, point: ResumePoint, entries: dict[str, RankState], rank: int,
            n_micro_batches: int) -> None:
    """Load the engine's state, then every entry of this rank's state (``pipeline.runtime.rank_state``)."""
    path, meta = point.path, point.meta
    if not point.elastic:
        engine.load_checkpoint(str(path.parent), tag=path.name)
        own = ckpt.load_rank_file(path, rank)
        files = [own]
    else:
        if point.universal:
            engine.load_checkpoint(str(path), tag=ckpt.UNIVERSAL)
        elif meta.world_size == distributed.get_world_size() or cfg.train.zero_stage == 0:
            engine.load_checkpoint(str(path.parent), tag=path.name)
        else:
            engine.load_checkpoint(str(path.parent), tag=path.name, load_module_only=True,
                                   load_optimizer_states=False, load_lr_scheduler_states=False)
        files = [ckpt.load_rank_file(path, r) for r in range(meta.world_size)]
        own = files[rank] if rank < len(files) else None
        if rank == 0:
            log.warning("elastic resume: %d ranks x %d micro-batches -> %d x %d; streams and memory "
                        "reassigned by stream id", meta.world_size, meta.micro_batches,
                        distributed.get_world_size(), n_micro_batches)
    if engine.global_steps != point.step:     # weights-only loads do not restore DeepSpeed's counters
        fast_forward_schedule(engine, point.step)
    changed = retarget_schedule(engine, cfg.train, point.step)
    if changed and rank == 0:
        log.warning("the learning-rate schedule follows this run's config: %s", "; ".join(changed))
    load_states(entries, files, own, point.elastic, str(path))
