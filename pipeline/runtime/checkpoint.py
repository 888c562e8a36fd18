"""Training checkpoints (docs/architecture.md, contract 4): DeepSpeed's engine state + our per-rank state.

Layout under ``train.output``::

    checkpoints/
      latest                        the tag of the newest complete checkpoint (moved last)
      global_step{N}/               DeepSpeed's files (engine.save_checkpoint on every rank)
        xlpipe/meta.json            rank 0: step, world size, config, MLflow run id, manifest hash
        xlpipe/rank{r}.pt           rank r: stream cursors, memory rows by stream id, RNG states
        universal/                  made on demand for an elastic resume (ds_to_universal)

Per-rank files exist because DeepSpeed keeps ``client_state`` only in rank 0's model file
(stages 0-2): every rank would get rank 0's memory and RNG back. Writes are atomic: everything
goes into ``checkpoints/.tmp/global_step{N}``; after a barrier rank 0 renames it into place and
then rewrites ``latest``. A crash mid-save leaves the previous checkpoint untouched.

Our files hold only tensors, numbers and strings and load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from pipeline.common import XlpipeError, atomic_write_bytes, atomic_write_json, dataclass_from_json, read_versioned_json
from pipeline.data.shards import Manifest
from pipeline.runtime import distributed

log = logging.getLogger(__name__)

FORMAT = "xlpipe-checkpoint"
VERSION = 1
CKPT_DIR = "checkpoints"
OURS = "xlpipe"               # our sub-directory inside a DeepSpeed tag directory
UNIVERSAL = "universal"       # ds_to_universal output inside a tag directory
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(XlpipeError, RuntimeError):
    """A checkpoint that is missing, incomplete, or does not fit this run."""


def root_dir(output: str | Path) -> Path:
    return Path(output) / CKPT_DIR


def tag_for(step: int) -> str:
    return f"global_step{step}"


def is_complete(ckpt: Path) -> bool:
    """Our meta file and every rank's file are there (a save renames the directory into place only
    then, so anything else is a leftover or was damaged by hand)."""
    meta = ckpt / OURS / "meta.json"
    if not meta.is_file():
        return False
    try:
        world = int(json.loads(meta.read_text()).get("world_size", 0))
    except (OSError, ValueError, AttributeError):
        return False
    return world > 0 and all((ckpt / OURS / f"rank{r}.pt").is_file() for r in range(world))


def list_tags(root: str | Path) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _TAG.match(d.name)
            if m and is_complete(d):
                out.append((int(m.group(1)), d.name))
    return sorted(out)


def latest_tag(root: str | Path) -> Optional[str]:
    """The newest complete checkpoint under ``root``; None when there is none.

    ``root/latest`` is moved last by a save, so a crash between renaming ``global_stepN`` into place
    and rewriting it leaves it one behind: the directories decide, a stale ``latest`` is warned
    about here and rewritten by the next save (``point_latest``)."""
    root = Path(root)
    tags = list_tags(root)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    if not tags:
        if named:
            raise CheckpointError(f"{pointer} names {named!r} but {root} holds no complete checkpoint; "
                                  f"restore it, or remove {pointer} to start afresh")
        return None
    tag = tags[-1][1]
    if named != tag:
        log.warning("%s names %s but the newest complete checkpoint is %s; using %s", pointer,
                    named or "nothing", tag, tag)
    return tag


def point_latest(root: Path, tag: str) -> None:
    """``root/latest`` names ``tag`` (written atomically; DeepSpeed's tools read it too)."""
    pointer = root / "latest"
    if not pointer.is_file() or pointer.read_text().strip() != tag:
        atomic_write_bytes(pointer, (tag + "\n").encode())


# ----------------------------------------------------------------------------- per-rank state


def rng_state() -> dict:
    """python, numpy, torch (and CUDA) generator states as tensors and plain lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            log.warning("checkpoint holds %d CUDA RNG states, this process sees %d devices; restoring the common ones",
                        len(state["cuda"]), torch.cuda.device_count())
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def memory_rows(memories: Sequence[Any], ids: Sequence[Sequence[int]]) -> dict:
    """``{"ids": [...], "fields": {name: tensor}}``: every micro-batch's memory rows, on CPU,
    row i belonging to stream ``ids[i]``."""
    mems = [m.to(device="cpu") for m in memories]
    merged = type(mems[0]).cat(mems)
    flat = [int(i) for block in ids for i in block]
    return {"ids": flat, "fields": merged.state_dict()}


def select_memory(saved: Sequence[dict], ids: Sequence[int], memory_cls: type, device=None, dtype=None):
    """Memory rows of ``ids`` gathered from one or more ranks' ``memory_rows`` (elastic resume)."""
    where: dict[int, tuple[int, int]] = {}
    for k, part in enumerate(saved):
        for row, sid in enumerate(part["ids"]):
            where[sid] = (k, row)
    missing = [i for i in ids if i not in where]
    if missing:
        raise CheckpointError(f"the checkpoint has no memory for stream ids {missing[:8]}"
                              f"{'...' if len(missing) > 8 else ''}; it holds {len(where)} streams")
    rows = []
    for sid in ids:
        k, row = where[sid]
        rows.append(memory_cls.from_state_dict({n: t[row: row + 1] for n, t in saved[k]["fields"].items()}))
    return memory_cls.cat(rows).to(device=device, dtype=dtype)


def _save_torch(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _deepspeed_globals() -> list:
    """The classes DeepSpeed pickles beside tensors, containers and dtypes (found by listing the
    globals of its checkpoints for every ZeRO stage and precision): its loss scalers (fp16/bf16
    optimizer state), the ZeRO stage enum and fragment addresses. Nothing that can run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def check_plain_file(path: Path, allowed: Optional[list] = None) -> None:
    """``path`` unpickles with torch's weights-only unpickler (tensors, containers, numbers,
    strings, and ``allowed``): no global outside that list is ever called. Memory-mapped, so the
    tensors' bytes are not read; a pickle that would run code is refused naming the file."""
    allowed = _deepspeed_globals() if allowed is None else allowed
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)      # a legacy (non-zip) file
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        called = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (f"it calls {called.group(1)}" if called
               else (str(exc).splitlines() or [type(exc).__name__])[0])
        raise CheckpointError(f"{path} is not plain checkpoint data ({why}); loading it could run code "
                              f"from whoever wrote it, so it is refused. Use a checkpoint you trust, or "
                              f"one written by this pipeline") from None


def check_plain(ckpt: Path) -> None:
    """Every torch file of a checkpoint directory (ours, DeepSpeed's, a universal conversion) is
    plain data, before we or DeepSpeed (whose loaders unpickle with ``weights_only=False``) open it."""
    allowed = _deepspeed_globals()
    for path in sorted(Path(ckpt).rglob("*.pt")):
        check_plain_file(path, allowed)


def load_rank_file(ckpt: Path, rank: int) -> dict:
    path = ckpt / OURS / f"rank{rank}.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint {ckpt} is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


@dataclasses.dataclass
class CheckpointMeta:
    """``xlpipe/meta.json`` of a checkpoint: written by rank 0 at every save, read by resume,
    evaluate and export."""

    tag: str
    step: int
    world_size: int
    micro_batches: int
    n_streams: int
    tokens_seen: int
    mlflow_run_id: Optional[str]
    manifest: dict                 # manifest_summary() of the shards trained on
    config: dict                   # the resolved config (pipeline.config.to_dict)
    zero_stage: int
    precision: str
    saved_at: str = ""

    @property
    def manifest_sha256(self) -> str:
        return self.manifest["sha256"]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}


def load_meta(ckpt: Path) -> CheckpointMeta:
    path = ckpt / OURS / "meta.json"
    return dataclass_from_json(CheckpointMeta, read_versioned_json(path, FORMAT, VERSION, CheckpointError),
                               path, CheckpointError)


# ----------------------------------------------------------------------------- manifest identity


def manifest_summary(manifest: Manifest) -> dict:
    """What a checkpoint records about its data, to say what changed when the hash differs."""
    tok = manifest.tokenizer
    return {
        "sha256": manifest.sha256(), "corpus": manifest.corpus, "dtype": manifest.dtype,
        "chunk_tokens": manifest.chunk_tokens, "sentences": manifest.sentences, "options": manifest.options,
        "tokenizer": {k: tok.get(k) for k in ("kind", "sha256", "vocab_size")},
        "splits": {name: {"tokens": s.total_tokens, "shards": len(s.shards),
                          "sha256": [x.sha256 for x in s.shards]} for name, s in manifest.splits.items()},
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if a != b:
        short = lambda v: (repr(v)[:60] + "...") if len(repr(v)) > 60 else repr(v)  # noqa: E731
        return [f"{prefix[:-1]}: {short(a)} -> {short(b)}"]
    return []


def check_manifest(saved: dict, manifest: Manifest, shard_dir: str, ckpt: Path) -> None:
    """``saved`` (a checkpoint's ``manifest_summary``) against the shards at hand, naming what changed."""
    now = manifest_summary(manifest)
    if saved.get("sha256") == now["sha256"]:
        return
    changes = [d for d in _diff(saved, now) if not d.startswith("sha256")]
    raise CheckpointError(f"the shards in {shard_dir} are not the ones checkpoint {ckpt} was trained on "
                          f"(manifest sha256 {saved.get('sha256', '?')[:12]}... -> {now['sha256'][:12]}...); "
                          f"differences: {'; '.join(changes) or 'only the hash'}. Resume with the original "
                          f"shards (data.output) or start a new run (another train.output)")


def config_changes(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every difference of two config dicts."""
    return _diff(saved, current)


# ----------------------------------------------------------------------------- save


def save(engine, output: str | Path, rank_state: dict, meta: CheckpointMeta, keep_last: int) -> Path:
    """Save a complete checkpoint at ``meta.step`` from every rank (a collective); returns its directory."""
    root = root_dir(output)
    tag = meta.tag
    final = root / tag
    rank = distributed.get_rank()
    exists = distributed.broadcast_object((final.exists(), is_complete(final)) if rank == 0 else None)
    if exists[0]:
        if not exists[1]:
            raise CheckpointError(f"{final} exists but is not a complete checkpoint (no meta.json or a rank's "
                                  f"file missing); move it away and train again to save step {meta.step}")
        # Saved already at this step (a periodic save and the final one, or a run that crashed after
        # the rename): the same state, so keep it, and make sure `latest` names it.
        if rank == 0:
            point_latest(root, tag)
            log.info("checkpoint %s exists already (complete); latest -> %s", final, tag)
        distributed.barrier()
        return final
    staging = root / ".tmp"
    if rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # leftovers of a crashed save
        staging.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
    ours = staging / tag / OURS
    ours.mkdir(parents=True, exist_ok=True)
    _save_torch(ours / f"rank{rank}.pt", rank_state)
    if rank == 0:
        stamped = dataclasses.replace(meta, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(ours / "meta.json", stamped.to_json())
    distributed.barrier()
    if rank == 0:
        world = distributed.get_world_size()
        absent = [r for r in range(world) if not (ours / f"rank{r}.pt").is_file()]
        if absent:  # a rank on another node writing elsewhere: the output must be a shared filesystem
            raise CheckpointError(f"{ours} lacks the files of ranks {absent}; train.output must be on a "
                                  f"filesystem every node shares")
        os.replace(staging / tag, final)
        for script in staging.glob("*.py"):          # DeepSpeed's zero_to_fp32.py & co, beside the tags
            os.replace(script, root / script.name)
        point_latest(root, tag)
        prune(root, keep_last, keep=tag)
    distributed.barrier()
    return final


def prune(root: Path, keep_last: int, keep: str) -> list[str]:
    """Delete all but the newest ``keep_last`` checkpoints (never ``keep``, the latest)."""
    if keep_last <= 0:
        return []
    tags = [t for _, t in list_tags(root)]
    doomed = [t for t in tags[:-keep_last] if t != keep]
    for t in doomed:
        shutil.rmtree(root / t, ignore_errors=True)
    if doomed:
        log.info("removed old checkpoints %s (train.keep_last=%d)", ", ".join(doomed), keep_last)
    return doomed


# ----------------------------------------------------------------------------- universal (elastic)


def universal_dir(ckpt: Path) -> Path:
    return ckpt / UNIVERSAL


def make_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint for another world size with DeepSpeed's ``ds_to_universal``
    (once; later calls reuse it). Call on one rank."""
    out = universal_dir(ckpt)
    if (out / "zero").is_dir() and (out / ".complete").is_file():
        return out
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    check_plain(ckpt)                    # ds_to_universal unpickles with weights_only=False
    tmp = ckpt / f".{UNIVERSAL}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    try:
        ds_to_universal.main(args)
        (tmp / ".complete").touch()
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- weights


def consolidated_state_dict(ckpt: str | Path) -> dict:
    """The full fp32 model state dict of a checkpoint directory, whatever its ZeRO stage
    (stages 1-3 through DeepSpeed's zero_to_fp32, from the fp32 master partitions; stage 0 keeps
    whole weights in rank 0's file: with bf16/fp16 those are the half-precision module weights)."""
    ckpt = Path(ckpt)
    check_plain(ckpt)                    # zero_to_fp32 unpickles with weights_only=False
    if load_meta(ckpt).zero_stage == 0:
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
