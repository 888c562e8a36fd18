"""Transformer-XL: recurrence against full-length forwards, memory semantics, same_length,
clamp_len, ablations, initialisation and the model interface."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import ModelConfig, build_model
from models.modules.attention import causal_mask
from models.transformer_xl import TransformerXL, TXLMemory

from naive_positions import naive_sinusoid

V = 50


def tiny(**kw) -> TransformerXL:
    base = dict(n_token=V, n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=32, dropout=0.1, dropatt=0.0,
                tgt_len=6, mem_len=24)
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**base, **kw}))


def tokens(batch, length, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(cutoffs=[10, 30], div_val=2, tie_projs=[False, True, True]),
    dict(cutoffs=[10, 30], div_val=1, d_embed=12, tie_projs=[False, True, True]),
    dict(pre_lnorm=True, untie_r=True),
    dict(attn_type="shaw"),
], ids=["relative", "adaptive-div2", "adaptive-proj", "preln-untie", "shaw"])
def test_segments_with_memory_equal_one_full_forward(kw):
    model = tiny(**kw).eval()
    x, y = tokens(2, 24, 1), tokens(2, 24, 2)
    with torch.no_grad():
        full = model(x, y, return_logprobs=True)
        memory, nll, lps = model.init_memory(2), [], []
        for s in range(4):
            out = model(x[:, 6 * s: 6 * s + 6], y[:, 6 * s: 6 * s + 6], memory, return_logprobs=True)
            memory = out.memory
            nll.append(out.nll)
            lps.append(out.logprobs)
    torch.testing.assert_close(torch.cat(nll, 1), full.nll, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(lps, 1), full.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(memory.hidden, full.memory.hidden, atol=1e-5, rtol=0)
    # The sparse training-path NLL agrees with the dense log-probabilities.
    with torch.no_grad():
        torch.testing.assert_close(model(x, y).nll, full.nll, atol=1e-5, rtol=0)


def _capture_layer_inputs(model):
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, args, i=i: seen.append((i, args[0].detach().clone())))
             for i, layer in enumerate(model.layers)]
    return seen, hooks


def test_memory_holds_each_layers_input_detached():
    model = tiny(mem_len=7).train()  # dropout on: memory must hold exactly what the layers saw
    x = tokens(3, 15)
    memory = model.init_memory(3)
    assert memory.hidden.shape == (3, 3, 0, 16) and memory.mlen == 0
    seen_tokens = 0
    for s in range(3):
        captured, hooks = _capture_layer_inputs(model)
        out = model(x[:, 5 * s: 5 * s + 5], x[:, 5 * s: 5 * s + 5], memory)
        for h in hooks:
            h.remove()
        out.loss.backward()  # gradients flow in the segment, not into memory
        seen_tokens += 5
        new = out.memory
        assert isinstance(new, TXLMemory) and not new.hidden.requires_grad and new.hidden.grad_fn is None
        assert new.hidden.shape == (3, model.n_layer, min(7, seen_tokens), 16)  # exactly n_layer slots
        for layer, inp in captured:
            expect = torch.cat([memory.hidden[:, layer], inp], 1)[:, -7:]
            torch.testing.assert_close(new.hidden[:, layer], expect, rtol=0, atol=0)
        if memory.mlen:  # a fresh tensor, not a view that keeps the old memory alive
            assert new.hidden.untyped_storage().data_ptr() != memory.hidden.untyped_storage().data_ptr()
        memory = new
    assert all(p.grad is not None for p in model.parameters())


def test_ext_len_keeps_the_extension_out_of_memory():
    model = tiny(mem_len=10).eval()
    model.reset_length(tgt_len=4, ext_len=2, mem_len=10)
    x = tokens(2, 6)
    captured, hooks = _capture_layer_inputs(model)
    with torch.no_grad():
        out = model(x, x[:, 2:], model.init_memory(2))  # 2 context tokens + 4 predicted
    for h in hooks:
        h.remove()
    assert out.nll.shape == (2, 4)
    # end = mlen + qlen - ext_len = 4 (the reference's swapped call would keep all 6).
    assert out.memory.mlen == 4
    for layer, inp in captured:
        torch.testing.assert_close(out.memory.hidden[:, layer], inp[:, :4], rtol=0, atol=0)
    with torch.no_grad():
        nxt = model(x, x[:, 2:], out.memory)
    assert nxt.memory.mlen == 8
    # The predictions are those of the last 4 positions of the full input.
    with torch.no_grad():
        whole = model(x, x, model.init_memory(2))
    torch.testing.assert_close(out.nll, whole.nll[:, 2:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("keys,hidden_upto", [("mem_len", 0), ("mem_len+1", -1)])
def test_same_length_window_through_the_model(keys, hidden_upto):
    """q=4 after m=10 slots, mem_len 10: query i sees keys from i+1 (reference: 10 keys) or from
    i (NVIDIA/TF: 11 keys); memory positions before that must not affect it."""
    model = tiny(n_layer=2, mem_len=10, same_length=True, same_length_keys=keys).eval()
    with torch.no_grad():
        memory = model(tokens(2, 10, 3), memory=model.init_memory(2)).memory
        x = tokens(2, 4, 4)
        base = model(x, memory=memory, return_logprobs=True).logprobs
        for pos in range(6):
            poked = memory.hidden.clone()
            poked[:, :, pos] += 5.0
            out = model(x, memory=TXLMemory(hidden=poked), return_logprobs=True).logprobs
            for i in range(4):
                first_visible = i + 1 + hidden_upto  # ref: i+1, NV: i
                changed = not torch.allclose(out[:, i], base[:, i], atol=1e-6)
                assert changed == (pos >= first_visible), (keys, pos, i)
    assert (~causal_mask(4, 10, 10 if keys == "mem_len" else 11)).sum(1).tolist() == [10 - hidden_upto] * 4


def test_clamp_len_equals_a_forward_with_R_built_by_hand():
    model = tiny(n_layer=2, init_std=0.3).eval()  # large weights: positions matter visibly
    x = tokens(2, 8)
    with torch.no_grad():
        unclamped = model(x, return_logprobs=True).logprobs
        model.clamp_len = 3
        clamped = model(x, return_logprobs=True).logprobs
        # By hand: distances 8..0, every distance beyond 3 encoded as 3.
        R = naive_sinusoid([min(d, 3) for d in range(8, -1, -1)], 16)
        h = model.word_emb(x)
        for layer in model.layers:
            h = layer(h, None, R, causal_mask(8, 0), model.r_w_bias, model.r_r_bias)
        by_hand = model.crit.log_prob(h.reshape(-1, 16)).view(2, 8, V)
    torch.testing.assert_close(clamped, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(clamped, unclamped, atol=1e-4)
    torch.testing.assert_close(clamped[:, :4], unclamped[:, :4], atol=1e-5, rtol=0)  # distances <= 3 only


def test_eval_with_longer_memory_than_training():
    model = tiny(mem_len=4).eval()
    x = tokens(2, 24)
    memory = model.init_memory(2)
    with torch.no_grad():
        for s in range(4):
            memory = model(x[:, 6 * s: 6 * s + 6], memory=memory).memory
        assert memory.mlen == 4
        model.reset_length(tgt_len=3, ext_len=0, mem_len=12)
        model.same_length, model.clamp_len = True, 5
        for s in range(4):
            memory = model(x[:, 3 * s: 3 * s + 3], memory=memory).memory
        assert memory.mlen == 12
    with pytest.raises(ValueError, match="reset_length"):
        model.reset_length(3, -1, 4)


def test_ablation_variants_have_their_parameters_and_run():
    names = {at: {n.split(".")[-1] for n, _ in tiny(attn_type=at).named_parameters()}
             for at in ("relative", "shaw", "absolute")}
    assert {"r_net", "r_emb", "r_bias"}.isdisjoint(names["absolute"]) and "r_w_bias" not in names["absolute"]
    assert {"r_emb", "r_bias", "r_w_bias"} <= names["shaw"] and "r_r_bias" not in names["shaw"]
    rel = dict(tiny().named_parameters())
    assert "r_w_bias" in rel and "r_r_bias" in rel and "layers.0.dec_attn.r_net.weight" in rel
    assert "layers.0.dec_attn.r_w_bias" in dict(tiny(untie_r=True).named_parameters())
    shaw = dict(tiny(attn_type="shaw").named_parameters())
    assert shaw["layers.0.dec_attn.r_emb"].shape == (6 + 24, 2, 8)  # max_klen = tgt + ext + mem
    for at in ("relative", "shaw", "absolute"):
        model = tiny(attn_type=at, mem_len=6).train()
        memory = model.init_memory(2)
        for s in range(2):
            out = model(tokens(2, 6, s), tokens(2, 6, s + 9), memory)
            out.loss.backward()
            memory = out.memory
        assert memory.mlen == 6 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="vanilla"):
        tiny(attn_type="learned")


@pytest.mark.parametrize("attn_type", ["relative", "absolute"])
def test_recurrence_off_makes_segments_independent(attn_type):
    x = tokens(2, 12)
    with torch.no_grad():
        off = tiny(attn_type=attn_type, mem_len=0).eval()
        first = off(x[:, :6], memory=off.init_memory(2))
        assert first.memory.mlen == 0
        second = off(x[:, 6:], memory=first.memory, return_logprobs=True).logprobs
        alone = off(x[:, 6:], return_logprobs=True).logprobs
        torch.testing.assert_close(second, alone, rtol=0, atol=0)
        on = tiny(attn_type=attn_type, mem_len=6).eval()
        mem = on(x[:, :6], memory=on.init_memory(2)).memory
        assert not torch.allclose(on(x[:, 6:], memory=mem, return_logprobs=True).logprobs,
                                  on(x[:, 6:], return_logprobs=True).logprobs)


def test_initialisation_follows_the_reference():
    model = tiny(n_token=3000, n_layer=2, d_model=64, n_head=4, d_head=16, d_inner=256, cutoffs=[1000, 2000],
                 div_val=2, tie_projs=[False, True, True], init_std=0.05, proj_init_std=0.01)
    std = lambda t: t.detach().float().std().item()  # noqa: E731
    attn = model.layers[0].dec_attn
    for w in (attn.qkv_net.weight, attn.r_net.weight, model.layers[0].pos_ff.ff1.weight,
              model.word_emb.emb_layers[0].weight, model.crit.cluster_weight, model.r_w_bias, model.r_r_bias):
        assert abs(std(w) - 0.05) < 0.01, w.shape
    for p in list(model.word_emb.emb_projs) + [model.crit.out_projs[0]]:
        assert abs(std(p) - 0.01) < 0.002
    ln = attn.layer_norm.weight
    assert abs(ln.mean().item() - 1.0) < 0.03 and 0.02 < std(ln) < 0.08  # N(1, init_std), not constant 1
    biases = (attn.layer_norm.bias, model.layers[0].pos_ff.ff1.bias, model.crit.out_layers[0].bias,
              model.crit.cluster_bias)
    for b in biases:
        assert torch.count_nonzero(b) == 0
    uni = tiny(init="uniform", init_range=0.1)
    w = uni.layers[0].dec_attn.qkv_net.weight
    assert w.abs().max() <= 0.1 and w.abs().max() > 0.09


def test_memory_rows_are_independent_streams():
    model = tiny(mem_len=6).eval()
    x = tokens(4, 12)
    with torch.no_grad():
        m_all = model(x[:, :6], memory=model.init_memory(4)).memory
        out_all = model(x[:, 6:], x[:, 6:], m_all)
        rows = [3, 1]
        m_sub = model(x[rows, :6], memory=model.init_memory(2)).memory
        torch.testing.assert_close(m_all.select(rows).hidden, m_sub.hidden, atol=1e-6, rtol=0)
        out_sub = model(x[rows, 6:], x[rows, 6:], m_all.select(rows))
    torch.testing.assert_close(out_sub.nll, out_all.nll[rows], atol=1e-6, rtol=0)
    state = out_all.memory.state_dict()
    assert set(state) == {"hidden"}
    assert torch.equal(TXLMemory.from_state_dict(state).hidden, out_all.memory.hidden)


def test_bad_inputs_name_the_problem():
    model = tiny()
    with pytest.raises(ValueError, match="token id 50"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="targets holds token id -1"):
        model(torch.tensor([[1, 2]]), torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"targets shape \(1, 3\)"):
        model(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, tgt_len\]"):
        model(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="LongTensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"memory.hidden has shape \(1, 2, 4, 16\)"):
        model(torch.tensor([[1, 2]]), memory=TXLMemory(hidden=torch.zeros(1, 2, 4, 16)))
    with pytest.raises(TypeError, match="TXLMemory"):
        from models.memory import Memory
        model(torch.tensor([[1, 2]]), memory=Memory())
    with pytest.raises(ValueError, match="same_length needs mem_len > 0"):
        tiny(mem_len=0, same_length=True)(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="n_token must be set"):
        build_model(ModelConfig())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype):
    model = tiny(cutoffs=[10, 30], div_val=2, tie_projs=[False, True, True], same_length=True, mem_len=6).to(dtype)
    model.train()
    memory = model.init_memory(2)
    assert memory.hidden.dtype == dtype
    for s in range(2):
        out = model(tokens(2, 6, s), tokens(2, 6, s + 1), memory)
        memory = out.memory
    out.loss.backward()
    assert torch.isfinite(out.loss) and memory.hidden.dtype == dtype
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class _SyncCounter(TorchDispatchMode):
    """Counts ops that force a device-to-host read of data (``.item()``, ``bool(t)``, nonzero)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "is_nonzero", "masked_select", "unique"):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_forward_has_no_data_dependent_host_reads():
    model = tiny(cutoffs=[10, 30], div_val=2, tie_projs=[False, True, True], same_length=True, mem_len=6).train()
    memory = model(tokens(2, 6), memory=model.init_memory(2)).memory
    with _SyncCounter() as counter:
        out = model(tokens(2, 6, 1), memory=memory)
        out2 = model(tokens(2, 6, 2), memory=out.memory)
    # Only the CPU-only token-range check reads values (min and max of input_ids, per call).
    assert counter.ops == ["_local_scalar_dense"] * 4, counter.ops
    assert out2.loss is None and out2.nll is None


def test_set_progress_is_a_no_op():
    model = tiny().eval()
    x = tokens(1, 6)
    with torch.no_grad():
        before = model(x, x).nll
        model.set_progress(0.7)
        after = model(x, x).nll
    assert torch.equal(before, after)


def test_training_reduces_loss():
    model = tiny(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, mem_len=8, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.arange(40).remainder(7).view(1, 40).repeat(2, 1)  # a periodic sequence
    losses = []
    for step in range(30):
        memory = model.init_memory(2)
        total = 0.0
        for s in range(4):
            out = model(x[:, 8 * s: 8 * s + 8], x[:, 8 * s + 1: 8 * s + 9], memory)
            memory = out.memory
            out.loss.backward()
            total += out.loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total / 4)
    assert losses[-1] < 0.5 * losses[0], losses
