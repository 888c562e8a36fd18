"""The ∞-former written out from the paper, to check the model against (uniform sampling).

Short-term attention is tests/naive_compressive.py's naive layer over Python lists of rows. The
long-term memory is rebuilt here from the definitions: Gaussian basis functions from the
config, each write a ridge fit solved by least squares on the stacked system [Fᵀ; √λ I] B = [X; 0]
(with the zero pseudo-observations beside [0, 1]), the old signal sampled at the M midpoints and
contracted into (0, τ], reading by the closed-form Gaussian expectation. Only the gate, the
projections and the shared Transformer-XL blocks are the model's modules. Eval mode only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from naive_compressive import naive_layer


def basis(cfg):
    c = cfg.infinite_former
    centres = torch.linspace(0, 1, c.n_basis // len(c.widths), dtype=torch.float64)
    mu = torch.tensor([float(m) for m in centres for _ in c.widths], dtype=torch.float64)
    sd = torch.tensor([float(w) for _ in centres for w in c.widths], dtype=torch.float64)
    return mu, sd


def psi(t: torch.Tensor, mu, sd) -> torch.Tensor:
    """``[P, N]`` basis values at positions ``t [P]``."""
    t = t.double().unsqueeze(-1)
    return torch.exp(-0.5 * ((t - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def ridge_fit(t: torch.Tensor, x: torch.Tensor, mu, sd, lam: float) -> torch.Tensor:
    """Coefficients ``[B, N, d]`` fitting ``x [B, P, d]`` at ``t [P]``, P/2 zeros padded each side."""
    P = t.numel()
    step = 1.0 / P
    pad = P // 2
    left = torch.tensor([-step * k for k in range(pad, 0, -1)], dtype=torch.float64)
    right = torch.tensor([1.0 + step * k for k in range(1, pad + 1)], dtype=torch.float64)
    tt = torch.cat([left, t.double(), right])
    A = torch.cat([psi(tt, mu, sd), math.sqrt(lam) * torch.eye(mu.numel(), dtype=torch.float64)])
    out = []
    for b in range(x.size(0)):
        y = torch.cat([torch.zeros(pad, x.size(2), dtype=torch.float64), x[b].double(),
                       torch.zeros(pad + mu.numel(), x.size(2), dtype=torch.float64)])
        out.append(torch.linalg.lstsq(A, y).solution)
    return torch.stack(out)


@torch.no_grad()
def naive_infinite(model, tokens: torch.Tensor, segment: int) -> torch.Tensor:
    """Per-token NLL ``[B, T-1]`` of ``tokens`` fed ``segment`` tokens at a time from empty memory."""
    cfg, c = model.cfg, model.cfg.infinite_former
    H, D, d = cfg.n_head, cfg.d_head, cfg.d_model
    mu_j, sd_j = basis(cfg)
    L, M, tau = model.chunk, c.n_samples, c.tau
    n_layer = cfg.n_layer
    mem = [[] for _ in range(n_layer)]
    pending = [[] for _ in range(n_layer)]
    coef = [None] * n_layer
    nlls = []
    for s in range(0, tokens.size(1) - 1, segment):
        x, y = tokens[:, s: s + segment], tokens[:, s + 1: s + 1 + segment]
        h = model.word_emb(x)
        inputs = []
        for i, layer in enumerate(model.layers):
            ltm = model.ltm[i]
            while pending[i]:                          # write what left the STM, one chunk at a time
                rows, pending[i] = torch.stack(pending[i][:L], dim=1), pending[i][L:]
                gated = rows * torch.sigmoid(ltm.gate(rows.transpose(1, 2)).transpose(1, 2)) if ltm.gate else rows
                if coef[i] is None:
                    t = torch.tensor([(j + 0.5) / L for j in range(L)], dtype=torch.float64)
                    coef[i] = ridge_fit(t, gated, mu_j, sd_j, c.ridge)
                else:
                    samples = torch.tensor([(k + 0.5) / M for k in range(M)], dtype=torch.float64)
                    old = psi(samples, mu_j, sd_j) @ coef[i]
                    t = torch.tensor([(k + 1) * tau / M for k in range(M)]
                                     + [tau + (1 - tau) * (j + 1) / L for j in range(L)], dtype=torch.float64)
                    coef[i] = ridge_fit(t, torch.cat([old, gated.double()], dim=1), mu_j, sd_j, c.ridge)
            extra = None
            if coef[i] is not None:
                B = coef[i].float()
                Wq = layer.dec_attn.qkv_net.weight[: H * D]
                q = (h @ Wq.t()).view(h.size(0), -1, H, D)                          # [B, q, H, D]
                K = (B @ ltm.key.weight.t()).view(B.size(0), -1, H, D)              # [B, N, H, D]
                V = (B @ ltm.value.weight.t()).view(B.size(0), -1, H, D)
                scores = torch.einsum("bqhd,bnhd->bhqn", q, K) / math.sqrt(D)
                mu = torch.sigmoid(scores @ ltm.mu.weight[0])                         # [B, H, q]
                var = F.softplus(scores @ ltm.var.weight[0]).clamp(min=c.min_var)
                total = var.double().unsqueeze(-1) + sd_j ** 2
                r = torch.exp(-0.5 * (mu.double().unsqueeze(-1) - mu_j) ** 2 / total) / torch.sqrt(2 * math.pi * total)
                z = torch.einsum("bhqn,bnhd->bqhd", r.float(), V).flatten(2)
                extra = z @ ltm.out.weight.t()
            inputs.append(h)
            h, _ = naive_layer(model, layer, h, mem[i], extra)
        nlls.append(model.crit(h.reshape(-1, d), y.reshape(-1))[0].view(h.size(0), -1))
        for i in range(n_layer):
            rows = mem[i] + [inputs[i][:, t] for t in range(inputs[i].size(1))]
            over = max(0, len(rows) - model.mem_len)
            n = (over // L) * L if model.mem_len else len(rows)
            pending[i] = pending[i] + (rows[:n] if model.mem_len else [])
            mem[i] = rows[n:]
    return torch.cat(nlls, dim=1)
