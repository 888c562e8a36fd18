"""Input units for ``pipeline.prepare``: reading a unit's text, encoding it, its text
statistics, and the pool of worker processes that counts and encodes units in corpus order.

Worker functions are top-level (they run in forked processes, state passed once per worker)."""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from tqdm import tqdm

from pipeline.common import XlpipeError, atomic_write_json
from pipeline.data.corpora import Corpus, CorpusError, Unit
from pipeline.data.shards import shard_name, write_shard
from pipeline.data.tokenizers import ByteTokenizer, Tokenizer, UnknownSymbolError
from pipeline.data.tokenizers.word_vocab import count_chars, count_words


class PrepareError(XlpipeError, RuntimeError):
    """A prepare step that cannot go on: says which step to run or what to fix."""

def sha_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

# ----------------------------------------------------------------------------- reading units


def unit_text(corpus: Corpus, unit: Unit) -> str:
    """A unit's text as the tokenizer sees it when counting or sampling."""
    if corpus.mode == "documents":
        return "".join(text for text, _, _ in corpus.read_documents(unit))
    if corpus.mode == "generated":
        return corpus.read_text(unit)
    return corpus.read_text(unit)


class Encoded(NamedTuple):
    """A unit's token ids and what the shard records beside them (pipeline.data.shards)."""
    tokens: np.ndarray
    sentence_starts: Optional[np.ndarray] = None
    doc_starts: Optional[np.ndarray] = None
    scored: Optional[np.ndarray] = None


def encode_unit(corpus: Corpus, tok: Tokenizer, unit: Unit) -> Encoded:
    """Token ids of a unit, with sentence starts (sentence corpora), document starts (document
    corpora) or scored targets (generated tasks)."""
    try:
        if corpus.mode == "sentences":
            return Encoded(*tok.encode_sentences(corpus.read_text(unit)))
        if corpus.mode == "generated":
            return Encoded(*corpus.generate(unit, tok))
        if corpus.mode == "documents":
            return _encode_documents(corpus.read_documents(unit), tok)
        if isinstance(tok, ByteTokenizer):
            return Encoded(tok.encode_bytes(corpus.read_bytes(unit)))
        docs = corpus.line_documents(unit) if corpus.mode == "lines" else None
        if docs is not None:
            return _encode_documents(docs, tok)
        return Encoded(tok.encode(corpus.read_text(unit)))
    except UnknownSymbolError as exc:
        raise CorpusError(f"{_locate(corpus, unit, exc.line)}: {exc}") from None


def _encode_documents(docs: list[tuple[str, bool, bool]], tok: Tokenizer) -> Encoded:
    """Each document encoded on its own (documents end with a newline, so this equals encoding
    them joined), the tokenizer's document-end id after each that ends here, and the offset of
    each that opens here."""
    parts: list[np.ndarray] = []
    starts, at = [], 0
    for (_, opens, end), ids in zip(docs, tok.encode_batch([text for text, _, _ in docs])):
        if end and tok.doc_end is not None:
            ids = np.append(ids, np.int64(tok.doc_end))
        if opens and len(ids):
            starts.append(at)
        parts.append(ids)
        at += len(ids)
    tokens = np.concatenate(parts) if parts else np.empty(0, np.int64)
    return Encoded(tokens, doc_starts=np.asarray(starts, dtype=np.int64))


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


def _init_worker(state: dict, parent: Optional[int] = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    _W.clear()
    _W.update(state)


def _die_with_parent(parent: int) -> None:
    """A worker never outlives prepare, a ``kill -9`` of it included: the pool's pipes stay open in
    the sibling workers, so nothing else would end them. Linux: the kernel sends SIGKILL when the
    parent dies (PR_SET_PDEATHSIG); elsewhere, and for a parent gone before that took effect, a
    thread that watches the parent's pid."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def count_task(unit: Unit) -> tuple[list[str], np.ndarray]:
    corpus, spec = _W["corpus"], _W["spec"]
    text = unit_text(corpus, unit)
    return count_words(text, spec.lower_case) if spec.kind == "word" else count_chars(text)


def encode_task(unit: Unit, fingerprint: str) -> tuple[Optional[dict], int, float]:
    t0 = time.perf_counter()
    out = Path(_W["out"])
    enc = encode_unit(_W["corpus"], _W["tok"], unit)
    tokens = enc.tokens
    tar = out / shard_name(unit.split, unit.index)
    if len(tokens) == 0:  # e.g. a JSONL unit with no record of this split: no shard, only the sidecar
        tar.unlink(missing_ok=True)
        info = None
    else:
        info = dataclasses.asdict(write_shard(out, unit.split, unit.index, tokens, _W["chunk_tokens"],
                                              _W["dtype"], enc.sentence_starts, enc.doc_starts, enc.scored))
        info["text"] = text_stats(_W["corpus"], unit)
    atomic_write_json(sidecar_path(out, unit), {"fingerprint": fingerprint, "shard": info})
    return info, int(len(tokens)), time.perf_counter() - t0


def map_ordered(fn, args: list[tuple], state: dict, workers: int):
    """Yield fn(*a) for each a, in order; a process pool when workers > 1. On error, running tasks
    finish (their writes are atomic) and queued ones are cancelled."""
    if workers <= 1 or len(args) <= 1:
        _init_worker(state)
        for a in args:
            yield fn(*a)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    ex = cf.ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=ctx,
                                initializer=_init_worker, initargs=(state, os.getpid()))
    try:
        futures = [ex.submit(fn, *a) for a in args]
        for fut in futures:
            yield fut.result()
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def progress_bar(total: int, desc: str, progress: Optional[bool]):
    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not show, leave=False)


def sidecar_path(out: Path, unit: Unit) -> Path:
    return (out / shard_name(unit.split, unit.index)).with_suffix(".json")
