"""An LSTM language model (``model.family: lstm``): the recurrent baseline the memory transformers are
compared with, trained by truncated backpropagation through time.

Embedding (``model.d_embed``, adaptive input with ``model.cutoffs`` / ``div_val``) → dropout →
``n_layer`` LSTM layers of ``d_model`` units (dropout between them; ``model.lstm.proj_size`` > 0:
LSTM with a projection, Sak et al. 2014) → dropout → the (adaptive) softmax, tied to the embedding
with ``tie_weight`` / ``tie_projs`` as Transformer-XL's. The state ``(h, c)`` of every layer is the
memory (``LSTMMemory``), carried from segment to segment per stream and saved by stream id like
every family's; gradients stop at the segment boundary (truncated BPTT).

Lengths: ``tgt_len`` (tokens per forward) and ``mem_len``: 0 resets the state every forward (no
memory), any other value carries it (a fixed-size state has no length). Document starts
(models/documents.py) reset a row's state to zero at the start, exactly as if the document ran
alone from an empty state.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from models import documents
from models.base import LanguageModel, ModelOutput, SegmentMemoryLengths
from models.memory import Memory
from models.modules.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax, score, tie_adaptive
from models.modules.dropout import Dropout

if TYPE_CHECKING:
    from models.config import ModelConfig


@dataclasses.dataclass
class LSTMConfig:
    """``model.lstm``."""

    proj_size: int = 0               # > 0: each layer's output projected to this size (LSTMP)


@dataclasses.dataclass
class LSTMMemory(Memory):
    """``h [B, n_layer, d_out]`` and ``c [B, n_layer, d_model]``: every layer's state after the last
    token consumed (batch first, unlike nn.LSTM); 0 layers: empty, the zero state."""

    h: Optional[Tensor] = None
    c: Optional[Tensor] = None


class ResettingLSTM(nn.LSTM):
    """nn.LSTM that zeroes a row's state where ``opens [B, q]`` marks a document start: it runs up to
    each such position, zeroes those rows and goes on (exactly the document alone from an empty
    state). All inside one forward of this module, so ZeRO-3 gathers its weights once whatever the
    number of pieces (a call per piece would issue a rank-dependent number of collectives)."""

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor], opens: Optional[Tensor] = None):
        if opens is None or not bool(opens.any()):       # one host sync per segment with starts
            return super().forward(x, state)
        h, c = state
        cuts = sorted(set(opens.any(0).nonzero().flatten().tolist()) | {0, x.size(1)})
        pieces = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            keep = (~opens[:, a]).to(x.dtype).view(1, -1, 1)
            y, (h, c) = super().forward(x[:, a:b], (h * keep, c * keep))
            pieces.append(y)
        return torch.cat(pieces, dim=1), (h, c)


class LSTMLM(SegmentMemoryLengths, LanguageModel):
    family = "lstm"
    length_names = ("tgt_len", "mem_len")
    suffix_targets = True            # fewer targets than inputs score the last positions
    caches_hidden = True             # the state is computed once, never recomputed

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        p = cfg.lstm.proj_size
        if not 0 <= p < cfg.d_model:
            raise ValueError(f"model.lstm.proj_size={p} is out of range: it must be in [0, d_model={cfg.d_model})")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.n_token, self.n_layer, self.d_model = cfg.n_token, cfg.n_layer, cfg.d_model
        self.d_out = cfg.lstm.proj_size or cfg.d_model
        d_embed = cfg.d_embed or self.d_out
        self.word_emb = AdaptiveEmbedding(cfg.n_token, d_embed, d_embed, cfg.cutoffs, cfg.div_val)
        self.drop_in, self.drop_out = Dropout(cfg.dropout), Dropout(cfg.dropout)
        self.rnn = ResettingLSTM(d_embed, cfg.d_model, num_layers=cfg.n_layer, batch_first=True,
                                 dropout=cfg.dropout if cfg.n_layer > 1 else 0.0, proj_size=cfg.lstm.proj_size)
        self.crit = ProjectedAdaptiveLogSoftmax(cfg.n_token, d_embed, self.d_out, cfg.cutoffs, cfg.div_val)
        tie_adaptive(self.word_emb, self.crit, cfg.tie_weight, cfg.tie_projs, cfg.div_val)
        self.tgt_len, self.mem_len = cfg.tgt_len, cfg.mem_len
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings and the softmax as Transformer-XL's (N(0, init_std), projections N(0,
        proj_init_std), biases 0); the LSTM's weights U(±1/√d_model) (PyTorch's default, kept)."""
        std = self.cfg.init_std
        for emb in self.word_emb.emb_layers:
            emb.weight.normal_(0.0, std)
        for p in list(self.word_emb.emb_projs) + list(self.crit.out_projs):
            p.normal_(0.0, self.cfg.proj_init_std)
        for out in self.crit.out_layers:
            out.bias.zero_()
            if not self.cfg.tie_weight:
                out.weight.normal_(0.0, std)
        if self.crit.n_clusters:
            self.crit.cluster_weight.normal_(0.0, std)
            self.crit.cluster_bias.zero_()

    # -- lengths --------------------------------------------------------------------------
    def eval_mem_len(self, tgt_len: int) -> int:
        return self.cfg.mem_len          # the state is carried (or not) whatever the segment

    def resolve_eval_lengths(self, tgt_len: int, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                             same_length: Optional[bool] = None, cmem_len: Optional[int] = None) -> dict:
        self.refuse_lengths(clamp_len=clamp_len, same_length=same_length, cmem_len=cmem_len)
        if tgt_len < 1:
            raise ValueError(f"tgt_len={tgt_len} must be >= 1")
        mem = self.eval_mem_len(tgt_len) if mem_len is None else mem_len
        if mem < 0:
            raise ValueError(f"mem_len={mem} must be >= 0 (0: the state is reset every segment)")
        return {"tgt_len": tgt_len, "mem_len": mem, "state": "carried" if mem else "reset"}

    def window_lengths(self, context: int, clamp_len: Optional[int] = None) -> dict:
        return {"tgt_len": context, "mem_len": 0}

    def generation_lengths(self, mem_len: int = 0, clamp_len: Optional[int] = None) -> tuple[int, dict]:
        if clamp_len is not None:
            raise ValueError(f"clamp_len={clamp_len}: the lstm family has no positions; leave it unset")
        return self.tgt_len, {"mem_len": mem_len or max(self.mem_len, 1)}

    # -- memory ---------------------------------------------------------------------------
    def init_memory(self, batch_size: int, device=None) -> LSTMMemory:
        """Empty memory (no layer's state yet: the LSTM starts from zeros)."""
        p = next(self.parameters())
        device = device if device is not None else p.device
        return LSTMMemory(h=p.new_zeros(batch_size, 0, self.d_out, device=device),
                          c=p.new_zeros(batch_size, 0, self.d_model, device=device))

    def _state(self, memory: Optional[Memory], batch: int, dtype, device) -> tuple[Tensor, Tensor]:
        if memory is not None and not isinstance(memory, LSTMMemory):
            raise TypeError(f"LSTMLM expects LSTMMemory, got {type(memory).__name__}")
        if memory is None or memory.h is None or memory.h.size(1) == 0 or self.mem_len == 0:
            return (torch.zeros(self.n_layer, batch, self.d_out, dtype=dtype, device=device),
                    torch.zeros(self.n_layer, batch, self.d_model, dtype=dtype, device=device))
        for name, t, width in (("h", memory.h, self.d_out), ("c", memory.c, self.d_model)):
            if t is None or tuple(t.shape) != (batch, self.n_layer, width):
                raise ValueError(f"memory.{name} has shape {None if t is None else tuple(t.shape)}, expected "
                                 f"({batch}, {self.n_layer}, {width})")
        return (memory.h.transpose(0, 1).to(dtype).contiguous(), memory.c.transpose(0, 1).to(dtype).contiguous())

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None, memory: Optional[Memory] = None,
                *, doc_start: Optional[Tensor] = None, return_logprobs: bool = False) -> ModelOutput:
        batch, q = input_ids.shape
        if targets is not None and (targets.size(0) != batch or targets.size(1) > q):
            raise ValueError(f"targets shape {tuple(targets.shape)} does not fit input_ids {tuple(input_ids.shape)}")
        x = self.drop_in(self.word_emb(input_ids))
        h, c = self._state(memory, batch, x.dtype, x.device)
        docs = documents.track(doc_start, None if memory is None else memory.doc_len, batch, q, x.device)
        y, (h, c) = self.rnn(x, (h, c), None if doc_start is None else doc_start.to(x.device).bool())
        out = self.drop_out(y)
        if self.mem_len == 0:          # no memory: the next forward starts from zeros again
            new = self.init_memory(batch, x.device).to(dtype=x.dtype)
        else:
            new = LSTMMemory(h=h.transpose(0, 1).detach().contiguous(), c=c.transpose(0, 1).detach().contiguous())
        if docs is not None:
            new.doc_len = documents.next_doc_len(*docs)
        loss, nll, logprobs = score(self.crit, out, targets, return_logprobs, self.n_token)
        return ModelOutput(loss=loss, nll=nll, memory=new, logprobs=logprobs)
