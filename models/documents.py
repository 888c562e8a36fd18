"""Document boundaries: no token attends across a document start, inside a segment or through memory.

A forward may get ``doc_start [B, q]`` (True where an input token opens a document). Memory keeps,
per row, ``doc_len``: how many of the newest tokens the row has consumed belong to the current
document (None: all of them, no start was ever seen). Each family turns the two into what a
query may see:

- ``last_start``: per query, the segment position of the latest start at or before it (-1: the
  document began before this segment);
- a family's ``visible`` rows: how many of the newest memory key rows are the current document's
  (Transformer-XL: ``min(doc_len, mlen)``; the Compressive Transformer also counts compressed rows
  whose whole group of c tokens is the document's);
- ``key_floor``: the oldest key each query may see, over keys ``[memory rows; segment]``;
- ``floor_mask``: the shared causal mask plus -inf below each query's floor, ``[B, q, k]``.

The memory itself is not cleared (rows keep their shapes, no host sync): what belongs to an
earlier document is masked, and ``next_doc_len`` says how much of the new memory is the current
document's, for the next forward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

UNBOUNDED = 2 ** 62     # doc_len of a row that never saw a document start


def last_start(doc_start: Tensor) -> Tensor:
    """``[B, q]`` long: position of the latest document start at or before each query, -1 if none."""
    q = doc_start.size(1)
    pos = torch.arange(q, device=doc_start.device).expand_as(doc_start)
    return torch.where(doc_start.bool(), pos, torch.full_like(pos, -1)).cummax(dim=1).values


def current_len(doc_len: Optional[Tensor], batch: int, device) -> Tensor:
    """``doc_len`` as a ``[B]`` long tensor (UNBOUNDED where memory has none)."""
    if doc_len is None:
        return torch.full((batch,), UNBOUNDED, dtype=torch.long, device=device)
    if tuple(doc_len.shape) != (batch,):
        raise ValueError(f"memory.doc_len has shape {tuple(doc_len.shape)}, expected ({batch},)")
    return doc_len.to(device=device, dtype=torch.long)


def key_floor(last: Tensor, visible: Tensor, mlen: int) -> Tensor:
    """``[B, q]``: keys ``j < floor`` (over ``[mlen memory rows; segment]``) are another document's.
    A query after a start sees from that start on; before it, the ``visible`` newest memory rows."""
    before = (mlen - visible.clamp(max=mlen)).unsqueeze(1)
    return torch.where(last >= 0, last + mlen, before.expand_as(last))


def floor_mask(mask: Tensor, floor: Tensor) -> Tensor:
    """The additive ``[q, k]`` mask plus -inf where ``key < floor[b, query]``: ``[B, q, k]``."""
    k = mask.size(-1)
    keys = torch.arange(k, device=mask.device)
    below = keys.view(1, 1, k) < floor.unsqueeze(-1)
    return mask.unsqueeze(0).masked_fill(below, float("-inf"))


def next_doc_len(last: Tensor, doc_len: Tensor) -> Tensor:
    """Tokens of the current document after this segment: from its last start, or one more segment."""
    q = last.size(1)
    end = last[:, -1]
    return torch.where(end >= 0, q - end, (doc_len + q).clamp(max=UNBOUNDED))
