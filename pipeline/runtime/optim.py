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


def _fused_adam(params, cfg: TrainConfig, adam_w_mode: bool):
    """apex's FusedAdam when installed, else DeepSpeed's, else torch's fused kernel."""
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        from apex.optimizers import FusedAdam  # type: ignore

        return FusedAdam(params, adam_w_mode=adam_w_mode, **kw)
    except ImportError:
        pass
    try:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=adam_w_mode, **kw)
    except Exception as exc:  # the CUDA op may not build on this machine
        log.warning("DeepSpeed FusedAdam unavailable (%s); using torch's fused Adam", exc)
    cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
    return cls(params, fused=True, **kw)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, on_cuda: bool) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    adam_w = cfg.optimizer == "adamw"
    if on_cuda and cfg.fused_optimizer:
        return _fused_adam(params, cfg, adam_w)
    cls = torch.optim.AdamW if adam_w else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
