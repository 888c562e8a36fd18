"""Raw corpora → deterministic input units → text for the tokenizer.

A *unit* is a contiguous slice of one split's raw data, fixed by the files and ``data.unit_bytes``
alone (never by worker or task counts): whole lines of a big file grouped up to ``unit_bytes``
(boundaries found by seeking to k·unit_bytes and moving past the next newline), one lm1b file, a
byte range of enwik8/text8, or a group of small files. Prepare turns unit i of a split into shard i.

Corpora and their reference semantics are described in README.md, section "Corpora". Nothing is
downloaded here. ``python -m pipeline.corpora text8-normalise IN OUT`` turns any text into text8 form.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.shards import atomic_write_bytes

if TYPE_CHECKING:  # the config module imports torch (via models); the text8 CLI does not need it
    from pipeline.config import DataConfig

SPLITS = ("train", "valid", "test")
README = "README.md, section \"Corpora\""
REFERENCE_BYTES = 100_000_000    # enwik8 and text8: the whole file
REFERENCE_HELDOUT = 5_000_000    # reference valid and test sizes (last 10M bytes, 5M each)
_SEEK_BLOCK = 1 << 16
_MAGIC = re.compile(r"[*?[]")


class CorpusError(ValueError):
    """Missing or malformed corpus input: names the file (and byte offset) and the fix."""


@dataclasses.dataclass(frozen=True)
class Piece:
    path: str              # absolute path of a raw file
    start: int             # byte range [start, end) of it
    end: int
    file_size: int


@dataclasses.dataclass(frozen=True)
class Unit:
    split: str
    index: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.pieces)

    def describe(self) -> str:
        first = self.pieces[0]
        more = f" and {len(self.pieces) - 1} more files" if len(self.pieces) > 1 else ""
        return f"{self.split} unit {self.index} ({first.path} bytes [{first.start}, {first.end}){more})"


@dataclasses.dataclass(frozen=True)
class TokenizerDefaults:
    """The reference tokenizer settings for a corpus (README "Corpora")."""
    kinds: tuple[str, ...]                  # tokenizer kinds that fit the corpus
    count_on: tuple[str, ...] = ("train",)  # splits a vocabulary is counted on
    lower_case: bool = False
    specials: tuple[str, ...] = ()          # word vocabulary: symbols before the counted ones
    eos: Optional[str] = None               # word: appended to every line
    bos: Optional[str] = None               # word: opens every line (lm1b sentences)
    unk: Optional[str] = None               # word: unknown words map to it when the vocabulary has it
    vocab_file: Optional[str] = None        # word: fixed vocabulary instead of counting


# ----------------------------------------------------------------------------- shared helpers


def decode(raw: bytes, path: str, offset: int, errors: str) -> str:
    """UTF-8 text; invalid bytes are an error naming the file and byte offset unless errors=replace."""
    try:
        return raw.decode("utf-8", errors="replace" if errors == "replace" else "strict")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: invalid UTF-8 at byte offset {offset + exc.start} "
                          f"({raw[exc.start:exc.start + 4]!r}); fix the file or set data.errors=replace "
                          f"to read invalid bytes as U+FFFD") from None


def read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise CorpusError(f"{path}: expected bytes [{start}, {end}) but the file is shorter now; "
                          f"it changed while prepare ran")
    return data


def line_boundaries(path: str, lo: int, hi: int, unit_bytes: int) -> list[int]:
    """Cuts of [lo, hi): lo, then just past the first newline at or after each lo + k·unit_bytes
    (k = 1, 2, ...; equal cuts merged), then hi. Each cut costs one seek, not a scan."""
    if unit_bytes <= 0:
        raise CorpusError(f"data.unit_bytes must be positive, got {unit_bytes}")
    cuts, k = [lo], 1
    with open(path, "rb") as f:
        while lo + k * unit_bytes < hi:
            pos = lo + k * unit_bytes
            f.seek(pos)
            nl = -1
            while pos < hi:
                block = f.read(min(_SEEK_BLOCK, hi - pos))
                if not block:
                    break
                i = block.find(b"\n")
                if i >= 0:
                    nl = pos + i
                    break
                pos += len(block)
            if nl < 0 or nl + 1 >= hi:
                break
            cuts.append(nl + 1)
            k = (nl - lo) // unit_bytes + 1  # the next multiple past this newline
    cuts.append(hi)
    return cuts


def hash_split(key: str, valid_fraction: float, test_fraction: float) -> str:
    """Stable split of a document by the sha256 of its key (a path relative to the corpus root)."""
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    return "valid" if u < test_fraction + valid_fraction else "train"


def _piece(path: Path, start: int = 0, end: Optional[int] = None) -> Piece:
    size = path.stat().st_size
    return Piece(str(path), start, size if end is None else end, size)


# ----------------------------------------------------------------------------- corpora


class Corpus:
    """Base: ``plan()`` the units of each split, ``read_*`` a unit's raw data."""

    name = ""
    mode = "lines"   # lines | sentences | bytes | documents (how prepare encodes a unit)

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.root = Path(cfg.path).expanduser() if cfg.path else Path()

    def tokenizer_defaults(self) -> TokenizerDefaults:
        raise NotImplementedError

    def options(self) -> dict:
        """Options that shape the tokens (recorded in the manifest)."""
        return {"errors": self.cfg.errors, "unit_bytes": self.cfg.unit_bytes}

    def plan(self) -> dict[str, list[Unit]]:
        raise NotImplementedError

    def identity(self, unit: Unit) -> list:
        """What a unit's content depends on, for re-run checks (sizes and mtimes, not content)."""
        out = []
        for p in unit.pieces:
            st = os.stat(p.path)
            out.append([self._rel(p.path), st.st_size, int(st.st_mtime), p.start, p.end])
        return out

    def _rel(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def read_bytes(self, unit: Unit) -> bytes:
        return b"".join(read_range(p.path, p.start, p.end) for p in unit.pieces)

    def read_text(self, unit: Unit) -> str:
        """Text of a unit; a file's unterminated last line gets its newline (reference: every line
        read from a file gets ``<eos>``, the last one too)."""
        parts = []
        for p in unit.pieces:
            text = decode(read_range(p.path, p.start, p.end), p.path, p.start, self.cfg.errors)
            if p.end == p.file_size and text and not text.endswith(("\n", "\r")):
                text += "\n"
            parts.append(text)
        return "".join(parts)

    def _check_nonempty(self, plan: dict[str, list[Unit]]) -> dict[str, list[Unit]]:
        for split in SPLITS:
            if not plan.get(split) or all(u.nbytes == 0 for u in plan[split]):
                raise CorpusError(f"{self.name}: split {split!r} is empty ({self._where(split)}); "
                                  f"every split needs text")
        return plan

    def _where(self, split: str) -> str:
        return f"under {self.root}"

    def _line_units(self, split: str, files: list[Path]) -> list[Unit]:
        units = []
        for path in files:
            size = path.stat().st_size
            cuts = line_boundaries(str(path), 0, size, self.cfg.unit_bytes) if size else []
            for lo, hi in zip(cuts, cuts[1:]):
                units.append(Unit(split, len(units), (Piece(str(path), lo, hi, size),)))
        return units


def _missing(name: str, root: Path, expected: list[str], section: str) -> CorpusError:
    return CorpusError(f"{name}: expected {', '.join(expected)} in {root.resolve()} (data.path); "
                       f"get the corpus as described in {README} → {section}")


class _SplitFiles(Corpus):
    """One file per split, whole lines (wt103, ptb)."""

    names: dict[str, tuple[str, ...]] = {}
    section = ""

    def files(self) -> dict[str, Path]:
        if not self.root.is_dir():
            raise _missing(self.name, self.root, [n[0] for n in self.names.values()], self.section)
        found, missing = {}, []
        for split in SPLITS:
            hit = next((self.root / n for n in self.names[split] if (self.root / n).is_file()), None)
            if hit is None:
                missing.append(" or ".join(self.names[split]))
            else:
                found[split] = hit
        if missing:
            raise _missing(self.name, self.root, missing, self.section)
        return found

    def plan(self) -> dict[str, list[Unit]]:
        return self._check_nonempty({s: self._line_units(s, [p]) for s, p in self.files().items()})

    def _where(self, split: str) -> str:
        return f"{self.files()[split]} has no bytes"


class WT103(_SplitFiles):
    name = "wt103"
    names = {s: (f"wiki.{s}.tokens", f"{s}.txt") for s in SPLITS}
    section = "WikiText-103"

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("word", "char", "byte", "sentencepiece"), count_on=("train",),
                                 lower_case=False, specials=("<eos>",), eos="<eos>", unk="<unk>")


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
        raise _missing(self.name, self.root, [f"{self.TRAIN}/news.en-000NN-of-00100",
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
            raise _missing(self.name, self.base(), [f"{self.TRAIN}/news.en-000NN-of-00100"], "One Billion Word (lm1b)")
        out = {"train": train, "valid": [self.heldout(k)], "test": [self.heldout(0)]}
        for split in ("valid", "test"):
            if not out[split][0].is_file():
                raise _missing(self.name, self.base(), [str(out[split][0].relative_to(self.base()))],
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
            plan[split] = [Unit(split, i, (_piece(p),)) for i, p in enumerate(files)]
        return self._check_nonempty(plan)


class _ByteRange(Corpus):
    """One raw file; train = all but the last valid+test bytes, then valid, then test (reference)."""

    mode = "bytes"
    file = ""
    section = ""

    def path(self) -> Path:
        path = self.root / self.file if self.root.is_dir() else self.root
        if not path.is_file():
            raise _missing(self.name, self.root if self.root.is_dir() else self.root.parent,
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


class TextFiles(Corpus):
    """The user's files: globs in data.path (comma-separated); ``*.jsonl`` holds one document per
    line in ``data.text_field``. A document's split is a stable hash of its path relative to the
    glob's base directory (JSONL: the path and the record's byte offset)."""

    name = "text"
    mode = "documents"

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self._keys: Optional[dict[str, str]] = None   # absolute path -> key (set by plan)

    def tokenizer_defaults(self) -> TokenizerDefaults:
        return TokenizerDefaults(kinds=("word", "char", "byte", "sentencepiece"), count_on=("train",),
                                 specials=("<eos>", "<unk>"), eos="<eos>", unk="<unk>")

    def options(self) -> dict:
        return {**super().options(), "valid_fraction": self.cfg.valid_fraction,
                "test_fraction": self.cfg.test_fraction, "text_field": self.cfg.text_field}

    def sources(self) -> list[tuple[Path, str]]:
        """(absolute path, key relative to its glob's base), sorted by key."""
        patterns = [g.strip() for g in self.cfg.path.split(",") if g.strip()]
        if not patterns:
            raise CorpusError("text: data.path is empty; give one or more globs, e.g. 'data/**/*.txt,more/*.jsonl' "
                              f"(see {README} → Your own text)")
        seen, out = set(), []
        for pattern in patterns:
            parts = Path(os.path.expanduser(pattern)).parts
            fixed = []
            for part in parts[:-1]:  # the directories before the first wildcard
                if _MAGIC.search(part):
                    break
                fixed.append(part)
            base = Path(*fixed) if fixed else Path(".")
            hits = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if Path(p).is_file()]
            if not hits:
                raise CorpusError(f"text: the glob {pattern!r} (data.path) matches no files")
            for p in hits:
                real = p.resolve()
                if real not in seen:
                    seen.add(real)
                    out.append((p.absolute(), p.absolute().relative_to(base.absolute()).as_posix()))
        return sorted(out, key=lambda x: (x[1], str(x[0])))

    def _rel(self, path: str) -> str:
        if self._keys is None:
            self._keys = {str(p): key for p, key in self.sources()}
        return self._keys.get(path, path)

    def _assign(self) -> dict[str, list[Path]]:
        self._keys = {}
        split_files: dict[str, list[Path]] = {s: [] for s in SPLITS}
        for path, key in self.sources():
            self._keys[str(path)] = key
            if path.suffix == ".jsonl":
                for s in SPLITS:  # records are split one by one when read
                    split_files[s].append(path)
            else:
                split_files[hash_split(key, self.cfg.valid_fraction, self.cfg.test_fraction)].append(path)
        return split_files

    def plan(self) -> dict[str, list[Unit]]:
        ub = self.cfg.unit_bytes
        if ub <= 0:
            raise CorpusError(f"data.unit_bytes must be positive, got {ub}")
        plan = {}
        for split, files in self._assign().items():
            units: list[Unit] = []
            group: list[Piece] = []

            def close():
                if group:
                    units.append(Unit(split, len(units), tuple(group)))
                    group.clear()

            for path in files:
                size = path.stat().st_size
                if size > ub:  # a big file: line-aligned ranges of its own
                    close()
                    cuts = line_boundaries(str(path), 0, size, ub)
                    for lo, hi in zip(cuts, cuts[1:]):
                        units.append(Unit(split, len(units), (Piece(str(path), lo, hi, size),)))
                    continue
                if group and sum(p.end - p.start for p in group) + size > ub:
                    close()
                group.append(Piece(str(path), 0, size, size))
            close()
            plan[split] = units
        for split in SPLITS:
            if not plan[split]:
                raise CorpusError(f"{self.name}: split {split!r} is empty: no file hashed to it "
                                  f"({self._where(split)}); add files or raise data.{split}_fraction")
        return plan

    def _where(self, split: str) -> str:
        return f"data.path={self.cfg.path!r}, valid_fraction={self.cfg.valid_fraction}, " \
               f"test_fraction={self.cfg.test_fraction}"

    def read_documents(self, unit: Unit) -> list[tuple[str, bool]]:
        """(text, ends_document) of each document: whole files or this split's JSONL records, each
        ending with a newline; a big file cut into several units ends in its last unit."""
        out = []
        for p in unit.pieces:
            raw = read_range(p.path, p.start, p.end)
            if p.path.endswith(".jsonl"):
                out.extend((doc, True) for doc in self._records(p, raw, unit.split))
                continue
            text = decode(raw, p.path, p.start, self.cfg.errors)
            end = p.end == p.file_size
            if end and text and not text.endswith("\n"):
                text += "\n"
            out.append((text, end))
        return out

    def _records(self, p: Piece, raw: bytes, split: str) -> list[str]:
        key = self._rel(p.path)
        out, pos = [], 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            end = len(raw) if nl < 0 else nl + 1
            line, offset = raw[pos:end], p.start + pos
            pos = end
            if not line.strip():
                continue
            if hash_split(f"{key}:{offset}", self.cfg.valid_fraction, self.cfg.test_fraction) != split:
                continue
            text = decode(line, p.path, offset, self.cfg.errors)
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{p.path}: invalid JSON in the record at byte offset {offset}: {exc.msg}") from None
            field = self.cfg.text_field
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise CorpusError(f"{p.path}: the record at byte offset {offset} has no string field "
                                  f"{field!r} (data.text_field)")
            doc = rec[field]
            out.append(doc if doc.endswith("\n") or not doc else doc + "\n")
        return out


class Stdlib(TextFiles):
    """The running interpreter's standard-library sources: a real corpus that is always here."""

    name = "stdlib"
    SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.root = Path(cfg.path).expanduser() if cfg.path else Path(sysconfig.get_paths()["stdlib"])

    def options(self) -> dict:
        opts = super().options()
        opts.pop("text_field")
        return opts

    def sources(self) -> list[tuple[Path, str]]:
        if not self.root.is_dir():
            raise CorpusError(f"stdlib: {self.root} is not a directory (data.path; empty = this Python's stdlib)")
        out = []
        for path in self.root.rglob("*.py"):
            rel = path.relative_to(self.root)
            if self.SKIP.isdisjoint(rel.parts[:-1]) and path.is_file():
                out.append((path, rel.as_posix()))
        if not out:
            raise CorpusError(f"stdlib: no *.py files under {self.root}")
        return sorted(out, key=lambda x: x[1])

    def _where(self, split: str) -> str:
        return f"{self.root}"


CORPORA = {c.name: c for c in (WT103, PTB, LM1B, Enwik8, Text8, TextFiles, Stdlib)}


def open_corpus(cfg: DataConfig) -> Corpus:
    if cfg.corpus not in CORPORA:
        raise CorpusError(f"data.corpus={cfg.corpus!r} is unknown; choose one of {sorted(CORPORA)}")
    if cfg.corpus not in ("stdlib", "text") and not cfg.path:
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

    parser = argparse.ArgumentParser(prog="python -m pipeline.corpora", description="corpus tools")
    sub = parser.add_subparsers(dest="cmd", required=True)
    norm = sub.add_parser("text8-normalise", help="turn UTF-8 text into text8 form (a-z and single spaces)")
    norm.add_argument("input")
    norm.add_argument("output")
    args = parser.parse_args(argv)
    if args.cmd == "text8-normalise":
        _normalise_file(args.input, args.output)
        print(f"wrote {args.output} ({os.path.getsize(args.output):,} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
