"""Stage 1: corpus → tokenizer → webdataset shards + manifest.json (docs/architecture.md, contract 1).

    python -m pipeline.prepare --config configs/F.yaml [key=value ...] [--workers N] [--force]

The work is split into *input units* (``pipeline.data.corpora``): shard i of a split holds exactly the
tokens of unit i, so the output is byte-identical for any worker count, job-array split or re-run.
Three steps, which a single run does in order:

1. ``--stage tokenizer``: count the vocabulary (in parallel over units, merged in corpus order)
   or train sentencepiece, and write ``tokenizer.json`` (+ ``tokenizer.model``) and a build stamp.
2. ``--stage shards``: encode units into ``{split}/shard-%06d.tar``, each followed by its sidecar
   ``shard-%06d.json`` (fingerprint of inputs and options + sha256). A re-run skips shards whose
   sidecar matches and whose sha256 verifies, and rebuilds the rest (``--force``: all).
3. ``--stage merge`` (or ``--merge``): check that every shard exists and verifies, write
   ``manifest.json``.

On SLURM, a job array where task t of T encodes a contiguous, disjoint range of units
(``--task-id/--num-tasks``, by default from SLURM_ARRAY_TASK_ID/COUNT), then the merge:

    sbatch --array=0-7 ... python -m pipeline.prepare --config F     # stage shards implied
    python -m pipeline.prepare --config F --merge                    # afterok the array

Array task 0 builds a missing or stale tokenizer first while the others wait for it
(``--tokenizer-wait``; they fail at once if task 0 fails). To keep the array from idling
meanwhile, run ``--stage tokenizer`` as a job of its own before the array.

This module holds the shard and merge steps and the entry points; the tokenizer step is in
``pipeline.data.prepare.tokenizer``, unit reading/encoding and the worker pool in ``pipeline.data.prepare.units``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import Config, arg_parser, check_values, is_shard_url, parse_args
from pipeline.data.corpora import SPLITS, Corpus, CorpusError, Unit, open_corpus
from pipeline.data.prepare.tokenizer import TokenizerSpec, resolve_tokenizer, tokenizer_step
from pipeline.data.prepare.units import (
    PrepareError,
    cpu_count,
    encode_task,
    map_ordered,
    progress_bar,
    sha_json,
    sidecar_path,
)
from pipeline.data.shards import (
    MANIFEST,
    Manifest,
    ShardError,
    ShardInfo,
    SplitInfo,
    shard_name,
    token_dtype,
    verify_shard,
)
from pipeline.data.tokenizers import Tokenizer
from pipeline.runtime.stage import run_stage

log = logging.getLogger("xlpipe.prepare")
STAGES = ("auto", "all", "tokenizer", "shards", "merge")
_TEMP = re.compile(r"^\..+\.tmp\d+$")      # atomic_write_* temp files: .<name>.tmp<pid>


# ----------------------------------------------------------------------------- shards step


def unit_fingerprints(corpus: Corpus, plan: dict[str, list[Unit]], entry: dict, chunk_tokens: int,
                      dtype: str) -> dict[tuple[str, int], str]:
    common = {"corpus": corpus.name, "options": corpus.options(), "tokenizer": entry["files"],
              "chunk_tokens": chunk_tokens, "dtype": dtype}
    if corpus.records_documents:     # shards with starts.npy differ from those written before it
        common["documents"] = True
    return {(u.split, u.index): sha_json({**common, "split": u.split, "index": u.index,
                                          "unit": corpus.identity(u)})
            for s in SPLITS for u in plan[s]}


def check_unit(out: Path, unit: Unit, fingerprint: str, hash_check: bool = True) -> tuple[Optional[dict], str]:
    """(sidecar, "") when the unit's shard is done and verifies, else (None, why not)."""
    side = sidecar_path(out, unit)
    if not side.is_file():
        return None, "missing"
    try:
        rec = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None, "unreadable sidecar"
    if rec.get("fingerprint") != fingerprint:
        return None, "stale (built from other inputs or options)"
    if rec.get("shard") is None:
        return rec, ""
    if rec["shard"].get("text") is None:
        return None, "stale (no text statistics: written by an older prepare)"
    if hash_check:
        try:
            verify_shard(out, ShardInfo(**rec["shard"]))
        except ShardError as exc:
            return None, f"corrupt ({exc})"
    return rec, ""


def task_units(plan: dict[str, list[Unit]], task_id: int, num_tasks: int) -> list[Unit]:
    """Task t's contiguous range of all units (in split order), balanced by bytes."""
    if not 0 <= task_id < num_tasks:
        raise PrepareError(f"task id {task_id} is outside 0..{num_tasks - 1}")
    units = [u for s in SPLITS for u in plan[s]]
    total = max(1, sum(u.nbytes for u in units))
    out, before = [], 0
    for u in units:
        if min(num_tasks - 1, (2 * before + u.nbytes) * num_tasks // (2 * total)) == task_id:
            out.append(u)
        before += u.nbytes
    return out


def shards_step(out: Path, corpus: Corpus, tok: Tokenizer, units: list[Unit], fps: dict, *, chunk_tokens: int,
                dtype: str, workers: int, force: bool, progress: Optional[bool]) -> dict:
    """Encode the units whose shards are not done; returns per-split stats and the verified units."""
    todo, stats, verified = [], {s: Counter() for s in SPLITS}, set()
    for u in units:
        rec, why = (None, "forced") if force else check_unit(out, u, fps[(u.split, u.index)])
        if rec is None:
            if why != "missing":
                log.info("%s: %s, rebuilding", shard_name(u.split, u.index), why)
            todo.append(u)
        else:
            verified.add((u.split, u.index))
            stats[u.split].update(kept=1, tokens=(rec["shard"] or {}).get("tokens", 0))
    if todo:
        (out / MANIFEST).unlink(missing_ok=True)
    state = {"corpus": corpus, "tok": tok, "out": str(out), "chunk_tokens": chunk_tokens, "dtype": dtype}
    t0 = time.perf_counter()
    with progress_bar(sum(u.nbytes for u in todo), "encode", progress) as bar:
        results = map_ordered(encode_task, [(u, fps[(u.split, u.index)]) for u in todo], state, workers)
        for u, (info, n, secs) in zip(todo, results):
            stats[u.split].update(written=1, tokens=n, bytes_in=u.nbytes, seconds=secs)
            verified.add((u.split, u.index))
            bar.update(u.nbytes)
    seconds = time.perf_counter() - t0
    for split in SPLITS:
        s = stats[split]
        if s["written"] or s["kept"]:
            rate = f"{s['tokens'] / s['seconds']:,.0f} tokens/s per worker" if s["seconds"] else "nothing encoded"
            log.info("%s: %s tokens, %d shards written, %d verified and kept, %.1f MB read, %s", split,
                     f"{s['tokens']:,}", s["written"], s["kept"], s["bytes_in"] / 1e6, rate)
    encoded = sum(stats[s]["tokens"] for s in SPLITS if stats[s]["written"])
    if todo:
        log.info("encoded %s tokens in %.1fs with %d worker(s): %s tokens/s", f"{encoded:,}", seconds,
                 min(workers, len(todo)), f"{encoded / max(seconds, 1e-9):,.0f}")
    return {"stats": stats, "verified": verified, "seconds": seconds}


# ----------------------------------------------------------------------------- merge step


def merge_step(out: Path, corpus: Corpus, spec: TokenizerSpec, plan: dict[str, list[Unit]], entry: dict,
               fps: dict, *, chunk_tokens: int, dtype: str, trusted: frozenset = frozenset()) -> Manifest:
    """Check every shard (``trusted``: written or verified in this process) and write manifest.json."""
    splits, problems = {}, []
    for split in SPLITS:
        shards = []
        for u in plan[split]:
            rec, why = check_unit(out, u, fps[(split, u.index)], hash_check=(split, u.index) not in trusted)
            if rec is None:
                problems.append(f"{shard_name(split, u.index)}: {why}")
            elif rec["shard"] is not None:
                shards.append(ShardInfo(**rec["shard"]))
        splits[split] = SplitInfo(shards)
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise ShardError(f"{out}: {len(problems)} shard(s) not ready: " + "; ".join(problems[:10]) + more +
                         ". Re-run prepare for them (a single run or the array tasks; finished shards are "
                         "skipped), then merge again")
    for split, info in splits.items():
        if info.total_tokens == 0:
            raise CorpusError(f"{corpus.name}: split {split!r} is empty: its units hold no tokens")
    _remove_stale(out, plan)
    manifest = Manifest(corpus=corpus.name, tokenizer=entry, dtype=dtype, chunk_tokens=chunk_tokens,
                        sentences=corpus.mode == "sentences", documents=corpus.records_documents,
                        scored=corpus.scored, splits=splits,
                        options=json.loads(json.dumps({"corpus": corpus.options(),
                                                       "tokenizer": spec.to_dict()})))
    manifest.save(out)
    return manifest


def _remove_stale(out: Path, plan: dict[str, list[Unit]]) -> None:
    """Shards left by an earlier run with another unit plan (more units, or now-empty units), and
    the temp files of a killed run (every write is a temp file renamed into place, so a temp file
    is never part of the output; at merge time no task is still writing)."""
    for split in SPLITS:
        keep = {shard_name(split, u.index) for u in plan[split]}
        for path in sorted((out / split).glob("shard-*")):
            rel = f"{split}/{path.with_suffix('.tar').name}"
            if rel not in keep and path.suffix in (".tar", ".json"):
                log.info("removing %s (not in the current unit plan)", path)
                path.unlink()
    for path in sorted([*out.glob(".*.tmp*"), *(p for s in SPLITS for p in (out / s).glob(".*.tmp*"))]):
        if _TEMP.match(path.name) and path.is_file():
            log.info("removing %s (left by an interrupted run)", path)
            path.unlink()


# ----------------------------------------------------------------------------- entry points


def prepare(cfg: Config, *, workers: Optional[int] = None, task_id: int = 0, num_tasks: int = 1,
            force: bool = False, stage: str = "auto", progress: Optional[bool] = None,
            tokenizer_wait: float = 0.0) -> Optional[Manifest]:
    """Run prepare's steps for ``stage``; returns the manifest when the merge step ran.

    ``auto``: everything for a single task, only shards for a job-array task. In the shards
    stage, task 0 builds a missing or stale tokenizer and the other tasks wait up to
    ``tokenizer_wait`` seconds for it. ``force`` rebuilds the tokenizer (stages all/tokenizer)
    and this task's shards.
    """
    if stage not in STAGES:
        raise PrepareError(f"stage {stage!r} is unknown; choose one of {STAGES}")
    if stage == "auto":
        stage = "all" if num_tasks == 1 else "shards"
    if stage == "all" and num_tasks != 1:
        raise PrepareError("stage 'all' runs the whole corpus in one task; with --num-tasks > 1 run "
                           "--stage tokenizer, the array (stage shards) and --merge")
    check_values(cfg)
    data = cfg.data
    if workers is not None and workers < 0:
        raise PrepareError(f"--workers={workers} is out of range: it must be >= 0 (0: every CPU)")
    workers = data.workers if workers is None else workers
    workers = cpu_count() if workers == 0 else workers
    if is_shard_url(data.output):
        raise PrepareError(f"data.output={data.output} is a URL; prepare writes locally: set data.output to a local "
                           f"directory, upload that directory (e.g. `aws s3 cp --recursive DIR s3://bucket/shards/`, "
                           f"manifest.json last), then point the later stages' data.output at the URL")
    out = Path(data.output)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"data.output={out} is a file; the shards need a directory: choose another data.output")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare(cfg, out, workers, task_id, num_tasks, force, stage, progress, tokenizer_wait)
    except BaseException:
        if created and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)      # a failed first run leaves no empty output behind
        raise


def _prepare(cfg: Config, out: Path, workers: int, task_id: int, num_tasks: int, force: bool, stage: str,
             progress: Optional[bool], tokenizer_wait: float) -> Optional[Manifest]:
    data = cfg.data
    corpus = open_corpus(data)
    spec = resolve_tokenizer(cfg.tokenizer, corpus)
    plan = corpus.plan()

    if stage == "tokenizer" and task_id != 0:
        log.info("task %d: the tokenizer is built by task 0 only", task_id)
        return None
    tok, entry = tokenizer_step(out, corpus, spec, plan, build=stage in ("all", "tokenizer") or
                                (stage == "shards" and task_id == 0), force=force and stage in ("all", "tokenizer"),
                                workers=workers, progress=progress,
                                wait_s=tokenizer_wait if stage == "shards" else 0.0)
    if stage == "tokenizer":
        return None
    dtype = token_dtype(tok.vocab_size)
    fps = unit_fingerprints(corpus, plan, entry, data.chunk_tokens, dtype)
    trusted: frozenset = frozenset()
    if stage in ("all", "shards"):
        units = task_units(plan, task_id, num_tasks)
        if num_tasks > 1:
            log.info("task %d of %d: %d of %d units", task_id, num_tasks, len(units),
                     sum(len(v) for v in plan.values()))
        res = shards_step(out, corpus, tok, units, fps, chunk_tokens=data.chunk_tokens, dtype=dtype,
                          workers=workers, force=force, progress=progress)
        trusted = frozenset(res["verified"])
    if stage == "shards":
        return None
    manifest = merge_step(out, corpus, spec, plan, entry, fps, chunk_tokens=data.chunk_tokens, dtype=dtype,
                          trusted=trusted)
    for split, info in manifest.splits.items():
        log.info("%s: %s tokens in %d shards, %s bytes", split, f"{info.total_tokens:,}", len(info.shards),
                 f"{sum(s.bytes for s in info.shards):,}")
    log.info("wrote %s (%s, vocab %d, %s)", out / MANIFEST, corpus.name, tok.vocab_size, dtype)
    return manifest


def _array_task() -> tuple[int, int]:
    """(task index, task count) of a SLURM job array, (0, 1) outside one."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" not in env or "SLURM_ARRAY_TASK_COUNT" not in env:
        return 0, 1
    lo, step = int(env.get("SLURM_ARRAY_TASK_MIN", 0)), int(env.get("SLURM_ARRAY_TASK_STEP", 1) or 1)
    return (int(env["SLURM_ARRAY_TASK_ID"]) - lo) // step, int(env["SLURM_ARRAY_TASK_COUNT"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = arg_parser("prepare", "corpus → tokenizer → webdataset shards + manifest.json")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default data.workers; 0: all CPUs)")
    parser.add_argument("--stage", choices=STAGES, default="auto",
                        help="auto: all steps, or only shards inside a job array")
    parser.add_argument("--merge", action="store_true", help="same as --stage merge")
    parser.add_argument("--task-id", type=int, default=None, help="job-array task (default SLURM_ARRAY_TASK_ID)")
    parser.add_argument("--num-tasks", type=int, default=None, help="job-array size (default SLURM_ARRAY_TASK_COUNT)")
    parser.add_argument("--force", action="store_true", help="rebuild instead of verifying what exists")
    parser.add_argument("--tokenizer-wait", type=float, default=6 * 3600.0,
                        help="array tasks other than 0: seconds to wait for task 0 to build the tokenizer")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")
    cfg, args = parse_args(parser, argv)
    env_task, env_count = _array_task()
    task_id = env_task if args.task_id is None else args.task_id
    num_tasks = env_count if args.num_tasks is None else args.num_tasks
    stage = "merge" if args.merge else args.stage
    return run_stage("prepare", lambda: prepare(cfg, workers=args.workers, task_id=task_id, num_tasks=num_tasks,
                                                force=args.force, stage=stage, progress=args.progress,
                                                tokenizer_wait=args.tokenizer_wait) and 0)


if __name__ == "__main__":
    sys.exit(main())
