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
- ``window_visibility``: for a window of recomputed memory tokens (Al-Rfou, GPT-2), what each
  position sees and its position counted from its document's first token in the window.

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


def track(doc_start: Optional[Tensor], prior: Optional[Tensor], batch: int, q: int,
          device) -> Optional[tuple[Tensor, Tensor]]:
    """``(last_start [B, q], doc_len [B])`` when documents are tracked (a ``doc_start`` given now or a
    ``doc_len`` in memory, ``prior``), else None."""
    if doc_start is None and prior is None:
        return None
    if doc_start is None:
        doc_start = torch.zeros(batch, q, dtype=torch.bool, device=device)
    elif tuple(doc_start.shape) != (batch, q):
        raise ValueError(f"doc_start has shape {tuple(doc_start.shape)}, expected ({batch}, {q}) like input_ids")
    return last_start(doc_start.to(device)), current_len(prior, batch, device)


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


def window_visibility(docs: tuple[Tensor, Tensor], m: int) -> tuple[Tensor, Tensor]:
    """``([B, 1, W, W] visible, [B, W] positions)`` over the window of ``m`` memory tokens and
    the input: causal, no position sees a token of an earlier document than its own, and each
    token's position counts from the first token of its document in the window, so a document
    is seen exactly as in a window of its own. Memory tokens are recomputed, so the document's
    own memory tokens get the same floor as the input."""
    last, n = docs
    device = last.device
    first = (m - n.clamp(max=m)).unsqueeze(1)                                    # [B, 1]
    w = torch.arange(m, device=device).unsqueeze(0)
    mem_floor = torch.where(w >= first, first, torch.zeros_like(w))              # older documents: causal only
    floor = torch.cat([mem_floor.expand(last.size(0), m), key_floor(last, n, m)], dim=1)
    pos = torch.arange(floor.size(1), device=device)
    attend = (pos.view(1, 1, -1) <= pos.view(1, -1, 1)) & (pos.view(1, 1, -1) >= floor.unsqueeze(-1))
    return attend.unsqueeze(1), pos.unsqueeze(0) - floor
