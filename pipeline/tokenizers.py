"""Tokenizers: word vocabulary (reference semantics), characters, bytes, sentencepiece.

Every tokenizer has ``encode(text) -> np.ndarray[int64]``, ``decode(ids) -> str``, ``vocab_size``,
``kind``, special ids (``eos_id``, ``unk_id``, ``bos_id``) and ``files()``. Prepare writes it next to
the shards as ``tokenizer.json`` (plus ``tokenizer.model`` for sentencepiece); the manifest holds
their sha256 and ``load_tokenizer`` checks them before later stages use the tokenizer.

Word vocabularies follow the Transformer-XL reference (``Vocab`` in kimiyoung/transformer-xl):
lines are split on whitespace after ``strip`` (and ``lower`` when asked); the vocabulary is the
specials, then ``Counter.most_common`` of the counted words (frequency-descending, ties in
first-occurrence order), cut by ``max_size`` and ``min_freq``; ``<eos>`` ends every line (empty
lines too); unknown words map to the unk symbol when the vocabulary has one, else they are an error.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline import fastwords
from pipeline.shards import MANIFEST, Manifest, atomic_write_bytes, sha256_file

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"


class TokenizerError(ValueError):
    """A tokenizer that cannot be built, loaded or verified, or text it cannot encode."""


class UnknownSymbolError(TokenizerError):
    """A symbol outside a vocabulary that has no unk symbol. ``line``: 1-based, in the encoded text."""

    def __init__(self, symbol: str, line: int, hint: str = ""):
        self.symbol, self.line = symbol, line
        super().__init__(f"{symbol!r} is not in the vocabulary and the vocabulary has no unk symbol{hint}")


class Tokenizer:
    kind: str = ""
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    bos_id: Optional[int] = None
    doc_end: Optional[int] = None  # appended after each document of a document corpus (text, stdlib)
    directory: Optional[Path] = None  # where it was loaded from

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_sentences(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        raise TokenizerError(f"a {self.kind} tokenizer does not encode sentence corpora (lm1b needs word)")

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def special(self) -> dict[str, int]:
        out = {"eos": self.eos_id, "unk": self.unk_id, "bos": self.bos_id}
        return {k: v for k, v in out.items() if v is not None}

    def to_json(self) -> dict:
        raise NotImplementedError

    def extra_files(self) -> dict[str, bytes]:
        return {}

    def files(self) -> list[Path]:
        """The files export must copy (only for a tokenizer loaded from a directory)."""
        if self.directory is None:
            raise TokenizerError("this tokenizer was not loaded from a directory; save it first")
        return [self.directory / TOKENIZER_FILE] + [self.directory / n for n in self.extra_files()]


# ----------------------------------------------------------------------------- word vocabulary


def count_words(text: str, lower_case: bool = False) -> tuple[list[str], np.ndarray]:
    """Distinct words of ``text`` in first-occurrence order and their counts: the reference's
    ``count_file`` (whitespace split after ``lower``, no ``<eos>``), vectorised (``fastwords``)."""
    return fastwords.count_words(text, lower_case)


def count_chars(text: str) -> tuple[list[str], np.ndarray]:
    """Distinct characters in first-occurrence order and their counts (``Counter(text)``)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    counts = np.bincount(cps) if len(cps) else np.zeros(0, np.int64)
    present = np.flatnonzero(counts)
    if len(present) > 4096:  # many distinct characters: finding each first occurrence gets slow
        c = Counter(text)
        return list(c), np.fromiter(c.values(), np.int64, len(c))
    chars = [chr(c) for c in present.tolist()]
    order = np.argsort([text.find(ch) for ch in chars], kind="stable")
    return [chars[k] for k in order.tolist()], counts[present][order]


class _Tally:
    """Symbols with their summed counts and (unit, rank) of first occurrence, by id."""

    def __init__(self):
        self.symbols: list[str] = []
        self.counts = np.zeros(0, dtype=np.int64)
        self.first = np.zeros((0, 2), dtype=np.int64)

    def grow(self, n: int) -> None:
        if n > len(self.counts):
            extra = max(n, 2 * len(self.counts), 1024) - len(self.counts)
            self.counts = np.concatenate([self.counts, np.zeros(extra, np.int64)])
            self.first = np.concatenate([self.first, np.zeros((extra, 2), np.int64)])


class CountMerger:
    """Sums per-unit counts given in corpus order and keeps first-occurrence order across units
    (what one ``Counter`` updated line by line over the whole corpus would hold). ``words``: the
    symbols are whitespace-free words, merged through exact ``fastwords`` keys (no string hashing)
    except long ones; otherwise (characters) through a dict."""

    def __init__(self, words: bool = True):
        self.words = words
        self.table = fastwords.KeyTable(1 << 16)
        self.keyed = _Tally()                   # short words, by table entry
        self.other = _Tally()                   # long words or characters, by self.index
        self.index: dict[str, int] = {}
        self.units = 0

    def _add_other(self, symbols: Sequence[str], counts: np.ndarray, ranks: Sequence[int]) -> None:
        t = self.other
        for sym, cnt, rank in zip(symbols, counts.tolist(), ranks):
            k = self.index.get(sym)
            if k is None:
                k = self.index[sym] = len(self.index)
                t.grow(k + 1)
                t.symbols.append(sym)
                t.first[k] = (self.units, rank)
            t.counts[k] += cnt

    def add(self, symbols: list[str], counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if not self.words:
            self._add_other(symbols, counts, range(len(symbols)))
            self.units += 1
            return
        w = fastwords.Words(" ".join(symbols))
        if w.n != len(symbols):
            raise TokenizerError("CountMerger(words=True) got symbols with whitespace")
        short, k1, k2 = w.short_keys()
        short = np.arange(w.n) if short is None else short
        before = self.table.n
        entry = self.table.insert(k1, k2)     # new entries are numbered in symbol order
        t = self.keyed
        t.grow(self.table.n)
        t.counts[entry] += counts[short]      # symbols are distinct within a unit
        new = entry >= before
        t.first[entry[new], 0] = self.units
        t.first[entry[new], 1] = short[new]
        t.symbols.extend(w.words_at(short[new]))
        longs = w.long_indices()
        if longs.size:
            self._add_other([symbols[i] for i in longs.tolist()], counts[longs], longs.tolist())
        self.units += 1

    def result(self) -> tuple[list[str], np.ndarray]:
        a, b = self.table.n, len(self.index)
        syms = self.keyed.symbols + self.other.symbols
        counts = np.concatenate([self.keyed.counts[:a], self.other.counts[:b]])
        first = np.concatenate([self.keyed.first[:a], self.other.first[:b]])
        order = np.lexsort((first[:, 1], first[:, 0]))
        return [syms[k] for k in order.tolist()], counts[order]


def vocab_from_counts(counts: Counter | tuple[list[str], np.ndarray], specials: Sequence[str] = (),
                      min_freq: int = 0, max_size: int = 0) -> list[str]:
    """Specials, then ``most_common(max_size)`` while the count is at least ``min_freq``.

    ``counts``: a Counter, or (symbols, counts) in first-occurrence order. ``most_common`` sorts
    by count and keeps first-occurrence order among ties (a stable sort), as the reference.
    """
    if isinstance(counts, Counter):
        syms, cnts = list(counts), np.fromiter(counts.values(), np.int64, len(counts))
    else:
        syms, cnts = counts
    order = np.argsort(-np.asarray(cnts, dtype=np.int64), kind="stable")
    if max_size:
        order = order[:max_size]
    symbols: list[str] = []
    seen: set[str] = set()
    for sym in specials:
        if sym not in seen:
            seen.add(sym)
            symbols.append(sym)
    for k in order.tolist():
        if cnts[k] < min_freq:
            break
        if syms[k] not in seen:  # a special also counted takes its max_size slot, as in the reference
            seen.add(syms[k])
            symbols.append(syms[k])
    return symbols


def read_vocab_file(path: str | Path) -> list[str]:
    """First column of every line, duplicates skipped (the reference's ``_build_from_file``)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"vocabulary file {path} does not exist")
    symbols, seen = [], set()
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"vocabulary file {path}: invalid UTF-8 at byte offset {exc.start}") from None
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        cols = line.split()
        if not cols:
            raise TokenizerError(f"vocabulary file {path}: line {n} is empty")
        if cols[0] not in seen:
            seen.add(cols[0])
            symbols.append(cols[0])
    return symbols


class WordVocab(Tokenizer):
    """Whitespace words. ``eos`` ends every line (wt103, ptb); or ``bos`` opens every line (lm1b)."""

    kind = "word"

    def __init__(self, symbols: Sequence[str], lower_case: bool = False, eos: Optional[str] = None,
                 bos: Optional[str] = None, unk: Optional[str] = None):
        self.symbols = list(symbols)
        self.lower_case = lower_case
        if eos is not None and bos is not None:
            raise TokenizerError("a word vocabulary ends lines with eos or opens them with bos, not both")
        ids = {}
        for name, sym in (("eos", eos), ("bos", bos), ("unk", unk)):
            if sym is not None:
                try:
                    ids[name] = self.symbols.index(sym)
                except ValueError:
                    raise TokenizerError(f"word vocabulary has no {name} symbol {sym!r}") from None
        self.eos, self.bos, self.unk = eos, bos, unk
        self.eos_id, self.bos_id, self.unk_id = ids.get("eos"), ids.get("bos"), ids.get("unk")
        self._build_index()

    def _build_index(self) -> None:
        try:
            self._index = fastwords.WordIndex(self.symbols)
        except ValueError as exc:
            raise TokenizerError(f"word vocabulary: {exc}") from None

    def __getstate__(self):  # the lookup table is rebuilt, not pickled
        return {k: v for k, v in self.__dict__.items() if k != "_index"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._build_index()

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def _ids(self, words: fastwords.Words) -> np.ndarray:
        ids, first_unknown = self._index.lookup(words, self.unk_id)
        if first_unknown >= 0 and self.unk_id is None:
            raise UnknownSymbolError(words.word(first_unknown), words.line_of(first_unknown),
                                     " (map unknown words with a vocabulary that holds <unk>, "
                                     "e.g. count it on all splits or add <unk> to the vocabulary file)")
        return ids

    def encode(self, text: str) -> np.ndarray:
        """Words of every line; ``eos`` after each line terminator (not after an unterminated last
        line), as the reference's per-line ``symbols + ['<eos>']``; a literal eos word is eos there too."""
        if self.bos is not None:
            return self.encode_sentences(text)[0]
        words = fastwords.Words(text, self.lower_case)
        ids = self._ids(words)
        if self.eos is None:
            return ids
        return np.insert(ids, words.tokens_before(words.newlines), self.eos_id)

    def encode_sentences(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """lm1b: each line as ``bos w1 .. wn``; returns (ids, start offset of each sentence)."""
        if self.bos is None:
            raise TokenizerError("encode_sentences needs a vocabulary with a bos symbol (lm1b <S>)")
        words = fastwords.Words(text, self.lower_case)
        ids = self._ids(words)
        line_starts = np.concatenate(([0], words.newlines + 1))
        if line_starts[-1] == len(words.data):  # the text ends with a newline: no line after it
            line_starts = line_starts[:-1]
        before = words.tokens_before(line_starts)
        return np.insert(ids, before, self.bos_id), before + np.arange(len(before))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        line: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            elif i == self.bos_id:
                if line or out:
                    out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.symbols[i])
        out.append(" ".join(line))
        return "".join(out)

    def to_json(self) -> dict:
        return {"kind": self.kind, "lower_case": self.lower_case, "eos": self.eos, "bos": self.bos,
                "unk": self.unk, "symbols": self.symbols}


# ----------------------------------------------------------------------------- characters and bytes


class CharVocab(Tokenizer):
    """Every character is a token (text8: 27 symbols); counted like words, most frequent first."""

    kind = "char"

    def __init__(self, symbols: Sequence[str], unk: Optional[str] = None):
        self.symbols = list(symbols)
        if any(len(s) != 1 for s in self.symbols) or len(set(self.symbols)) != len(self.symbols):
            raise TokenizerError("character vocabulary must hold distinct single characters")
        if unk is not None and unk not in self.symbols:
            raise TokenizerError(f"character vocabulary has no unk symbol {unk!r}")
        self.unk = unk
        self.unk_id = self.symbols.index(unk) if unk is not None else None
        cps = np.fromiter((ord(s) for s in self.symbols), np.int64, len(self.symbols))
        self._lut = np.full(int(cps.max(initial=0)) + 1, -1, dtype=np.int64)
        self._lut[cps] = np.arange(len(self.symbols))

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> np.ndarray:
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        known = cps < len(self._lut)
        ids = np.full(len(cps), -1, dtype=np.int64)
        ids[known] = self._lut[cps[known]]
        bad = ids < 0
        if bad.any():
            if self.unk_id is None:
                pos = int(np.argmax(bad))
                raise UnknownSymbolError(text[pos], text.count("\n", 0, pos) + 1)
            ids[bad] = self.unk_id
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"kind": self.kind, "unk": self.unk, "symbols": self.symbols}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes, id = byte value (256 ids; enwik8)."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return self.encode_bytes(text.encode("utf-8"))

    @staticmethod
    def encode_bytes(data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": self.kind}


# ----------------------------------------------------------------------------- sentencepiece


def train_sentencepiece(lines: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 0.9995, threads: int = 0) -> bytes:
    """Train on ``lines`` (each a line without its newline); returns the model protobuf.

    Identity normalisation, no dummy prefix, whitespace kept and byte fallback make
    ``decode(encode(x)) == x``. The thread count is cleared from the stored trainer spec: the
    pieces do not depend on it, so the model file is the same on any machine.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, input_sentence_size=0,
            max_sentence_length=1 << 16, num_threads=threads or os.cpu_count() or 1,
            unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, minloglevel=2)
    except RuntimeError as exc:
        raise TokenizerError(f"sentencepiece training failed: {exc} (tokenizer.vocab_size={vocab_size}; "
                             f"a small corpus needs a smaller vocabulary)") from None
    proto = model_pb2.ModelProto()
    proto.ParseFromString(writer.getvalue())
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString(deterministic=True)


class SentencePieceTokenizer(Tokenizer):
    """Sentencepiece over lines; a newline is its byte piece ``<0x0A>``; documents end with ``</s>``."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, threads: int = 0):
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.threads = threads  # batch-encode threads; 0: all cores
        self.unk_id = self.sp.unk_id()
        self.eos_id = self.sp.eos_id()
        self.doc_end = self.eos_id
        self.newline_id = self.sp.piece_to_id("<0x0A>")
        if self.newline_id == self.unk_id:
            raise TokenizerError("sentencepiece model has no <0x0A> byte piece (train it with byte_fallback)")

    def __getstate__(self):  # the processor does not pickle; rebuild it from the proto
        return {"model_proto": self.model_proto, "threads": self.threads, "directory": self.directory}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["threads"])
        self.directory = state["directory"]

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Lines of all texts in one threaded batch, joined by the newline piece."""
        lines, counts = [], []
        for text in texts:
            split = text.split("\n")
            lines.extend(split)
            counts.append(len(split))
        pieces = self.sp.encode(lines, num_threads=self.threads or -1)
        out, k = [], 0
        for n in counts:
            ids: list[int] = []
            for i in range(n):
                if i:
                    ids.append(self.newline_id)
                ids.extend(pieces[k + i])
            k += n
            out.append(np.asarray(ids, dtype=np.int64))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.eos_id]
        return self.sp.decode(ids)

    def special(self) -> dict[str, int]:
        return {"eos": self.eos_id, "unk": self.unk_id, "newline": self.newline_id}

    def to_json(self) -> dict:
        return {"kind": self.kind, "model": SPM_FILE,
                "model_sha256": hashlib.sha256(self.model_proto).hexdigest()}

    def extra_files(self) -> dict[str, bytes]:
        return {SPM_FILE: self.model_proto}


# ----------------------------------------------------------------------------- files and loading


def tokenizer_bytes(tok: Tokenizer) -> dict[str, bytes]:
    """File name -> content, ``tokenizer.json`` first (deterministic bytes)."""
    body = json.dumps(tok.to_json(), ensure_ascii=False, indent=None, separators=(",", ":")) + "\n"
    return {TOKENIZER_FILE: body.encode("utf-8"), **tok.extra_files()}


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> dict:
    """Write the tokenizer files atomically; return its manifest entry."""
    directory = Path(directory)
    files = tokenizer_bytes(tok)
    for name, data in reversed(list(files.items())):  # tokenizer.json last: it names the others
        atomic_write_bytes(directory / name, data)
    tok.directory = directory
    return manifest_entry(tok, {n: hashlib.sha256(d).hexdigest() for n, d in files.items()})


def manifest_entry(tok: Tokenizer, shas: dict[str, str]) -> dict:
    return {"kind": tok.kind, "file": TOKENIZER_FILE, "sha256": shas[TOKENIZER_FILE],
            "vocab_size": tok.vocab_size, "special": tok.special(), "files": dict(shas)}


def tokenizer_from_json(obj: dict, directory: Path, threads: int = 0) -> Tokenizer:
    kind = obj.get("kind")
    if kind == "word":
        tok: Tokenizer = WordVocab(obj["symbols"], obj["lower_case"], obj["eos"], obj["bos"], obj["unk"])
    elif kind == "char":
        tok = CharVocab(obj["symbols"], obj["unk"])
    elif kind == "byte":
        tok = ByteTokenizer()
    elif kind == "sentencepiece":
        path = directory / obj["model"]
        if not path.is_file():
            raise TokenizerError(f"sentencepiece model {path} is missing")
        proto = path.read_bytes()
        if hashlib.sha256(proto).hexdigest() != obj["model_sha256"]:
            raise TokenizerError(f"sentencepiece model {path} does not match the sha256 in {directory / TOKENIZER_FILE}")
        tok = SentencePieceTokenizer(proto, threads)
    else:
        raise TokenizerError(f"{directory / TOKENIZER_FILE}: unknown tokenizer kind {kind!r}")
    tok.directory = directory
    return tok


def read_tokenizer(directory: str | Path, threads: int = 0) -> Tokenizer:
    """Load ``tokenizer.json`` (and its model) from ``directory`` without a manifest check."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; run `python -m pipeline.prepare` first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON: {exc}") from None
    try:
        return tokenizer_from_json(obj, Path(directory), threads)
    except (KeyError, TypeError) as exc:
        raise TokenizerError(f"tokenizer file {path} is malformed ({exc!r})") from None


def load_tokenizer(shard_dir: str | Path, manifest: Optional[Manifest] = None, threads: int = 0) -> Tokenizer:
    """The tokenizer of a prepared shard directory, its files checked against the manifest's sha256."""
    shard_dir = Path(shard_dir)
    manifest = manifest if manifest is not None else Manifest.load(shard_dir)
    files = manifest.tokenizer.get("files") or {manifest.tokenizer["file"]: manifest.tokenizer["sha256"]}
    for name, sha in files.items():
        path = shard_dir / name
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} (listed in {shard_dir / MANIFEST}) is missing")
        if sha256_file(path) != sha:
            raise TokenizerError(f"tokenizer file {path} does not match the sha256 in {shard_dir / MANIFEST}: "
                                 f"it was changed after prepare; re-run prepare (--force) to rebuild both")
    tok = read_tokenizer(shard_dir, threads)
    if tok.vocab_size != manifest.tokenizer["vocab_size"]:
        raise TokenizerError(f"{shard_dir / TOKENIZER_FILE}: vocab size {tok.vocab_size}, "
                             f"the manifest says {manifest.tokenizer['vocab_size']}")
    return tok
