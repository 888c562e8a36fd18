"""A sequence fed to a model segment by segment, its memory carried (the family tests)."""
from __future__ import annotations

import torch


def stream(model, x: torch.Tensor, segment: int, memory=None):
    """Every forward's output over ``x [B, T]`` in ``segment``-token steps, and the last memory."""
    memory = model.init_memory(x.size(0)) if memory is None else memory
    outs = []
    for s in range(0, x.size(1) - 1, segment):
        out = model(x[:, s: s + segment], x[:, s + 1: s + 1 + segment], memory=memory)
        outs.append(out)
        memory = out.memory
    return outs, memory
