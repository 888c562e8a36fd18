"""The Compressive Transformer written out from the paper, to check the model against.

Per segment and layer: keys are the rows ``[compressed; memory; segment]`` kept as Python lists,
scores from Dai et al.'s four terms with every query-key distance written out (no rel_shift, no
mask tensor: a future key is skipped), then the memory update of Rae et al.'s Algorithm 1 done on
the lists. Only the shared blocks — embedding, feed-forward, LayerNorm, the output softmax and
the layer's compression function f_c — are the model's own modules (each tested on its own).
Eval mode only (no dropout).
"""
from __future__ import annotations

import math

import torch

from naive_positions import naive_sinusoid


def naive_layer(model, layer, h: torch.Tensor, memory: list, extra=None):
    """One post-LN Transformer-XL layer over ``memory`` (rows [B, d], oldest first) and the segment
    ``h [B, q, d]``: Dai et al.'s four terms with each distance written out, a future key skipped.
    ``extra [B, q, d]`` is added to the output projection. Returns (output, probs [B, H, q, k])."""
    cfg, att = model.cfg, layer.dec_attn
    H, D, d = cfg.n_head, cfg.d_head, cfg.d_model
    q = h.size(1)
    keys = memory + [h[:, t] for t in range(q)]
    M = len(memory)
    Wq, Wk, Wv = att.qkv_net.weight.split(H * D, dim=0)
    kv = torch.stack(keys, dim=1)                                   # [B, K, d]
    Q = (h @ Wq.t()).view(-1, q, H, D)
    K_ = (kv @ Wk.t()).view(-1, len(keys), H, D)
    V = (kv @ Wv.t()).view(-1, len(keys), H, D)
    out = torch.zeros(h.size(0), q, H, D)
    probs = torch.zeros(h.size(0), H, q, len(keys))
    for t in range(q):
        visible = list(range(M + t + 1))                              # everything up to itself
        R = naive_sinusoid([M + t - j for j in visible], d) @ att.r_net.weight.t()   # [n, H*D]
        R = R.view(len(visible), H, D)
        a = torch.einsum("bhd,bjhd->bhj", Q[:, t] + model.r_w_bias, K_[:, visible])
        b = torch.einsum("bhd,jhd->bhj", Q[:, t] + model.r_r_bias, R)
        p = torch.softmax((a + b) / math.sqrt(D), dim=-1)
        probs[:, :, t, : len(visible)] = p
        out[:, t] = torch.einsum("bhj,bjhd->bhd", p, V[:, visible])
    proj = out.flatten(2) @ att.o_net.weight.t()
    if extra is not None:
        proj = proj + extra
    return layer.pos_ff(att.layer_norm(h + proj)), probs


@torch.no_grad()
def naive_compressive(model, tokens: torch.Tensor, segment: int, keep_probs: bool = False):
    """Per-token NLL ``[B, T-1]`` of ``tokens [B, T]`` fed ``segment`` tokens at a time from empty
    memory; with ``keep_probs`` also every forward's probabilities per layer ``[B, H, q, k]`` and
    the (compressed, memory, segment) key counts."""
    cfg, ratio = model.cfg, model.cfg.compressive.ratio
    mem_len, cmem_len = model.mem_len, model.cmem_len          # the lengths set now (evaluation may change them)
    d = cfg.d_model
    mem = [[] for _ in range(cfg.n_layer)]       # rows [B, d], oldest first
    cmem = [[] for _ in range(cfg.n_layer)]
    usage = [[] for _ in range(cfg.n_layer)]     # most_used: attention each memory row has had, [B]
    nlls, seen = [], []
    for s in range(0, tokens.size(1) - 1, segment):
        x, y = tokens[:, s: s + segment], tokens[:, s + 1: s + 1 + segment]
        q = x.size(1)
        h = model.word_emb(x)
        inputs, forward_probs = [], []
        for i, layer in enumerate(model.layers):
            inputs.append(h)
            h, probs = naive_layer(model, layer, h, cmem[i] + mem[i])
            forward_probs.append(probs)
        nlls.append(model.crit(h.reshape(-1, d), y.reshape(-1))[0].view(h.size(0), -1))
        seen.append((forward_probs, (len(cmem[0]), len(mem[0]), q)))
        # Algorithm 1: push the layer inputs, compress what leaves the memory, FIFO both.
        for i in range(cfg.n_layer):
            rows = mem[i] + [inputs[i][:, t] for t in range(q)]
            got = forward_probs[i].mean(dim=(1, 2))[:, len(cmem[i]):]          # [B, m + q]
            used = [u + got[:, j] for j, u in enumerate(usage[i])] + [got[:, j] for j in range(len(mem[i]), len(rows))]
            over = max(0, len(rows) - mem_len)
            n = (over // ratio) * ratio if cmem_len else over
            if cmem_len and n:
                new = model.compress[i](torch.stack(rows[:n], dim=1), torch.stack(used[:n], dim=1))
                cmem[i] = (cmem[i] + [new[:, r] for r in range(new.size(1))])[-cmem_len:]
            mem[i], usage[i] = rows[n:], used[n:]
    nll = torch.cat(nlls, dim=1)
    return (nll, seen) if keep_probs else nll
