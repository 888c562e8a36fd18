"""The CPU dropout: rate, scaling, gradient, determinism, and nn.Dropout behaviour elsewhere."""
from __future__ import annotations

import pytest
import torch

from models.modules.dropout import Dropout, cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_rate_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(2_000_000)
    y = cpu_dropout(x, p)
    p_q = round(p * 65536) / 65536
    dropped = (y == 0).double().mean().item()
    # Binomial std for 2M draws is < 4e-4; allow 5 sigma.
    assert abs(dropped - p_q) < 2e-3, dropped
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p_q)), rtol=0, atol=1e-6)
    assert abs(y.double().mean().item() - 1.0) < 5e-3  # expectation preserved


def test_positions_are_independent_of_the_value_layout():
    torch.manual_seed(1)
    y = cpu_dropout(torch.ones(1000, 1000), 0.3)
    rows, cols = (y == 0).double().mean(1), (y == 0).double().mean(0)
    assert rows.std() < 0.03 and cols.std() < 0.03  # no striping from the 16-bit lanes
    lanes = (y.view(-1, 4) == 0).double().mean(0)
    assert (lanes - 0.3).abs().max() < 5e-3


def test_gradient_is_mask_times_scale():
    torch.manual_seed(2)
    x = torch.randn(64, 33, requires_grad=True)
    y = cpu_dropout(x, 0.2)
    g = torch.randn_like(y)
    y.backward(g)
    keep = y.detach() != 0
    scale = 1 / (1 - round(0.2 * 65536) / 65536)
    torch.testing.assert_close(x.grad, torch.where(keep, g * scale, 0.0))
    torch.testing.assert_close(y.detach(), torch.where(keep, x.detach() * scale, 0.0))


def test_seeded_and_module_semantics():
    x = torch.randn(3, 50)
    torch.manual_seed(5)
    a = cpu_dropout(x, 0.5)
    torch.manual_seed(5)
    b = cpu_dropout(x, 0.5)
    assert torch.equal(a, b)
    drop = Dropout(0.5)
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.5
    assert torch.equal(drop.eval()(x), x)  # identity in eval mode
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.count_nonzero(Dropout(1.0).train()(x)) == 0
    y = drop.train()(x)
    assert y.shape == x.shape and torch.count_nonzero(y) < x.numel()
    assert cpu_dropout(torch.randn(4, 5, dtype=torch.bfloat16), 0.3).dtype == torch.bfloat16
