"""Build the reference-weight fixtures in tests/fixtures/transfo_xl/ from HF's port.

Runs in the reference environment (`make reference-env`, then
`.venv-ref/bin/python tools/make_reference_fixture.py`), never in ours: it needs
transformers 4.35.2, the last release that maintained TransfoXLLMHeadModel.

For each case it builds a seeded, randomly initialised TransfoXLLMHeadModel, perturbs every
parameter (so biases, LayerNorms and tied tensors are all non-trivial), saves it with
`save_pretrained` (config.json + model.safetensors, tied copies dropped as HF does) and records,
in eval mode, the per-token NLL of the targets over three consecutive segments with memory:
from empty memory (the authors' convention, `mems` of length 0) and from HF's default zero-filled
memory (`mems=None`). tests/test_reference_weights.py checks our model against these numbers.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TransfoXLConfig, TransfoXLLMHeadModel

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "transfo_xl"
BATCH, TGT_LEN, SEGMENTS = 2, 6, 3

CASES = {
    # The large-model recipe in miniature: per-layer u/v, div_val 4-style adaptive input and
    # softmax with three tail clusters, shared tail projections, same_length and clamp_len.
    "untied_div2": dict(vocab_size=250, cutoffs=[30, 80, 150], d_model=32, d_embed=32, n_head=4, d_head=8,
                        d_inner=48, div_val=2, n_layer=3, mem_len=10, clamp_len=7, same_length=True,
                        proj_share_all_but_first=True, untie_r=True, pre_lnorm=False),
    # The authors' PyTorch layout: shared u/v, one embedding (div_val 1) projected from d_embed,
    # one tied tail projection, pre-LN, no clamp.
    "shared_div1": dict(vocab_size=120, cutoffs=[20, 60], d_model=32, d_embed=24, n_head=2, d_head=12,
                        d_inner=40, div_val=1, n_layer=2, mem_len=8, clamp_len=0, same_length=False,
                        proj_share_all_but_first=False, tie_projs=[False, True, False], untie_r=False,
                        pre_lnorm=True),
}


def segments_nll(model, ids: torch.Tensor, mems) -> torch.Tensor:
    """Per-token NLL [batch, SEGMENTS * TGT_LEN] of ids[:, t+1] given ids[:, :t+1], segment by segment."""
    out = []
    for s in range(SEGMENTS):
        inp = ids[:, s * TGT_LEN:(s + 1) * TGT_LEN]
        tgt = ids[:, s * TGT_LEN + 1:(s + 1) * TGT_LEN + 1]
        res = model(input_ids=inp, mems=mems)        # labels=None: full log-probs [batch, len, vocab]
        out.append(-res.prediction_scores.gather(-1, tgt.unsqueeze(-1)).squeeze(-1))
        mems = res.mems
    return torch.cat(out, dim=1)


def build(name: str, kw: dict, seed: int, root: Path = OUT) -> None:
    torch.manual_seed(seed)
    config = TransfoXLConfig(dropout=0.1, dropatt=0.0, **kw)
    model = TransfoXLLMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():                 # tied tensors are one parameter: perturbed once
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(0, config.vocab_size, (BATCH, SEGMENTS * TGT_LEN + 1))
    with torch.no_grad():
        empty = [torch.empty(0, BATCH, config.d_model) for _ in range(config.n_layer)]
        nll_empty = segments_nll(model, ids, empty)
        nll_zero = segments_nll(model, ids, None)
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)    # not part of the weights
    save_file({"input_ids": ids, "nll_empty_memory": nll_empty, "nll_zero_memory": nll_zero},
              str(out / "expected.safetensors"))
    (out / "case.json").write_text(json.dumps({
        "batch": BATCH, "tgt_len": TGT_LEN, "segments": SEGMENTS, "seed": seed,
        "made_by": "tools/make_reference_fixture.py", "transformers": __import__("transformers").__version__,
        "torch": torch.__version__}, indent=1) + "\n")
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"mean NLL {nll_empty.mean():.4f} (empty memory) / {nll_zero.mean():.4f} (zero memory)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT, help="fixture root (default: tests/fixtures/transfo_xl)")
    args = ap.parse_args()
    for i, (name, kw) in enumerate(CASES.items()):
        build(name, kw, args.seed + i, args.out)


if __name__ == "__main__":
    main()
