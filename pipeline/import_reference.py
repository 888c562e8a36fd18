"""A published Transformer-XL state dict → our export format, to evaluate it with our pipeline.

    python -m pipeline.import_reference --config configs/wt103_large.yaml \\
        --weights pytorch_model.bin --hf-config config.json --output exports/txl-wt103 [key=value ...]

The weights are a state dict in the naming of HF's ``TransfoXLLMHeadModel`` or of the authors'
PyTorch code (``models/reference.py``), read without unpickling code: ``.safetensors``, or
``.bin``/``.pt`` through ``torch.load(weights_only=True)``. The model's shape comes from the HF
``config.json`` (``--hf-config``) or, without one, from the YAML's ``model`` section.

Token ids must mean the same words as in the checkpoint, so the export takes its tokenizer from
the shards in ``data.output`` (prepare them with ``tokenizer.vocab_file`` set to the checkpoint's
vocabulary, one symbol per line in id order); ``--vocab FILE`` checks that vocabulary against the
shards' symbol by symbol. The reference vocabularies ship pickled (``vocab.pkl``/``vocab.bin``):
we never unpickle them — write them out as text in the reference's own environment.
The export records the shards' manifest sha256, so ``python -m pipeline.evaluate
eval.source=DIR`` scores it on exactly those shards.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from models import ModelConfig
from models.reference import ReferenceWeightsError, config_from_hf, load_reference
from pipeline.common import XlpipeError, sha256_file
from pipeline.config import load_config, to_dict
from pipeline.data.remote import shard_dir
from pipeline.data.shards import Manifest
from pipeline.data.tokenizers import load_tokenizer
from pipeline.data.tokenizers.word_vocab import read_vocab_file
from pipeline.runtime.exports import save_export
from pipeline.runtime.stage import run_stage

log = logging.getLogger("pipeline.import_reference")

# What the HF config does not record and the YAML keeps: segment lengths and conventions.
FROM_YAML = ("tgt_len", "ext_len", "same_length_keys")


class ReferenceImportError(XlpipeError, RuntimeError):
    """A weights file, config or vocabulary that cannot make a faithful export."""


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ReferenceImportError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0]
        raise ReferenceImportError(f"{path}: not a plain state dict ({type(exc).__name__}: {first}); "
                                   f"the authors' scripts save the whole pickled module — load it in their code "
                                   f"and save model.state_dict() instead") from None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ReferenceImportError(f"{path}: expected a dict of tensors (a state dict), found {type(obj).__name__}")
    return obj


def model_config(yaml_model: ModelConfig, hf_config: Optional[Path]) -> ModelConfig:
    if hf_config is None:
        return yaml_model
    try:
        hf = json.loads(hf_config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReferenceImportError(f"cannot read HF config {hf_config}: {exc}") from None
    try:
        return config_from_hf(hf, **{k: getattr(yaml_model, k) for k in FROM_YAML})
    except ReferenceWeightsError as exc:
        raise ReferenceImportError(f"{hf_config}: {exc}") from None


def check_vocab(path: Path, tokenizer, shards: str) -> None:
    """The checkpoint's vocabulary (text, one symbol per line in id order) against the shards'."""
    symbols = read_vocab_file(path)
    ours = getattr(tokenizer, "symbols", None)
    if ours is None:
        raise ReferenceImportError(f"--vocab {path}: the shards in {shards} use a {tokenizer.kind} tokenizer, "
                                   f"not a word vocabulary")
    if len(symbols) != len(ours):
        raise ReferenceImportError(f"--vocab {path} has {len(symbols):,} symbols, the shards in {shards} {len(ours):,}")
    for i, (a, b) in enumerate(zip(symbols, ours)):
        if a != b:
            raise ReferenceImportError(f"--vocab {path}: id {i} is {a!r}, in the shards' vocabulary {b!r}; prepare the "
                               f"shards with tokenizer.vocab_file={path}")


def import_reference(cfg, weights: Path, output: Path, hf_config: Optional[Path] = None, naming: str = "auto",
                     vocab: Optional[Path] = None, dtype: str = "fp32", overwrite: bool = False) -> Path:
    shards = shard_dir(cfg.data)       # data.output, or a URL's node-local cache
    manifest = Manifest.load(shards)
    tokenizer = load_tokenizer(shards, manifest)
    mcfg = model_config(cfg.model, hf_config)
    if mcfg.n_token == 0:
        mcfg = dataclasses.replace(mcfg, n_token=tokenizer.vocab_size)
    if mcfg.n_token != tokenizer.vocab_size:
        raise ReferenceImportError(f"the model has n_token={mcfg.n_token:,} but the tokenizer of {cfg.data.output} has "
                           f"{tokenizer.vocab_size:,} symbols: prepare the shards with the checkpoint's vocabulary "
                           f"(tokenizer.vocab_file)")
    if vocab is not None:
        check_vocab(vocab, tokenizer, cfg.data.output)
    state = read_state_dict(weights)
    try:
        model = load_reference(state, mcfg, naming)
    except ReferenceWeightsError as exc:
        raise ReferenceImportError(f"{weights}: {exc}") from None
    cfg.model = mcfg
    info = {"step": 0, "tag": "reference", "source": str(weights.resolve()), "mlflow_run_id": None,
            "manifest_sha256": manifest.sha256(), "corpus": manifest.corpus, "metrics": {},
            "reference": {"weights": weights.name, "weights_sha256": sha256_file(weights),
                          "naming": naming, "hf_config": str(hf_config) if hf_config else None}}
    save_export(model, to_dict(cfg), tokenizer, output, info, dtype, overwrite=overwrite)
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.import_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML whose data.output holds the shards (and model, "
                                                        "without --hf-config)")
    parser.add_argument("--weights", required=True, type=Path, help="state dict: .safetensors, .bin or .pt")
    parser.add_argument("--output", required=True, type=Path, help="export directory to write")
    parser.add_argument("--hf-config", type=Path, help="HF config.json of the checkpoint")
    parser.add_argument("--naming", choices=["auto", "hf", "authors"], default="auto",
                        help="auto: 'transformer.' prefixed keys are HF's, others the authors'")
    parser.add_argument("--vocab", type=Path, help="the checkpoint's vocabulary as text, checked against the shards")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        out = import_reference(cfg, args.weights, args.output, args.hf_config, args.naming, args.vocab,
                               args.dtype, args.overwrite)
        log.info("imported %s into %s", args.weights, out)
        print(out)

    return run_stage("import_reference", body)


if __name__ == "__main__":
    sys.exit(main())
