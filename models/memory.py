"""Recurrent memory as a small typed container the pipeline can save, slice and move.

Every tensor field holds one row per batch element on dim 0, so the pipeline can
slice memory by stream (``select``), rebuild a batch from rows (``cat``) and save
it per stream id without knowing what a model keeps. A field may be ``None``
(e.g. empty memory before the first segment). Memory never requires grad.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, TypeVar

import torch
from torch import Tensor

M = TypeVar("M", bound="Memory")


@dataclasses.dataclass
class Memory:
    """Base class: subclasses add ``Optional[Tensor]`` fields with batch on dim 0.

    ``doc_len [B]`` (long) is shared by every family: how many of the newest tokens a row has
    consumed belong to its current document (models/documents.py); None until a forward is told
    where documents start."""

    doc_len: Optional[Tensor] = None

    def tensors(self) -> dict[str, Optional[Tensor]]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _map(self: M, fn) -> M:
        return type(self)(**{k: (None if v is None else fn(v)) for k, v in self.tensors().items()})

    @property
    def batch_size(self) -> Optional[int]:
        for v in self.tensors().values():
            if v is not None:
                return v.shape[0]
        return None

    def select(self: M, rows: slice | Sequence[int] | Tensor) -> M:
        """Rows (streams) of the batch, as a new memory."""
        if isinstance(rows, slice):
            return self._map(lambda t: t[rows])
        idx = torch.as_tensor(rows, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, idx.to(t.device)))

    def to(self: M, device=None, dtype=None) -> M:
        def move(t: Tensor) -> Tensor:
            # Integer bookkeeping fields keep their dtype; only floating state is cast.
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return self._map(move)

    def detach(self: M) -> M:
        return self._map(lambda t: t.detach())

    @classmethod
    def cat(cls: type[M], parts: Sequence[M]) -> M:
        """Concatenate memories along the batch (stream) dimension."""
        if not parts:
            raise ValueError("Memory.cat needs at least one part")
        out = {}
        for name in parts[0].tensors():
            vals = [p.tensors()[name] for p in parts]
            if all(v is None for v in vals):
                out[name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"Memory.cat: field {name!r} is empty in some parts and not in others")
            else:
                out[name] = torch.cat(vals, dim=0)
        return type(parts[0])(**out)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.tensors().items() if v is not None}

    @classmethod
    def from_state_dict(cls: type[M], state: dict[str, Tensor]) -> M:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(state) - names
        if unknown:
            raise KeyError(f"{cls.__name__}: unknown memory fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**{n: state.get(n) for n in names})
