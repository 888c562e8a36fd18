"""Cost curves of the memory families: per-token cost of evaluation and of a training step as the
context already consumed grows, and as the memory grows.

Every family at the same size (4 layers, d 256, 4 heads of 64, d_inner 1024, 256 symbols, full
softmax), segment 128 and memory 128; the Compressive Transformer with 128 compressed rows at
rate 4, the ∞-former with 256 basis functions; the Al-Rfou model with a 128-token window,
evaluated as its paper does (one token per forward, the 127 before it as context) and trained on
whole 128-token windows without memory, as it is. For each
family the memory is carried over k = 1 … 64 segments of random bytes, and at each k we count the
FLOPs of the next forward (exact, torch's FLOP counter) and time it (median of repeats), for
evaluation and for a training step (forward, backward, AdamW), and take its peak memory: the
most bytes torch's allocator held during the call above what it held before (activations,
gradients, temporaries; the weights, the AdamW state and the memory itself are held before), from
torch's profiler. A second sweep grows the memory at a fixed context (16 segments).

    .venv/bin/python benchmarks/bench_memory_cost.py      # writes benchmarks/results/memory_cost.{json,png}
    .venv/bin/python benchmarks/bench_memory_cost.py --families lstm,gpt2_ltm   # re-measure some, keep the rest
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info, peak_bytes, timed, write_result  # noqa: E402  (benchmarks/machine.py)

from models import ModelConfig, build_model  # noqa: E402
from models.compressive import CompressiveConfig  # noqa: E402
from models.gpt2_ltm import GPT2LTMConfig  # noqa: E402
from models.infinite_former import InfiniteFormerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEGMENT, MEMORY, VOCAB = 128, 128, 256
CONTEXTS = (1, 2, 4, 8, 16, 32, 64)
BASE = dict(n_token=VOCAB, n_layer=4, d_model=256, n_head=4, d_head=64, d_inner=1024, dropout=0.1,
            tgt_len=SEGMENT, mem_len=MEMORY)


def family_configs(memory: int = MEMORY) -> dict[str, ModelConfig]:
    """One config per family; ``memory`` is what the memory sweep grows."""
    return {
        "transformer_xl": ModelConfig(family="transformer_xl", **(BASE | {"mem_len": memory})),
        "compressive": ModelConfig(family="compressive", **BASE,
                                   compressive=CompressiveConfig(cmem_len=memory, ratio=4)),
        "infinite_former": ModelConfig(family="infinite_former", **BASE,
                                       infinite_former=InfiniteFormerConfig(n_basis=2 * memory, widths=[0.01, 0.05],
                                                                            n_samples=memory)),
        "vanilla": ModelConfig(family="vanilla", **(BASE | {"attn_type": "learned", "mem_len": SEGMENT - 1})),
        # The LSTM's state is its memory: the same size whatever the context (mem_len only marks it).
        "lstm": ModelConfig(family="lstm", **(BASE | {"n_layer": 2, "mem_len": 1})),
        # A random GPT-2 of the same size: a window of the previous 128 tokens recomputed per
        # segment, plus the ∞-former's long-term memory (2 x `memory` basis functions) in every layer.
        "gpt2_ltm": ModelConfig(family="gpt2_ltm", **BASE,
                                gpt2_ltm=GPT2LTMConfig(memory=InfiniteFormerConfig(
                                    n_basis=2 * memory, widths=[0.01, 0.05], n_samples=memory, sticky=False))),
    }


def segment_of(family: str) -> int:
    return 1 if family == "vanilla" else SEGMENT     # Al-Rfou et al. score one token per forward


def recurrent_flops_per_token(model) -> int:
    """FLOPs per token of the model's nn.LSTM layers, counted by hand: torch's FLOP counter does not
    see inside the fused LSTM kernel. Per layer: 4 gates of (input + recurrent) matmuls, plus the
    projection of LSTMP; the elementwise gate arithmetic is left out, as for the other families."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.LSTM):
            out = mod.proj_size or mod.hidden_size
            for layer in range(mod.num_layers):
                d_in = mod.input_size if layer == 0 else out
                total += 2 * 4 * mod.hidden_size * (d_in + out) + (2 * mod.hidden_size * out if mod.proj_size else 0)
    return total


def memory_bytes(memory) -> int:
    return sum(t.numel() * t.element_size() for t in memory.tensors().values() if t is not None)



def curve(family: str, cfg: ModelConfig, contexts, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    seg = segment_of(family)
    n_tokens = max(contexts) * SEGMENT + 1
    x = torch.randint(0, VOCAB, (1, n_tokens + SEGMENT + 1), generator=torch.Generator().manual_seed(1))
    memory = model.init_memory(1)
    rows, done = [], 0
    model.eval()
    for k in contexts:
        with torch.no_grad():                            # consume up to k segments of context
            while done < k * SEGMENT:
                memory = model(x[:, done: done + seg], x[:, done + 1: done + 1 + seg], memory=memory).memory
                done += seg
        inp, tgt = x[:, done: done + seg], x[:, done + 1: done + 1 + seg]
        # Al-Rfou et al. train on whole windows from no memory; the others on a segment with memory.
        windowed = family == "vanilla"
        t_inp, t_tgt = (x[:, done: done + SEGMENT], x[:, done + 1: done + 1 + SEGMENT]) if windowed else (inp, tgt)
        t_mem = None if windowed else memory

        def evaluate():
            with torch.no_grad():
                model(inp, tgt, memory=memory)

        def train_step():
            model.train()
            out = model(t_inp, t_tgt, memory=t_mem)
            out.objective.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.eval()

        model.eval()
        counter = FlopCounterMode(display=False)
        with counter:
            evaluate()
        eval_flops = counter.get_total_flops() + recurrent_flops_per_token(model) * seg
        saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        train_s = timed(train_step, repeats)
        train_peak = peak_bytes(train_step)              # after the timed steps: AdamW's state exists
        model.load_state_dict(saved[0])                  # the curve measures cost, not learning
        opt.load_state_dict(saved[1])
        rows.append({"segments": k, "context_tokens": done, "eval_flops_per_token": eval_flops / seg,
                     "eval_s_per_token": timed(evaluate, repeats) / seg, "eval_peak_bytes": peak_bytes(evaluate),
                     "train_step_s_per_token": train_s / t_inp.size(1), "train_step_peak_bytes": train_peak,
                     "memory_state_bytes": memory_bytes(memory)})
        print(family, rows[-1], flush=True)
    return rows


def main(only: list[str]) -> None:
    """``only``: measure these families and keep the others' curves from the committed JSON (each
    family's machine reading is kept beside its curve)."""
    torch.set_num_threads(2)
    repeats = 5
    families = {f: cfg for f, cfg in family_configs().items() if not only or f in only}
    old = json.loads((RESULTS / "memory_cost.json").read_text()) if only else {}
    curves = {**old.get("context_curves", {}), **{f: curve(f, cfg, CONTEXTS, repeats) for f, cfg in families.items()}}
    sweep = dict(old.get("memory_sweep", {}))
    for f in families:
        if f in ("vanilla", "lstm"):
            continue                                   # a window or a state: no memory to grow
        sweep[f] = [{"memory": m, **curve(f, family_configs(m)[f], (16,), repeats)[0]} for m in (64, 128, 256)]
    machines = dict(old.get("machines", {f: old["machine"] for f in old.get("context_curves", {})}))
    machines.update({f: machine_info() for f in families})
    result = {"benchmark": "memory_cost", "machine": machine_info(), "machines": machines, "segment": SEGMENT,
              "memory": MEMORY, "model": {k: v for k, v in BASE.items() if k not in ("tgt_len", "mem_len")},
              "context_curves": curves, "memory_sweep": sweep,
              "note": "memory sweep: transformer_xl mem_len, compressive cmem_len (rate 4), "
                      "infinite_former and gpt2_ltm n_samples (and n_basis = 2x; gpt2_ltm's window stays 128), "
                      "at 16 segments of context; lstm: 2 layers of 256"}
    write_result(RESULTS / "memory_cost.json", result)
    plot(curves, RESULTS / "memory_cost.png")


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval_flops_per_token", 1e6, "evaluation MFLOP per token"),
              ("eval_s_per_token", 1e-3, "evaluation ms per token (2 threads)"),
              ("eval_peak_bytes", 2 ** 20, "evaluation peak MiB (above the weights)"),
              ("train_step_s_per_token", 1e-3, "training step ms per token (2 threads)"),
              ("train_step_peak_bytes", 2 ** 20, "training step peak MiB (above weights + AdamW)"),
              ("memory_state_bytes", 2 ** 20, "memory state MiB")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.2))
    for ax, (key, unit, label) in zip(axes.flat, panels):
        for family, rows in curves.items():
            if all(key in r for r in rows):
                ax.plot([r["context_tokens"] for r in rows], [r[key] / unit for r in rows], marker="o",
                        label=family)
        ax.set_ylabel(label, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")          # the Al-Rfou window costs ~80x the others
        ax.set_xlabel("context already consumed (tokens)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Cost per token as the context grows (4L d256, segment 128, memory 128)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:] == ["--plot"]:                         # redraw from the committed JSON
        plot(json.loads((RESULTS / "memory_cost.json").read_text())["context_curves"], RESULTS / "memory_cost.png")
    else:                                                  # [--families a,b]: only those, merged
        main(sys.argv[2].split(",") if sys.argv[1:2] == ["--families"] else [])
