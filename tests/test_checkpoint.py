"""pipeline.runtime.checkpoint and the training stage's setup checks, in one process.

The save tests use a real one-rank DeepSpeed engine (gloo, world size 1) around a tiny
Transformer-XL; the process group is torn down after the module.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models import build_model
from models.config import ModelConfig
from models.transformer_xl import TXLMemory
from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.data.shards import Manifest, SplitInfo, write_shard
from pipeline.runtime import checkpoint as ckpt


def make_manifest(root: Path, tokens: int = 300, vocab: int = 40) -> Manifest:
    raw = np.arange(tokens, dtype="uint16") % vocab
    info = write_shard(root, "train", 0, raw, 64, "uint16")
    m = Manifest("test", {"kind": "word", "vocab_size": vocab, "sha256": "x"}, "uint16", 64, False,
                 {"train": SplitInfo([info])})
    m.save(root)
    return m


# ----------------------------------------------------------------------------- per-rank state


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()                                      # leaves a cached gaussian in numpy's state
    state = ckpt.rng_state()
    want = (random.random(), np.random.randn(3), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == want[0] and np.array_equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_memory_rows_are_picked_by_stream_id_across_layouts():
    # Two "ranks", two micro-batches each: rank r, micro-batch m holds stream 2r+m; row value = stream id.
    def mem(ids):
        return TXLMemory(hidden=torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 2, 3, 4).clone())

    saved = [ckpt.memory_rows([mem([0]), mem([1])], [[0], [1]]), ckpt.memory_rows([mem([2]), mem([3])], [[2], [3]])]
    assert saved[1]["ids"] == [2, 3]
    got = ckpt.select_memory(saved, [3, 0, 2], TXLMemory, dtype=torch.bfloat16)
    assert got.hidden.dtype == torch.bfloat16 and got.hidden.shape == (3, 2, 3, 4)
    assert got.hidden[:, 0, 0, 0].tolist() == [3.0, 0.0, 2.0]
    with pytest.raises(ckpt.CheckpointError, match=r"no memory for stream ids \[7\]"):
        ckpt.select_memory(saved, [1, 7], TXLMemory)


def _meta(step: int, zero_stage: int = 2) -> ckpt.CheckpointMeta:
    return ckpt.CheckpointMeta(tag=ckpt.tag_for(step), step=step, world_size=1, micro_batches=1, n_streams=2,
                               tokens_seen=8 * step, mlflow_run_id=None, manifest={"sha256": "x"}, config={},
                               zero_stage=zero_stage, precision="fp32")


def _fake_tag(root: Path, step: int) -> None:
    d = root / f"global_step{step}" / ckpt.OURS
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps(_meta(step).to_json()))
    torch.save({"rank": 0}, d / "rank0.pt")


def test_latest_list_and_prune(tmp_path):
    assert ckpt.latest_tag(tmp_path) is None
    for s in (3, 12, 6):
        _fake_tag(tmp_path, s)
    (tmp_path / "global_step99").mkdir()                   # incomplete: no meta, never listed
    _fake_tag(tmp_path, 50)
    (tmp_path / "global_step50" / ckpt.OURS / "rank0.pt").unlink()   # a rank's file missing: incomplete
    assert ckpt.list_tags(tmp_path) == [(3, "global_step3"), (6, "global_step6"), (12, "global_step12")]
    # The directories decide, whatever `latest` says (it is moved last, so a crash leaves it behind).
    assert ckpt.latest_tag(tmp_path) == "global_step12"
    for named in ("global_step99", "global_step6"):
        (tmp_path / "latest").write_text(named + "\n")
        assert ckpt.latest_tag(tmp_path) == "global_step12"
    assert ckpt.prune(tmp_path, keep_last=1, keep="global_step6") == ["global_step3"]   # never the one kept
    assert [t for _, t in ckpt.list_tags(tmp_path)] == ["global_step6", "global_step12"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest").write_text("global_step7\n")
    with pytest.raises(ckpt.CheckpointError, match="names 'global_step7' but .* holds no complete checkpoint"):
        ckpt.latest_tag(empty)


def test_changed_shards_are_named(tmp_path):
    a = make_manifest(tmp_path / "a")
    b = make_manifest(tmp_path / "b", tokens=333)
    saved = ckpt.manifest_summary(a)
    ckpt.check_manifest(saved, a, "a", tmp_path)           # the same data: fine
    with pytest.raises(ckpt.CheckpointError, match=r"splits\.train\.tokens: 300 -> 333"):
        ckpt.check_manifest(saved, b, "shards/b", tmp_path / "global_step5")


# ----------------------------------------------------------------------------- stage setup


def test_resolve_config_takes_n_token_and_tgt_len(tmp_path):
    from pipeline.train import resolve_config

    m = make_manifest(tmp_path)
    cfg = Config(model=ModelConfig(tgt_len=16), train=TrainConfig(tgt_len=0, eval_tgt_len=0))
    out = resolve_config(cfg, m, "shards")
    assert (out.model.n_token, out.train.tgt_len, out.train.eval_tgt_len) == (40, 16, 16)
    assert cfg.model.n_token == 0                           # the caller's config is left alone
    with pytest.raises(ConfigError, match="model.n_token=41 but the tokenizer of shards has vocab_size 40"):
        resolve_config(Config(model=ModelConfig(n_token=41)), m, "shards")
    with pytest.raises(ConfigError, match="train.tgt_len=32 differs from model.tgt_len=16"):
        resolve_config(Config(model=ModelConfig(tgt_len=16), train=TrainConfig(tgt_len=32)), m, "shards")


def test_precision_is_refused_by_name_exactly_where_the_accelerator_lacks_it():
    from deepspeed.accelerator import get_accelerator

    from pipeline.runtime.engine import check_precision, precision_support

    acc = get_accelerator()
    support = precision_support()
    # The capability comes from DeepSpeed's own probe (on CPU: oneDNN's fp16 support), not a CPU name.
    assert support == {"fp16": bool(acc.is_fp16_supported()), "bf16": bool(acc.is_bf16_supported()), "fp32": True}
    for precision, ok in support.items():
        if ok:
            check_precision(precision)
        else:
            with pytest.raises(ConfigError, match=f"train.precision={precision} is not supported on DeepSpeed's "
                                                  f"'{acc.device_name()}' accelerator"):
                check_precision(precision)


def test_non_finite_message_names_step_rank_and_streams():
    from pipeline.train import _non_finite

    err = _non_finite(4, 0, [(1, (6, 7), float("nan"))])
    assert "non-finite training loss at step 5 (rank 0 micro-batch 1 streams 6-7 loss nan)" in str(err)


# ----------------------------------------------------------------------------- save with a real engine


@pytest.fixture(scope="module")
def engine():
    import os

    import torch.distributed as dist

    from pipeline.runtime import distributed
    from pipeline.runtime.engine import build_engine

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.pop("MASTER_PORT", None)
    distributed.init_distributed()
    cfg = Config(model=ModelConfig(n_token=40, n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, tgt_len=4,
                                   mem_len=4),
                 train=TrainConfig(n_streams=2, zero_stage=2))
    eng, _ = build_engine(cfg, build_model(cfg.model), world_size=1)
    yield eng
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_save_is_atomic_and_a_failed_save_leaves_the_last_checkpoint(engine, tmp_path):
    state = {"rank": 0, "streams": {"streams": {0: 4, 1: 4}}, "rng": ckpt.rng_state()}
    ckpt.save(engine, tmp_path, state, _meta(1), keep_last=2)
    root = tmp_path / "checkpoints"
    assert ckpt.latest_tag(root) == "global_step1"
    saved = ckpt.load_meta(root / "global_step1")
    assert saved.step == 1 and saved.saved_at and dataclasses.replace(saved, saved_at="") == _meta(1)
    assert torch.load(root / "global_step1" / "xlpipe" / "rank0.pt", weights_only=True)["streams"] == state["streams"]
    assert ckpt.save(engine, tmp_path, state, _meta(1), keep_last=2) == root / "global_step1"   # same step: kept

    with pytest.raises(Exception):   # our file cannot be written (a lambda does not pickle): a crash mid-save
        ckpt.save(engine, tmp_path, {**state, "bad": lambda: 0}, _meta(2), keep_last=2)
    assert ckpt.latest_tag(root) == "global_step1" and not (root / "global_step2").exists()
    assert [t for _, t in ckpt.list_tags(root)] == ["global_step1"]

    for step in (2, 3):              # the next saves clear the leftovers and prune to keep_last
        ckpt.save(engine, tmp_path, state, _meta(step), keep_last=2)
    assert [t for _, t in ckpt.list_tags(root)] == ["global_step2", "global_step3"]
    assert ckpt.latest_tag(root) == "global_step3" and not list((root / ".tmp").iterdir())

    # consolidated weights == the engine's
    got = ckpt.consolidated_state_dict(root / "global_step3")
    for name, p in engine.module.named_parameters():
        assert torch.equal(got[name], p.detach().float()), name
    shutil.rmtree(root)


def test_checkpoint_meta_refuses_missing_and_unknown_keys(tmp_path):
    _fake_tag(tmp_path, 4)
    path = tmp_path / "global_step4" / ckpt.OURS / "meta.json"
    raw = json.loads(path.read_text())
    assert ckpt.load_meta(tmp_path / "global_step4") == _meta(4)
    path.write_text(json.dumps({**{k: v for k, v in raw.items() if k != "world_size"}, "extra": 1}))
    expected = r"meta.json: missing keys \['world_size'\], unknown keys \['extra'\]"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        ckpt.load_meta(tmp_path / "global_step4")
