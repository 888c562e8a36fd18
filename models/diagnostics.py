"""Where attention goes: the average attention mass a segment's queries put on each region of
their keys (the compressed memory, the memory, the segment itself) and on age buckets of each.

Rae et al. (2020, §5.3 and Figure 4) bucket enwik8 attention over compressed memory, memory and
segment and see it rise at the memory → compressed-memory boundary; no PyTorch implementation
offers the measurement. ``AttentionMass`` accumulates it over every forward of an evaluation:

    with model.record_attention(n_buckets=6) as mass:
        ... forwards ...
    mass.summary()  ->  {"regions": {"memory": 0.31, "segment": 0.69}, "age_buckets": {...}, ...}

A region's mass is the share of all attention probability (queries × heads × layers × rows) on
its keys; the shares of all regions add up to 1. Each region is cut into ``n_buckets`` equal
spans of its current rows, oldest first (a region with fewer rows than buckets leaves some
empty). Sums stay in float64 on the attention's device (no host sync per forward).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


class AttentionMass:
    def __init__(self, regions: Sequence[str], n_layer: int, n_buckets: int = 6):
        if n_buckets < 1:
            raise ValueError(f"n_buckets={n_buckets} must be >= 1")
        self.regions, self.n_layer, self.n_buckets = tuple(regions), n_layer, n_buckets
        self.sums: Optional[Tensor] = None      # [n_layer, n_regions, n_buckets] attention mass
        self.queries: Optional[Tensor] = None   # [n_layer] query rows x heads counted
        self.active = True                      # off: forwards are not counted (warm-up)
        self._index: dict = {}

    def _bucket_index(self, sizes: tuple[int, ...], device) -> Tensor:
        """Flat (region, bucket) index of every key, keys in region order."""
        key = (sizes, str(device))
        idx = self._index.get(key)
        if idx is None:
            parts = [r * self.n_buckets + (torch.arange(n, device=device) * self.n_buckets) // n
                     for r, n in enumerate(sizes) if n > 0]
            idx = self._index[key] = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long, device=device)
        return idx

    def add(self, layer: int, probs: Tensor, sizes: Sequence[int]) -> None:
        """``probs [B, H, q, k]`` of one layer; ``sizes`` the rows of each region in key order."""
        if not self.active:
            return
        sizes = tuple(int(n) for n in sizes)
        if len(sizes) != len(self.regions) or sum(sizes) != probs.size(-1):
            raise ValueError(f"region sizes {sizes} do not fit {len(self.regions)} regions and {probs.size(-1)} keys")
        if self.sums is None:
            self.sums = torch.zeros(self.n_layer, len(self.regions) * self.n_buckets, dtype=torch.float64,
                                    device=probs.device)
            self.queries = torch.zeros(self.n_layer, dtype=torch.float64, device=probs.device)
        per_key = probs.sum(dim=(0, 1, 2), dtype=torch.float64)       # no float64 copy of probs
        self.sums[layer].index_add_(0, self._bucket_index(sizes, probs.device), per_key)
        self.queries[layer] += probs.size(0) * probs.size(1) * probs.size(2)

    # -- across ranks ------------------------------------------------------------------------
    def flat(self) -> list[float]:
        """The sums as one list (for an all-reduce); zeros when nothing was counted."""
        n = self.n_layer * len(self.regions) * self.n_buckets
        if self.sums is None:
            return [0.0] * (n + self.n_layer)
        return self.sums.flatten().tolist() + self.queries.tolist()

    def load_flat(self, values: Sequence[float]) -> None:
        t = torch.tensor(list(values), dtype=torch.float64)
        n = self.n_layer * len(self.regions) * self.n_buckets
        self.sums, self.queries = t[:n].view(self.n_layer, -1), t[n:]

    # -- results -----------------------------------------------------------------------------
    def summary(self) -> dict:
        """Shares of attention per region, per region and age bucket, per region and layer."""
        if self.sums is None or float(self.queries.sum()) == 0:
            return {"regions": {}, "age_buckets": {}, "per_layer": {}, "queries": 0}
        sums = self.sums.cpu().view(self.n_layer, len(self.regions), self.n_buckets)
        queries = self.queries.cpu()
        overall = sums.sum(0) / queries.sum()
        layer = sums.sum(2) / queries.clamp(min=1).unsqueeze(1)
        return {"regions": {r: float(overall[i].sum()) for i, r in enumerate(self.regions)},
                "age_buckets": {r: overall[i].tolist() for i, r in enumerate(self.regions)},
                "per_layer": {r: layer[:, i].tolist() for i, r in enumerate(self.regions)},
                "queries": int(queries.sum())}


def attention_metrics(summary: dict) -> dict[str, float]:
    """Flat metric names for a summary: ``attn_<region>`` and ``attn_<region>_age<b>`` (oldest 0)."""
    out = {f"attn_{r}": v for r, v in summary.get("regions", {}).items()}
    for r, buckets in summary.get("age_buckets", {}).items():
        out |= {f"attn_{r}_age{b}": v for b, v in enumerate(buckets)}
    return out
