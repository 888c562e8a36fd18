"""What refusing code in checkpoints costs: ``check_plain`` against DeepSpeed's own load.

Before we or DeepSpeed open a checkpoint's torch files (DeepSpeed unpickles them with
``weights_only=False``), ``pipeline.runtime.checkpoint.check_plain`` unpickles each one with torch's
weights-only unpickler, memory-mapped, so only the pickle is parsed and the tensors' bytes are not
read. This times it on the files of a WikiText-103 base-size (wt103_base: 151M parameters) ZeRO
checkpoint of one rank, built with the same structure DeepSpeed writes (model states with the
module's weights; optimizer states with the fp32 master partition, Adam's two moments, the loss
scaler and the ZeRO stage enum), against ``torch.load(weights_only=False)`` of the same files (what
DeepSpeed's loader and zero_to_fp32 do). Both from a warm page cache, median of 3.

    .venv/bin/python benchmarks/bench_checkpoint_check.py   # writes benchmarks/results/checkpoint_check.json
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine import machine_info, timed, write_result  # noqa: E402  (benchmarks/machine.py)

RESULT = REPO / "benchmarks" / "results" / "checkpoint_check.json"


def write_checkpoint(tag: Path) -> int:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from models import build_model
    from pipeline.config import load_config

    cfg = load_config(REPO / "configs" / "wt103_base.yaml", ["model.n_token=267735"])
    with torch.device("meta"):
        # named_parameters: tied weights (adaptive softmax <-> embedding) once, as DeepSpeed stores them
        shapes = {k: v.shape for k, v in build_model(cfg.model).named_parameters()}
    module = {k: torch.randn(s) for k, s in shapes.items()}
    n = sum(v.numel() for v in module.values())
    tag.mkdir(parents=True)
    torch.save({"module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": {"last_epoch": 10},
                "global_steps": 10, "ds_version": "0.19", "ds_config": {"zero_optimization": {"stage": 2}}},
               tag / "mp_rank_00_model_states.pt")
    flat = torch.randn(n)
    torch.save({"optimizer_state_dict": {
        "loss_scaler": LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
        "base_optimizer_state": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(n),
                                               "exp_avg_sq": torch.rand(n)}},
                                 "param_groups": [{"lr": 2.5e-4, "params": [0]}]},
        "single_partition_of_fp32_groups": [flat], "zero_stage": ZeroStageEnum.gradients,
        "partition_count": [1], "ds_version": "0.19"}, "ds_config": {}, "ds_version": "0.19"},
        tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return n



def main() -> dict:
    from pipeline.runtime.checkpoint import check_plain

    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tag = Path(tmp) / "global_step10"
        n = write_checkpoint(tag)
        files = sorted(tag.glob("*.pt"))
        size = sum(f.stat().st_size for f in files)
        full = lambda: [torch.load(f, map_location="cpu", weights_only=False) for f in files]  # noqa: E731
        full()                                               # warm the page cache
        check_s = timed(lambda: check_plain(tag))
        load_s = timed(full)
    result = {
        "what": "check_plain (weights-only unpickle, mmap) vs torch.load(weights_only=False) of a wt103_base "
                "ZeRO checkpoint's files (1 rank)",
        "n_params": n, "bytes": size, "files": [f.name for f in files],
        "check_s": round(check_s, 3), "deepspeed_load_s": round(load_s, 3),
        "check_over_load": round(check_s / load_s, 4),
        "machine": machine_info(),
    }
    return write_result(RESULT, result)


if __name__ == "__main__":
    main()
