"""Training-stage benchmark on CPU: tokens/s on 1 vs 2 ranks, and ZeRO-2's optimizer memory.

1. Throughput: ``python -m pipeline.train`` (the real stage: DeepSpeed, streams, memory) on this
   Python's standard library as bytes (configs/tiny.yaml's corpus), a small Transformer-XL
   (4 layers, d_model 256, 4 x 64 heads, d_inner 1024, tgt_len = mem_len = 128, 8 streams),
   fp32, ZeRO-2, once with 1 rank and once with 2 ranks started by plain env vars. tokens/s is
   what the stage logs (all ranks' target tokens per second of step time); the first log
   window (warm-up) is left out. The cores are split between the ranks (OMP_NUM_THREADS), so
   on a small machine 2 ranks mostly show the communication overhead.
2. Optimizer state per rank: the tensors the optimizer keeps (Adam's exp_avg and exp_avg_sq)
   on each of 2 ranks under ZeRO stage 2, relative to stage 0 (where every rank keeps all of
   it). Goal: <= 0.55. ZeRO's fp32 master partition is reported beside it (stage 0 has none:
   its parameters are the fp32 master weights).

    .venv/bin/python benchmarks/bench_train.py          # writes benchmarks/results/train.json

Run it on a quiet machine; numbers on a shared one are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.d_head=64", "model.d_inner=1024",
         "model.tgt_len=128", "model.mem_len=128", "model.dropout=0.1"]
LINE = re.compile(r"step (\d+)/\d+ \| loss ([\d.]+|nan) \|.*\| tok/s ([\d,]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], threads: int, cwd: Path) -> list[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, threads // world)))
    procs = [subprocess.Popen([sys.executable, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(world)]
    outs = [p.communicate()[0] for p in procs]
    for p, text in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"{' '.join(argv[:3])} failed (world {world}):\n{text[-4000:]}")
    return outs


def prepare_shards(work: Path) -> Path:
    out = work / "shards"
    subprocess.run([sys.executable, "-m", "pipeline.prepare", "--config", str(REPO / "configs" / "tiny.yaml"),
                    f"data.output={out}", "data.workers=2"], cwd=work, check=True, capture_output=True,
                   env=os.environ | {"PYTHONPATH": str(REPO)})
    return out


def throughput(world: int, shards: Path, work: Path, steps: int, log_every: int, threads: int,
               extra: tuple[str, ...] = (), name: str = "") -> dict:
    out = work / f"run-w{world}{name}"
    argv = ["-m", "pipeline.train", "--config", str(REPO / "configs" / "tiny.yaml"), *MODEL,
            f"data.output={shards}", f"train.output={out}", f"train.max_steps={steps}", "train.n_streams=8",
            f"train.log_every={log_every}", "train.eval_every=0", "train.save_every=0", "train.zero_stage=2",
            "tracking.enabled=false", *extra]
    t0 = time.perf_counter()
    text = launch(world, argv, threads, work)[0]
    wall = time.perf_counter() - t0
    logged = [(int(s), float(loss), float(v.replace(",", ""))) for s, loss, v in LINE.findall(text)]
    windows = [(s, v) for s, _, v in logged]
    rates = [v for s, v in windows if s > log_every]          # the first window includes warm-up
    return {"world_size": world, "omp_threads_per_rank": max(1, threads // world), "steps": steps,
            "tokens_per_step": 8 * 128, "tokens_per_s": statistics.median(rates), "windows": windows,
            "final_loss": logged[-1][1], "wall_s": round(wall, 1)}


# ----------------------------------------------------------------------------- optimizer state (worker)


def optimizer_state_worker(stage: int) -> None:
    import torch

    from models import build_model
    from pipeline.config import load_config
    from pipeline.runtime import distributed
    from pipeline.runtime.engine import build_engine

    env = distributed.init_distributed()
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*MODEL, "model.n_token=256", "train.n_streams=2",
                                                         f"train.zero_stage={stage}", "model.dropout=0.0"])
    torch.manual_seed(0)
    engine, _ = build_engine(cfg, build_model(cfg.model), env.world_size)
    x = torch.randint(0, 256, (1, 128))
    out = engine(x, x, memory=engine.module.init_memory(1))
    engine.backward(out.loss)
    engine.step()                                   # Adam's state exists after the first step
    inner = engine.optimizer.optimizer if stage > 0 else engine.optimizer

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    state = nbytes(v for s in inner.state.values() for v in s.values())
    master = nbytes(getattr(engine.optimizer, "single_partition_of_fp32_groups", []))
    params = sum(p.numel() for p in engine.module.parameters())
    print(json.dumps({"rank": env.rank, "stage": stage, "optimizer_state_bytes": state,
                      "fp32_master_partition_bytes": master, "parameters": params}), flush=True)
    distributed.shutdown()


def optimizer_state(work: Path) -> dict:
    per = {}
    for stage in (0, 2):
        outs = launch(2, [__file__, "--optimizer-state-worker", str(stage)], 2, work)
        per[stage] = [json.loads(line) for text in outs for line in text.splitlines() if line.startswith("{")]
    base = max(r["optimizer_state_bytes"] for r in per[0])
    zero2 = max(r["optimizer_state_bytes"] for r in per[2])
    return {"parameters": per[0][0]["parameters"], "stage0_bytes_per_rank": base,
            "zero2_bytes_per_rank": [r["optimizer_state_bytes"] for r in sorted(per[2], key=lambda r: r["rank"])],
            "zero2_fp32_master_partition_bytes_per_rank": [r["fp32_master_partition_bytes"] for r in per[2]],
            "ratio_zero2_over_stage0": round(zero2 / base, 4), "goal": "<= 0.55"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores shared by the ranks")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train.json"))
    ap.add_argument("--optimizer-state-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.optimizer_state_worker is not None:
        optimizer_state_worker(args.optimizer_state_worker)
        return {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        shards = prepare_shards(work)
        runs = [throughput(w, shards, work, args.steps, args.log_every, args.threads) for w in (1, 2)]
        opt = optimizer_state(work)
    result = {
        "benchmark": "train", "device": "cpu", "precision": "fp32",
        "model": " ".join(MODEL), "corpus": "stdlib (bytes), configs/tiny.yaml",
        "throughput": runs,
        "speedup_2_over_1": round(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], 3),
        "optimizer_state": opt,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "host": platform.node()},
        "caveat": "shared development machine (other jobs running); re-run on a quiet machine",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup_2_over_1", "optimizer_state")}, indent=1))
    for r in runs:
        print(f"world {r['world_size']}: {r['tokens_per_s']:,.0f} tokens/s")
    return result


if __name__ == "__main__":
    main()
