"""Raw corpora → deterministic input units → text for the tokenizer.

A *unit* is a contiguous slice of one split's raw data, fixed by the files and ``data.unit_bytes``
alone (never by worker or task counts): whole lines of a big file grouped up to ``unit_bytes``
(boundaries found by seeking to k·unit_bytes and moving past the next newline), one lm1b file, a
byte range of enwik8/text8, or a group of small files. Prepare turns unit i of a split into shard i.

Corpora and their reference semantics are described in README.md, section "Corpora". Nothing is
downloaded here. ``python -m pipeline.data.corpora text8-normalise IN OUT`` turns any text into text8 form.

Units and the Corpus interface are in pipeline/data/corpora/base.py, the document corpora (text,
stdlib) in pipeline/data/corpora/text.py; this module has the reference corpora and the registry.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.common import atomic_write_bytes
from pipeline.data.corpora.base import (
    README,
    REFERENCE_BYTES,
    REFERENCE_HELDOUT,
    SPLITS,
    Corpus,
    CorpusError,
    Piece,
    TokenizerDefaults,
    Unit,
    decode,
    file_piece,
    missing_error,
    read_range,
)
from pipeline.data.corpora.sort import Sort
from pipeline.data.corpora.text import PG19, Stdlib, TextFiles

if TYPE_CHECKING:  # the config module imports torch (via models); the text8 CLI does not need it
    from pipeline.config import DataConfig

class _SplitFiles(Corpus):
    """One file per split, whole lines (wt103, ptb)."""

    names: dict[str, tuple[str, ...]] = {}
    section = ""

    def files(self) -> dict[str, Path]:
        if not self.root.is_dir():
            raise missing_error(self.name, self.root, [n[0] for n in self.names.values()], self.section)
        found, missing = {}, []
        for split in SPLITS:
            hit = next((self.root / n for n in self.names[split] if (self.root / n).is_file()), None)
            if hit is None:
                missing.append(" or ".join(self.names[split]))
            else:
                found[split] = hit
        if missing:
            raise missing_error(self.name, self.root, missing, self.section)
        return found

    def plan(self) -> dict[str, list[Unit]]:
        return self._check_nonempty({s: self._line_units(s, [p]) for s, p in self.files().items()})

    def _where(self, split: str) -> str:
        return f"{self.files()[split]} has no bytes"


class WT103(_SplitFiles):
    """WikiText-103; with ``data.wt103_articles`` the shards also record where each article starts
    (its `` = Title = `` line; `` = = Section = = `` lines do not start one). The tokens are the same."""

    name = "wt103"
    names = {s: (f"wiki.{s}.tokens", f"{s}.txt") for s in SPLITS}
    section = "WikiText-103"
    ARTICLE = re.compile(r"^ = [^=].* = $")

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("word", "char", "byte", "sentencepiece"), count_on=("train",),
                                 lower_case=False, specials=("<eos>",), eos="<eos>", unk="<unk>")

    def options(self) -> dict:
        opts = super().options()
        if self.cfg.wt103_articles:     # only when set: other runs keep their fingerprints
            opts["articles"] = True
        return opts

    @property
    def records_documents(self) -> bool:
        return self.cfg.wt103_articles

    def line_documents(self, unit: Unit) -> Optional[list[tuple[str, bool, bool]]]:
        if not self.cfg.wt103_articles:
            return None
        docs: list[tuple[str, bool, bool]] = []
        lines: list[str] = []
        opens = False
        for line in self.read_text(unit).splitlines(keepends=True):
            if self.ARTICLE.match(line.rstrip("\r\n")):
                if lines:
                    docs.append(("".join(lines), opens, False))
                lines, opens = [], True
            lines.append(line)
        if lines:
            docs.append(("".join(lines), opens, False))
        return docs


class PTB(_SplitFiles):
    name = "ptb"
    names = {s: (f"ptb.{s}.txt", f"{s}.txt") for s in SPLITS}
    section = "Penn Treebank"

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("word", "char", "byte", "sentencepiece"), count_on=SPLITS,
                                 lower_case=True, specials=("<eos>",), eos="<eos>", unk="<unk>")


class LM1B(Corpus):
    """One Billion Word: one file per unit; sentences stored as ``<S> w1 .. wn`` with their starts."""

    name = "lm1b"
    mode = "sentences"
    TRAIN = "training-monolingual.tokenized.shuffled"
    HELDOUT = "heldout-monolingual.tokenized.shuffled"
    TOP = "1-billion-word-language-modeling-benchmark-r13output"
    VOCAB = "1b_word_vocab.txt"

    def base(self) -> Path:
        for cand in (self.root, self.root / self.TOP):
            if (cand / self.TRAIN).is_dir():
                return cand
        raise missing_error(self.name, self.root, [f"{self.TRAIN}/news.en-000NN-of-00100",
                                              f"{self.HELDOUT}/news.en.heldout-000NN-of-00050"],
                       "One Billion Word (lm1b)")

    def heldout(self, k: int) -> Path:
        return self.base() / self.HELDOUT / f"news.en.heldout-{k:05d}-of-00050"

    def files(self) -> dict[str, list[Path]]:
        k = self.cfg.lm1b_valid_shard
        if k == 0:
            raise CorpusError("lm1b: data.lm1b_valid_shard=0 is heldout-00000, the test set; pick another "
                              "heldout shard (1..49) for validation (the reference validated on the test set)")
        if not 0 < k < 50:
            raise CorpusError(f"lm1b: data.lm1b_valid_shard={k} is not a heldout shard (1..49)")
        train = sorted((self.base() / self.TRAIN).glob("news.en-*-of-00100"))
        if not train:
            raise missing_error(self.name, self.base(), [f"{self.TRAIN}/news.en-000NN-of-00100"],
                                "One Billion Word (lm1b)")
        out = {"train": train, "valid": [self.heldout(k)], "test": [self.heldout(0)]}
        for split in ("valid", "test"):
            if not out[split][0].is_file():
                raise missing_error(self.name, self.base(), [str(out[split][0].relative_to(self.base()))],
                               "One Billion Word (lm1b)")
        return out

    def vocab_file(self) -> Optional[str]:
        for cand in (self.root / self.VOCAB, self.base() / self.VOCAB, self.base().parent / self.VOCAB):
            if cand.is_file():
                return str(cand)
        return None

    def tokenizer_defaults(self) -> TokenizerDefaults:
        # Reference: the fixed vocabulary file (<S>, </S>, <UNK> inside); counted on train otherwise.
        return TokenizerDefaults(kinds=("word",), count_on=("train",), lower_case=False,
                                 specials=("<S>", "<UNK>"), bos="<S>", unk="<UNK>",
                                 vocab_file=self.vocab_file())

    def options(self) -> dict:
        return {**super().options(), "lm1b_valid_shard": self.cfg.lm1b_valid_shard}

    def plan(self) -> dict[str, list[Unit]]:
        plan = {}
        for split, files in self.files().items():
            plan[split] = [Unit(split, i, (file_piece(p),)) for i, p in enumerate(files)]
        return self._check_nonempty(plan)


class _ByteRange(Corpus):
    """One raw file; train = all but the last valid+test bytes, then valid, then test (reference)."""

    mode = "bytes"
    file = ""
    section = ""

    def path(self) -> Path:
        path = self.root / self.file if self.root.is_dir() else self.root
        if not path.is_file():
            raise missing_error(self.name, self.root if self.root.is_dir() else self.root.parent,
                           [f"the raw {self.file} file ({REFERENCE_BYTES:,} bytes)"], self.section)
        return path

    def split_ranges(self) -> dict[str, tuple[int, int]]:
        path = self.path()
        size = path.stat().st_size
        valid, test = self.cfg.valid_bytes, self.cfg.test_bytes
        if valid == 0 and test == 0:
            if size != REFERENCE_BYTES:
                raise CorpusError(f"{self.name}: {path} has {size:,} bytes, not the reference {REFERENCE_BYTES:,}; "
                                  f"set data.valid_bytes and data.test_bytes to split it")
            valid = test = REFERENCE_HELDOUT
        if valid <= 0 or test <= 0 or valid + test >= size:
            raise CorpusError(f"{self.name}: data.valid_bytes={valid} and data.test_bytes={test} must be positive "
                              f"and leave train bytes in {path} ({size:,} bytes)")
        return {"train": (0, size - valid - test), "valid": (size - valid - test, size - test),
                "test": (size - test, size)}

    def options(self) -> dict:
        return {**super().options(), "splits": {s: list(r) for s, r in self.split_ranges().items()}}

    def plan(self) -> dict[str, list[Unit]]:
        path, ub = self.path(), self.cfg.unit_bytes
        if ub <= 0:
            raise CorpusError(f"data.unit_bytes must be positive, got {ub}")
        size = path.stat().st_size
        plan = {}
        for split, (lo, hi) in self.split_ranges().items():
            plan[split] = [Unit(split, i, (Piece(str(path), a, min(a + ub, hi), size),))
                           for i, a in enumerate(range(lo, hi, ub))]
        return self._check_nonempty(plan)

    def read_text(self, unit: Unit) -> str:
        p = unit.pieces[0]  # no line handling: a character corpus is one long line
        return decode(read_range(p.path, p.start, p.end), p.path, p.start, self.cfg.errors)


class Enwik8(_ByteRange):
    name = "enwik8"
    file = "enwik8"
    section = "enwik8"

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("byte",))

    def options(self) -> dict:
        return {**super().options(), "keep_newline": self.cfg.keep_newline}

    def read_bytes(self, unit: Unit) -> bytes:
        data = super().read_bytes(unit)
        # The reference's prep_enwik8 turned byte 10 into line breaks that its reader then dropped.
        return data if self.cfg.keep_newline else data.replace(b"\n", b"")


class Text8(_ByteRange):
    name = "text8"
    file = "text8"
    section = "text8"

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("char", "byte"), count_on=SPLITS)


CORPORA = {c.name: c for c in (WT103, PTB, LM1B, Enwik8, Text8, TextFiles, Stdlib, PG19, Sort)}


def open_corpus(cfg: DataConfig) -> Corpus:
    if cfg.corpus not in CORPORA:
        raise CorpusError(f"data.corpus={cfg.corpus!r} is unknown; choose one of {sorted(CORPORA)}")
    if cfg.corpus not in ("stdlib", "text", "sort") and not cfg.path:
        raise CorpusError(f"{cfg.corpus}: data.path is empty; point it at the corpus (see {README})")
    return CORPORA[cfg.corpus](cfg)


# ----------------------------------------------------------------------------- text8 normaliser

_DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEXT8 = {i: " " for i in range(128)}
_TEXT8.update({ord(c): c for c in "abcdefghijklmnopqrstuvwxyz"})
_TEXT8.update({ord(c): c.lower() for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})
_TEXT8.update({ord(str(d)): f" {w} " for d, w in enumerate(_DIGITS)})
_NOT_TEXT8 = re.compile(r"[^a-z ]")
_SPACES = re.compile(r" {2,}")


def text8_normalise(text: str) -> str:
    """Text in text8 form, as Mahoney's wikifil.pl does to each line: ASCII letters lower-cased,
    digits spelled out ("20" → " two zero "), everything else a space, runs of spaces squeezed;
    each line starts with one space and loses its trailing one, so lines concatenate.
    """
    # Per line or on the whole text at once gives the same string (a newline is just a space).
    s = _NOT_TEXT8.sub(" ", (" " + text + " ").translate(_TEXT8))
    return _SPACES.sub(" ", s)[:-1]


def _normalise_file(src: str, dst: str) -> None:
    with open(src, encoding="utf-8", errors="replace") as f:
        text = f.read()
    atomic_write_bytes(dst, text8_normalise(text).encode("ascii"))


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.data.corpora", description="corpus tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    norm = sub.add_parser("text8-normalise", help="turn UTF-8 text into text8 form (a-z and single spaces)")
    norm.add_argument("input")
    norm.add_argument("output")
    args = parser.parse_args(argv)
    if args.cmd == "text8-normalise":
        _normalise_file(args.input, args.output)
        print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes)", file=sys.stderr)
    return 0

