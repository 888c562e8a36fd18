"""What each rank saves in its checkpoint file beside DeepSpeed's state: a mapping of objects that
save and load themselves (torchtitan's checkpointer shape), so a family's extra state is one more
entry of ``Run.rank_state()``.

    {"streams": StreamCursors(streams), "memory": StreamMemory(...), "rng": Generators(...)}

Saving writes ``{name: entry.state_dict()}`` into ``rank{r}.pt``. Resuming hands each entry a
``Saved``: this rank's own state (None for a rank the saved run did not have) and, on another
layout (elastic), that entry from every saved rank, so state keyed by stream id is reassigned.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from pipeline.data.streams import merge_states
from pipeline.runtime import checkpoint as ckpt


@dataclasses.dataclass
class Saved:
    own: Optional[Any]       # this rank's saved state; None: the rank did not exist
    ranks: list[Any]         # every saved rank's state when elastic, else [own]
    elastic: bool            # saved with another world size or micro-batch layout


class RankState(Protocol):
    def state_dict(self) -> Any: ...

    def load_saved(self, saved: Saved) -> None: ...


class StreamCursors:
    """Stream offsets and epochs by stream id (pipeline.data.streams)."""

    def __init__(self, streams):
        self.streams = streams

    def state_dict(self) -> dict:
        return self.streams.state_dict()

    def load_saved(self, saved: Saved) -> None:
        self.streams.load_state_dict(merge_states(saved.ranks) if saved.elastic else saved.own)


class StreamMemory:
    """Every micro-batch's memory rows, saved by stream id and picked by stream id on resume."""

    def __init__(self, get: Callable[[], list], put: Callable[[list], None], micro_ids: Sequence[Sequence[int]],
                 memory_cls: type, device: torch.device, dtype: torch.dtype):
        self.get, self.put, self.micro_ids = get, put, micro_ids
        self.memory_cls, self.device, self.dtype = memory_cls, device, dtype

    def state_dict(self) -> dict:
        return ckpt.memory_rows(self.get(), self.micro_ids)

    def load_saved(self, saved: Saved) -> None:
        self.put([ckpt.select_memory(saved.ranks, list(ids), self.memory_cls, device=self.device, dtype=self.dtype)
                  for ids in self.micro_ids])


class Generators:
    """python, numpy, torch (and CUDA) generators; a rank that did not exist gets ``fresh()``."""

    def __init__(self, fresh: Callable[[], None]):
        self.fresh = fresh

    def state_dict(self) -> dict:
        return ckpt.rng_state()

    def load_saved(self, saved: Saved) -> None:
        if saved.own is not None:
            ckpt.set_rng_state(saved.own)
        else:
            self.fresh()


def save_states(entries: dict[str, RankState], rank: int) -> dict:
    return {"rank": rank, **{name: entry.state_dict() for name, entry in entries.items()}}


def load_states(entries: dict[str, RankState], files: Sequence[dict], own: Optional[dict], elastic: bool,
                where: str) -> None:
    """Hand each entry its part of the saved rank files (``where`` names the checkpoint in errors)."""
    for name, entry in entries.items():
        lacking = [f.get("rank", i) for i, f in enumerate(files) if name not in f]
        if lacking:
            raise ckpt.CheckpointError(f"{where}: the rank files of ranks {lacking} hold no {name!r} state "
                                       f"(saved by another model family or version); start a new train.output")
        entry.load_saved(Saved(own=None if own is None else own[name], ranks=[f[name] for f in files],
                               elastic=elastic))
