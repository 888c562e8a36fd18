"""GPT-2 with the ∞-former's continuous long-term memory (Martins et al. 2022, §5.2: fine-tuning GPT-2).

A wrapper over HF ``transformers.GPT2LMHeadModel`` (the optional extra ``xlpipe[hf]``; imported
only when this family is built): ``model.gpt2_ltm.pretrained`` names a local directory saved by
``save_pretrained`` (``config.json`` + ``model.safetensors``; weights are read from safetensors
only, so no pickle from a user's file ever runs), or, empty, a random GPT-2 sized by ``model.*``
(``n_layer``, ``d_model``, ``n_head``, ``d_inner``; what the tests use).

Short-term memory is GPT-2's own attention over a window: the previous ``mem_len`` tokens
(``block_size`` in the paper, 512) are kept as tokens and recomputed with the segment, at
positions 0 .. m+q-1 (like the Al-Rfou model's windows); only the segment is scored. Long-term
memory, in the layers ``model.gpt2_ltm.layers`` (empty: all): the tokens that leave the window
enter, in whole chunks, the LTM of models/infinite_former.py (the same fit, sticky memories, KL,
document resets: ``LongTermMemory``), fitted from the layer's attention input (``ln_1``); each
layer's own GPT-2 queries read it, and the read is added to the attention's output projection
before its dropout and the residual (as our ∞-former adds it to ``o_net``). ``long_term: false``
is the plain fine-tuned GPT-2 with the same window: the paper's baseline is one config switch.

GPT-2's blocks are run here module by module (``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``mlp``,
...), so every parameter is used inside its own module's forward (ZeRO-3) and the attention mask
can carry document boundaries; with the long-term memory off and no memory this is exactly
``GPT2LMHeadModel``'s forward (tested against it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import documents
from models.base import LanguageModel, ModelOutput, SegmentMemoryLengths, span_keeping_mem_len
from models.infinite_former import InfiniteFormerConfig, LongTermAttention, LongTermMemory
from models.memory import Memory
from models.modules.continuous import GaussianBasis

if TYPE_CHECKING:
    from models.config import ModelConfig


def _paper_ltm() -> InfiniteFormerConfig:
    # The authors' GPT-2 settings (finetune_gpt2 configs): N 512, τ 0.5, λ 0.5, M 512, D 128, sticky.
    return InfiniteFormerConfig(n_basis=512, ridge=0.5, tau=0.5, n_samples=512, sticky=True, n_bins=128,
                                min_var=1e-4)


@dataclasses.dataclass
class GPT2LTMConfig:
    """``model.gpt2_ltm``."""

    pretrained: str = ""             # a local save_pretrained directory; "": a random GPT-2 of model.* sizes
    hf_config: Dict[str, Any] = field(default_factory=dict)   # a GPT2Config as a dict (exports): its shape
    long_term: bool = True           # false: plain GPT-2 over the same window (the paper's baseline)
    layers: List[int] = field(default_factory=list)   # layers with a long-term memory; []: all
    memory: InfiniteFormerConfig = field(default_factory=_paper_ltm)   # its settings (chunk 0: tgt_len)


@dataclasses.dataclass
class GPT2LTMMemory(Memory):
    """Per row: ``tokens [B, m]`` (the window kept for the next forward), ``pending [B, L, p, d]``
    (layer inputs of tokens that left it, written at the next forward), ``coef [B, L, N, d]``,
    ``hist [B, L, D]`` and ``writes [B]`` of the long-term memory (L: its layers)."""

    tokens: Optional[Tensor] = None
    pending: Optional[Tensor] = None
    coef: Optional[Tensor] = None
    hist: Optional[Tensor] = None
    writes: Optional[Tensor] = None


def _hf():
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("model.family=gpt2_ltm needs HF transformers: pip install 'xlpipe[hf]'") from exc
    return transformers


class GPT2LTM(LongTermMemory, SegmentMemoryLengths, LanguageModel):
    family = "gpt2_ltm"
    length_names = ("tgt_len", "mem_len")   # absolute positions: nothing to clamp or equalise
    suffix_targets = False
    caches_hidden = False                    # the window is recomputed

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        super().check_config(cfg)
        g = cfg.gpt2_ltm
        bad = [i for i in g.layers if not 0 <= i < cfg.n_layer]
        if bad and not g.pretrained:
            raise ValueError(f"model.gpt2_ltm.layers={g.layers}: layers {bad} are outside 0..{cfg.n_layer - 1}")
        if len(set(g.layers)) != len(g.layers):
            raise ValueError(f"model.gpt2_ltm.layers={g.layers} repeats a layer")
        if cfg.d_model != cfg.n_head * cfg.d_head and not g.pretrained:
            raise ValueError(f"model.d_head={cfg.d_head}: GPT-2 needs n_head x d_head = d_model ({cfg.d_model})")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.check_config(cfg)
        self.cfg, g = cfg, cfg.gpt2_ltm
        tf = _hf()
        if g.pretrained:               # checked when built (a config names it before it is downloaded)
            path = Path(g.pretrained).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"model.gpt2_ltm.pretrained={g.pretrained!r} holds no config.json (a directory "
                                 f"saved by transformers' save_pretrained)")
            if not (path / "model.safetensors").is_file():
                raise ValueError(f"model.gpt2_ltm.pretrained={g.pretrained!r} has no model.safetensors: only "
                                 f"safetensors weights are read (a pickled pytorch_model.bin could run code)")
            self.hf = tf.GPT2LMHeadModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                         attn_implementation="eager")
        elif g.hf_config:        # an export: the pretrained model's shape, its weights come from the export
            self.hf = tf.GPT2LMHeadModel(tf.GPT2Config.from_dict(dict(g.hf_config), attn_implementation="eager"))
        else:
            hcfg = tf.GPT2Config(vocab_size=cfg.n_token, n_positions=cfg.tgt_len + cfg.mem_len, n_embd=cfg.d_model,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_inner,
                                 resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropatt,
                                 initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_weight,
                                 bos_token_id=cfg.n_token - 1, eos_token_id=cfg.n_token - 1)
            self.hf = tf.GPT2LMHeadModel(hcfg)
        h = self.hf.config
        if h.vocab_size != cfg.n_token:
            raise ValueError(f"model.n_token={cfg.n_token} but GPT-2 {g.pretrained or ''} has vocab_size "
                             f"{h.vocab_size}: prepare the shards with its tokenizer (tokenizer.kind=huggingface)")
        if getattr(h, "add_cross_attention", False):
            raise ValueError("a GPT-2 with cross-attention is not a language model of this family")
        self.n_layer, self.d_model, self.n_head = h.n_layer, h.n_embd, h.n_head
        self.d_head = h.n_embd // h.n_head
        self.n_positions = h.n_positions
        bad = [i for i in g.layers if not 0 <= i < self.n_layer]
        if bad:
            raise ValueError(f"model.gpt2_ltm.layers={g.layers}: layers {bad} are outside 0..{self.n_layer - 1}")
        self.tgt_len, self.mem_len = cfg.tgt_len, cfg.mem_len
        if self.tgt_len + self.mem_len > self.n_positions:
            raise ValueError(f"model.tgt_len + model.mem_len = {self.tgt_len + self.mem_len} exceeds GPT-2's "
                             f"{self.n_positions} positions")
        # The long-term memory (built after GPT-2: the same seed gives the same GPT-2 weights).
        self.ltm_layers = (list(g.layers) or list(range(self.n_layer))) if g.long_term else []
        self.slot = {layer: k for k, layer in enumerate(self.ltm_layers)}
        self.ltm_cfg = g.memory
        self.chunk = g.memory.chunk or cfg.tgt_len
        self.basis = GaussianBasis(g.memory.n_basis, g.memory.widths)
        self.ltm = nn.ModuleList(LongTermAttention(self.d_model, self.n_head, self.d_head, g.memory.n_basis,
                                                   g.memory.gate) for _ in self.ltm_layers)
        self._ridge: dict = {}
        self.progress = 0.0

    def export_config(self, section: dict) -> dict:
        """An export rebuilds GPT-2 from its config alone (no pretrained directory at load time)."""
        hf = {k: v for k, v in self.hf.config.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {**section, "gpt2_ltm": {**section["gpt2_ltm"], "pretrained": "", "hf_config": hf}}

    # -- lengths --------------------------------------------------------------------------
    def eval_mem_len(self, tgt_len: int) -> int:
        return min(span_keeping_mem_len(self.cfg.mem_len, self.cfg.tgt_len, tgt_len), self._max_memory(tgt_len))

    def _max_memory(self, tgt_len: int) -> int:
        """The most memory a window of ``tgt_len`` new tokens may keep within GPT-2's positions."""
        return max(self.n_positions - tgt_len - (self.chunk - 1 if self.ltm_layers else 0), 0)

    def resolve_eval_lengths(self, tgt_len: int, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                             same_length: Optional[bool] = None, cmem_len: Optional[int] = None) -> dict:
        self.refuse_lengths(clamp_len=clamp_len, same_length=same_length, cmem_len=cmem_len)
        if not 1 <= tgt_len <= self.n_positions:
            raise ValueError(f"tgt_len={tgt_len} must be in [1, {self.n_positions}] (GPT-2's positions)")
        mem = self.eval_mem_len(tgt_len) if mem_len is None else mem_len
        if mem < 0:
            raise ValueError(f"mem_len={mem} must be >= 0 (or -1 for the training attention span)")
        if mem > self._max_memory(tgt_len):
            raise ValueError(f"mem_len={mem} with tgt_len={tgt_len} exceeds GPT-2's {self.n_positions} positions "
                             f"(at most {self._max_memory(tgt_len)})")
        return {"tgt_len": tgt_len, "mem_len": mem}

    def window_lengths(self, context: int, clamp_len: Optional[int] = None) -> dict:
        return {"tgt_len": context, "mem_len": 0}

    def max_context(self) -> Optional[int]:
        return self.n_positions

    def generation_lengths(self, mem_len: int = 0, clamp_len: Optional[int] = None) -> tuple[int, dict]:
        if clamp_len is not None:
            raise ValueError(f"clamp_len={clamp_len}: GPT-2 has absolute positions; leave it unset")
        mem = min(mem_len or self.mem_len, self._max_memory(1))
        return min(self.tgt_len, self.n_positions - mem), {"mem_len": mem}

    # -- memory ---------------------------------------------------------------------------
    def init_memory(self, batch_size: int, device=None) -> GPT2LTMMemory:
        p = next(self.parameters())
        device = device if device is not None else p.device
        tokens = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        if not self.ltm_layers:
            return GPT2LTMMemory(tokens=tokens)
        empty = p.new_zeros(batch_size, len(self.ltm_layers), 0, self.d_model, device=device)
        return GPT2LTMMemory(tokens=tokens, pending=empty, coef=empty.clone())

    def _memories(self, memory: Optional[Memory], batch: int):
        if memory is None:
            return None, None, None, None, None
        if not isinstance(memory, GPT2LTMMemory):
            raise TypeError(f"GPT2LTM expects GPT2LTMMemory, got {type(memory).__name__}")
        tokens = memory.tokens
        if tokens is not None and (tokens.dim() != 2 or tokens.size(0) != batch):
            raise ValueError(f"memory.tokens has shape {tuple(tokens.shape)}, expected [{batch}, m]")
        out = []
        for name, rows in (("pending", None), ("coef", self.ltm_cfg.n_basis)):
            t = getattr(memory, name)
            ok = t is None or (t.dim() == 4 and t.size(0) == batch and t.size(1) == len(self.ltm_layers)
                               and t.size(3) == self.d_model and (rows is None or t.size(2) in (0, rows)))
            if not ok:
                raise ValueError(f"memory.{name} has shape {tuple(t.shape)}, expected ({batch}, "
                                 f"{len(self.ltm_layers)}, {'rows' if rows is None else rows}, {self.d_model})")
            out.append(None if t is None or t.size(2) == 0 else t)
        if out[1] is not None and (memory.writes is None or tuple(memory.writes.shape) != (batch,)):
            raise ValueError(f"memory.writes must be [{batch}] beside a written memory.coef")
        return tokens, out[0], out[1], memory.hist, memory.writes

    # -- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, targets: Optional[Tensor] = None, memory: Optional[Memory] = None,
                *, doc_start: Optional[Tensor] = None, return_logprobs: bool = False) -> ModelOutput:
        batch, q = input_ids.shape
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != input_ids shape {tuple(input_ids.shape)}")
        tokens, pending, coef, hist, writes = self._memories(memory, batch)
        ctx = tokens.to(input_ids.device) if tokens is not None else input_ids.new_empty(batch, 0)
        window = torch.cat([ctx, input_ids], dim=1)
        m, w = ctx.size(1), window.size(1)
        if w > self.n_positions:
            raise ValueError(f"a window of {m} memory + {q} new tokens exceeds GPT-2's {self.n_positions} positions; "
                             f"lower tgt_len or mem_len")
        docs = documents.track(doc_start, None if memory is None else memory.doc_len, batch, q, input_ids.device)
        t = self.hf.transformer
        dtype = t.wte.weight.dtype
        if pending is not None:
            pending, coef = pending.to(dtype), None if coef is None else coef.to(dtype)
            n_pending = pending.size(2)
            for k in range(0, n_pending, self.chunk):
                clean = None if docs is None else docs[1] >= m + n_pending - k
                coef, writes = self._write(pending[:, :, k: k + self.chunk], coef, hist, writes, clean)
        elif coef is not None:
            coef = coef.to(dtype)
        if docs is None:
            attend, positions, reader = None, torch.arange(w, device=window.device).unsqueeze(0), None
        else:
            attend, positions = documents.window_visibility(docs, m)
            # Only a position whose document began before the window reads the long-term memory
            # (what it holds is then that document's: models/documents.py, the ∞-former's rule).
            own = positions == torch.arange(w, device=window.device)
            reader = None if writes is None else (own & (writes > 0).unsqueeze(1)).unsqueeze(-1)
        h = t.drop(t.wte(window) + t.wpe(positions))
        reads: list = []
        keep: list = []
        for i, block in enumerate(t.h):
            slot = self.slot.get(i)
            a = block.ln_1(h)
            if slot is not None:
                keep.append(a.detach())
            h = h + self._attention(block.attn, a, attend, i, None if (slot is None or coef is None) else
                                    (slot, coef, reader, reads))
            h = h + block.mlp(block.ln_2(h))
        z = t.ln_f(h)[:, m:]
        logits = self.hf.lm_head(z).float()
        loss = nll = None
        if targets is not None:
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            loss = nll.mean()
        new_memory = self._update(window, keep, coef, writes, reads, dtype)
        if docs is not None:
            new_memory.doc_len = documents.next_doc_len(*docs)
        aux = None
        if self.training and reads and self.ltm_cfg.kl_weight > 0:
            readers = (writes > 0).view(-1, 1, 1) if reader is None else reader.view(batch, 1, w)
            aux = self._kl(reads, readers.float())
        return ModelOutput(loss=loss, nll=nll, memory=new_memory, aux_loss=aux,
                           logprobs=F.log_softmax(logits, dim=-1) if return_logprobs else None)

    def _attention(self, attn: nn.Module, a: Tensor, attend: Optional[Tensor], layer: int, ltm) -> Tensor:
        """GPT-2's attention (its own modules and scaling), plus the long-term read of ``ltm =
        (slot, coef, reader, reads)`` added before the output dropout."""
        B, W, _ = a.shape
        H, D = self.n_head, self.d_head
        qkv = attn.c_attn(a)
        qh, kh, vh = (x.view(B, W, H, D).transpose(1, 2) for x in qkv.split(self.d_model, dim=2))
        cfg = self.hf.config
        scale = (1.0 / math.sqrt(D)) if cfg.scale_attn_weights else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
        y = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attend, is_causal=attend is None, scale=scale,
                                           dropout_p=attn.attn_dropout.p if self.training else 0.0)
        out = attn.c_proj(y.transpose(1, 2).reshape(B, W, H * D))
        if ltm is not None:
            slot, coef, reader, reads = ltm
            z, mu, var = self.ltm[slot](qh * (1.0 / math.sqrt(D)), coef[:, slot], self.basis, self.ltm_cfg.min_var)
            reads.append((mu, var))
            out = out + (z if reader is None else z * reader.to(z.dtype))
        return attn.resid_dropout(out)

    @torch.no_grad()
    def _update(self, window: Tensor, keep: list, coef: Optional[Tensor], writes: Optional[Tensor],
                reads: list, dtype: torch.dtype) -> GPT2LTMMemory:
        """Keep the last ``mem_len`` window tokens (with a long-term memory: plus the rows short of a
        whole chunk); the layer inputs of those that leave are written at the next forward."""
        w = window.size(1)
        over = max(0, w - self.mem_len)
        if not self.ltm_layers:
            return GPT2LTMMemory(tokens=window[:, over:].contiguous())
        empty = keep[0].new_zeros(window.size(0), len(keep), 0, self.d_model)
        if self.mem_len == 0:               # no recurrence: nothing kept, nothing written
            n_out, pending = w, empty
        else:
            n_out = (over // self.chunk) * self.chunk
            pending = torch.stack([x[:, :n_out] for x in keep], dim=1)
        return GPT2LTMMemory(tokens=window[:, n_out:].contiguous(), pending=pending.contiguous(),
                             coef=empty if coef is None else coef.detach().contiguous(),
                             hist=self._histograms(reads, dtype), writes=writes)
