"""What an epoch's token sequence is, for the streams (pipeline/data/streams.py): the split in
order, or lm1b's shuffled sentences. Each source reads tokens ``[lo, hi)`` of epoch ``e``'s
sequence and, beside them, where sentences or documents start and which targets are scored."""
from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.data.shards import SplitTokens

# RNG streams: SeedSequence([seed, purpose, epoch, index]); purpose 0 is the streams' roll.
_CHUNK_ORDER, _SENTENCES = 1, 2


class OrderedSource:
    """The split itself, every epoch."""

    def __init__(self, tokens: SplitTokens):
        self.tokens = tokens

    def read(self, epoch: int, lo: int, hi: int, out: np.ndarray) -> None:
        self.tokens.read(lo, hi, out=out)

    def flags(self, epoch: int, lo: int, hi: int, starts: Optional[np.ndarray], scored: Optional[np.ndarray]) -> None:
        self.tokens.flags(lo, hi, starts, scored)


class ShuffledSentences:
    """Epoch ``e``'s sequence: chunks in a shuffled order, each with its sentences shuffled."""

    def __init__(self, tokens: SplitTokens, seed: int, cache_chunks: int = 4):
        self.tokens, self.seed = tokens, seed
        self.lengths = np.array([n for shard in tokens.info.shards for n in shard.chunks], dtype=np.int64)
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._cache_chunks = max(1, cache_chunks)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk order, start of each ordered chunk in the epoch's sequence)."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:   # at most two epochs are live (streams cross one at a time)
                self._orders.pop(min(self._orders))
            rng = np.random.default_rng([self.seed, _CHUNK_ORDER, epoch])
            order = rng.permutation(len(self.lengths))
            starts = np.concatenate([[0], np.cumsum(self.lengths[order])])
            self._orders[epoch] = (order, starts)
        return self._orders[epoch]

    def shuffled_chunk(self, epoch: int, k: int) -> np.ndarray:
        return self._shuffled(epoch, k)[0]

    def _shuffled(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(the chunk's tokens with its sentences shuffled, True where a sentence starts)."""
        hit = self._cache.get((epoch, k))
        if hit is None:
            raw = self.tokens.chunk(k)
            starts = self.tokens.sentence_starts(k)
            if len(starts) == 0 or starts[0] != 0:          # tokens before the first start: one more piece
                starts = np.concatenate([[0], starts])
            lens = np.diff(np.append(starts, len(raw)))
            perm = np.random.default_rng([self.seed, _SENTENCES, epoch, k]).permutation(len(starts))
            new_lens = lens[perm]
            new_starts = np.cumsum(new_lens) - new_lens
            # Gather index: output position p in sentence q comes from starts[perm[q]] + (p - new_starts[q]).
            src = np.arange(len(raw)) + np.repeat(starts[perm] - new_starts, new_lens)
            arr = raw[src]
            opens = np.zeros(len(raw), dtype=bool)
            opens[new_starts[new_lens > 0]] = True
            if len(self._cache) >= self._cache_chunks:
                self._cache.pop(next(iter(self._cache)))
            hit = self._cache[(epoch, k)] = (arr, opens)
        return hit

    def read(self, epoch: int, lo: int, hi: int, out: np.ndarray) -> None:
        order, starts = self.order(epoch)
        q = int(np.searchsorted(starts, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            arr = self.shuffled_chunk(epoch, int(order[q]))
            base = int(starts[q])
            take = min(hi, base + len(arr)) - pos
            out[pos - lo: pos - lo + take] = arr[pos - base: pos - base + take]
            pos += take
            q += 1

    def flags(self, epoch: int, lo: int, hi: int, starts: Optional[np.ndarray], scored: Optional[np.ndarray]) -> None:
        if scored is not None:     # refused when the streams are opened (SegmentStreams)
            raise ValueError("shuffled_sentences streams do not carry scored targets")
        if starts is None:
            return
        order, offsets = self.order(epoch)
        q = int(np.searchsorted(offsets, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            opens = self._shuffled(epoch, int(order[q]))[1]
            base = int(offsets[q])
            take = min(hi, base + len(opens)) - pos
            starts[pos - lo: pos - lo + take] = opens[pos - base: pos - base + take]
            pos += take
            q += 1
