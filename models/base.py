"""The one interface every model family implements (DESIGN.md contract 3)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from models.memory import Memory


@dataclasses.dataclass
class ModelOutput:
    """What ``model(input_ids, targets=None, memory=None)`` returns.

    loss:     mean NLL over all targets (scalar); None without targets.
    nll:      per-token NLL ``[batch, tgt_len]`` in input order; None without targets.
    memory:   the new memory, detached, one row per batch element.
    aux_loss: the family's auxiliary losses, already weighted by its own rule (scalar);
              None when the family has none or in eval mode. Training minimises
              ``loss + aux_loss`` (see ``objective``).
    logprobs: ``[batch, tgt_len, n_token]`` log-probabilities, only when asked for
              with ``return_logprobs=True`` (generation, export checks).
    """

    loss: Optional[Tensor]
    nll: Optional[Tensor]
    memory: Memory
    aux_loss: Optional[Tensor] = None
    logprobs: Optional[Tensor] = None

    @property
    def objective(self) -> Tensor:
        if self.loss is None:
            raise ValueError("objective needs targets")
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


class LanguageModel(nn.Module):
    """Base class for model families: fixes the call signature and progress hook."""

    def init_memory(self, batch_size: int, device=None) -> Memory:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_progress(self, fraction: float) -> None:
        """Fraction of training done, in [0, 1]; families with schedules (Al-Rfou's
        intermediate losses) read it, the others ignore it."""
        self.progress = float(fraction)

    def forward(  # pragma: no cover - abstract
        self,
        input_ids: Tensor,
        targets: Optional[Tensor] = None,
        memory: Optional[Memory] = None,
        *,
        return_logprobs: bool = False,
    ) -> ModelOutput:
        raise NotImplementedError
