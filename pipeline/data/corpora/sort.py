"""The ∞-former paper's synthetic sorting task (Martins et al. 2022, §5.1), generated (``data.corpus: sort``).

Vocabulary: the 20 symbols ``0``..``19``, the separator ``<sep>`` (id 20) and ``<pad>`` (id 21,
never emitted: the reference's ignore index; kept so the model's vocabulary is the paper's 22).
A sequence is ``x_1 .. x_n <sep> y_1 .. y_20`` with ``n = data.sort_length``:

- two distributions ``p0, p1`` over the symbols, each from integer weights uniform in 1..9,
  normalised; ``x_j`` is drawn from ``(1 - j/n)·p0 + (j/n)·p1`` (j = 1..n), so the distribution
  drifts linearly and the answer cannot be read off the last tokens;
- ``y`` is every symbol sorted by its count over the whole sequence, most frequent first, ties in
  order of first occurrence, symbols never seen last in ascending order (``Counter.most_common``
  then the rest, as the reference generator).

Each sequence is one document (``train.document_reset`` gives every one an empty memory), and only
its 20 answer tokens are scored targets (``scored.npy``): the model reads ``x <sep> y_<k`` and
predicts ``y_k``, as the reference's teacher forcing with every other target the ignore index.

Sequence ``i`` of a split is drawn from ``SeedSequence([sort_seed, split, i])``: a sequence is the
same whatever the unit grouping, worker count or job array. Unit ``u`` of a split holds sequences
``[u·k, (u+1)·k)`` with ``k = data.sort_unit_sequences``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.corpora.base import SPLITS, Corpus, CorpusError, TokenizerDefaults, Unit

if TYPE_CHECKING:
    from pipeline.config import DataConfig

N_SYMBOLS = 20
SEP, PAD = 20, 21
SYMBOLS = tuple(str(i) for i in range(N_SYMBOLS)) + ("<sep>", "<pad>")


def drift_weights(n: int, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """``[n, 20]``: the distribution of ``x_j`` for j = 1..n."""
    frac = (np.arange(1, n + 1, dtype=np.float64) / n)[:, None]
    return (1.0 - frac) * p0[None, :] + frac * p1[None, :]


def sorted_symbols(x: np.ndarray) -> np.ndarray:
    """The 20 symbols by descending count in ``x``, ties by first occurrence, unseen ascending."""
    counts = np.bincount(x, minlength=N_SYMBOLS)
    first = np.full(N_SYMBOLS, len(x), dtype=np.int64)
    seen_at = np.unique(x, return_index=True)
    first[seen_at[0]] = seen_at[1]
    seen = np.flatnonzero(counts)
    seen = seen[np.lexsort((first[seen], -counts[seen]))]
    unseen = np.flatnonzero(counts == 0)
    return np.concatenate([seen, unseen]).astype(np.int64)


def generate_sequence(n: int, seed: int, split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x [n], y [20])`` of sequence ``index`` of ``split``."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    p0, p1 = (w / w.sum() for w in rng.integers(1, 10, size=(2, N_SYMBOLS)).astype(np.float64))
    cdf = np.cumsum(drift_weights(n, p0, p1), axis=1)
    u = rng.random(n) * cdf[:, -1]
    x = (cdf < u[:, None]).sum(axis=1).astype(np.int64)
    return x, sorted_symbols(x)


class Sort(Corpus):
    name = "sort"
    mode = "generated"
    scored = True

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.length = cfg.sort_length
        self.counts = dict(zip(SPLITS, cfg.sort_sequences))
        self.per_unit = cfg.sort_unit_sequences

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("word",), symbols=SYMBOLS)

    def options(self) -> dict:
        return {"length": self.length, "sequences": [self.counts[s] for s in SPLITS], "seed": self.cfg.sort_seed,
                "unit_sequences": self.per_unit}

    def plan(self) -> dict[str, list[Unit]]:
        return {s: [Unit(s, u, ()) for u in range(-(-self.counts[s] // self.per_unit))] for s in SPLITS}

    def identity(self, unit: Unit) -> list:
        return [self.options(), unit.split, unit.index]

    def sequences(self, unit: Unit) -> range:
        lo = unit.index * self.per_unit
        return range(lo, min(lo + self.per_unit, self.counts[unit.split]))

    def generate(self, unit: Unit, tok=None) -> tuple[np.ndarray, None, np.ndarray, np.ndarray]:
        """(tokens, no sentence starts, document starts, scored) of a unit: ids are the symbols
        themselves (the fixed vocabulary's order)."""
        if tok is not None and tok.encode(" ".join(SYMBOLS)).tolist() != list(range(len(SYMBOLS))):
            raise CorpusError(f"sort: the tokenizer does not map {SYMBOLS[0]}..{SYMBOLS[-1]} to ids "
                              f"0..{len(SYMBOLS) - 1}; prepare the sort corpus with its own word tokenizer")
        parts, starts, scored = [], [], []
        at = 0
        for i in self.sequences(unit):
            x, y = generate_sequence(self.length, self.cfg.sort_seed, unit.split, i)
            seq = np.concatenate([x, [SEP], y])
            flags = np.zeros(len(seq), dtype=bool)
            flags[-N_SYMBOLS:] = True
            parts.append(seq)
            scored.append(flags)
            starts.append(at)
            at += len(seq)
        return np.concatenate(parts), None, np.asarray(starts, dtype=np.int64), np.concatenate(scored)

    def read_text(self, unit: Unit) -> str:
        """One line per sequence in symbols (the reference's file format, ``<sep>`` for 20)."""
        tokens, _, starts, _ = self.generate(unit)
        return "".join(" ".join(SYMBOLS[t] for t in seq) + "\n" for seq in np.split(tokens, starts[1:]))
