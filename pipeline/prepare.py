"""Stage 1: corpus → tokenizer → webdataset shards + manifest.json (DESIGN.md contract 1).

    python -m pipeline.prepare --config configs/F.yaml [key=value ...] [--workers N] [--force]

The work is split into *input units* (``pipeline.corpora``): shard i of a split holds exactly the
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
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.config import Config, TokenizerConfig, arg_parser, parse_args
from pipeline.corpora import SPLITS, Corpus, CorpusError, Unit, open_corpus
from pipeline.shards import (MANIFEST, Manifest, ShardError, ShardInfo, SplitInfo, atomic_write_json,
                             shard_name, sha256_file, token_dtype, verify_shard, write_shard)
from pipeline.tokenizers import (ByteTokenizer, CharVocab, CountMerger, SentencePieceTokenizer, Tokenizer,
                                 TokenizerError, UnknownSymbolError, WordVocab, count_chars, count_words,
                                 read_tokenizer, read_vocab_file, save_tokenizer, train_sentencepiece,
                                 vocab_from_counts)

log = logging.getLogger("xlpipe.prepare")
STAMP = "tokenizer.build.json"
FAILED = "tokenizer.failed.json"   # written by the task that failed to build it, read by waiting tasks
STAGES = ("auto", "all", "tokenizer", "shards", "merge")


class PrepareError(RuntimeError):
    """A prepare step that cannot go on: says which step to run or what to fix."""


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer settings resolved against the corpus's reference defaults."""
    kind: str
    lower_case: bool = False
    count_on: tuple[str, ...] = ()
    min_freq: int = 0
    max_size: int = 0
    specials: tuple[str, ...] = ()
    eos: Optional[str] = None
    bos: Optional[str] = None
    unk: Optional[str] = None
    vocab_file: Optional[str] = None
    vocab_size: int = 0
    model_type: str = ""
    sample_bytes: int = 0
    character_coverage: float = 0.0


def resolve_tokenizer(tcfg: TokenizerConfig, corpus: Corpus) -> TokenizerSpec:
    d = corpus.tokenizer_defaults()
    if tcfg.kind not in d.kinds:
        raise PrepareError(f"tokenizer.kind={tcfg.kind!r} does not fit data.corpus={corpus.name!r}; "
                           f"use one of {list(d.kinds)}")
    count_on = {"auto": d.count_on, "train": ("train",), "all": SPLITS}[tcfg.count_on]
    if tcfg.kind == "byte":
        return TokenizerSpec("byte")
    if tcfg.kind == "sentencepiece":
        return TokenizerSpec("sentencepiece", vocab_size=tcfg.vocab_size, model_type=tcfg.model_type,
                             sample_bytes=tcfg.sample_bytes, character_coverage=tcfg.character_coverage)
    if tcfg.kind == "char":
        return TokenizerSpec("char", count_on=count_on, min_freq=tcfg.min_freq, max_size=tcfg.max_size)
    vocab_file = tcfg.vocab_file or d.vocab_file
    if vocab_file and not Path(vocab_file).is_file():
        raise PrepareError(f"tokenizer.vocab_file={vocab_file!r} does not exist")
    return TokenizerSpec("word", lower_case=d.lower_case if tcfg.lower_case is None else tcfg.lower_case,
                         count_on=() if vocab_file else count_on, min_freq=tcfg.min_freq,
                         max_size=tcfg.max_size, specials=d.specials, eos=d.eos, bos=d.bos, unk=d.unk,
                         vocab_file=str(Path(vocab_file).resolve()) if vocab_file else None)


def _sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- reading units


def unit_text(corpus: Corpus, unit: Unit) -> str:
    """A unit's text as the tokenizer sees it when counting or sampling."""
    if corpus.mode == "documents":
        return "".join(text for text, _ in corpus.read_documents(unit))
    return corpus.read_text(unit)


def encode_unit(corpus: Corpus, tok: Tokenizer, unit: Unit) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Token ids of a unit (and sentence starts for sentence corpora)."""
    try:
        if corpus.mode == "sentences":
            return tok.encode_sentences(corpus.read_text(unit))
        if corpus.mode == "documents":
            docs = corpus.read_documents(unit)
            if tok.doc_end is None:  # documents end with a newline: encoding them joined is the same
                return tok.encode("".join(text for text, _ in docs)), None
            parts: list[np.ndarray] = []
            for (_, end), ids in zip(docs, tok.encode_batch([text for text, _ in docs])):
                parts.append(ids)
                if end and tok.doc_end is not None:
                    parts.append(np.array([tok.doc_end], dtype=np.int64))
            return (np.concatenate(parts) if parts else np.empty(0, np.int64)), None
        if isinstance(tok, ByteTokenizer):
            return tok.encode_bytes(corpus.read_bytes(unit)), None
        return tok.encode(corpus.read_text(unit)), None
    except UnknownSymbolError as exc:
        raise CorpusError(f"{_locate(corpus, unit, exc.line)}: {exc}") from None


def text_stats(corpus: Corpus, unit: Unit) -> dict:
    """Words (whitespace-separated), characters, UTF-8 bytes and lines of a unit's source text, as
    the tokenizer sees it: evaluation normalises per word / byte with them (pipeline.evaluate)."""
    if corpus.mode == "bytes":   # raw bytes (enwik8: after its newline option); characters by UTF-8
        raw = corpus.read_bytes(unit)
        text = raw.decode("utf-8", errors="replace")
        nbytes = len(raw)
    else:
        text = unit_text(corpus, unit)
        nbytes = len(text.encode("utf-8", errors="surrogatepass"))
    return {"words": len(text.split()), "chars": len(text), "bytes": nbytes, "lines": text.count("\n")}


def _locate(corpus: Corpus, unit: Unit, line: int) -> str:
    """'file, line N' of a line of a unit's text (error path only)."""
    p = unit.pieces[0]
    if len(unit.pieces) > 1 or corpus.mode == "documents":
        return unit.describe()
    with open(p.path, "rb") as f:
        before = f.read(p.start).count(b"\n")
    return f"{p.path}, line {before + line}"


# ----------------------------------------------------------------------------- worker processes

_W: dict = {}


def _init_worker(state: dict) -> None:
    _W.clear()
    _W.update(state)


def _count_task(unit: Unit) -> tuple[list[str], np.ndarray]:
    corpus, spec = _W["corpus"], _W["spec"]
    text = unit_text(corpus, unit)
    return count_words(text, spec.lower_case) if spec.kind == "word" else count_chars(text)


def _encode_task(unit: Unit, fingerprint: str) -> tuple[Optional[dict], int, float]:
    t0 = time.perf_counter()
    out = Path(_W["out"])
    tokens, starts = encode_unit(_W["corpus"], _W["tok"], unit)
    tar = out / shard_name(unit.split, unit.index)
    if len(tokens) == 0:  # e.g. a JSONL unit with no record of this split: no shard, only the sidecar
        tar.unlink(missing_ok=True)
        info = None
    else:
        info = dataclasses.asdict(write_shard(out, unit.split, unit.index, tokens, _W["chunk_tokens"],
                                              _W["dtype"], starts))
        info["text"] = text_stats(_W["corpus"], unit)
    atomic_write_json(_sidecar(out, unit), {"fingerprint": fingerprint, "shard": info})
    return info, int(len(tokens)), time.perf_counter() - t0


def _map_ordered(fn, args: list[tuple], state: dict, workers: int):
    """Yield fn(*a) for each a, in order; a process pool when workers > 1. On error, running tasks
    finish (their writes are atomic) and queued ones are cancelled."""
    if workers <= 1 or len(args) <= 1:
        _init_worker(state)
        for a in args:
            yield fn(*a)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    ex = cf.ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=ctx,
                                initializer=_init_worker, initargs=(state,))
    try:
        futures = [ex.submit(fn, *a) for a in args]
        for fut in futures:
            yield fut.result()
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _bar(total: int, desc: str, progress: Optional[bool]):
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show, leave=False)


# ----------------------------------------------------------------------------- tokenizer step


def tokenizer_fingerprint(corpus: Corpus, spec: TokenizerSpec, plan: dict[str, list[Unit]]) -> str:
    if spec.kind == "sentencepiece":
        inputs = [corpus.identity(u) for u in plan["train"]]
    elif spec.vocab_file:
        st = os.stat(spec.vocab_file)
        inputs = [[spec.vocab_file, st.st_size, int(st.st_mtime)]]
    else:
        inputs = [corpus.identity(u) for s in spec.count_on for u in plan[s]]
    return _sha_json({"corpus": corpus.name, "options": corpus.options(), "spec": dataclasses.asdict(spec),
                      "inputs": inputs})


def build_tokenizer(corpus: Corpus, spec: TokenizerSpec, plan: dict[str, list[Unit]], workers: int,
                    progress: Optional[bool] = None) -> Tokenizer:
    if spec.kind == "byte":
        return ByteTokenizer()
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizer(train_sentencepiece(
            _sample_lines(corpus, plan["train"], spec.sample_bytes), spec.vocab_size, spec.model_type,
            spec.character_coverage, threads=workers), threads=workers)
    if spec.vocab_file:
        return _word_vocab(read_vocab_file(spec.vocab_file), spec)
    units = [u for s in spec.count_on for u in plan[s]]
    merged = CountMerger(words=spec.kind == "word")
    with _bar(sum(u.nbytes for u in units), f"count {spec.kind}s", progress) as bar:
        # Merged in corpus order, so ties keep first-occurrence order as counting line by line does.
        for unit, (symbols, counts) in zip(units, _map_ordered(_count_task, [(u,) for u in units],
                                                               {"corpus": corpus, "spec": spec}, workers)):
            merged.add(symbols, counts)
            bar.update(unit.nbytes)
    if spec.kind == "char":
        return CharVocab(vocab_from_counts(merged.result(), (), spec.min_freq, spec.max_size))
    return _word_vocab(vocab_from_counts(merged.result(), spec.specials, spec.min_freq, spec.max_size), spec)


def _word_vocab(symbols: list[str], spec: TokenizerSpec) -> WordVocab:
    # Reference: unknown words map to the unk symbol only when the vocabulary has it.
    unk = spec.unk if spec.unk in set(symbols) else None
    return WordVocab(symbols, spec.lower_case, spec.eos, spec.bos, unk)


def _sample_lines(corpus: Corpus, units: list[Unit], cap: int):
    """Every k-th line of the train split, k chosen so that about ``cap`` bytes are kept."""
    stride = max(1, math.ceil(sum(u.nbytes for u in units) / max(cap, 1)))
    for unit in units:
        for i, line in enumerate(unit_text(corpus, unit).split("\n")):
            if i % stride == 0 and line:
                yield line


def _tokenizer_ready(out: Path, fp: str, workers: int) -> tuple[Optional[tuple[Tokenizer, dict]], str]:
    """((tokenizer, manifest entry), "") when ``out`` holds a verified tokenizer built for ``fp``."""
    try:
        stamp = json.loads((out / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return None, "missing"
    if stamp.get("fingerprint") != fp:
        return None, "built from other inputs or options"
    if any(not (out / n).is_file() or sha256_file(out / n) != sha for n, sha in stamp["files"].items()):
        return None, "changed after it was built (sha256 mismatch)"
    return (read_tokenizer(out, threads=max(1, _cpus() // workers)), stamp["entry"]), ""


def tokenizer_step(out: Path, corpus: Corpus, spec: TokenizerSpec, plan: dict[str, list[Unit]], *,
                   build: bool, force: bool, workers: int, progress: Optional[bool],
                   wait_s: float = 0.0) -> tuple[Tokenizer, dict]:
    """The verified tokenizer of ``out``. When it is missing or stale: build it when ``build``,
    else wait up to ``wait_s`` for the task that builds it (job-array task 0), then fail."""
    fp = tokenizer_fingerprint(corpus, spec, plan)
    ready, reason = (None, "rebuilt (--force)") if force else _tokenizer_ready(out, fp, workers)
    if ready:
        return ready
    failed = out / FAILED
    if build:
        log.info("tokenizer %s: building %s", reason, spec.kind)
        failed.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            tok = build_tokenizer(corpus, spec, plan, workers, progress)
        except Exception as exc:  # tell the waiting array tasks, then fail ourselves
            atomic_write_json(failed, {"fingerprint": fp, "job": os.environ.get("SLURM_ARRAY_JOB_ID", ""),
                                       "error": str(exc)})
            raise
        (out / MANIFEST).unlink(missing_ok=True)  # the old manifest no longer describes what follows
        entry = save_tokenizer(tok, out)
        atomic_write_json(out / STAMP, {"fingerprint": fp, "files": entry["files"], "entry": entry})
        log.info("tokenizer: %s, vocab size %d, special %s (%.1fs)", tok.kind, tok.vocab_size, tok.special(),
                 time.perf_counter() - t0)
        if isinstance(tok, SentencePieceTokenizer):
            tok.threads = max(1, _cpus() // workers)
        return tok, entry
    started, deadline = time.time(), time.monotonic() + wait_s
    if wait_s > 0:
        log.info("tokenizer %s: waiting up to %.0fs for task 0 to build it", reason, wait_s)
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.05, wait_s / 100)))
        try:
            rec = json.loads(failed.read_text())
            job = os.environ.get("SLURM_ARRAY_JOB_ID", "")
            if rec.get("fingerprint") == fp and (failed.stat().st_mtime >= started - 1 or (job and rec.get("job") == job)):
                raise PrepareError(f"task 0 failed to build the tokenizer: {rec.get('error')}")
        except (OSError, json.JSONDecodeError):
            pass
        ready, reason = _tokenizer_ready(out, fp, workers)
        if ready:
            return ready
    raise PrepareError(f"the tokenizer in {out} is {reason}; build it first with `python -m pipeline.prepare "
                       f"--config ... --stage tokenizer` (or let job-array task 0 build it while the other "
                       f"tasks wait, --tokenizer-wait seconds)")


# ----------------------------------------------------------------------------- shards step


def _sidecar(out: Path, unit: Unit) -> Path:
    return (out / shard_name(unit.split, unit.index)).with_suffix(".json")


def unit_fingerprints(corpus: Corpus, plan: dict[str, list[Unit]], entry: dict, chunk_tokens: int,
                      dtype: str) -> dict[tuple[str, int], str]:
    common = {"corpus": corpus.name, "options": corpus.options(), "tokenizer": entry["files"],
              "chunk_tokens": chunk_tokens, "dtype": dtype}
    return {(u.split, u.index): _sha_json({**common, "split": u.split, "index": u.index,
                                          "unit": corpus.identity(u)})
            for s in SPLITS for u in plan[s]}


def check_unit(out: Path, unit: Unit, fingerprint: str, hash_check: bool = True) -> tuple[Optional[dict], str]:
    """(sidecar, "") when the unit's shard is done and verifies, else (None, why not)."""
    side = _sidecar(out, unit)
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
    with _bar(sum(u.nbytes for u in todo), "encode", progress) as bar:
        results = _map_ordered(_encode_task, [(u, fps[(u.split, u.index)]) for u in todo], state, workers)
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
                        sentences=corpus.mode == "sentences", splits=splits,
                        options=json.loads(json.dumps({"corpus": corpus.options(),
                                                       "tokenizer": dataclasses.asdict(spec)})))
    manifest.save(out)
    return manifest


def _remove_stale(out: Path, plan: dict[str, list[Unit]]) -> None:
    """Shards left by an earlier run with another unit plan (more units, or now-empty units)."""
    for split in SPLITS:
        keep = {shard_name(split, u.index) for u in plan[split]}
        for path in sorted((out / split).glob("shard-*")):
            rel = f"{split}/{path.with_suffix('.tar').name}"
            if rel not in keep and path.suffix in (".tar", ".json"):
                log.info("removing %s (not in the current unit plan)", path)
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
    data = cfg.data
    workers = data.workers if workers is None else workers
    workers = _cpus() if workers <= 0 else workers
    if data.chunk_tokens <= 0:
        raise PrepareError(f"data.chunk_tokens must be positive, got {data.chunk_tokens}")
    out = Path(data.output)
    out.mkdir(parents=True, exist_ok=True)
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
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default data.workers; 0: all CPUs)")
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
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="prepare: %(message)s")
    env_task, env_count = _array_task()
    task_id = env_task if args.task_id is None else args.task_id
    num_tasks = env_count if args.num_tasks is None else args.num_tasks
    stage = "merge" if args.merge else args.stage
    try:
        prepare(cfg, workers=args.workers, task_id=task_id, num_tasks=num_tasks, force=args.force,
                stage=stage, progress=args.progress, tokenizer_wait=args.tokenizer_wait)
    except (CorpusError, TokenizerError, ShardError, PrepareError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
