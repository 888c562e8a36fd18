"""What every part of the pipeline shares: the error base class, atomic writes, hashing,
versioned JSON, the git commit and the precision names."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class XlpipeError(Exception):
    """Base of every error raised for bad input or state (a config value, a file, a shard, a
    checkpoint): its message names what is at fault and the fix, and a stage reports it as one
    line and exits 1 (pipeline.runtime.stage)."""


def sha256_file(path: str | Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def check_files(directory: str | Path, files: dict[str, str], listed_in: str | Path, error: type[Exception],
                what: str, fix: str) -> None:
    """Every ``{name: sha256}`` of ``files`` is under ``directory`` with that hash; otherwise ``error``
    naming the file, the list it is in (``listed_in``) and the ``fix``."""
    for name, sha in files.items():
        path = Path(directory) / name
        if not path.is_file():
            raise error(f"{what}{path} (listed in {listed_in}) is missing")
        if sha256_file(path) != sha:
            raise error(f"{what}{path} does not match the sha256 in {listed_in}: {fix}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written temp file behind
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_versioned_json(path: str | Path, fmt: str, version: int, error: type[Exception]) -> dict:
    """A JSON file of ours, stamped {"format": fmt, "version": version}: anything unreadable or of
    another format/version raises `error` naming the file, so old or foreign files never half-load."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
    got = raw if isinstance(raw, dict) else {}
    if got.get("format") != fmt or got.get("version") != version:
        raise error(f"{path}: format {got.get('format')!r} version {got.get('version')!r}; "
                    f"this code reads {fmt!r} version {version}")
    return raw


T = TypeVar("T")


def dataclass_from_json(cls: type[T], raw: dict, path: str | Path, error: type[Exception]) -> T:
    """A metadata dataclass from a ``read_versioned_json`` dict: every field without a default
    present, no unknown key (a hand-edited or foreign file is refused naming the keys)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    body = {k: v for k, v in raw.items() if k not in ("format", "version")}
    unknown = sorted(set(body) - set(fields))
    missing = sorted(n for n, f in fields.items() if n not in body
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if unknown or missing:
        raise error(f"{path}: missing keys {missing}, unknown keys {unknown}; it was not written by this "
                    f"version of xlpipe, or was edited")
    return cls(**body)


def git(*args: str) -> Optional[str]:
    """``git args`` in this repository's checkout; None outside one or when git fails."""
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> Optional[str]:
    return git("rev-parse", "HEAD")
