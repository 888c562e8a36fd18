"""The ∞-former's continuous long-term memory (Martins et al., ACL 2022, "Long-term memory").

A memory of L vectors ``X [L, e]`` at positions ``t_i ∈ [0, 1]`` is kept as the coefficients
``B [N, e]`` of N Gaussian radial basis functions ψ_j(t) = 𝒩(t; μ_j, σ_j²), fitted by ridge
regression: ``B = Gᵀ X`` with ``G = Fᵀ(FFᵀ + λI)⁻¹``, ``F = [ψ(t_1) … ψ(t_L)]``. The signal is
``X̄(t) = Bᵀψ(t)``: a smooth (low-pass) summary; i.i.d. vectors are not recalled exactly.

Reading is continuous softmax attention: a query gives a Gaussian 𝒩(μ, σ²) over [0, 1] and reads
``E[X̄(t)]``, whose basis part has the closed form ``E[ψ_j(t)] = 𝒩(μ; μ_j, σ² + σ_j²)`` (the
integral over the real line). Writing contracts the old signal into (0, τ] by sampling it at M
positions and places the new vectors in (τ, 1]; with sticky memories the M positions follow the
previous step's attention (more samples where it looked). G matrices are computed in float64
from the positions alone and cached per length, outside the module's buffers so ``.to(bf16)``
never rounds them (cond(FFᵀ+λI) ≈ 5e5); they are cast to the memory's dtype only when applied.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SQRT2 = math.sqrt(2.0)


def gaussian(t: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """𝒩(t; mu, var), broadcasting."""
    return torch.exp(-0.5 * (t - mu) ** 2 / var) / torch.sqrt(2 * math.pi * var)


class GaussianBasis:
    """N = len(widths) × N/len(widths) basis functions: centres ``linspace(0, 1, N / |W|)``, every
    width at every centre (interleaved per centre, the reference's order); widths are std devs."""

    def __init__(self, n_basis: int, widths: Sequence[float]):
        if n_basis % len(widths):
            raise ValueError(f"n_basis={n_basis} must be a multiple of the {len(widths)} widths")
        centres = torch.linspace(0.0, 1.0, n_basis // len(widths), dtype=torch.float64)
        w = torch.tensor(list(widths), dtype=torch.float64)
        self.mu = centres.repeat_interleave(len(widths))             # [N]
        self.sigma = w.repeat(n_basis // len(widths))                # [N]
        self.n = n_basis

    def evaluate(self, t: Tensor) -> Tensor:
        """ψ(t): ``[..., N]`` for positions ``t [...]`` (float64 in, float64 out)."""
        return gaussian(t.unsqueeze(-1), self.mu.to(t.device), (self.sigma ** 2).to(t.device))

    def expectation(self, mu: Tensor, var: Tensor) -> Tensor:
        """E_{𝒩(t; mu, var)}[ψ_j(t)] = 𝒩(mu; μ_j, var + σ_j²): ``[..., N]`` for ``mu, var [...]``."""
        mu_j = self.mu.to(mu.device, mu.dtype)
        var_j = (self.sigma ** 2).to(mu.device, mu.dtype)
        return gaussian(mu.unsqueeze(-1), mu_j, var.unsqueeze(-1) + var_j)


def ridge_matrix(basis: GaussianBasis, positions: Tensor, ridge: float, pad: bool = True) -> Tensor:
    """``G [P, N]`` (float64) such that ``B = Gᵀ X`` fits values X at ``positions [P]``.

    With ``pad`` the fit also sees P/2 zero-valued points each side of [0, 1], spaced as the mean
    spacing (the reference's padding), so the signal does not ring at the ends; their rows of G
    are dropped because their values are zero."""
    t = positions.to(torch.float64)
    n_pad = t.numel() // 2 if pad else 0
    if n_pad:
        step = 1.0 / t.numel()
        left = -step * torch.arange(n_pad, 0, -1, dtype=torch.float64)
        right = 1.0 + step * torch.arange(1, n_pad + 1, dtype=torch.float64)
        t = torch.cat([left, t, right])
    F = basis.evaluate(t).t()                                          # [N, P']
    A = F @ F.t() + ridge * torch.eye(basis.n, dtype=torch.float64)
    G = torch.linalg.solve(A, F).t()                                   # Fᵀ(FFᵀ+λI)⁻¹, A symmetric
    return G[n_pad: n_pad + positions.numel()]


def first_positions(L: int) -> Tensor:
    """Positions of the first L vectors written: ``(i - ½)/L``, i = 1..L (the reference's)."""
    return (torch.arange(L, dtype=torch.float64) + 0.5) / L


def update_positions(M: int, L: int, tau: float) -> Tensor:
    """Old samples at ``kτ/M`` (k = 1..M, in (0, τ]), new vectors at ``τ + (1-τ)j/L`` (in (τ, 1])."""
    k = torch.arange(1, M + 1, dtype=torch.float64)
    j = torch.arange(1, L + 1, dtype=torch.float64)
    return torch.cat([k * tau / M, tau + (1 - tau) * j / L])


def attention_histogram(mu: Tensor, var: Tensor, n_bins: int) -> Tensor:
    """Sticky memories' density ``[..., D]`` over D equal bins of [0, 1]: per bin, the Gaussians'
    mass ``Φ((e_{j+1}-μ)/σ) - Φ((e_j-μ)/σ)`` summed over the queries (the last dim of ``mu``),
    normalised to 1 (mass outside [0, 1] is dropped; uniform where there is none)."""
    edges = torch.linspace(0.0, 1.0, n_bins + 1, device=mu.device, dtype=torch.float64)
    sd = var.double().sqrt().unsqueeze(-1)
    cdf = 0.5 * (1 + torch.erf((edges - mu.double().unsqueeze(-1)) / (sd * SQRT2)))   # [..., Q, D+1]
    mass = (cdf[..., 1:] - cdf[..., :-1]).sum(dim=-2)                                   # [..., D]
    total = mass.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(mass, 1.0 / n_bins)
    return torch.where(total > 0, mass / total.clamp(min=1e-300), uniform)


def sample_positions(hist: Tensor, M: int) -> Tensor:
    """M positions ``[..., M]`` in [0, 1] by inverse CDF of the piecewise-uniform density ``hist
    [..., D]`` at the quantiles ``(k - ½)/M``: deterministic, sorted, denser where hist is high
    (a uniform hist gives the midpoints ``(k - ½)/M``). The reference draws bins i.i.d. and takes
    their left edges, which duplicates positions and flattens the signal into plateaus."""
    D = hist.size(-1)
    h = hist.double()
    h = h / h.sum(-1, keepdim=True).clamp(min=1e-300)
    cdf = torch.cat([torch.zeros_like(h[..., :1]), h.cumsum(-1)], dim=-1)
    u = ((torch.arange(M, device=hist.device, dtype=torch.float64) + 0.5) / M).expand(*h.shape[:-1], M)
    j = torch.searchsorted(cdf[..., 1:].contiguous(), u.contiguous(), right=True).clamp(max=D - 1)
    lo = cdf.gather(-1, j)
    width = h.gather(-1, j).clamp(min=1e-300)
    frac = ((u - lo) / width).clamp(0.0, 1.0)
    return (j.double() + frac) / D
