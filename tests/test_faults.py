"""Fault injection (slow tier): what happens when a process is killed or a file is planted or
damaged, made reproducible. Each test states the fault and what must hold afterwards."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from corpus_fixtures import make_wt103
from train_fixtures import REPO, clean_env

pytestmark = pytest.mark.slow
PY = sys.executable


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def prepare_cmd(corpus: Path, out: Path) -> list[str]:
    config = corpus.parent / "prepare.yaml"
    config.write_text("data:\n  corpus: wt103\ntokenizer:\n  kind: word\n")
    return [PY, "-m", "pipeline.prepare", "--config", str(config), "--workers", "2", f"data.path={corpus}",
            f"data.output={out}", "data.unit_bytes=200000", "data.chunk_tokens=4096"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_9_of_prepare_leaves_no_worker_and_a_rerun_is_byte_identical(tmp_path):
    corpus = make_wt103(tmp_path / "wt103", n=(120_000, 300, 300))          # ~5 MB of train text: 25+ units
    env = clean_env()
    proc = subprocess.Popen(prepare_cmd(corpus, tmp_path / "killed"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        kids = psutil.Process(proc.pid).children(recursive=True)
        if len(kids) >= 2 and list((tmp_path / "killed").glob("train/shard-*.json")):
            workers = [k.pid for k in kids]                                   # encoding has begun
            break
        time.sleep(0.05)
    assert workers, f"prepare never ran two workers: {proc.stderr.read().decode()[-2000:] if proc.poll() else ''}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(gone(p) for p in workers):
        time.sleep(0.1)
    alive = [p for p in workers if not gone(p)]
    for p in alive:                                                           # never leave them to the next test
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed prepare"
    assert not (tmp_path / "killed" / "manifest.json").exists()

    # Re-running finishes the job: the same bytes as one uninterrupted run.
    for out in ("killed", "clean"):
        res = subprocess.run(prepare_cmd(corpus, tmp_path / out), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    killed, clean = tree_digest(tmp_path / "killed"), tree_digest(tmp_path / "clean")
    assert killed == clean
