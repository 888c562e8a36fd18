"""The family seam: everything the pipeline may ask of a model family (docs/architecture.md, contract 3).

The pipeline never probes a model with ``hasattr`` or compares family names: what differs per
family is a method or class attribute here, and each family answers it in its own terms (or with
a clear error for a setting it does not have). torchtitan's ``TrainSpec`` is the model for this.

Evaluation lengths (the names of :data:`LENGTHS`):
  ``tgt_len``      tokens per forward (the segment);
  ``mem_len``      how much memory is kept between forwards;
  ``clamp_len``    relative distances clamped at this value (-1: none);
  ``same_length``  every query sees the same number of keys;
  ``cmem_len``     how many compressed memory rows are kept (the Compressive Transformer).
A family lists the ones it has in ``length_names``; ``eval_lengths(...)`` sets them for a block and
restores them afterwards, also on error.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar, Iterator, Optional

from torch import Tensor, nn

from models.diagnostics import AttentionMass
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


LENGTHS = ("tgt_len", "mem_len", "clamp_len", "same_length", "cmem_len")


class LanguageModel(nn.Module):
    """Base class of every family: ``model(input_ids, targets=None, memory=None) -> ModelOutput``.

    Class attributes a family sets:
      family          its registry name (``model.family`` in configs);
      length_names    the evaluation lengths it has (a subset of :data:`LENGTHS`);
      suffix_targets  True when ``targets`` may be shorter than the input and then score only
                      the last positions (a window scored at its last token costs one softmax);
                      False when every input position takes a target;
      caches_hidden   True when memory holds computed hidden states, so a cached evaluation
                      skips recomputation (the speed comparison with sliding windows needs it).
      training_only   prefixes of state-dict keys only training uses (auxiliary heads, decoders):
                      left out of exports, not required when one is loaded.
    """

    family: ClassVar[str] = ""
    length_names: ClassVar[tuple[str, ...]] = ()
    suffix_targets: ClassVar[bool] = False
    caches_hidden: ClassVar[bool] = False
    training_only: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse a ``ModelConfig`` this family cannot build, naming ``model.<key>``, the value and
        the allowed range (ValueError). Families add their own rules to these shared ones."""
        ranges = {"n_token": (0, None), "n_layer": (1, None), "d_model": (1, None), "n_head": (1, None),
                  "d_head": (1, None), "d_inner": (1, None), "d_embed": (0, None), "tgt_len": (1, None),
                  "mem_len": (0, None), "ext_len": (0, None), "clamp_len": (-1, None), "div_val": (1, None)}
        for name, (lo, _) in ranges.items():
            if getattr(cfg, name) < lo:
                raise ValueError(f"model.{name}={getattr(cfg, name)} is out of range: it must be >= {lo}")
        for name in ("dropout", "dropatt"):
            if not 0.0 <= getattr(cfg, name) < 1.0:
                raise ValueError(f"model.{name}={getattr(cfg, name)} is out of range: it must be in [0, 1)")
        for name in ("init_std", "init_range", "proj_init_std"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"model.{name}={getattr(cfg, name)} is out of range: it must be > 0")
        cut = list(cfg.cutoffs)
        if cut and (cut != sorted(set(cut)) or cut[0] <= 0 or (cfg.n_token and cut[-1] >= cfg.n_token)):
            raise ValueError(f"model.cutoffs={cut} must increase strictly within (0, n_token"
                             f"{'=' + str(cfg.n_token) if cfg.n_token else ''})")

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
        doc_start: Optional[Tensor] = None,
        return_logprobs: bool = False,
    ) -> ModelOutput:
        """``doc_start [B, q]`` (bool): True where an input token opens a document; no token then
        sees anything before the latest start, in the segment or in memory (models/documents.py)."""
        raise NotImplementedError

    # -- evaluation lengths ----------------------------------------------------------------
    def lengths(self) -> dict:  # pragma: no cover - abstract
        """The current value of every name in ``length_names``."""
        raise NotImplementedError

    def set_lengths(self, **values) -> None:  # pragma: no cover - abstract
        """Set some of ``length_names`` (validated in the family's own terms)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def eval_lengths(self, **values) -> Iterator[None]:
        """Set evaluation lengths for a block (None keeps a value); restored on exit, also on error."""
        wanted = {k: v for k, v in values.items() if v is not None}
        unknown = [k for k in wanted if k not in LENGTHS]
        if unknown:
            raise TypeError(f"eval_lengths: unknown setting(s) {unknown}; the settings are {list(LENGTHS)}")
        lacking = [k for k in wanted if k not in self.length_names]
        if lacking:
            have = ", ".join(self.length_names) or "none"
            raise ValueError(f"the {self.family} family has no {', '.join(lacking)} to set for evaluation "
                             f"(its settings: {have})")
        saved = self.lengths()
        try:
            self.set_lengths(**wanted)
            yield
        finally:
            self.set_lengths(**saved)

    def resolve_eval_lengths(self, tgt_len: int, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                             same_length: Optional[bool] = None,
                             cmem_len: Optional[int] = None) -> dict:  # pragma: no cover - abstract
        """The lengths an evaluation of ``tgt_len``-token segments runs with, from the requested
        values (None: the family's default for that segment length, see ``eval_mem_len``).
        Returns ``{name: value}`` for every name in ``length_names`` (plus informational keys);
        an impossible request raises ValueError naming the setting."""
        raise NotImplementedError

    def refuse_lengths(self, **values) -> None:
        """ValueError for any of ``values`` that is set but not one of this family's lengths."""
        for name, value in values.items():
            if value is not None and name not in self.length_names:
                raise ValueError(f"{name}={value}: the {self.family} family has no {name}; leave it unset")

    def eval_mem_len(self, tgt_len: int) -> int:  # pragma: no cover - abstract
        """The memory that keeps training's attention span when segments are ``tgt_len`` long."""
        raise NotImplementedError

    def window_lengths(self, context: int, clamp_len: Optional[int] = None) -> dict:  # pragma: no cover
        """Lengths under which one forward of ``context`` tokens from empty memory sees exactly
        those tokens (RECL's windows, the sliding-window baseline)."""
        raise NotImplementedError

    def max_context(self) -> Optional[int]:
        """The most tokens one forward from empty memory can take (a fixed window), or None."""
        return None

    def generation_lengths(self, mem_len: int = 0, clamp_len: Optional[int] = None) -> tuple[int, dict]:
        """``(segment, lengths)`` for feeding a prompt and sampling: the most tokens one forward
        takes, and the lengths to run under (``mem_len`` 0: the family's own)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- diagnostics -----------------------------------------------------------------------
    @contextlib.contextmanager
    def record_attention(self, n_buckets: int = 6) -> Iterator[Optional[AttentionMass]]:
        """Collect where attention goes (models/diagnostics.py) over the forwards of a block;
        yields None for a family without attention over a memory."""
        yield None

    # -- export ----------------------------------------------------------------------------
    def export_config(self, section: dict) -> dict:
        """The ``model`` config section an export stores to rebuild this model with no other file
        (a family built from pretrained weights elsewhere says how to build its shape alone)."""
        return section

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The weights inference needs: everything but the ``training_only`` parts."""
        return {k: v for k, v in self.state_dict().items() if not self._training_only(k)}

    def _training_only(self, key: str) -> bool:
        return bool(self.training_only) and key.startswith(self.training_only)

    def load_inference_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load what ``inference_state_dict`` gave; a missing (not training-only) or unexpected
        key raises KeyError."""
        result = self.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not self._training_only(k)]
        if missing or result.unexpected_keys:
            raise KeyError(f"does not fit the {self.family} model built from its config: missing "
                           f"{missing[:8]}, unexpected {result.unexpected_keys[:8]}")


class SegmentMemoryLengths:
    """``lengths`` / ``set_lengths`` for a family whose only lengths are ``tgt_len`` and ``mem_len``
    (GPT-2 with long-term memory, the LSTM), held as attributes of those names."""

    tgt_len: int
    mem_len: int

    def lengths(self) -> dict:
        return {"tgt_len": self.tgt_len, "mem_len": self.mem_len}

    def set_lengths(self, tgt_len: Optional[int] = None, mem_len: Optional[int] = None) -> None:
        tgt = self.tgt_len if tgt_len is None else int(tgt_len)
        mem = self.mem_len if mem_len is None else int(mem_len)
        if tgt < 1 or mem < 0:
            raise ValueError(f"tgt_len={tgt} must be >= 1 and mem_len={mem} >= 0")
        self.tgt_len, self.mem_len = tgt, mem


def span_keeping_mem_len(mem_len: int, tgt_len: int, eval_tgt_len: int) -> int:
    """Memory that keeps the training attention span ``mem_len + tgt_len`` at segments of
    ``eval_tgt_len`` (the Transformer-XL reference's rule; without memory nothing to extend):
    enwik8 base, mem 512 / tgt 512 evaluated at 128 keeps 896."""
    return max(mem_len + tgt_len - eval_tgt_len, 0) if mem_len > 0 else 0
