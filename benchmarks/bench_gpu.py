"""Transformer-XL training step on one GPU against NVIDIA's published figures (DeepLearningExamples).

NVIDIA's WikiText-103 base model: 16 layers, d_model 512, 8 heads × 64, d_inner 2048, adaptive
softmax over 267,735 words (cutoffs [19997, 39997, 199997], div_val 1, tied weights), segment and
memory 192, local batch 32. Their figures (NGC pytorch-20.06, tokens/s on one A100 40GB):
41,527 in TF32 and 59,961 with AMP (fp16). This times our TransformerXL on the same shapes:
forward with the carried memory, backward, clipping at 0.25 and a fused AdamW step (NVIDIA's
recipe uses LAMB: one more norm per tensor, not a matrix product), in each precision:

* ``tf32``: fp32 weights, TF32 matrix products (what NVIDIA's "FP32/TF32" column measures);
* ``amp_fp16``: fp32 weights under ``torch.autocast(float16)`` with a GradScaler (their AMP);
* ``amp_bf16``: the same under bfloat16 (no scaler needed).

Tokens are Zipf-distributed (s = 1, word-like, as WikiText-103 is: NVIDIA's figures are on the real
corpus) and uniform (most tokens in the tail clusters: the adaptive softmax's worst case).
``--compile`` times each precision eager and under ``torch.compile`` (the model compiled in place,
static shapes, as ``train.compile: true`` does) in the same process, and reports the ratio.

Only torch and ``models/`` are imported, so it runs in a bare CUDA image (the lent GPU machine's
``python3``). Each run gets a fresh model; median step time after warm-up; peak memory from
torch's CUDA allocator. On a machine without CUDA it refuses, except with ``--smoke`` (tiny shapes,
two steps, on the CPU: the same code path, for the test suite).

    python3 benchmarks/bench_gpu.py                 # → benchmarks/results/gpu_<device>.json
    python3 benchmarks/bench_gpu.py --compile       # → benchmarks/results/gpu_<device>_compile.json
    python3 benchmarks/bench_gpu.py --smoke --out /tmp/gpu_smoke.json
"""
from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_model import sample_tokens  # noqa: E402
from machine import machine_info, write_result  # noqa: E402

from models import ModelConfig, build_model  # noqa: E402

NVIDIA_BASE = dict(n_token=267735, n_layer=16, d_model=512, n_head=8, d_head=64, d_inner=2048,
                   cutoffs=[19997, 39997, 199997], tgt_len=192, mem_len=192, batch=32)
SMOKE = dict(n_token=600, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
             cutoffs=[100, 300], tgt_len=16, mem_len=16, batch=2)
NVIDIA_TOKENS_PER_S = {"device": "A100 40GB", "tf32": 41527, "amp_fp16": 59961}
PRECISIONS = ("tf32", "amp_fp16", "amp_bf16")
TOKENS = ("zipf", "uniform")


def build(shape: dict, device: torch.device) -> torch.nn.Module:
    cfg = ModelConfig(n_token=shape["n_token"], n_layer=shape["n_layer"], d_model=shape["d_model"],
                      n_head=shape["n_head"], d_head=shape["d_head"], d_inner=shape["d_inner"],
                      dropout=0.1, dropatt=0.0, cutoffs=shape["cutoffs"], div_val=1, tie_weight=True,
                      tie_projs=[False] + [True] * len(shape["cutoffs"]), tgt_len=shape["tgt_len"],
                      mem_len=shape["mem_len"])
    return build_model(cfg).to(device).train()


def measure(precision: str, tokens: str, shape: dict, device: torch.device, warmup: int, steps: int,
            compile_: bool = False, profile: bool = False) -> dict:
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(shape, device)
    if compile_:
        model.compile(dynamic=False)     # in place, as the trainer does (state-dict keys unchanged)
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, fused=True)
    half = {"amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "amp_fp16")
    B, T = shape["batch"], shape["tgt_len"]
    data = sample_tokens(tokens, (B, (warmup + steps) * T + 1), shape["n_token"]).to(device)
    state = {"memory": model.init_memory(B, device=device)}

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step(i: int) -> torch.Tensor:
        x, y = data[:, i * T: (i + 1) * T], data[:, i * T + 1: (i + 1) * T + 1]
        amp = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
        with amp:
            out = model(x, y, state["memory"])
        state["memory"] = out.memory
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return out.loss

    times, loss = [], None
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        out_loss = step(i)
        sync()
        times.append(time.perf_counter() - t0)
        loss = out_loss.item()
    median = statistics.median(times[warmup:])
    row = {"precision": precision, "tokens": tokens, "compile": compile_, "step_s_median": round(median, 5),
           "tokens_per_s": round(B * T / median, 1), "tokens_per_s_best": round(B * T / min(times[warmup:]), 1),
           "first_steps_s": round(sum(times[:warmup]), 2), "final_loss": round(loss, 4),
           "n_params": sum(p.numel() for p in model.parameters())}
    if cuda:
        row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if precision in NVIDIA_TOKENS_PER_S and not compile_ and shape == NVIDIA_BASE:
        row["over_nvidia_a100"] = round(row["tokens_per_s"] / NVIDIA_TOKENS_PER_S[precision], 3)
    if profile:
        row["profile"] = kernel_profile(step, warmup + steps - PROFILED, sync, median, cuda)
    return row


PROFILED = 3     # steps under the profiler (the last ones of the run again: same shapes, memory full)


def kernel_profile(step, first: int, sync, step_s: float, cuda: bool) -> dict:
    """Where a step's time goes on the device: the kernels' summed time per step against the
    step's unprofiled wall time (a device busy well under 100 % means the host's launches are the
    bound), kernels launched per step, and the kernels that take the most time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for i in range(first, first + PROFILED):
            step(i)
        sync()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / PROFILED
    busy = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {"device_busy_ms_per_step": round(busy, 2), "device_busy_fraction": round(busy / 1e3 / step_s, 3),
            "kernels_per_step": round(len(kernels) / PROFILED),
            "top_kernels_ms_per_step": {name[:90]: round(ms, 2) for name, ms in top}}


def step_flops(shape: dict, device: torch.device) -> int:
    """FLOPs of one training step (forward + backward) as torch's FlopCounterMode counts them
    (matrix products and attention), on a full memory: the second step of a fresh model."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build(shape, device)
    B, T = shape["batch"], shape["tgt_len"]
    data = sample_tokens("zipf", (B, 2 * T + 1), shape["n_token"]).to(device)
    memory = model(data[:, :T], data[:, 1:T + 1], model.init_memory(B, device=device)).memory
    counter = FlopCounterMode(display=False)
    with counter:
        model(data[:, T:2 * T], data[:, T + 1:], memory).loss.backward()
    del model, data, memory
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, tf32: bool, n: int = 8192) -> float:
    """FLOP/s of an n×n×n matrix product (random data; mean of 10 after 3 warm-ups)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * 10 / (start.elapsed_time(end) / 1e3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--tokens", nargs="+", choices=TOKENS, default=list(TOKENS))
    ap.add_argument("--compile", action="store_true", help="each run eager and torch.compile'd, in one process")
    ap.add_argument("--profile", action="store_true", help="per run: device busy time, kernels per step, top kernels")
    ap.add_argument("--batch", type=int, help=f"batch per GPU instead of NVIDIA's {NVIDIA_BASE['batch']} "
                    "(a larger one shows how much of the step is launch overhead)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps, CPU allowed (tests the script)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        shape, args.warmup, args.steps = SMOKE, 1, 2
        # fp16 autocast on CPU is not what the GPU path runs: left to CUDA
        precisions = [p for p in args.precisions if device.type == "cuda" or p != "amp_fp16"]
    elif not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs a CUDA device (torch.cuda.is_available() is False); "
                         "--smoke runs the same code on tiny shapes on the CPU")
    else:
        shape, device, precisions = dict(NVIDIA_BASE), torch.device("cuda"), args.precisions
        if args.batch:
            shape["batch"] = args.batch
    cuda = device.type == "cuda"
    runs = {}
    for tokens in args.tokens:
        for p in precisions:
            for compile_ in (False, True) if args.compile else (False,):
                key = f"{tokens}/{p}" + ("+compile" if compile_ else "")
                row = runs[key] = measure(p, tokens, shape, device, args.warmup, args.steps, compile_,
                                                   args.profile)
                print(f"{key:24s} {row['tokens_per_s']:>10,.0f} tok/s  loss {row['final_loss']:.3f}"
                      + (f"  {row['over_nvidia_a100']:.2f}x NVIDIA's A100" if "over_nvidia_a100" in row else "")
                      + (f"  device busy {row['profile']['device_busy_fraction']:.0%}, "
                         f"{row['profile']['kernels_per_step']} kernels/step" if args.profile else ""),
                      file=sys.stderr, flush=True)
            if args.compile:
                runs[f"{tokens}/{p}+compile"]["over_eager"] = round(
                    runs[f"{tokens}/{p}+compile"]["tokens_per_s"] / runs[f"{tokens}/{p}"]["tokens_per_s"], 3)
    flops = step_flops(shape, device)
    peaks = {}
    if cuda:
        peaks = {"tf32": matmul_peak(device, torch.float32, True), "fp32": matmul_peak(device, torch.float32, False),
                 "amp_fp16": matmul_peak(device, torch.float16, False),
                 "amp_bf16": matmul_peak(device, torch.bfloat16, False)}
        for row in runs.values():
            achieved = flops / row["step_s_median"]
            row["achieved_tflops"] = round(achieved / 1e12, 1)
            row["of_matmul_peak"] = round(achieved / peaks[row["precision"]], 3)
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    name = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_") + ("_compile" if args.compile else "") \
        + ("_profile" if args.profile else "") + (f"_batch{args.batch}" if args.batch else "")
    out = args.out or HERE / "results" / f"gpu_{name}.json"
    return write_result(out, {
        "benchmark": "transformer_xl_train_step_gpu_vs_nvidia", "device": gpu,
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "shape": shape, "smoke": args.smoke, "runs": runs, "nvidia_published": NVIDIA_TOKENS_PER_S,
        "step_flops": flops, "matmul_peak_tflops": {k: round(v / 1e12, 1) for k, v in peaks.items()},
        "method": f"{args.warmup} warm-up + {args.steps} timed steps per run, fresh model each; median; "
                  "forward + backward + clip 0.25 + fused AdamW; memory carried; step FLOPs counted by "
                  "torch.utils.flop_counter on one step; peaks: 8192^3 matrix products (random data)",
        "machine": machine_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


if __name__ == "__main__":
    main()
