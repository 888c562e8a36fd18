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
}


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the model family named by ``cfg.family``."""
    if cfg.family not in REGISTRY:
        raise ValueError(f"model.family={cfg.family!r} is unknown; choose one of {sorted(REGISTRY)}")
    if cfg.n_token <= 0:
        raise ValueError("model.n_token must be set (the pipeline takes it from the shard manifest)")
    module, cls = REGISTRY[cfg.family].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)


__all__ = ["LanguageModel", "Memory", "ModelConfig", "ModelOutput", "VanillaConfig", "build_model", "REGISTRY"]
