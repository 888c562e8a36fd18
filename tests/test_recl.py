"""RECL (Dai et al. §4.3) on synthetic per-token losses whose answer is worked out by hand, and
the per-token context losses against direct model calls."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import ModelConfig, build_model
from models.vanilla import sliding_window_nll
from pipeline.evaluation.recl import (
    ReclError,
    context_losses,
    format_table,
    plot_table,
    recl,
    recl_table,
    relative_gain,
    sample_positions,
    top_positions,
)

C = [100, 200, 300, 400]


pytestmark = pytest.mark.usefixtures("one_thread")


def const(n: int, values: dict[int, float]) -> dict[int, np.ndarray]:
    return {c: np.full(n, v) for c, v in values.items()}


def test_single_model_stops_at_first_small_gain():
    # gains 5 %, 0.5 %: the second step is below 1 %, so RECL = 200.
    l100 = 2.0
    l200 = l100 + math.log(0.95)
    l300 = l200 + math.log(0.995)
    losses = {"m": const(8, {100: l100, 200: l200, 300: l300, 400: l300 - 1.0})}
    res = recl(losses, ratio=1.0)["m"]
    assert res["recl"] == 200 and not res["capped"]
    assert res["gains"][0][2] == pytest.approx(0.05)
    assert res["gains"][1][2] == pytest.approx(0.005)
    assert len(res["gains"]) == 2          # the search stops; 400 is never compared


def test_gains_only_count_below_the_group_baseline():
    # B improves a lot on its own (3.0 -> 1.5) but never beats A's short-context loss 1.0:
    # min(b, l_B) = b, so its relative gain is 0 and its RECL is the first context.
    losses = {"A": const(4, {100: 1.0, 200: 1.0, 300: 1.0}),
              "B": const(4, {100: 3.0, 200: 1.5, 300: 0.5})}
    out = recl(losses, ratio=1.0)
    assert out["A"]["recl"] == 100 and out["B"]["recl"] == 100
    assert relative_gain(losses, "B", 100, 200, 1.0) == 0.0
    # At c = 200 the baseline is 1.0 again and B's 0.5 beats it by 1 - e^-0.5.
    assert relative_gain(losses, "B", 200, 300, 1.0) == pytest.approx(1 - math.exp(-0.5))


def test_top_r_hard_positions():
    # Position 3 is hard (baseline 5.0); the model gains 8 % on it at 200, nothing elsewhere.
    n, hard = 10, 3
    l100 = np.ones(n)
    l100[hard] = 5.0
    l200 = l100.copy()
    l200[hard] += math.log(0.92)
    losses = {"m": {100: l100, 200: l200, 300: l200.copy()}}
    table = recl_table(losses, ratios=(0.1, 0.5, 1.0))
    rows = table["models"]["m"]
    # r = 0.1: T = {3}: gain 8 % -> go on; then no gain -> RECL 200.
    assert rows["0.1"]["recl"] == 200
    assert rows["0.1"]["gains"][0][2] == pytest.approx(0.08)
    # r = 0.5: T = 3 and the four first tied positions: gain 1 - 0.92^(1/5) = 1.65 % -> 200.
    assert rows["0.5"]["gains"][0][2] == pytest.approx(1 - 0.92 ** 0.2)
    assert rows["0.5"]["recl"] == 200
    # r = 1.0: all ten: 1 - 0.92^(1/10) = 0.83 % < 1 % -> 100.
    assert rows["1.0"]["gains"][0][2] == pytest.approx(1 - 0.92 ** 0.1)
    assert rows["1.0"]["recl"] == 100
    assert list(top_positions(l100, 0.5)) == [0, 1, 2, 3, 4]
    assert list(top_positions(l100, 0.01)) == [3]                # at least one position


def test_capped_when_every_step_gains():
    losses = {"m": const(5, {c: 3.0 - 0.1 * i for i, c in enumerate(C)})}
    res = recl(losses, ratio=0.5)["m"]
    assert res["capped"] and res["recl"] == 400
    assert "m" in format_table(recl_table(losses)) and ">=400" in format_table(recl_table(losses))


def test_relative_gain_matches_the_formula_written_out():
    rng = np.random.default_rng(0)
    losses = {m: {c: rng.gamma(2.0, 1.0, size=50) for c in C} for m in ("x", "y", "z")}
    for m in losses:
        for r in (0.1, 0.5, 1.0):
            c, c2 = 200, 300
            # b(c, t) over the group, the ceil(r N) largest, then the paper's f and g.
            b = [min(losses[k][c][t] for k in losses) for t in range(50)]
            k = math.ceil(r * 50)
            hard = sorted(range(50), key=lambda t: (-b[t], t))[:k]
            f_cc = sum(min(b[t], losses[m][c][t]) for t in hard) / k
            f_cc2 = sum(min(b[t], losses[m][c2][t]) for t in hard) / k
            want = (math.exp(f_cc) - math.exp(f_cc2)) / math.exp(f_cc)
            assert relative_gain(losses, m, c, c2, r) == pytest.approx(want, rel=1e-12)


def test_bad_inputs_are_named():
    with pytest.raises(ReclError, match="same context lengths"):
        recl({"a": const(3, {1: 1.0, 2: 1.0}), "b": const(3, {1: 1.0, 3: 1.0})}, 1.0)
    with pytest.raises(ReclError, match="one value per position"):
        recl({"a": const(3, {1: 1.0, 2: 1.0}), "b": const(4, {1: 1.0, 2: 1.0})}, 1.0)
    with pytest.raises(ReclError, match="ratio"):
        recl({"a": const(3, {1: 1.0, 2: 1.0})}, 0.0)
    with pytest.raises(ReclError, match="non-finite"):
        recl({"a": {1: np.array([1.0, np.nan]), 2: np.ones(2)}}, 1.0)


def test_plot_is_written(tmp_path):
    losses = {"A": const(4, {100: 2.0, 200: 1.8, 300: 1.79}), "B": const(4, {100: 2.1, 200: 2.0, 300: 2.0})}
    path = plot_table(recl_table(losses), tmp_path / "recl.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- per-token losses


def tiny(family: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, n_token=23, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                      dropout=0.0, tgt_len=kw.pop("tgt_len", 8), mem_len=8, **kw)
    return build_model(cfg).eval()


def test_context_losses_txl_match_direct_windows():
    model = tiny("transformer_xl", clamp_len=-1)
    tokens = torch.randint(0, 23, (200,), generator=torch.Generator().manual_seed(1))
    pos = sample_positions(200, 24, 13, seed=0)
    assert len(pos) == 13 and pos.min() >= 24 and len(set(pos.tolist())) == 13
    got = context_losses(model, tokens.numpy(), pos, [4, 12, 24], batch_size=5)
    assert model.tgt_len == 8 and model.mem_len == 8     # the model's lengths are restored
    for c in (4, 12, 24):
        for k, t in enumerate(pos):
            # One window scored at every position, from empty memory: the last NLL is x_t's.
            model.reset_length(c, 0, 0)
            with torch.no_grad():
                want = model(tokens[None, t - c: t], tokens[None, t - c + 1: t + 1]).nll[0, -1]
            assert got[c][k] == pytest.approx(float(want), abs=1e-5)


def test_context_losses_vanilla_match_sliding_window():
    model = tiny("vanilla", attn_type="learned", tgt_len=16)
    tokens = torch.randint(0, 23, (120,), generator=torch.Generator().manual_seed(2))
    pos = np.arange(16, 120, 7)
    got = context_losses(model, tokens, pos, [6, 16], batch_size=4)
    for c in (6, 16):
        # Al-Rfou's stride-1 window of c tokens: slide[t - 1] predicts x_t from x_{t-c} .. x_{t-1}.
        slide = sliding_window_nll(model, tokens, stride=1, window=c)
        np.testing.assert_allclose(got[c], slide[pos - 1].double().numpy(), atol=1e-5)


def test_a_context_beyond_the_window_gives_the_window():
    """The Al-Rfou model sees at most its window: asked for a longer context it gets its last L
    tokens, the loss of its full window (so its RECL stops there), as a sliding window computes."""
    model = tiny("vanilla", attn_type="learned", tgt_len=16)
    tokens = torch.randint(0, 23, (120,), generator=torch.Generator().manual_seed(3))
    pos = np.arange(40, 120, 9)
    got = context_losses(model, tokens, pos, [16, 32], batch_size=4)
    slide = sliding_window_nll(model, tokens, stride=1, window=16)
    for c in (16, 32):
        np.testing.assert_allclose(got[c], slide[pos - 1].double().numpy(), atol=1e-5)
