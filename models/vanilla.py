"""Al-Rfou et al. (2019), "Character-Level Language Modeling with Deeper Self-Attention".

A causal Transformer over fixed windows of ``L = model.tgt_len`` tokens (512 in the paper):
byte/char embedding, per-layer learned positional tables ``[L, d_model]`` added at the input of
every layer, standard causal multi-head attention and a ReLU feed-forward block, post-LN by
default. Nothing is carried between training windows.

Auxiliary losses (training only, ``ModelConfig.vanilla``):

* multiple positions: every position of the window predicts its next token (off: only the
  last position of each row contributes to the training losses, the paper's ablation);
* intermediate layers: layer ``l`` (1-based, ``l < n``) has its own next-token head and stops
  contributing once ``progress >= l / (2n)`` (a float fraction of the total steps, set through
  ``set_progress``), so every intermediate loss is gone after half of training;
* multiple targets: each contributing layer (the final one always) also has a next-next head
  whose loss is weighted ``next_next_weight`` (0.5).

Weighting rule (the paper's: its auxiliary losses are *added* to the objective):

    loss     = CE(final next head)                                   (mean over scored tokens)
    aux_loss = sum_{l < n active} CE(next head l)
             + w * sum_{l active or l = n} CE(next-next head l)      (w = 0.5; each CE a mean)

A sum rather than a mean over active layers so that one layer dropping out of the schedule leaves
every other term's weight unchanged; the next-next target of position t is token t + 2, so the last
position of a window has none. ``aux_loss`` is None in eval mode.

Memory and evaluation. The memory is the previous input *tokens* (``VanillaMemory``, at most
``min(mem_len, L - 1)`` of them). A forward over k new tokens attends over the last
``min(n_mem, L - k)`` memory tokens followed by the k new ones, with per-layer absolute positions
``0 .. m + k - 1``, and scores only the k new tokens. Training windows of k = L tokens therefore
see no memory (independent windows, as the paper); streaming evaluation with k = 1 is exactly the
paper's stride-1 sliding window, and k > 1 is the stride-k approximation. ``sliding_window_nll``
does the same for a 1-D token sequence with batched windows.

Training-only parameters (intermediate next heads, every next-next head) live under the
``train_heads.`` prefix: ``inference_state_dict()`` drops them, ``load_inference_state_dict``
loads such a dict back. In eval mode they are never run.

Initialisation: every Linear/Embedding weight and positional table ~ N(0, init_std) (or
U(-init_range, init_range) with ``init: uniform``), biases 0, LayerNorm (1, 0).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import documents
from models.base import LanguageModel, ModelOutput, span_keeping_mem_len
from models.memory import Memory
from models.modules.attention import KernelChoice, choose_attention
from models.modules.layers import PositionwiseFF, layer_norm, linear

if TYPE_CHECKING:          # models.config nests VanillaConfig, so it imports this module
    from models.config import ModelConfig


@dataclasses.dataclass
class VanillaConfig:
    """Al-Rfou et al. (2019) deep character transformer: fixed windows, auxiliary losses.

    The window L is ``ModelConfig.tgt_len``; the memory keeps the last ``min(mem_len, L - 1)``
    input tokens (see models/vanilla.py for the loss weighting and evaluation).
    """

    multi_position: bool = True      # predict at every position of the window, not only the last
    intermediate: bool = True        # per-layer losses, layer l stops after l/(2n) of training
    next_next: bool = True           # extra head predicting the token two ahead
    next_next_weight: float = 0.5


TRAINING_ONLY_PREFIX = "train_heads."


@dataclasses.dataclass
class VanillaMemory(Memory):
    """The previous input tokens, ``[batch, n]`` with ``n <= L - 1`` (long; never requires grad)."""

    tokens: Optional[Tensor] = None


class CausalSelfAttention(KernelChoice, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.qkv = linear(cfg.d_model, 3 * cfg.n_head * cfg.d_head)
        self.out = linear(cfg.n_head * cfg.d_head, cfg.d_model)
        self.dropatt = cfg.dropatt

    def forward(self, x: Tensor, attend: Optional[Tensor] = None) -> Tensor:
        """``attend [B, 1, t, t]`` (bool, True = visible): a causal mask with document boundaries."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # 3 x [b, H, t, D]
        p = self.dropatt if self.training else 0.0
        if choose_attention(False, False, self.kernel) == "sdpa":   # content only: no probabilities kept
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p, is_causal=attend is None)
        else:      # the same attention written out (the reference for SDPA's)
            visible = attend if attend is not None else torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            score = (q @ k.transpose(-1, -2)).mul_(self.d_head ** -0.5).masked_fill_(~visible, float("-inf"))
            prob = F.dropout(torch.softmax(score, dim=-1, dtype=torch.float32).to(v.dtype), p, self.training)
            y = prob @ v                                                                       # [b, H, t, D]
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_head * self.d_head))


class Block(nn.Module):
    """One layer: its own positional table added to the input, then attention and FF sublayers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pos = nn.Parameter(torch.empty(cfg.tgt_len, cfg.d_model))
        self.attn = CausalSelfAttention(cfg)
        self.norm = layer_norm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.ff = PositionwiseFF(cfg.d_model, cfg.d_inner, cfg.dropout, pre_lnorm=cfg.pre_lnorm)
        self.pre_lnorm = cfg.pre_lnorm

    def forward(self, h: Tensor, attend: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
        # Window positions are absolute 0..T-1 in every layer; with document starts each token
        # counts from its own document's first token in the window (``positions [B, T]``).
        x = h + (self.pos[: h.shape[1]] if positions is None else self.pos[positions])
        if self.pre_lnorm:
            x = x + self.drop(self.attn(self.norm(x), attend))
        else:
            x = self.norm(x + self.drop(self.attn(x, attend)))
        return self.ff(x)


class VanillaTransformer(LanguageModel):
    """Al-Rfou T12/T64 family; see the module docstring for losses, memory and evaluation."""

    family = "vanilla"
    length_names = ("tgt_len", "mem_len")   # absolute positions: nothing to clamp or equalise
    suffix_targets = False                   # every input position takes a target
    caches_hidden = False                    # memory is tokens: every window is recomputed
    training_only = (TRAINING_ONLY_PREFIX,)  # the auxiliary heads

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        if cfg.vanilla.next_next_weight < 0:
            raise ValueError(f"model.vanilla.next_next_weight={cfg.vanilla.next_next_weight} must be >= 0")
        if cfg.cutoffs:
            raise ValueError(f"model.cutoffs={cfg.cutoffs}: the vanilla family has a full softmax; "
                             f"set model.cutoffs=[]")
        if cfg.d_embed not in (0, cfg.d_model):
            raise ValueError(f"model.d_embed={cfg.d_embed}: the vanilla family needs d_embed 0 or "
                             f"d_model={cfg.d_model}")
        if cfg.tgt_len < 2:      # n_layer >= 1 is the shared check's
            raise ValueError(f"model.tgt_len={cfg.tgt_len}: the vanilla family needs a window of at least 2 tokens")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg, self.vcfg = cfg, cfg.vanilla
        self.context = cfg.tgt_len  # L: the window every prediction sees at most
        self.mem_len = max(0, min(cfg.mem_len, self.context - 1))  # more than L - 1 tokens is never used
        self.tgt_len = cfg.tgt_len  # the segment evaluation feeds per forward (at most L)
        self.progress = 0.0

        self.embed = nn.Embedding(cfg.n_token, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_out = layer_norm(cfg.d_model) if cfg.pre_lnorm else nn.Identity()
        self.head = linear(cfg.d_model, cfg.n_token)  # final next-token head, the only one used in inference
        n = cfg.n_layer
        self.train_heads = nn.ModuleDict(
            {
                "next": nn.ModuleList(linear(cfg.d_model, cfg.n_token) for _ in range(n - 1)),  # layers 1..n-1
                "next_next": nn.ModuleList(linear(cfg.d_model, cfg.n_token) for _ in range(n)),  # layers 1..n
            }
        )
        self.reset_parameters()
        if cfg.tie_weight:
            self.head.weight = self.embed.weight

    # ----- initialisation -------------------------------------------------------------------
    def _init_weight(self, w: Tensor) -> None:
        if self.cfg.init == "uniform":
            nn.init.uniform_(w, -self.cfg.init_range, self.cfg.init_range)
        else:
            nn.init.normal_(w, 0.0, self.cfg.init_std)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                self._init_weight(mod.weight)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.LayerNorm) or hasattr(mod, "normalized_shape"):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        for block in self.layers:
            self._init_weight(block.pos)

    # ----- schedule -------------------------------------------------------------------------
    def intermediate_stop_fraction(self, layer: int) -> float:
        """Fraction of training after which intermediate layer ``layer`` (1-based) stops: l/(2n)."""
        n = self.cfg.n_layer
        if not 1 <= layer < n:
            raise ValueError(f"layer {layer} is not an intermediate layer of a {n}-layer model (1..{n - 1})")
        return layer / (2 * n)

    def active_intermediate_layers(self) -> list[int]:
        """1-based intermediate layers whose losses count at the current ``progress``."""
        if not self.vcfg.intermediate:
            return []
        return [l for l in range(1, self.cfg.n_layer) if self.progress < self.intermediate_stop_fraction(l)]

    # ----- evaluation lengths -----------------------------------------------------------------
    def lengths(self) -> dict:
        return {"tgt_len": self.tgt_len, "mem_len": self.mem_len}

    def _check_segment(self, tgt_len: int) -> None:
        if not 1 <= tgt_len <= self.context:
            raise ValueError(f"tgt_len={tgt_len} exceeds the model's window model.tgt_len={self.context}"
                             if tgt_len > self.context else f"tgt_len={tgt_len} must be >= 1")

    def set_lengths(self, tgt_len: Optional[int] = None, mem_len: Optional[int] = None) -> None:
        if tgt_len is not None:
            self._check_segment(tgt_len)
            self.tgt_len = int(tgt_len)
        if mem_len is not None:
            if mem_len < 0:
                raise ValueError(f"mem_len={mem_len} must be >= 0")
            self.mem_len = min(int(mem_len), self.context - 1)  # more than L - 1 tokens is never used

    def eval_mem_len(self, tgt_len: int) -> int:
        return min(span_keeping_mem_len(self.cfg.mem_len, self.cfg.tgt_len, tgt_len), self.context - 1)

    def resolve_eval_lengths(self, tgt_len: int, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                             same_length: Optional[bool] = None, cmem_len: Optional[int] = None) -> dict:
        # absolute positions and fixed windows: nothing to clamp, equalise or compress
        self.refuse_lengths(clamp_len=clamp_len, same_length=same_length, cmem_len=cmem_len)
        self._check_segment(tgt_len)
        mem = self.eval_mem_len(tgt_len) if mem_len is None else mem_len
        if mem < 0:
            raise ValueError(f"mem_len={mem} must be >= 0 (or -1 for the training attention span)")
        return {"tgt_len": tgt_len, "mem_len": min(mem, self.context - 1)}

    def window_lengths(self, context: int, clamp_len: Optional[int] = None) -> dict:
        # clamp_len has no meaning with absolute positions: a group comparison may pass one for
        # its Transformer-XL members, and it leaves this family's windows as they are.
        return {"tgt_len": context, "mem_len": 0}

    def max_context(self) -> Optional[int]:
        return self.context

    def generation_lengths(self, mem_len: int = 0, clamp_len: Optional[int] = None) -> tuple[int, dict]:
        if clamp_len is not None:
            raise ValueError(f"clamp_len={clamp_len}: the vanilla family has absolute positions; leave it unset")
        return self.context, ({"mem_len": mem_len} if mem_len else {})

    # ----- memory ---------------------------------------------------------------------------
    def init_memory(self, batch_size: int, device=None) -> VanillaMemory:
        return VanillaMemory(tokens=torch.empty(batch_size, 0, dtype=torch.long, device=device))

    def _context(self, memory: Optional[Memory], batch: int, k: int, device) -> Tensor:
        """The memory tokens this forward attends over: the last min(n, L - k)."""
        if memory is None:
            return torch.empty(batch, 0, dtype=torch.long, device=device)
        if not isinstance(memory, VanillaMemory) or memory.tokens is None:
            raise TypeError(f"vanilla model expects VanillaMemory with tokens, got {memory!r}")
        tokens = memory.tokens
        if tokens.dim() != 2 or tokens.shape[0] != batch:
            raise ValueError(f"memory.tokens has shape {tuple(tokens.shape)}; expected [{batch}, n] "
                             f"for a batch of {batch}")
        m = min(tokens.shape[1], self.context - k)
        return tokens[:, tokens.shape[1] - m :].to(device)

    # ----- forward --------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        targets: Optional[Tensor] = None,
        memory: Optional[Memory] = None,
        *,
        doc_start: Optional[Tensor] = None,
        return_logprobs: bool = False,
    ) -> ModelOutput:
        b, k = input_ids.shape
        if k > self.context:
            raise ValueError(f"input of {k} tokens exceeds the model's window model.tgt_len={self.context}")
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
        ctx = self._context(memory, b, k, input_ids.device)
        window = torch.cat([ctx, input_ids], dim=1)
        m = ctx.shape[1]
        docs = documents.track(doc_start, None if memory is None else memory.doc_len, b, k, input_ids.device)
        attend = positions = None
        if docs is not None:
            attend, positions = documents.window_visibility(docs, m)

        train_aux = self.training and targets is not None and (self.vcfg.intermediate or self.vcfg.next_next)
        active = set(self.active_intermediate_layers()) if train_aux else set()
        nn_layers = set()
        if train_aux and self.vcfg.next_next:
            nn_layers = active | {self.cfg.n_layer}

        h = self.drop(self.embed(window))
        aux_terms: list[Tensor] = []
        for i, block in enumerate(self.layers, start=1):
            h = block(h, attend, positions)
            if i in active:  # intermediate layers that still contribute; the others do no head work
                z = self.norm_out(h[:, m:])
                aux_terms.append(self._ce(self.train_heads["next"][i - 1](z), targets).mean())
                if i in nn_layers:
                    aux_terms.append(self.vcfg.next_next_weight * self._next_next_loss(i, z, targets))

        z = self.norm_out(h[:, m:])
        logits = self.head(z).float()
        if self.cfg.n_layer in nn_layers:
            aux_terms.append(self.vcfg.next_next_weight * self._next_next_loss(self.cfg.n_layer, z, targets))

        loss = nll = None
        if targets is not None:
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            # The paper's "no multiple positions" ablation trains on the last position only.
            loss = nll.mean() if (self.vcfg.multi_position or not self.training) else nll[:, -1].mean()
        aux_loss = None
        if train_aux:
            aux_loss = torch.stack(aux_terms).sum() if aux_terms else logits.new_zeros(())

        # Keep the last mem_len tokens of [all memory, input]: memory older than this window's
        # context still counts (a later, shorter input may use more of it).
        seen = input_ids if memory is None else torch.cat([memory.tokens.to(input_ids.device), input_ids], dim=1)
        new_memory = VanillaMemory(tokens=seen[:, seen.shape[1] - min(self.mem_len, seen.shape[1]) :].detach(),
                                   doc_len=None if docs is None else documents.next_doc_len(*docs))
        return ModelOutput(
            loss=loss,
            nll=nll,
            memory=new_memory,
            aux_loss=aux_loss,
            logprobs=F.log_softmax(logits, dim=-1) if return_logprobs else None,
        )

    def _ce(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-position next-token CE ``[b, k]``, or ``[b, 1]`` for the last position only."""
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
        return nll if self.vcfg.multi_position else nll[:, -1:]

    def _next_next_loss(self, layer: int, z: Tensor, targets: Tensor) -> Tensor:
        """Mean CE of predicting token t + 2 (``targets[:, t + 1]``) from position t."""
        if targets.shape[1] < 2:
            return z.new_zeros((), dtype=torch.float32)
        logits = self.train_heads["next_next"][layer - 1](z[:, :-1])
        return self._ce(logits, targets[:, 1:]).mean()

@torch.no_grad()
def sliding_window_nll(
    model: VanillaTransformer, tokens: Tensor, stride: int = 1, window: Optional[int] = None, batch_size: int = 32
) -> Tensor:
    """Per-token NLL of a 1-D token sequence with the paper's sliding-window evaluation.

    Returns ``nll[t]`` for predicting ``tokens[t + 1]``, ``t = 0 .. N - 2`` (every token but the
    first), in nats. The sequence is read in chunks of ``stride`` new tokens; each chunk attends
    over as many preceding tokens as fit into ``window`` (default ``L``: ``window - stride``, or all
    of them near the start) and scores its own tokens only. This is exactly streaming the model with
    ``tgt_len = stride`` and its memory.

    * ``stride = 1`` is Al-Rfou et al.'s procedure: one prediction at the last position of a window
      of ``window`` tokens, slid one token at a time, recomputed from scratch.
    * ``stride > 1`` is a NON-PAPER approximation (faster by about ``stride``): a token sees between
      ``window - stride + 1`` and ``window`` tokens of context. It warns.
    * The first ``window - 1`` predictions are made with a shorter, left-truncated context (all the
      tokens before them); drop ``nll[: window - 1]`` to score full-context predictions only.
    """
    if tokens.dim() != 1:
        raise ValueError(f"sliding_window_nll takes a 1-D token sequence, got shape {tuple(tokens.shape)}")
    L = model.context if window is None else window
    if not 2 <= L <= model.context:
        raise ValueError(f"window={L} must be in [2, model.tgt_len={model.context}]")
    if not 1 <= stride < L:
        raise ValueError(f"stride={stride} must be in [1, window - 1 = {L - 1}]")
    if stride > 1:
        warnings.warn(
            f"sliding_window_nll(stride={stride}): a non-paper approximation; Al-Rfou et al. evaluate with stride 1",
            stacklevel=2,
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device=device, dtype=torch.long)
    n_pred = tokens.numel() - 1
    if n_pred < 1:
        raise ValueError("sliding_window_nll needs at least 2 tokens")
    out = torch.empty(n_pred, dtype=torch.float32, device=device)

    def score(ctx_start: int, start: int, end: int) -> Tensor:
        """NLL of predictions start..end-1 from one window tokens[ctx_start:end]."""
        mem = VanillaMemory(tokens=tokens[None, ctx_start:start])
        return model(tokens[None, start:end], tokens[None, start + 1 : end + 1], memory=mem).nll[0]

    try:
        # Chunk c scores predictions [c*s, c*s + s). Until its context reaches L - s tokens it sees
        # every earlier token, i.e. the window starts at 0: by causality one forward over
        # tokens[0 : head_end] scores all those chunks exactly.
        first_full = math.ceil((L - stride) / stride)  # first chunk index with a full L - s context
        head_end = min(first_full * stride, n_pred)
        if head_end > 0:
            out[:head_end] = score(0, 0, head_end)
        # Full chunks: windows of L tokens at step `stride`, batched.
        n_full = (n_pred - head_end) // stride
        if n_full > 0:
            starts = head_end + stride * torch.arange(n_full, device=device)
            offs = torch.arange(L, device=device)
            for i in range(0, n_full, batch_size):
                win = tokens[(starts[i : i + batch_size, None] - (L - stride)) + offs]  # [b, L]
                tgt = tokens[(starts[i : i + batch_size, None] + 1) + torch.arange(stride, device=device)]
                mem = VanillaMemory(tokens=win[:, : L - stride])
                nll = model(win[:, L - stride :], tgt, memory=mem).nll  # [b, stride]
                out[head_end + i * stride : head_end + (i + nll.shape[0]) * stride] = nll.reshape(-1)
        # A last, shorter chunk attends over as much as fits, like the streaming model.
        tail = head_end + n_full * stride
        if tail < n_pred:
            out[tail:] = score(max(0, n_pred - L), tail, n_pred)
    finally:
        model.train(was_training)
    return out
