"""Token shards and their manifest (docs/architecture.md, contract 1).

A split is an ordered list of webdataset tars ``{split}/shard-%06d.tar``. Shard ``i`` holds the
tokens of input unit ``i`` (a deterministic slice of the corpus, see ``pipeline.prepare``) as
consecutive chunks of ``chunk_tokens`` ids (the unit's last chunk is shorter; chunks of sentence
corpora end on sentence boundaries). A sample is ``{__key__: "<shard>_<chunk>", "tokens.npy"}``
plus ``"starts.npy"`` (sentence or document start offsets within the chunk) for corpora with
sentences or documents, and ``"scored.npy"`` (uint8 per token: 1 where the token is a scored
target) for task corpora whose loss counts only some positions (the sorting task); ``.npy`` of
uint16 when the vocabulary fits, else uint32 — never pickle.

Tars are written deterministically (fixed mtime/owner/order) and atomically, so the same unit
always yields the same bytes whichever worker, task or run wrote it. ``manifest.json`` lists, per
split, every shard with its token count, chunk sizes, chunk CRC32s, byte size and sha256. Readers
check sizes on open and each chunk's CRC32 and length when they read it, and name the shard in
every error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pipeline.common import XlpipeError, atomic_write_bytes, atomic_write_json, read_versioned_json, sha256_file
from pipeline.config import is_shard_url

MANIFEST = "manifest.json"
REMOTE_MARKER = ".xlpipe-remote.json"   # in a URL's cache directory: shards are fetched on first open (remote.py)
FORMAT = "xlpipe-shards"
VERSION = 1


class ShardError(XlpipeError, RuntimeError):
    """A shard or manifest that is missing, truncated, corrupt or does not match the manifest."""


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


# ----------------------------------------------------------------------------- manifest


@dataclasses.dataclass
class ShardInfo:
    file: str                 # relative to the shard directory, e.g. "train/shard-000003.tar"
    tokens: int
    samples: int
    bytes: int
    sha256: str
    chunks: list[int]         # token count of each chunk, in order
    crc32: list[int]          # zlib.crc32 of each chunk's token bytes
    sentences: int = 0        # sentence corpora: sentences starting in this shard
    documents: int = 0        # document corpora: documents starting in this shard
    text: Optional[dict] = None  # the unit's source text: {"words", "chars", "bytes", "lines"} (per-word ppl, bpb)


TEXT_STATS = ("words", "chars", "bytes", "lines")


@dataclasses.dataclass
class SplitInfo:
    shards: list[ShardInfo]

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def text(self) -> Optional[dict]:
        """Words, characters, UTF-8 bytes and lines of the split's source text; None when a
        shard lacks them (shards from a prepare run older than these statistics)."""
        if not self.shards or any(s.text is None for s in self.shards):
            return None
        return {k: sum(int(s.text[k]) for s in self.shards) for k in TEXT_STATS}


@dataclasses.dataclass
class Manifest:
    corpus: str
    tokenizer: dict           # kind, file, sha256, vocab_size, special {name: id}
    dtype: str
    chunk_tokens: int
    sentences: bool           # True: samples carry starts.npy of sentences (shuffled-sentence streams)
    splits: dict[str, SplitInfo]
    options: dict = dataclasses.field(default_factory=dict)  # corpus/tokenizer options that shaped the tokens
    documents: bool = False   # True: samples carry starts.npy of documents (chunks not cut at them)
    scored: bool = False      # True: samples carry scored.npy (only those targets count)

    @property
    def boundaries(self) -> bool:
        """Whether chunks record where sentences or documents start (``train.document_reset``)."""
        return self.sentences or self.documents

    def to_json(self) -> dict:
        out = {"format": FORMAT, "version": VERSION}
        out.update(dataclasses.asdict(self))
        for name, split in self.splits.items():
            out["splits"][name]["total_tokens"] = split.total_tokens
            # Text statistics only where recorded, so a manifest written before them keeps its sha256.
            for shard in out["splits"][name]["shards"]:
                if shard.get("text") is None:
                    shard.pop("text", None)
                if not shard.get("documents"):
                    shard.pop("documents", None)
            if split.text is not None:
                out["splits"][name]["text"] = split.text
        for flag in ("documents", "scored"):      # only where set: older manifests keep their sha256
            if not out[flag]:
                out.pop(flag)
        return out

    def save(self, shard_dir: str | Path) -> None:
        atomic_write_json(Path(shard_dir) / MANIFEST, self.to_json())

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def load(cls, shard_dir: str | Path) -> "Manifest":
        if is_shard_url(str(shard_dir)):
            raise ShardError(f"{shard_dir} is a URL: open it with pipeline.data.remote.shard_dir(cfg.data), which "
                             f"stages its files into data.cache_dir")
        path = Path(shard_dir) / MANIFEST
        if not path.is_file():
            raise ShardError(f"{path} does not exist; run `python -m pipeline.prepare --config ...` "
                             f"(and its merge step after a job array) to write the shards first")
        raw = read_versioned_json(path, FORMAT, VERSION, ShardError)
        try:
            splits = {
                name: SplitInfo([ShardInfo(**s) for s in split["shards"]])
                for name, split in raw["splits"].items()
            }
            manifest = cls(corpus=raw["corpus"], tokenizer=raw["tokenizer"], dtype=raw["dtype"],
                           chunk_tokens=raw["chunk_tokens"], sentences=raw["sentences"], splits=splits,
                           options=raw.get("options", {}), documents=bool(raw.get("documents", False)),
                           scored=bool(raw.get("scored", False)))
        except (KeyError, TypeError) as exc:
            raise ShardError(f"{path}: malformed manifest ({exc!r})") from None
        manifest.check(raw, path)
        return manifest

    def check(self, raw: dict, path: Path) -> None:
        """The manifest agrees with itself: every count it states is the sum of what it lists (a
        hand-edited or half-written manifest fails here, not tokens later in a run)."""
        def bad(what: str) -> ShardError:
            return ShardError(f"{path}: {what}; the manifest is inconsistent (edited or damaged): rebuild it "
                              f"with `python -m pipeline.prepare --config ... --merge`")

        vocab = self.tokenizer.get("vocab_size")
        if not isinstance(vocab, int) or vocab < 1:
            raise bad(f"tokenizer.vocab_size={vocab!r} is not a positive integer")
        if self.dtype not in ("uint16", "uint32") or np.iinfo(self.dtype).max < vocab - 1:
            raise bad(f"dtype {self.dtype!r} does not hold the ids of vocab_size {vocab} "
                      f"(prepare writes {token_dtype(vocab)!r})")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise bad(f"chunk_tokens={self.chunk_tokens!r} is not a positive integer")
        for name, split in self.splits.items():
            for s in split.shards:
                where = f"split {name!r} shard {s.file}"
                if not s.file.startswith(f"{name}/"):
                    raise bad(f"{where} is not in the {name}/ directory")
                if len(s.chunks) != s.samples or len(s.crc32) != s.samples:
                    raise bad(f"{where} lists {len(s.chunks)} chunk sizes and {len(s.crc32)} CRC32s for "
                              f"{s.samples} samples")
                if sum(s.chunks) != s.tokens or any(c < 1 for c in s.chunks):
                    raise bad(f"{where} states {s.tokens} tokens but its chunks hold {sum(s.chunks)}")
                if not self.sentences and any(c > self.chunk_tokens for c in s.chunks):
                    raise bad(f"{where} has a chunk longer than chunk_tokens={self.chunk_tokens}")
            stated = raw["splits"][name].get("total_tokens")
            if stated is not None and stated != split.total_tokens:
                raise bad(f"split {name!r} states total_tokens={stated} but its shards hold {split.total_tokens}")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ShardError(f"split {name!r} is not in the manifest; it has {sorted(self.splits)}")
        return self.splits[name]


# ----------------------------------------------------------------------------- writing


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0          # fixed metadata: the same tokens give the same bytes
    info.mode = 0o444
    info.uname = info.gname = "xlpipe"
    tar.addfile(info, io.BytesIO(data))


def write_shard(shard_dir: str | Path, split: str, index: int, tokens: np.ndarray, chunk_tokens: int,
                dtype: str, sentence_starts: Optional[np.ndarray] = None, doc_starts: Optional[np.ndarray] = None,
                scored: Optional[np.ndarray] = None) -> ShardInfo:
    """Write one unit's tokens as shard ``index`` of ``split``, atomically.

    ``sentence_starts`` (sorted offsets into ``tokens``) makes chunks end on sentence boundaries
    and stores each chunk's starts; a sentence longer than ``chunk_tokens`` gets a chunk of its own.
    ``doc_starts`` (sorted offsets of documents) are stored the same way without cutting chunks
    at them (a book is longer than a chunk). ``scored`` (bool per token) is stored as scored.npy.
    """
    if sentence_starts is not None and doc_starts is not None:
        raise ValueError("write_shard: sentence_starts and doc_starts are exclusive")
    tokens = np.asarray(tokens)
    if scored is not None and len(scored) != len(tokens):
        raise ValueError(f"{shard_name(split, index)}: scored has {len(scored)} flags for {len(tokens)} tokens")
    starts_all = sentence_starts if sentence_starts is not None else doc_starts
    if tokens.size and int(tokens.max()) > np.iinfo(dtype).max:
        raise ValueError(f"{shard_name(split, index)}: token id {int(tokens.max())} does not fit {dtype}")
    tokens = tokens.astype(dtype, copy=False)
    bounds = _chunk_bounds(len(tokens), chunk_tokens, sentence_starts)

    buf = io.BytesIO()
    chunks, crcs = [], []
    # Plain tarfile in USTAR with fixed metadata; webdataset reads it as a shard like any other.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for c, (lo, hi) in enumerate(bounds):
            key = f"{index:06d}_{c:06d}"
            chunk = tokens[lo:hi]
            _add(tar, f"{key}.tokens.npy", _npy_bytes(chunk))
            if starts_all is not None:
                starts = starts_all[(starts_all >= lo) & (starts_all < hi)] - lo
                _add(tar, f"{key}.starts.npy", _npy_bytes(starts.astype(np.uint32)))
            if scored is not None:
                _add(tar, f"{key}.scored.npy", _npy_bytes(np.asarray(scored[lo:hi], dtype=np.uint8)))
            chunks.append(int(hi - lo))
            crcs.append(zlib.crc32(chunk.tobytes()))
    data = buf.getvalue()
    rel = shard_name(split, index)
    atomic_write_bytes(Path(shard_dir) / rel, data)
    return ShardInfo(file=rel, tokens=int(len(tokens)), samples=len(bounds), bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), chunks=chunks, crc32=crcs,
                     sentences=0 if sentence_starts is None else int(len(sentence_starts)),
                     documents=0 if doc_starts is None else int(len(doc_starts)))


def _chunk_bounds(n: int, chunk_tokens: int, starts: Optional[np.ndarray]) -> list[tuple[int, int]]:
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if starts is None:
        return [(lo, min(lo + chunk_tokens, n)) for lo in range(0, n, chunk_tokens)]
    # Greedy: as many whole sentences as fit; cut only at sentence starts.
    bounds, lo = [], 0
    while n - lo > chunk_tokens:
        cut = _last_start_before(starts, lo, lo + chunk_tokens)
        if cut is None:
            break
        bounds.append((lo, cut))
        lo = cut
    if lo < n:
        bounds.append((lo, n))
    return bounds


def _last_start_before(starts: np.ndarray, lo: int, limit: int) -> Optional[int]:
    """The last sentence start in (lo, limit], or the first start after lo when none fits."""
    i = int(np.searchsorted(starts, limit, side="right")) - 1
    if i >= 0 and starts[i] > lo:
        return int(starts[i])
    j = int(np.searchsorted(starts, lo, side="right"))
    return int(starts[j]) if j < len(starts) else None


# ----------------------------------------------------------------------------- reading


class ShardReader:
    """Random access to the chunks of one shard, verified against its manifest entry."""

    def __init__(self, shard_dir: str | Path, info: ShardInfo, dtype: str, sentences: bool = False,
                 scored: bool = False):
        self.path = Path(shard_dir) / info.file
        if (Path(shard_dir) / REMOTE_MARKER).is_file():   # a URL's cache: fetched and verified on first open
            from pipeline.data.remote import stage

            stage(Path(shard_dir), info)
        self.info = info
        self.dtype = np.dtype(dtype)
        if not self.path.is_file():
            raise ShardError(f"shard {self.path} is missing (listed in the manifest)")
        size = self.path.stat().st_size
        if size != info.bytes:
            raise ShardError(f"shard {self.path} has {size} bytes, the manifest says {info.bytes}: "
                             f"truncated or rewritten; re-run prepare with --force")
        self._members: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(self.path, mode="r:") as tar:
                for m in tar:
                    self._members[m.name] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardError(f"shard {self.path} is not a readable tar: {exc}") from None
        expect = info.samples * (1 + int(sentences) + int(scored))   # sentences: any starts.npy
        if len(self._members) != expect:
            raise ShardError(f"shard {self.path} has {len(self._members)} members, expected {expect}")
        self._file = open(self.path, "rb")

    def close(self) -> None:
        self._file.close()

    def _read(self, name: str) -> np.ndarray:
        if name not in self._members:
            raise ShardError(f"shard {self.path} has no member {name}")
        offset, size = self._members[name]
        self._file.seek(offset)
        raw = self._file.read(size)
        if len(raw) != size:
            raise ShardError(f"shard {self.path}: member {name} is truncated")
        try:
            return np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ShardError(f"shard {self.path}: member {name} is not a valid .npy ({exc})") from None

    def _key(self, c: int) -> str:
        return f"{Path(self.info.file).stem.split('-')[-1]}_{c:06d}"

    def chunk(self, c: int) -> np.ndarray:
        arr = self._read(f"{self._key(c)}.tokens.npy")
        if arr.dtype != self.dtype or arr.ndim != 1 or len(arr) != self.info.chunks[c]:
            raise ShardError(f"shard {self.path}: chunk {c} is {arr.dtype}[{len(arr)}], "
                             f"the manifest says {self.dtype}[{self.info.chunks[c]}]")
        if zlib.crc32(arr.tobytes()) != self.info.crc32[c]:
            raise ShardError(f"shard {self.path}: chunk {c} fails its CRC32 check (corrupt shard); "
                             f"re-run prepare with --force")
        return arr

    def starts(self, c: int) -> np.ndarray:
        return self._read(f"{self._key(c)}.starts.npy")

    def scored(self, c: int) -> np.ndarray:
        arr = self._read(f"{self._key(c)}.scored.npy")
        if arr.dtype != np.uint8 or arr.ndim != 1 or len(arr) != self.info.chunks[c]:
            raise ShardError(f"shard {self.path}: chunk {c} scored.npy is {arr.dtype}[{len(arr)}], expected "
                             f"uint8[{self.info.chunks[c]}] (corrupt shard); re-run prepare with --force")
        return arr


def verify_shard(shard_dir: str | Path, info: ShardInfo) -> None:
    """Full check: size and sha256 (prepare uses it to skip finished shards; training and
    evaluation verify every shard they will read before they start)."""
    path = Path(shard_dir) / info.file
    if not path.is_file():
        raise ShardError(f"shard {path} is missing; re-run prepare to rebuild it")
    if path.stat().st_size != info.bytes or sha256_file(path) != info.sha256:
        raise ShardError(f"shard {path} does not match its recorded sha256/size: it was changed or damaged "
                         f"after prepare; re-run prepare (it rebuilds exactly the damaged shards)")


class SplitTokens:
    """Tokens ``[lo, hi)`` of a split by global offset, read chunk by chunk from its shards.

    Keeps a few decoded chunks cached, so sequential readers (streams) touch each chunk once;
    never loads the whole split.
    """

    def __init__(self, shard_dir: str | Path, manifest: Manifest, split: str, cache_chunks: int = 4):
        self.shard_dir = Path(shard_dir)
        self.manifest = manifest
        self.info = manifest.split(split)
        self.split = split
        starts = []  # (global offset of chunk, shard index, chunk index)
        offset = 0
        for s, shard in enumerate(self.info.shards):
            for c, n in enumerate(shard.chunks):
                starts.append(offset)
                offset += n
        self.total = offset
        self._chunk_start = np.asarray(starts + [offset], dtype=np.int64)
        self._chunk_loc = [(s, c) for s, shard in enumerate(self.info.shards) for c in range(len(shard.chunks))]
        self._readers: dict[int, ShardReader] = {}
        self._cache: dict[int, np.ndarray] = {}
        self._cache_chunks = max(1, cache_chunks)

    def __len__(self) -> int:
        return self.total

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._cache.clear()

    def _reader(self, s: int) -> ShardReader:
        if s not in self._readers:
            self._readers[s] = ShardReader(self.shard_dir, self.info.shards[s], self.manifest.dtype,
                                           self.manifest.boundaries, self.manifest.scored)
        return self._readers[s]

    def chunk_index(self, offset: int) -> int:
        return int(np.searchsorted(self._chunk_start, offset, side="right")) - 1

    def chunk(self, k: int) -> np.ndarray:
        arr = self._cache.get(k)
        if arr is None:
            s, c = self._chunk_loc[k]
            arr = self._reader(s).chunk(c)
            if len(self._cache) >= self._cache_chunks:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = arr
        return arr

    def read(self, lo: int, hi: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Tokens [lo, hi) as one array (copied into ``out`` when given)."""
        if not 0 <= lo <= hi <= self.total:
            raise IndexError(f"{self.split}: token range [{lo}, {hi}) outside [0, {self.total})")
        if out is None:
            out = np.empty(hi - lo, dtype=self.manifest.dtype)
        pos, k = lo, self.chunk_index(lo) if hi > lo else 0
        while pos < hi:
            arr = self.chunk(k)
            base = int(self._chunk_start[k])
            take = min(hi, base + len(arr)) - pos
            out[pos - lo: pos - lo + take] = arr[pos - base: pos - base + take]
            pos += take
            k += 1
        return out

    def sentence_starts(self, k: int) -> np.ndarray:
        """Sentence (or document) start offsets (int64) within chunk ``k``, checked to be strictly
        increasing and inside the chunk (starts.npy carries no CRC of its own; the shard's sha256
        is checked before a run)."""
        if not self.manifest.boundaries:
            raise ShardError(f"{self.split}: the manifest records no sentence or document starts; chunks "
                             f"carry no starts.npy")
        s, c = self._chunk_loc[k]
        reader = self._reader(s)
        starts = reader.starts(c)
        n = self.info.shards[s].chunks[c]
        if starts.ndim != 1 or starts.dtype.kind not in "iu":
            raise ShardError(f"shard {reader.path}: chunk {c} starts.npy is {starts.dtype}{list(starts.shape)}, "
                             f"expected a 1-D integer array")
        starts = starts.astype(np.int64)
        if len(starts) and (starts[0] < 0 or starts[-1] >= n or np.any(np.diff(starts) <= 0)):
            raise ShardError(f"shard {reader.path}: chunk {c} starts.npy is not strictly increasing "
                             f"inside [0, {n}) (corrupt shard); re-run prepare with --force")
        return starts

    def flags(self, lo: int, hi: int, starts: Optional[np.ndarray], scored: Optional[np.ndarray]) -> None:
        """Fill ``starts`` (True where a sentence or document starts) and ``scored`` (True where the
        token is a scored target) for tokens [lo, hi); either may be None."""
        if hi <= lo:
            return
        if starts is not None:
            starts[: hi - lo] = False
        k = self.chunk_index(lo)
        while k < len(self._chunk_loc) and self._chunk_start[k] < hi:
            base, end = int(self._chunk_start[k]), int(self._chunk_start[k + 1])
            a, b = max(lo, base), min(hi, end)
            if starts is not None:
                st = self.sentence_starts(k) + base
                st = st[(st >= a) & (st < b)]
                starts[st - lo] = True
            if scored is not None:
                s, c = self._chunk_loc[k]
                scored[a - lo: b - lo] = self._reader(s).scored(c)[a - base: b - base] != 0
            k += 1

    def iter_chunks(self) -> Iterator[np.ndarray]:
        for k in range(len(self._chunk_loc)):
            yield self.chunk(k)
