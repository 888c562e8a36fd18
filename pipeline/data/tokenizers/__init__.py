"""Tokenizers: word vocabulary (reference semantics), characters, bytes, sentencepiece.

Every tokenizer has ``encode(text) -> np.ndarray[int64]``, ``decode(ids) -> str``, ``vocab_size``,
``kind``, special ids (``eos_id``, ``unk_id``, ``bos_id``) and ``files()``. Prepare writes it next to
the shards as ``tokenizer.json`` (plus ``tokenizer.model`` for sentencepiece); the manifest holds
their sha256 and ``load_tokenizer`` checks them before later stages use the tokenizer.

The base class and errors are in pipeline/data/tokenizers/base.py, word vocabularies in
pipeline/data/tokenizers/word_vocab.py; this module adds characters, bytes, sentencepiece and the files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.common import atomic_write_bytes, check_files
from pipeline.data.shards import MANIFEST, Manifest
from pipeline.data.tokenizers.base import SPM_FILE, TOKENIZER_FILE, Tokenizer, TokenizerError, UnknownSymbolError
from pipeline.data.tokenizers.word_vocab import WordVocab

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
    elif kind == "huggingface":
        from pipeline.data.tokenizers.huggingface import hf_from_json

        tok = hf_from_json(obj, directory)
    elif kind == "sentencepiece":
        path = directory / obj["model"]
        if not path.is_file():
            raise TokenizerError(f"sentencepiece model {path} is missing")
        proto = path.read_bytes()
        if hashlib.sha256(proto).hexdigest() != obj["model_sha256"]:
            raise TokenizerError(f"sentencepiece model {path} does not match the sha256 in "
                                 f"{directory / TOKENIZER_FILE}")
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
    check_files(shard_dir, files, shard_dir / MANIFEST, TokenizerError, "tokenizer file ",
                "it was changed after prepare; re-run prepare (--force) to rebuild both")
    tok = read_tokenizer(shard_dir, threads)
    if tok.vocab_size != manifest.tokenizer["vocab_size"]:
        raise TokenizerError(f"{shard_dir / TOKENIZER_FILE}: vocab size {tok.vocab_size}, "
                             f"the manifest says {manifest.tokenizer['vocab_size']}")
    return tok
