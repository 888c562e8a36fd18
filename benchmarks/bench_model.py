"""Transformer-XL training step on CPU (fp32): ours against the reference port.

One step = forward with the carried memory, backward, gradient clipping (0.25) and an AdamW
update, for our TransformerXL and for HF's TransfoXLLMHeadModel (transformers 4.35.2, the port of
the reference code that the released weights run in) on the same configuration, batch and
tokens. Each measurement runs in its own fresh process; ours and the port alternate, and the
report gives medians over the repetitions. tokens/s counts batch × tgt_len per step from each
run's median step time. Memory is the process's peak RSS growth over the RSS just before the
model is built (``ru_maxrss``, so it includes activations, gradients and optimizer state).
A shared VM's speed drifts by tens of percent between processes, so the comparison also runs
both implementations in one process with their steps alternating (``speedup_interleaved``:
the median ratio of adjacent steps), the figure that holds still from run to run.

    make reference-env                                    # .venv-ref with transformers 4.35.2
    .venv/bin/python benchmarks/bench_model.py --against-reference   # → benchmarks/results/model_vs_reference.json
    .venv/bin/python benchmarks/bench_model.py --impl ours --tokens zipf     # one run, JSON to stdout

The port's interpreter: ``--ref-python``, else ``$XLPIPE_REF_PYTHON``, else ``.venv-ref/bin/python``
(or any interpreter where ``import transformers`` gives 4.35.2, e.g. with PYTHONPATH set to a
``pip install --target`` directory). Both start from empty memory (the authors' convention; the
port's default would be zero-filled memory). The port shifts labels inside the model, so it scores
tgt_len - 1 of the tgt_len positions (its adaptive softmax runs on 127 of 128 rows here).

Default configuration (issue 3): 6 layers, d_model 256, 4 heads × 64, d_inner 1024, adaptive
softmax over 32,000 tokens with cutoffs [4000, 12000] (div_val 1, tied weights and tail
projections, per-layer u/v as the port's default), dropout 0.1, batch 8 × 128, mem_len 128,
2 threads. Token streams: uniform (most tokens in the tail clusters: the adaptive softmax's worst
case) and Zipf (s = 1, word-like: most tokens in the shortlist).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "model_vs_reference.json"
N_TOKEN, CUTOFFS = 32000, [4000, 12000]
SHAPE = dict(n_layer=6, d_model=256, n_head=4, d_head=64, d_inner=1024)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def sample_tokens(kind: str, shape: tuple[int, ...], n_token: int = N_TOKEN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)          # same tokens in both processes (same torch)
    if kind == "uniform":
        return torch.randint(0, n_token, shape, generator=gen)
    probs = 1.0 / torch.arange(1, n_token + 1, dtype=torch.float64)
    n = 1
    for s in shape:
        n *= s
    return torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen).view(shape)


# ----------------------------------------------------------------------------- one implementation


def ours(args):
    sys.path.insert(0, str(ROOT))
    from models import ModelConfig, build_model

    cfg = ModelConfig(n_token=N_TOKEN, **SHAPE, dropout=0.1, dropatt=0.0, cutoffs=CUTOFFS, div_val=1,
                      tie_weight=True, tie_projs=[False, True, True], untie_r=True,
                      tgt_len=args.tgt_len, mem_len=args.mem_len)
    model = build_model(cfg).train()
    state = {"memory": model.init_memory(args.batch)}

    def loss(x, y):
        out = model(x, y, state["memory"])
        state["memory"] = out.memory
        return out.loss
    return model, loss


def reference(args):
    import transformers
    from transformers import TransfoXLConfig, TransfoXLLMHeadModel

    if transformers.__version__ != "4.35.2":
        raise SystemExit(f"the reference is transformers 4.35.2; {sys.executable} has {transformers.__version__}")
    config = TransfoXLConfig(vocab_size=N_TOKEN, cutoffs=CUTOFFS, d_embed=SHAPE["d_model"], div_val=1,
                             mem_len=args.mem_len, clamp_len=0, same_length=False, proj_share_all_but_first=True,
                             untie_r=True, pre_lnorm=False, dropout=0.1, dropatt=0.0, **SHAPE)
    model = TransfoXLLMHeadModel(config).train()
    state = {"mems": [torch.empty(0, args.batch, SHAPE["d_model"]) for _ in range(SHAPE["n_layer"])]}

    def loss(x, y):
        out = model(input_ids=x, labels=x, mems=state["mems"])   # the port shifts labels itself
        state["mems"] = out.mems
        return out.loss
    return model, loss


def train_step(model, loss_fn, opt, x, y) -> tuple[torch.Tensor, float]:
    """One timed step: forward with the carried memory, backward, clipping, AdamW; (loss, seconds)."""
    t0 = time.perf_counter()
    loss = loss_fn(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, time.perf_counter() - t0


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.warmup + args.steps
    data = sample_tokens(args.tokens, (args.batch, steps * args.tgt_len + 1))
    rss_before = rss_mib()
    model, loss_fn = (ours if args.impl == "ours" else reference)(args)
    # loop: torch's CPU default (one parameter at a time); fused: its single-kernel AdamW, on both sides
    opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, **({"fused": True} if args.optimizer == "fused" else {}))
    times = []
    for step in range(steps):
        lo = step * args.tgt_len
        x, y = data[:, lo: lo + args.tgt_len], data[:, lo + 1: lo + 1 + args.tgt_len]
        loss, seconds = train_step(model, loss_fn, opt, x, y)
        times.append(seconds)
    median = statistics.median(times[args.warmup:])
    return {"impl": args.impl, "tokens": args.tokens, "tokens_per_s": round(args.batch * args.tgt_len / median, 1),
            # the fastest step: less sensitive to other load on a shared machine than the median
            "tokens_per_s_best": round(args.batch * args.tgt_len / min(times[args.warmup:]), 1),
            "step_s_median": round(median, 4), "step_s": [round(t, 4) for t in times],
            "rss_growth_mib": round(peak_rss_mib() - rss_before, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "n_params": sum(p.numel() for p in model.parameters()), "final_loss": round(loss.item(), 4),
            "torch": torch.__version__, "python": platform.python_version()}


def measure_interleaved(args) -> dict:
    """Both implementations in this one process (the port's interpreter, our models/ on the
    path), their steps alternating (who goes first alternates too): each pair of adjacent
    steps ran under the same machine state, so the median of the per-pair ratios holds
    still while a shared VM's speed drifts from one process to the next. Peak memory is not
    comparable here (one process): the fresh-process runs measure it."""
    torch.set_num_threads(args.threads)
    steps = args.warmup + args.steps
    data = sample_tokens(args.tokens, (args.batch, steps * args.tgt_len + 1))
    sides = {}
    for impl, build in (("ours", ours), ("ref", reference)):
        torch.manual_seed(0)
        model, loss_fn = build(args)
        opt = torch.optim.AdamW(model.parameters(), lr=2.5e-4, **({"fused": True} if args.optimizer == "fused" else {}))
        sides[impl] = (model, loss_fn, opt, [])
    for step in range(steps):
        lo = step * args.tgt_len
        x, y = data[:, lo: lo + args.tgt_len], data[:, lo + 1: lo + 1 + args.tgt_len]
        for impl in (("ours", "ref") if step % 2 == 0 else ("ref", "ours")):
            model, loss_fn, opt, times = sides[impl]
            times.append(train_step(model, loss_fn, opt, x, y)[1])
    ours_t, ref_t = sides["ours"][3][args.warmup:], sides["ref"][3][args.warmup:]
    ratios = [r / o for o, r in zip(ours_t, ref_t)]
    return {"impl": "both", "tokens": args.tokens, "pair_speedups": [round(r, 3) for r in ratios],
            "speedup": round(statistics.median(ratios), 3),
            "ours_step_s_median": round(statistics.median(ours_t), 4),
            "ref_step_s_median": round(statistics.median(ref_t), 4)}


# ----------------------------------------------------------------------------- comparison


def ref_python(explicit: str | None) -> str:
    py = explicit or os.environ.get("XLPIPE_REF_PYTHON") or str(ROOT / ".venv-ref" / "bin" / "python")
    try:
        probe = subprocess.run([py, "-c", "import transformers; print(transformers.__version__)"],
                               capture_output=True, text=True)
        found = probe.stdout.strip() if probe.returncode == 0 else (probe.stderr.strip().splitlines() or ["?"])[-1]
    except OSError as exc:
        found = str(exc)
    if found != "4.35.2":
        raise SystemExit(f"{py} does not run transformers 4.35.2 ({found}): run `make reference-env`, or pass "
                         f"--ref-python / set XLPIPE_REF_PYTHON")
    return py


def run_child(python: str, impl: str, tokens: str, args) -> dict:
    cmd = [python, __file__, "--impl", impl, "--tokens", tokens, "--threads", str(args.threads),
           "--batch", str(args.batch), "--tgt-len", str(args.tgt_len), "--mem-len", str(args.mem_len),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--optimizer", args.optimizer]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{impl} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    from machine import machine_info  # benchmarks/machine.py (the script's own directory)

    py_ref = ref_python(args.ref_python)
    load_before = os.getloadavg()
    t0 = time.time()
    runs = {kind: {"ours": [], "reference": []} for kind in args.distributions}
    for rep in range(args.repeats):
        for kind in args.distributions:
            order = ["ours", "reference"] if rep % 2 == 0 else ["reference", "ours"]
            for impl in order:
                r = run_child(sys.executable if impl == "ours" else py_ref, "ours" if impl == "ours" else "ref",
                              kind, args)
                runs[kind][impl].append(r)
                print(f"{kind:8s} {impl:9s} {r['tokens_per_s']:8.1f} tok/s  +{r['rss_growth_mib']:7.1f} MiB",
                      file=sys.stderr)
    paired = {kind: [] for kind in args.distributions}
    for rep in range(args.interleaved_repeats):
        for kind in args.distributions:
            r = run_child(py_ref, "both", kind, args)
            paired[kind].append(r)
            print(f"{kind:8s} one process, alternating steps: {r['speedup']:.3f}x", file=sys.stderr)
    table = {}
    for kind, by_impl in runs.items():
        row = {impl: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "tokens_per_s_best": statistics.median(r["tokens_per_s_best"] for r in rs),
                      "rss_growth_mib": statistics.median(r["rss_growth_mib"] for r in rs),
                      "n_params": rs[0]["n_params"], "runs_tokens_per_s": [r["tokens_per_s"] for r in rs]}
               for impl, rs in by_impl.items()}
        row["speedup"] = round(row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"], 3)
        row["speedup_best_step"] = round(row["ours"]["tokens_per_s_best"] / row["reference"]["tokens_per_s_best"], 3)
        row["memory_ratio"] = round(row["ours"]["rss_growth_mib"] / row["reference"]["rss_growth_mib"], 3)
        if paired[kind]:
            pairs = [x for r in paired[kind] for x in r["pair_speedups"]]
            row["speedup_interleaved"] = round(statistics.median(pairs), 3)
            row["interleaved_runs"] = [r["speedup"] for r in paired[kind]]
            row["interleaved_quartiles"] = [round(q, 3) for q in statistics.quantiles(pairs, n=4)]
        table[kind] = row
    return {
        "benchmark": "transformer_xl_train_step_cpu_vs_reference",
        "reference": "transformers 4.35.2 TransfoXLLMHeadModel",
        "goal": "ours >= 1.5x the reference's tokens/s at no more memory",
        "results": table,
        "config": {**SHAPE, "n_token": N_TOKEN, "cutoffs": CUTOFFS, "div_val": 1, "untie_r": True,
                   "batch": args.batch, "tgt_len": args.tgt_len, "mem_len": args.mem_len, "dropout": 0.1,
                   "dtype": "fp32", "optimizer": f"AdamW lr 2.5e-4 ({args.optimizer})", "clip": 0.25,
                   "start_memory": "empty"},
        "method": f"{args.repeats} fresh processes per implementation and distribution, alternating; per run "
                  f"{args.warmup} warm-up + {args.steps} timed steps, median step time (and fastest step: "
                  f"tokens_per_s_best); medians over runs. speedup_interleaved: {args.interleaved_repeats} "
                  f"processes per distribution running both, steps alternating; median of the per-pair ratios "
                  f"(interleaved_quartiles: their quartiles)",
        "threads": args.threads,
        "machine": {**machine_info(), "platform": platform.platform(),
                    "torch": torch.__version__, "load_avg_before": [round(x, 2) for x in load_before],
                    "load_avg_after": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": round(time.time() - t0, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against-reference", action="store_true",
                    help="ours vs the port in fresh alternating processes (the default without --impl)")
    ap.add_argument("--impl", choices=["ours", "ref", "both"],
                    help="measure one implementation in this process (both: alternating steps; the port's interpreter)")
    ap.add_argument("--interleaved-repeats", type=int, default=3,
                    help="processes per distribution that run both implementations with alternating steps (0: none)")
    ap.add_argument("--tokens", choices=["uniform", "zipf"], default="uniform", help="with --impl")
    ap.add_argument("--distributions", nargs="+", choices=["uniform", "zipf"], default=["uniform", "zipf"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tgt-len", type=int, default=128)
    ap.add_argument("--mem-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--optimizer", choices=["loop", "fused"], default="loop",
                    help="AdamW for both sides: torch's CPU default (a loop over parameters) or its fused kernel")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    if args.impl and args.against_reference:
        ap.error("--impl measures one implementation; --against-reference compares both")
    if args.impl:
        result = measure_interleaved(args) if args.impl == "both" else measure(args)
        print(json.dumps(result))
        return result
    result = compare(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
        json.dump(result, f, indent=2)
    os.replace(f.name, args.out)
    print(json.dumps(result["results"], indent=2))
    return result


if __name__ == "__main__":
    main()
