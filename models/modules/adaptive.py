"""Adaptive input embeddings and the projected adaptive log-softmax (Baevski & Auli 2019;
Grave et al. 2017), with the reference Transformer-XL's layout and semantics.

Vocabulary ids are split by ``cutoffs`` into a head (shortlist) and tail clusters. Cluster i
has its own table of width ``d_embed // div_val**i`` and a projection ``[d_proj, d_emb_i]``
to the model width. The softmax head scores the shortlist plus one logit per tail cluster;
a tail token's log-probability is ``head[cluster] + log_softmax(tail)[token]``. Tail cluster
i (1-based) uses head column ``shortlist + i - 1``, i.e. ``cluster_weight`` row ``i - 1``: the
TF code's and HF port's order (so the published TF/HF weights load as they are). The
authors' PyTorch code (and NVIDIA's) read column ``-i`` instead, the same model up to the
order of ``cluster_weight``/``cluster_bias`` rows: flip those rows when loading their state
dicts. ``cutoffs=[]`` is a plain full softmax. Parameter names and shapes follow the
reference (``emb_layers``, ``emb_projs``, ``out_layers``, ``out_projs``, ``cluster_weight``,
``cluster_bias``) so weights can be tied and reference state dicts mapped one to one.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def check_cutoffs(n_token: int, cutoffs: List[int], div_val: int, d_embed: int) -> None:
    if any(b <= a for a, b in zip([0] + cutoffs, cutoffs + [n_token])):
        raise ValueError(f"model.cutoffs={cutoffs} must increase strictly within (0, n_token={n_token})")
    if div_val < 1:
        raise ValueError(f"model.div_val={div_val} must be >= 1")
    if div_val > 1 and d_embed // div_val ** len(cutoffs) < 1:
        raise ValueError(f"model.div_val={div_val} leaves the last cluster with width 0 (d_embed={d_embed})")


class LogitBuffers:
    """The fused NLL's fp32 logit buffers, kept from one step to the next (CPU only).

    A fresh ``[rows, vocab]`` logit tensor per step is tens of MiB that the allocator maps
    anew every time (glibc serves blocks over 32 MiB straight from mmap), and the first
    write to each page faults: on our CPU VMs about a third more time on the GEMM that
    fills it, and the port pays the same. Each buffer is lent to one forward and comes back
    when its backward has run, or at once when none will; a second forward before a
    backward, or a graph dropped unused, just allocates afresh, so a buffer is never
    shared. ``backward_expected`` is set by the caller (grad mode is off inside forward).
    """

    def __init__(self):
        self._free: dict[int, Tensor] = {}
        self.backward_expected = False

    def take(self, slot: int, numel: int, like: Tensor) -> Tensor:
        buf = self._free.pop(slot, None)
        if buf is None or buf.numel() < numel or buf.device != like.device:
            if buf is not None and buf.device == like.device:
                # A tail cluster's row count varies from step to step: grow by an eighth at
                # least, or each new largest batch pays the page faults again.
                numel = max(numel, buf.numel() + buf.numel() // 8)
            buf = torch.empty(numel, dtype=torch.float32, device=like.device)
        return buf

    def give(self, slot: int, buf: Tensor) -> None:
        kept = self._free.get(slot)
        if kept is None or kept.numel() < buf.numel():
            self._free[slot] = buf


def _give_back(ctx) -> None:
    for slot, buf in ctx.lent:
        ctx.buffers.give(slot, buf)
    ctx.lent = []


# Below this probability of the target (2^-100) its fp32 softmax value may have lost precision
# (exp underflows to subnormals near 1e-38): such rows get their NLL from the logits again.
_TINY_PROB = 2.0 ** -100


def _softmax_in_place(logits: Tensor) -> Tensor:
    """Row softmax written over ``logits``: torch's CPU kernel takes each row through the cache
    once (max, sum of exponentials, normalised write), where amax, subtract, exp and sum are four
    passes over the whole ``[rows, vocab]`` block. Bitwise equal to ``torch.softmax``."""
    return torch.ops.aten._softmax.out(logits, 1, False, out=logits)


def _nll_from_prob(prob: Tensor, target: Tensor, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``-log p[target]`` per row; rows whose ``p[target]`` is below ``_TINY_PROB`` are scored
    exactly (``logsumexp - logit``) from their logits, recomputed: the same value either way,
    without fp32 underflow turning a very unlikely target into an infinite loss."""
    p = prob.gather(1, target.unsqueeze(1)).squeeze(1)
    nll = -p.log()
    tiny = p < _TINY_PROB
    if bool(tiny.any()):      # CPU only: no device synchronisation to pay
        rows = tiny.nonzero().squeeze(1)
        logits = torch.addmm(b, x[rows], w.t()).float()
        nll[rows] = torch.logsumexp(logits, dim=1) - logits.gather(1, target[rows].unsqueeze(1)).squeeze(1)
    return nll


class _SegmentedNLL(torch.autograd.Function):
    """NLL of rows scored against consecutive row ranges of one output matrix, fused.

    Segment i scores its input rows ``xs[i]`` against ``weight[bounds[i]:bounds[i+1]]`` (the
    first segment also against ``extra_weight``, the cluster logits) and returns each row's
    ``logsumexp - logit[target]``. Compared with slicing the weight and calling
    cross_entropy under autograd, the backward writes the gradient of the whole (tied)
    weight once, slice by slice, instead of one zero-filled full-size tensor per slice
    (to ``route`` when given: the tied embedding's lookup adds its rows there, _TiedLookup),
    and turns the saved exponentials into the logit gradient in place, so no extra
    ``[rows, vocab]`` tensors are allocated. The softmax runs in fp32 (on CPU in one pass per
    row, see ``_softmax_in_place``).
    """

    @staticmethod
    def forward(ctx, weight, route, bias, extra_weight, extra_bias, bounds, targets, buffers, *xs):
        saved, outs, head_weight = [], [], None
        ctx.lent = []
        ctx.dtype = torch.float32
        for i, (x, target) in enumerate(zip(xs, targets)):
            lo, hi = bounds[i], bounds[i + 1]
            w, b = weight[lo:hi], bias[lo:hi]
            if i == 0 and extra_weight is not None:
                w, b = torch.cat([w, extra_weight]), torch.cat([b, extra_bias])
                head_weight = w  # kept for the backward instead of concatenating again
            if buffers is not None and x.dtype == torch.float32:
                buf = buffers.take(i, x.size(0) * w.size(0), x)
                ctx.lent.append((i, buf))
                logits = torch.addmm(b, x, w.t(), out=buf[: x.size(0) * w.size(0)].view(x.size(0), w.size(0)))
            else:
                logits = torch.addmm(b, x, w.t())
                ctx.dtype = logits.dtype   # autocast's: the backward's products run in it too
                logits = logits.float()
            if logits.device.type == "cpu" and not torch.compiler.is_compiling():   # (Inductor fuses the passes)
                prob = _softmax_in_place(logits)
                outs.append(_nll_from_prob(prob, target, x, w, b))
                saved += [prob, None]       # normalised: the backward scales by g alone
            else:
                picked = logits.gather(1, target.unsqueeze(1)).squeeze(1)
                top = logits.amax(dim=1, keepdim=True)
                exp = logits.sub_(top).exp_()  # in place: the logits are not needed any more
                total = exp.sum(dim=1)
                outs.append(total.log() + top.squeeze(1) - picked)
                # Unnormalised exponentials and 1/sum: the backward scales by g/sum in one pass.
                saved += [exp, total.reciprocal()]
        ctx.bounds, ctx.n = bounds, len(xs)
        ctx.has_extra = extra_weight is not None
        ctx.save_for_backward(weight, head_weight, *targets, *xs, *saved)
        ctx.used, ctx.buffers = False, buffers
        if buffers is not None and not buffers.backward_expected:
            _give_back(ctx)   # no backward will read the exponentials
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        if ctx.used:
            raise RuntimeError("_SegmentedNLL: backward ran twice (its buffers are reused in place)")
        ctx.used = True
        n, bounds = ctx.n, ctx.bounds
        weight, head_weight, *rest = ctx.saved_tensors
        targets, xs, saved = rest[:n], rest[n:2 * n], rest[2 * n:]
        need_w, need_route, need_b, need_ew, need_eb = ctx.needs_input_grad[:5]
        need_w = need_w or need_route
        gw = torch.empty_like(weight) if need_w else None
        gb = weight.new_empty(weight.size(0)) if need_b else None
        gew = geb = None
        gxs = []
        for i in range(n):
            lo, hi = bounds[i], bounds[i + 1]
            g, x, t = grads[i], xs[i], targets[i]
            exp, inv_total = saved[2 * i], saved[2 * i + 1]
            if g is None:
                g = torch.zeros(x.size(0), dtype=exp.dtype, device=exp.device)
            # d nll / d logits = (softmax - onehot) * g. softmax - onehot is built in the saved
            # buffer; the per-row g is folded into the [rows, d] factors and products (x, p·w,
            # pᵀ·g) rather than written over the whole [rows, vocab] block: one pass fewer.
            p = exp if inv_total is None else exp.mul_(inv_total.unsqueeze(1))
            p.scatter_add_(1, t.unsqueeze(1), p.new_full((t.numel(), 1), -1.0))
            # The products run in the forward's dtype (under autocast, half: on a GPU, tensor
            # cores rather than fp32 SIMT for the largest products of the step), the rows and
            # weights cast to it; gradients of fp32 weights are written back in fp32.
            c = ctx.dtype
            p, g, x = p.to(c), g.to(c), x.to(c)
            pw = p[:, : hi - lo]
            xg = x * g.unsqueeze(1) if gw is not None or need_ew else None
            if i == 0 and ctx.has_extra:
                w = head_weight
                if need_ew:
                    gew = p[:, hi - lo:].t().mm(xg).to(head_weight.dtype)
                if need_eb:
                    geb = p[:, hi - lo:].t().mv(g).to(head_weight.dtype)
            else:
                w = weight[lo:hi]
            gxs.append(p.mm(w.to(c)).mul_(g.unsqueeze(1)).to(xs[i].dtype) if ctx.needs_input_grad[8 + i] else None)
            same = c == weight.dtype
            if gw is not None:
                if same:
                    torch.mm(pw.t(), xg, out=gw[lo:hi])
                else:
                    gw[lo:hi] = pw.t().mm(xg)
            if gb is not None:
                if same:
                    torch.mv(pw.t(), g, out=gb[lo:hi])
                else:
                    gb[lo:hi] = pw.t().mv(g)
        _give_back(ctx)
        # With a route (see _TiedLookup) the weight's gradient goes there instead.
        gw, groute = (None, gw) if need_route else (gw, None)
        return (gw, groute, gb, gew, geb, None, None, None, *gxs)


class TiedRoute:
    """Hands the output layer's gradient route from the embedding's lookup to the NLL of the
    same forward (see _TiedLookup); shared by a tied pair (tie_adaptive), not state. Only speed
    depends on the route reaching the NLL: every use of the weight gets its gradient either way."""

    def __init__(self):
        self.enabled = False
        self._route: Optional[tuple[Tensor, Tensor]] = None

    def lookup(self, weight: Tensor, ids: Tensor) -> Tensor:
        """``F.embedding(ids, weight)``, leaving a route for the NLL when it pays (CPU training)."""
        if not (self.enabled and weight.requires_grad and torch.is_grad_enabled() and weight.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            return F.embedding(ids, weight)
        out, route = _TiedLookup.apply(weight, ids)
        self._route = (weight, route)
        return out

    def __getstate__(self) -> dict:     # copies and pickles carry the switch, never a graph
        return {"enabled": self.enabled, "_route": None}

    def take(self, weight: Tensor) -> Optional[Tensor]:
        """The route left for ``weight`` by the last lookup, once; None when there is none."""
        held, self._route = self._route, None
        return held[1] if held is not None and held[0] is weight and torch.is_grad_enabled() else None


class _TiedLookup(torch.autograd.Function):
    """Embedding rows of a weight the output layer shares, and a *route*: a stand-in of the
    weight's shape (no storage of its own) that _SegmentedNLL sends the weight's gradient to.
    The backward adds the looked-up rows' gradients into that gradient in place, so a step
    makes one dense ``[vocab, d]`` gradient instead of three (the NLL's, the lookup's zero-filled
    one and the sum autograd forms of the two): 2–2.5 % of a CPU training step (A/B in one process). A route that
    gets no gradient (the NLL did not use it) is a zero-filled gradient plus the rows, as before.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor):
        ctx.save_for_backward(ids)
        ctx.weight_like = (weight.shape, weight.dtype, weight.device)
        return F.embedding(ids, weight), weight.new_zeros(()).expand(weight.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Optional[Tensor], route_grad: Optional[Tensor]):
        (ids,) = ctx.saved_tensors
        # route_grad is _SegmentedNLL's freshly allocated weight gradient, held by nothing else.
        shape, dtype, device = ctx.weight_like
        gw = route_grad if route_grad is not None else torch.zeros(shape, dtype=dtype, device=device)
        if grad is not None:
            gw.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.size(-1)).to(gw.dtype))
        return gw, None


class AdaptiveEmbedding(nn.Module):
    """Token ids ``[...]`` -> ``[..., d_proj]``, scaled by sqrt(d_proj) (the reference's emb_scale)."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: List[int], div_val: int = 1):
        super().__init__()
        check_cutoffs(n_token, cutoffs, div_val, d_embed)
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoff_ends = [0] + list(cutoffs) + [n_token]
        self.emb_scale = d_proj ** 0.5
        self.tied_route = TiedRoute()           # enabled by tie_adaptive; not state
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for i, (lo, hi) in enumerate(zip(self.cutoff_ends[:-1], self.cutoff_ends[1:])):
                d_i = d_embed // div_val ** i
                self.emb_layers.append(nn.Embedding(hi - lo, d_i))
                self.emb_projs.append(nn.Parameter(torch.empty(d_proj, d_i)))

    def forward(self, ids: Tensor) -> Tensor:
        if self.div_val == 1:
            out = self.tied_route.lookup(self.emb_layers[0].weight, ids)
            if len(self.emb_projs):
                out = F.linear(out, self.emb_projs[0])
            return out * self.emb_scale
        # Every cluster embeds every token (ids clamped into its range) and the right one is
        # selected: a few extra small GEMMs instead of a data-dependent gather (a host sync).
        out = None
        for i, (lo, hi) in enumerate(zip(self.cutoff_ends[:-1], self.cutoff_ends[1:])):
            emb = F.linear(self.emb_layers[i]((ids - lo).clamp(0, hi - lo - 1)), self.emb_projs[i])
            out = emb if out is None else torch.where(((ids >= lo) & (ids < hi)).unsqueeze(-1), emb, out)
        return out * self.emb_scale


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """Hidden ``[N, d_proj]`` -> per-token NLL ``[N]`` in input order and/or log-probabilities
    ``[N, n_token]``. Log-softmax runs in fp32 whatever the parameter dtype."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: List[int], div_val: int = 1):
        super().__init__()
        check_cutoffs(n_token, cutoffs, div_val, d_embed)
        self.n_token, self.d_embed, self.d_proj, self.div_val = n_token, d_embed, d_proj, div_val
        self.cutoffs = list(cutoffs)
        self.cutoff_ends = [0] + list(cutoffs) + [n_token]
        self._logit_buffers: dict[int, LogitBuffers] = {}   # per output layer; not state
        self.tied_route = TiedRoute()           # the embedding's, when tied (tie_adaptive)
        self.n_clusters = len(cutoffs)
        self.shortlist_size = self.cutoff_ends[1]
        self.head_size = self.shortlist_size + self.n_clusters
        if self.n_clusters:
            self.cluster_weight = nn.Parameter(torch.empty(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.empty(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            self.out_layers.append(nn.Linear(d_embed, n_token))
            if d_proj != d_embed:
                for _ in range(self.n_clusters + 1):
                    self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_embed)))
        else:
            for i, (lo, hi) in enumerate(zip(self.cutoff_ends[:-1], self.cutoff_ends[1:])):
                d_i = d_embed // div_val ** i
                self.out_projs.append(nn.Parameter(torch.empty(d_proj, d_i)))
                self.out_layers.append(nn.Linear(d_i, hi - lo))

    # -- pieces ---------------------------------------------------------------------------
    def _cluster(self, i: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Output weight, bias and projection of cluster i (0 = shortlist)."""
        proj = self.out_projs[i] if len(self.out_projs) else None
        if self.div_val == 1:
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            layer = self.out_layers[0]
            return layer.weight[lo:hi], layer.bias[lo:hi], proj
        return self.out_layers[i].weight, self.out_layers[i].bias, proj

    @staticmethod
    def _logits(h: Tensor, weight: Tensor, bias: Tensor, proj: Optional[Tensor]) -> Tensor:
        if proj is not None:
            h = F.linear(h, proj.t())
        return F.linear(h, weight, bias)

    def _head_logits(self, h: Tensor) -> Tensor:
        w, b, proj = self._cluster(0)
        if self.n_clusters:
            w = torch.cat([w, self.cluster_weight], dim=0)
            b = torch.cat([b, self.cluster_bias], dim=0)
        return self._logits(h, w, b, proj)

    # -- outputs --------------------------------------------------------------------------
    def log_prob(self, h: Tensor) -> Tensor:
        """Full log-probabilities ``[N, n_token]`` (fp32)."""
        head = torch.log_softmax(self._head_logits(h).float(), dim=-1)
        if not self.n_clusters:
            return head
        parts = [head[:, : self.shortlist_size]]
        for i in range(1, self.n_clusters + 1):
            tail = torch.log_softmax(self._logits(h, *self._cluster(i)).float(), dim=-1)
            parts.append(tail + head[:, self.shortlist_size + i - 1].unsqueeze(1))
        return torch.cat(parts, dim=1)

    def nll(self, h: Tensor, target: Tensor) -> Tensor:
        """``-log p(target)`` per row, ``[N]`` fp32, in input order.

        Each tail is evaluated only on the rows whose target falls in it. That needs the
        cluster sizes on the host: one synchronisation per call (none without cutoffs).
        """
        if not self.n_clusters:
            return self._fused_nll(0, [h], [target])[0]
        cluster = sum((target >= c).long() for c in self.cutoffs)  # 0 = shortlist
        # Shortlist rows score their token; tail rows score their cluster's head column.
        head_target = torch.where(cluster == 0, target, self.shortlist_size - 1 + cluster)
        counts = torch.bincount(cluster, minlength=self.n_clusters + 1).tolist()
        order = torch.argsort(cluster, stable=True)
        rows = list(order.split(counts))[1:]
        xs = [h] + [h.index_select(0, r) for r in rows]
        targets = [head_target] + [target.index_select(0, r) - self.cutoff_ends[i + 1] for i, r in enumerate(rows)]
        if self.div_val == 1:
            parts = self._fused_nll(0, xs, targets)
        else:
            parts = [self._fused_nll(i, [x], [t])[0] for i, (x, t) in enumerate(zip(xs, targets))]
        nll = parts[0]
        for r, part in zip(rows, parts[1:]):
            # Empty clusters stay in the graph: every parameter gets a gradient each step
            # (zeros here), which DDP and ZeRO expect.
            nll = nll.index_add(0, r, part)
        return nll

    def _fused_nll(self, layer: int, xs: List[Tensor], targets: List[Tensor]) -> List[Tensor]:
        """NLL of each ``xs[i]`` against cluster ``layer + i``; div_val 1 scores all clusters
        of the one shared output matrix in a single call."""
        out = self.out_layers[layer]
        projs = self.out_projs if len(self.out_projs) else None
        xs = [x if projs is None else F.linear(x, projs[layer + i].t()) for i, x in enumerate(xs)]
        if self.div_val == 1:
            bounds = self.cutoff_ends[: len(xs) + 1]
        else:
            bounds = [0, out.weight.size(0)]
        head = layer == 0 and self.n_clusters > 0
        buffers = None
        if xs[0].device.type == "cpu" and not torch.is_autocast_enabled("cpu") and \
                not torch.compiler.is_compiling():
            buffers = self._logit_buffers.setdefault(layer, LogitBuffers())
            buffers.backward_expected = torch.is_grad_enabled() and any(
                t.requires_grad for t in (out.weight, out.bias, *xs))
        route = self.tied_route.take(out.weight) if layer == 0 and self.div_val == 1 else None
        return list(_SegmentedNLL.apply(out.weight, route, out.bias, self.cluster_weight if head else None,
                                        self.cluster_bias if head else None, bounds, targets, buffers, *xs))

    def forward(self, h: Tensor, target: Optional[Tensor] = None, return_logprobs: bool = False):
        """Returns ``(nll or None, logprobs or None)``."""
        if return_logprobs:
            logprobs = self.log_prob(h)
            nll = None if target is None else -logprobs.gather(1, target.unsqueeze(1)).squeeze(1)
            return nll, logprobs
        return (None if target is None else self.nll(h, target)), None


def tie_adaptive(word_emb: AdaptiveEmbedding, crit: ProjectedAdaptiveLogSoftmax, tie_weight: bool,
                 tie_projs: List[bool], div_val: int) -> None:
    """Share the output clusters' weights with the embedding tables (``tie_weight``) and, per cluster,
    the output projections with the embedding projections (``tie_projs``)."""
    if tie_weight:
        for out, emb in zip(crit.out_layers, word_emb.emb_layers):
            out.weight = emb.weight
        if div_val == 1:        # one shared matrix: its NLL gradient and the lookup's meet (_TiedLookup)
            crit.tied_route = word_emb.tied_route
            crit.tied_route.enabled = True
    emb_projs, out_projs = word_emb.emb_projs, crit.out_projs
    for i, tie in enumerate(tie_projs):
        if tie and len(out_projs):
            # div_val 1 has one embedding projection for all clusters.
            out_projs[i] = emb_projs[0] if div_val == 1 else emb_projs[i]


def score(crit: ProjectedAdaptiveLogSoftmax, h: Tensor, targets: Optional[Tensor], return_logprobs: bool,
          n_token: int) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(loss, nll [B, T], logprobs [B, T, n_token])`` of hidden states ``h [B, q, d]`` whose last
    T = targets' length positions predict ``targets`` (all q without targets); None where not asked."""
    batch, qlen = h.shape[:2]
    loss = nll = logprobs = None
    if targets is not None or return_logprobs:
        n_pred = qlen if targets is None else targets.size(1)
        pred = h[:, qlen - n_pred:].reshape(-1, h.size(-1))
        flat_nll, flat_lp = crit(pred, None if targets is None else targets.reshape(-1), return_logprobs)
        if flat_nll is not None:
            nll = flat_nll.view(batch, n_pred)
            loss = nll.mean()
        if flat_lp is not None:
            logprobs = flat_lp.view(batch, n_pred, n_token)
    return loss, nll, logprobs
