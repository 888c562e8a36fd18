"""Transformer-XL (Dai et al. 2019): segment recurrence + relative positional attention.

``out = model(input_ids, targets, memory)`` processes one segment ``[B, q]`` per stream,
attending to the cached hidden states of earlier segments (``TXLMemory``), and returns the
new memory. The paper's ablations are config choices of the same model: ``attn_type``
"relative" (the full model), "shaw" (learned relative embeddings) and "absolute" (Vaswani
sinusoid added to the input); ``mem_len=0`` turns recurrence off.

Semantics follow the authors' PyTorch code unless noted: empty initial memory, exactly
``n_layer`` memory slots holding each layer's *input*, ``ext_len`` as intended by the
reference (its ``_update_mems`` call swaps two arguments; harmless only at ext_len=0),
``same_length`` with the reference's key count by default (``same_length_keys``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from models import documents
from models.base import LanguageModel, ModelOutput, span_keeping_mem_len
from models.diagnostics import AttentionMass
from models.memory import Memory
from models.modules.adaptive import AdaptiveEmbedding, ProjectedAdaptiveLogSoftmax, score, tie_adaptive
from models.modules.attention import (
    AbsoluteAttention,
    RelLearnableAttention,
    RelPartialLearnableAttention,
    additive_mask,
    causal_mask,
    same_length_window,
)
from models.modules.dropout import Dropout
from models.modules.layers import PositionwiseFF
from models.modules.positions import relative_distances, sinusoid

if TYPE_CHECKING:          # models.config nests the family configs, so it imports the family files
    from models.config import ModelConfig


@dataclasses.dataclass
class TXLMemory(Memory):
    """hidden: ``[batch, n_layer, mlen, d_model]``; slot l holds the inputs of layer l for the
    last ``mlen`` positions, oldest first. ``mlen`` may be 0 (empty memory)."""

    hidden: Optional[Tensor] = None

    @property
    def mlen(self) -> int:
        return 0 if self.hidden is None else self.hidden.size(2)


class TXLLayer(nn.Module):
    """Attention over [memory; segment] followed by the position-wise feed-forward block."""

    def __init__(self, cfg: ModelConfig, max_klen: int):
        super().__init__()
        self.attn_type = cfg.attn_type
        args = (cfg.d_model, cfg.n_head, cfg.d_head, cfg.dropout, cfg.dropatt)
        if cfg.attn_type == "relative":
            self.dec_attn = RelPartialLearnableAttention(*args, pre_lnorm=cfg.pre_lnorm, own_bias=cfg.untie_r)
        elif cfg.attn_type == "shaw":
            self.dec_attn = RelLearnableAttention(*args, max_klen=max_klen, pre_lnorm=cfg.pre_lnorm)
        else:
            self.dec_attn = AbsoluteAttention(*args, pre_lnorm=cfg.pre_lnorm)
        self.pos_ff = PositionwiseFF(cfg.d_model, cfg.d_inner, cfg.dropout, pre_lnorm=cfg.pre_lnorm)
        self.pos_ff.drop = Dropout(cfg.dropout)  # same dropout, cheaper mask on CPU (models/modules/dropout.py)

    def forward(self, h: Tensor, mem: Optional[Tensor], pos: Optional[Tensor], mask: Tensor,
                r_w_bias: Optional[Tensor], r_r_bias: Optional[Tensor], extra: Optional[Callable] = None) -> Tensor:
        """``extra(q)`` (relative attention only): a term added to the attention's output projection."""
        if self.attn_type == "relative":
            h = self.dec_attn(h, mem, pos, mask, r_w_bias, r_r_bias, extra)
        elif self.attn_type == "shaw":
            h = self.dec_attn(h, mem, pos, mask)
        else:
            h = self.dec_attn(h, mem, mask)
        return self.pos_ff(h)


def _check_config(cfg: ModelConfig) -> None:
    if cfg.attn_type == "learned":
        raise ValueError("model.attn_type='learned' (Al-Rfou per-layer absolute) is the 'vanilla' family; "
                         "set model.family=vanilla or choose attn_type relative|shaw|absolute")
    if cfg.attn_type not in ("relative", "shaw", "absolute"):
        raise ValueError(f"model.attn_type={cfg.attn_type!r}: choose relative, shaw or absolute")
    if cfg.attn_type == "absolute" and cfg.d_model % 2:
        raise ValueError(f"model.d_model={cfg.d_model} must be even for the sinusoid encoding")
    n_clusters = len(cfg.cutoffs)
    if cfg.tie_projs and len(cfg.tie_projs) != n_clusters + 1:
        raise ValueError(f"model.tie_projs={cfg.tie_projs} needs one entry per cluster, "
                         f"{n_clusters + 1} for cutoffs={cfg.cutoffs} (or [] for none)")
    same_length_window(cfg.mem_len, cfg.same_length_keys)  # validates the convention name


def check_relative_recurrence(cfg: ModelConfig) -> None:
    """What a family built on Transformer-XL's memory needs: relative attention, no ext_len."""
    if cfg.attn_type != "relative":
        raise ValueError(f"model.attn_type={cfg.attn_type!r}: the {cfg.family} family uses Transformer-XL's "
                         f"relative attention; set model.attn_type=relative")
    if cfg.ext_len:
        raise ValueError(f"model.ext_len={cfg.ext_len}: the {cfg.family} family has no extended context; set 0")


class TransformerXL(LanguageModel):
    family = "transformer_xl"
    length_names = ("tgt_len", "mem_len", "clamp_len", "same_length")
    suffix_targets = True        # fewer targets than inputs score the last positions
    caches_hidden = True         # memory holds every layer's input: no recomputation

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        _check_config(cfg)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg = cfg
        self.n_token, self.n_layer, self.d_model = cfg.n_token, cfg.n_layer, cfg.d_model
        self.attn_type = cfg.attn_type
        d_embed = cfg.d_embed or cfg.d_model

        self.word_emb = AdaptiveEmbedding(cfg.n_token, d_embed, cfg.d_model, cfg.cutoffs, cfg.div_val)
        self.drop = Dropout(cfg.dropout)
        max_klen = cfg.tgt_len + cfg.ext_len + cfg.mem_len
        self.layers = nn.ModuleList(TXLLayer(cfg, max_klen) for _ in range(cfg.n_layer))
        if cfg.attn_type == "relative" and not cfg.untie_r:
            # u and v shared by all layers (reference PyTorch); untie_r puts them in each layer.
            self.r_w_bias = nn.Parameter(torch.empty(cfg.n_head, cfg.d_head))
            self.r_r_bias = nn.Parameter(torch.empty(cfg.n_head, cfg.d_head))
        else:
            self.r_w_bias = self.r_r_bias = None
        self.crit = ProjectedAdaptiveLogSoftmax(cfg.n_token, d_embed, cfg.d_model, cfg.cutoffs, cfg.div_val)
        self._tie(cfg)

        # Settable after construction (evaluation uses longer memory, clamp_len, same_length).
        self.reset_length(cfg.tgt_len, cfg.ext_len, cfg.mem_len)
        self.clamp_len = cfg.clamp_len
        self.same_length = cfg.same_length
        self.same_length_keys = cfg.same_length_keys
        self._masks: dict = {}
        self._attention_mass: Optional[AttentionMass] = None
        self.init_weights()

    # -- construction ---------------------------------------------------------------------
    def _tie(self, cfg: ModelConfig) -> None:
        tie_adaptive(self.word_emb, self.crit, cfg.tie_weight, cfg.tie_projs, cfg.div_val)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference's init: N(0, init_std) (or U(±init_range)) for weights, embeddings,
        cluster weights, u/v and r_emb; N(0, proj_init_std) for adaptive projections;
        LayerNorm weight N(1, init_std); biases 0. Embeddings last, so tying cannot
        leave them with another module's init."""
        cfg = self.cfg

        def weight(t: Tensor) -> None:
            if cfg.init == "uniform":
                t.uniform_(-cfg.init_range, cfg.init_range)
            else:
                t.normal_(0.0, cfg.init_std)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                weight(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                weight(m.weight)
            elif hasattr(m, "normalized_shape"):  # torch or apex LayerNorm
                m.weight.normal_(1.0, cfg.init_std)
                m.bias.zero_()
            elif isinstance(m, ProjectedAdaptiveLogSoftmax):
                if m.n_clusters:
                    weight(m.cluster_weight)
                    m.cluster_bias.zero_()
                for p in m.out_projs:
                    p.normal_(0.0, cfg.proj_init_std)
            elif isinstance(m, RelPartialLearnableAttention) and m.r_w_bias is not None:
                weight(m.r_w_bias)
                weight(m.r_r_bias)
            elif isinstance(m, RelLearnableAttention):
                weight(m.r_emb)
                weight(m.r_w_bias)
                m.r_bias.zero_()
        if self.r_w_bias is not None:
            weight(self.r_w_bias)
            weight(self.r_r_bias)
        for emb in self.word_emb.emb_layers:
            weight(emb.weight)
        for p in self.word_emb.emb_projs:
            p.normal_(0.0, cfg.proj_init_std)

    # -- lengths and memory ---------------------------------------------------------------
    def reset_length(self, tgt_len: int, ext_len: int, mem_len: int) -> None:
        """Segment, extended-context and memory lengths; evaluation typically uses a shorter
        tgt_len and a longer mem_len than training."""
        if min(tgt_len, ext_len, mem_len) < 0:
            raise ValueError(f"reset_length: lengths must be >= 0, got tgt_len={tgt_len} ext_len={ext_len} "
                             f"mem_len={mem_len}")
        self.tgt_len, self.ext_len, self.mem_len = tgt_len, ext_len, mem_len

    def lengths(self) -> dict:
        return {"tgt_len": self.tgt_len, "mem_len": self.mem_len, "clamp_len": self.clamp_len,
                "same_length": self.same_length}

    def set_lengths(self, tgt_len: Optional[int] = None, mem_len: Optional[int] = None,
                    clamp_len: Optional[int] = None, same_length: Optional[bool] = None) -> None:
        if tgt_len is not None or mem_len is not None:
            self.reset_length(self.tgt_len if tgt_len is None else int(tgt_len), self.ext_len,
                              self.mem_len if mem_len is None else int(mem_len))
        if clamp_len is not None:
            self.clamp_len = int(clamp_len)
        if same_length is not None:
            self.same_length = bool(same_length)

    def eval_mem_len(self, tgt_len: int) -> int:
        return span_keeping_mem_len(self.cfg.mem_len, self.cfg.tgt_len, tgt_len)

    def resolve_eval_lengths(self, tgt_len: int, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                             same_length: Optional[bool] = None, cmem_len: Optional[int] = None) -> dict:
        self.refuse_lengths(cmem_len=cmem_len)
        if tgt_len < 1:
            raise ValueError(f"tgt_len={tgt_len} must be >= 1")
        mem = self.eval_mem_len(tgt_len) if mem_len is None else mem_len
        if mem < 0:
            raise ValueError(f"mem_len={mem} must be >= 0 (or -1 for the training attention span)")
        same = self.cfg.same_length if same_length is None else same_length
        # same_length equalises how much memory each query sees; without memory it has no meaning
        # (the mask refuses it), so a mem_len=0 evaluation ("no memory") runs plain causal segments.
        return {"tgt_len": tgt_len, "mem_len": mem, "clamp_len": self.cfg.clamp_len if clamp_len is None else clamp_len,
                "same_length": bool(same) and mem > 0, "same_length_keys": self.same_length_keys}

    def window_lengths(self, context: int, clamp_len: Optional[int] = None) -> dict:
        # A window of exactly `context` tokens: no memory kept, nothing to equalise.
        out = {"tgt_len": context, "mem_len": 0, "same_length": False}
        if clamp_len is not None:
            out["clamp_len"] = clamp_len
        return out

    def generation_lengths(self, mem_len: int = 0, clamp_len: Optional[int] = None) -> tuple[int, dict]:
        # One token at a time after the prompt; same_length would cut the memory a token sees.
        out = {"mem_len": mem_len or self.mem_len, "same_length": False}
        if clamp_len is not None:
            out["clamp_len"] = clamp_len
        return self.tgt_len, out

    def init_memory(self, batch_size: int, device=None) -> TXLMemory:
        """Empty memory (length 0), the reference PyTorch convention."""
        p = next(self.parameters())
        return TXLMemory(hidden=p.new_zeros(batch_size, self.n_layer, 0, self.d_model,
                                            device=device if device is not None else p.device))

    def _memory_tensor(self, memory: Optional[Memory], batch: int) -> Optional[Tensor]:
        if memory is None:
            return None
        if not isinstance(memory, TXLMemory):
            raise TypeError(f"TransformerXL expects TXLMemory, got {type(memory).__name__}")
        mem = memory.hidden
        if mem is None or mem.size(2) == 0:
            return None
        want = (batch, self.n_layer, "mlen", self.d_model)
        if mem.dim() != 4 or mem.size(0) != batch or mem.size(1) != self.n_layer or mem.size(3) != self.d_model:
            raise ValueError(f"memory.hidden has shape {tuple(mem.shape)}, expected {want}")
        return mem

    @torch.no_grad()
    def _update_memory(self, hids: list[Tensor], mem: Optional[Tensor], qlen: int, mlen: int) -> TXLMemory:
        """``cat[mem, hids][beg:end]`` along time: the last ``ext_len`` positions are left out
        (they come back as the next input's prefix) and at most ``mem_len`` are kept."""
        batch = hids[0].size(0)
        end = mlen + max(0, qlen - self.ext_len)
        beg = max(0, end - self.mem_len)
        parts = []
        if mem is not None and beg < mlen:
            parts.append(mem[:, :, beg:mlen])
        lo, hi = max(beg - mlen, 0), end - mlen
        if hi > lo:
            parts.append(torch.stack([h[:, lo:hi] for h in hids], dim=1))
        if not parts:
            new = hids[0].new_zeros(batch, self.n_layer, 0, self.d_model)
        else:
            # Always a fresh tensor: a view would keep the previous memory's storage alive.
            new = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].contiguous()
        return TXLMemory(hidden=new.detach())

    def memory_span(self) -> int:
        """Memory rows a query sees at most (same_length gives every query this many keys)."""
        return self.mem_len

    def _mask(self, qlen: int, mlen: int, device, dtype) -> Tensor:
        """Additive ``[qlen, mlen+qlen]`` mask, cached per shape (built without a host sync)."""
        window = same_length_window(self.memory_span(), self.same_length_keys) if self.same_length else None
        if window is not None and window < 1:
            raise ValueError("same_length needs mem_len > 0 (each query would see no key)")
        key = (qlen, mlen, window, str(device), dtype)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= 64:
                self._masks.clear()
            mask = self._masks[key] = additive_mask(causal_mask(qlen, mlen, window, device), dtype)
        return mask

    # -- diagnostics ----------------------------------------------------------------------
    memory_regions: tuple[str, ...] = ("memory", "segment")

    @contextlib.contextmanager
    def record_attention(self, n_buckets: int = 6) -> Iterator[AttentionMass]:
        mass = AttentionMass(self.memory_regions, self.n_layer, n_buckets)
        saved = self._attention_mass
        self._attention_mass = mass
        try:
            yield mass
        finally:
            self._attention_mass = saved
            for layer in self.layers:
                layer.dec_attn.keep_probs = self._keep_probs()

    def _keep_probs(self) -> bool:
        """Whether the layers must leave their attention probabilities for this forward."""
        return self._attention_mass is not None

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None, memory: Optional[Memory] = None,
                *, doc_start: Optional[Tensor] = None, return_logprobs: bool = False) -> ModelOutput:
        """input_ids ``[B, q]``; targets ``[B, T]`` with T <= q predict the last T positions
        (T < q only with an ext_len prefix); memory from ``init_memory`` or a previous call;
        ``doc_start [B, q]``: document starts (models/documents.py)."""
        batch, qlen = self._check_inputs(input_ids, targets)
        mem = self._memory_tensor(memory, batch)
        mlen = 0 if mem is None else mem.size(2)
        h = self._embed(input_ids)
        if mem is not None and mem.dtype != h.dtype:
            mem = mem.to(h.dtype)  # e.g. fp32 memory restored into a bf16 model
        pos, mask = self._positions(qlen, mlen, h)
        docs = self._documents(doc_start, memory, batch, qlen, h.device)
        if docs is not None:
            mask = documents.floor_mask(mask, documents.key_floor(docs[0], docs[1], mlen))
        mems = [None if mem is None else mem[:, i] for i in range(self.n_layer)]
        h, hids, _ = self._layers(h, mems, pos, mask, (mlen, qlen))
        new_memory = self._with_doc_len(self._update_memory(hids, mem, qlen, mlen), docs)
        return self._predict(h, targets, return_logprobs, new_memory)

    def _documents(self, doc_start: Optional[Tensor], memory: Optional[Memory], batch: int, qlen: int,
                   device) -> Optional[tuple[Tensor, Tensor]]:
        """``(last_start [B, q], doc_len [B])`` when documents are tracked (a ``doc_start`` given now
        or a ``doc_len`` in memory), else None (models/documents.py)."""
        prior = None if memory is None else memory.doc_len
        if (doc_start is not None or prior is not None) and self.ext_len:
            raise ValueError(f"document starts need ext_len=0 (model.ext_len={self.ext_len}): the extended "
                             f"context is re-fed as input, so memory would count it twice")
        return documents.track(doc_start, prior, batch, qlen, device)

    @staticmethod
    def _with_doc_len(memory: Memory, docs: Optional[tuple[Tensor, Tensor]]) -> Memory:
        if docs is not None:
            memory.doc_len = documents.next_doc_len(*docs)
        return memory

    def _check_inputs(self, input_ids: Tensor, targets: Optional[Tensor]) -> tuple[int, int]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tgt_len], got shape {tuple(input_ids.shape)}")
        batch, qlen = input_ids.shape
        if targets is not None and (targets.dim() != 2 or targets.size(0) != batch or targets.size(1) > qlen):
            raise ValueError(f"targets shape {tuple(targets.shape)} does not fit input_ids {tuple(input_ids.shape)}")
        _check_ids("input_ids", input_ids, self.n_token)
        if targets is not None:
            _check_ids("targets", targets, self.n_token)
        return batch, qlen

    def _embed(self, input_ids: Tensor) -> Tensor:
        h = self.word_emb(input_ids)
        if self.attn_type == "absolute":
            # Vaswani sinusoid on the segment, positions counted back from its end (reference);
            # memory keeps the encodings it was computed with (the paper's §3.3 formulation).
            qlen = input_ids.size(1)
            pos = torch.arange(qlen - 1, -1, -1, device=h.device, dtype=torch.float32)
            if self.clamp_len > 0:
                pos = pos.clamp(max=self.clamp_len)
            h = h + sinusoid(pos, self.d_model).to(h.dtype)
        return self.drop(h)

    def _positions(self, qlen: int, mlen: int, h: Tensor) -> tuple[Optional[Tensor], Tensor]:
        """Relative position terms over ``mlen`` memory rows and the segment, and the mask."""
        klen = mlen + qlen
        pos = None
        if self.attn_type == "relative":
            dist = relative_distances(klen, self.clamp_len, device=h.device)
            pos = self.drop(sinusoid(dist, self.d_model).to(h.dtype))
        elif self.attn_type == "shaw":
            pos = relative_distances(klen, self.clamp_len, device=h.device)
        return pos, self._mask(qlen, mlen, h.device, h.dtype)

    def _layers(self, h: Tensor, mems: list[Optional[Tensor]], pos: Optional[Tensor], mask: Tensor,
                regions: tuple[int, ...], extra: Optional[Callable[[int], Optional[Callable]]] = None,
                ) -> tuple[Tensor, list[Tensor], list[Optional[Tensor]]]:
        """Every layer over its memory; returns the output, each layer's input and (when kept)
        each layer's attention probabilities. ``regions``: key rows per ``memory_regions``;
        ``extra(i)``: None or layer i's ``extra(q)`` (see TXLLayer)."""
        keep = self._keep_probs()
        hids, probs = [], []
        for i, layer in enumerate(self.layers):
            hids.append(h)
            layer.dec_attn.keep_probs = keep
            h = layer(h, mems[i], pos, mask, self.r_w_bias, self.r_r_bias, None if extra is None else extra(i))
            p = layer.dec_attn.take_probs() if keep else None
            if p is not None and self._attention_mass is not None:
                self._attention_mass.add(i, p, regions)
            probs.append(p)
        return self.drop(h), hids, probs

    def _predict(self, h: Tensor, targets: Optional[Tensor], return_logprobs: bool, memory: Memory,
                 aux_loss: Optional[Tensor] = None) -> ModelOutput:
        loss, nll, logprobs = score(self.crit, h, targets, return_logprobs, self.n_token)
        return ModelOutput(loss=loss, nll=nll, memory=memory, aux_loss=aux_loss, logprobs=logprobs)


def _check_ids(name: str, ids: Tensor, n_token: int) -> None:
    """Token ids must lie in [0, n_token). On CPU the error names the bad value; on an
    accelerator the check is asynchronous (no host sync) and fails at a later kernel."""
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be an integer tensor (LongTensor), got {ids.dtype}")
    if ids.numel() == 0:
        return
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():   # (traced: the async check, no break)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= n_token:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds token id {bad}, outside [0, n_token={n_token})")
    elif ids.device.type != "meta":
        torch._assert_async(((ids >= 0) & (ids < n_token)).all(), f"{name}: token id outside [0, n_token={n_token})")
