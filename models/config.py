"""Typed model configuration shared by every family (built by ``models.build_model``).

The settings every family reads are here; a family's own section (``model.vanilla``) is a
dataclass defined in the family's file and nested below, so a new family adds one field."""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import List, Literal, Optional

from models.compressive import CompressiveConfig
from models.gpt2_ltm import GPT2LTMConfig
from models.infinite_former import InfiniteFormerConfig
from models.lstm import LSTMConfig
from models.vanilla import VanillaConfig


@dataclasses.dataclass
class ModelConfig:
    family: Literal["transformer_xl", "vanilla", "compressive", "infinite_former", "gpt2_ltm",
                    "lstm"] = "transformer_xl"
    n_token: int = 0                 # 0: taken from the shard manifest at build time
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    d_head: int = 32
    d_inner: int = 512
    d_embed: int = 0                 # 0: equal to d_model
    dropout: float = 0.1
    dropatt: float = 0.0

    # Positions and recurrence.
    # relative (Dai et al.) | shaw | absolute (Vaswani sinusoid) | learned (Al-Rfou, per layer)
    attn_type: Literal["relative", "shaw", "absolute", "learned"] = "relative"
    tgt_len: int = 128               # segment length; sizes learned position tables (shaw/learned)
    mem_len: int = 128               # 0 turns recurrence off
    ext_len: int = 0
    clamp_len: int = -1              # -1: no clamp
    same_length: bool = False
    same_length_keys: Literal["mem_len", "mem_len+1"] = "mem_len"  # mem_len (reference/HF) | mem_len+1 (NVIDIA/TF)
    pre_lnorm: bool = False
    untie_r: bool = False            # per-layer u, v biases (TF/HF) instead of shared (reference PyTorch)

    # Adaptive input and softmax.
    cutoffs: List[int] = field(default_factory=list)   # empty: full softmax
    div_val: int = 1
    tie_weight: bool = True
    tie_projs: List[bool] = field(default_factory=list)  # per cluster, [head, tail1, ...]

    # Initialisation (reference defaults).
    init: Literal["normal", "uniform"] = "normal"
    init_std: float = 0.02
    init_range: float = 0.1
    proj_init_std: float = 0.01

    vanilla: VanillaConfig = field(default_factory=VanillaConfig)
    compressive: CompressiveConfig = field(default_factory=CompressiveConfig)
    infinite_former: InfiniteFormerConfig = field(default_factory=InfiniteFormerConfig)
    gpt2_ltm: GPT2LTMConfig = field(default_factory=GPT2LTMConfig)
    lstm: LSTMConfig = field(default_factory=LSTMConfig)
    dtype: Optional[str] = None      # reserved: parameter dtype override for export/inference
