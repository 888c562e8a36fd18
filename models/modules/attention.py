"""Multi-head attention over [memory; segment] for the Transformer-XL family.

Three position schemes share one module layout (fused ``qkv_net``, ``o_net``, residual +
LayerNorm), so a state dict maps onto the reference's (``qkv_net.weight`` is
``[3·n_head·d_head, d_model]``, rows ordered q | k | v):

- ``RelPartialLearnableAttention``: Dai et al.'s four terms, (a) content + (c) global content
  bias u = ``r_w_bias``, and (b) position + (d) global position bias v = ``r_r_bias`` over the
  sinusoid R projected by ``r_net`` (reference attn_type 0).
- ``RelLearnableAttention``: Shaw et al. learned ``r_emb`` with a per-distance ``r_bias`` and u
  (reference attn_type 1).
- ``AbsoluteAttention``: plain content attention; positions were added to the input
  (reference attn_type 2).

Tensors are batch first: hidden ``[B, q, d]``, memory ``[B, m, d]``, scores ``[B, H, q, k]``
contiguous (handled as ``[B·H, q, k]``). Queries are projected from the segment only (the
reference projects memory rows too and throws those queries away). The 1/sqrt(d_head) scale
is folded into the queries; the score tensor is written once by the masked positional term,
accumulated into by the content GEMM and read by the softmax. Nothing here synchronises
with the host: masks are additive tensors built without data-dependent branches.

Content-only attention (``AbsoluteAttention``, the vanilla family's) runs through torch's
``scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on CUDA) unless
``choose_attention`` says the explicit softmax is needed; see there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.modules.dropout import Dropout
from models.modules.layers import layer_norm, linear
from models.modules.positions import rel_shift


def causal_mask(qlen: int, mlen: int, window: Optional[int] = None, device=None) -> Tensor:
    """Boolean ``[qlen, mlen + qlen]``, True where query i may NOT look at key j.

    Query i sits at window position ``mlen + i`` and sees keys ``j <= mlen + i``. With a
    ``window`` (same_length) it sees only the last ``window`` of those, itself included.
    """
    i = torch.arange(qlen, device=device).unsqueeze(1) + mlen
    j = torch.arange(mlen + qlen, device=device).unsqueeze(0)
    mask = j > i
    if window is not None:
        mask = mask | (j <= i - window)
    return mask


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask (True = masked) as an additive ``[q, k]`` tensor: 0 where visible, -inf
    where not. Adding it costs one pass and no backward work (masked probabilities are 0,
    so their gradient is 0 anyway), unlike masked_fill."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def same_length_window(mem_len: int, keys: str) -> int:
    """Keys per query under same_length: ``mem_len`` (reference PyTorch / HF, the default)
    or ``mem_len + 1`` (NVIDIA / TF, which also lets query 0 see the oldest memory slot)."""
    if keys == "mem_len":
        return mem_len
    if keys == "mem_len+1":
        return mem_len + 1
    raise ValueError(f"same_length_keys={keys!r}: choose 'mem_len' (reference) or 'mem_len+1' (NVIDIA/TF)")


KERNELS = ("sdpa", "explicit")


def choose_attention(positional: bool, keep_probs: bool, forced: Optional[str] = None) -> str:
    """``"sdpa"`` or ``"explicit"`` for one attention call.

    explicit when a relative positional score is added (SDPA would need it materialised as a
    float mask: no gain) or when the probabilities are requested (``keep_probs``: attention
    diagnostics, the Compressive Transformer's most-used compression); else SDPA, on every
    device (on CPU it measured no slower). ``forced`` (a module's ``kernel``) overrides both
    checks for SDPA only where SDPA can express the call."""
    if forced is not None and forced not in KERNELS:
        raise ValueError(f"attention kernel {forced!r}: choose one of {KERNELS} (or None: chosen per call)")
    if positional or keep_probs or forced == "explicit":
        return "explicit"
    return "sdpa"


class KernelChoice:
    """An attention module whose kernel ``set_attention_kernel`` can force (None: chosen per call)."""

    kernel: Optional[str] = None


def set_memory_kv_cache(model: nn.Module, enabled: bool) -> None:
    """Reuse (True, the default) or always recompute the memory rows' keys and values in
    evaluation (``_MemoryAttention._cached_memory_kv``); off also frees what is held."""
    for m in model.modules():
        if isinstance(m, _MemoryAttention):
            m.memory_kv_cache = bool(enabled)
            m._kv_cache = None


def set_attention_kernel(model: nn.Module, kernel: Optional[str]) -> None:
    """Force ``"sdpa"`` / ``"explicit"`` (or None: the default choice) in every attention module."""
    choose_attention(False, False, kernel)      # validates the name
    for m in model.modules():
        if isinstance(m, KernelChoice):
            m.kernel = kernel


class _MemoryAttention(KernelChoice, nn.Module):
    """Shared projections, softmax and output block; subclasses add the position terms.

    With ``keep_probs`` set, each forward leaves its attention probabilities (before dropout,
    detached, ``[B, H, q, k]``) in ``probs`` for the model to read once (``take_probs``): the
    memory diagnostics and the Compressive Transformer's most-used compression need them."""

    keep_probs: bool = False
    probs: Optional[Tensor] = None
    memory_kv_cache: bool = True        # see _cached_memory_kv; set_memory_kv_cache turns it off
    _kv_cache: Optional[tuple] = None

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float,
                 pre_lnorm: bool = False):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.scale = 1.0 / math.sqrt(d_head)
        self.pre_lnorm = pre_lnorm
        self.qkv_net = linear(d_model, 3 * n_head * d_head, bias=False)
        self.o_net = linear(n_head * d_head, d_model, bias=False)
        self.drop = Dropout(dropout)
        self.dropatt = Dropout(dropatt)
        self.layer_norm = layer_norm(d_model)

    def _heads(self, *parts: Tensor) -> Tensor:
        """``[B, L_i, H·D]`` pieces -> one contiguous ``[B, H, sum L_i, D]`` (a single copy)."""
        views = [self._split_heads(x) for x in parts]
        return torch.cat(views, dim=2) if len(views) > 1 else views[0].contiguous()

    def _project(self, h: Tensor, mem: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled queries ``[B, H, q, D]`` from the segment, keys and values ``[B, H, k, D]``
        from ``cat[mem, segment]`` (pre-LN normalises both, as the reference); contiguous.

        Memory rows get their own GEMM for k and v only: no wasted queries, and no input
        gradient is computed for them (memory never requires grad). In evaluation that GEMM
        skips the memory rows that are rows of the previous call (``_cached_memory_kv``)."""
        hd = self.n_head * self.d_head
        w = self.qkv_net.weight
        q, k, v = F.linear(self.layer_norm(h) if self.pre_lnorm else h, w).split(hd, dim=-1)
        caching = self._kv_caching()
        params = None

        def memory_kv(rows: Tensor) -> tuple[Tensor, ...]:
            return F.linear(self.layer_norm(rows) if self.pre_lnorm else rows, w[hd:]).split(hd, dim=-1)

        if mem is not None and mem.size(1) > 0:
            cached = self._cached_memory_kv(mem) if caching else None
            if cached is None:
                k_mem, v_mem = memory_kv(mem)
                k, v = self._heads(k_mem, k), self._heads(v_mem, v)
            else:
                n, k_old, v_old = cached    # the last n memory rows' K/V; the rows before them projected
                params = self._kv_cache[1]
                fresh = mem[:, : mem.size(1) - n]
                k_parts, v_parts = [k_old], [v_old]
                if fresh.size(1):
                    k_new, v_new = memory_kv(fresh)
                    k_parts, v_parts = [self._split_heads(k_new), k_old], [self._split_heads(v_new), v_old]
                k = torch.cat(k_parts + [self._split_heads(k)], dim=2)
                v = torch.cat(v_parts + [self._split_heads(v)], dim=2)
        else:
            k, v = self._heads(k), self._heads(v)
        self._kv_cache = None
        if caching:
            rows = h.clone() if mem is None or mem.size(1) == 0 else torch.cat([mem, h], dim=1)
            self._kv_cache = (rows, params or tuple(p.clone() for p in self._kv_params()), k, v)
        return self._heads(q * self.scale), k, v

    # -- evaluation: keys and values of memory rows, reused ------------------------------------
    def _kv_caching(self) -> bool:
        return (self.memory_kv_cache and not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling())

    def _kv_params(self) -> tuple[Tensor, ...]:
        """What the memory rows' keys and values depend on besides the rows: the K/V weight rows
        (and the pre-LN parameters)."""
        hd = self.n_head * self.d_head
        params = [self.qkv_net.weight[hd:]]
        if self.pre_lnorm:
            params += [p for p in (self.layer_norm.weight, self.layer_norm.bias) if p is not None]
        return tuple(p.detach() for p in params)

    def _cached_memory_kv(self, mem: Tensor) -> Optional[tuple[int, Tensor, Tensor]]:
        """``(n, k, v)``: keys and values ``[B, H, n, D]`` of the last ``n`` memory rows, from the
        previous call, when those rows are the last ``n`` rows that call attended over
        (Transformer-XL's memory is the previous segments' layer inputs, whose keys and values
        that call projected; the Compressive Transformer's has its compressed rows in front) and
        the weights are the same; None when no trailing row matches. Compared by value (a pass
        over the rows and the weights, against the GEMM it saves), so anything else (another
        stream, reset rows, a changed weight) is projected again: the same products of the same
        rows either way."""
        if self._kv_cache is None:
            return None
        rows, params, k, v = self._kv_cache
        n = min(mem.size(1), rows.size(1))
        if n == 0 or rows.shape[0] != mem.shape[0] or rows.shape[2:] != mem.shape[2:] or \
                rows.dtype != mem.dtype or rows.device != mem.device:
            return None
        current = self._kv_params()
        if len(current) != len(params) or not all(_same(a, b) for a, b in zip(current, params)):
            return None
        same = (rows[:, -n:] == mem[:, -n:]).flatten(2).all(dim=2).all(dim=0)   # per trailing row
        if not bool(same.all()):
            n -= int(torch.nonzero(~same).max()) + 1    # the rows after the last mismatch
            if n == 0:
                return None
        return n, k[:, :, -n:], v[:, :, -n:]

    def _split_heads(self, x: Tensor) -> Tensor:
        """``[B, L, H·D]`` -> ``[B, H, L, D]`` (a view)."""
        return x.unflatten(-1, (self.n_head, self.d_head)).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pos_score: Optional[Tensor], mask: Tensor) -> Tensor:
        """softmax(q·kᵀ + rel_shift(pos_score) + mask) · v, returned as ``[B, q, H·D]``.

        pos_score: ``[B, H, q, k+1]`` positional scores over distances ``k..0`` (or None);
        mask: additive ``[q, k]`` or ``[B, q, k]`` (0 or -inf, see ``additive_mask``) or boolean (True = masked).
        Works on ``[B·H, ., .]`` batches: the masked positional term is materialised by one add,
        the content term accumulated into it by the GEMM (beta=1), all on plain tensors so
        autograd adds no copies.
        """
        B, H, qlen, D = q.shape
        klen = k.size(2)
        # Under autocast the projections come out in half precision while the biases added to the
        # queries and the model's mask stay fp32: compute in the keys' dtype (no-ops otherwise).
        q = q.to(k.dtype)
        pos_score = None if pos_score is None else pos_score.to(k.dtype)
        mask = additive_mask(mask, k.dtype) if mask.dtype == torch.bool else mask.to(k.dtype)
        if choose_attention(pos_score is not None, self.keep_probs, self.kernel) == "sdpa":
            if mask.dim() == 3:
                mask = mask.unsqueeze(1)        # [B, 1, q, k], broadcast over heads
            p = self.dropatt.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)  # q is scaled
            return out.transpose(1, 2).flatten(2)                                                  # [B, q, H·D]
        if mask.dim() == 3:     # one mask per row (document boundaries): [B, q, k]
            mask = mask.unsqueeze(1).expand(B, H, qlen, klen).reshape(B * H, qlen, klen)
        q3, k3t, v3 = q.view(B * H, qlen, D), k.view(B * H, klen, D).transpose(1, 2), v.view(B * H, klen, D)
        if pos_score is None:
            score = torch.baddbmm(mask, q3, k3t)
        else:
            score = rel_shift(pos_score.view(B * H, qlen, klen + 1)) + mask
            score.baddbmm_(q3, k3t)
        # fp32 softmax for half precision; every row keeps >= 1 key (itself), so no NaN.
        prob = torch.softmax(score, dim=-1, dtype=torch.float32).to(v.dtype)
        if self.keep_probs:
            self.probs = prob.detach().view(B, H, qlen, klen)
        prob = self.dropatt(prob)
        return torch.bmm(prob, v3).view(B, H, qlen, D).transpose(1, 2).flatten(2)

    def take_probs(self) -> Optional[Tensor]:
        probs, self.probs = self.probs, None
        return probs

    def _output(self, h: Tensor, attn_vec: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        """Output projection (plus ``extra``, e.g. the ∞-former's long-term read), dropout,
        residual and LayerNorm (post-LN) or residual only (pre-LN)."""
        out = self.o_net(attn_vec)
        if extra is not None:
            out = out + extra
        out = self.drop(out)
        return h + out if self.pre_lnorm else self.layer_norm(h + out)


class RelPartialLearnableAttention(_MemoryAttention):
    """Transformer-XL attention: ``(q+u)·k + rel_shift((q+v)·W_r R)``.

    u, v are passed in (shared by all layers, the reference PyTorch code) unless the layer
    owns them (``own_bias=True``: TF/HF ``untie_r``).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float,
                 pre_lnorm: bool = False, own_bias: bool = False):
        super().__init__(d_model, n_head, d_head, dropout, dropatt, pre_lnorm)
        self.r_net = linear(d_model, n_head * d_head, bias=False)
        if own_bias:
            self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))
            self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))
        else:
            self.r_w_bias = self.r_r_bias = None

    def forward(self, h: Tensor, mem: Optional[Tensor], r: Tensor, mask: Tensor,
                r_w_bias: Optional[Tensor] = None, r_r_bias: Optional[Tensor] = None,
                extra: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
        """h ``[B, q, d]``, mem ``[B, m, d]`` or None, r ``[m+q+1, d]`` encodings of distances
        ``m+q .. 0`` (see positions.rel_shift), mask ``[q, m+q]`` additive or bool.
        ``extra(q)``: a term ``[B, q, d]`` from this layer's queries (``[B, H, q, D]``, already
        scaled by 1/√D), added to the output projection (the ∞-former's long-term read)."""
        u = self.r_w_bias if self.r_w_bias is not None else r_w_bias
        v_bias = self.r_r_bias if self.r_r_bias is not None else r_r_bias
        q, k, v = self._project(h, mem)
        r_k = self._position_keys(r)
        ac_q = q + (u * self.scale).unsqueeze(1)
        bd = torch.matmul(q + (v_bias * self.scale).unsqueeze(1), r_k)  # [B, H, q, k+1], shifted in _attend
        return self._output(h, self._attend(ac_q, k, v, bd, mask), None if extra is None else extra(q))

    def _position_keys(self, r: Tensor) -> Tensor:
        """``W_r R`` as ``[H, D, k+1]``. R depends on the lengths alone, so outside autograd
        (evaluation, generation: one segment after another at the same lengths) the projection of
        the last call is reused when R and W_r are equal to that call's (compared by value, which
        costs a pass over each rather than a GEMM, and holds whatever changed the weight: an
        optimizer step, a load, DeepSpeed writing into ``.data``). With a long memory and a short
        segment this GEMM is a large part of the forward: ``m+q+1`` rows against the segment's q."""
        if torch.compiler.is_compiling():          # a traced graph keeps no state between calls
            return self._project_positions(r)
        if torch.is_grad_enabled():                # training: W_r moves every step, keep nothing
            self._r_cache = None
            return self._project_positions(r)
        w, cache = self.r_net.weight, getattr(self, "_r_cache", None)
        if cache is not None and _same(cache[0], r) and _same(cache[1], w):
            return cache[2]
        r_k = self._project_positions(r)
        self._r_cache = (r.clone(), w.detach().clone(), r_k)
        return r_k

    def _project_positions(self, r: Tensor) -> Tensor:
        return self.r_net(r).view(-1, self.n_head, self.d_head).permute(1, 2, 0)  # [H, D, k+1]


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class RelLearnableAttention(_MemoryAttention):
    """Shaw et al. (2018) as the reference attn_type 1: ``(q+u)·k + rel_shift(q·r_emb + r_bias)``
    with learned ``r_emb [max_klen, H, D]`` and ``r_bias [max_klen, H]``; row ``max_klen-1`` is
    distance 0, row 0 the farthest, shared by every longer distance."""

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float,
                 max_klen: int, pre_lnorm: bool = False):
        super().__init__(d_model, n_head, d_head, dropout, dropatt, pre_lnorm)
        self.max_klen = max_klen
        self.r_emb = nn.Parameter(torch.empty(max_klen, n_head, d_head))
        self.r_bias = nn.Parameter(torch.empty(max_klen, n_head))
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))

    def forward(self, h: Tensor, mem: Optional[Tensor], dist: Tensor, mask: Tensor) -> Tensor:
        """dist: ``[m+q+1]`` distances ``m+q .. 0`` (already clamped if clamp_len is set)."""
        q, k, v = self._project(h, mem)
        rows = (self.max_klen - 1 - dist.clamp(max=self.max_klen - 1)).long()
        r_emb = self.r_emb.index_select(0, rows).permute(1, 2, 0)  # [H, D, k+1]
        r_bias = self.r_bias.index_select(0, rows).t().unsqueeze(1) * self.scale  # [H, 1, k+1]
        bd = torch.matmul(q, r_emb) + r_bias  # [B, H, q, k+1], shifted in _attend
        ac_q = q + (self.r_w_bias * self.scale).unsqueeze(1)
        return self._output(h, self._attend(ac_q, k, v, bd, mask))


class AbsoluteAttention(_MemoryAttention):
    """Vaswani et al. content attention; absolute positions were added to the input."""

    def forward(self, h: Tensor, mem: Optional[Tensor], mask: Tensor) -> Tensor:
        q, k, v = self._project(h, mem)
        return self._output(h, self._attend(q, k, v, None, mask))
