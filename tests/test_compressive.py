"""The Compressive Transformer (models/compressive.py) against the paper's definitions.

Rae et al. 2020: the Figure-1 FIFO arithmetic, the compression functions' properties, gradient
isolation of the compression losses, the score matrix over [compressed; memory; segment], the
reduction to Transformer-XL at cmem_len 0, and the attention diagnostics against attention
probabilities computed by hand (tests/naive_compressive.py). The family contract
(test_family_contract.py) checks the streamed forward against the same naive model.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from naive_compressive import naive_compressive
from streamed import stream

from models import ModelConfig, build_model
from models.compressive import COMPRESSIONS, Compression, CompressiveConfig, CompressiveMemory
from models.diagnostics import attention_metrics

V = 29


def config(**compressive) -> ModelConfig:
    cc = dict(cmem_len=6, ratio=3) | compressive
    if cc.get("compression") in ("max_pool", "mean_pool", "most_used"):
        cc.setdefault("loss", "none")
    return ModelConfig(family="compressive", n_token=V, n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32,
                       dropout=0.0, tgt_len=3, mem_len=6, init_std=0.3, compressive=CompressiveConfig(**cc))


def model_for(seed: int = 0, **compressive):
    torch.manual_seed(seed)
    return build_model(config(**compressive))


def toks(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))



# ----------------------------------------------------------------------------- FIFO (paper Figure 1)


def test_figure_one_fifo_invariants():
    """3 layers, segment 3, memory 6, compressed memory 6, c = 3 (Rae et al. Figure 1)."""
    model = model_for()
    model.train()
    x = toks(2, 3 * 12 + 1)
    memory = model.init_memory(2)
    segment_inputs = []        # layer inputs of every segment: [B, L, 3, d]
    for k in range(1, 13):
        out = model(x[:, 3 * (k - 1): 3 * k], x[:, 3 * (k - 1) + 1: 3 * k + 1], memory=memory)
        memory = out.memory
        segment_inputs.append(memory.hidden[:, :, -3:])
        assert memory.mlen == min(3 * k, 6)
        assert memory.cmlen == min(max(0, 3 * k - 6) // 3, 6)
        assert all(t is None or not t.requires_grad for t in memory.tensors().values())
        if k >= 3:   # the rows pushed out are exactly segment k-2's layer inputs
            evicted = segment_inputs[k - 3]
            for i, f in enumerate(model.compress):
                torch.testing.assert_close(memory.compressed[:, i, -1:], f(evicted[:, i]).detach(),
                                           rtol=1e-6, atol=1e-6)
        if k >= 8:   # the compressed memory is FIFO: its oldest row is segment k-7's compression
            for i, f in enumerate(model.compress):
                torch.testing.assert_close(memory.compressed[:, i, :1], f(segment_inputs[k - 8][:, i]).detach(),
                                           rtol=1e-6, atol=1e-6)
        out.objective.backward()


def test_a_remainder_of_fewer_than_c_rows_waits_in_memory():
    """Segment 4, memory 6, c = 3: rows leave in whole groups of 3; none is lost or padded."""
    model = build_model(dataclasses.replace(config(), tgt_len=4)).eval()
    x = toks(1, 4 * 9 + 1)
    _, memory = stream(model, x, 4)
    with torch.no_grad():
        ref = naive_compressive(model, x, 4)
        got = torch.cat([o.nll for o in stream(model, x, 4)[0]], dim=1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    total = 4 * 9
    compressed_rows = (total - 6) // 3 * 3
    assert memory.mlen == total - compressed_rows and 6 <= memory.mlen < 9
    assert memory.cmlen == 6   # (36 - 6) // 3 = 10 rows made, the newest 6 kept


def test_compressed_memory_changes_the_prediction():
    """The naive reference is sensitive to the compressed memory (the contract test relies on it)."""
    x = toks(2, 3 * 8 + 1)
    with torch.no_grad():
        a = naive_compressive(model_for().eval(), x, 3)
        b = naive_compressive(model_for(cmem_len=0).eval(), x, 3)
    assert torch.equal(a[:, :9], b[:, :9])       # nothing compressed before the third segment ends
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- compression functions


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_compression_shape(kind):
    torch.manual_seed(0)
    f = Compression(kind, 8, 3)
    x = torch.randn(2, 7, 8)
    assert f(x, torch.rand(2, 7)).shape == (2, 7 // 3, 8)


def test_mean_pool_of_a_constant_is_the_constant_and_max_is_at_least_mean():
    c = torch.full((2, 9, 5), 0.7)
    torch.testing.assert_close(Compression("mean_pool", 5, 3)(c), torch.full((2, 3, 5), 0.7))
    x = torch.randn(3, 12, 5, generator=torch.Generator().manual_seed(2))
    assert (Compression("max_pool", 5, 3)(x) >= Compression("mean_pool", 5, 3)(x)).all()
    torch.testing.assert_close(Compression("mean_pool", 5, 3)(x), x.view(3, 4, 3, 5).mean(2))
    torch.testing.assert_close(Compression("max_pool", 5, 3)(x), x.view(3, 4, 3, 5).amax(2))


def test_most_used_keeps_the_most_attended_rows_in_time_order():
    x = torch.randn(2, 6, 4)
    usage = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.05], [0.5, 0.4, 0.3, 0.2, 0.1, 0.6]])
    out = Compression("most_used", 4, 3)(x, usage)
    torch.testing.assert_close(out[0], x[0, [1, 3]])
    torch.testing.assert_close(out[1], x[1, [0, 5]])


def test_conv_is_a_strided_convolution_over_each_group():
    torch.manual_seed(0)
    f = Compression("conv", 4, 3)
    x = torch.randn(1, 6, 4)
    w, b = f.conv.weight, f.conv.bias                       # [out, in, c]
    by_hand = torch.stack([torch.einsum("oik,ki->o", w, x[0, 3 * g: 3 * g + 3]) + b for g in range(2)])
    torch.testing.assert_close(f(x)[0], by_hand)


def test_most_used_in_the_model_compresses_the_rows_with_the_most_attention():
    """Usage = attention each row received (mean over heads and queries), summed over forwards;
    recomputed here from the naive model's probabilities."""
    model = model_for(compression="most_used").eval()
    x = toks(2, 3 * 3 + 1)
    with torch.no_grad():
        _, memory = stream(model, x, 3)
        _, seen = naive_compressive(model, x, 3, keep_probs=True)
    # Rows 0..2 (segment 1) leave the memory after segment 3; in each of the three forwards they
    # are the first three keys after the compressed memory.
    inputs = stream(model, x[:, :4], 3)[1].hidden              # segment 1's layer inputs
    for i in range(model.n_layer):
        usage = sum(probs[i].mean(dim=(1, 2))[:, cm: cm + 3] for probs, (cm, _, _) in seen)
        top = usage.argmax(dim=1)                                # 3 rows at c = 3 keep 1
        expected = torch.stack([inputs[b, i, top[b]] for b in range(2)])
        torch.testing.assert_close(memory.compressed[:, i, 0], expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- gradient isolation


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss", ["attention", "autoencoder"])
def test_compression_loss_trains_only_the_compression_function(loss):
    model = model_for(loss=loss)
    model.train()
    x = toks(2, 3 * 4 + 1)
    outs, _ = stream(model, x, 3)
    out = outs[-1]
    assert out.aux_loss is not None and out.aux_loss > 0
    out.aux_loss.backward()
    own = ("compress.", "decoders.")
    for name, g in _grads(model).items():
        if name.startswith(own):
            assert g is not None and g.abs().sum() > 0, name
        else:
            assert g is None or not g.any(), name
    model.zero_grad(set_to_none=True)
    out.loss.backward()                      # the task loss never reaches f_c (memory is stop-gradient)
    for name, g in _grads(model).items():
        if name.startswith(own):
            assert g is None or not g.any(), name
    assert model.word_emb.emb_layers[0].weight.grad.abs().sum() > 0


def test_pre_lnorm_reconstruction_keeps_the_layer_norm_out_of_the_gradient():
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(config(), pre_lnorm=True)).train()
    outs, _ = stream(model, toks(2, 13), 3)
    outs[-1].aux_loss.backward()
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            assert p.grad is None or not p.grad.any(), name


def test_training_never_changes_requires_grad_and_reconstruction_falls_on_a_frozen_model():
    """Only f_c is optimised, on the attention-reconstruction loss, over the same stream again and
    again: the loss falls and every parameter keeps requires_grad (lucidrains' detach_ trap)."""
    model = model_for()
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.compress.parameters(), lr=3e-2)
    x = toks(4, 3 * 8 + 1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("compress.")}
    per_pass = []
    for _ in range(30):
        outs, _ = stream(model, x, 3)
        aux = [o.aux_loss for o in outs if o.aux_loss is not None]
        opt.zero_grad()
        sum(aux).backward()
        opt.step()
        per_pass.append(float(sum(aux).detach()) / len(aux))
    assert per_pass[-1] < 0.5 * per_pass[0], per_pass
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_evaluation_computes_no_compression_loss():
    model = model_for().eval()
    outs, memory = stream(model, toks(2, 3 * 4 + 1), 3)
    assert all(o.aux_loss is None for o in outs) and memory.cmlen == 2
    model.train()
    with torch.no_grad():
        outs, _ = stream(model, toks(2, 3 * 4 + 1), 3)
    assert all(o.aux_loss is None for o in outs)


# ----------------------------------------------------------------------------- attention and TXL


@torch.no_grad()
def test_score_matrix_spans_compressed_memory_memory_and_a_causal_segment():
    model = model_for().eval()
    x = toks(2, 3 * 4 + 1)
    _, memory = stream(model, x[:, :10], 3)                  # 3 segments: cm 1, m 6
    assert (memory.cmlen, memory.mlen) == (1, 6)
    captured = []
    hooks = [layer.dec_attn.register_forward_hook(lambda mod, args, out: captured.append(mod.probs))
             for layer in model.layers]
    with model.record_attention():                            # the layers keep their probabilities
        model(x[:, 9:12], x[:, 10:13], memory=memory)
    for h in hooks:
        h.remove()
    assert len(captured) == model.n_layer
    for p in captured:
        assert p.shape == (2, 2, 3, 1 + 6 + 3)
        for t in range(3):
            assert (p[:, :, t, : 7 + t + 1] > 0).all()       # every memory row and the past of the segment
            assert (p[:, :, t, 7 + t + 1:] == 0).all()       # no future key


@torch.no_grad()
def test_cmem_len_zero_is_transformer_xl():
    comp = model_for(cmem_len=0)
    torch.manual_seed(0)
    txl = build_model(dataclasses.replace(config(cmem_len=0), family="transformer_xl"))
    shared = txl.state_dict()
    own = comp.state_dict()
    assert set(own) - set(shared) == {k for k in own if k.startswith("compress.")}
    for k, v in shared.items():
        assert torch.equal(own[k], v), k
    comp.eval(), txl.eval()
    x = toks(3, 3 * 6 + 1)
    a, ma = stream(comp, x, 3)
    b, mb = stream(txl, x, 3)
    torch.testing.assert_close(torch.cat([o.nll for o in a], 1), torch.cat([o.nll for o in b], 1), rtol=0, atol=0)
    assert torch.equal(ma.hidden, mb.hidden) and ma.cmlen == 0


@torch.no_grad()
def test_one_token_at_a_time_equals_segments_of_c_tokens():
    """Generation feeds one token per forward: with segments of c tokens (and mem_len a multiple
    of c) rows are compressed in the same groups at the same moments, so the NLL is the same."""
    model = model_for().eval()
    x = toks(2, 3 * 7 + 1)
    by_segment = torch.cat([o.nll for o in stream(model, x, 3)[0]], dim=1)
    with model.eval_lengths(tgt_len=1):
        by_token = torch.cat([o.nll for o in stream(model, x, 1)[0]], dim=1)
    torch.testing.assert_close(by_token, by_segment, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_attention_mass_matches_probabilities_by_hand():
    model = model_for().eval()
    x = toks(2, 3 * 6 + 1)
    with model.record_attention(n_buckets=2) as mass:
        stream(model, x, 3)
    got = mass.summary()
    _, seen = naive_compressive(model, x, 3, keep_probs=True)
    sums = {r: torch.zeros(2, dtype=torch.float64) for r in ("compressed", "memory", "segment")}
    queries = 0
    for probs, sizes in seen:
        for p in probs:
            queries += p.size(0) * p.size(1) * p.size(2)
            per_key = p.double().sum(dim=(0, 1, 2))
            start = 0
            for region, n in zip(sums, sizes):
                for j in range(n):
                    sums[region][j * 2 // n] += per_key[start + j]
                start += n
    assert got["queries"] == queries
    for region, s in sums.items():
        assert got["age_buckets"][region] == pytest.approx((s / queries).tolist(), abs=1e-6)
        assert got["regions"][region] == pytest.approx(float(s.sum() / queries), abs=1e-6)
    assert sum(got["regions"].values()) == pytest.approx(1.0)
    flat = attention_metrics(got)
    assert set(flat) >= {"attn_compressed", "attn_memory", "attn_segment", "attn_compressed_age0"}


@torch.no_grad()
def test_transformer_xl_reports_segment_and_memory():
    torch.manual_seed(0)
    txl = build_model(dataclasses.replace(config(cmem_len=0), family="transformer_xl")).eval()
    with txl.record_attention() as mass:
        stream(txl, toks(2, 3 * 4 + 1), 3)
    s = mass.summary()
    assert set(s["regions"]) == {"memory", "segment"}
    assert sum(s["regions"].values()) == pytest.approx(1.0) and s["regions"]["memory"] > 0.1
    assert all(not layer.dec_attn.keep_probs for layer in txl.layers)   # recording ends with the block


# ----------------------------------------------------------------------------- config and lengths


@pytest.mark.parametrize("change, needle", [
    (dict(ratio=0), "model.compressive.ratio=0"),
    (dict(cmem_len=-1), "model.compressive.cmem_len=-1"),
    (dict(compression="conv", loss="none"), "untrained"),
    (dict(compression="max_pool", loss="attention"), "no parameters to train"),
    (dict(loss_weight=-1.0), "loss_weight"),
])
def test_bad_settings_are_refused_by_name(change, needle):
    cfg = config()
    cfg.compressive = dataclasses.replace(cfg.compressive, **change)
    with pytest.raises(ValueError, match=needle):
        build_model(cfg)


def test_other_attention_and_ext_len_are_refused():
    with pytest.raises(ValueError, match="attn_type"):
        build_model(dataclasses.replace(config(), attn_type="shaw"))
    with pytest.raises(ValueError, match="ext_len"):
        build_model(dataclasses.replace(config(), ext_len=2))


def test_eval_lengths_keep_and_extend_the_compressed_memory():
    model = model_for()
    got = model.resolve_eval_lengths(2)
    assert got["cmem_len"] == 6 and got["mem_len"] == 6 + 3 - 2
    assert model.resolve_eval_lengths(3, cmem_len=12)["cmem_len"] == 12
    untrained = model_for(cmem_len=0)
    with pytest.raises(ValueError, match="trained without compressed memory"):
        untrained.resolve_eval_lengths(3, cmem_len=4)
    torch.manual_seed(0)
    txl = build_model(dataclasses.replace(config(cmem_len=0), family="transformer_xl"))
    with pytest.raises(ValueError, match="transformer_xl family has no cmem_len"):
        txl.resolve_eval_lengths(3, cmem_len=4)


def test_memory_of_the_wrong_shape_is_named():
    model = model_for().eval()
    bad = CompressiveMemory(hidden=torch.zeros(2, 2, 3, 16), compressed=torch.zeros(2, 3, 0, 16))
    with pytest.raises(ValueError, match=r"memory.hidden has shape \(2, 2, 3, 16\)"):
        model(toks(2, 3), memory=bad)


def test_inference_state_leaves_the_decoders_out():
    model = model_for(loss="autoencoder")
    state = model.inference_state_dict()
    assert not any(k.startswith("decoders.") for k in state) and any(k.startswith("compress.") for k in state)
    other = model_for(seed=3, loss="autoencoder")
    other.load_inference_state_dict(state)
    x = toks(2, 4)
    model.eval(), other.eval()
    with torch.no_grad():
        assert torch.equal(model(x[:, :3], x[:, 1:]).nll, other(x[:, :3], x[:, 1:]).nll)


def test_weights_detached_blocks_the_weights_gradient_only():
    """models.modules.layers.weights_detached: the module is still called (ZeRO-3 gathers it), its
    parameters get no gradient and keep requires_grad; the input still gets its gradient."""
    from models.modules.layers import layer_norm, linear, weights_detached

    torch.manual_seed(0)
    lin, ln = linear(4, 3, bias=True), layer_norm(4)
    x = torch.randn(2, 4, requires_grad=True)
    with weights_detached(lin, ln):
        lin(ln(x)).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None and ln.weight.grad is None
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.requires_grad for p in (*lin.parameters(), *ln.parameters()))
    lin(ln(x)).sum().backward()                              # outside the block: trained as usual
    assert lin.weight.grad is not None and ln.weight.grad is not None
    with pytest.raises(TypeError, match="cannot run with its weights detached"):
        with weights_detached(torch.nn.Linear(2, 2)):
            pass


def test_attention_mass_sums_over_ranks():
    """flat / load_flat: the all-reduce of two ranks' sums is the mass over both ranks' forwards."""
    from models.diagnostics import AttentionMass

    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(2, 2, 3, 7, generator=g), dim=-1) for _ in range(2)]
    both, parts = AttentionMass(("memory", "segment"), 1, 2), []
    for p in probs:
        both.add(0, p, (4, 3))
        one = AttentionMass(("memory", "segment"), 1, 2)
        one.add(0, p, (4, 3))
        parts.append(one.flat())
    reduced = AttentionMass(("memory", "segment"), 1, 2)
    reduced.load_flat([a + b for a, b in zip(*parts)])
    got, want = reduced.summary(), both.summary()
    assert got["queries"] == want["queries"] == 2 * 2 * 2 * 3
    assert got["regions"] == pytest.approx(want["regions"])
    for region in ("memory", "segment"):
        assert got["age_buckets"][region] == pytest.approx(want["age_buckets"][region])
        assert got["per_layer"][region] == pytest.approx(want["per_layer"][region])
