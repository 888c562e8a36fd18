"""The DeepSpeed JSON, generated from our config with the batch arithmetic resolved by us.

Batch rows are streams: ``train_batch = micro × accumulation × world`` where micro is the number of
streams one micro-batch of one rank carries. Never "auto" (only HF's integration resolves that).
"""
from __future__ import annotations

from pipeline.config import ConfigError, TrainConfig


def streams_per_micro_batch(cfg: TrainConfig, world_size: int) -> int:
    per = world_size * cfg.micro_batches
    if cfg.n_streams % per:
        raise ConfigError(
            f"train.n_streams={cfg.n_streams} is not divisible by world size {world_size} × "
            f"train.micro_batches={cfg.micro_batches}; choose n_streams as a multiple of {per}")
    return cfg.n_streams // per


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={cfg.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2 and 3")
    micro = streams_per_micro_batch(cfg, world_size)
    train_batch = micro * cfg.micro_batches * world_size
    assert train_batch == cfg.n_streams  # the arithmetic DeepSpeed re-checks
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if cfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=cfg.zero3_persistence_threshold)
    return {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.micro_batches,
        "gradient_clipping": float(cfg.clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {
            "enabled": cfg.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.fp16_initial_scale_power,
            "loss_scale_window": cfg.fp16_loss_scale_window,
            "hysteresis": cfg.fp16_hysteresis,
            "min_loss_scale": cfg.fp16_min_loss_scale,
        },
        # Our client optimizers (torch AdamW/SGD) are exercised by our tests under every stage.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves, one line per log_every steps
        "wall_clock_breakdown": False,
    }
