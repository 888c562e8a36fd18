"""The family contract: what every registered model family must do for the pipeline.

Parametrised over ``models.REGISTRY``: a new family is covered by registering it and adding its
entry to ``SPECS`` (a tiny config and the family's own independent reference computation); the
first test fails until it does. Memory-carrying forwards are checked against that reference
(Transformer-XL: one full-length forward; Al-Rfou: every prediction from its own window), rows
against each other, memory against its container operations, lengths against their restore.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from naive_compressive import naive_compressive
from naive_infinite import naive_infinite

from models import REGISTRY, LanguageModel, Memory, ModelConfig, build_model
from models.base import LENGTHS
from models.compressive import CompressiveConfig
from models.documents import UNBOUNDED
from models.gpt2_ltm import GPT2LTMConfig
from models.infinite_former import InfiniteFormerConfig
from models.lstm import LSTMConfig

V = 37
SMALL = dict(n_token=V, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.1, dropatt=0.1)


def txl_reference(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of one forward over the whole sequence from empty memory."""
    with model.eval_lengths(tgt_len=tokens.size(1) - 1, mem_len=0, same_length=False):
        return model(tokens[:, :-1], tokens[:, 1:]).nll


def compressive_reference(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """Every segment over [compressed; memory; segment] written out from the paper (naive_compressive)."""
    return naive_compressive(model, tokens, model.cfg.tgt_len)


def infinite_reference(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """Short-term attention and the long-term memory's fits and reads rebuilt from the paper (naive_infinite)."""
    return naive_infinite(model, tokens, model.cfg.tgt_len)


def gpt2_reference(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """HF's own GPT2LMHeadModel over each segment's window (the mem_len tokens before it, then the
    segment), scored on the segment: the wrapper's short-term memory computed by transformers."""
    seg, mem = model.cfg.tgt_len, model.cfg.mem_len
    cols = []
    for i in range(0, tokens.size(1) - 1, seg):
        lo = max(0, i - mem)
        window = tokens[:, lo: min(i + seg, tokens.size(1) - 1)]
        logp = model.hf(window).logits.float().log_softmax(-1)[:, i - lo:]
        cols.append(-logp.gather(-1, tokens[:, i + 1: i + 1 + logp.size(1), None]).squeeze(-1))
    return torch.cat(cols, dim=1)


def lstm_reference(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """The LSTM equations step by step from the weights (i, f, g, o gates; c = f c + i g; h = o tanh c,
    projected when proj_size is set), from a zero state over the whole sequence."""
    x = model.word_emb(tokens[:, :-1])
    rnn = model.rnn
    for layer in range(rnn.num_layers):
        w_ih, w_hh = getattr(rnn, f"weight_ih_l{layer}"), getattr(rnn, f"weight_hh_l{layer}")
        b = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
        w_hr = getattr(rnn, f"weight_hr_l{layer}", None)
        h = x.new_zeros(x.size(0), w_hh.size(1))
        c = x.new_zeros(x.size(0), rnn.hidden_size)
        outs = []
        for t in range(x.size(1)):
            i, f, g, o = (x[:, t] @ w_ih.T + h @ w_hh.T + b).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if w_hr is not None:
                h = h @ w_hr.T
            outs.append(h)
        x = torch.stack(outs, dim=1)
    nll, _ = model.crit(x.reshape(-1, x.size(-1)), tokens[:, 1:].reshape(-1))
    return nll.view(tokens.size(0), -1)


def window_reference(model: LanguageModel, tokens: torch.Tensor) -> torch.Tensor:
    """Prediction t from its own window: the last L tokens up to t (fewer at the start), each a
    fresh forward from empty memory scored at its last position (Al-Rfou et al.'s evaluation)."""
    L = model.cfg.tgt_len
    cols = []
    for t in range(tokens.size(1) - 1):
        lo = max(0, t + 1 - L)
        window, target = tokens[:, lo: t + 1], tokens[:, lo + 1: t + 2]
        cols.append(model(window, target).nll[:, -1])
    return torch.stack(cols, dim=1)


@dataclasses.dataclass
class Spec:
    cfg: ModelConfig
    segment: int                      # tokens per forward in the streamed run
    n_segments: int
    reference: Callable[[LanguageModel, torch.Tensor], torch.Tensor]
    eval_lengths: dict                # a setting of every length the family has


SPECS = {
    # mem_len covers the whole sequence, so carried memory must reproduce the full-length forward.
    "transformer_xl": Spec(ModelConfig(family="transformer_xl", **SMALL, tgt_len=4, mem_len=24, clamp_len=-1),
                           segment=4, n_segments=5, reference=txl_reference,
                           eval_lengths={"tgt_len": 2, "mem_len": 7, "clamp_len": 3, "same_length": True}),
    # One token per forward with L - 1 tokens of memory is exactly the stride-1 sliding window.
    "vanilla": Spec(ModelConfig(family="vanilla", **SMALL, attn_type="learned", tgt_len=6, mem_len=5,
                                tie_weight=False), segment=1, n_segments=14, reference=window_reference,
                    eval_lengths={"tgt_len": 3, "mem_len": 2}),
    # Memory 4 and segment 4 at rate 2: from the second segment on, 4 rows are compressed into 2
    # each time and the compressed memory of 3 rows overflows; larger weights make attention peaked.
    "compressive": Spec(ModelConfig(family="compressive", **SMALL, tgt_len=4, mem_len=4, init_std=0.3,
                                    compressive=CompressiveConfig(cmem_len=3, ratio=2)),
                        segment=4, n_segments=5, reference=compressive_reference,
                        eval_lengths={"tgt_len": 2, "mem_len": 7, "clamp_len": 3, "same_length": True,
                                      "cmem_len": 5}),
    # Segment, memory and chunk 4: the third forward writes the first chunk into the long-term
    # memory, the fourth and fifth contract it and add theirs (8 basis functions, 6 samples).
    "infinite_former": Spec(ModelConfig(family="infinite_former", **SMALL, tgt_len=4, mem_len=4, init_std=0.3,
                                        infinite_former=InfiniteFormerConfig(n_basis=8, widths=[0.1, 0.3],
                                                                             n_samples=6)),
                            segment=4, n_segments=5, reference=infinite_reference,
                            eval_lengths={"tgt_len": 2, "mem_len": 7, "clamp_len": 3, "same_length": True}),
    # GPT-2 over a window of the previous segment, without the long-term memory (its own tests are in
    # tests/test_gpt2_ltm.py): the reference is transformers' GPT2LMHeadModel on each window.
    "gpt2_ltm": Spec(ModelConfig(family="gpt2_ltm", **SMALL, tgt_len=4, mem_len=4, init_std=0.3,
                                 gpt2_ltm=GPT2LTMConfig(long_term=False)),
                     segment=4, n_segments=5, reference=gpt2_reference, eval_lengths={"tgt_len": 2, "mem_len": 3}),
    # Two layers with a projection and an adaptive softmax tied to the adaptive input; the reference
    # runs the LSTM equations by hand over the whole sequence.
    "lstm": Spec(ModelConfig(family="lstm", **{**SMALL, "d_embed": 8}, tgt_len=4, mem_len=1, cutoffs=[10, 20],
                             init_std=0.5, proj_init_std=0.5,
                             div_val=2, tie_projs=[False, True, True], lstm=LSTMConfig(proj_size=8)),
                 segment=4, n_segments=5, reference=lstm_reference, eval_lengths={"tgt_len": 2, "mem_len": 0}),
}


def test_every_registered_family_has_a_contract_spec():
    assert set(SPECS) == set(REGISTRY), "add the new family's tiny config and reference to SPECS"


families = pytest.mark.parametrize("family", sorted(REGISTRY))


def make(family: str, seed: int = 0) -> tuple[LanguageModel, Spec]:
    spec = SPECS[family]
    torch.manual_seed(seed)
    return build_model(spec.cfg), spec


def tokens(spec: Spec, batch: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, spec.segment * spec.n_segments + 1), generator=g)


def stream(model: LanguageModel, spec: Spec, toks: torch.Tensor, memory=None) -> tuple[torch.Tensor, Memory]:
    """Per-token NLL of the sequence fed segment by segment, memory carried."""
    memory = model.init_memory(toks.size(0)) if memory is None else memory
    nlls = []
    for i in range(0, toks.size(1) - 1, spec.segment):
        out = model(toks[:, i: i + spec.segment], toks[:, i + 1: i + 1 + spec.segment], memory=memory)
        nlls.append(out.nll)
        memory = out.memory
    return torch.cat(nlls, dim=1), memory


@families
def test_family_is_registered_under_its_name(family):
    model, _ = make(family)
    assert isinstance(model, LanguageModel) and model.family == family
    assert set(model.length_names) <= set(LENGTHS)
    assert set(model.lengths()) == set(model.length_names)


@families
@torch.no_grad()
def test_carried_memory_equals_the_family_reference(family):
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    streamed, _ = stream(model, spec, toks)
    expected = spec.reference(model, toks)
    assert streamed.shape == expected.shape == (toks.size(0), toks.size(1) - 1)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


@families
@torch.no_grad()
def test_rows_are_independent(family):
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    changed = toks.clone()
    changed[1] = torch.randint(0, V, changed[1].shape, generator=torch.Generator().manual_seed(9))
    a, mem_a = stream(model, spec, toks)
    b, mem_b = stream(model, spec, changed)
    assert not torch.equal(a[1], b[1])
    for row in (0, 2):
        torch.testing.assert_close(a[row], b[row], rtol=1e-6, atol=1e-6)
        for name, t in mem_a.select([row]).tensors().items():
            if t is not None:
                torch.testing.assert_close(t, mem_b.select([row]).tensors()[name], rtol=1e-6, atol=1e-6)


@families
def test_memory_is_detached_and_round_trips_bit_identically(family):
    model, spec = make(family)
    model.train()
    toks = tokens(spec, batch=4)
    half = spec.segment * (spec.n_segments // 2)
    torch.manual_seed(3)
    _, memory = stream(model, spec, toks[:, : half + 1])           # with grad and dropout on
    assert memory.batch_size == 4
    for t in memory.tensors().values():
        assert t is None or not t.requires_grad
    model.eval()
    nxt_in, nxt_tg = toks[:, half: half + spec.segment], toks[:, half + 1: half + 1 + spec.segment]
    with torch.no_grad():
        expected = model(nxt_in, nxt_tg, memory=memory).nll
        # select/cat: rows taken apart and put back in another order, then reordered again.
        parts = [memory.select([2, 3]), memory.select(slice(0, 2))]
        rebuilt = type(memory).cat(parts).select([2, 3, 0, 1])
        assert torch.equal(model(nxt_in, nxt_tg, memory=rebuilt).nll, expected)
        # state_dict: what a checkpoint stores per stream, loaded into a fresh container.
        state = {k: v.clone() for k, v in memory.state_dict().items()}
        restored = type(memory).from_state_dict(state)
        assert torch.equal(model(nxt_in, nxt_tg, memory=restored).nll, expected)


@families
@torch.no_grad()
def test_init_memory_is_empty(family):
    model, spec = make(family)
    model.eval()
    memory = model.init_memory(3)
    assert memory.batch_size == 3
    assert all(t is None or t.numel() == 0 for t in memory.tensors().values())
    toks = tokens(spec)
    seg_in, seg_tg = toks[:, : spec.segment], toks[:, 1: spec.segment + 1]
    assert torch.equal(model(seg_in, seg_tg, memory=memory).nll, model(seg_in, seg_tg).nll)


@families
def test_eval_lengths_are_set_and_restored(family):
    model, spec = make(family)
    before = model.lengths()
    assert set(spec.eval_lengths) == set(model.length_names)
    with model.eval_lengths(**spec.eval_lengths):
        assert model.lengths() == spec.eval_lengths
    assert model.lengths() == before
    with pytest.raises(RuntimeError, match="boom"):
        with model.eval_lengths(**spec.eval_lengths):
            raise RuntimeError("boom")
    assert model.lengths() == before
    for name in sorted(set(LENGTHS) - set(model.length_names)):
        with pytest.raises(ValueError, match=f"the {family} family has no {name}"):
            with model.eval_lengths(**{name: 1}):
                pass
    assert model.lengths() == before


@families
@torch.no_grad()
def test_window_lengths_give_one_window_from_empty_memory(family):
    """Under ``window_lengths(c)`` a forward of c tokens sees exactly them, and keeps no memory
    that would reach into the next window (RECL and the sliding-window baseline rely on this)."""
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    c = 3
    with model.eval_lengths(**model.window_lengths(c)):
        out = model(toks[:, :c], toks[:, 1: c + 1])
        again = model(toks[:, :c], toks[:, 1: c + 1], memory=out.memory)
    torch.testing.assert_close(again.nll, out.nll, rtol=1e-6, atol=1e-6)
    if model.suffix_targets:   # fewer targets score only the last positions
        with model.eval_lengths(**model.window_lengths(c)):
            last = model(toks[:, :c], toks[:, c: c + 1]).nll
        torch.testing.assert_close(last[:, 0], out.nll[:, -1], rtol=1e-6, atol=1e-6)


@families
@torch.no_grad()
def test_bf16_memory_is_accepted(family):
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    half = spec.segment * (spec.n_segments // 2)
    _, memory = stream(model, spec, toks[:, : half + 1])
    low = memory.to(dtype=torch.bfloat16)
    for t in low.tensors().values():
        assert t is None or not t.is_floating_point() or t.dtype == torch.bfloat16
    nxt_in, nxt_tg = toks[:, half: half + spec.segment], toks[:, half + 1: half + 1 + spec.segment]
    full = model(nxt_in, nxt_tg, memory=memory).nll
    cast = model(nxt_in, nxt_tg, memory=low).nll
    assert torch.isfinite(cast).all()
    torch.testing.assert_close(cast, full, rtol=0.05, atol=0.05)


@families
def test_inference_state_dict_reloads_into_a_fresh_model(family):
    model, spec = make(family)
    state = model.inference_state_dict()
    other, _ = make(family, seed=5)
    other.load_inference_state_dict(state)
    model.eval(), other.eval()
    toks = tokens(spec)
    seg_in, seg_tg = toks[:, : spec.segment], toks[:, 1: spec.segment + 1]
    with torch.no_grad():
        assert torch.equal(model(seg_in, seg_tg).nll, other(seg_in, seg_tg).nll)
    with pytest.raises(KeyError):
        other.load_inference_state_dict({k: v for i, (k, v) in enumerate(state.items()) if i})


# -- document boundaries (models/documents.py) ------------------------------------------------


def stream_docs(model: LanguageModel, spec: Spec, toks: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Per-token NLL streamed segment by segment with ``doc_start`` flags (``starts [B, n]`` over inputs)."""
    memory = model.init_memory(toks.size(0))
    nlls = []
    for i in range(0, toks.size(1) - 1, spec.segment):
        out = model(toks[:, i: i + spec.segment], toks[:, i + 1: i + 1 + spec.segment], memory=memory,
                    doc_start=starts[:, i: i + spec.segment])
        nlls.append(out.nll)
        memory = out.memory
    return torch.cat(nlls, dim=1)


def flags(toks: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(toks.size(0), toks.size(1) - 1, dtype=torch.bool)
    for r, positions in enumerate(rows):
        out[r, positions] = True
    return out


@families
@torch.no_grad()
def test_no_token_sees_an_earlier_document(family):
    """Whatever the tokens before a row's document start, every prediction from the start on is
    the same (inside the segment, through memory, compressed or long-term memory alike)."""
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    # Starts inside a segment, on a segment boundary, and two documents in one row.
    starts = [[5], [2 * spec.segment], [3, spec.segment * spec.n_segments - 3]]
    doc = flags(toks, starts)
    base = stream_docs(model, spec, toks, doc)
    g = torch.Generator().manual_seed(4)
    for r, positions in enumerate(starts):
        for s in positions:
            other = toks.clone()
            other[r, :s] = torch.randint(0, V, (s,), generator=g)
            changed = stream_docs(model, spec, other, doc)
            torch.testing.assert_close(changed[r, s:], base[r, s:], rtol=1e-5, atol=1e-5)
    # Without the flags the same change reaches the document (memory carries it).
    other = toks.clone()
    other[1, : 2 * spec.segment] = torch.randint(0, V, (2 * spec.segment,), generator=g)
    assert not torch.allclose(stream(model, spec, other)[0][1, 2 * spec.segment:],
                              stream(model, spec, toks)[0][1, 2 * spec.segment:])


@families
@torch.no_grad()
def test_a_document_streamed_after_another_equals_it_scored_alone(family):
    """The streamed run with resets gives a document the NLL of the family's reference run on that
    document alone from empty memory (starting on a segment boundary, so every family's memory
    updates fall where they fall alone; Transformer-XL and Al-Rfou also mid-segment)."""
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    aligned = 2 * spec.segment
    cases = [aligned] + ([aligned + 1] if family in ("transformer_xl", "vanilla", "lstm") else [])
    for s in cases:
        doc = flags(toks, [[s]] * toks.size(0))
        streamed = stream_docs(model, spec, toks, doc)
        alone = spec.reference(model, toks[:, s:])
        torch.testing.assert_close(streamed[:, s:], alone, rtol=1e-5, atol=1e-5)


@families
@torch.no_grad()
def test_document_length_rides_in_memory_and_round_trips(family):
    model, spec = make(family)
    model.eval()
    toks = tokens(spec)
    seg = spec.segment
    doc = flags(toks, [[0], [], [seg - 1]])
    out = model(toks[:, :seg], toks[:, 1: seg + 1], memory=model.init_memory(3), doc_start=doc[:, :seg])
    assert out.memory.doc_len.dtype == torch.long
    assert out.memory.doc_len.tolist() == [seg, UNBOUNDED, 1]
    again = type(out.memory).from_state_dict(out.memory.state_dict())
    assert torch.equal(again.doc_len, out.memory.doc_len)


# Families whose training forward traces into one graph (train.compile: the whole model fused);
# the LSTM's fused nn.LSTM is opaque to dynamo, and GPT-2's graph is transformers' to keep.
ONE_GRAPH = ["transformer_xl", "vanilla", "compressive", "infinite_former"]


@pytest.mark.parametrize("family", ONE_GRAPH)
def test_training_forward_traces_without_graph_breaks(family):
    """torch.compile sees the whole training forward with full memory (dropout on, CPU) as one
    graph: no host reads (token-id checks, dropout's CPU mask), no opaque autograd.Function."""
    model, spec = make(family)
    model.train()
    toks = tokens(spec)
    _, memory = stream(model, spec, toks[:, : 2 * spec.segment + 1])
    i = 2 * spec.segment
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda a, b, m: model(a, b, memory=m).objective)(
        toks[:, i: i + spec.segment], toks[:, i + 1: i + 1 + spec.segment], memory)
    assert explained.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in explained.break_reasons]
