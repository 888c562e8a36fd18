"""Evaluation speed: Transformer-XL's cached memory vs the Al-Rfou sliding window (Dai et al. Table 9).

Per-token time of both procedures on one model, at each attention length, in one run
(``pipeline.evaluation.speed.measure``; definitions there and in README "Evaluation"). The paper: on a
GPU, enwik8, the sliding window is 363x slower at attention length 800, 773x at 1,800, 1,409x at
2,800 and 1,874x at 3,800. The model is a config's architecture with random weights (the cost does
not depend on them). Run on a quiet machine:

    .venv/bin/python benchmarks/bench_evalspeed.py                              # enwik8_base, 800 and 1800
    .venv/bin/python benchmarks/bench_evalspeed.py --attn-lens 800 1800 2800 3800 --config configs/enwik8_large.yaml
    .venv/bin/python benchmarks/bench_evalspeed.py --config configs/demo.yaml --n-token 4096 --attn-lens 128 256 512

Writes ``benchmarks/results/evalspeed_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_info  # noqa: E402

from models import build_model  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluation.speed import format_rows, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "enwik8_base.yaml"))
    ap.add_argument("--n-token", type=int, default=204, help="vocabulary (enwik8 with the reference pipeline: 204)")
    ap.add_argument("--attn-lens", type=int, nargs="+", default=[800, 1800])
    ap.add_argument("--tgt-len", type=int, default=128, help="cached path segment length")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--cached-tokens", type=int, default=1024)
    ap.add_argument("--sliding-windows", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cfg.model.n_token = args.n_token
    cfg.model.dropout = cfg.model.dropatt = 0.0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device=device, dtype=dtype).eval()
    tic = time.perf_counter()
    result = measure(model, args.attn_lens, args.tgt_len, args.batch_size, args.cached_tokens,
                     args.sliding_windows, args.repeats, device=device)
    result.update(benchmark="eval_speed_cached_vs_sliding", config=args.config,
                  n_params=sum(p.numel() for p in model.parameters()),
                  model={k: getattr(cfg.model, k) for k in ("n_layer", "d_model", "n_head", "d_head", "d_inner")},
                  seconds=time.perf_counter() - tic, host=platform.node(), machine=machine_info(),
                  torch=torch.__version__,
                  paper_ratio={"800": 363, "1800": 773, "2800": 1409, "3800": 1874})
    print(format_rows(result))
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"evalspeed_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
