"""Shards read from a URL (pipeline/data/remote.py): prepared shards served by a real HTTP server
on 127.0.0.1 (a thread) or read by a real ``pipe:`` command, staged into a cache, and compared
with the same shards read from their directory — the path that existed before URLs — and with
the served files' own bytes. Training and evaluation from a URL equal the runs from the directory.
"""
from __future__ import annotations

import contextlib
import filecmp
import hashlib
import json
import re
import shutil
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import make_export

from pipeline.config import ConfigError, DataConfig, load_config
from pipeline.data.prepare.units import PrepareError
from pipeline.data.remote import ShardChecksumError, shard_dir, stage
from pipeline.data.shards import REMOTE_MARKER, Manifest, ShardError
from pipeline.data.streams import open_streams
from pipeline.evaluate import evaluate
from pipeline.prepare import prepare

from train_fixtures import REPO, TINY, launch, make_shards, split_tokens

CONFIG = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Several shards per split (small units), so ranks and streams touch different shards."""
    return make_shards(tmp_path_factory.mktemp("remote") / "data", n_docs=300, extra=["data.unit_bytes=4096"])


class Handler(SimpleHTTPRequestHandler):
    """Serves a directory; records each GET; flips one byte of the files named in ``corrupt``."""

    gets: list
    corrupt: set = set()
    delay: float = 0.0

    def do_GET(self):
        self.gets.append(self.path.lstrip("/"))
        time.sleep(self.delay)            # lets concurrent requests overlap
        super().do_GET()

    def copyfile(self, source, outputfile):
        data = source.read()
        if self.path.lstrip("/") in self.corrupt:
            data = corrupted(data)
        outputfile.write(data)

    def log_message(self, *args):
        pass


def corrupted(data: bytes) -> bytes:
    """The bytes with one byte in the middle flipped (same length: Content-Length stays right)."""
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


@contextlib.contextmanager
def serve(root: Path, corrupt=(), delay: float = 0.0):
    """``(base_url, gets)`` of a ThreadingHTTPServer over ``root``, shut down on exit."""
    handler = type("H", (Handler,), {"gets": [], "corrupt": set(corrupt), "delay": delay})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.gets
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def leftovers(cache: Path) -> list[str]:
    """Temp files of a download in the cache (none may survive)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*.part"))


def staged(cache: Path, split: str) -> set[str]:
    return {str(p.relative_to(cache)) for p in (cache / split).glob("shard-*.tar")}


# ----------------------------------------------------------------------------- config and prepare


def test_url_forms_are_checked_when_the_config_loads(tmp_path):
    ok = load_config(CONFIG, ["data.output=pipe:cat /data/{file}", f"data.cache_dir={tmp_path}"])
    assert ok.data.output == "pipe:cat /data/{file}"
    assert load_config(CONFIG, ["data.output=https://host/x"]).data.cache_dir == ""
    for override, words in (("data.output=pipe:cat /data/manifest.json", "{file}"),
                            ("data.output=s3://bucket/shards", "pipe:aws s3 cp"),
                            ("data.output=https:///shards", "no host"),
                            ("data.cache_dir=https://host/cache", "local directory")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(CONFIG, [override])


def test_prepare_refuses_a_url_and_says_to_upload(tmp_path):
    cfg = load_config(CONFIG, ["data.output=https://host/shards"])
    with pytest.raises(PrepareError, match="prepare writes locally: set data.output to a local directory, upload"):
        prepare(cfg, progress=False)


def test_a_local_directory_is_read_in_place(shards):
    assert shard_dir(DataConfig(output=str(shards), cache_dir="/nonexistent")) == shards
    assert not (shards / REMOTE_MARKER).exists()
    with pytest.raises(ShardError, match="is a URL: open it with pipeline.data.remote.shard_dir"):
        Manifest.load("https://host/shards")           # a stage that forgot shard_dir is told so


# ----------------------------------------------------------------------------- staging


def test_an_http_url_reads_the_directory_s_tokens_from_verified_copies(shards, tmp_path):
    cache_root = tmp_path / "cache"
    with serve(shards) as (url, gets):
        cache = shard_dir(DataConfig(output=url, cache_dir=str(cache_root)))
        assert cache.parent == cache_root / "xlpipe-shards"
        assert cache.name == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()[:16]
        assert Manifest.load(cache).sha256() == Manifest.load(shards).sha256()
        assert sorted(gets) == ["manifest.json", "tokenizer.json"]      # shards wait until they are read
        for split in ("train", "valid", "test"):
            assert np.array_equal(split_tokens(cache, split), split_tokens(shards, split))
        files = {s.file for split in Manifest.load(shards).splits.values() for s in split.shards}
        assert len(files) > 3 and sorted(gets) == sorted(["manifest.json", "tokenizer.json", *files])
        assert all(filecmp.cmp(cache / f, shards / f, shallow=False) for f in files)
        # opened again in this process: nothing is fetched again
        again = shard_dir(DataConfig(output=url, cache_dir=str(cache_root)))
        assert again == cache and np.array_equal(split_tokens(again, "valid"), split_tokens(shards, "valid"))
        assert sorted(gets).count("valid/shard-000000.tar") == 1
    assert leftovers(cache) == []


def test_a_pipe_command_reads_the_same_shards(shards, tmp_path):
    cache = shard_dir(DataConfig(output=f"pipe:cat {shards}/{{file}}", cache_dir=str(tmp_path)))
    for split in ("valid", "test"):
        assert np.array_equal(split_tokens(cache, split), split_tokens(shards, split))
    assert staged(cache, "train") == set()          # never opened, never copied
    assert leftovers(cache) == []


def test_a_rank_stages_only_the_shards_its_streams_read(shards, tmp_path):
    manifest = Manifest.load(shards)
    sizes = [s.tokens for s in manifest.split("train").shards]
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    n, tgt = 4, 8
    L = (int(ends[-1]) - 1) // n
    lo, hi = 2 * L, 4 * L + 1                          # rank 1 of 2 owns streams 2 and 3
    mine = {manifest.split("train").shards[i].file for i in range(len(sizes)) if starts[i] < hi and ends[i] > lo}
    assert len(mine) < len(sizes)
    with serve(shards) as (url, _):
        cache = shard_dir(DataConfig(output=url, cache_dir=str(tmp_path)))
        streams = open_streams(cache, "train", n_streams=n, tgt_len=tgt, rank=1, world_size=2, roll=False)
        for _ in range(L // tgt):                    # the whole first epoch of its streams
            next(streams)
        streams.close()
    got = staged(cache, "train")
    first = {manifest.split("train").shards[int(np.searchsorted(ends, b * L, side="right"))].file for b in (2, 3)}
    assert first <= got <= mine                      # where its streams start, and nothing outside its block
    assert manifest.split("train").shards[0].file not in got     # rank 0's first shard


def test_a_server_sending_wrong_bytes_is_a_named_error_and_leaves_nothing(shards, tmp_path):
    name = "valid/shard-000000.tar"
    info = next(s for s in Manifest.load(shards).split("valid").shards if s.file == name)
    bad = hashlib.sha256(corrupted((shards / name).read_bytes())).hexdigest()
    with serve(shards, corrupt={name}) as (url, _):
        cache = shard_dir(DataConfig(output=url, cache_dir=str(tmp_path)))
        with pytest.raises(ShardChecksumError) as err:
            split_tokens(cache, "valid")
    msg = str(err.value)
    for part in (f"{url}/{name}", info.sha256, bad, "upload the shard directory again"):
        assert part in msg
    assert not (cache / name).exists() and leftovers(cache) == []
    with serve(shards) as (url, _):                   # a good server (another port): the same cache recovers
        assert shard_dir(DataConfig(output=url, cache_dir=str(tmp_path))) == cache
        assert np.array_equal(split_tokens(cache, "valid"), split_tokens(shards, "valid"))
    assert filecmp.cmp(cache / name, shards / name, shallow=False)


def test_a_damaged_cached_copy_is_fetched_again_and_a_good_one_is_not(shards, tmp_path):
    first, second = "train/shard-000000.tar", "train/shard-000001.tar"
    infos = {s.file: s for s in Manifest.load(shards).split("train").shards}
    with serve(shards) as (url, gets):
        cache = shard_dir(DataConfig(output=url, cache_dir=str(tmp_path)))
        (cache / "train").mkdir()
        (cache / first).write_bytes(corrupted((shards / first).read_bytes()))     # a disk error since
        shutil.copy(shards / second, cache / second)                             # an earlier job's copy
        stage(cache, infos[first])
        stage(cache, infos[second])
        assert gets.count(first) == 1 and gets.count(second) == 0
    assert filecmp.cmp(cache / first, shards / first, shallow=False)


def test_concurrent_stagings_of_one_shard_share_one_verified_download(shards, tmp_path):
    name = "train/shard-000002.tar"
    info = next(s for s in Manifest.load(shards).split("train").shards if s.file == name)
    with serve(shards, delay=0.3) as (url, gets):
        cache = shard_dir(DataConfig(output=url, cache_dir=str(tmp_path)))
        start, results, errors = threading.Barrier(3), [], []

        def worker():
            start.wait()
            try:
                results.append(stage(cache, info))
            except Exception as exc:   # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and results == [cache / name] * 3
    assert gets.count(name) == 1                      # the others waited on the lock, then found it verified
    assert filecmp.cmp(cache / name, shards / name, shallow=False)
    assert sorted(p.name for p in (cache / "train").iterdir()) == [f".{Path(name).name}.lock", Path(name).name]


# ----------------------------------------------------------------------------- stages


def test_evaluate_from_a_url_equals_evaluate_from_the_directory(shards, tmp_path):
    export = make_export(shards, tmp_path / "export")
    common = [f"eval.source={export}", "tracking.enabled=false", "eval.n_streams=2", "eval.tgt_len=8",
              "eval.mem_len=8", "eval.max_steps=20", "eval.split=test"]
    local = evaluate(load_config(CONFIG, [f"data.output={shards}", f"eval.output={tmp_path / 'a'}", *common]))
    with serve(shards) as (url, _):
        remote = evaluate(load_config(CONFIG, [f"data.output={url}", f"data.cache_dir={tmp_path / 'cache'}",
                                               f"eval.output={tmp_path / 'b'}", *common]))
    assert local["results"][0]["tokens"] > 0
    for key in ("nll_sum", "tokens", "metrics"):
        assert remote["results"][0][key] == local["results"][0][key]


@pytest.mark.slow
def test_training_from_a_url_equals_training_from_the_directory(shards, tmp_path):
    """Two ranks each, seeded: the same losses, validation and final weights bit for bit; the two
    ranks of the URL run stage into one cache on this node at the same time."""
    from pipeline.runtime.checkpoint import consolidated_state_dict

    def run(name: str, *data: str) -> list[dict]:
        args = ["--config", str(CONFIG), f"data.output={shards}", *TINY, f"train.output={tmp_path / name}",
                "train.max_steps=4", "train.save_every=0", "train.eval_every=2", *data]
        for rc, text in launch(2, ["tests/train_worker.py", str(tmp_path / name), "--", *args], cwd=REPO):
            assert rc == 0, text[-4000:]
        return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(2)]

    local = run("local")
    with serve(shards) as (url, gets):
        remote = run("remote", f"data.output={url}", f"data.cache_dir={tmp_path / 'cache'}")
    assert len(local[0]["losses"]) == 4
    for a, b in zip(local, remote):
        assert a["losses"] == b["losses"] and a["valid"] == b["valid"]
    wa = consolidated_state_dict(tmp_path / "local" / "checkpoints" / "global_step4")
    wb = consolidated_state_dict(tmp_path / "remote" / "checkpoints" / "global_step4")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    shard_gets = [g for g in gets if g.endswith(".tar")]
    assert shard_gets and len(shard_gets) == len(set(shard_gets))     # one download per shard per node
    (cache,) = (tmp_path / "cache" / "xlpipe-shards").iterdir()
    assert leftovers(cache) == []


# ----------------------------------------------------------------------------- README


def readme_block() -> str:
    """The README's webdataset example (the python block of "Shards from object storage")."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Shards from object storage"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_webdataset_example_reads_what_shard_reader_reads(shards):
    scope: dict = {}
    exec(compile(readme_block(), "README.md", "exec"), scope)     # exactly the README's code
    with serve(shards) as (url, _):
        for base in (str(shards), url, f"pipe:cat {shards}/{{file}}"):
            for split in ("train", "valid"):
                got = scope["split_tokens"](base, split)
                want = split_tokens(shards, split)
                assert got.dtype == want.dtype and np.array_equal(got, want), (base, split)
