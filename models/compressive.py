"""The Compressive Transformer (Rae et al., ICLR 2020): Transformer-XL with a second, compressed memory.

Each layer keeps a FIFO memory of its last ``mem_len`` inputs (as Transformer-XL) and a FIFO
compressed memory of ``cmem_len`` rows. A segment attends over ``[compressed; memory; segment]``
with Transformer-XL's relative attention, distances counted over all three (a compressed row is
one position, as in the labml and lucidrains code); the memories are fully visible, the segment
causal. After the segment, the rows pushed out of the memory are compressed by the layer's own
function f_c at rate c (``ratio``) and appended to the compressed memory, whose oldest rows fall
out. With ``cmem_len: 0`` nothing is compressed and the model is Transformer-XL (same weights).

Choices where the paper leaves the mechanics open (docs/architecture.md, "Compressive"):
- Eviction in whole groups of c: of the rows past ``mem_len`` the largest multiple of c is
  compressed; the remainder (< c rows) stays in memory for the next segment, so every row is
  compressed exactly once and nothing is padded (the memory briefly holds up to mem_len + c - 1).
- Compression functions: ``max_pool`` / ``mean_pool`` (kernel = stride = c), ``conv`` (1-D
  convolution, kernel = stride = c), ``dilated_conv`` (a kernel-3 convolution dilated by c, so each
  row mixes with the same-phase rows of the neighbouring groups, then the stride-c convolution),
  ``most_used`` (the ⌊n/c⌋ evicted rows with the highest accumulated attention, in time order).
- Losses train f_c only (``loss``): ``attention`` — MSE between content-only attention of the
  segment's layer inputs over the evicted rows and over their compression, with the layer's own
  projections and LayerNorm run with their weights detached (``weights_detached``: the modules
  are still called, so ZeRO-3 gathers them; no parameter's ``requires_grad`` ever changes, unlike
  lucidrains' ``detach_``); ``autoencoder`` — MSE of the evicted rows
  decoded back from their compression by a training-only linear decoder. Summed over layers,
  times ``loss_weight``, returned as ``aux_loss`` in training; the memories are stop-gradient,
  so the task loss never reaches f_c. Evaluation computes no compression loss.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import documents
from models.memory import Memory
from models.modules.layers import weights_detached
from models.transformer_xl import TransformerXL, check_relative_recurrence

if TYPE_CHECKING:          # models.config nests CompressiveConfig, so it imports this module
    from models.config import ModelConfig

COMPRESSIONS = ("conv", "dilated_conv", "max_pool", "mean_pool", "most_used")
PARAMETRIC = ("conv", "dilated_conv")
DECODER_PREFIX = "decoders."


@dataclasses.dataclass
class CompressiveConfig:
    """``model.compressive``: the compressed memory (Rae et al. 2020, §3)."""

    cmem_len: int = 0                # compressed rows per layer (0: Transformer-XL)
    ratio: int = 3                   # compression rate c
    compression: Literal["conv", "dilated_conv", "max_pool", "mean_pool", "most_used"] = "conv"
    loss: Literal["attention", "autoencoder", "none"] = "attention"  # none: for parameter-free f_c
    loss_weight: float = 1.0


@dataclasses.dataclass
class CompressiveMemory(Memory):
    """hidden ``[batch, n_layer, mlen, d]`` (oldest first), compressed ``[batch, n_layer, cmlen, d]``,
    usage ``[batch, n_layer, mlen]`` (most_used only: attention each memory row has received,
    summed over the forwards it was a key in, averaged over heads and queries)."""

    hidden: Optional[Tensor] = None
    compressed: Optional[Tensor] = None
    usage: Optional[Tensor] = None

    @property
    def mlen(self) -> int:
        return 0 if self.hidden is None else self.hidden.size(2)

    @property
    def cmlen(self) -> int:
        return 0 if self.compressed is None else self.compressed.size(2)


class Compression(nn.Module):
    """f_c: ``[B, n, d]`` (n a multiple of c) -> ``[B, n / c, d]``."""

    def __init__(self, kind: str, d_model: int, ratio: int):
        super().__init__()
        self.kind, self.ratio = kind, ratio
        if kind in PARAMETRIC:
            self.conv = nn.Conv1d(d_model, d_model, ratio, stride=ratio)
        if kind == "dilated_conv":
            self.dilated = nn.Conv1d(d_model, d_model, 3, dilation=ratio, padding=ratio)

    def forward(self, x: Tensor, usage: Optional[Tensor] = None) -> Tensor:
        c = self.ratio
        if self.kind == "most_used":
            if usage is None:
                raise ValueError("most_used compression needs the rows' usage")
            keep = usage.topk(x.size(1) // c, dim=1).indices.sort(dim=1).values   # time order
            return x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        xt = x.transpose(1, 2)                                                   # [B, d, n]
        if self.kind == "max_pool":
            out = F.max_pool1d(xt, c)
        elif self.kind == "mean_pool":
            out = F.avg_pool1d(xt, c)
        elif self.kind == "conv":
            out = self.conv(xt)
        else:
            out = self.conv(self.dilated(xt))
        return out.transpose(1, 2)


class CompressiveTransformer(TransformerXL):
    family = "compressive"
    length_names = TransformerXL.length_names + ("cmem_len",)
    memory_regions = ("compressed", "memory", "segment")
    training_only = (DECODER_PREFIX,)

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        c = cfg.compressive
        check_relative_recurrence(cfg)
        if c.cmem_len < 0:
            raise ValueError(f"model.compressive.cmem_len={c.cmem_len} is out of range: it must be >= 0")
        if c.ratio < 1:
            raise ValueError(f"model.compressive.ratio={c.ratio} is out of range: it must be >= 1")
        if c.loss_weight < 0:
            raise ValueError(f"model.compressive.loss_weight={c.loss_weight} is out of range: it must be >= 0")
        if c.compression not in COMPRESSIONS:
            raise ValueError(f"model.compressive.compression={c.compression!r}: choose one of {list(COMPRESSIONS)}")
        if c.compression in PARAMETRIC and c.loss == "none":
            raise ValueError(f"model.compressive.loss=none leaves the {c.compression} compression untrained "
                             f"(the memories are stop-gradient); choose loss attention or autoencoder")
        if c.compression not in PARAMETRIC and c.loss != "none":
            raise ValueError(f"model.compressive.loss={c.loss}: {c.compression} has no parameters to train; "
                             f"set model.compressive.loss=none")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        c = cfg.compressive
        self.ratio, self.compression, self.compression_loss = c.ratio, c.compression, c.loss
        self.loss_weight = c.loss_weight
        self.cmem_len = c.cmem_len
        # Built after Transformer-XL's weights (same seed, same weights); PyTorch's default init.
        self.compress = nn.ModuleList(Compression(c.compression, cfg.d_model, c.ratio) for _ in range(cfg.n_layer))
        if c.loss == "autoencoder":
            self.decoders = nn.ModuleList(nn.Linear(cfg.d_model, c.ratio * cfg.d_model) for _ in range(cfg.n_layer))

    # -- lengths --------------------------------------------------------------------------
    def lengths(self) -> dict:
        return super().lengths() | {"cmem_len": self.cmem_len}

    def set_lengths(self, tgt_len: Optional[int] = None, mem_len: Optional[int] = None,
                    clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
                    cmem_len: Optional[int] = None) -> None:
        if cmem_len is not None:
            self._check_cmem_len(int(cmem_len))
        super().set_lengths(tgt_len, mem_len, clamp_len, same_length)
        if cmem_len is not None:
            self.cmem_len = int(cmem_len)

    def _check_cmem_len(self, cmem_len: int) -> None:
        if cmem_len < 0:
            raise ValueError(f"cmem_len={cmem_len} must be >= 0")
        if cmem_len and not self.cfg.compressive.cmem_len and self.compression in PARAMETRIC:
            raise ValueError(f"cmem_len={cmem_len}: this model was trained without compressed memory "
                             f"(model.compressive.cmem_len=0), so its {self.compression} compression is untrained")

    def resolve_eval_lengths(self, tgt_len: int, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                             same_length: Optional[bool] = None, cmem_len: Optional[int] = None) -> dict:
        cmem = self.cfg.compressive.cmem_len if cmem_len is None else cmem_len
        self._check_cmem_len(cmem)
        out = super().resolve_eval_lengths(tgt_len, mem_len, clamp_len, same_length)
        return out | {"cmem_len": cmem, "ratio": self.ratio, "compression": self.compression}

    def window_lengths(self, context: int, clamp_len: Optional[int] = None) -> dict:
        return super().window_lengths(context, clamp_len) | {"cmem_len": 0}

    def memory_span(self) -> int:
        return self.mem_len + self.cmem_len

    # -- memory ---------------------------------------------------------------------------
    def init_memory(self, batch_size: int, device=None) -> CompressiveMemory:
        p = next(self.parameters())
        device = device if device is not None else p.device
        empty = p.new_zeros(batch_size, self.n_layer, 0, self.d_model, device=device)
        usage = p.new_zeros(batch_size, self.n_layer, 0, device=device) if self.compression == "most_used" else None
        return CompressiveMemory(hidden=empty, compressed=empty.clone(), usage=usage)

    def _memories(self, memory: Optional[Memory], batch: int) -> tuple[Optional[Tensor], ...]:
        """(hidden, compressed, usage), each None when empty or absent."""
        if memory is None:
            return None, None, None
        if not isinstance(memory, CompressiveMemory):
            raise TypeError(f"CompressiveTransformer expects CompressiveMemory, got {type(memory).__name__}")
        out = []
        for name in ("hidden", "compressed"):
            t = getattr(memory, name)
            if t is not None and (t.dim() != 4 or t.size(0) != batch or t.size(1) != self.n_layer
                                  or t.size(3) != self.d_model):
                raise ValueError(f"memory.{name} has shape {tuple(t.shape)}, expected "
                                 f"({batch}, {self.n_layer}, rows, {self.d_model})")
            out.append(None if t is None or t.size(2) == 0 else t)
        usage = memory.usage
        if self.compression == "most_used" and out[0] is not None:
            if usage is None or tuple(usage.shape) != tuple(out[0].shape[:3]):
                raise ValueError(f"memory.usage has shape {None if usage is None else tuple(usage.shape)}, "
                                 f"expected {tuple(out[0].shape[:3])} (most_used compression)")
        return out[0], out[1], usage if out[0] is not None else None

    def _keep_probs(self) -> bool:
        return super()._keep_probs() or self.compression == "most_used"

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None, memory: Optional[Memory] = None,
                *, doc_start: Optional[Tensor] = None, return_logprobs: bool = False):
        batch, qlen = self._check_inputs(input_ids, targets)
        hid, cmem, usage = self._memories(memory, batch)
        h = self._embed(input_ids)
        hid = None if hid is None else hid.to(h.dtype)       # e.g. fp32 memory restored into a bf16 model
        cmem = None if cmem is None else cmem.to(h.dtype)
        mlen = 0 if hid is None else hid.size(2)
        cmlen = 0 if cmem is None else cmem.size(2)
        pos, mask = self._positions(qlen, cmlen + mlen, h)
        docs = self._documents(doc_start, memory, batch, qlen, h.device)
        if docs is not None:
            # The document's newest memory rows, then the compressed rows whose whole group of c
            # tokens is the document's (compressed rows are contiguous with memory, oldest first).
            n = docs[1]
            visible = n.clamp(max=mlen) + ((n - mlen).clamp(min=0) // self.ratio).clamp(max=cmlen)
            mask = documents.floor_mask(mask, documents.key_floor(docs[0], visible, cmlen + mlen))
        mems = [torch.cat([t[:, i] for t in (cmem, hid) if t is not None], dim=1) if (mlen or cmlen) else None
                for i in range(self.n_layer)]
        h, hids, probs = self._layers(h, mems, pos, mask, (cmlen, mlen, qlen))
        new_memory, aux = self._update_memories(hids, hid, cmem, usage, probs, cmlen)
        new_memory = self._with_doc_len(new_memory, docs)
        return self._predict(h, targets, return_logprobs, new_memory, aux)

    def _update_memories(self, hids: list[Tensor], hid: Optional[Tensor], cmem: Optional[Tensor],
                         usage: Optional[Tensor], probs: list[Optional[Tensor]],
                         cmlen: int) -> tuple[CompressiveMemory, Optional[Tensor]]:
        """Push the segment's layer inputs into the memory; compress what it pushes out."""
        new = torch.stack([x.detach() for x in hids], dim=1)                     # [B, L, q, d]
        full = new if hid is None else torch.cat([hid, new], dim=2)
        overflow = max(0, full.size(2) - self.mem_len)
        # Without compressed memory everything past mem_len is dropped (Transformer-XL).
        n_comp = (overflow // self.ratio) * self.ratio if self.cmem_len > 0 else 0
        drop = n_comp if self.cmem_len > 0 else overflow
        if self.compression == "most_used":
            # mean attention per key over heads and queries, added to what each row had received
            got = torch.stack([p.mean(dim=(1, 2), dtype=torch.float32)[:, cmlen:] for p in probs], dim=1)  # [B, L, m+q]
            mlen = 0 if hid is None else hid.size(2)
            if usage is not None:
                got[:, :, :mlen] += usage.float()
            usage = got
        aux = None
        compressed = cmem
        if n_comp > 0:
            evicted = full[:, :, :n_comp]
            ev_usage = usage[:, :, :n_comp] if usage is not None else None
            train_f = self.training and self.compression_loss != "none" and torch.is_grad_enabled()
            with torch.set_grad_enabled(train_f):
                parts = [f(evicted[:, i], None if ev_usage is None else ev_usage[:, i])
                         for i, f in enumerate(self.compress)]
            if train_f:
                aux = self.loss_weight * sum(self._compression_loss(i, hids[i], evicted[:, i], parts[i])
                                             for i in range(self.n_layer))
            block = torch.stack([p.detach() for p in parts], dim=1)               # [B, L, n_comp / c, d]
            compressed = block if cmem is None else torch.cat([cmem, block], dim=2)
            compressed = compressed[:, :, max(0, compressed.size(2) - self.cmem_len):]
        if compressed is None:
            compressed = full.new_zeros(full.size(0), self.n_layer, 0, self.d_model)
        memory = CompressiveMemory(
            hidden=full[:, :, drop:].contiguous(),    # fresh tensors: no view keeps old storage alive
            compressed=compressed.contiguous(),
            usage=None if usage is None else usage[:, :, drop:].to(full.dtype).contiguous())
        return memory, aux

    # -- compression losses ---------------------------------------------------------------
    def _compression_loss(self, layer: int, h: Tensor, old: Tensor, new: Tensor) -> Tensor:
        """The loss of f_c on one layer; only ``new`` (f_c's output) carries gradient."""
        if self.compression_loss == "autoencoder":
            decoded = self.decoders[layer](new).view_as(old)
            return F.mse_loss(decoded.float(), old.float())
        attn = self.layers[layer].dec_attn
        with torch.no_grad():
            target = content_attention(attn, h, old)
        return F.mse_loss(content_attention(attn, h, new).float(), target.float())


def content_attention(attn, h: Tensor, mem: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d_head)·v of queries from ``h`` over ``mem``, per head, with the layer's own
    projections (and LayerNorm under pre-LN) run with their weights detached
    (``weights_detached``): the attention-reconstruction loss's content-only attention. ``h`` is
    detached too; gradient reaches ``mem`` only through the caller's graph (the compressed rows)."""
    hd = attn.n_head * attn.d_head
    with weights_detached(attn.qkv_net, attn.layer_norm):
        def project(x: Tensor) -> Tensor:
            return attn.qkv_net(attn.layer_norm(x) if attn.pre_lnorm else x)
        q = project(h.detach())[..., :hd]
        k, v = project(mem)[..., hd:].split(hd, dim=-1)
    q, k, v = (x.unflatten(-1, (attn.n_head, attn.d_head)).transpose(1, 2) for x in (q, k, v))
    prob = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32)
    return torch.matmul(prob.to(v.dtype), v).transpose(1, 2).flatten(2)
