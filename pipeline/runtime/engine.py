"""The DeepSpeed engine for a model: our optimizer and schedule, the JSON from our config.

``build_engine`` hands DeepSpeed a client optimizer (``pipeline.runtime.optim``) and LambdaLR schedule,
so the same optimizer code runs under every ZeRO stage; DeepSpeed steps the schedule at each
accumulation boundary where the update was applied (not on fp16 overflow skips) and keeps its
state in the checkpoint. Precision comes from the JSON: the engine casts the module to bf16/fp16
and keeps fp32 master weights in the optimizer.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.runtime.ds_config import deepspeed_config
from pipeline.runtime.optim import Schedule, build_optimizer, build_schedule

log = logging.getLogger(__name__)



def precision_support() -> dict[str, bool]:
    """Which precisions DeepSpeed's accelerator runs here. On CPU, fp16 follows the machine
    (oneDNN fp16: AVX512-FP16/AMX-FP16 Xeons yes, most others no); bf16 runs everywhere."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {"fp16": bool(acc.is_fp16_supported()), "bf16": bool(acc.is_bf16_supported()), "fp32": True}


def check_precision(precision: str) -> None:
    """Refuse a precision DeepSpeed's accelerator cannot run, before building anything."""
    from deepspeed.accelerator import get_accelerator

    supported = precision_support()
    if not supported[precision]:
        others = [p for p, ok in supported.items() if ok]
        raise ConfigError(f"train.precision={precision} is not supported on DeepSpeed's "
                          f"{get_accelerator().device_name()!r} accelerator on this machine (on CPU, fp16 needs "
                          f"oneDNN fp16 support: AVX512-FP16 or AMX-FP16); use one of {others}")


def choose_tf32(device_type: str, precision: str, enabled: bool) -> Optional[bool]:
    """TF32 for fp32 matmuls and convolutions: ``enabled`` on CUDA in fp32 (tf32=false switches
    cuDNN's default-on TF32 off too); None (torch's settings untouched) on CPU, where there is
    no TF32, and under bf16/fp16, whose matmuls do not run in fp32."""
    if device_type != "cuda" or precision != "fp32":
        return None
    return enabled


def apply_tf32(device_type: str, precision: str, enabled: bool) -> Optional[bool]:
    """Set torch's process-wide TF32 flags as ``choose_tf32`` says; returns the choice."""
    on = choose_tf32(device_type, precision, enabled)
    if on is not None:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        log.info("TF32 matmuls %s (fp32 on CUDA)", "on" if on else "off")
    return on


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int,
                 load_universal: bool = False) -> tuple[Any, dict]:
    """``(engine, ds_config)``; the JSON is also what the run saves and tracks."""
    import deepspeed

    on_cuda = torch.cuda.is_available()
    check_precision(cfg.train.precision)
    ds_config = deepspeed_config(cfg.train, world_size)
    if load_universal:
        ds_config["checkpoint"] = {"load_universal": True}
    if cfg.train.zero_stage == 3:
        _zero3_external_params(model)
    optimizer = build_optimizer(model.parameters(), cfg.train, on_cuda=on_cuda)
    schedule = build_schedule(optimizer, cfg.train)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=ds_config, dist_init_required=False)
    return engine, ds_config


class _KnownZero3Warning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "has unknown inputs or outputs type" not in record.getMessage()


def _zero3_external_params(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers a module's weights in hooks on its inputs and outputs, and it cannot see
    the tensors inside our ``ModelOutput``: the top-level module gets no backward hook, so its
    own parameters (Transformer-XL's shared u, v biases) would stay partitioned in backward.
    Registering them as external parameters of the child modules that use them makes those
    children gather them (a few small tensors)."""
    import deepspeed

    own = list(model.parameters(recurse=False))
    if not own:
        return
    for child in model.children():
        for sub in (list(child) if isinstance(child, torch.nn.ModuleList) else [child]):
            for p in own:
                deepspeed.zero.register_external_parameter(sub, p)
    # DeepSpeed warns about the ModelOutput once; the registration above is the answer to it.
    logging.getLogger("DeepSpeed").addFilter(_KnownZero3Warning())


def engine_dtype(engine) -> torch.dtype:
    return next(engine.module.parameters()).dtype


def grad_norm(engine) -> Optional[float]:
    """The global gradient norm of the last update (before clipping), when DeepSpeed computed it."""
    value = engine.get_global_grad_norm()
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def loss_scale(engine) -> Optional[float]:
    """The fp16 dynamic loss scale; None for bf16/fp32."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    for name in ("cur_scale", "loss_scale"):
        value = getattr(opt, name, None)
        if value is not None and not callable(value):
            return float(value)
    scaler = getattr(opt, "loss_scaler", None)
    return float(scaler.cur_scale) if scaler is not None else None


def retarget_schedule(engine, cfg: TrainConfig, step: int) -> list[str]:
    """After loading a checkpoint: make the schedule follow this run's config (a resumed run
    may extend max_steps or change lr), recomputing the current lr. Returns what changed."""
    sched = engine.lr_scheduler
    want = Schedule(cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio).__dict__
    changed = []
    for fn in sched.lr_lambdas:
        changed += [f"{k}: {fn.__dict__.get(k)} -> {v}" for k, v in want.items() if fn.__dict__.get(k) != v]
        fn.__dict__.update(want)
    if any(b != cfg.lr for b in sched.base_lrs):
        changed.append(f"lr: {sched.base_lrs[0]} -> {cfg.lr}")
        sched.base_lrs = [cfg.lr] * len(sched.base_lrs)
    if changed:
        fast_forward_schedule(engine, step)
    return sorted(set(changed))


def fast_forward_schedule(engine, step: int) -> None:
    """Put the LambdaLR schedule (and DeepSpeed's step counters) at ``step`` after a weights-only
    load, so the learning rate continues instead of restarting its warm-up."""
    sched = engine.lr_scheduler
    sched.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
