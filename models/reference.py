"""Transformer-XL weights from the reference implementations → our TransformerXL.

Two namings are read:

- ``"authors"``: kimiyoung/transformer-xl's PyTorch ``MemTransformerLM.state_dict()`` (also
  NVIDIA's copy): ``word_emb.*``, ``layers.N.dec_attn.*``, ``layers.N.pos_ff.CoreNet.{0,3}.*``,
  shared ``r_w_bias``/``r_r_bias``, ``crit.*``.
- ``"hf"``: transformers' ``TransfoXLLMHeadModel`` (4.35.2, ported from the TF code that produced
  the released weights): the same under ``transformer.``, per-layer u/v with ``untie_r``, ``crit.*``
  at the top.

Our parameter layout follows the reference, so conversion is renaming plus three facts:
the feed-forward block's names (``CoreNet.0``/``CoreNet.3``/``layer_norm`` → ``ff1``/``ff2``/``norm``);
the order of the tail clusters' columns in the softmax head — ours and HF's put cluster i at
``shortlist + i - 1``, the authors' code reads it from the end (``head_logprob[:, -i]``), so their
``crit.cluster_weight``/``cluster_bias`` rows are reversed; and tied tensors, which a file may hold
under every name (``torch.save(state_dict())``), once (HF's safetensors) — any copy present must
equal the tensor it is tied to. ``pos_emb.inv_freq`` is a constant buffer: checked, not loaded.
"""
from __future__ import annotations

import math
import re
from typing import Literal, Mapping, Optional

import torch
from torch import Tensor

from models.config import ModelConfig

Naming = Literal["auto", "hf", "authors"]
HF_PREFIX = "transformer."
_FF = {"pos_ff.CoreNet.0.": "pos_ff.ff1.", "pos_ff.CoreNet.3.": "pos_ff.ff2.", "pos_ff.layer_norm.": "pos_ff.norm."}
_LAYER_UV = re.compile(r"^layers\.\d+\.dec_attn\.(r_w_bias|r_r_bias)$")


class ReferenceWeightsError(ValueError):
    """A state dict or config that does not describe a Transformer-XL we can load exactly."""


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: Mapping, **overrides) -> ModelConfig:
    """Our ModelConfig from an HF ``config.json`` (TransfoXLConfig fields). ``overrides`` set
    what HF does not record (``tgt_len``, ``ext_len``, ``same_length_keys``...)."""
    def need(key):
        if key not in hf:
            raise ReferenceWeightsError(f"HF config has no {key!r}")
        return hf[key]

    if need("attn_type") != 0:
        raise ReferenceWeightsError(f"HF config attn_type={hf['attn_type']}: only 0 (relative, Dai et al.) "
                                    f"exists in the HF port")
    if hf.get("sample_softmax", -1) > 0:
        raise ReferenceWeightsError(f"HF config sample_softmax={hf['sample_softmax']}: sampled softmax is not "
                                    f"supported; it must be -1")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not math.isclose(eps, 1e-5):
        raise ReferenceWeightsError(f"HF config layer_norm_epsilon={eps}: our LayerNorms use 1e-5")
    cutoffs = list(need("cutoffs"))
    n_token = hf.get("vocab_size", hf.get("n_token"))
    if n_token is None:
        raise ReferenceWeightsError("HF config has neither 'vocab_size' nor 'n_token'")
    if cutoffs and cutoffs[-1] == n_token:        # HF appends n_token to its own copy; the file may too
        cutoffs = cutoffs[:-1]
    if "tie_projs" in hf:
        tie_projs = [bool(t) for t in hf["tie_projs"]]
    else:
        tie_projs = [False] + [bool(hf.get("proj_share_all_but_first", True))] * len(cutoffs)
    clamp = need("clamp_len")
    fields = dict(
        family="transformer_xl", n_token=int(n_token), n_layer=need("n_layer"), d_model=need("d_model"),
        n_head=need("n_head"), d_head=need("d_head"), d_inner=need("d_inner"), d_embed=need("d_embed"),
        dropout=hf.get("dropout", 0.1), dropatt=hf.get("dropatt", 0.0), attn_type="relative",
        mem_len=need("mem_len"), clamp_len=clamp if clamp > 0 else -1, same_length=bool(need("same_length")),
        same_length_keys="mem_len", pre_lnorm=bool(need("pre_lnorm")), untie_r=bool(need("untie_r")),
        cutoffs=cutoffs, div_val=need("div_val"), tie_weight=bool(hf.get("tie_word_embeddings", True)),
        tie_projs=tie_projs, init=hf.get("init", "normal"), init_std=hf.get("init_std", 0.02),
        init_range=hf.get("init_range", 0.01), proj_init_std=hf.get("proj_init_std", 0.01),
    )
    unknown = set(overrides) - set(ModelConfig.__dataclass_fields__)
    if unknown:
        raise ReferenceWeightsError(f"unknown model fields {sorted(unknown)}")
    return ModelConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------- state dict


def detect_naming(state: Mapping[str, Tensor]) -> Literal["hf", "authors"]:
    """HF's port keeps the body under ``transformer.``; the authors' code has no prefix."""
    return "hf" if any(k.startswith(HF_PREFIX) for k in state) else "authors"


def _rename(key: str, naming: str) -> Optional[str]:
    """Our name for a source key, or None if it is not in that naming."""
    if naming == "hf":
        if key.startswith(HF_PREFIX):
            key = key[len(HF_PREFIX):]
        elif not key.startswith("crit."):
            return None
    elif key.startswith(HF_PREFIX):
        return None
    for old, new in _FF.items():
        if old in key:
            return key.replace(old, new)
    return key


def _check_inv_freq(key: str, value: Tensor, d_model: int) -> None:
    want = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
    if value.shape != want.shape or not torch.allclose(value.float(), want, rtol=1e-5, atol=0):
        raise ReferenceWeightsError(f"{key}: not the sinusoid frequencies of d_model={d_model} "
                                    f"(shape {tuple(value.shape)}); the config does not match these weights")


def convert_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig, naming: Naming = "auto") -> dict[str, Tensor]:
    """``state`` in the authors' or HF naming → a state dict that ``TransformerXL(cfg)`` loads
    with ``strict=True`` (every tied name present). Unknown, missing, mis-shaped or
    inconsistently tied tensors raise ReferenceWeightsError naming them."""
    from models.transformer_xl import TransformerXL

    if cfg.family != "transformer_xl" or cfg.attn_type != "relative":
        raise ReferenceWeightsError(f"reference weights are a relative-attention Transformer-XL; the config asks "
                                    f"for family={cfg.family!r} attn_type={cfg.attn_type!r}")
    if naming == "auto":
        naming = detect_naming(state)
    if naming not in ("hf", "authors"):
        raise ReferenceWeightsError(f"naming={naming!r}: choose auto, hf or authors")
    with torch.device("meta"):
        model = TransformerXL(cfg)
    expected = model.state_dict(keep_vars=True)
    # Our names grouped by the parameter they share (tying): each group loads one tensor.
    groups: dict[int, list[str]] = {}
    for name, p in expected.items():
        groups.setdefault(id(p), []).append(name)

    copies: dict[str, list[tuple[str, Tensor]]] = {}     # our name -> (source key, tensor) found for it
    unknown = []
    for key, value in state.items():
        name = _rename(key, naming)
        if name == "pos_emb.inv_freq":
            _check_inv_freq(key, value, cfg.d_model)
            continue
        if name is not None and name not in expected and not cfg.untie_r and _LAYER_UV.match(name):
            name = name.rsplit(".", 1)[1]                  # HF's per-layer reference to the shared u/v
        if name in expected:
            copies.setdefault(name, []).append((key, value))
        else:
            unknown.append(key)
    if unknown:
        raise ReferenceWeightsError(f"{len(unknown)} tensors are not part of this {naming}-named Transformer-XL "
                                    f"(check untie_r, div_val, cutoffs, d_embed): {sorted(unknown)[:12]}")

    out: dict[str, Tensor] = {}
    missing = []
    for members in groups.values():          # tied names: every copy in the file must agree
        found = [c for n in members for c in copies.get(n, [])]
        if not found:
            missing.append(members[0])
            continue
        (key, first), want = found[0], tuple(expected[members[0]].shape)
        if tuple(first.shape) != want:
            raise ReferenceWeightsError(f"{key}: shape {tuple(first.shape)} in the file, {want} in the model "
                                        f"built from the config")
        for other, value in found[1:]:
            if value.shape != first.shape or not torch.equal(value, first):
                raise ReferenceWeightsError(f"{other} should be tied to {key} (the config ties them) but holds "
                                            f"different values; check tie_weight / tie_projs / untie_r")
        out.update({n: first for n in members})
    if missing:
        raise ReferenceWeightsError(f"{len(missing)} tensors of the model are not in the file: {missing[:12]}")
    if naming == "authors" and "crit.cluster_weight" in out:
        out["crit.cluster_weight"] = out["crit.cluster_weight"].flip(0)
        out["crit.cluster_bias"] = out["crit.cluster_bias"].flip(0)
    return out


def load_reference(state: Mapping[str, Tensor], cfg: ModelConfig, naming: Naming = "auto"):
    """A TransformerXL built from ``cfg`` holding the reference weights, in eval mode."""
    from models.transformer_xl import TransformerXL

    converted = convert_state_dict(state, cfg, naming)
    model = TransformerXL(cfg)
    dtype = next(iter(converted.values())).dtype
    model.to(dtype).load_state_dict(converted, strict=True)
    return model.eval()
