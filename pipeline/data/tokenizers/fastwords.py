"""Vectorised whitespace words: Python's ``str.split()`` and a word → id lookup, in numpy.

Looking words up in a dict costs a hash of a fresh string plus a few cache misses per token
(~0.3 µs here), and a word corpus needs two passes (count, encode). Here a text becomes UTF-8
bytes, words are the maximal runs of non-whitespace bytes (exactly the words of ``str.split()``:
the multi-byte Unicode spaces are turned into b" " first), and each word of up to 15 bytes is
packed *exactly* into two uint64 keys (its bytes, and its length in the top byte). An
open-addressing table of those keys maps words to ids without hashing any Python object. Longer
words (rare) go through a dict. Results equal the plain-Python path bit for bit (tests compare).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

# str.split() whitespace: ASCII \t \n \v \f \r, \x1c-\x1f, space; and these non-ASCII characters.
UNICODE_SPACES = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
                 "\u2028\u2029\u202f\u205f\u3000"
ASCII_SPACES = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "
_UNICODE_SPACE_RE = re.compile(b"|".join(re.escape(c.encode()) for c in UNICODE_SPACES))
SHORT = 15                      # bytes packed into a key; byte 15 holds the length
_MASK = np.array([(1 << (8 * n)) - 1 if n < 8 else (1 << 64) - 1 for n in range(9)], dtype=np.uint64)
_M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)
_SPACE_TABLE = bytes(1 if b in ASCII_SPACES else 0 for b in range(256))   # bytes.translate -> bool


class Words:
    """The words of one text: byte ranges, exact short keys, and where its lines end."""

    def __init__(self, text: str, lower_case: bool = False):
        if lower_case:
            text = text.lower()
        data = text.encode("utf-8", "surrogatepass")
        if b"\r" in data:  # universal newlines, as text-mode file reading
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data.isascii() and _UNICODE_SPACE_RE.search(data):  # word separators, never line ends
            data = _UNICODE_SPACE_RE.sub(b" ", data)
        self.data = data
        # 1 for whitespace, with a space on both sides: transitions pair up as (start, end).
        space = np.frombuffer((b" " + data + b" ").translate(_SPACE_TABLE), dtype=np.bool_)
        edges = np.flatnonzero(space[1:] != space[:-1])
        self.starts, self.ends = edges[0::2], edges[1::2]
        self.newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        self.n = len(self.starts)
        length = self.ends - self.starts
        self.short = length <= SHORT
        self.all_short = bool(self.short.all())
        # Two little-endian uint64 windows at every word start (unaligned reads of zero-padded bytes).
        padded = data + bytes(16)
        view = np.ndarray(shape=(len(data) + 9,), dtype="<u8", buffer=padded, strides=(1,))
        k1 = view[self.starts]
        k1 &= _MASK[np.minimum(length, 8)]
        k2 = view[self.starts + 8]
        k2 &= _MASK[np.clip(length - 8, 0, 7)]
        k2 |= length.astype(np.uint64) << np.uint64(56)
        if not self.all_short:
            k1[~self.short] = 0
            k2[~self.short] = 0
        self.k1, self.k2 = k1, k2

    def word(self, i: int) -> str:
        return self.data[self.starts[i]:self.ends[i]].decode("utf-8", "surrogatepass")

    def words_at(self, indices: np.ndarray) -> list[str]:
        """The words at ``indices``: their bytes gathered with one numpy copy, decoded and split once."""
        if len(indices) == 0:
            return []
        starts = self.starts[indices]
        length = self.ends[indices] - starts
        within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
        dst = np.repeat(np.cumsum(length + 1) - (length + 1), length) + within
        out = np.full(int((length + 1).sum()) - 1, 32, dtype=np.uint8)   # words never hold a space
        out[dst] = np.frombuffer(self.data, dtype=np.uint8)[np.repeat(starts, length) + within]
        return out.tobytes().decode("utf-8", "surrogatepass").split(" ")

    def line_of(self, i: int) -> int:
        """1-based line of word ``i``."""
        return int(np.searchsorted(self.newlines, self.starts[i])) + 1

    def long_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.short)

    def short_keys(self) -> tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """(indices of short words or None for all, their k1, their k2)."""
        if self.all_short:
            return None, self.k1, self.k2
        idx = np.flatnonzero(self.short)
        return idx, self.k1[idx], self.k2[idx]

    def tokens_before(self, byte_positions: np.ndarray) -> np.ndarray:
        """How many words start before each byte position."""
        return np.searchsorted(self.starts, byte_positions)


def _slots(k1: np.ndarray, k2: np.ndarray, bits: int) -> np.ndarray:
    return (((k1 * _M1) ^ (k2 * _M2)) >> np.uint64(64 - bits)).astype(np.int64)


class KeyTable:
    """A set of exact (k1, k2) keys numbered 0, 1, ... by first insertion; open addressing over
    three flat arrays (1-D gathers are what numpy does fast). Grows to stay at most half full."""

    BLOCK = 1 << 16

    def __init__(self, capacity: int = 1024):
        self.n = 0
        self.e1 = np.zeros(max(capacity, 16), dtype=np.uint64)   # keys by entry
        self.e2 = np.zeros(max(capacity, 16), dtype=np.uint64)
        self._resize(max(4, int(max(capacity, 8) - 1).bit_length() + 1))

    def _resize(self, bits: int) -> None:
        self.bits = bits
        self.t1 = np.zeros(1 << bits, dtype=np.uint64)
        self.t2 = np.zeros(1 << bits, dtype=np.uint64)          # 0: empty (a real key holds its length)
        self.te = np.full(1 << bits, -1, dtype=np.int64)        # entry; also the claim slot while placing
        if self.n:
            self._place(self.e1[:self.n], self.e2[:self.n], np.arange(self.n))

    def _place(self, k1: np.ndarray, k2: np.ndarray, entry: np.ndarray) -> None:
        """Slots for distinct keys that are not in the table yet."""
        mask = (1 << self.bits) - 1
        slot = _slots(k1, k2, self.bits)
        pending = np.arange(len(k1))
        while pending.size:
            s = slot[pending]
            free = self.te[s] < 0
            cand, cs = pending[free], s[free]
            self.te[cs] = entry[cand]           # several claimants of one slot: one write wins
            won = self.te[cs] == entry[cand]
            ws, wc = cs[won], cand[won]
            self.t1[ws], self.t2[ws] = k1[wc], k2[wc]
            done = np.zeros(len(pending), dtype=bool)
            done[np.flatnonzero(free)[won]] = True
            move = ~free                        # another key sits there: probe on
            slot[pending[move]] = (s[move] + 1) & mask
            pending = pending[~done]

    def find(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """Entry of every key, -1 when absent."""
        mask = (1 << self.bits) - 1
        s = _slots(k1, k2, self.bits)
        out = np.take(self.te, s)
        idx = np.flatnonzero((np.take(self.t2, s) != k2) | (np.take(self.t1, s) != k1))
        out[idx] = -1                       # not at its home slot: empty there, or another key
        s = s[idx]
        go = np.take(self.t2, s) != 0
        idx, s = idx[go], (s[go] + 1) & mask
        while idx.size:
            t2 = np.take(self.t2, s)
            hit = (t2 == k2[idx]) & (np.take(self.t1, s) == k1[idx])
            out[idx[hit]] = np.take(self.te, s[hit])
            go = ~hit & (t2 != 0)
            idx, s = idx[go], (s[go] + 1) & mask
        return out

    def insert(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        """Entry of every key, adding new keys (numbered in order of first occurrence)."""
        out = np.empty(len(k1), dtype=np.int64)
        for lo in range(0, len(k1), self.BLOCK):
            b1, b2 = k1[lo:lo + self.BLOCK], k2[lo:lo + self.BLOCK]
            ids = self.find(b1, b2)
            new = np.flatnonzero(ids < 0)
            if new.size:
                count, first, inverse = _dedupe(b1[new], b2[new])
                fresh = new[first]
                if self.n + count > (1 << self.bits) // 2:
                    self._resize(int(2 * (self.n + count) - 1).bit_length() + 1)
                if self.n + count > len(self.e1):
                    grow = max(2 * len(self.e1), self.n + count)
                    self.e1 = np.concatenate([self.e1, np.zeros(grow - len(self.e1), np.uint64)])
                    self.e2 = np.concatenate([self.e2, np.zeros(grow - len(self.e2), np.uint64)])
                entry = np.arange(self.n, self.n + count)
                self.e1[entry], self.e2[entry] = b1[fresh], b2[fresh]
                self._place(b1[fresh], b2[fresh], entry)
                self.n += count
                ids[new] = entry[inverse]
            out[lo:lo + self.BLOCK] = ids
        return out


def _dedupe(k1: np.ndarray, k2: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(distinct count, index of each distinct key's first occurrence in order, key -> distinct)."""
    order = np.lexsort((k1, k2))
    s1, s2 = k1[order], k2[order]
    head = np.ones(len(order), dtype=bool)
    head[1:] = (s1[1:] != s1[:-1]) | (s2[1:] != s2[:-1])
    group = np.cumsum(head) - 1                       # sorted position -> group
    first_of_group = np.minimum.reduceat(order, np.flatnonzero(head))
    rank = np.empty(len(first_of_group), dtype=np.int64)
    by_first = np.argsort(first_of_group, kind="stable")
    rank[by_first] = np.arange(len(by_first))         # group -> rank by first occurrence
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = rank[group]
    return len(by_first), first_of_group[by_first], inverse


def count_words(text: str, lower_case: bool = False) -> tuple[list[str], np.ndarray]:
    """Distinct words in first-occurrence order and their counts (``Counter(text.split())``)."""
    w = Words(text, lower_case)
    short, k1, k2 = w.short_keys()
    table = KeyTable(1 << 12)
    entry = table.insert(k1, k2)   # entries are numbered by first occurrence
    counts = [np.bincount(entry, minlength=table.n)]
    # entries are numbered by first occurrence: a word occurs first where its entry exceeds all before
    first_seen = np.ones(len(entry), dtype=bool)
    first_seen[1:] = entry[1:] > np.maximum.accumulate(entry)[:-1]
    pos = np.arange(w.n) if short is None else short
    firsts = [pos[first_seen]]
    long_words: dict[str, list[int]] = {}
    for i in w.long_indices().tolist():
        rec = long_words.setdefault(w.word(i), [i, 0])
        rec[1] += 1
    if long_words:
        firsts.append(np.fromiter((r[0] for r in long_words.values()), np.int64, len(long_words)))
        counts.append(np.fromiter((r[1] for r in long_words.values()), np.int64, len(long_words)))
    first = np.concatenate(firsts)
    count = np.concatenate(counts)
    order = np.argsort(first, kind="stable")
    return w.words_at(first[order]), count[order]


class WordIndex:
    """word → id for a fixed vocabulary, over ``Words`` of any text."""

    def __init__(self, symbols: Sequence[str]):
        joined = Words(" ".join(symbols))
        if joined.n != len(symbols):
            raise ValueError("vocabulary symbols must be non-empty and free of whitespace")
        short, k1, k2 = joined.short_keys()
        short = np.arange(joined.n) if short is None else short
        self.table = KeyTable(max(len(short), 16))
        entry = self.table.insert(k1, k2)
        self.ids = np.full(self.table.n, -1, dtype=np.int64)
        self.ids[entry] = short
        self.long = {symbols[i]: i for i in joined.long_indices().tolist()}
        if self.table.n + len(self.long) != len(symbols):
            raise ValueError("vocabulary symbols must be distinct")

    def lookup(self, w: Words, unk: Optional[int]) -> tuple[np.ndarray, int]:
        """Ids of every word and the index of the first unknown one (-1: none). Unknown words
        get ``unk``, or -1 when it is None."""
        short, k1, k2 = w.short_keys()
        entry = self.table.find(k1, k2)
        if not len(self.ids):   # a vocabulary of long words only
            ids = np.full(w.n, -1, dtype=np.int64)
        elif short is None:
            ids = np.where(entry >= 0, self.ids[entry], -1)
        else:
            ids = np.full(w.n, -1, dtype=np.int64)
            ok = entry >= 0
            ids[short[ok]] = self.ids[entry[ok]]
        for i in w.long_indices().tolist():
            ids[i] = self.long.get(w.word(i), -1)
        missing = np.flatnonzero(ids < 0)
        first = int(missing[0]) if missing.size else -1
        if unk is not None and missing.size:
            ids[missing] = unk
        return ids, first
