"""Dropout with a cheaper mask on CPU.

torch draws one Bernoulli sample per element on CPU (``bernoulli_``), about 7 ms per million
elements on two cores: 10 % of a Transformer-XL training step there. Here the mask comes from
random 16-bit integers, four per 64-bit draw, compared with a threshold: the same dropout up to
quantising ``p`` to a multiple of 1/65536 (kept values are scaled by the exact 1/(1 - p_q), so
the expectation is unchanged). On accelerators, and in eval mode, it is ``F.dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16


def cpu_dropout(x: Tensor, p: float) -> Tensor:
    """Zero each element with probability ``round(p·65536)/65536``, scale the rest to keep the mean."""
    drop = round(p * _LEVELS)
    if drop == 0:
        return x
    if drop >= _LEVELS:
        return x * 0.0
    n = x.numel()
    # (lowest, None): every 64-bit pattern, drawn without the modulo a bounded range pays per word.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(1 << 63), None)
    draws = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
    # A scaled float mask: one multiply forward and one backward (faster than where or a bool
    # multiply, at 4 instead of 1 byte per element kept for the backward).
    mask = torch.ge(draws, drop - (1 << 15), out=torch.empty_like(x))  # 0/1 written straight as floats
    return x * mask.mul_(_LEVELS / (_LEVELS - drop))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments and state) using ``cpu_dropout`` for CPU tensors in training."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.inplace or torch.compiler.is_compiling():   # (traced: Inductor's RNG)
            return F.dropout(x, self.p, True, self.inplace)
        return cpu_dropout(x, self.p)
