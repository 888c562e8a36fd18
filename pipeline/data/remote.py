"""Shards named by URL, staged into a node-local cache and read from there like any prepared directory.

    data.output: https://host/datasets/wt103        # manifest.json, train/shard-000000.tar, ... under it
    data.output: "pipe:aws s3 cp s3://bucket/wt103/{file} -"     # {file}: manifest.json, train/shard-....tar
    data.cache_dir: /local/scratch                  # "": $TMPDIR or the system temp dir

:func:`shard_dir` is the one place a stage turns ``data.output`` into a directory. A local path is
returned as it is. A URL's files are opened with webdataset's own opener (``gopen``: curl for
http(s), a shell for ``pipe:``): manifest.json and the tokenizer files at once, into
``<cache_dir>/xlpipe-shards/<sha256 of manifest.json, 16 hex>/``; a shard the first time this
process opens it (``ShardReader`` calls :func:`stage`), so a rank stages only the shards its streams
read. Every file is downloaded to a temp name beside its place, checked against the manifest's size
and sha256, and renamed into place under a per-file ``flock``: ranks on one node share one
download, and nothing half-written or unverified ever has a final name. A cached copy is hashed
again the first time a process uses it (the check ``verify_splits`` makes of local shards).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator, Optional

from pipeline.common import read_versioned_json, sha256_file
from pipeline.config import DataConfig, is_shard_url
from pipeline.data.shards import MANIFEST, REMOTE_MARKER, Manifest, ShardError, ShardInfo

log = logging.getLogger("pipeline.data.remote")
FORMAT, VERSION = "xlpipe-remote", 1
# A manifest's file names go into a URL, a shell command and a path: plain relative names only (no "..").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")
_verified: set[str] = set()           # files this process has checked (a set add is atomic under the GIL)


class RemoteShardError(ShardError):
    """A file of a URL ``data.output`` that cannot be fetched or staged."""


class ShardChecksumError(RemoteShardError):
    """A file fetched from a URL whose bytes are not the ones its manifest lists."""


def file_url(base: str, name: str) -> str:
    """The URL of ``name`` (e.g. ``train/shard-000003.tar``) under ``data.output``: ``{file}`` replaced,
    else appended as a path."""
    if not _NAME.fullmatch(name):
        raise RemoteShardError(f"the manifest of {base} names a file {name!r}, not a plain relative path; "
                               f"it was not written by prepare")
    return base.replace("{file}", name) if "{file}" in base else f"{base.rstrip('/')}/{name}"


def shard_dir(data: DataConfig) -> Path:
    """The local directory holding ``data.output``'s shards: the path itself, or a URL's node-local cache."""
    if not is_shard_url(data.output):
        return Path(data.output)
    root = Path(data.cache_dir or tempfile.gettempdir()) / "xlpipe-shards"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RemoteShardError(f"cannot create the shard cache {root} ({exc}); set data.cache_dir to a writable "
                               f"node-local directory") from None
    url = file_url(data.output, MANIFEST)
    raw = _read(url)
    cache = root / hashlib.sha256(raw).hexdigest()[:16]     # another dataset (or version) gets its own
    cache.mkdir(exist_ok=True)
    _place(cache / REMOTE_MARKER, iter([json.dumps({"format": FORMAT, "version": VERSION,
                                                    "url": data.output}).encode()]))
    _place(cache / MANIFEST, iter([raw]))
    manifest = Manifest.load(cache)
    tok = manifest.tokenizer
    for name, sha in (tok.get("files") or {tok["file"]: tok["sha256"]}).items():
        _stage(cache, data.output, name, None, sha)
    log.info("data.output %s: staging into %s", data.output, cache)
    return cache


def stage(cache: Path, info: ShardInfo) -> Path:
    """``cache/info.file``, fetched from the cache's URL and verified unless this process already has."""
    if str(cache / info.file) in _verified:
        return cache / info.file
    base = read_versioned_json(cache / REMOTE_MARKER, FORMAT, VERSION, RemoteShardError)["url"]
    return _stage(cache, base, info.file, info.bytes, info.sha256)


def _stage(cache: Path, base: str, name: str, size: Optional[int], sha: str) -> Path:
    path = cache / name
    url = file_url(base, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):          # the other ranks of this node wait here, then find the file verified
        if path.is_file():
            if (size is None or path.stat().st_size == size) and sha256_file(path) == sha:
                _verified.add(str(path))
                return path
            log.warning("%s does not match the manifest (damaged cache); fetching it again", path)
            path.unlink()
        h, n = hashlib.sha256(), 0

        def counted() -> Iterator[bytes]:
            nonlocal n
            for block in _blocks(url):
                h.update(block)
                n += len(block)
                yield block

        def check() -> None:
            if (size is not None and n != size) or h.hexdigest() != sha:
                raise ShardChecksumError(
                    f"{url} sent {n} bytes with sha256 {h.hexdigest()}, but the manifest lists {name} with "
                    + (f"{size} bytes and " if size is not None else "") + f"sha256 {sha}: the copy at "
                    f"data.output is not the one prepared (a partial or stale upload, or a proxy that rewrites "
                    f"it); upload the shard directory again (manifest.json last) or point data.output at the "
                    f"right copy. Nothing of it was kept in {cache}")

        _place(path, counted(), check)
    _verified.add(str(path))
    return path


def _blocks(url: str, bufsize: int = 1 << 20) -> Iterator[bytes]:
    """The bytes at ``url``, through webdataset's opener; a failure names the URL."""
    from webdataset.gopen import gopen

    try:
        with gopen(url, "rb") as stream:   # a Pipe: a failed command raises (curl -f: HTTP errors too)
            while block := stream.read(bufsize):
                yield block
    except (OSError, ValueError) as exc:
        raise RemoteShardError(f"cannot fetch {url} ({exc}); check data.output (https://host/path holding "
                               f"manifest.json, or a pipe: command with {{file}}), credentials, and that curl "
                               f"is installed for http(s)") from None


def _read(url: str) -> bytes:
    return b"".join(_blocks(url))


def _place(path: Path, blocks: Iterator[bytes], check=None) -> None:
    """Write ``blocks`` to a temp name unique to this process and thread, run ``check``, rename into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(tmp, "wb") as f:
            for block in blocks:
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)   # a failed or refused download leaves nothing behind


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``.<name>.lock`` beside ``path`` (per open file: also between threads)."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                   # releases the lock
