"""Document corpora: the user's own files (``text``: plain text or JSONL, split by a stable hash)
and the running interpreter's standard library (``stdlib``, the always-available demo corpus)."""
from __future__ import annotations

import glob
import json
import os
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.data.corpora.base import (
    GLOB_MAGIC,
    README,
    SPLITS,
    Corpus,
    CorpusError,
    Piece,
    TokenizerDefaults,
    Unit,
    decode,
    hash_split,
    line_boundaries,
    read_range,
)

if TYPE_CHECKING:
    from pipeline.config import DataConfig


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
                if GLOB_MAGIC.search(part):
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

    def read_documents(self, unit: Unit) -> list[tuple[str, bool, bool]]:
        """(text, opens_document, ends_document) of each document: whole files or this split's JSONL
        records, each ending with a newline; a big file cut into several units opens in its first
        unit and ends in its last."""
        out = []
        for p in unit.pieces:
            raw = read_range(p.path, p.start, p.end)
            if p.path.endswith(".jsonl"):
                out.extend((doc, True, True) for doc in self._records(p, raw, unit.split))
                continue
            text = decode(raw, p.path, p.start, self.cfg.errors)
            end = p.end == p.file_size
            if end and text and not text.endswith("\n"):
                text += "\n"
            out.append((text, p.start == 0, end))
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


class PG19(TextFiles):
    """PG-19 (Rae et al. 2020) in DeepMind's release layout: ``train/``, ``validation/`` and ``test/``
    folders of one book per ``<id>.txt`` (``metadata.csv`` beside them is not needed). Each book is
    one document, kept whole (a book larger than data.unit_bytes spans consecutive units)."""

    name = "pg19"
    FOLDERS = {"train": "train", "valid": "validation", "test": "test"}

    def __init__(self, cfg: DataConfig):
        super().__init__(cfg)
        self.root = Path(cfg.path).expanduser()

    def tokenizer_defaults(self) -> TokenizerDefaults:
        # The papers use a 32k subword vocabulary (Rae et al.: SubwordTextEncoder); sentencepiece here.
        return TokenizerDefaults(kinds=("sentencepiece", "word", "char", "byte"), count_on=("train",),
                                 specials=("<eos>", "<unk>"), eos="<eos>", unk="<unk>")

    def options(self) -> dict:
        return {"errors": self.cfg.errors, "unit_bytes": self.cfg.unit_bytes}

    def _books(self) -> dict[str, list[Path]]:
        out = {}
        for split, folder in self.FOLDERS.items():
            d = self.root / folder
            if not d.is_dir():
                raise CorpusError(f"pg19: {d} is not a directory; data.path must hold the release's train/, "
                                  f"validation/ and test/ folders (see {README} → PG-19)")
            books = sorted(p for p in d.glob("*.txt") if p.is_file())
            if not books:
                raise CorpusError(f"pg19: {d} holds no <id>.txt books")
            out[split] = books
        return out

    def sources(self) -> list[tuple[Path, str]]:
        return [(p.absolute(), p.relative_to(self.root).as_posix()) for books in self._books().values() for p in books]

    def _assign(self) -> dict[str, list[Path]]:
        books = self._books()
        self._keys = {str(p.absolute()): p.relative_to(self.root).as_posix() for ps in books.values() for p in ps}
        return {split: [p.absolute() for p in ps] for split, ps in books.items()}

    def _where(self, split: str) -> str:
        return f"{self.root / self.FOLDERS[split]}"
