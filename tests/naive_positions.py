"""Position encodings written out from the formula, to check the vectorised ones against."""
from __future__ import annotations

import math

import torch


def naive_sinusoid(positions, d):
    """Vaswani encodings with the reference's layout: all sines, then all cosines."""
    rows = []
    for p in positions:
        freqs = [1.0 / 10000 ** (2 * k / d) for k in range(d // 2)]
        rows.append([math.sin(p * f) for f in freqs] + [math.cos(p * f) for f in freqs])
    return torch.tensor(rows, dtype=torch.float32)
