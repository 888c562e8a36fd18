"""The tokenizer step of ``pipeline.prepare``: settings resolved against the corpus's reference
defaults, a fingerprint of its inputs, building it (counting in parallel over units, or training
sentencepiece) and the stamp that lets a re-run or a waiting job-array task reuse it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

from pipeline.common import atomic_write_json, sha256_file
from pipeline.config import TokenizerConfig
from pipeline.data.corpora import SPLITS, Corpus, Unit
from pipeline.data.prepare.units import (
    PrepareError,
    count_task,
    cpu_count,
    map_ordered,
    progress_bar,
    sha_json,
    unit_text,
)
from pipeline.data.shards import MANIFEST
from pipeline.data.tokenizers import (
    ByteTokenizer,
    CharVocab,
    SentencePieceTokenizer,
    Tokenizer,
    read_tokenizer,
    save_tokenizer,
    train_sentencepiece,
)
from pipeline.data.tokenizers.huggingface import HFTokenizer
from pipeline.data.tokenizers.word_vocab import CountMerger, WordVocab, read_vocab_file, vocab_from_counts

log = logging.getLogger("xlpipe.prepare")

STAMP = "tokenizer.build.json"
FAILED = "tokenizer.failed.json"   # written by the task that failed to build it, read by waiting tasks


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
    symbols: tuple[str, ...] = ()
    path: str = ""                         # huggingface: the directory it is read from
    file_sha256: tuple[str, ...] = ()      # huggingface: "name:sha256" of its files
    vocab_size: int = 0
    model_type: str = ""
    sample_bytes: int = 0
    character_coverage: float = 0.0

    def to_dict(self) -> dict:
        """As recorded in fingerprints and the manifest (``symbols`` only when set, so the specs of
        every other corpus keep the fingerprints they had before it existed)."""
        out = dataclasses.asdict(self)
        for later in ("symbols", "path", "file_sha256"):     # fields newer than most manifests
            if not out[later]:
                out.pop(later)
        return out


def resolve_tokenizer(tcfg: TokenizerConfig, corpus: Corpus) -> TokenizerSpec:
    d = corpus.tokenizer_defaults()
    if tcfg.kind == "huggingface" and "sentencepiece" in d.kinds:   # a pretrained subword tokenizer fits too
        if not tcfg.path:
            raise PrepareError("tokenizer.kind=huggingface needs tokenizer.path: a local directory holding a "
                               "tokenizer saved by transformers/tokenizers (tokenizer.json)")
        files = sorted(HFTokenizer.from_dir(tcfg.path).files_bytes.items())
        return TokenizerSpec("huggingface", path=str(Path(tcfg.path).expanduser().resolve()),
                             file_sha256=tuple(f"{n}:{hashlib.sha256(b).hexdigest()}" for n, b in files))
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
                         count_on=() if (vocab_file or d.symbols) else count_on, min_freq=tcfg.min_freq,
                         max_size=tcfg.max_size, specials=d.specials, eos=d.eos, bos=d.bos, unk=d.unk,
                         vocab_file=str(Path(vocab_file).resolve()) if vocab_file else None, symbols=d.symbols)


def tokenizer_fingerprint(corpus: Corpus, spec: TokenizerSpec, plan: dict[str, list[Unit]]) -> str:
    if spec.kind == "huggingface":
        inputs = []                  # the spec holds the files' sha256
    elif spec.kind == "sentencepiece":
        inputs = [corpus.identity(u) for u in plan["train"]]
    elif spec.vocab_file:
        st = os.stat(spec.vocab_file)
        inputs = [[spec.vocab_file, st.st_size, int(st.st_mtime)]]
    else:
        inputs = [corpus.identity(u) for s in spec.count_on for u in plan[s]]
    return sha_json({"corpus": corpus.name, "options": corpus.options(), "spec": spec.to_dict(),
                      "inputs": inputs})


def build_tokenizer(corpus: Corpus, spec: TokenizerSpec, plan: dict[str, list[Unit]], workers: int,
                    progress: Optional[bool] = None) -> Tokenizer:
    if spec.kind == "byte":
        return ByteTokenizer()
    if spec.kind == "huggingface":
        return HFTokenizer.from_dir(spec.path)
    if spec.kind == "sentencepiece":
        return SentencePieceTokenizer(train_sentencepiece(
            _sample_lines(corpus, plan["train"], spec.sample_bytes), spec.vocab_size, spec.model_type,
            spec.character_coverage, threads=workers), threads=workers)
    if spec.symbols:
        return _word_vocab(list(spec.symbols), spec)
    if spec.vocab_file:
        return _word_vocab(read_vocab_file(spec.vocab_file), spec)
    units = [u for s in spec.count_on for u in plan[s]]
    merged = CountMerger(words=spec.kind == "word")
    with progress_bar(sum(u.nbytes for u in units), f"count {spec.kind}s", progress) as bar:
        # Merged in corpus order, so ties keep first-occurrence order as counting line by line does.
        for unit, (symbols, counts) in zip(units, map_ordered(count_task, [(u,) for u in units],
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
    return (read_tokenizer(out, threads=max(1, cpu_count() // workers)), stamp["entry"]), ""


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
            tok.threads = max(1, cpu_count() // workers)
        return tok, entry
    started, deadline = time.time(), time.monotonic() + wait_s
    if wait_s > 0:
        log.info("tokenizer %s: waiting up to %.0fs for task 0 to build it", reason, wait_s)
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.05, wait_s / 100)))
        try:
            rec = json.loads(failed.read_text())
            job = os.environ.get("SLURM_ARRAY_JOB_ID", "")
            recent = failed.stat().st_mtime >= started - 1 or (job and rec.get("job") == job)
            if rec.get("fingerprint") == fp and recent:
                raise PrepareError(f"task 0 failed to build the tokenizer: {rec.get('error')}")
        except (OSError, json.JSONDecodeError):
            pass
        ready, reason = _tokenizer_ready(out, fp, workers)
        if ready:
            return ready
    raise PrepareError(f"the tokenizer in {out} is {reason}; build it first with `python -m pipeline.prepare "
                       f"--config ... --stage tokenizer` (or let job-array task 0 build it while the other "
                       f"tasks wait, --tokenizer-wait seconds)")
