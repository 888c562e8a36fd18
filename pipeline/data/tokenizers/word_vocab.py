"""Word vocabularies (counting, building, ``WordVocab``). They follow the Transformer-XL reference
(``Vocab`` in kimiyoung/transformer-xl): lines are split on whitespace after ``strip`` (and
``lower`` when asked); the vocabulary is the specials, then ``Counter.most_common`` of the counted
words (frequency-descending, ties in first-occurrence order), cut by ``max_size`` and ``min_freq``;
``<eos>`` ends every line (empty lines too); unknown words map to the unk symbol when the vocabulary
has one, else they are an error.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.data.tokenizers import fastwords
from pipeline.data.tokenizers.base import Tokenizer, TokenizerError, UnknownSymbolError


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
