"""The CUDA paths against the families' independent references, on a GPU (skipped without one).

What runs differs by device: on CUDA the adaptive softmax takes autograd's route (not the CPU's
hand-written backward), dropout is ``F.dropout``, attention is SDPA's fused kernels, matrix
products are cuBLAS. So every family of the contract (tests/test_family_contract.py) runs its
tiny config on CUDA and is checked against its reference computed on the CPU:

* fp32 (TF32 off): the streamed per-token NLL equals the reference's, and one truncated-BPTT
  pass of gradients (memory carried, train mode, dropout 0) equals the CPU run's;
* bf16 and fp16, under autocast and with the weights in half precision: the NLL within half
  precision's error of the reference, finite gradients close to the fp32 ones.

``XLPIPE_TEST_DEVICE=cpu`` runs the same comparisons on the CPU (a check of the tests themselves).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch
from test_family_contract import SPECS, tokens

from models import REGISTRY, LanguageModel, build_model
from models.modules.attention import set_attention_kernel
from models.modules.dropout import Dropout

DEVICE = torch.device(os.environ.get("XLPIPE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (a lent GPU machine; see benchmarks/bench_gpu.py)")

# family cases: the contract's tiny configs, and the adaptive softmax over clusters with tied
# weights and projections (div_val 1 and 2) on the Transformer-XL, and Al-Rfou's explicit softmax.
_TXL = SPECS["transformer_xl"].cfg
CASES = {f: (f, SPECS[f].cfg, None) for f in sorted(REGISTRY)}
CASES["transformer_xl/adaptive_div1"] = ("transformer_xl", dataclasses.replace(
    _TXL, cutoffs=[10, 20], div_val=1, tie_projs=[False, True, True]), None)
CASES["transformer_xl/adaptive_div2"] = ("transformer_xl", dataclasses.replace(
    _TXL, cutoffs=[10, 20], div_val=2, d_embed=16, tie_projs=[False, True, True], init_std=0.3,
    proj_init_std=0.3), None)
CASES["vanilla/explicit"] = ("vanilla", SPECS["vanilla"].cfg, "explicit")
cases = pytest.mark.parametrize("case", sorted(CASES))


@pytest.fixture(autouse=True)
def _strict_fp32():
    """fp32 means fp32: TF32 matrix products would miss the tolerances by design."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pair(case: str) -> tuple[LanguageModel, LanguageModel, int]:
    """The same fp32 weights twice: on the CPU (the reference's side) and on DEVICE."""
    family, cfg, kernel = CASES[case]
    if family == "gpt2_ltm":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(cfg, dropout=0.0, dropatt=0.0))
    ref, dev = model, copy.deepcopy(model).to(DEVICE)
    set_attention_kernel(dev, kernel)
    return ref, dev, SPECS[family].segment


def sequence(case: str) -> torch.Tensor:
    return tokens(SPECS[CASES[case][0]])      # the contract's tokens for the case's family


def stream(model: LanguageModel, segment: int, toks: torch.Tensor, dtype=None, backward: bool = False,
           scale: float = 1.0):
    """Per-token NLL fed segment by segment with the memory carried (on the model's device), and
    with ``backward`` each segment's objective, times ``scale``, backpropagated (truncated BPTT:
    gradients summed)."""
    device = next(model.parameters()).device
    toks = toks.to(device)
    memory = model.init_memory(toks.size(0), device=device)
    nlls = []
    for i in range(0, toks.size(1) - 1, segment):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(toks[:, i: i + segment], toks[:, i + 1: i + 1 + segment], memory=memory)
        if backward:
            (out.objective * scale).backward()
        nlls.append(out.nll.detach().float().cpu())
        memory = out.memory
    return torch.cat(nlls, dim=1)


def grad_errors(ref: LanguageModel, dev: LanguageModel, scale: float = 1.0) -> dict[str, float]:
    """Per parameter: ‖g_dev / scale − g_ref‖ / ‖g_ref‖ (the CPU gradient the yardstick)."""
    errors = {}
    for (name, r), (_, d) in zip(ref.named_parameters(), dev.named_parameters()):
        assert (r.grad is None) == (d.grad is None), f"{name}: a gradient on one device only"
        if r.grad is None:
            continue
        assert torch.isfinite(d.grad).all(), f"{name}: non-finite gradient on {DEVICE}"
        errors[name] = (d.grad.float().cpu() / scale - r.grad).norm().item() / max(r.grad.norm().item(), 1e-12)
    return errors


@cases
@torch.no_grad()
def test_fp32_streamed_nll_equals_the_family_reference(case):
    ref, dev, segment = pair(case)
    ref.eval(), dev.eval()
    toks = sequence(case)
    expected = SPECS[CASES[case][0]].reference(ref, toks)
    got = stream(dev, segment, toks)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@cases
def test_fp32_gradients_equal_the_cpu_run(case):
    ref, dev, segment = pair(case)
    ref.train(), dev.train()
    toks = sequence(case)
    stream(ref, segment, toks, backward=True)
    stream(dev, segment, toks, backward=True)
    errors = grad_errors(ref, dev)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-4, f"{case}: {worst} off by {errors[worst]:.2e} (relative norm)"


# Half precision, both ways the pipeline's users run it: autocast over fp32 weights (AMP) and the
# weights themselves in half (DeepSpeed's bf16/fp16 modes). Bounds on the NLL's mean and max
# difference from the fp32 reference (NLL about 3.6), and the loss scale: fp16 trains with one
# (GradScaler, DeepSpeed's dynamic scale) because its smallest normal is 6e-5, and these tiny
# models' positional-weight gradients underflow without it (on an H200, unscaled: the
# Transformer-XL's r_net.weight off by 121 %). Measured (CPU bf16; H200 bf16 and fp16): NLL
# differences at most 0.015 / 0.055 in bf16, 0.002 / 0.009 in fp16.
HALF = {"bf16": (torch.bfloat16, 0.05, 0.25, 1.0), "fp16": (torch.float16, 0.01, 0.05, 2.0 ** 12)}
# The gradients' relative norm error: up to 0.17 in either dtype (the Compressive Transformer's
# r_w_bias, a sum over every position where rounding does not cancel); a wrong path is off by ~1.
GRAD_TOL = 0.3


@cases
@pytest.mark.parametrize("mode", ["autocast", "weights"])
@pytest.mark.parametrize("half", sorted(HALF))
def test_half_precision_stays_close_to_the_reference(case, half, mode):
    dtype, mean_tol, max_tol, scale = HALF[half]
    if DEVICE.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 is the CUDA path")
    ref, dev, segment = pair(case)
    autocast = dtype if mode == "autocast" else None
    if mode == "weights":
        dev.to(dtype)
    ref.eval(), dev.eval()
    toks = sequence(case)
    with torch.no_grad():
        expected = SPECS[CASES[case][0]].reference(ref, toks)
        got = stream(dev, segment, toks, dtype=autocast)
    diff = (got - expected).abs()
    assert diff.mean() < mean_tol and diff.max() < max_tol, \
        f"{case} {half} {mode}: NLL off by mean {diff.mean():.4f} max {diff.max():.4f}"
    ref.train(), dev.train()
    stream(ref, segment, toks, backward=True)
    stream(dev, segment, toks, dtype=autocast, backward=True, scale=scale)
    errors = grad_errors(ref, dev, scale)
    worst = max(errors, key=errors.get)
    print(f"{case} {half} {mode}: NLL mean {diff.mean():.4f} max {diff.max():.4f}; grad {worst} {errors[worst]:.2e}")
    assert errors[worst] < GRAD_TOL, f"{case} {half} {mode}: {worst} off by {errors[worst]:.2e} (relative norm)"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_on_device_drops_at_its_rate_and_keeps_the_mean(p):
    x = torch.ones(4_000_000, device=DEVICE)
    y = Dropout(p).train()(x)
    kept = (y != 0).double().mean().item()
    assert abs((1 - kept) - p) < 1e-3                       # 4M draws: sd of the rate ≈ 2.5e-4
    assert torch.allclose(y[y != 0], torch.full((), 1 / (1 - p), device=DEVICE), rtol=1e-3)
