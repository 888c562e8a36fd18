"""Pure-PyTorch memory language models behind one interface (docs/architecture.md, contract 3).

Nothing here imports from ``pipeline``, DeepSpeed, MLflow or SLURM.
"""
from __future__ import annotations

import importlib

from models.base import LanguageModel, ModelOutput
from models.config import ModelConfig, VanillaConfig
from models.memory import Memory

# family name -> "module:Class"; modules are imported on first use.
REGISTRY = {
    "transformer_xl": "models.transformer_xl:TransformerXL",
    "vanilla": "models.vanilla:VanillaTransformer",
    "compressive": "models.compressive:CompressiveTransformer",
    "infinite_former": "models.infinite_former:InfiniteFormer",
    "gpt2_ltm": "models.gpt2_ltm:GPT2LTM",            # needs the optional extra xlpipe[hf]
    "lstm": "models.lstm:LSTMLM",
}


def family_class(family: str) -> type[LanguageModel]:
    if family not in REGISTRY:
        raise ValueError(f"model.family={family!r} is unknown; choose one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[family].split(":")
    return getattr(importlib.import_module(module), cls)


def check_model_config(cfg: ModelConfig) -> None:
    """The ``model`` section's values in the family's own terms; ValueError naming ``model.<key>``.
    ``n_token`` 0 passes (the pipeline takes it from the shard manifest)."""
    family_class(cfg.family).check_config(cfg)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the model family named by ``cfg.family``."""
    cls = family_class(cfg.family)
    if cfg.n_token <= 0:
        raise ValueError("model.n_token must be set (the pipeline takes it from the shard manifest)")
    return cls(cfg)                      # the constructor checks the config (check_config)


__all__ = ["LanguageModel", "Memory", "ModelConfig", "ModelOutput", "VanillaConfig", "build_model",
           "check_model_config", "family_class", "REGISTRY"]
