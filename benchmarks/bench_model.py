"""Transformer-XL training-step throughput and peak memory on CPU (fp32).

One step = forward with the carried memory, backward, gradient clipping and an AdamW
update; tokens/s counts target tokens (batch × tgt_len) over the timed steps. Memory is
the process's peak resident set size (``getrusage`` ru_maxrss, whole process including
the Python runtime and torch libraries) and its growth over the RSS measured just before
the model is built. Run it on a quiet machine for numbers worth comparing:

    .venv/bin/python benchmarks/bench_model.py            # writes benchmarks/results/model_cpu.json
    .venv/bin/python benchmarks/bench_model.py --tokens zipf --out /tmp/zipf.json

Default config (the one the reference port was measured on): 6 layers, d_model 256,
4 heads × 64, d_inner 1024, adaptive softmax over 32,000 tokens with cutoffs
[4000, 12000] (div_val 1, tied), batch 8 × 128, mem_len 128, 2 threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ModelConfig, build_model  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sample_tokens(kind: str, n_token: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":  # the worst case for adaptive softmax: most tokens in the tails
        return torch.randint(0, n_token, shape, generator=gen)
    # Zipf (s=1) over ranks, like word frequencies: most tokens in the shortlist.
    probs = 1.0 / torch.arange(1, n_token + 1, dtype=torch.float64)
    return torch.multinomial(probs / probs.sum(), int(torch.tensor(shape).prod()), replacement=True,
                             generator=gen).view(shape)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tgt-len", type=int, default=128)
    ap.add_argument("--mem-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", choices=["uniform", "zipf"], default="uniform")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "model_cpu.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = ModelConfig(n_token=32000, n_layer=6, d_model=256, n_head=4, d_head=64, d_inner=1024,
                      dropout=0.1, dropatt=0.0, cutoffs=[4000, 12000], div_val=1, tie_weight=True,
                      tie_projs=[False, True, True], tgt_len=args.tgt_len, mem_len=args.mem_len)
    rss_before = rss_mib()
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4)
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.warmup + args.steps
    data = sample_tokens(args.tokens, cfg.n_token, (args.batch, steps * args.tgt_len + 1), gen)

    memory = model.init_memory(args.batch)
    times = []
    for step in range(steps):
        lo = step * args.tgt_len
        x, y = data[:, lo: lo + args.tgt_len], data[:, lo + 1: lo + 1 + args.tgt_len]
        t0 = time.perf_counter()
        out = model(x, y, memory)
        memory = out.memory
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    tokens = args.batch * args.tgt_len
    result = {
        "benchmark": "transformer_xl_train_step_cpu",
        "tokens_per_s": round(tokens * len(timed) / sum(timed), 1),
        "step_s_median": round(statistics.median(timed), 4),
        "step_s_all": [round(t, 4) for t in times],
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "rss_growth_mib": round(peak_rss_mib() - rss_before, 1),
        "memory_measure": "ru_maxrss of the whole process; growth = peak minus RSS before building the model",
        "final_loss": round(out.loss.item(), 4),
        "n_params": n_params,
        "config": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head, "d_head": cfg.d_head,
                   "d_inner": cfg.d_inner, "n_token": cfg.n_token, "cutoffs": cfg.cutoffs, "div_val": cfg.div_val,
                   "batch": args.batch, "tgt_len": args.tgt_len, "mem_len": args.mem_len, "dtype": "fp32",
                   "optimizer": "AdamW", "clip": 0.25, "tokens": args.tokens},
        "threads": args.threads, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "reference": "HF TransfoXLLMHeadModel 4.35.2 measured ~1,180 tokens/s on this config (platform-notes §7)",
        "caveat": "CPU shared with other processes while measured; re-run on a quiet machine",
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out_path.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
        tmp = f.name
    os.replace(tmp, out_path)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
