"""The ∞-former's continuous long-term memory (models/modules/continuous.py, models/infinite_former.py)
against the paper's definitions: the closed form against numerical integration, G against a
direct solve, reconstruction of smooth signals (and not of noise), the update's geometry, sticky
sampling, a cost per token that does not grow with the context, the KL regulariser, and the
streamed model against tests/naive_infinite.py (also in the family contract).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from naive_infinite import naive_infinite
from streamed import stream
from torch.utils.flop_counter import FlopCounterMode

from models import ModelConfig, build_model
from models.infinite_former import InfiniteFormerConfig, InfiniteMemory
from models.modules.continuous import (
    GaussianBasis,
    attention_histogram,
    first_positions,
    ridge_matrix,
    sample_positions,
    update_positions,
)

V = 31


def config(**ltm) -> ModelConfig:
    c = dict(n_basis=8, widths=[0.1, 0.3], n_samples=6) | ltm
    return ModelConfig(family="infinite_former", n_token=V, n_layer=2, d_model=16, n_head=2, d_head=8,
                       d_inner=32, dropout=0.0, tgt_len=4, mem_len=4, init_std=0.3,
                       infinite_former=InfiniteFormerConfig(**c))


def model_for(seed: int = 0, **ltm):
    torch.manual_seed(seed)
    return build_model(config(**ltm))


def toks(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))



def smooth(L: int, e: int, seed: int = 0, phase: bool = False) -> torch.Tensor:
    """A sum of sines of at most 7 whole cycles over [0, 1] at the first-write positions, ``[L, e]``
    (zero at both ends unless ``phase``)."""
    g = torch.Generator().manual_seed(seed)
    t = first_positions(L).unsqueeze(1)
    out = torch.zeros(L, e, dtype=torch.float64)
    for _ in range(4):
        f = torch.randint(1, 8, (1, e), generator=g).double()
        shift = torch.rand(1, e, generator=g, dtype=torch.float64) * 6 if phase else 0.0
        out += torch.randn(1, e, generator=g, dtype=torch.float64) * torch.sin(2 * math.pi * f * t + shift)
    return out


# ----------------------------------------------------------------------------- the math


def test_closed_form_equals_numerical_integration():
    b = GaussianBasis(8, [0.01, 0.05])
    mu = torch.tensor([0.2, 0.55, 0.9], dtype=torch.float64)
    var = torch.tensor([1e-3, 4e-2, 2e-4], dtype=torch.float64)
    t = torch.linspace(-3, 4, 700_001, dtype=torch.float64)
    for m, v in zip(mu, var):
        density = torch.exp(-0.5 * (t - m) ** 2 / v) / torch.sqrt(2 * math.pi * v)
        numeric = torch.trapezoid(density.unsqueeze(1) * b.evaluate(t), t, dim=0)
        closed = b.expectation(m.view(1), v.view(1))[0]
        torch.testing.assert_close(closed, numeric, rtol=1e-6, atol=1e-12)


def test_closed_form_passes_gradcheck():
    b = GaussianBasis(6, [0.02, 0.1])
    mu = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    var = torch.tensor([0.01, 0.003], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, v: b.expectation(m, v), (mu, var))


def test_ridge_matrix_equals_a_direct_solve():
    b = GaussianBasis(16, [0.05, 0.1])
    t = first_positions(24)
    F = b.evaluate(t).t()
    direct = F.t() @ torch.linalg.inv(F @ F.t() + 0.5 * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(ridge_matrix(b, t, 0.5, pad=False), direct, rtol=1e-9, atol=1e-12)
    # Padded: the ridge fit of [zeros; X; zeros] at the padded positions, by least squares.
    x = smooth(24, 3)
    G = ridge_matrix(b, t, 0.5)
    pad = torch.cat([-(torch.arange(12, 0, -1) / 24.0), t, 1 + torch.arange(1, 13) / 24.0]).double()
    A = torch.cat([b.evaluate(pad), math.sqrt(0.5) * torch.eye(16, dtype=torch.float64)])
    y = torch.cat([torch.zeros(12, 3), x, torch.zeros(12 + 16, 3)]).double()
    direct = torch.linalg.lstsq(A, y).solution           # QR: better conditioned than the normal equations
    assert ((G.t() @ x - direct).norm() / direct.norm()).item() < 1e-6


def test_the_memory_keeps_smooth_signals_and_not_noise():
    """N = 512, L = 1024: a smooth signal comes back within 1 %; white noise does not (the LTM is a
    low-pass memory: it summarises, it does not recall i.i.d. vectors)."""
    b = GaussianBasis(512, [0.01, 0.05])
    t = first_positions(1024)
    G = ridge_matrix(b, t, 1.0)
    psi = b.evaluate(t)
    x = smooth(1024, 8)
    rel = ((psi @ (G.t() @ x) - x).norm() / x.norm()).item()
    assert rel < 1e-2, rel
    # The zero pseudo-observations beside [0, 1] (the reference's padding) pull the ends of a
    # signal that does not vanish there toward 0; away from the ends it is kept as well.
    x = smooth(1024, 8, phase=True)
    err = psi @ (G.t() @ x) - x
    assert (err[50:-50].norm() / x[50:-50].norm()).item() < 1e-2
    assert (err.norm() / x.norm()).item() > 1e-2
    noise = torch.randn(1024, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert ((psi @ (G.t() @ noise) - noise).norm() / noise.norm()).item() > 0.5


def test_update_geometry():
    pos = update_positions(512, 1024, 0.75)
    old, new = pos[:512], pos[512:]
    assert old.min() > 0 and old.max() == pytest.approx(0.75) and (old <= 0.75).all()
    assert (new > 0.75).all() and new.max() == pytest.approx(1.0)
    assert (pos.diff() > 0).all()


def _first_segment_errors(hist_fn, updates: int = 8) -> list[float]:
    """Relative error of the first segment's reconstruction after each update (sorting constants)."""
    b = GaussianBasis(512, [0.01, 0.05])
    L, M, tau = 1024, 512, 0.75
    g_first = ridge_matrix(b, first_positions(L), 1.0)
    g_update = ridge_matrix(b, update_positions(M, L, tau), 1.0)
    first = smooth(L, 8, seed=10)
    coef = g_first.t() @ first
    errors, lo, hi = [], 0.0, 1.0                          # where the first segment sits now
    for k in range(updates):
        s = sample_positions(hist_fn(lo, hi), M)[0, 0]
        old = b.evaluate(s) @ coef
        coef = g_update.t() @ torch.cat([old, smooth(L, 8, seed=20 + k)])
        # the first segment's interval, mapped through the old samples' placement at kτ/M
        lo, hi = (tau * float((s < lo).sum()) / M, tau * float((s <= hi).sum()) / M)
        t = lo + (hi - lo) * first_positions(L)
        errors.append(((b.evaluate(t) @ coef - first).norm() / first.norm()).item())
    return errors


def test_sticky_sampling_keeps_the_attended_region():
    """Half the attention on the first segment: after 8 updates it is reconstructed better than with
    uniform sampling, whose error keeps growing (the paper's memory-length / precision trade-off)."""
    D = 128

    def uniform(lo, hi):
        return torch.full((1, 1, D), 1.0 / D, dtype=torch.float64)

    def sticky(lo, hi):
        centres = (torch.arange(D, dtype=torch.float64) + 0.5) / D
        inside = ((centres >= lo) & (centres <= hi)).double()
        if inside.sum() == D:                                  # it still fills the whole signal
            return uniform(lo, hi)
        h = 0.5 * inside / inside.sum() + 0.5 * (1 - inside) / (1 - inside).sum()
        return h.view(1, 1, D)

    u, s = _first_segment_errors(uniform), _first_segment_errors(sticky)
    assert all(b >= a - 1e-9 for a, b in zip(u, u[1:])), u              # uniform: grows monotonically
    # Half the samples is less than the segment's share while it still covers most of the signal
    # (updates 1-2: 75 %, 56 %), more once it has shrunk: sticky loses less in the end
    # (measured 0.39 against 0.57 after 8 updates).
    assert s[-1] < 0.8 * u[-1], (s, u)


def test_attention_histogram_and_inverse_cdf_sampling():
    mu = torch.tensor([[0.25, 0.26, 0.85]])
    var = torch.tensor([[1e-4, 1e-4, 1e-4]])
    h = attention_histogram(mu, var, 10)
    assert h.shape == (1, 10) and h.sum().item() == pytest.approx(1.0)
    assert h[0, 2] == pytest.approx(2 / 3, abs=1e-3) and h[0, 8] == pytest.approx(1 / 3, abs=1e-3)
    s = sample_positions(h, 30)
    assert (s.diff() >= 0).all() and ((s >= 0.2) & (s < 0.3)).sum() == 20 and ((s >= 0.8) & (s < 0.9)).sum() == 10
    flat = sample_positions(torch.ones(1, 4), 8)
    torch.testing.assert_close(flat[0], (torch.arange(8, dtype=torch.float64) + 0.5) / 8)


# ----------------------------------------------------------------------------- the model


@torch.no_grad()
def test_streamed_model_equals_the_naive_model_and_uses_the_ltm():
    model = model_for().eval()
    x = toks(2, 4 * 7 + 1)
    outs, memory = stream(model, x, 4)
    got = torch.cat([o.nll for o in outs], dim=1)
    torch.testing.assert_close(got, naive_infinite(model, x, 4), rtol=1e-5, atol=1e-5)
    assert memory.writes.tolist() == [5, 5]                          # forwards 3..7 each wrote a chunk
    for ltm in model.ltm:                                            # an LTM that reads nothing
        ltm.out.weight.zero_()
    plain = torch.cat([o.nll for o in stream(model, x, 4)[0]], dim=1)
    assert torch.equal(plain[:, :8], got[:, :8]) and (plain[:, 8:] - got[:, 8:]).abs().max() > 1e-3


def test_shapes_and_state():
    model = model_for().eval()
    x = toks(3, 4 * 4 + 1)
    _, memory = stream(model, x, 4)
    assert isinstance(memory, InfiniteMemory)
    assert memory.coef.shape == (3, 2, 8, 16) and memory.hidden.shape == (3, 2, 4, 16)
    assert memory.pending.shape == (3, 2, 4, 16) and memory.hist is None
    assert all(t is None or not t.requires_grad for t in memory.tensors().values())
    sticky = model_for(sticky=True, n_bins=16).eval()
    _, mem = stream(sticky, x, 4)
    assert mem.hist.shape == (3, 2, 16)
    torch.testing.assert_close(mem.hist.sum(-1), torch.ones(3, 2))


def test_gradients_reach_the_gate_and_the_ltm_but_not_older_memory():
    model = model_for()
    model.train()
    x = toks(2, 4 * 4 + 1)
    outs, memory = stream(model, x, 4)
    outs[-1].objective.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for part in ("gate", "key", "value", "out", "mu", "var"):
        assert any(n.startswith("ltm.") and f".{part}." in n for n in names), part
    assert outs[-1].aux_loss is not None and outs[-1].aux_loss > 0   # the KL regulariser
    assert not memory.coef.requires_grad


def test_kl_regulariser_is_the_kl_divergence():
    model = model_for(kl_weight=1.0, kl_mu0=0.5)
    mu = torch.tensor([[[0.1, 0.9]]])
    var = torch.tensor([[[0.01, 0.04]]])
    s0 = 0.05 ** 2
    expected = sum(0.5 * (v / s0 - math.log(v / s0) - 1 + (m - 0.5) ** 2 / s0)
                   for m, v in zip(mu.flatten().tolist(), var.flatten().tolist())) / 2
    got = model._kl([(mu, var)], torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert model._kl([(mu, var)], torch.tensor([0])).item() == 0.0   # an unwritten LTM is not regularised


@torch.no_grad()
def test_cost_per_token_does_not_grow_with_the_context():
    """Counted, not timed: the forward after 2 chunks written costs what it costs after 48."""
    model = model_for(n_basis=16, widths=[0.1]).eval()
    x = toks(1, 4 * 51 + 1)

    def flops_at(n: int) -> int:
        _, memory = stream(model, x[:, : 4 * n + 1], 4)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x[:, 4 * n: 4 * n + 4], x[:, 4 * n + 1: 4 * n + 5], memory=memory)
        return counter.get_total_flops()

    # forwards 3 and 4 wrote the first two chunks: from then on every forward reads and updates
    assert flops_at(4) == flops_at(50)


def test_ridge_matrices_stay_float64_under_bf16():
    model = model_for().to(torch.bfloat16)
    g_first, g_update = model.ridge_matrices("cpu")
    assert g_first.dtype == g_update.dtype == torch.float64
    assert g_first.shape == (4, 8) and g_update.shape == (6 + 4, 8)
    model.eval()
    with torch.no_grad():
        outs, _ = stream(model, toks(2, 4 * 5 + 1), 4)
    assert all(torch.isfinite(o.nll).all() for o in outs)


@pytest.mark.parametrize("change, needle", [
    (dict(tau=1.0), "tau"), (dict(n_basis=7), "multiple"), (dict(ridge=0.0), "ridge"),
    (dict(widths=[]), "widths"), (dict(chunk=-1), "chunk"),
])
def test_bad_settings_are_refused_by_name(change, needle):
    cfg = config()
    cfg.infinite_former = dataclasses.replace(cfg.infinite_former, **change)
    with pytest.raises(ValueError, match=f"model.infinite_former.{needle}|{needle}"):
        build_model(cfg)


@torch.no_grad()
def test_one_token_at_a_time_writes_whole_chunks():
    """Generation feeds one token per forward: rows still leave the STM in whole chunks, so the
    LTM gets the same writes as with segments of one chunk (segment = chunk = 4 here)."""
    model = model_for().eval()
    x = toks(1, 4 * 6 + 1)
    by_segment = torch.cat([o.nll for o in stream(model, x, 4)[0]], dim=1)
    with model.eval_lengths(tgt_len=1):
        by_token = torch.cat([o.nll for o in stream(model, x, 1)[0]], dim=1)
    # The STM differs inside a segment (one token sees up to mem_len + chunk - 1 rows), so compare
    # the LTM: both runs wrote the same chunks.
    _, mem_a = stream(model, x, 4)
    with model.eval_lengths(tgt_len=1):
        _, mem_b = stream(model, x, 1)
    assert mem_a.writes.tolist() == mem_b.writes.tolist()
    torch.testing.assert_close(mem_a.coef, mem_b.coef, rtol=1e-5, atol=1e-5)
    assert by_token.shape == by_segment.shape
