import math

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.runtime.ds_config import deepspeed_config
from pipeline.runtime.optim import build_optimizer, build_schedule


def lrs(cfg: TrainConfig, n: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg, on_cuda=False)
    sched = build_schedule(opt, cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_matches_formula():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=4, max_steps=20, min_lr_ratio=0.1)
    got = lrs(cfg, 20)
    for step, lr in enumerate(got, start=1):  # lr used by optimizer step `step`
        if step <= 4:
            want = step / 4
        else:
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 16))
        assert lr == pytest.approx(want)
    assert got[-1] == pytest.approx(0.1)


def test_inv_sqrt_and_constant():
    got = lrs(TrainConfig(lr=2.0, schedule="inv_sqrt", warmup_steps=0, max_steps=10), 5)
    assert got == pytest.approx([2.0 / math.sqrt(s) for s in range(1, 6)])
    got = lrs(TrainConfig(lr=3.0, schedule="constant", warmup_steps=2, max_steps=10), 4)
    assert got == pytest.approx([1.5, 3.0, 3.0, 3.0])


def test_schedule_state_round_trip():
    cfg = TrainConfig(lr=1.0, warmup_steps=3, max_steps=10)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([p], cfg, on_cuda=False)
    sched = build_schedule(opt, cfg)
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg, on_cuda=False)
    sched2 = build_schedule(opt2, cfg)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_sgd_momentum():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig(optimizer="sgd", momentum=0.99),
                          on_cuda=False)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.99


def test_deepspeed_batch_arithmetic():
    ds = deepspeed_config(TrainConfig(n_streams=12, micro_batches=3, zero_stage=3, precision="bf16"), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 12 == 2 * 3 * 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert "auto" not in str(ds)
    with pytest.raises(ConfigError, match="n_streams=10.*world size 4.*micro_batches=1"):
        deepspeed_config(TrainConfig(n_streams=10), world_size=4)
    with pytest.raises(ConfigError, match="zero_stage"):
        deepspeed_config(TrainConfig(zero_stage=4), world_size=1)


def test_adam_kernel_choice():
    """Fused kernels with train.fused_optimizer: on CUDA apex first only when importable, on CPU
    torch's own; without it torch's plain Adam."""
    from pipeline.runtime.optim import adam_kernels

    assert adam_kernels(on_cuda=True, fused=True, apex_available=True) == ("apex", "deepspeed", "torch_fused")
    assert adam_kernels(on_cuda=True, fused=True, apex_available=False) == ("deepspeed", "torch_fused")
    assert adam_kernels(on_cuda=False, fused=True, apex_available=True) == ("torch_fused",)
    for on_cuda in (True, False):
        assert adam_kernels(on_cuda, False, apex_available=True) == ("torch",)


def test_cpu_builds_torch_fused_adam_and_its_step_is_adams():
    from pipeline.runtime.optim import _adam, apex_optimizers_available

    assert not apex_optimizers_available()          # NVIDIA apex is never installed here
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig(fused_optimizer=True), on_cuda=False)
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"]
    plain = build_optimizer([torch.nn.Parameter(torch.zeros(1))], TrainConfig(fused_optimizer=False), on_cuda=False)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
    # The last CUDA fallback is torch's own fused kernel (torch runs it on CPU too): one real step.
    p = torch.nn.Parameter(torch.ones(3))
    fused = _adam(("torch_fused",), [p], TrainConfig(lr=0.1), adam_w_mode=True)
    assert type(fused) is torch.optim.AdamW and fused.defaults["fused"]
    p.grad = torch.ones(3)
    fused.step()
    assert torch.allclose(p.detach(), torch.full((3,), 0.9), atol=1e-6)   # Adam's first step moves by lr
