"""Al-Rfou et al. vanilla transformer: aux-loss schedule and weights, exact sliding-window
evaluation, memory, positional tables, parameter counts and training-only heads.

References are computed independently: losses by hand from captured layer outputs and the heads'
weights (naive logsumexp formula), evaluation by running every window from scratch.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from models import ModelConfig, VanillaConfig, build_model
from models.vanilla import TRAINING_ONLY_PREFIX, VanillaMemory, VanillaTransformer, sliding_window_nll
from pipeline.config import load_config

L = 8  # window of the tiny model
V = 11


def tiny_cfg(**kw) -> ModelConfig:
    vkw = kw.pop("vanilla", {})
    base = dict(
        family="vanilla", n_token=V, n_layer=4, d_model=16, n_head=2, d_head=8, d_inner=32,
        dropout=0.0, dropatt=0.0, attn_type="learned", tgt_len=L, mem_len=L - 1, tie_weight=False,
    )
    base.update(kw)
    return ModelConfig(**base, vanilla=VanillaConfig(**vkw))


def tiny(**kw) -> VanillaTransformer:
    torch.manual_seed(0)
    return build_model(tiny_cfg(**kw))


def batch(b=3, k=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, k + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def naive_nll(z, lin, tgt):
    """-log softmax(z W^T + b)[tgt], written out."""
    logits = z.double() @ lin.weight.detach().double().T + lin.bias.detach().double()
    return torch.logsumexp(logits, -1) - logits.gather(-1, tgt[..., None]).squeeze(-1)


def layer_outputs(model, x, y):
    outs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for blk in model.layers]
    try:
        out = model(x, y)
    finally:
        for h in hooks:
            h.remove()
    return outs, out


@torch.no_grad()
def hand_terms(model, outs, y):
    """Per-layer (next CE, next-next CE) means from the captured outputs, layer index 1-based."""
    n = model.cfg.n_layer
    nxt = {l: naive_nll(outs[l - 1], model.train_heads["next"][l - 1], y).mean() for l in range(1, n)}
    nxt[n] = naive_nll(outs[n - 1], model.head, y).mean()
    nn2 = {l: naive_nll(outs[l - 1][:, :-1], model.train_heads["next_next"][l - 1], y[:, 1:]).mean()
           for l in range(1, n + 1)}
    return nxt, nn2


# ----- auxiliary losses -----------------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 12, 64])
def test_schedule_is_l_over_2n_as_float(n):
    m = VanillaTransformer.__new__(VanillaTransformer)  # schedule only: no weights needed
    torch.nn.Module.__init__(m)
    m.cfg, m.vcfg, m.progress = tiny_cfg(n_layer=n), VanillaConfig(), 0.0
    fractions = [0.0, 1e-9, 0.01, 1 / (4 * n), 1 / (2 * n), 1 / (2 * n) + 1e-12, 0.1, 0.25, 0.3, 0.49, 0.499999, 0.5,
                 0.7, 1.0]
    for p in fractions:
        m.set_progress(p)
        expect = [l for l in range(1, n) if p * 2 * n < l]  # progress < l / (2n)
        assert m.active_intermediate_layers() == expect, p
    m.set_progress(0.5)
    assert m.active_intermediate_layers() == []
    # Not integer division (the nadavbh12 bug): halfway between two thresholds the upper layers are on.
    m.set_progress(1.5 / (2 * n))
    assert m.active_intermediate_layers() == list(range(2, n))


@pytest.mark.parametrize("progress", [0.0, 0.12, 0.13, 0.3, 0.374, 0.376, 0.5, 0.9])
def test_aux_loss_matches_hand_computation(progress):
    model = tiny()
    model.train()
    model.set_progress(progress)
    x, y = batch()
    outs, out = layer_outputs(model, x, y)
    nxt, nn2 = hand_terms(model, outs, y)
    n = 4
    active = [l for l in range(1, n) if progress < l / (2 * n)]
    expect = sum(nxt[l] + 0.5 * nn2[l] for l in active) + 0.5 * nn2[n]
    assert out.loss.item() == pytest.approx(nxt[n].item(), abs=1e-5)  # final layer always on
    assert out.aux_loss.item() == pytest.approx(float(expect), abs=1e-5)
    assert out.nll.shape == (3, L)


def test_dropping_one_layer_leaves_the_others_unchanged():
    model = tiny()
    model.train()
    x, y = batch()
    outs, _ = layer_outputs(model, x, y)
    nxt, nn2 = hand_terms(model, outs, y)
    aux = {}
    for p in (1 / 8 - 1e-6, 1 / 8, 2 / 8 - 1e-6, 2 / 8):  # layer 1 stops at 1/8, layer 2 at 2/8 (n = 4)
        model.set_progress(p)
        aux[p] = model(x, y).aux_loss.item()
    # Each drop removes exactly that layer's own next + 0.5 next-next terms.
    assert aux[1 / 8 - 1e-6] - aux[1 / 8] == pytest.approx(float(nxt[1] + 0.5 * nn2[1]), abs=1e-5)
    assert aux[2 / 8 - 1e-6] - aux[2 / 8] == pytest.approx(float(nxt[2] + 0.5 * nn2[2]), abs=1e-5)
    assert aux[1 / 8] == pytest.approx(aux[2 / 8 - 1e-6], abs=1e-6)  # nothing changes between thresholds


def test_next_next_weight_and_switches():
    x, y = batch()
    # Only multiple targets: aux = w * next-next CE of the final layer.
    for w in (0.5, 0.25):
        model = tiny(vanilla=dict(intermediate=False, next_next_weight=w))
        model.train()
        outs, out = layer_outputs(model, x, y)
        _, nn2 = hand_terms(model, outs, y)
        assert out.aux_loss.item() == pytest.approx(w * nn2[4].item(), abs=1e-5)
    # Only intermediate: no next-next term anywhere.
    model = tiny(vanilla=dict(next_next=False))
    model.train()
    outs, out = layer_outputs(model, x, y)
    nxt, _ = hand_terms(model, outs, y)
    assert out.aux_loss.item() == pytest.approx(float(nxt[1] + nxt[2] + nxt[3]), abs=1e-5)
    model.set_progress(0.5)
    assert model(x, y).aux_loss.item() == 0.0
    # No aux losses configured: none returned.
    model = tiny(vanilla=dict(next_next=False, intermediate=False))
    model.train()
    assert model(x, y).aux_loss is None


def test_without_multiple_positions_only_the_last_position_trains():
    model = tiny(vanilla=dict(multi_position=False))
    model.train()
    x, y = batch()
    outs, out = layer_outputs(model, x, y)
    n = 4
    last = lambda l, lin: naive_nll(outs[l - 1][:, -1], lin, y[:, -1]).mean()  # noqa: E731
    assert out.loss.item() == pytest.approx(last(n, model.head).item(), abs=1e-5)
    nn_last = lambda l: naive_nll(outs[l - 1][:, -2], model.train_heads["next_next"][l - 1], y[:, -1]).mean()  # noqa: E731
    expect = sum(last(l, model.train_heads["next"][l - 1]) + 0.5 * nn_last(l) for l in range(1, n)) + 0.5 * nn_last(n)
    assert out.aux_loss.item() == pytest.approx(float(expect), abs=1e-5)
    # Eval reports every position whatever the training ablation.
    model.eval()
    out = model(x, y)
    assert out.loss.item() == pytest.approx(naive_nll(outs[n - 1], model.head, y).mean().item(), abs=1e-5)


# ----- training-only heads ----------------------------------------------------------------------

def _count_calls(model):
    calls = {}
    hooks = []
    for name, mod in model.train_heads.named_modules():
        if isinstance(mod, torch.nn.Linear):
            calls[name] = 0
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1)))
    return calls, hooks


def test_training_only_heads_do_no_work_in_eval_and_when_dropped():
    model = tiny()
    x, y = batch()
    calls, hooks = _count_calls(model)
    model.eval()
    out = model(x, y, return_logprobs=True)
    assert out.aux_loss is None and sum(calls.values()) == 0
    # Training past half: intermediate heads idle, no gradient; the final next-next head still trains.
    model.train()
    model.set_progress(0.5)
    out = model(x, y)
    out.objective.backward()
    assert [k for k, c in calls.items() if c] == ["next_next.3"]
    for name, p in model.train_heads.named_parameters():
        assert (p.grad is not None) == name.startswith("next_next.3."), name
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith(TRAINING_ONLY_PREFIX))
    # At the start every head runs once.
    model.set_progress(0.0)
    for k in calls:
        calls[k] = 0
    model(x, y)
    assert all(c == 1 for c in calls.values()), calls
    for h in hooks:
        h.remove()


def test_inference_state_dict_drops_training_heads_and_reloads():
    model = tiny()
    sd = model.inference_state_dict()
    full = model.state_dict()
    assert not any(k.startswith("train_heads") for k in sd)
    assert set(full) - set(sd) == {k for k in full if k.startswith("train_heads.")}
    n_head_params = sum(p.numel() for p in model.train_heads.parameters())
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in full.values()) - n_head_params
    torch.manual_seed(123)
    other = build_model(tiny_cfg())
    other.load_inference_state_dict(sd)
    model.eval(), other.eval()
    x, y = batch()
    torch.testing.assert_close(other(x, y).nll, model(x, y).nll, rtol=0, atol=0)
    with pytest.raises(KeyError, match="embed.weight"):
        other.load_inference_state_dict({k: v for k, v in sd.items() if k != "embed.weight"})


# ----- architecture ---------------------------------------------------------------------------

def test_layers_have_distinct_positional_tables():
    model = tiny()
    tables = [blk.pos for blk in model.layers]
    assert all(t.shape == (L, 16) for t in tables)
    assert len({t.data_ptr() for t in tables}) == len(tables)
    assert all(not torch.equal(a, b) for i, a in enumerate(tables) for b in tables[i + 1 :])
    model.train()
    x, y = batch(k=5)
    model(x, y).objective.backward()
    for t in tables:  # every table is used, only for the window's positions 0..4
        assert t.grad[:5].abs().sum() > 0 and t.grad[5:].abs().sum() == 0
    # Each table acts at its own layer: perturbing layer j's table leaves layers < j unchanged.
    model.eval()
    outs_a, _ = layer_outputs(model, x, y)
    with torch.no_grad():
        model.layers[2].pos.add_(0.5)
    outs_b, _ = layer_outputs(model, x, y)
    assert torch.equal(outs_a[0], outs_b[0]) and torch.equal(outs_a[1], outs_b[1])
    assert not torch.allclose(outs_a[2], outs_b[2])


def test_attention_is_standard_causal_multihead():
    model = tiny()
    attn = model.layers[0].attn
    x = torch.randn(2, 6, 16)
    q, k, v = attn.qkv(x).split(16, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(8 * h, 8 * h + 8)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8)
        s = s.masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
        heads.append(s.softmax(-1) @ v[..., sl])
    ref = attn.out(torch.cat(heads, -1))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,paper", [("alrfou_t12", 44e6), ("alrfou_t64", 235e6)])
def test_parameter_counts_on_meta(name, paper):
    cfg = load_config(f"configs/{name}.yaml", ["model.n_token=256"]).model
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    d, f, n, ctx, v = 512, 2048, cfg.n_layer, 512, 256
    per_layer = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 2 * (2 * d) + ctx * d + 2 * (d * v + v)
    assert total == n * per_layer + v * d
    assert abs(total - paper) / paper < 0.01
    assert all(p.device.type == "meta" for p in model.parameters())


def test_input_checks():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the model's window"):
        model(torch.zeros(1, L + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="memory.tokens has shape"):
        model(torch.zeros(2, 1, dtype=torch.long), memory=VanillaMemory(tokens=torch.zeros(3, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="stride=8"):
        sliding_window_nll(model, torch.zeros(20, dtype=torch.long), stride=8)


# ----- memory and evaluation ------------------------------------------------------------------

def test_memory_is_detached_tokens_and_full_windows_ignore_it():
    model = tiny()
    model.train()
    x, y = batch()
    out = model(x, y, memory=model.init_memory(3))
    assert out.memory.tokens.dtype == torch.long and not out.memory.tokens.requires_grad
    assert torch.equal(out.memory.tokens, x[:, -(L - 1) :])
    out2 = model(x, y, memory=VanillaMemory(tokens=torch.randint(0, V, (3, L - 1))))
    torch.testing.assert_close(out2.loss, out.loss, rtol=0, atol=0)  # k = L: independent windows
    # mem_len 0 keeps nothing.
    assert tiny(mem_len=0)(x, y).memory.tokens.shape == (3, 0)


def reference_windows(model, tokens, stride):
    """Run every chunk's window from scratch (no memory) and read its last positions."""
    n_pred = tokens.numel() - 1
    nll = []
    with torch.no_grad():
        for start in range(0, n_pred, stride):
            end = min(start + stride, n_pred)
            k = end - start
            ctx = max(0, start - (L - k))
            lp = model(tokens[None, ctx:end], return_logprobs=True).logprobs[0, -k:]
            nll.append(-lp.gather(-1, tokens[start + 1 : end + 1, None]).squeeze(-1))
    return torch.cat(nll)


@pytest.mark.parametrize("pre_lnorm", [False, True])
def test_stride_one_is_every_prefix_window_from_scratch(pre_lnorm):
    model = tiny(pre_lnorm=pre_lnorm).eval()
    tokens = torch.randint(0, V, (3 * L + 5,), generator=torch.Generator().manual_seed(7))
    got = sliding_window_nll(model, tokens, stride=1, batch_size=4)
    # Independent: prediction t uses window tokens[max(0, t + 1 - L) : t + 1], last position only.
    ref = []
    with torch.no_grad():
        for t in range(tokens.numel() - 1):
            win = tokens[max(0, t + 1 - L) : t + 1]
            ref.append(-model(win[None], return_logprobs=True).logprobs[0, -1, tokens[t + 1]])
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-5, atol=1e-5)
    # And it is streaming with tgt_len = 1 and the model's memory.
    mem, stream = model.init_memory(1), []
    with torch.no_grad():
        for t in range(tokens.numel() - 1):
            out = model(tokens[None, t : t + 1], tokens[None, t + 1 : t + 2], memory=mem)
            mem = out.memory
            stream.append(out.nll[0, 0])
            assert mem.tokens.shape[1] == min(t + 1, L - 1)
    torch.testing.assert_close(got, torch.stack(stream), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [2, 3, 5, 7])
def test_stride_k_matches_its_own_recomputation(stride):
    model = tiny().eval()
    tokens = torch.randint(0, V, (4 * L + 3,), generator=torch.Generator().manual_seed(stride))
    with pytest.warns(UserWarning, match="non-paper approximation"):
        got = sliding_window_nll(model, tokens, stride=stride, batch_size=3)
    assert got.shape == (tokens.numel() - 1,)
    torch.testing.assert_close(got, reference_windows(model, tokens, stride), rtol=1e-5, atol=1e-5)
    # Streaming the model with tgt_len = stride gives the same numbers.
    mem, stream = model.init_memory(1), []
    with torch.no_grad():
        for s in range(0, tokens.numel() - 1, stride):
            e = min(s + stride, tokens.numel() - 1)
            out = model(tokens[None, s:e], tokens[None, s + 1 : e + 1], memory=mem)
            mem = out.memory
            stream.append(out.nll[0])
    torch.testing.assert_close(got, torch.cat(stream), rtol=1e-5, atol=1e-5)


def test_short_sequences_and_training_mode_restored():
    model = tiny().train()
    tokens = torch.randint(0, V, (4,))
    got = sliding_window_nll(model, tokens)
    assert model.training
    model.eval()
    torch.testing.assert_close(got, reference_windows(model, tokens, 1), rtol=1e-5, atol=1e-5)


def test_memory_rows_slice_and_concatenate():
    model = tiny().eval()
    x, y = batch(b=4, k=3)
    full = model(x, y).memory
    parts = [full.select([0, 1]), full.select(slice(2, 4))]
    assert torch.equal(VanillaMemory.cat(parts).tokens, full.tokens)
    x2, y2 = batch(b=4, k=2, seed=5)
    a = model(x2, y2, memory=full).nll
    b = torch.cat([model(x2[r : r + 1], y2[r : r + 1], memory=full.select([r])).nll for r in range(4)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [f.name for f in dataclasses.fields(VanillaMemory)] == ["doc_len", "tokens"]
