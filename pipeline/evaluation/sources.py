"""What ``pipeline.evaluate`` scores: a source (run directory, checkpoint or export) checked
against the shards, the settings one evaluation runs with, the scoring call and its metrics
(ppl, bpc, per-word ppl, bits per byte), and the per-token NLL dump."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline.common import XlpipeError, atomic_write_bytes
from pipeline.config import EvalConfig
from pipeline.data.shards import Manifest
from pipeline.data.streams import StreamLayout
from pipeline.evaluation.scoring import score_split
from pipeline.runtime import distributed
from pipeline.runtime.exports import is_export, load_checkpoint_model, load_export, resolve_checkpoint, run_dir_of

BPC_KINDS = ("char", "byte")


class EvalError(XlpipeError, RuntimeError):
    """An evaluation that cannot run as configured."""


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass
class Source:
    """A model to evaluate and where it came from."""

    kind: str                      # "checkpoint" or "export"
    path: Path                     # the checkpoint directory or the export directory
    model: Any
    step: int
    tag: str
    mlflow_run_id: Optional[str]
    manifest_sha256: str
    extra: dict

    @property
    def report_dir(self) -> Path:
        return (run_dir_of(self.path) if self.kind == "checkpoint" else self.path) / "eval"

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path.resolve()), "step": self.step, "tag": self.tag,
                "mlflow_run_id": self.mlflow_run_id, **self.extra}


def load_source(path: str | Path, manifest: Manifest, shard_dir: str, device: torch.device,
                dtype: torch.dtype) -> Source:
    """Load a run dir / checkpoint / export and check it was trained on these shards."""
    from pipeline.runtime import checkpoint as ckpt

    if is_export(path):
        model, _, meta = load_export(path, device=device, dtype=dtype)
        if meta.manifest_sha256 != manifest.sha256():
            raise EvalError(f"export {path} was trained on shards with manifest sha256 "
                            f"{meta.manifest_sha256[:12]}..., but {shard_dir} has {manifest.sha256()[:12]}...; "
                            f"point data.output at the shards it was trained on")
        return Source("export", Path(path), model, meta.step, meta.tag, meta.mlflow_run_id, meta.manifest_sha256,
                      {"zero_stage": meta.zero_stage, "dtype": meta.dtype})
    cdir = resolve_checkpoint(path)
    meta = ckpt.load_meta(cdir)
    ckpt.check_manifest(meta.manifest, manifest, shard_dir, cdir)
    model, _ = load_checkpoint_model(cdir, device=device, dtype=dtype)
    return Source("checkpoint", cdir, model, meta.step, meta.tag, meta.mlflow_run_id, meta.manifest_sha256,
                  {"zero_stage": meta.zero_stage, "precision": meta.precision})


# ----------------------------------------------------------------------------- settings and metrics


def resolve_settings(e: EvalConfig, model, mem_len: Optional[int] = None) -> dict:
    """The lengths this evaluation runs with (see EvalConfig), in the model family's own terms."""
    cfg = model.cfg
    tgt = e.tgt_len or cfg.tgt_len
    if mem_len is None and e.mem_len >= 0:
        mem_len = e.mem_len
    try:
        lengths = model.resolve_eval_lengths(tgt, mem_len, e.clamp_len, e.same_length,
                                             cmem_len=None if e.cmem_len < 0 else e.cmem_len)
    except ValueError as exc:
        raise EvalError(f"eval.{exc}") from None     # the family names the setting first
    out = {"split": e.split, "n_streams": e.n_streams, "max_steps": e.max_steps, "family": cfg.family, **lengths}
    warm = out["mem_len"] if e.warm_tokens < 0 else e.warm_tokens
    out["warm_tokens"] = warm
    out["start"] = "warm" if warm > 0 else "cold"
    return out


def metrics(nll_sum: float, tokens: int, kind: str, split_tokens: int, text: Optional[dict]) -> dict:
    """Token-weighted loss and ppl/bpc; per-word ppl and bits per byte/char for sentencepiece."""
    if tokens <= 0:
        raise EvalError("no token was scored; lower eval.n_streams or raise eval.max_steps")
    loss = nll_sum / tokens
    out = {"loss": loss}
    if kind in BPC_KINDS:
        out["bpc"] = loss / math.log(2)
    else:
        out["ppl"] = math.exp(min(loss, 700.0))
    if kind in ("sentencepiece", "huggingface") and text:
        # mean NLL per token × the split's tokens per word (byte, char) = NLL per word of the text
        per = {unit: loss * split_tokens / text[unit] for unit in ("words", "bytes", "chars") if text.get(unit)}
        if "words" in per:
            out["word_ppl"] = math.exp(min(per["words"], 700.0))
        if "bytes" in per:
            out["bpb"] = per["bytes"] / math.log(2)
        if "chars" in per:
            out["bpc"] = per["chars"] / math.log(2)
    return out


def task_metrics(manifest: Manifest, res: dict) -> dict:
    """Accuracy of the argmax prediction over the scored targets of a task corpus: the sorting
    task's ``sort_accuracy`` (the ∞-former paper's metric); nothing for language corpora."""
    if not manifest.scored:
        return {}
    return {f"{manifest.corpus}_accuracy": res["correct"] / max(res["tokens"], 1)}


def headline(m: dict) -> str:
    parts = [f"loss {m['loss']:.4f}"]
    for k in ("ppl", "word_ppl", "bpc", "bpb"):
        if k in m:
            parts.append(f"{k} {m[k]:.4f}" if k in ("bpc", "bpb") else f"{k} {m[k]:.2f}")
    parts += [f"{k} {v:.4f}" for k, v in m.items() if k.endswith("_accuracy")]
    return " | ".join(parts)


def main_metric(kind: str) -> str:
    return "bpc" if kind in BPC_KINDS else "ppl"


# ----------------------------------------------------------------------------- scoring


class TokenDump:
    """Per-token NLL of this rank's scored batches, by position in the split."""

    def __init__(self, layout: StreamLayout):
        self.L = layout.tokens_per_stream
        self.offsets: dict[int, int] = {}
        self.positions: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def __call__(self, batch, nll: torch.Tensor) -> None:
        n = nll.shape[1]
        nll = nll.detach().float().cpu().numpy()
        for row, b in enumerate(batch.stream_ids):
            o = self.offsets.get(b, 0)
            # stream b's target j sits at split position b*L + j + 1 (pipeline/data/streams.py)
            self.positions.append(b * self.L + o + 1 + np.arange(n))
            self.values.append(nll[row])
            self.offsets[b] = o + n

    def gather(self, split_tokens: int) -> Optional[np.ndarray]:
        """On rank 0: ``nll[position]`` (NaN where unscored) over all ranks; None elsewhere."""
        mine = (np.concatenate(self.positions) if self.positions else np.empty(0, np.int64),
                np.concatenate(self.values) if self.values else np.empty(0, np.float32))
        parts = [mine]
        if distributed.is_initialized() and distributed.get_world_size() > 1:
            box = [None] * distributed.get_world_size() if distributed.is_main() else None
            torch.distributed.gather_object(mine, box, dst=0)
            parts = box
        if not distributed.is_main():
            return None
        out = np.full(split_tokens, np.nan, dtype=np.float32)
        for pos, val in parts:
            out[pos] = val
        return out


def score(source: Source, shard_dir: str, manifest: Manifest, settings: dict, device: torch.device,
          dump: bool = False, attention_buckets: int = 0) -> dict:
    """One evaluation pass; sums over all ranks (and the gathered dump on rank 0)."""
    split_tokens = manifest.split(settings["split"]).total_tokens
    layout = StreamLayout(split_tokens, settings["n_streams"], settings["tgt_len"], settings["warm_tokens"], False)
    recorder = TokenDump(layout) if dump else None
    tic = time.perf_counter()
    sums = score_split(source.model, shard_dir, settings["split"], n_streams=settings["n_streams"],
                       tgt_len=settings["tgt_len"], mem_len=settings["mem_len"],
                       clamp_len=settings.get("clamp_len"), same_length=settings.get("same_length"),
                       cmem_len=settings.get("cmem_len"), warm_tokens=settings["warm_tokens"],
                       max_steps=settings["max_steps"], device=device, on_scored=recorder,
                       attention_buckets=attention_buckets, document_reset=settings.get("document_reset", False),
                       accuracy=manifest.scored)
    seconds = time.perf_counter() - tic
    out = {"nll_sum": sums["nll_sum"], "tokens": sums["tokens"], "seconds": seconds,
           "tokens_per_s": sums["tokens"] / max(seconds, 1e-9), "split_tokens": split_tokens,
           "unscored_tokens": split_tokens - layout.scored_tokens, "attention": sums.get("attention"),
           "correct": sums["correct"]}
    if recorder is not None:
        out["dump"] = recorder.gather(split_tokens)
    return out


def write_dump(path: str | Path, nll: np.ndarray, tokens: np.ndarray, settings: dict, source: Source) -> Path:
    """``.npz`` with ``nll`` (float32 per split position; NaN: not scored) and ``tokens``."""
    import io
    import json

    buf = io.BytesIO()
    np.savez(buf, nll=nll, tokens=tokens, settings=np.array(json.dumps(settings | {"step": source.step})))
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
