"""Fault injection (slow tier): what happens when a process is killed or a file is planted or
damaged, made reproducible. Each test states the fault and what must hold afterwards."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from corpus_fixtures import make_wt103
from train_fixtures import REPO, TINY, clean_env, finish, launch, make_shards

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


# ----------------------------------------------------------------------------- code planted in a checkpoint


class Payload:
    """What an attacker plants: unpickling it calls ``open(marker, "w")``, creating the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)    # our own file: trusted here
    state = state if isinstance(state, dict) else {"state": state}
    state["innocent_looking_key"] = Payload(marker)
    torch.save(state, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two 2-rank runs whose checkpoints hold every kind of file: ZeRO-2 bf16 (model states, the
    bf16 optimizer's partitions, ours) and ZeRO-3 fp32 (partitioned model states, fp32 optimizer)."""
    root = tmp_path_factory.mktemp("planted")
    shards = make_shards(root / "data")
    runs = {}
    for name, extra in (("zero2-bf16", ["train.zero_stage=2", "train.precision=bf16"]),
                        ("zero3-fp32", ["train.zero_stage=3"])):
        args = ["--config", str(REPO / "configs" / "tiny.yaml"), f"data.output={shards}", *TINY,
                f"train.output={root / name}", *extra, "train.max_steps=2", "train.save_every=0"]
        for rc, text in launch(2, ["-m", "pipeline.train", *args], cwd=REPO):
            assert rc == 0, text[-3000:]
        runs[name] = (root / name, args)
    return runs


def checkpoint_copy(trained, run: str, name: Path) -> tuple[Path, list[str]]:
    src, args = trained[run]
    shutil.copytree(src, name)
    return name, [a if not a.startswith("train.output=") else f"train.output={name}" for a in args]


def test_every_kind_of_checkpoint_file_with_code_is_refused_by_name(trained, tmp_path):
    from pipeline.runtime import checkpoint as ckpt

    bf16, _ = checkpoint_copy(trained, "zero2-bf16", tmp_path / "bf16")
    fp32, _ = checkpoint_copy(trained, "zero3-fp32", tmp_path / "fp32")
    tags = {"bf16": bf16 / "checkpoints" / "global_step2", "fp32": fp32 / "checkpoints" / "global_step2"}
    ckpt.make_universal(tags["bf16"])                                    # its files are a kind too
    universal = next(p for p in sorted((tags["bf16"] / "universal").rglob("fp32.pt")))
    kinds = {"model states": ("bf16", "mp_rank_00_model_states.pt"),
             "bf16 optimizer": ("bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
             "ours": ("bf16", "xlpipe/rank1.pt"),
             "universal": ("bf16", universal.relative_to(tags["bf16"]).as_posix()),
             "ZeRO-3 model states": ("fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
             "optimizer": ("fp32", "zero_pp_rank_1_mp_rank_00_optim_states.pt")}
    for tag in tags.values():
        ckpt.check_plain(tag)                                             # as written: plain data
    for kind, (run, rel) in kinds.items():
        tag = tags[run]
        assert (tag / rel).is_file(), kind
        backup = tmp_path / "backup.pt"
        shutil.copyfile(tag / rel, backup)
        marker = tmp_path / f"ran-{kind.replace(' ', '-')}"
        plant(tag / rel, marker)
        with pytest.raises(ckpt.CheckpointError, match=rf"{rel} is not plain checkpoint data \(it calls io.open"):
            ckpt.check_plain(tag)
        assert not marker.exists(), kind
        shutil.copyfile(backup, tag / rel)


@pytest.mark.parametrize("stage", ["train", "evaluate", "export"])
def test_a_planted_payload_runs_in_no_stage(trained, tmp_path, stage):
    run, args = checkpoint_copy(trained, "zero2-bf16", tmp_path / "run")
    tag = run / "checkpoints" / "global_step2"
    marker = tmp_path / "payload-ran"
    plant(tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    extra = {"train": ["train.max_steps=4"], "evaluate": [f"eval.source={run}", "eval.max_steps=1"],
             "export": [f"export.source={run}", f"export.output={tmp_path / 'export'}"]}[stage]
    world = 2 if stage == "train" else 1
    out = launch(world, ["-m", f"pipeline.{stage}", *args, *extra], cwd=REPO)
    for rc, text in out:
        assert rc == 1, text[-3000:]
        assert "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt is not plain checkpoint data" in text, text[-3000:]
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


# ----------------------------------------------------------------------------- a damaged shard


def test_a_flipped_byte_in_a_chunk_not_yet_read_stops_training_and_evaluation_before_they_start(trained, tmp_path):
    from pipeline.data.shards import Manifest

    root, args = trained["zero2-bf16"]
    shards = Path(next(a for a in args if a.startswith("data.output=")).split("=", 1)[1])
    damaged = tmp_path / "shards"
    shutil.copytree(shards, damaged)

    def flip(split: str, which: int) -> Path:
        path = damaged / Manifest.load(damaged).split(split).shards[which].file
        data = bytearray(path.read_bytes())
        data[-2000] ^= 0x01                                    # inside the shard's last chunk
        path.write_bytes(bytes(data))
        return path

    def moved(key: str, value: Path) -> list[str]:
        return [f"{key}={value}" if a.startswith(f"{key}=") else a for a in args]

    bad = flip("train", -1)                                    # read last, long after step 1
    run = tmp_path / "run"
    common = [a for a in moved("data.output", damaged) if not a.startswith("train.output=")]
    for rc, text in launch(2, ["-m", "pipeline.train", *common, f"train.output={run}", "train.max_steps=3"],
                           cwd=REPO):
        assert rc == 1, text[-3000:]
        assert f"shard {bad} does not match its recorded sha256/size" in text, text[-3000:]
    assert not (run / "checkpoints").exists()

    bad = flip("valid", 0)                                     # a good checkpoint, a damaged split
    out = tmp_path / "eval"
    res = launch(1, ["-m", "pipeline.evaluate", *common, f"eval.source={root}", f"eval.output={out}"], cwd=REPO)
    assert res[0][0] == 1 and f"shard {bad} does not match its recorded sha256/size" in res[0][1], res[0][1][-3000:]
    assert not out.exists() or not list(out.glob("*.json"))


# ----------------------------------------------------------------------------- kill -9 during saves


def test_kill_9_of_both_ranks_while_they_save_then_resume_ends_with_the_same_weights(trained, tmp_path):
    """A checkpoint every step; both ranks are killed -9 while saving step 2, then while saving
    step 4 (seeded random moments after the staging directory appears), resumed each time, and the
    final weights equal an uninterrupted run's, bit for bit."""
    import random

    from pipeline.runtime.checkpoint import consolidated_state_dict, is_complete

    _, args = trained["zero2-bf16"]
    base = [a for a in args if not a.startswith(("train.output=", "train.max_steps=", "train.save_every="))]
    steps = 6

    def run_args(out: Path) -> list[str]:
        return ["-m", "pipeline.train", *base, f"train.output={out}", f"train.max_steps={steps}",
                "train.save_every=1", "train.keep_last=0"]

    ref = tmp_path / "uninterrupted"
    for rc, text in launch(2, run_args(ref), cwd=REPO):
        assert rc == 0, text[-3000:]

    out = tmp_path / "killed"
    root = out / "checkpoints"
    rng = random.Random(7)
    interrupted = []
    for target in (2, 4):
        procs = launch(2, run_args(out), cwd=REPO, wait=False)
        staging = root / ".tmp" / f"global_step{target}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and all(p.poll() is None for p in procs) and not staging.exists():
            time.sleep(0.001)
        assert staging.exists(), finish(procs)[0][1][-3000:]
        time.sleep(rng.uniform(0.0, 0.03))
        for p in procs:
            p.kill()
        for p in procs:
            p.communicate(timeout=60)
        interrupted.append(not is_complete(root / f"global_step{target}"))
    assert any(interrupted), "no kill landed inside a save; lower the delay"
    for rc, text in launch(2, run_args(out), cwd=REPO):
        assert rc == 0, text[-3000:]
    got = consolidated_state_dict(root / f"global_step{steps}")
    want = consolidated_state_dict(ref / "checkpoints" / f"global_step{steps}")
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k
