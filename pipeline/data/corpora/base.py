"""What every corpus is: input units (``Unit`` of ``Piece``s), the ``Corpus`` interface prepare
reads through, its errors, and the byte-range helpers the corpora share (see pipeline.data.corpora)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pipeline.common import XlpipeError

if TYPE_CHECKING:  # the config module imports torch (via models); the text8 CLI does not need it
    from pipeline.config import DataConfig

SPLITS = ("train", "valid", "test")
README = "README.md, section \"Corpora\""
REFERENCE_BYTES = 100_000_000    # enwik8 and text8: the whole file
REFERENCE_HELDOUT = 5_000_000    # reference valid and test sizes (last 10M bytes, 5M each)
_SEEK_BLOCK = 1 << 16
GLOB_MAGIC = re.compile(r"[*?[]")


class CorpusError(XlpipeError, ValueError):
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
    symbols: tuple[str, ...] = ()           # word: the whole vocabulary, fixed (generated tasks)


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


def file_piece(path: Path, start: int = 0, end: Optional[int] = None) -> Piece:
    size = path.stat().st_size
    return Piece(str(path), start, size if end is None else end, size)


# ----------------------------------------------------------------------------- corpora


class Corpus:
    """Base: ``plan()`` the units of each split, ``read_*`` a unit's raw data."""

    name = ""
    mode = "lines"   # lines | sentences | bytes | documents | generated (how prepare encodes a unit)
    scored = False   # True: only some targets count (shards carry scored.npy; generated tasks)

    @property
    def records_documents(self) -> bool:
        """Whether shards record document starts (``train.document_reset`` needs them)."""
        return self.mode in ("documents", "generated")

    def line_documents(self, unit: Unit) -> Optional[list[tuple[str, bool, bool]]]:
        """A line corpus's unit as ``(text, opens, ends)`` documents when it records them (WT103
        articles), else None."""
        return None

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


def missing_error(name: str, root: Path, expected: list[str], section: str) -> CorpusError:
    return CorpusError(f"{name}: expected {', '.join(expected)} in {root.resolve()} (data.path); "
                       f"get the corpus as described in {README} → {section}")
