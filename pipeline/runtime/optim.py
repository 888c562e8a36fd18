"""Optimizers and learning-rate schedules built from ``TrainConfig``."""
from __future__ import annotations

import logging
import math
from typing import Iterable

import torch

from pipeline.config import TrainConfig

log = logging.getLogger(__name__)


class Schedule:
    """LR multiplier after ``k`` optimizer steps (LambdaLR calls it with k = steps taken so far).

    The step about to run is ``k + 1``: linear warm-up ``(k+1)/W`` over the first W steps (the
    reference's ``lr * step / warmup``), then
      cosine:   decay from 1 to ``min_lr_ratio`` over the remaining steps (TF form, continuous at W);
      inv_sqrt: ``sqrt(W / step)`` (``1/sqrt(step)`` without warm-up);
      constant: 1.
    A plain class (not a closure) so LambdaLR can save and load it with the checkpoint.
    """

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio

    def __call__(self, k: int) -> float:
        step = k + 1
        if self.warmup > 0 and step <= self.warmup:
            return step / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "inv_sqrt":
            return math.sqrt(max(self.warmup, 1) / step)
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    sched = Schedule(cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, sched)


def adam_kernels(on_cuda: bool, fused: bool, apex_available: bool) -> tuple[str, ...]:
    """The Adam implementations to try, in order, with ``train.fused_optimizer``: on CUDA apex's
    FusedAdam (when importable), DeepSpeed's (its CUDA op may fail to build), torch's fused
    kernel; on CPU torch's fused kernel (its default there is a Python loop over the parameters,
    about 3x slower per step: benchmarks/bench_model.py --optimizer). Without it torch's plain
    Adam. A pure function so the choice is testable on CPU."""
    if not fused:
        return ("torch",)
    if not on_cuda:
        return ("torch_fused",)
    return (("apex",) if apex_available else ()) + ("deepspeed", "torch_fused")


def apex_optimizers_available() -> bool:
    """NVIDIA apex's optimizers importable (the unrelated PyPI package ``apex`` has none)."""
    try:
        from apex.optimizers import FusedAdam  # type: ignore  # noqa: F401
    except Exception:   # absent, or another package named apex that fails in its own way
        return False
    return True


def _adam(kernels: tuple[str, ...], params, cfg: TrainConfig, adam_w_mode: bool):
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    for kind in kernels:
        if kind == "apex":
            from apex.optimizers import FusedAdam  # type: ignore

            return FusedAdam(params, adam_w_mode=adam_w_mode, **kw)
        if kind == "deepspeed":
            try:
                from deepspeed.ops.adam import FusedAdam

                return FusedAdam(params, adam_w_mode=adam_w_mode, **kw)
            except Exception as exc:  # the CUDA op may not build on this machine
                log.warning("DeepSpeed FusedAdam unavailable (%s); using torch's fused Adam", exc)
        elif kind == "torch_fused":
            return cls(params, fused=True, **kw)
    return cls(params, **kw)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, on_cuda: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    apex = on_cuda and cfg.fused_optimizer and apex_optimizers_available()
    return _adam(adam_kernels(on_cuda, cfg.fused_optimizer, apex), params, cfg, cfg.optimizer == "adamw")
