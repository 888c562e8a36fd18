"""The ∞-former (Martins, Marinho & Martins, ACL 2022): Transformer-XL plus a continuous long-term memory.

Each layer keeps Transformer-XL's short-term memory (STM: the last ``mem_len`` layer inputs,
relative attention over [memory; segment]) and a long-term memory (LTM): the coefficients
``B [N, d]`` of N Gaussian basis functions fitting everything that left the STM
(models/modules/continuous.py). A query reads the LTM by continuous softmax attention — a
Gaussian 𝒩(μ, σ²) over [0, 1] from its scores against ``K = B W_K`` — and the read-out
``W_O (E[ψ]ᵀ B W_V)`` is added to the STM attention's output projection before dropout, residual
and LayerNorm (the reference's sorting model; no gate). The LTM costs O(L² + L·N) per segment
whatever the context already consumed.

Writing (in the forward that first needs it, so the optional gate ``x ⊙ σ(conv3(x))`` trains):
rows leave the STM in whole chunks of ``chunk`` rows (default: the segment length), the
remainder staying in the STM; at the next forward each chunk is fitted into the LTM — the first
one over all of [0, 1], later ones in (τ, 1] after the old signal, sampled at M positions, is
contracted into (0, τ]. The stored coefficients are detached: no gradient reaches older memory.
With ``sticky`` the M positions follow the previous forward's LTM attention (D-bin histogram of
its Gaussians, inverse-CDF placement: deterministic, no duplicated positions; the reference
draws bins i.i.d. and uses their left edges). ``mem_len: 0`` turns recurrence off altogether
(nothing reaches the LTM either).

Regulariser (training only, through ``aux_loss``): ``kl_weight`` × the KL divergence of each
query's 𝒩(μ, σ²) from 𝒩(μ0, σ0²), averaged over rows with a written LTM, heads and queries,
summed over layers. The μ term is added only when ``kl_mu0`` is set; the reference's GPT-2 code
adds it when ``mu_0 <= 0`` (with its shipped ``mu_0: -1`` it pulls μ to -1), an inverted
condition we do not copy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import TYPE_CHECKING, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import documents
from models.memory import Memory
from models.modules.continuous import (
    GaussianBasis,
    attention_histogram,
    first_positions,
    ridge_matrix,
    sample_positions,
    update_positions,
)
from models.transformer_xl import TransformerXL, check_relative_recurrence

if TYPE_CHECKING:          # models.config nests InfiniteFormerConfig, so it imports this module
    from models.config import ModelConfig


@dataclasses.dataclass
class InfiniteFormerConfig:
    """``model.infinite_former``: the continuous long-term memory (paper "Long-term memory")."""

    n_basis: int = 512               # N Gaussian basis functions
    widths: List[float] = field(default_factory=lambda: [0.01, 0.05])   # their std devs
    ridge: float = 1.0               # λ of the ridge fit (sorting 1, GPT-2 0.5)
    tau: float = 0.75                # the old signal is contracted into (0, τ]
    n_samples: int = 512             # M samples of the old signal per update
    chunk: int = 0                   # rows written per update; 0: model.tgt_len
    sticky: bool = False             # sample the old signal where attention was (sticky memories)
    n_bins: int = 128                # D bins of the sticky histogram
    gate: bool = True                # x ⊙ sigmoid(conv3(x)) before writing (the reference's cnn mask)
    min_var: float = 1e-6            # σ² clamp (sorting 1e-6, GPT-2 1e-4)
    kl_weight: float = 1e-6
    kl_sigma0: float = 0.05
    kl_mu0: Optional[float] = None   # None: no μ term in the KL


@dataclasses.dataclass
class InfiniteMemory(Memory):
    """Per row: ``hidden [B, n_layer, m, d]`` (STM, oldest first), ``pending [B, n_layer, p, d]``
    (rows that left the STM, written into the LTM at the next forward; p a multiple of the chunk),
    ``coef [B, n_layer, N, d]`` (LTM coefficients; 0 rows before the first write), ``hist [B,
    n_layer, D]`` (sticky: the last forward's LTM attention density), ``writes [B]`` (LTM updates
    so far; 0: empty, the next write is a first one)."""

    hidden: Optional[Tensor] = None
    pending: Optional[Tensor] = None
    coef: Optional[Tensor] = None
    hist: Optional[Tensor] = None
    writes: Optional[Tensor] = None

    @property
    def mlen(self) -> int:
        return 0 if self.hidden is None else self.hidden.size(2)


class LongTermAttention(nn.Module):
    """One layer's read of its LTM: continuous softmax attention with the layer's own queries."""

    def __init__(self, d_model: int, n_head: int, d_head: int, n_basis: int, gate: bool):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.key = nn.Linear(d_model, n_head * d_head, bias=False)
        self.value = nn.Linear(d_model, n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.mu = nn.Linear(n_basis, 1, bias=False)       # shared by the heads (reference)
        self.var = nn.Linear(n_basis, 1, bias=False)
        self.gate = nn.Conv1d(d_model, d_model, 3, padding=1) if gate else None

    def gated(self, x: Tensor) -> Tensor:
        """``x [B, L, d]`` before the fit: ``x ⊙ sigmoid(conv3(x))`` (or x)."""
        if self.gate is None:
            return x
        return x * torch.sigmoid(self.gate(x.transpose(1, 2)).transpose(1, 2))

    def forward(self, q: Tensor, coef: Tensor, basis: GaussianBasis, min_var: float):
        """q ``[B, H, Lq, D]`` (the layer's queries, scaled by 1/√D), coef ``[B, N, d]`` ->
        (read ``[B, Lq, d]``, μ, σ²)."""
        B, H, Lq, D = q.shape
        k = self.key(coef).view(B, -1, H, D).transpose(1, 2)              # [B, H, N, D]
        v = self.value(coef).view(B, -1, H, D).transpose(1, 2)
        s = torch.matmul(q, k.transpose(-1, -2))                          # q·k/√D: [B, H, Lq, N]
        mu = torch.sigmoid(self.mu(s)).squeeze(-1)
        var = F.softplus(self.var(s)).squeeze(-1).clamp(min=min_var)
        r = basis.expectation(mu.float(), var.float()).to(v.dtype)        # [B, H, Lq, N]
        z = torch.matmul(r, v).transpose(1, 2).flatten(2)                 # [B, Lq, H·D]
        return self.out(z), mu, var


class LongTermMemory:
    """The long-term memory's fit, shared by the families that have one (the ∞-former, GPT-2 with
    long-term memory): needs ``ltm`` (one LongTermAttention per memory layer), ``basis``,
    ``ltm_cfg`` (an InfiniteFormerConfig), ``chunk`` and ``_ridge`` (a dict)."""

    def ridge_matrices(self, device) -> tuple[Tensor, Tensor]:
        """(G for a first write ``[chunk, N]``, G for an update ``[M + chunk, N]``), float64,
        computed once per device from the positions (never a module buffer: ``.to(bf16)`` would
        round it)."""
        key = str(device)
        if key not in self._ridge:
            c = self.ltm_cfg
            first = ridge_matrix(self.basis, first_positions(self.chunk), c.ridge)
            update = ridge_matrix(self.basis, update_positions(c.n_samples, self.chunk, c.tau), c.ridge)
            self._ridge[key] = (first.to(device), update.to(device))
        return self._ridge[key]

    def _write(self, x: Tensor, coef: Optional[Tensor], hist: Optional[Tensor], writes: Optional[Tensor],
               clean: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """Fit one chunk ``x [B, n_layer, chunk, d]`` into the LTM; returns (coef, writes).
        The fit runs in float32 (float64 G cast once), whatever the model's dtype. ``clean [B]``
        (document boundaries): False where the chunk holds a token of an earlier document; that
        row's LTM is emptied instead, and its next clean chunk is a first write."""
        coef, writes = self._fit(x, coef, hist, writes)
        if clean is not None:
            coef = torch.where(clean.view(-1, 1, 1, 1), coef, torch.zeros_like(coef))
            writes = torch.where(clean, writes, torch.zeros_like(writes))
        return coef, writes

    def _fit(self, x: Tensor, coef: Optional[Tensor], hist: Optional[Tensor],
             writes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        batch = x.size(0)
        g_first, g_update = (g.float() for g in self.ridge_matrices(x.device))
        gated = torch.stack([self.ltm[i].gated(x[:, i]) for i in range(len(self.ltm))], dim=1).float()
        fresh = torch.einsum("pn,blpd->blnd", g_first, gated)
        if coef is None:
            writes = torch.zeros(batch, dtype=torch.long, device=x.device) if writes is None else writes
            return fresh.to(x.dtype), writes + 1
        c = self.ltm_cfg
        if c.sticky and hist is not None:
            s = sample_positions(hist, c.n_samples)                                 # [B, L, M]
        else:
            s = sample_positions(torch.ones(1, 1, 1, device=x.device), c.n_samples).expand(batch, len(self.ltm), -1)
        psi = self.basis.evaluate(s).float()                                         # [B, L, M, N]
        old = torch.matmul(psi, coef.float())                                        # [B, L, M, d]
        updated = torch.einsum("pn,blpd->blnd", g_update, torch.cat([old, gated], dim=2))
        first = (writes == 0).view(batch, 1, 1, 1)
        return torch.where(first, fresh, updated).to(x.dtype), writes + 1


    def _kl(self, reads: list, readers: Tensor) -> Tensor:
        """kl_weight × Σ_layers mean KL(𝒩(μ, σ²) ‖ 𝒩(μ0, σ0²)) over the queries that read a written
        LTM (``readers``: 1/0 as ``[B, 1, 1]`` per row or ``[B, 1, q]`` per query)."""
        c = self.ltm_cfg
        s0 = c.kl_sigma0 ** 2
        total = 0.0
        for mu, var in reads:
            ratio = var.float() / s0
            kl = 0.5 * (ratio - torch.log(ratio) - 1)
            if c.kl_mu0 is not None:
                kl = kl + 0.5 * (mu.float() - c.kl_mu0) ** 2 / s0
            weight = readers.expand(kl.size(0), 1, kl.size(2))
            total = total + (kl * weight).sum() / (weight.sum() * kl.size(1)).clamp(min=1)
        return c.kl_weight * total

    def _histograms(self, reads: list, dtype: torch.dtype) -> Optional[Tensor]:
        """Sticky memories: each memory layer's LTM attention density ``[B, L, D]`` of this forward."""
        if not (self.ltm_cfg.sticky and reads):
            return None
        with torch.no_grad():
            return torch.stack([attention_histogram(mu.flatten(1), var.flatten(1), self.ltm_cfg.n_bins)
                                for mu, var in reads], dim=1).to(dtype)


class InfiniteFormer(LongTermMemory, TransformerXL):
    family = "infinite_former"

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        c = cfg.infinite_former
        check_relative_recurrence(cfg)
        checks = [("n_basis", c.n_basis >= 1, ">= 1"), ("ridge", c.ridge > 0, "> 0"),
                  ("tau", 0 < c.tau < 1, "in (0, 1)"), ("n_samples", c.n_samples >= 1, ">= 1"),
                  ("chunk", c.chunk >= 0, ">= 0 (0: model.tgt_len)"), ("n_bins", c.n_bins >= 1, ">= 1"),
                  ("min_var", c.min_var > 0, "> 0"), ("kl_weight", c.kl_weight >= 0, ">= 0"),
                  ("kl_sigma0", c.kl_sigma0 > 0, "> 0"),
                  ("widths", bool(c.widths) and all(w > 0 for w in c.widths), "positive std devs")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"model.infinite_former.{name}={getattr(c, name)} is out of range: it must be "
                                 f"{allowed}")
        if c.n_basis % len(c.widths):
            raise ValueError(f"model.infinite_former.n_basis={c.n_basis} must be a multiple of the "
                             f"{len(c.widths)} widths {c.widths}")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        c = self.ltm_cfg = cfg.infinite_former
        self.chunk = c.chunk or cfg.tgt_len
        self.basis = GaussianBasis(c.n_basis, c.widths)
        # Built after Transformer-XL's weights; PyTorch's default init (the reference's).
        self.ltm = nn.ModuleList(LongTermAttention(cfg.d_model, cfg.n_head, cfg.d_head, c.n_basis, c.gate)
                                 for _ in range(cfg.n_layer))
        self._ridge: dict = {}       # float64 G matrices by device, see ridge_matrices

    # -- memory ---------------------------------------------------------------------------
    def init_memory(self, batch_size: int, device=None) -> InfiniteMemory:
        p = next(self.parameters())
        device = device if device is not None else p.device
        empty = p.new_zeros(batch_size, self.n_layer, 0, self.d_model, device=device)
        return InfiniteMemory(hidden=empty, pending=empty.clone(), coef=empty.clone())

    def _memories(self, memory: Optional[Memory], batch: int):
        if memory is None:
            return None, None, None, None, None
        if not isinstance(memory, InfiniteMemory):
            raise TypeError(f"InfiniteFormer expects InfiniteMemory, got {type(memory).__name__}")
        out = []
        for name, rows in (("hidden", None), ("pending", None), ("coef", self.ltm_cfg.n_basis)):
            t = getattr(memory, name)
            ok = t is None or (t.dim() == 4 and t.size(0) == batch and t.size(1) == self.n_layer
                               and t.size(3) == self.d_model and (rows is None or t.size(2) in (0, rows)))
            if not ok:
                raise ValueError(f"memory.{name} has shape {tuple(t.shape)}, expected ({batch}, {self.n_layer}, "
                                 f"{'rows' if rows is None else rows}, {self.d_model})")
            out.append(None if t is None or t.size(2) == 0 else t)
        writes = memory.writes
        if out[2] is not None and (writes is None or tuple(writes.shape) != (batch,)):
            raise ValueError(f"memory.writes must be [{batch}] beside a written memory.coef")
        return (*out, memory.hist, writes)

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None, memory: Optional[Memory] = None,
                *, doc_start: Optional[Tensor] = None, return_logprobs: bool = False):
        batch, qlen = self._check_inputs(input_ids, targets)
        hid, pending, coef, hist, writes = self._memories(memory, batch)
        h = self._embed(input_ids)
        hid, pending, coef = (None if t is None else t.to(h.dtype) for t in (hid, pending, coef))
        mlen = 0 if hid is None else hid.size(2)
        docs = self._documents(doc_start, memory, batch, qlen, h.device)
        # What left the STM last time enters the LTM now, in this graph (the gate trains). With
        # document starts, a chunk reaching back past the row's document empties its LTM instead.
        if pending is not None:
            n_pending = pending.size(2)
            for k in range(0, n_pending, self.chunk):
                clean = None if docs is None else docs[1] >= mlen + n_pending - k
                coef, writes = self._write(pending[:, :, k: k + self.chunk], coef, hist, writes, clean)
        pos, mask = self._positions(qlen, mlen, h)
        # Which queries read the LTM: all, or (documents) those whose document the LTM holds.
        reader = None
        if docs is not None:
            mask = documents.floor_mask(mask, documents.key_floor(docs[0], docs[1], mlen))
            if writes is not None:
                reader = ((docs[0] < 0) & (writes > 0).unsqueeze(1)).unsqueeze(-1)      # [B, q, 1]
        reads: list = []

        def ltm_read(i: int):
            """Layer i's long-term read, from the queries its attention computes (so every
            parameter is used inside its module's forward: ZeRO-3 gathers it there)."""
            if coef is None:
                return None

            def read(q: Tensor) -> Tensor:
                z, mu, var = self.ltm[i](q, coef[:, i], self.basis, self.ltm_cfg.min_var)
                reads.append((mu, var))
                return z if reader is None else z * reader.to(z.dtype)
            return read

        mems = [None if hid is None else hid[:, i] for i in range(self.n_layer)]
        h, hids, _ = self._layers(h, mems, pos, mask, (mlen, qlen), extra=ltm_read)
        new_memory = self._with_doc_len(self._update_memories(hids, hid, coef, writes, reads), docs)
        if self.training and reads and self.ltm_cfg.kl_weight > 0:
            readers = (writes > 0).view(-1, 1, 1) if reader is None else reader.view(batch, 1, qlen)
            aux = self._kl(reads, readers.float())
        else:
            aux = None
        return self._predict(h, targets, return_logprobs, new_memory, aux)

    def _update_memories(self, hids: list[Tensor], hid: Optional[Tensor], coef: Optional[Tensor],
                         writes: Optional[Tensor], reads: list) -> InfiniteMemory:
        new = torch.stack([x.detach() for x in hids], dim=1)                         # [B, L, q, d]
        full = new if hid is None else torch.cat([hid, new], dim=2)
        if self.mem_len == 0:                       # no recurrence: nothing is kept, nothing written
            keep = full[:, :, full.size(2):]
            pending = keep
        else:
            over = max(0, full.size(2) - self.mem_len)
            n_out = (over // self.chunk) * self.chunk
            pending, keep = full[:, :, :n_out], full[:, :, n_out:]
        hist = self._histograms(reads, full.dtype)
        empty = full.new_zeros(full.size(0), self.n_layer, 0, self.d_model)
        return InfiniteMemory(hidden=keep.contiguous(), pending=pending.contiguous(),
                              coef=empty if coef is None else coef.detach().contiguous(),
                              hist=hist, writes=writes)
