"""Sinusoid position encodings and the relative-shift trick (Dai et al. 2019, §3.3 and App. B).

Relative attention needs, for query i (absolute index ``mlen + i`` in the window) and key j,
the encoding of the distance ``(mlen + i) - j``. Computing ``q_i · R_d`` for every distance
d once per query and *shifting* each row is linear in the window instead of quadratic.

Convention (as the reference): distances are listed in descending order. We list one more
than the reference, ``klen, klen-1, ..., 0`` (``klen + 1`` rows): the extra leading column
plays the role of the reference's zero padding, so the shift is a strided *view* with no
copy. It only ever lands on masked (future) entries.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sinusoid(pos: Tensor, d: int) -> Tensor:
    """``[len(pos), d]`` encodings ``cat[sin(pos·f), cos(pos·f)]``, f = 1/10000^(2k/d).

    Concatenated halves, not interleaved (the reference's layout)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))
    angles = torch.outer(pos.float(), inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def relative_distances(klen: int, clamp_len: int = -1, device=None) -> Tensor:
    """Distances ``klen, klen-1, ..., 0`` (``klen + 1`` entries) as float, clamped at
    ``clamp_len`` when it is > 0: every longer distance shares the encoding of clamp_len."""
    pos = torch.arange(klen, -1, -1, device=device, dtype=torch.float32)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    return pos


def rel_shift(x: Tensor) -> Tensor:
    """Shift ``x[..., i, c]`` (column c = distance ``klen - c``) to ``out[..., i, j]`` holding
    distance ``(mlen + i) - j``, where ``qlen = x.size(-2)`` and ``klen = x.size(-1) - 1``.

    Equivalent to the reference's pad-reshape-slice, as a view: row i of the output starts
    ``qlen - i`` columns into row i of x, i.e. flat offset ``qlen + i*klen``. Entries with
    ``j > mlen + i`` (future keys) read unrelated values and must be masked.
    """
    if torch.compiler.is_compiling():
        # Traced, the same view as plain view ops (dynamo does not follow the storage offset
        # that _RelShift reads: a graph break per layer), and autograd's slice backward.
        qlen = x.size(-2)
        return x.flatten(-2)[..., qlen:].unflatten(-1, (qlen, x.size(-1) - 1))
    return _RelShift.apply(x)


class _RelShift(torch.autograd.Function):
    """The shift as a strided view, with a direct backward: the view covers the flat range
    ``[qlen, qlen·(klen+1))`` of each ``[qlen, klen+1]`` block, so the gradient is the
    incoming gradient behind ``qlen`` zeros (autograd's generic as_strided backward
    zero-fills and scatters, about 3x slower)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        qlen, klen = x.size(-2), x.size(-1) - 1
        if x.stride(-1) != 1 or x.stride(-2) != klen + 1:
            x = x.contiguous()
        size = (*x.shape[:-2], qlen, klen)
        stride = (*x.stride()[:-2], klen, 1)
        return x.as_strided(size, stride, x.storage_offset() + qlen)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        *lead, qlen, klen = grad.shape
        out = grad.new_empty(*lead, qlen * (klen + 1))
        out[..., :qlen].zero_()
        out[..., qlen:].copy_(grad.reshape(*lead, qlen * klen))
        return out.view(*lead, qlen, klen + 1)
