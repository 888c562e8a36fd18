"""Relative positions, rel-shift, masks and the three attention modules against naive formulas."""
from __future__ import annotations

import math

import pytest
import torch

from models.modules.attention import (
    AbsoluteAttention,
    RelLearnableAttention,
    RelPartialLearnableAttention,
    causal_mask,
    same_length_window,
    set_attention_kernel,
    set_memory_kv_cache,
)
from models.modules.positions import rel_shift, relative_distances, sinusoid

from naive_positions import naive_sinusoid


def test_sinusoid_matches_formula():
    pos = [0, 1, 5, 17, 400]
    torch.testing.assert_close(sinusoid(torch.tensor(pos, dtype=torch.float32), 16), naive_sinusoid(pos, 16),
                               atol=1e-5, rtol=0)


def test_relative_distances_descending_and_clamped():
    assert relative_distances(5).tolist() == [5, 4, 3, 2, 1, 0]
    assert relative_distances(5, clamp_len=3).tolist() == [3, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("qlen,mlen", [(1, 0), (4, 0), (4, 3), (3, 7), (6, 6)])
def test_rel_shift_gives_distance_m_plus_i_minus_j(qlen, mlen):
    klen = qlen + mlen
    # table[b, h, i, d]: an arbitrary value per (row, distance); x lists distances klen..0 per row.
    table = torch.randn(2, 3, qlen, klen + 1)
    x = table.flip(-1)  # column c <-> distance klen - c
    out = rel_shift(x)
    assert out.shape == (2, 3, qlen, klen)
    for i in range(qlen):
        for j in range(mlen + i + 1):  # every unmasked (causal) entry
            torch.testing.assert_close(out[:, :, i, j], table[:, :, i, mlen + i - j], rtol=0, atol=0)


def test_rel_shift_accepts_permuted_leading_dims():
    table = torch.randn(3, 2, 4, 9)  # [H, B, q, k+1] physically
    x = table.flip(-1).contiguous().transpose(0, 1)  # logical [B, H, q, k+1], last two dims contiguous
    out = rel_shift(x)
    ref = rel_shift(x.contiguous())
    mask = causal_mask(4, 4)
    torch.testing.assert_close(out.masked_fill(mask, 0), ref.masked_fill(mask, 0), rtol=0, atol=0)


def test_rel_shift_traced_equals_eager_with_gradients():
    """Under torch.compile rel_shift is plain view ops (no autograd.Function reading the storage
    offset, which dynamo breaks the graph on): the same values and gradients."""
    x = torch.randn(2, 3, 4, 9, requires_grad=True)
    g = torch.randn(2, 3, 4, 8)
    traced = torch.compile(rel_shift, backend="aot_eager", fullgraph=True)
    out = traced(x)
    (grad_traced,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(out, rel_shift(x), rtol=0, atol=0)
    torch.testing.assert_close(grad_traced, torch.autograd.grad(rel_shift(x), x, g)[0], rtol=0, atol=0)


def reference_mask(qlen, mlen, mem_len, same_length, keys):
    """The reference constructions (kimiyoung/HF: mask_len = klen - mem_len; NVIDIA: - 1),
    written as triu + tril of ones as they do; True = masked."""
    klen = qlen + mlen
    ones = torch.ones(qlen, klen)
    mask = torch.triu(ones, diagonal=1 + mlen)
    if same_length:
        mask_len = klen - mem_len - (1 if keys == "mem_len+1" else 0)
        shift = qlen - mask_len if mask_len > 0 else qlen
        mask = mask + torch.tril(ones, -shift)
    return mask.bool()


@pytest.mark.parametrize("keys", ["mem_len", "mem_len+1"])
@pytest.mark.parametrize("qlen,mlen,mem_len", [(4, 10, 10), (4, 0, 10), (4, 3, 10), (6, 6, 6), (3, 8, 5), (5, 2, 4)])
def test_mask_matches_reference_construction(qlen, mlen, mem_len, keys):
    assert torch.equal(causal_mask(qlen, mlen), reference_mask(qlen, mlen, mem_len, False, keys))
    window = same_length_window(mem_len, keys)
    assert torch.equal(causal_mask(qlen, mlen, window), reference_mask(qlen, mlen, mem_len, True, keys))


def test_same_length_key_counts():
    # q=4 queries after m=10 memory slots, mem_len 10: reference 10 keys each, NVIDIA/TF 11.
    ref = (~causal_mask(4, 10, same_length_window(10, "mem_len"))).sum(1)
    nv = (~causal_mask(4, 10, same_length_window(10, "mem_len+1"))).sum(1)
    assert ref.tolist() == [10, 10, 10, 10]
    assert nv.tolist() == [11, 11, 11, 11]
    # Without same_length, query i sees all memory plus itself and earlier tokens.
    assert (~causal_mask(4, 10)).sum(1).tolist() == [11, 12, 13, 14]
    with pytest.raises(ValueError, match="same_length_keys"):
        same_length_window(10, "mem")


def _init(module):
    torch.manual_seed(1)
    for p in module.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    return module.eval()


def _naive_attention(module, h, mem, positional, mask):
    """softmax over keys of content + positional score; positional(q_i, i, j) adds the rest."""
    H, D = module.n_head, module.d_head
    cat = h if mem is None else torch.cat([mem, h], 1)
    w = module.qkv_net.weight
    q = (h @ w[: H * D].t()).view(*h.shape[:2], H, D)
    k = (cat @ w[H * D: 2 * H * D].t()).view(*cat.shape[:2], H, D)
    v = (cat @ w[2 * H * D:].t()).view(*cat.shape[:2], H, D)
    B, qlen, klen = h.size(0), h.size(1), cat.size(1)
    score = torch.empty(B, H, qlen, klen)
    for i in range(qlen):
        for j in range(klen):
            score[:, :, i, j] = positional(q[:, i], k[:, j], i, j)
    score = score / math.sqrt(D)
    score = score.masked_fill(mask, float("-inf"))
    prob = score.softmax(-1)
    vec = torch.einsum("bhij,bjhd->bihd", prob, v).reshape(B, qlen, H * D)
    return module.layer_norm(h + vec @ module.o_net.weight.t())


@pytest.mark.parametrize("mlen", [0, 3])
def test_relative_attention_four_terms(mlen):
    d, H, D, qlen = 12, 2, 5, 4
    attn = _init(RelPartialLearnableAttention(d, H, D, dropout=0.0, dropatt=0.0, own_bias=True))
    h, mem = torch.randn(2, qlen, d), (torch.randn(2, mlen, d) if mlen else None)
    klen = qlen + mlen
    R = naive_sinusoid(range(klen, -1, -1), d)  # distances klen..0
    r_head = (R @ attn.r_net.weight.t()).view(klen + 1, H, D)
    u, v = attn.r_w_bias, attn.r_r_bias

    def positional(qi, kj, i, j):
        dist = mlen + i - j
        if dist < 0:
            return torch.zeros(qi.shape[:2])
        r = r_head[klen - dist]  # row of distance `dist`
        return ((qi + u) * kj).sum(-1) + ((qi + v) * r).sum(-1)  # (a)+(c) and (b)+(d)

    mask = causal_mask(qlen, mlen)
    with torch.no_grad():
        out = attn(h, mem, R, mask)
        ref = _naive_attention(attn, h, mem, positional, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_relative_attention_reuses_the_position_projection_only_while_r_and_w_r_are_unchanged():
    """Outside autograd, W_r R of the last call is reused: each output equals the naive four-term
    formula, a second call at the same lengths runs no r_net GEMM, and a weight written through
    ``.data`` (as DeepSpeed does, with no version bump) or another R is projected again."""
    d, H, D, qlen, mlen = 12, 2, 5, 4, 3
    attn = _init(RelPartialLearnableAttention(d, H, D, dropout=0.0, dropatt=0.0, own_bias=True))
    h, mem, mask = torch.randn(2, qlen, d), torch.randn(2, mlen, d), causal_mask(qlen, mlen)
    klen = qlen + mlen
    calls = []
    attn.r_net.register_forward_hook(lambda *_: calls.append(1))

    def naive(R):
        r_head = (R @ attn.r_net.weight.detach().t()).view(klen + 1, H, D)
        u, v = attn.r_w_bias.detach(), attn.r_r_bias.detach()

        def positional(qi, kj, i, j):
            dist = mlen + i - j
            if dist < 0:
                return torch.zeros(qi.shape[:2])
            return ((qi + u) * kj).sum(-1) + ((qi + v) * r_head[klen - dist]).sum(-1)

        with torch.no_grad():
            return _naive_attention(attn, h, mem, positional, mask)

    R = naive_sinusoid(range(klen, -1, -1), d)
    with torch.no_grad():
        first, second = attn(h, mem, R, mask), attn(h, mem, R.clone(), mask)
    assert len(calls) == 1 and torch.equal(first, second)
    torch.testing.assert_close(first, naive(R), atol=1e-5, rtol=1e-5)
    attn.r_net.weight.data.mul_(1.5)
    with torch.no_grad():
        moved = attn(h, mem, R, mask)
    assert len(calls) == 2 and not torch.allclose(moved, first)
    torch.testing.assert_close(moved, naive(R), atol=1e-5, rtol=1e-5)
    other = R.flip(0).contiguous()
    with torch.no_grad():
        got = attn(h, mem, other, mask)
    assert len(calls) == 3
    torch.testing.assert_close(got, naive(other), atol=1e-5, rtol=1e-5)
    with torch.enable_grad():                          # training: always projected, nothing kept
        attn(h, mem, R, mask).sum().backward()
    assert len(calls) == 4 and attn._r_cache is None and attn.r_net.weight.grad is not None


def _flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def test_evaluation_reuses_memory_keys_and_values_only_while_rows_and_weights_match():
    """In evaluation the memory rows' K/V are the previous call's: each output equals the naive
    formula, and a call whose memory ends with the tail of the previous call's rows skips exactly
    that tail's K/V product (2·B·m·d·2HD FLOPs, torch's counter); other rows, a weight written
    through ``.data``, the cache turned off or training project them again."""
    d, H, D, qlen = 12, 2, 5, 4
    attn = _init(AbsoluteAttention(d, H, D, 0.0, 0.0))
    set_attention_kernel(attn, "explicit")      # torch's FLOP counter does not see CPU SDPA's products
    B, hd = 2, H * D
    content = lambda qi, kj, i, j: (qi * kj).sum(-1)  # noqa: E731

    def check(h, mem):
        mask = causal_mask(qlen, mem.size(1))
        with torch.no_grad():
            out, flops = _flops(lambda: attn(h, mem, mask))
            torch.testing.assert_close(out, _naive_attention(attn, h, mem, content, mask), atol=1e-5, rtol=1e-5)
        return flops

    def projected(m):      # every product of one call: q|k|v of the segment, k|v of memory, scores, p·v, output
        return 2 * B * qlen * d * 3 * hd + 2 * B * m * d * 2 * hd + 2 * 2 * B * H * qlen * D * (qlen + m) + \
            2 * B * qlen * hd * d

    def reused(m):
        return projected(m) - 2 * B * m * d * 2 * hd

    h1, h2, h3 = (torch.randn(B, qlen, d) for _ in range(3))
    mem1 = torch.randn(B, 3, d)
    assert check(h1, mem1) == projected(3)                    # nothing cached yet
    rows = torch.cat([mem1, h1], 1)
    assert check(h2, rows[:, -5:]) == reused(5)               # memory = the last 5 rows attended over
    rows = torch.cat([rows[:, -5:], h2], 1)
    set_memory_kv_cache(attn, False)
    assert attn._kv_cache is None
    assert check(h3, rows[:, -6:]) == projected(6)
    set_memory_kv_cache(attn, True)
    assert check(h3, rows[:, -6:]) == projected(6)            # turned back on: the next call reuses
    rows = torch.cat([rows[:, -6:], h3], 1)
    assert check(h1, rows[:, -6:]) == reused(6)
    rows = torch.cat([rows[:, -6:], h1], 1)
    attn.qkv_net.weight.data[hd:].mul_(1.5)                   # DeepSpeed-style write: no version bump
    assert check(h2, rows[:, -6:]) == projected(6)
    assert check(h3, torch.randn(B, 6, d)) == projected(6)    # rows that are not the previous call's
    rows = torch.cat([torch.randn(B, 6, d), h3], 1)           # (that call's rows)
    # new rows in front of the last 4 (the Compressive Transformer's compressed memory): those 4 reused
    assert check(h1, torch.cat([torch.randn(B, 2, d), rows[:, -4:]], 1)) == projected(6) - 2 * B * 4 * d * 2 * hd
    with torch.enable_grad():
        attn.train()
        attn(h1, rows[:, -6:], causal_mask(qlen, 6)).sum().backward()
    assert attn._kv_cache is None


def test_relative_attention_shared_bias_is_passed_in():
    attn = _init(RelPartialLearnableAttention(8, 2, 4, 0.0, 0.0, own_bias=False))
    assert attn.r_w_bias is None and "r_w_bias" not in dict(attn.named_parameters())
    h = torch.randn(1, 3, 8)
    R = sinusoid(relative_distances(3), 8)
    u, v = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        a = attn(h, None, R, causal_mask(3, 0), u, v)
        b = attn(h, None, R, causal_mask(3, 0), u, v + 1)
    assert not torch.allclose(a, b)


def test_shaw_attention_learned_relative_embeddings():
    d, H, D, qlen, mlen, max_klen = 12, 2, 5, 4, 5, 6  # klen 9 > max_klen: far distances share row 0
    attn = _init(RelLearnableAttention(d, H, D, 0.0, 0.0, max_klen=max_klen))
    h, mem = torch.randn(2, qlen, d), torch.randn(2, mlen, d)
    klen = qlen + mlen

    def positional(qi, kj, i, j):
        dist = mlen + i - j
        if dist < 0:
            return torch.zeros(qi.shape[:2])
        row = max_klen - 1 - min(dist, max_klen - 1)
        return ((qi + attn.r_w_bias) * kj).sum(-1) + (qi * attn.r_emb[row]).sum(-1) + attn.r_bias[row]

    mask = causal_mask(qlen, mlen)
    with torch.no_grad():
        out = attn(h, mem, relative_distances(klen), mask)
        ref = _naive_attention(attn, h, mem, positional, mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_absolute_attention_is_content_only():
    attn = _init(AbsoluteAttention(12, 2, 5, 0.0, 0.0))
    h, mem = torch.randn(2, 4, 12), torch.randn(2, 3, 12)
    mask = causal_mask(4, 3)
    with torch.no_grad():
        out = attn(h, mem, mask)
        ref = _naive_attention(attn, h, mem, lambda qi, kj, i, j: (qi * kj).sum(-1), mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not any(n.startswith("r_") for n, _ in attn.named_parameters())


def test_pre_lnorm_normalises_memory_and_segment():
    attn = _init(RelPartialLearnableAttention(8, 2, 4, 0.0, 0.0, pre_lnorm=True, own_bias=True))
    h, mem = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    R = sinusoid(relative_distances(5), 8)
    with torch.no_grad():
        out = attn(h, mem, R, causal_mask(3, 2))
        # Pre-LN: residual adds the raw input; scaling the raw input changes LN(x) not at all.
        out_scaled = attn(h * 3, mem * 3, R, causal_mask(3, 2))
    torch.testing.assert_close(out_scaled - 3 * h, out - h, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_softmax_has_no_nan_in_half_precision(dtype):
    attn = _init(RelPartialLearnableAttention(16, 2, 8, 0.0, 0.0, own_bias=True)).to(dtype)
    h, mem = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 6, 16, dtype=dtype)
    R = sinusoid(relative_distances(11), 16).to(dtype)
    with torch.no_grad():
        out = attn(h, mem, R, causal_mask(5, 6, window=6))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_attention_dropout_is_applied_in_training_only():
    attn = _init(RelPartialLearnableAttention(8, 2, 4, dropout=0.0, dropatt=0.5, own_bias=True))
    h = torch.randn(2, 6, 8)
    R = sinusoid(relative_distances(6), 8)
    with torch.no_grad():
        e1, e2 = attn(h, None, R, causal_mask(6, 0)), attn(h, None, R, causal_mask(6, 0))
        attn.train()
        t1, t2 = attn(h, None, R, causal_mask(6, 0)), attn(h, None, R, causal_mask(6, 0))
    assert torch.equal(e1, e2) and not torch.allclose(t1, t2)


def test_rel_shift_gradient_matches_the_reference_pad_reshape():
    """Gradients through the shift equal those through the reference's pad-reshape-slice."""
    def reference_shift(x):  # [.., q, k+1] with a zero column in front -> drop it via the reshape trick
        *lead, q, k1 = x.shape
        padded = torch.cat([x.new_zeros(*lead, q, 1), x], dim=-1)  # [.., q, k+2]
        return padded.view(*lead, k1 + 1, q)[..., 1:, :].reshape(*lead, q, k1)[..., :, 1:]

    x = torch.randn(2, 3, 5, 12, requires_grad=True)  # q=5, k=11 (m=6)
    mask = causal_mask(5, 6)
    ours = rel_shift(x).masked_fill(mask, 0)
    ref = reference_shift(x).masked_fill(mask, 0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    g = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=0)
