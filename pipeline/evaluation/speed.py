"""Evaluation speed: cached-memory evaluation vs the Al-Rfou sliding window (Dai et al. Table 9).

The paper reports how much slower the vanilla model's evaluation is than Transformer-XL's, per
token on one GPU: 363x at attention length 800 up to 1,874x at 3,800 (enwik8). Measured here in
one run, on one model (a Transformer-XL), at each attention length A:

* cached: segments of ``t`` tokens with ``mem_len = A - t`` cached hidden states, timed once the
  memory is full. Each query sees between ``A - t + 1`` and ``A`` keys; every position is a
  prediction. Per-token time = wall time / predictions.
* sliding (Al-Rfou et al.'s procedure): a window of A tokens processed from scratch with no memory,
  ONE prediction at its last position, then the window moves one token right (stride 1). Every
  window costs the same, so the per-token time is measured on a sample of windows.

``ratio = sliding / cached``. Both paths run with the same batch size (streams vs windows per
forward), weights, dtype, device and threads, under ``torch.inference_mode``; the median of
``repeats`` is reported. Token ids are random: the cost does not depend on them.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Optional, Sequence

import torch

from pipeline.evaluation.scoring import eval_lengths, unwrap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cached_seconds(model, gen: torch.Generator, attn_len: int, tgt_len: int, batch: int, tokens: int,
                    device: torch.device, n_token: int) -> tuple[float, int]:
    """Seconds for ``steps`` segments with a full memory, and the predictions they made."""
    mem_len = attn_len - tgt_len
    steps = max(1, math.ceil(tokens / (tgt_len * batch)))
    fill = math.ceil(mem_len / tgt_len)
    ids = torch.randint(0, n_token, (fill + steps + 1, batch, tgt_len + 1), generator=gen).to(device)
    module = getattr(model, "module", model)
    memory = module.init_memory(batch, device=device)
    with eval_lengths(model, tgt_len=tgt_len, mem_len=mem_len):
        for i in range(fill + 1):                 # fill the memory (and warm up kernels), untimed
            memory = model(ids[i, :, :-1], ids[i, :, 1:], memory=memory).memory
        _sync(device)
        tic = time.perf_counter()
        for i in range(fill + 1, fill + 1 + steps):
            memory = model(ids[i, :, :-1], ids[i, :, 1:], memory=memory).memory
        _sync(device)
    return time.perf_counter() - tic, steps * tgt_len * batch


def _sliding_seconds(model, gen: torch.Generator, attn_len: int, batch: int, windows: int,
                     device: torch.device, n_token: int) -> tuple[float, int]:
    """Seconds for ``windows`` full windows (one prediction each), in forwards of ``batch``."""
    steps = max(1, math.ceil(windows / batch))
    ids = torch.randint(0, n_token, (steps + 1, batch, attn_len + 1), generator=gen).to(device)
    with eval_lengths(model, **unwrap(model).window_lengths(attn_len)):
        model(ids[0, :, :-1], ids[0, :, -1:])      # warm-up, untimed
        _sync(device)
        tic = time.perf_counter()
        for i in range(1, steps + 1):
            # The whole window from scratch; only its last position predicts (targets of length 1).
            model(ids[i, :, :-1], ids[i, :, -1:])
        _sync(device)
    return time.perf_counter() - tic, steps * batch


@torch.inference_mode()
def measure(model, attn_lens: Sequence[int], tgt_len: int, batch_size: int = 1, cached_tokens: int = 2048,
            sliding_windows: int = 16, repeats: int = 3, seed: int = 0,
            device: Optional[torch.device] = None) -> dict:
    """Per-token seconds of both procedures and their ratio at every attention length."""
    module = unwrap(model)
    if not module.caches_hidden:
        raise ValueError(f"eval speed compares cached hidden-state memory with sliding windows; the "
                         f"{module.family} family's memory holds no hidden states (caches_hidden=False)")
    device = device or next(module.parameters()).device
    n_token = module.n_token
    was_training = module.training
    module.eval()
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for a in attn_lens:
            t = min(tgt_len, a - 1)
            if t < 1:
                raise ValueError(f"attention length {a} leaves no memory for a segment of {tgt_len}")
            cached, sliding = [], []
            for _ in range(repeats):
                sec, n = _cached_seconds(model, gen, a, t, batch_size, cached_tokens, device, n_token)
                cached.append(sec / n)
                sec, n = _sliding_seconds(model, gen, a, batch_size, sliding_windows, device, n_token)
                sliding.append(sec / n)
            c, s = statistics.median(cached), statistics.median(sliding)
            rows.append({"attn_len": a, "tgt_len": t, "mem_len": a - t, "cached_s_per_token": c,
                         "sliding_s_per_token": s, "ratio": s / c,
                         "cached_tokens_per_s": 1.0 / c, "sliding_tokens_per_s": 1.0 / s})
    finally:
        module.train(was_training)
    return {
        "definition": "per-token time of the Al-Rfou sliding window (window = attn_len tokens, stride 1, one "
                      "prediction per window, from scratch) over cached-memory evaluation (tgt_len-token "
                      "segments, mem_len = attn_len - tgt_len cached states, every position predicted), same "
                      "Transformer-XL; ratio = sliding / cached",
        "batch_size": batch_size, "repeats": repeats, "cached_tokens": cached_tokens,
        "sliding_windows": sliding_windows, "device": str(device),
        "dtype": str(next(module.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "rows": rows,
    }


def format_rows(result: dict) -> str:
    lines = [f"{'attn len':>8}  {'cached tok/s':>12}  {'sliding tok/s':>13}  {'slower':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['attn_len']:>8}  {r['cached_tokens_per_s']:>12,.0f}  {r['sliding_tokens_per_s']:>13,.1f}"
                     f"  {r['ratio']:>7,.0f}x")
    return "\n".join(lines)
