"""pipeline.evaluation.scoring against independent computations on real shards: a naive per-stream loop over
the raw token array, and the recurrence identity of Transformer-XL (segments with enough memory
== one full-length forward of the stream)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model
from models.base import span_keeping_mem_len
from models.config import ModelConfig
from pipeline.data.shards import Manifest, SplitInfo, write_shard
from pipeline.evaluation.scoring import eval_lengths, score_split, summarize

N_TOKEN = 50


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A 'valid' split of 1201 random tokens in three shards; returns (shard dir, raw tokens)."""
    root = tmp_path_factory.mktemp("scoring")
    raw = np.random.default_rng(3).integers(0, N_TOKEN, 1201).astype("uint16")
    infos = [write_shard(root, "valid", i, raw[lo:hi], 64, "uint16")
             for i, (lo, hi) in enumerate([(0, 500), (500, 777), (777, 1201)])]
    Manifest("test", {"kind": "word", "vocab_size": N_TOKEN}, "uint16", 64, False,
             {"valid": SplitInfo(infos)}).save(root)
    return root, raw.astype(np.int64)


def tiny_txl(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(n_token=N_TOKEN, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.0,
                      tgt_len=8, mem_len=8, **kw)
    return build_model(cfg).eval()


def naive(model, raw: np.ndarray, n: int, tgt: int, mem_len: int, warm: int = 0, max_steps: int = 0) -> tuple:
    """Stream b = raw[b*L : (b+1)*L + 1], run alone, segment by segment, memory carried."""
    L = (len(raw) - 1) // n
    total, count = 0.0, 0
    model.reset_length(tgt, 0, mem_len)
    with torch.no_grad():
        for b in range(n):
            memory = model.init_memory(1)
            if warm:   # the w tokens before the stream (wrapping to the split's end), in tgt pieces from the end
                ctx = np.concatenate([raw, raw])[len(raw) + b * L - warm: len(raw) + b * L + 1]
                cuts = list(range(len(ctx) - 1, 0, -tgt))[::-1]
                start = 0
                for c in cuts:
                    x = torch.from_numpy(ctx[start:c]).view(1, -1)
                    memory = model(x, torch.from_numpy(ctx[start + 1:c + 1]).view(1, -1), memory=memory).memory
                    start = c
            seq = raw[b * L: (b + 1) * L + 1]
            for k, j in enumerate(range(0, L, tgt)):
                if max_steps and k == max_steps:
                    break
                x = torch.from_numpy(seq[j: min(j + tgt, L)]).view(1, -1)
                y = torch.from_numpy(seq[j + 1: min(j + tgt, L) + 1]).view(1, -1)
                out = model(x, y, memory=memory)
                memory = out.memory
                total += float(out.nll.double().sum())
                count += y.numel()
    return total, count


def test_score_split_equals_a_naive_loop_over_the_raw_tokens(split):
    root, raw = split
    model = tiny_txl()
    got = score_split(model, root, "valid", n_streams=4, tgt_len=7, mem_len=12, rank=0, world_size=1)
    assert (model.tgt_len, model.mem_len) == (8, 8)                 # training lengths restored
    want, count = naive(model, raw, 4, 7, 12)
    assert got["tokens"] == count == 4 * ((len(raw) - 1) // 4)      # every stream's L targets, the last segment short
    assert got["nll_sum"] == pytest.approx(want, rel=1e-6)


def test_segments_with_full_memory_equal_one_full_length_forward(split):
    """Dai et al. §3.2: with memory covering the whole history, segment-level recurrence
    computes the same states as attending over everything at once."""
    root, raw = split
    model = tiny_txl()
    L = (len(raw) - 1) // 6
    got = score_split(model, root, "valid", n_streams=6, tgt_len=16, mem_len=L, rank=0, world_size=1)
    total = 0.0
    with torch.no_grad():
        for b in range(6):
            seq = torch.from_numpy(raw[b * L: (b + 1) * L + 1])
            total += float(model(seq[:-1].view(1, -1), seq[1:].view(1, -1)).nll.double().sum())
    assert got["nll_sum"] == pytest.approx(total, rel=1e-5)


def test_warm_start_and_max_steps(split):
    root, raw = split
    model = tiny_txl()
    got = score_split(model, root, "valid", n_streams=4, tgt_len=8, mem_len=16, warm_tokens=16, rank=0, world_size=1)
    want, count = naive(model, raw, 4, 8, 16, warm=16)
    assert got["tokens"] == count and got["nll_sum"] == pytest.approx(want, rel=1e-6)
    cold = score_split(model, root, "valid", n_streams=4, tgt_len=8, mem_len=16, rank=0, world_size=1)
    assert cold["nll_sum"] != got["nll_sum"]          # memory at the start matters (a little, untrained)
    short = score_split(model, root, "valid", n_streams=4, tgt_len=8, mem_len=8, max_steps=3, rank=0, world_size=1)
    want, count = naive(model, raw, 4, 8, 8, max_steps=3)
    assert short["tokens"] == count == 4 * 3 * 8 and short["nll_sum"] == pytest.approx(want, rel=1e-6)


def test_ranks_partition_the_streams(split):
    root, _ = split
    model = tiny_txl()
    whole = score_split(model, root, "valid", n_streams=4, tgt_len=8, mem_len=8, rank=0, world_size=1)
    parts = [score_split(model, root, "valid", n_streams=4, tgt_len=8, mem_len=8, rank=r, world_size=2, reduce=False)
             for r in (0, 1)]
    assert sum(p["tokens"] for p in parts) == whole["tokens"]
    assert sum(p["nll_sum"] for p in parts) == pytest.approx(whole["nll_sum"], rel=1e-9)


def test_eval_lengths_are_restored_even_on_error():
    model = tiny_txl(clamp_len=-1)
    with eval_lengths(model, tgt_len=4, mem_len=40, clamp_len=20, same_length=True):
        assert (model.tgt_len, model.mem_len, model.clamp_len, model.same_length) == (4, 40, 20, True)
    assert (model.tgt_len, model.mem_len, model.clamp_len, model.same_length) == (8, 8, -1, False)
    with pytest.raises(RuntimeError, match="boom"):
        with eval_lengths(model, mem_len=99):
            raise RuntimeError("boom")
    assert model.mem_len == 8
    with pytest.raises(TypeError, match="expected a models.LanguageModel"):
        with eval_lengths(torch.nn.Linear(2, 2), clamp_len=3):
            pass


def test_train_time_eval_memory_keeps_the_attention_span():
    # The reference's rule (kimiyoung train.py): enwik8 base, tgt/mem 512, eval_tgt 128 -> memory 896.
    assert span_keeping_mem_len(512, 512, 128) == 896
    assert span_keeping_mem_len(150, 150, 150) == 150
    assert span_keeping_mem_len(0, 150, 64) == 0          # no memory: nothing to extend


def test_summarize():
    assert summarize(2.0, 2, bpc=True) == {"loss": 1.0, "bpc": pytest.approx(1 / np.log(2))}
    assert summarize(6.0, 3, bpc=False) == {"loss": 2.0, "ppl": pytest.approx(np.exp(2.0))}
