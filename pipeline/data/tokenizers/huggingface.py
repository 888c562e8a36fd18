"""A pretrained tokenizer as saved by HF ``transformers`` / ``tokenizers`` (``tokenizer.kind: huggingface``).

``tokenizer.path`` is a local directory (nothing is downloaded) holding the fast tokenizer's
``tokenizer.json`` (what ``save_pretrained`` writes, GPT-2's byte-level BPE included) and, when
present, ``tokenizer_config.json`` / ``special_tokens_map.json`` naming the special tokens. Only
the JSON files are read, with the ``tokenizers`` library (no code from the directory runs, no
``transformers`` import). Prepare copies them into the shard directory as ``hf-<name>`` beside our
own ``tokenizer.json`` descriptor, with their sha256 in the manifest like every tokenizer's.

Ids, ``vocab_size`` (added tokens included) and the special ids come from the tokenizer itself:
``eos`` is the config's ``eos_token`` (GPT-2: ``<|endoftext|>``), which also ends each document
of a document corpus, as GPT-2 was trained. ``bos`` and ``unk`` likewise when they are set.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from pipeline.data.tokenizers.base import Tokenizer, TokenizerError

PREFIX = "hf-"      # flat names beside our tokenizer.json (exports copy a flat directory)
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _token_name(value) -> Optional[str]:
    if isinstance(value, dict):          # {"content": "<|endoftext|>", ...} (AddedToken as saved)
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, files: dict[str, bytes], source: str = ""):
        try:
            from tokenizers import Tokenizer as FastTokenizer
        except ImportError as exc:
            raise TokenizerError("tokenizer.kind=huggingface needs the `tokenizers` package: "
                                 "pip install 'xlpipe[hf]'") from exc
        if "tokenizer.json" not in files:
            raise TokenizerError(f"{source or 'the tokenizer directory'} has no tokenizer.json (a fast tokenizer "
                                 f"as saved by transformers' save_pretrained or tokenizers' save)")
        self.files_bytes = dict(files)
        try:
            self.tk = FastTokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:      # the library raises its own exception type
            raise TokenizerError(f"{source}/tokenizer.json is not a tokenizer the tokenizers library reads: "
                                 f"{exc}") from None
        names: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if name in files:
                try:
                    names.update({k: v for k, v in json.loads(files[name]).items() if k.endswith("_token")})
                except (json.JSONDecodeError, AttributeError) as exc:
                    raise TokenizerError(f"{source}/{name} is not a JSON object: {exc}") from None
        self.eos_id = self._id(_token_name(names.get("eos_token")) or "<|endoftext|>")
        self.bos_id = self._id(_token_name(names.get("bos_token")))
        self.unk_id = self._id(_token_name(names.get("unk_token")))
        self.doc_end = self.eos_id

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.tk.token_to_id(token)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "HFTokenizer":
        d = Path(directory).expanduser()
        if not d.is_dir():
            raise TokenizerError(f"tokenizer.path={str(directory)!r} is not a directory; point it at a tokenizer "
                                 f"saved by transformers/tokenizers (nothing is downloaded)")
        return cls({n: (d / n).read_bytes() for n in HF_FILES if (d / n).is_file()}, str(d))

    def __getstate__(self):      # the Rust tokenizer does not pickle: rebuild it from its files
        return {"files": self.files_bytes, "directory": self.directory}

    def __setstate__(self, state):
        self.__init__(state["files"])
        self.directory = state["directory"]

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tk.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"kind": self.kind, "files": {f"{PREFIX}{n}": hashlib.sha256(b).hexdigest()
                                             for n, b in sorted(self.files_bytes.items())}}

    def extra_files(self) -> dict[str, bytes]:
        return {f"{PREFIX}{n}": b for n, b in sorted(self.files_bytes.items())}


def hf_from_json(obj: dict, directory: Path) -> HFTokenizer:
    files = {}
    for rel, sha in obj["files"].items():
        if not rel.startswith(PREFIX) or "/" in rel:
            raise TokenizerError(f"{directory / 'tokenizer.json'} names a file {rel!r} outside {directory}")
        path = directory / rel
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} is missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise TokenizerError(f"tokenizer file {path} does not match the sha256 in {directory / 'tokenizer.json'}")
        files[rel[len(PREFIX):]] = data
    return HFTokenizer(files, str(directory))
