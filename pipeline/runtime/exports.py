"""The export format (docs/architecture.md, contract 4): writing and loading an export directory,
and loading a training checkpoint's weights into a plain model.

An export directory holds::

    model.safetensors   every tensor once (tied weights stored under their first name)
    config.yaml         the resolved training config; its ``model`` section rebuilds the model
    tokenizer.json      (+ tokenizer.model for sentencepiece), copied from the shard directory
    export.json         format, step, tag, git commit, manifest hash, metrics, tied names, sha256s

safetensors refuses tensors that share storage, so each tied group (adaptive softmax ↔ embedding
weights, shared projections) is written once and its other names are listed in ``export.json``;
the loader re-ties them by building the model (which ties them) and loading every name. A family's
training-only parts are left out (``inference_state_dict``). Everything is written into a temp
directory beside the output and renamed into place.

``load_export(dir) -> (model, tokenizer, meta)`` needs torch, safetensors, omegaconf and this
package's ``models``, never DeepSpeed. Consolidating a checkpoint imports DeepSpeed only then.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.common import (
    DTYPES,
    XlpipeError,
    atomic_write_bytes,
    atomic_write_json,
    check_files,
    dataclass_from_json,
    git_commit,
    read_versioned_json,
    sha256_file,
)
from pipeline.config import ConfigError, load_config
from pipeline.data.tokenizers import TokenizerError, read_tokenizer

log = logging.getLogger("pipeline.export")

FORMAT = "xlpipe-export"
VERSION = 1
META = "export.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


class ExportError(XlpipeError, RuntimeError):
    """A checkpoint or export that cannot be read, or an output that cannot be written."""


# ----------------------------------------------------------------------------- sources


def is_export(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (``.../checkpoints/global_stepN``) from itself, its ``checkpoints``
    directory or a run directory (``train.output``): the latest complete one."""
    from pipeline.runtime import checkpoint as ckpt

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path} does not exist; point export.source / eval.source at a run directory "
                          f"(train.output), its checkpoints directory or a global_stepN checkpoint")
    if (path / ckpt.OURS / "meta.json").is_file():
        return path
    for root in (path / ckpt.CKPT_DIR, path):
        if (root / "latest").is_file() or ckpt.list_tags(root):
            tag = ckpt.latest_tag(root)
            if tag is not None:
                return root / tag
    raise ExportError(f"{path} is neither a checkpoint (global_stepN with {ckpt.OURS}/meta.json), a checkpoints "
                      f"directory nor a run directory with {ckpt.CKPT_DIR}/latest; train first or point "
                      f"export.source / eval.source at one")


def run_dir_of(checkpoint: Path) -> Path:
    """``train.output`` of a checkpoint directory (``<run>/checkpoints/global_stepN``)."""
    return checkpoint.parent.parent


def model_config(config: dict):
    """The ``ModelConfig`` of a resolved config dict (checkpoint meta or export config.yaml)."""
    from omegaconf import OmegaConf

    from models import ModelConfig

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"]))
    except Exception as exc:  # noqa: BLE001 - omegaconf raises several kinds
        raise ExportError(f"the saved model config does not fit this code's schema: {exc}") from None


def load_checkpoint_model(checkpoint: str | Path, device: str | torch.device = "cpu",
                          dtype: Optional[torch.dtype] = None):
    """``(model, meta)``: a plain ``models`` module with a checkpoint's consolidated fp32 weights."""
    from models import build_model
    from pipeline.runtime import checkpoint as ckpt

    path = resolve_checkpoint(checkpoint)
    meta = ckpt.load_meta(path)
    model = build_model(model_config(meta.config))
    load_weights(model, consolidate(path), f"checkpoint {path}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, meta


def consolidate(checkpoint: Path) -> dict:
    """``checkpoint.consolidated_state_dict`` without zero_to_fp32's prints and progress bars on
    every rank (kept at debug level)."""
    from pipeline.runtime import checkpoint as ckpt

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        state = ckpt.consolidated_state_dict(checkpoint)
    for line in out.getvalue().splitlines():
        log.debug("zero_to_fp32: %s", line.strip())
    return state


def load_weights(model: torch.nn.Module, state: dict, where: str) -> None:
    try:
        model.load_inference_state_dict(state)
    except KeyError as exc:
        raise ExportError(f"{where} {exc.args[0]}") from None


# ----------------------------------------------------------------------------- writing


def dedup_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(unique, tied)``: one entry per storage (the first name in state-dict order) and
    ``{other name: stored name}`` for tensors that are the same parameter."""
    unique: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, tied


@dataclasses.dataclass
class ExportMeta:
    """``export.json``: where the weights came from and what the directory holds."""

    created: str
    git_commit: Optional[str]
    step: int
    tag: str
    mlflow_run_id: Optional[str]
    manifest_sha256: str             # the shards the model was trained on (evaluate checks them)
    tokenizer: dict                  # kind, vocab_size
    family: str
    dtype: str                       # fp32 | bf16 | fp16
    n_params: int
    tied: dict                       # {alias: stored name}
    files: dict                      # {file name: sha256}
    source: str = ""                 # the checkpoint (or reference weights) exported
    corpus: Optional[str] = None
    metrics: dict = dataclasses.field(default_factory=dict)   # that step's evaluations, by split and setting
    zero_stage: Optional[int] = None
    precision: Optional[str] = None
    tokens_seen: Optional[int] = None
    reference: Optional[dict] = None  # import-reference: the published weights' file, hash and naming

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}


def save_export(model: torch.nn.Module, config: dict, tokenizer, out: str | Path, info: dict,
                dtype: str = "fp32", overwrite: bool = False) -> ExportMeta:
    """Write ``model`` (built from ``config["model"]``), the config, the tokenizer's files and
    ``export.json`` (``info``, the provenance fields of ``ExportMeta``, plus git commit, dtype,
    tied names, sha256s) into ``out``, atomically; returns what export.json holds."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    out = Path(out)
    check_output(out, overwrite)
    if next(model.parameters()).dtype != DTYPES[dtype]:
        model = copy.deepcopy(model).to(DTYPES[dtype])     # the caller's model keeps its dtype
    state = model.inference_state_dict()
    unique, tied = dedup_tied(state)
    unique = {k: v.detach().contiguous() for k, v in unique.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(unique, str(tmp / WEIGHTS), metadata={"format": FORMAT, "tied": json.dumps(tied)})
        config = {**config, "model": model.export_config(dict(config["model"]))}
        atomic_write_bytes(tmp / CONFIG, OmegaConf.to_yaml(OmegaConf.create(config)).encode())
        for f in tokenizer.files():
            shutil.copyfile(f, tmp / f.name)
        mode = 0o666 & ~_umask()
        for f in tmp.iterdir():
            os.chmod(f, mode)                        # safetensors writes 0600; an export is for sharing
        meta = ExportMeta(created=time.strftime("%Y-%m-%dT%H:%M:%S"), git_commit=git_commit(), **info,
                          tokenizer={"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
                          family=model.family, dtype=dtype, n_params=sum(t.numel() for t in unique.values()),
                          tied=tied, files={p.name: sha256_file(p) for p in sorted(tmp.iterdir())})
        atomic_write_json(tmp / META, meta.to_json())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def check_output(out: Path, overwrite: bool) -> None:
    """An export may go to ``out``: nothing is there, or (with ``overwrite``) an export of ours and
    nothing else — a user's file or directory is never replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise ExportError(f"{out} exists; choose another export.output or set export.overwrite=true")
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out} exists and is not an export directory; export.overwrite replaces only an "
                          f"export written by xlpipe: choose another export.output")
    try:
        meta = read_meta(out)
    except ExportError as exc:
        raise ExportError(f"export.overwrite replaces only an export written by xlpipe, and {out} is not one "
                          f"({exc}); choose another export.output") from None
    foreign = sorted(p.name for p in out.iterdir() if p.name != META and p.name not in meta.files)
    if foreign:
        raise ExportError(f"{out} is an export but also holds {foreign}, which export.overwrite would delete; "
                          f"move them away or choose another export.output")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- loading


def read_meta(directory: str | Path) -> ExportMeta:
    path = Path(directory) / META
    if not path.is_file():
        raise ExportError(f"{directory} is not an export: {META} is missing (write one with python -m pipeline.export)")
    return dataclass_from_json(ExportMeta, read_versioned_json(path, FORMAT, VERSION, ExportError), path, ExportError)


def load_export(directory: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                verify: bool = True):
    """``(model, tokenizer, meta)`` from an export, in eval mode; no DeepSpeed needed.

    ``dtype`` defaults to the stored one. ``verify`` checks every file's sha256 against export.json.
    """
    from safetensors.torch import load_file

    from models import build_model

    directory = Path(directory)
    meta = read_meta(directory)
    if verify:
        check_files(directory, meta.files, directory / META, ExportError, "",
                    "the export was changed or truncated; export it again")
    try:
        cfg = load_config(directory / CONFIG)
    except ConfigError as exc:
        raise ExportError(f"{directory / CONFIG}: {exc}") from None
    model = build_model(cfg.model)
    state = load_file(str(directory / WEIGHTS))
    for alias, name in meta.tied.items():
        if name not in state:
            raise ExportError(f"{directory / WEIGHTS}: tied tensor {alias!r} names {name!r}, which is not stored")
        state[alias] = state[name]
    model = model.to(dtype=dtype or DTYPES[meta.dtype])
    load_weights(model, state, f"export {directory}")
    try:
        tokenizer = read_tokenizer(directory)
    except TokenizerError as exc:
        raise ExportError(f"export {directory}: {exc}") from None
    return model.to(device).eval(), tokenizer, meta
