"""The memory families built on Transformer-XL through the real trainer: DeepSpeed ZeRO 0-3 on 2 gloo
ranks, exact and elastic resume with every memory field saved by stream id, gradient
accumulation, validation's attention diagnostics. No branch on the family anywhere in the
trainer: these are the training tests' checks (tests/test_train.py) run on other families.
Expectations come from other runs.
"""
from __future__ import annotations

import math

import pytest
import torch

from test_train import Runs, assert_same_weights, per_stream, weights

pytestmark = pytest.mark.slow

FAMILIES = {
    # Segment 8, memory 8, rate 2: every step pushes 8 rows out of each layer's memory, compressed
    # into 4 rows of a 6-row compressed memory, so the reconstruction loss trains from step 2 on.
    "compressive": ["model.family=compressive", "model.compressive.cmem_len=6", "model.compressive.ratio=2"],
    # Chunk 8 (the segment): step 2 pushes the first chunk out of the short-term memory, step 3
    # writes it into the long-term memory, later steps contract it (sticky sampling).
    "infinite_former": ["model.family=infinite_former", "model.infinite_former.n_basis=16",
                        "model.infinite_former.widths=[0.05,0.2]", "model.infinite_former.n_samples=8",
                        "model.infinite_former.n_bins=16", "model.infinite_former.sticky=true"],
}
OWN = {"compressive": "compress.", "infinite_former": "ltm."}
FIELDS = {"compressive": {"hidden": (2, 2, 8, 32), "compressed": (2, 2, 6, 32)},
          "infinite_former": {"hidden": (2, 2, 8, 32), "pending": (2, 2, 8, 32), "coef": (2, 2, 16, 32),
                              "hist": (2, 2, 16), "writes": (2,)}}
families = pytest.mark.parametrize("family", sorted(FAMILIES))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("families"))


# The ZeRO-stage runs also validate (steps 3 and 6): validation must leave training bitwise as it
# was (the resume test starts the stage-2 run again from step 3), and it runs under ZeRO-3 too.
VALIDATE = ["train.eval_every=3", "train.eval_tgt_len=8"]


@families
def test_zero_stages_agree_bitwise_and_the_family_parts_learn(runs, family):
    args = [*FAMILIES[family], *VALIDATE]
    ref = runs.run(f"{family}-0", [*args, "train.zero_stage=0", "train.clip=0"], record=False)
    losses = ref[0]["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    w0 = weights(runs.ckpt(f"{family}-0", 6))
    start = {k: v for k, v in weights(runs.ckpt(f"{family}-0", 3)).items() if k.startswith(OWN[family])}
    assert start and any(not torch.equal(start[k], w0[k]) for k in start)   # the family's own parts train
    for stage in (2, 3):
        # ZeRO-3 with every parameter partitioned: a weight read outside its module's forward
        # would be an empty partition (small ones otherwise stay gathered and hide that)
        got = runs.run(f"{family}-{stage}", [*args, f"train.zero_stage={stage}", "train.clip=0",
                                             "train.zero3_persistence_threshold=0"], record=False)
        assert got[0]["losses"] == losses, f"stage {stage}"
        assert_same_weights(weights(runs.ckpt(f"{family}-{stage}", 6)), w0)


@families
def test_resume_is_bitwise_with_every_memory_field(runs, family):
    args = [*FAMILIES[family], *VALIDATE, "train.zero_stage=2", "train.clip=0", "train.zero3_persistence_threshold=0"]
    runs.run(f"{family}-2", args, record=False)
    again = runs.run(f"{family}-2-resumed", args, record=False, seed_from=(f"{family}-2", 3))
    assert again[0]["start_step"] == 3
    assert again[0]["losses"] == runs.results[f"{family}-2"][0]["losses"][3:]
    assert_same_weights(weights(runs.ckpt(f"{family}-2-resumed", 6)), weights(runs.ckpt(f"{family}-2", 6)))
    fields = torch.load(runs.ckpt(f"{family}-2", 3) / "xlpipe" / "rank0.pt", weights_only=True)["memory"]["fields"]
    assert {k: tuple(v.shape) for k, v in fields.items()} == FIELDS[family]   # one row per stream of the rank


@families
def test_elastic_two_ranks_to_one_with_accumulation(runs, family):
    common = [*FAMILIES[family], "train.zero_stage=2", "model.dropout=0.0", "train.micro_batches=2"]
    two = runs.run(f"{family}-accum2", common)
    one = runs.run(f"{family}-elastic", common, world=1, seed_from=(f"{family}-accum2", 3))
    a, b = per_stream(two), per_stream(one)
    for step in (3, 4, 5):
        assert b[step].keys() == {0, 1, 2, 3}
        for sid in range(4):
            assert b[step][sid][1] == a[step][sid][1], (step, sid)
            # step 3's loss depends on every re-sliced memory field of the stream
            assert b[step][sid][0] == pytest.approx(a[step][sid][0], rel=1e-5, abs=1e-6), (step, sid)
    assert_same_weights(weights(runs.ckpt(f"{family}-elastic", 6)), weights(runs.ckpt(f"{family}-accum2", 6)),
                        atol=1e-5)


@families
def test_validation_reports_where_attention_goes(runs, family):
    got = runs.run(f"{family}-0", [*FAMILIES[family], *VALIDATE, "train.zero_stage=0", "train.clip=0"], record=False)
    valid = got[0]["valid"]
    assert math.isfinite(valid["loss"])
    regions = {k[5:]: v for k, v in valid.items() if k.startswith("attn_") and "_age" not in k}
    assert {"memory", "segment"} <= set(regions) and sum(regions.values()) == pytest.approx(1.0)
    if family == "compressive":
        assert regions["compressed"] > 0
    assert {f"attn_memory_age{b}" for b in range(6)} <= set(valid)
    assert got[1]["valid"] == valid                                   # summed over both ranks


@families
def test_bf16_training_keeps_the_memory_in_bf16(runs, family):
    """bf16 on DeepSpeed's CPU accelerator: finite losses, and the saved memory is bf16 (the
    ∞-former's ridge matrices stay float64 whatever the model's dtype: tests/test_infinite_former.py)."""
    got = runs.run(f"{family}-bf16", [*FAMILIES[family], "train.precision=bf16", "train.zero_stage=2"], record=False)
    assert all(math.isfinite(x) for x in got[0]["losses"])
    fields = torch.load(runs.ckpt(f"{family}-bf16", 6) / "xlpipe" / "rank0.pt", weights_only=True)["memory"]["fields"]
    assert fields["hidden"].dtype == torch.bfloat16
    assert all(v.dtype in (torch.bfloat16, torch.long) for v in fields.values())


@families
def test_validation_under_zero3_with_every_parameter_partitioned(runs, family):
    """Validation runs through the engine: under ZeRO-3 every module (the long-term read inside the
    attention, f_c after the layers) must gather its weights itself; the same loss as stage 0."""
    args = [*FAMILIES[family], *VALIDATE, "train.clip=0"]
    ref = runs.run(f"{family}-0", [*args, "train.zero_stage=0"], record=False)
    got = runs.run(f"{family}-3", [*args, "train.zero_stage=3", "train.zero3_persistence_threshold=0"],
                   record=False)
    assert got[0]["losses"] == ref[0]["losses"]
    assert math.isfinite(ref[0]["valid"]["loss"])
    assert got[0]["valid"]["loss"] == pytest.approx(ref[0]["valid"]["loss"], rel=1e-6)


# -- documents and scored targets (tests/test_documents.py has the single-process checks) ------


@pytest.mark.parametrize("family", ["transformer_xl", *sorted(FAMILIES)])
def test_document_reset_trains_under_zero_and_resumes_bitwise(runs, family):
    """The JSONL corpus's documents: no token sees an earlier one, under ZeRO 0 and 2 alike, and
    the rows' document lengths ride in the checkpoint so a resume is bitwise."""
    args = [*FAMILIES.get(family, []), "train.document_reset=true", "train.clip=0"]
    ref = runs.run(f"{family}-docs0", [*args, "train.zero_stage=0"], record=False)
    two = runs.run(f"{family}-docs2", [*args, "train.zero_stage=2"], record=False)
    losses = two[0]["losses"]
    assert all(math.isfinite(x) for x in losses) and losses == ref[0]["losses"]
    again = runs.run(f"{family}-docs2-resumed", [*args, "train.zero_stage=2"], record=False,
                     seed_from=(f"{family}-docs2", 3))
    assert again[0]["losses"] == losses[3:]
    assert_same_weights(weights(runs.ckpt(f"{family}-docs2-resumed", 6)), weights(runs.ckpt(f"{family}-docs2", 6)))
    fields = torch.load(runs.ckpt(f"{family}-docs2", 3) / "xlpipe" / "rank0.pt", weights_only=True)["memory"]["fields"]
    assert fields["doc_len"].dtype == torch.long and tuple(fields["doc_len"].shape) == (2,)


@pytest.fixture(scope="module")
def sort_runs(tmp_path_factory) -> Runs:
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("sort")
    cfg = load_config(None, [f"data.output={root / 'sort'}", "data.corpus=sort", "data.sort_length=60",
                             "data.sort_sequences=[24,8,8]", "data.sort_unit_sequences=8", "data.workers=1"])
    prepare(cfg, progress=False)
    found = Runs(root)
    found.shards = root / "sort"
    return found


def test_scored_targets_make_the_update_a_token_weighted_mean_whatever_the_layout(sort_runs):
    """The sorting task scores 20 of every 81 targets, unevenly over micro-batches and ranks: the
    step divides every micro-batch's NLL sum by the step's scored targets over all ranks, so one
    rank with one micro-batch, one rank with two and two ranks make the same updates."""
    args = ["train.document_reset=true", "model.dropout=0.0", "train.clip=0", "train.roll=false",
            "train.eval_every=3", "train.eval_tgt_len=8"]
    one = sort_runs.run("sort-1x1", args, world=1, record=False)
    accum = sort_runs.run("sort-1x2", [*args, "train.micro_batches=2"], world=1, record=False)
    ranks = sort_runs.run("sort-2x1", args, world=2, record=False)
    for other in (accum, ranks):
        assert other[0]["losses"] == pytest.approx(one[0]["losses"], rel=1e-5, nan_ok=True)
        assert_same_weights(weights(sort_runs.ckpt("sort-1x2" if other is accum else "sort-2x1", 6)),
                            weights(sort_runs.ckpt("sort-1x1", 6)), atol=1e-5)
    valid = one[0]["valid"]
    assert 0.0 <= valid["accuracy"] <= 1.0 and math.isfinite(valid["loss"])
    assert valid["tokens"] <= 8 * 20                  # only the answers are scored


GPT2 = ["model.family=gpt2_ltm", "model.gpt2_ltm.memory.n_basis=16", "model.gpt2_ltm.memory.widths=[0.05,0.2]",
        "model.gpt2_ltm.memory.n_samples=8", "model.gpt2_ltm.memory.n_bins=16"]
OTHERS = {
    # A tiny random GPT-2 with the long-term memory in both layers.
    "gpt2_ltm": (GPT2, ("hf.transformer.h.0.attn.c_attn.", "ltm.0.key."),
                 {"tokens": (2, 8), "pending": (2, 2, 8, 32), "coef": (2, 2, 16, 32), "hist": (2, 2, 16),
                  "writes": (2,), "doc_len": (2,)}),
    # Two LSTM layers with a projection: the (h, c) state is the memory.
    "lstm": (["model.family=lstm", "model.lstm.proj_size=16"], ("rnn.weight_hh_l0", "word_emb."),
             {"h": (2, 2, 16), "c": (2, 2, 32), "doc_len": (2,)}),
}


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_other_families_train_under_zero_and_resume_bitwise(runs, family):
    """GPT-2 with long-term memory and the LSTM through the trainer, documents reset: ZeRO 0, 2 and 3
    (every parameter partitioned) agree, a resume is bitwise, and their own weights move."""
    if family == "gpt2_ltm":
        pytest.importorskip("transformers")
    extra, moving, fields = OTHERS[family]
    args = [*extra, "train.clip=0", "train.document_reset=true"]
    ref = runs.run(f"{family}-z0", [*args, "train.zero_stage=0"], record=False)
    losses = ref[0]["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    for stage in (2, 3):
        got = runs.run(f"{family}-z{stage}", [*args, f"train.zero_stage={stage}",
                                              "train.zero3_persistence_threshold=0"], record=False)
        assert got[0]["losses"] == losses, f"stage {stage}"
    again = runs.run(f"{family}-z2-resumed", [*args, "train.zero_stage=2"], record=False,
                     seed_from=(f"{family}-z2", 3))
    assert again[0]["losses"] == losses[3:]
    end = weights(runs.ckpt(f"{family}-z2", 6))
    assert_same_weights(weights(runs.ckpt(f"{family}-z2-resumed", 6)), end)
    start = weights(runs.ckpt(f"{family}-z2", 3))
    for prefix in moving:
        assert any(not torch.equal(start[k], end[k]) for k in end if k.startswith(prefix)), prefix
    saved = torch.load(runs.ckpt(f"{family}-z2", 3) / "xlpipe" / "rank0.pt", weights_only=True)["memory"]["fields"]
    assert {k: tuple(v.shape) for k, v in saved.items()} == fields
