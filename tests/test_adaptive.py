"""Adaptive input and projected adaptive softmax against a naive per-token formula."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig
from models.modules.adaptive import AdaptiveEmbedding, LogitBuffers, ProjectedAdaptiveLogSoftmax
from models.transformer_xl import TransformerXL

V = 60
CASES = [  # cutoffs, div_val, d_embed (d_proj is 16)
    ([], 1, 16),
    ([], 1, 12),
    ([10, 30], 1, 16),
    ([10, 30], 1, 12),
    ([10, 30], 2, 16),
    ([5, 20, 40], 4, 64),
]


def _randomise(module):
    torch.manual_seed(3)
    for p in module.parameters():
        torch.nn.init.normal_(p, 0.0, 0.4)
    return module


def naive_logprob(crit, h_row, token):
    """log p(token) from the definition: shortlist softmax with one logit per tail cluster, then
    the tail's own softmax. Tail cluster i is head column shortlist + i - 1 (TF/HF order)."""
    ends = crit.cutoff_ends

    def logits(i, x):
        proj = crit.out_projs[i] if len(crit.out_projs) else None
        if proj is not None:
            x = x @ proj  # [d_proj] @ [d_proj, d_emb]
        if crit.div_val == 1:
            w, b = crit.out_layers[0].weight[ends[i]:ends[i + 1]], crit.out_layers[0].bias[ends[i]:ends[i + 1]]
        else:
            w, b = crit.out_layers[i].weight, crit.out_layers[i].bias
        return w @ x + b

    head = logits(0, h_row)
    if crit.n_clusters:
        proj = crit.out_projs[0] if len(crit.out_projs) else None
        x0 = h_row if proj is None else h_row @ proj
        head = torch.cat([head, crit.cluster_weight @ x0 + crit.cluster_bias])
    head_lp = head - torch.logsumexp(head, 0)
    cluster = sum(int(token >= c) for c in crit.cutoffs)
    if cluster == 0:
        return head_lp[token]
    tail = logits(cluster, h_row)
    return head_lp[ends[1] + cluster - 1] + (tail - torch.logsumexp(tail, 0))[token - ends[cluster]]


@pytest.mark.parametrize("cutoffs,div_val,d_embed", CASES)
def test_logprobs_normalised_and_match_definition(cutoffs, div_val, d_embed):
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, d_embed, 16, cutoffs, div_val))
    h = torch.randn(7, 16)
    with torch.no_grad():
        lp = crit.log_prob(h)
        assert lp.shape == (7, V)
        torch.testing.assert_close(lp.exp().sum(1), torch.ones(7), atol=1e-5, rtol=0)
        for n in range(7):
            for tok in (0, V - 1, 11, 35, 45):
                torch.testing.assert_close(lp[n, tok], naive_logprob(crit, h[n], tok), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cutoffs,div_val,d_embed", CASES)
def test_nll_in_input_order_with_gradients(cutoffs, div_val, d_embed):
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, d_embed, 16, cutoffs, div_val))
    torch.manual_seed(4)
    h = torch.randn(40, 16, requires_grad=True)
    target = torch.randint(0, V, (40,))
    target[:6] = torch.tensor([0, V - 1, 25, 3, 59, 12])  # shortlist and tails interleaved
    weights = torch.randn(40)

    nll = crit.nll(h, target)
    (nll * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in crit.named_parameters()}
    got_h = h.grad.clone()

    crit.zero_grad()
    h.grad = None
    ref = torch.stack([-naive_logprob(crit, h[n], int(target[n])) for n in range(40)])
    (ref * weights).sum().backward()
    torch.testing.assert_close(nll, ref.detach(), atol=1e-5, rtol=1e-5)
    for n, p in crit.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    torch.testing.assert_close(got_h, h.grad, atol=1e-5, rtol=1e-4)

    # The same rows in another order give the same per-row values, permuted (keep_order).
    perm = torch.randperm(40)
    with torch.no_grad():
        torch.testing.assert_close(crit.nll(h[perm], target[perm]), nll.detach()[perm], atol=1e-6, rtol=0)
        # forward() with return_logprobs gives the same NLL through the dense path.
        dense_nll, lp = crit(h, target, return_logprobs=True)
        torch.testing.assert_close(dense_nll, nll.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(-lp.gather(1, target[:, None]).squeeze(1), nll.detach(), atol=1e-5, rtol=1e-5)


def test_empty_tail_cluster_gets_zero_gradient():
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, 16, 16, [10, 30], 2))
    h = torch.randn(5, 16)
    target = torch.tensor([1, 2, 3, 12, 29])  # nothing in the last cluster [30, 60)
    crit.nll(h, target).sum().backward()
    # Every parameter gets a gradient (DDP/ZeRO expect no unused parameters), zero for the empty tail.
    assert all(p.grad is not None for p in crit.parameters())
    assert torch.count_nonzero(crit.out_layers[2].weight.grad) == 0
    assert torch.count_nonzero(crit.out_projs[2].grad) == 0
    assert torch.count_nonzero(crit.out_layers[1].weight.grad) > 0
    # div_val 1: the shared output matrix's rows of the empty cluster get exact zeros.
    crit1 = _randomise(ProjectedAdaptiveLogSoftmax(V, 16, 16, [10, 30], 1))
    crit1.nll(h, target).sum().backward()
    assert torch.count_nonzero(crit1.out_layers[0].weight.grad[30:]) == 0
    assert torch.count_nonzero(crit1.out_layers[0].bias.grad[30:]) == 0


def _naive_grads(crit, batches):
    """Parameter and input gradients of sum(nll) over ``batches`` from the definition."""
    crit.zero_grad()
    hs = [h.detach().clone().requires_grad_() for h, _ in batches]
    total = sum(-naive_logprob(crit, h[n], int(t[n])) for h, (_, t) in zip(hs, batches) for n in range(len(t)))
    total.backward()
    return {n: p.grad.clone() for n, p in crit.named_parameters()}, [h.grad for h in hs]


@pytest.mark.parametrize("div_val", [1, 2])
def test_reused_logit_buffers_are_never_shared(div_val):
    """The CPU logit buffers kept between steps: reused after a backward, and every interleaving
    (two forwards before one backward, a graph dropped unused, a no-grad forward) still gives
    the gradients of the definition."""
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, 16, 16, [10, 30], div_val))
    torch.manual_seed(5)
    batches = [(torch.randn(n, 16), torch.randint(0, V, (n,))) for n in (9, 13, 11)]

    def run(*idx):
        crit.zero_grad()
        hs = [batches[i][0].clone().requires_grad_() for i in idx]
        sum(crit.nll(h, batches[i][1]).sum() for h, i in zip(hs, idx)).backward()
        return {n: p.grad.clone() for n, p in crit.named_parameters()}, [h.grad for h in hs]

    def check(got, idx):
        want = _naive_grads(crit, [batches[i] for i in idx])
        for n in want[0]:
            torch.testing.assert_close(got[0][n], want[0][n], atol=1e-5, rtol=1e-4, msg=n)
        for a, b in zip(got[1], want[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    check(run(0), [0])
    check(run(1), [1])
    pool = crit._logit_buffers[0]._free
    kept = {slot: buf.data_ptr() for slot, buf in pool.items()}
    assert len(kept) == (3 if div_val == 1 else 1), "a backward gives its buffers back"
    check(run(1), [1])                       # the same rows again: the kept buffers are lent again
    assert {slot: buf.data_ptr() for slot, buf in pool.items()} == kept
    check(run(0, 1), [0, 1])                 # two forwards before one backward
    crit.nll(batches[2][0].requires_grad_(), batches[2][1]).sum()   # a graph dropped unused
    batches[2][0].requires_grad_(False)
    with torch.no_grad():
        eval_nll = crit.nll(*batches[1])     # no backward will come: given back at once
    assert crit._logit_buffers[0]._free
    check(run(1, 2), [1, 2])
    with torch.no_grad():
        torch.testing.assert_close(crit.nll(*batches[1]), eval_nll, atol=0, rtol=0)


def test_fused_backward_refuses_a_second_pass():
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, 16, 16, [10], 1))
    loss = crit.nll(torch.randn(4, 16, requires_grad=True), torch.tensor([1, 2, 20, 50])).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("cutoffs,div_val,d_embed", CASES)
def test_adaptive_embedding_matches_per_token_lookup(cutoffs, div_val, d_embed):
    emb = _randomise(AdaptiveEmbedding(V, d_embed, 16, cutoffs, div_val))
    ids = torch.tensor([[0, 9, 10, 29], [30, 59, 5, 41]])
    ends = [0] + cutoffs + [V]
    with torch.no_grad():
        out = emb(ids)
        for (b, t), tok in zip([(b, t) for b in range(2) for t in range(4)], ids.flatten().tolist()):
            i = 0 if div_val == 1 else sum(int(tok >= c) for c in cutoffs)
            row = emb.emb_layers[i].weight[tok - (0 if div_val == 1 else ends[i])]
            proj = emb.emb_projs[i] if len(emb.emb_projs) else None
            ref = (row if proj is None else proj @ row) * math.sqrt(16)
            torch.testing.assert_close(out[b, t], ref, atol=1e-5, rtol=1e-5)


def test_full_softmax_is_plain_log_softmax_with_tied_embedding():
    cfg = ModelConfig(n_token=V, n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32, cutoffs=[], dropout=0.0)
    model = TransformerXL(cfg)
    crit, emb = model.crit, model.word_emb
    assert crit.out_layers[0].weight is emb.emb_layers[0].weight
    h = torch.randn(5, 16)
    with torch.no_grad():
        ref = F.log_softmax(h @ emb.emb_layers[0].weight.t() + crit.out_layers[0].bias, dim=-1)
        torch.testing.assert_close(crit.log_prob(h), ref, atol=1e-5, rtol=1e-5)


def _model(**kw):
    base = dict(n_token=V, n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32)
    return TransformerXL(ModelConfig(**{**base, **kw}))


def test_tied_weights_share_storage():
    m = _model(cutoffs=[10, 30], div_val=2, tie_weight=True, tie_projs=[False, True, True])
    for out, emb in zip(m.crit.out_layers, m.word_emb.emb_layers):
        assert out.weight.data_ptr() == emb.weight.data_ptr()
        assert out.bias.data_ptr() != emb.weight.data_ptr()  # biases are never tied
    assert m.crit.out_projs[0].data_ptr() != m.word_emb.emb_projs[0].data_ptr()  # tie_projs[0] False
    for i in (1, 2):
        assert m.crit.out_projs[i].data_ptr() == m.word_emb.emb_projs[i].data_ptr()
    # Shared parameters are counted once and appear once in the state dict's storage.
    ptrs = {p.data_ptr() for p in m.parameters()}
    assert len(ptrs) == len(list(m.parameters()))

    untied = _model(cutoffs=[10, 30], div_val=2, tie_weight=False, tie_projs=[])
    assert all(o.weight.data_ptr() != e.weight.data_ptr()
               for o, e in zip(untied.crit.out_layers, untied.word_emb.emb_layers))
    assert sum(p.numel() for p in untied.parameters()) > sum(p.numel() for p in m.parameters())


def test_tie_projs_with_div_val_1_uses_the_one_embedding_projection():
    m = _model(cutoffs=[10, 30], div_val=1, d_embed=12, tie_projs=[True, True, False])
    emb_proj = m.word_emb.emb_projs[0].data_ptr()
    assert [p.data_ptr() == emb_proj for p in m.crit.out_projs] == [True, True, False]


def test_bad_cutoffs_and_tie_projs_are_named():
    with pytest.raises(ValueError, match="cutoffs"):
        AdaptiveEmbedding(V, 16, 16, [30, 10], 1)
    with pytest.raises(ValueError, match="cutoffs"):
        ProjectedAdaptiveLogSoftmax(V, 16, 16, [10, 60], 1)
    with pytest.raises(ValueError, match="tie_projs"):
        _model(cutoffs=[10, 30], tie_projs=[False, True])


def test_half_precision_nll_is_finite_and_close():
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, 16, 16, [10, 30], 2))
    h = torch.randn(20, 16)
    target = torch.randint(0, V, (20,))
    with torch.no_grad():
        ref = crit.nll(h, target)
        low = crit.to(torch.bfloat16).nll(h.bfloat16(), target)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    torch.testing.assert_close(low, ref, atol=0.15, rtol=0.05)


@pytest.mark.parametrize("cutoffs,div_val,d_embed", [c for c in CASES if c[1] > 1 or c[2] != 16])
def test_autocast_gradients_with_projected_clusters(cutoffs, div_val, d_embed):
    """Under autocast a projected cluster's rows come out in bf16 while the weights stay fp32:
    the backward's products must run in one dtype and write fp32 gradients (AMP training)."""
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, d_embed, 16, cutoffs, div_val))
    torch.manual_seed(4)
    h = torch.randn(40, 16, requires_grad=True)
    target = torch.randint(0, V, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        crit.nll(h, target).sum().backward()
    got = {n: p.grad.clone() for n, p in crit.named_parameters() if p.grad is not None}
    crit.zero_grad()
    torch.stack([-naive_logprob(crit, h[n], int(target[n])) for n in range(40)]).sum().backward()
    for n, g in got.items():
        want = dict(crit.named_parameters())[n].grad
        assert g.dtype == torch.float32 and (g - want).norm() <= 0.05 * want.norm() + 1e-6, n


@pytest.mark.parametrize("cutoffs", [[], [10, 30]])
def test_nll_of_a_target_whose_probability_underflows_is_exact(cutoffs):
    """The CPU path scores from the fp32 softmax, where p = e^-200 is 0; those rows must still
    get the exact -log p (logsumexp - logit, here against float64) and the right gradient."""
    crit = _randomise(ProjectedAdaptiveLogSoftmax(V, 16, 16, cutoffs, 1))
    torch.manual_seed(6)
    h = torch.randn(6, 16)
    target = torch.randint(0, V, (6,))
    with torch.no_grad():   # make row 0's target ~200 nats less likely than the rest
        logits = h[0] @ crit.out_layers[0].weight.t() + crit.out_layers[0].bias
        direction = crit.out_layers[0].weight[target[0]] - crit.out_layers[0].weight.mean(0)
        h[0] -= direction * (200 + logits[target[0]] - logits.min()) / direction.dot(direction)
    h.requires_grad_()
    nll = crit.nll(h, target)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and nll[0] > 100
    h64 = h.detach().double().requires_grad_()
    crit64 = crit.double()
    ref = torch.stack([-naive_logprob(crit64, h64[n], int(target[n])) for n in range(6)])
    ref.sum().backward()
    torch.testing.assert_close(nll.double(), ref.detach(), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-4, rtol=1e-4)


def _tied_and_untied(**kw):
    """A tied div_val-1 model and an untied copy holding the same values in two matrices."""
    torch.manual_seed(7)
    tied = _model(cutoffs=[10, 30], div_val=1, tie_weight=True, dropout=0.0, mem_len=4, **kw).train()
    untied = _model(cutoffs=[10, 30], div_val=1, tie_weight=False, dropout=0.0, mem_len=4, **kw).train()
    untied.load_state_dict(tied.state_dict(), strict=False)
    untied.crit.out_layers[0].weight.data.copy_(tied.word_emb.emb_layers[0].weight)
    return tied, untied


def _tied_grad(untied):
    """The tied matrix's gradient by definition: the sum of the two uses' gradients."""
    return untied.word_emb.emb_layers[0].weight.grad + untied.crit.out_layers[0].weight.grad


def test_tied_weight_gradient_is_the_sum_over_both_uses():
    """The lookup adds its rows into the NLL's gradient of the shared matrix (_TiedLookup):
    against an untied model with the same values, over two segments with carried memory,
    two forwards summed into one backward, and a forward whose NLL never runs."""
    tied, untied = _tied_and_untied()
    assert tied.word_emb.tied_route.enabled and not untied.word_emb.tied_route.enabled
    torch.manual_seed(8)
    x = torch.randint(0, V, (3, 2, 6))          # [segments, batch, len]
    for m in (tied, untied):
        mem = m.init_memory(2)
        for s in range(2):
            out = m(x[s], x[s].roll(1, 1), mem)
            mem = out.memory
            out.loss.backward()
    w = tied.word_emb.emb_layers[0].weight
    assert w.grad.layout == torch.strided
    torch.testing.assert_close(w.grad, _tied_grad(untied), atol=1e-6, rtol=1e-5)
    untied_params = dict(untied.named_parameters())
    for n, p in tied.named_parameters():
        if n != "word_emb.emb_layers.0.weight":
            torch.testing.assert_close(p.grad, untied_params[n].grad, atol=1e-6, rtol=1e-5, msg=n)

    for m in (tied, untied):                     # two forwards, one backward; the second embedding
        m.zero_grad()                            # also feeds a loss without the NLL
        a = m(x[0], x[1], m.init_memory(2))
        b = m(x[2], None, m.init_memory(2))
        emb_only = m.word_emb(x[1]).square().mean()
        (a.loss + emb_only).backward()
        assert b.loss is None
    torch.testing.assert_close(w.grad, _tied_grad(untied), atol=1e-6, rtol=1e-5)


def test_tied_route_is_left_only_in_cpu_training():
    tied, _ = _tied_and_untied()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        tied.word_emb(ids)
    assert tied.word_emb.tied_route._route is None
    tied.word_emb(ids)
    copied = copy.deepcopy(tied)                 # a route in flight is not copied (nor pickled)
    assert copied.word_emb.tied_route._route is None and copied.crit.tied_route is copied.word_emb.tied_route
    assert tied.word_emb.tied_route.take(tied.word_emb.emb_layers[0].weight) is not None
    assert tied.word_emb.tied_route.take(tied.word_emb.emb_layers[0].weight) is None   # once


def test_logit_buffers_grow_with_headroom():
    """A tail cluster's row count varies by a few rows a step: a buffer that must grow takes an
    eighth more, so the next slightly larger batch reuses it instead of mapping new pages."""
    bufs, like = LogitBuffers(), torch.empty(0)
    first = bufs.take(0, 800, like)
    assert first.numel() == 800                      # the first is exact
    bufs.give(0, first)
    grown = bufs.take(0, 810, like)
    assert grown.numel() == 900 and grown.data_ptr() != first.data_ptr()
    bufs.give(0, grown)
    assert bufs.take(0, 890, like).data_ptr() == grown.data_ptr()
