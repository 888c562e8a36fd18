"""The Compressive Transformer through the real trainer: DeepSpeed ZeRO 0-3 on 2 gloo ranks, exact
and elastic resume with both memories saved by stream id, gradient accumulation, validation's
attention diagnostics. No branch on the family anywhere in the trainer: these are the training
tests' checks (tests/test_train.py) run on another family. Expectations come from other runs.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_train import Runs, assert_same_weights, per_stream, weights

pytestmark = pytest.mark.slow

# Segment 8, memory 8, rate 2: every step pushes 8 rows out of each layer's memory, compressed
# into 4 rows of a 6-row compressed memory, so the reconstruction loss trains from step 2 on.
COMPRESSIVE = ["model.family=compressive", "model.compressive.cmem_len=6", "model.compressive.ratio=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("compressive"))


def test_zero_stages_agree_bitwise_and_the_compression_learns(runs):
    ref = runs.run("c0", [*COMPRESSIVE, "train.zero_stage=0", "train.clip=0"], record=False)
    losses = ref[0]["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    w0 = weights(runs.ckpt("c0", 6))
    assert any(k.startswith("compress.") for k in w0)
    start = {k: v for k, v in weights(runs.ckpt("c0", 3)).items() if k.startswith("compress.")}
    assert any(not torch.equal(start[k], w0[k]) for k in start)       # f_c is trained by its loss
    for stage in (2, 3):
        got = runs.run(f"c{stage}", [*COMPRESSIVE, f"train.zero_stage={stage}", "train.clip=0"], record=False)
        assert got[0]["losses"] == losses, f"stage {stage}"
        assert_same_weights(weights(runs.ckpt(f"c{stage}", 6)), w0)


def test_resume_is_bitwise_with_both_memories(runs):
    runs.run("c2", [*COMPRESSIVE, "train.zero_stage=2", "train.clip=0"], record=False)
    again = runs.run("c2-resumed", [*COMPRESSIVE, "train.zero_stage=2", "train.clip=0"], record=False,
                     seed_from=("c2", 3))
    assert again[0]["start_step"] == 3
    assert again[0]["losses"] == runs.results["c2"][0]["losses"][3:]
    assert_same_weights(weights(runs.ckpt("c2-resumed", 6)), weights(runs.ckpt("c2", 6)))
    fields = torch.load(runs.ckpt("c2", 3) / "xlpipe" / "rank0.pt", weights_only=True)["memory"]["fields"]
    assert set(fields) == {"hidden", "compressed"}            # both FIFOs, one row per stream of the rank
    assert fields["compressed"].shape == (2, 2, 6, 32) and fields["hidden"].shape == (2, 2, 8, 32)


def test_elastic_two_ranks_to_one_with_accumulation(runs):
    common = [*COMPRESSIVE, "train.zero_stage=2", "model.dropout=0.0", "train.micro_batches=2"]
    two = runs.run("c-accum2", common)
    one = runs.run("c-elastic", common, world=1, seed_from=("c-accum2", 3))
    a, b = per_stream(two), per_stream(one)
    for step in (3, 4, 5):
        assert b[step].keys() == {0, 1, 2, 3}
        for sid in range(4):
            assert b[step][sid][1] == a[step][sid][1], (step, sid)
            # step 3's loss depends on the re-sliced memory and compressed memory rows
            assert b[step][sid][0] == pytest.approx(a[step][sid][0], rel=1e-5, abs=1e-6), (step, sid)
    assert_same_weights(weights(runs.ckpt("c-elastic", 6)), weights(runs.ckpt("c-accum2", 6)), atol=1e-5)


def test_validation_reports_where_attention_goes(runs):
    got = runs.run("c-valid", [*COMPRESSIVE, "train.eval_every=3", "train.eval_tgt_len=8"], record=False)
    valid = got[0]["valid"]
    assert math.isfinite(valid["loss"])
    regions = {k: valid[f"attn_{k}"] for k in ("compressed", "memory", "segment")}
    assert sum(regions.values()) == pytest.approx(1.0) and regions["compressed"] > 0
    assert {f"attn_memory_age{b}" for b in range(6)} <= set(valid)
    assert got[1]["valid"] == valid                                   # summed over both ranks
