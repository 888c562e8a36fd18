"""Relative effective context length (RECL) of a group of models (Dai et al. 2019, §4.3, App. C).

RECL is defined on a *group* of models ``M``, from per-token losses at growing context lengths:

    l_i(c, t)   = -log P_i(x_t | x_{t-1}, ..., x_{t-c})        model i, exactly c tokens of context
    b(c, t)     = min_i l_i(c, t)                               the group's best short-context loss
    T(c, r)     = the top-r fraction of positions t with the largest b(c, t)   (the hard positions)
    f_i(c, c')  = 1/|T| sum_{t in T} min(b(c, t), l_i(c', t))   only gains over the baseline count
    g_i(c, c')  = (exp f_i(c, c) - exp f_i(c, c')) / exp f_i(c, c)

Starting from the first context length c and c' the next one, model i's RECL is the first c with
``g_i(c, c') < threshold`` (1 %); otherwise c moves to c' and the test repeats. When every step
up to the longest measured context still gains, the RECL is at least that length (``capped``).

Choices the paper leaves open, fixed here: |T| = ceil(r · N) positions (at least one); ties in
b(c, t) are broken by position (a stable sort); positions are the same for every model and
context (sampled at least ``max(contexts)`` tokens into the split, so every context is real).

``context_losses`` computes ``l_i(c, t)`` for one model: every target sees a window of exactly c
tokens, run from empty memory (one forward per window, only its last position scored).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from pipeline.common import XlpipeError

Losses = Mapping[str, Mapping[int, np.ndarray]]   # losses[model][context_len] -> per-position NLL


class ReclError(XlpipeError, ValueError):
    """Loss arrays that do not describe one group at shared positions and contexts."""


def _check(losses: Losses) -> tuple[list[str], list[int], int]:
    models = list(losses)
    if not models:
        raise ReclError("RECL needs at least one model's losses")
    contexts = sorted(losses[models[0]])
    if len(contexts) < 2:
        raise ReclError(f"RECL needs at least two context lengths, got {contexts}")
    n = None
    for m in models:
        if sorted(losses[m]) != contexts:
            raise ReclError(f"model {m!r} has context lengths {sorted(losses[m])}, model {models[0]!r} has "
                            f"{contexts}; every model needs losses at the same context lengths")
        for c in contexts:
            arr = np.asarray(losses[m][c])
            if arr.ndim != 1 or (n is not None and len(arr) != n):
                raise ReclError(f"losses[{m!r}][{c}] has shape {arr.shape}; expected one value per position "
                                f"({n if n is not None else 'N'}), the same positions for every model")
            if not np.isfinite(arr).all():
                raise ReclError(f"losses[{m!r}][{c}] holds non-finite values")
            n = len(arr)
    if not n:
        raise ReclError("RECL needs at least one position")
    return models, contexts, n


def top_positions(baseline: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the ceil(ratio · N) positions with the largest baseline loss (ties: by position)."""
    if not 0.0 < ratio <= 1.0:
        raise ReclError(f"ratio r={ratio} must be in (0, 1]")
    k = max(1, math.ceil(ratio * len(baseline) - 1e-9))
    order = np.argsort(-baseline, kind="stable")
    return np.sort(order[:k])


def relative_gain(losses: Losses, model: str, c: int, c2: int, ratio: float) -> float:
    """g_i(c, c') of ``model`` within the group ``losses`` (see the module docstring)."""
    base = np.min(np.stack([np.asarray(losses[m][c], dtype=np.float64) for m in losses]), axis=0)
    hard = top_positions(base, ratio)
    b = base[hard]
    f_cc = b.mean()                                # min(b, l_i(c)) = b, since b is the group minimum
    f_cc2 = np.minimum(b, np.asarray(losses[model][c2], dtype=np.float64)[hard]).mean()
    return float((math.exp(f_cc) - math.exp(f_cc2)) / math.exp(f_cc))


def recl(losses: Losses, ratio: float, threshold: float = 0.01) -> dict[str, dict]:
    """Per model: ``{"recl": c, "capped": bool, "gains": [(c, c', g), ...]}``."""
    models, contexts, _ = _check(losses)
    out = {}
    for m in models:
        gains, value, capped = [], contexts[-1], True
        for c, c2 in zip(contexts, contexts[1:]):
            g = relative_gain(losses, m, c, c2, ratio)
            gains.append((c, c2, g))
            if g < threshold:
                value, capped = c, False
                break
        out[m] = {"recl": value, "capped": capped, "gains": gains}
    return out


def recl_table(losses: Losses, ratios: Sequence[float] = (0.1, 0.5, 1.0), threshold: float = 0.01) -> dict:
    """``{"ratios", "threshold", "contexts", "models": {name: {str(r): {"recl", "capped", "gains"}}}}``."""
    models, contexts, n = _check(losses)
    table = {m: {} for m in models}
    for r in ratios:
        for m, res in recl(losses, r, threshold).items():
            table[m][str(r)] = res
    return {"ratios": list(ratios), "threshold": threshold, "contexts": contexts, "positions": n, "models": table}


def format_table(table: dict) -> str:
    """The paper's Table 8 layout: one row per model, one RECL column per r (``>=`` when capped)."""
    ratios = table["ratios"]
    width = max(12, *(len(m) for m in table["models"]))
    lines = [f"{'model':<{width}}  " + "  ".join(f"r={r:<6g}" for r in ratios)]
    for m, row in table["models"].items():
        cells = []
        for r in ratios:
            res = row[str(r)]
            cells.append(f"{('>=' if res['capped'] else '') + str(res['recl']):<8}")
        lines.append(f"{m:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_table(table: dict, path: str | Path) -> Path:
    """Relative gain g(c, c') against c per model, one panel per r, the threshold drawn (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = table["ratios"]
    fig, axes = plt.subplots(1, len(ratios), figsize=(4.2 * len(ratios), 3.4), squeeze=False)
    for ax, r in zip(axes[0], ratios):
        for m, row in table["models"].items():
            res = row[str(r)]
            cs = [c for c, _, _ in res["gains"]]
            gs = [100 * g for _, _, g in res["gains"]]
            line, = ax.plot(cs, gs, marker="o", label=f"{m} (RECL {'>=' if res['capped'] else ''}{res['recl']})")
            ax.axvline(res["recl"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.axhline(100 * table["threshold"], color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"r = {r}")
        ax.set_xlabel("context length c")
        ax.set_ylabel("relative gain g(c, c') [%]")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- per-token losses


def sample_positions(n_tokens: int, max_context: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` sorted target positions in ``[max_context, n_tokens)`` (all of them when fewer)."""
    lo = max_context
    if n_tokens - lo < 1:
        raise ReclError(f"the split has {n_tokens} tokens; a context of {max_context} leaves no target position")
    if count <= 0 or count >= n_tokens - lo:
        return np.arange(lo, n_tokens)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(lo, n_tokens), size=count, replace=False))


@torch.no_grad()
def context_losses(model, tokens: np.ndarray | torch.Tensor, positions: Sequence[int], contexts: Sequence[int],
                   batch_size: int = 16, clamp_len: Optional[int] = None,
                   device: Optional[torch.device] = None) -> dict[int, np.ndarray]:
    """``{c: nll}`` with ``nll[k] = -log P(tokens[t] | tokens[t-c : t])`` for ``t = positions[k]``.

    Each window of exactly c tokens is one forward from empty memory (Transformer-XL: segment
    length c, no memory kept); only its last position is scored. A model that sees at most
    ``max_context()`` tokens (the Al-Rfou model's window) is given its last that many when c is
    larger: what it can use of a longer context, so its gains stop there.
    """
    from pipeline.evaluation.scoring import unwrap

    module = unwrap(model)
    device = device or next(module.parameters()).device
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    if len(pos) and (int(pos.min()) < max(contexts) or int(pos.max()) >= len(tokens)):
        raise ReclError(f"positions must lie in [max(contexts)={max(contexts)}, {len(tokens)})")
    # Families with suffix targets score only the last position (no wasted softmax); the others
    # take one target per input position.
    last_only = module.suffix_targets
    was_training = module.training
    module.eval()
    out: dict[int, np.ndarray] = {}
    try:
        cap = module.max_context()
        for given in contexts:
            if given < 1:
                raise ReclError(f"context length {given} must be >= 1")
            c = given if cap is None else min(given, cap)
            nll = torch.empty(len(pos), dtype=torch.float64)
            with module.eval_lengths(**module.window_lengths(c, clamp_len)):
                offs = torch.arange(-c, 0)
                for i in range(0, len(pos), batch_size):
                    t = pos[i: i + batch_size]
                    win = tokens[t[:, None] + offs].to(device)             # [b, c]: x_{t-c} .. x_{t-1}
                    if last_only:                                          # [b, 1]: x_t
                        tgt = tokens[t][:, None].to(device)
                    else:                                                  # [b, c]: x_{t-c+1} .. x_t
                        tgt = tokens[t[:, None] + offs + 1].to(device)
                    nll[i: i + len(t)] = model(win, tgt).nll[:, -1].double().cpu()
            out[given] = nll.numpy()
    finally:
        module.train(was_training)
    return out
