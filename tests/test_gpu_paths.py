"""The GPU paths' selection logic, checked on CPU: which implementation runs under which facts.

Each choice is a small pure function taking the facts (device type, precision, whether apex
imports, whether probabilities are needed) as arguments, so the CUDA rows of its table are
tested here without CUDA. Where both implementations run on CPU (SDPA and the explicit softmax)
they are compared against each other on real model forwards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import build_model
from models.config import ModelConfig
from models.modules import layers
from models.modules.attention import choose_attention, set_attention_kernel
from pipeline.runtime.engine import apply_tf32, choose_tf32

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- TF32


def test_tf32_only_on_cuda_in_fp32():
    assert choose_tf32("cuda", "fp32", True) is True
    assert choose_tf32("cuda", "fp32", False) is False       # off switches cuDNN's default-on TF32 off too
    for precision in ("bf16", "fp16"):
        assert choose_tf32("cuda", precision, True) is None  # half-precision matmuls: flags untouched
    for enabled in (True, False):
        assert choose_tf32("cpu", "fp32", enabled) is None


def test_tf32_leaves_torch_untouched_on_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert apply_tf32("cpu", "fp32", True) is None
    assert apply_tf32("cpu", "fp32", False) is None
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


# ----------------------------------------------------------------------------- apex LayerNorm / Linear


def test_apex_kernels_only_on_cuda_when_importable():
    assert layers.choose_layer_norm("cuda", apex_available=True) == "apex"
    assert layers.choose_layer_norm("cuda", apex_available=False) == "torch"
    assert layers.choose_layer_norm("cpu", apex_available=True) == "torch"
    assert layers.choose_linear("cuda", apex_available=True, bias=True) == "apex"
    assert layers.choose_linear("cuda", apex_available=True, bias=False) == "torch"   # FusedDense needs a bias
    assert layers.choose_linear("cpu", apex_available=True, bias=True) == "torch"


def test_models_built_here_use_the_torch_modules():
    """No NVIDIA apex and no CUDA here: every LayerNorm and Linear is the torch-backed one."""
    assert layers.apex_modules() == {} and layers.build_device() == "cpu"
    model = build_model(ModelConfig(n_token=50, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32,
                                    tgt_len=8, mem_len=8))
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(type(m) is layers.LayerNorm for m in norms)
    assert not any(isinstance(m, layers._FusedDenseOrLinear) for m in model.modules())


def test_fused_layer_norm_wrapper_keeps_keys_outputs_and_detaching():
    """apex cannot run here, so the wrapper ``layer_norm`` puts around apex's class is built
    over a stand-in subclass of nn.LayerNorm (apex's FusedLayerNorm has the same parameters):
    the same state-dict keys as the torch module, the same output, and weights_detached works."""

    class StandIn(nn.LayerNorm):                    # apex's class runs its own kernel; F.layer_norm here
        pass

    fused = layers._fused_layer_norm(StandIn)(6)
    plain = layers.LayerNorm(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    fused.load_state_dict(plain.state_dict())       # strict: identical keys and shapes
    assert fused.state_dict().keys() == plain.state_dict().keys() == {"weight", "bias"}
    x = torch.randn(3, 6, requires_grad=True)
    torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=0)
    with layers.weights_detached(fused):
        fused(x).sum().backward()
    assert fused.weight.grad is None and x.grad is not None


# ----------------------------------------------------------------------------- attention kernels


def test_attention_kernel_choice():
    assert choose_attention(positional=False, keep_probs=False) == "sdpa"
    assert choose_attention(positional=True, keep_probs=False) == "explicit"   # relative terms
    assert choose_attention(positional=False, keep_probs=True) == "explicit"   # probabilities requested
    assert choose_attention(False, False, forced="explicit") == "explicit"
    assert choose_attention(True, False, forced="sdpa") == "explicit"          # SDPA cannot take it
    assert choose_attention(False, True, forced="sdpa") == "explicit"
    with pytest.raises(ValueError, match="flash"):
        choose_attention(False, False, forced="flash")


def _docs(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, generator=g) < 0.15


def _forwards(model, segments, docs):
    """Per-token NLL of consecutive segments with memory and document starts."""
    out, mem = [], model.init_memory(segments[0].shape[0])
    for k, (x, d) in enumerate(zip(segments, docs)):
        o = model(x[:, :-1], x[:, 1:], memory=mem, doc_start=d)
        out.append(o.nll.detach())
        mem = o.memory
    return out


@pytest.mark.parametrize("family", ["vanilla", "transformer_xl"])
def test_sdpa_equals_the_explicit_softmax_on_model_forwards(family):
    """Al-Rfou's model (vanilla) and Transformer-XL with absolute positions: three segments
    with memory and document starts, SDPA vs the written-out softmax, fp32."""
    torch.manual_seed(0)
    extra = {"attn_type": "absolute"} if family == "transformer_xl" else {}
    cfg = ModelConfig(family=family, n_token=40, n_layer=2, d_model=32, n_head=4, d_head=8, d_inner=64,
                      tgt_len=12, mem_len=8, dropout=0.0, dropatt=0.0, init_std=0.3, **extra)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(1)
    t = 10 if family == "vanilla" else 12           # vanilla: memory 2 tokens deep (window 12)
    segs = [torch.from_numpy(rng.integers(0, 40, (3, t + 1))) for _ in range(3)]
    docs = [_docs(3, t, s) for s in range(3)]
    got = {}
    for kernel in ("sdpa", "explicit"):
        set_attention_kernel(model, kernel)
        got[kernel] = _forwards(model, segs, docs)
    for a, b in zip(got["sdpa"], got["explicit"]):
        assert (a - b).abs().max() <= 1e-5
    set_attention_kernel(model, None)              # the default is SDPA for these
    for a, b in zip(_forwards(model, segs, docs), got["sdpa"]):
        assert torch.equal(a, b)


def test_sdpa_gradients_match_in_training_without_dropout():
    torch.manual_seed(0)
    cfg = ModelConfig(family="vanilla", n_token=40, n_layer=2, d_model=32, n_head=4, d_head=8, d_inner=64,
                      tgt_len=12, mem_len=0, dropout=0.0, dropatt=0.0, init_std=0.3)
    model = build_model(cfg).train()
    x = torch.randint(0, 40, (2, 13))
    grads = {}
    for kernel in ("sdpa", "explicit"):
        set_attention_kernel(model, kernel)
        model.zero_grad()
        out = model(x[:, :-1], x[:, 1:], doc_start=_docs(2, 12, 3))
        (out.loss + out.aux_loss).backward()
        grads[kernel] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(grads["sdpa"], grads["explicit"]):
        assert (a - b).abs().max() <= 1e-5


def test_probabilities_requested_take_the_explicit_path():
    """Attention diagnostics on Transformer-XL with absolute positions: the layers keep their
    probabilities (only the explicit softmax has them), and the loss is the SDPA forward's."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_token=40, n_layer=2, d_model=32, n_head=4, d_head=8, d_inner=64, tgt_len=8, mem_len=8,
                      dropout=0.0, attn_type="absolute", init_std=0.3)
    model = build_model(cfg).eval()
    x = torch.randint(0, 40, (2, 9))
    plain = model(x[:, :-1], x[:, 1:]).nll
    with model.record_attention(n_buckets=2) as mass:
        kept = model(x[:, :-1], x[:, 1:]).nll
    assert sum(mass.flat()) > 0                 # the layers handed over their probabilities
    assert (plain - kept).abs().max() <= 1e-5


def test_pinned_host_memory_only_where_cuda_is(tmp_path):
    """The trainer asks for pinned batches on CUDA; the streams pin only when CUDA is available."""
    from test_streams import make_split, random_tokens

    from pipeline.data.streams import open_streams

    root = make_split(tmp_path, random_tokens(2000))
    it = open_streams(root, "train", n_streams=2, tgt_len=16, pin_memory=True)
    batch = next(it)
    assert batch.inputs.is_pinned() == torch.cuda.is_available() == it.pin_memory


def test_compile_with_zero3_is_refused_by_name():
    from pipeline.config import ConfigError, load_config

    assert load_config(REPO / "configs" / "tiny.yaml", ["train.compile=true", "train.zero_stage=2"]).train.compile
    with pytest.raises(ConfigError, match="train.compile=true does not run with train.zero_stage=3"):
        load_config(REPO / "configs" / "tiny.yaml", ["train.compile=true", "train.zero_stage=3"])


# ----------------------------------------------------------------------------- autocast (AMP)


@pytest.mark.parametrize("family", ["transformer_xl", "compressive", "infinite_former", "vanilla"])
def test_autocast_bf16_forward_and_backward_track_fp32(family):
    """NVIDIA-style AMP: fp32 weights under torch.autocast (bf16 on CPU, the same casts as fp16 on
    CUDA). Projections come out in half while biases and masks stay fp32; the loss over two
    segments (memory carried) stays within bf16 rounding of the fp32 model's and every gradient is
    finite."""
    from models.compressive import CompressiveConfig
    from models.infinite_former import InfiniteFormerConfig

    extra = {"compressive": {"compressive": CompressiveConfig(cmem_len=4, ratio=2)},
             "infinite_former": {"infinite_former": InfiniteFormerConfig(n_basis=8, n_samples=4)}}.get(family, {})
    cfg = ModelConfig(family=family, n_token=97, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                      dropout=0.0, dropatt=0.0, tgt_len=8, mem_len=8, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    x = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))

    def two_segments(amp: bool) -> torch.Tensor:
        memory, total = model.init_memory(2), 0.0
        for s in (0, 8):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x[:, s:s + 8], x[:, s + 1:s + 9], memory)
            memory, total = out.memory, total + out.loss.float()
        return total

    want = two_segments(False)
    got = two_segments(True)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_gpu_benchmark_script_runs_its_smoke_shapes(tmp_path):
    """benchmarks/bench_gpu.py (run on a lent GPU against NVIDIA's figures) on tiny shapes here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--smoke", "--out", str(tmp_path / "gpu.json")])
    assert {k.split("/")[1] for k in out["runs"]} >= {"tf32", "amp_bf16"} and out["smoke"] is True
    assert {r["tokens"] for r in out["runs"].values()} == {"zipf", "uniform"} and out["step_flops"] > 0
    assert all(np.isfinite(r["final_loss"]) and r["tokens_per_s"] > 0 for r in out["runs"].values())
