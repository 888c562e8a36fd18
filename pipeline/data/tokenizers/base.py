"""What every tokenizer is (``Tokenizer``), its errors and its file names (see pipeline.data.tokenizers)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.common import XlpipeError

TOKENIZER_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"


class TokenizerError(XlpipeError, ValueError):
    """A tokenizer that cannot be built, loaded or verified, or text it cannot encode."""


class UnknownSymbolError(TokenizerError):
    """A symbol outside a vocabulary that has no unk symbol. ``line``: 1-based, in the encoded text."""

    def __init__(self, symbol: str, line: int, hint: str = ""):
        self.symbol, self.line = symbol, line
        super().__init__(f"{symbol!r} is not in the vocabulary and the vocabulary has no unk symbol{hint}")


class Tokenizer:
    kind: str = ""
    eos_id: Optional[int] = None
    unk_id: Optional[int] = None
    bos_id: Optional[int] = None
    doc_end: Optional[int] = None  # appended after each document of a document corpus (text, stdlib)
    directory: Optional[Path] = None  # where it was loaded from

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def encode_sentences(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        raise TokenizerError(f"a {self.kind} tokenizer does not encode sentence corpora (lm1b needs word)")

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def special(self) -> dict[str, int]:
        out = {"eos": self.eos_id, "unk": self.unk_id, "bos": self.bos_id}
        return {k: v for k, v in out.items() if v is not None}

    def to_json(self) -> dict:
        raise NotImplementedError

    def extra_files(self) -> dict[str, bytes]:
        return {}

    def files(self) -> list[Path]:
        """The files export must copy (only for a tokenizer loaded from a directory)."""
        if self.directory is None:
            raise TokenizerError("this tokenizer was not loaded from a directory; save it first")
        return [self.directory / TOKENIZER_FILE] + [self.directory / n for n in self.extra_files()]
