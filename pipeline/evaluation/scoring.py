"""Scoring a split with memory: the token-weighted NLL the reference reports, summed over ranks.

``score_split(model, shard_dir, "valid", n_streams=10, tgt_len=64, mem_len=640)`` runs every
stream of the split in order, carrying each stream's memory from segment to segment, and returns
``{"nll_sum", "tokens"}`` summed over all ranks (each rank scores its own block of streams), so
``loss = nll_sum / tokens``, ``ppl = exp(loss)`` and ``bpc = loss / ln 2``. ``model`` is a
``models`` LanguageModel or a DeepSpeed engine around one (ZeRO-3 needs the engine: its forward
gathers the partitioned weights; every rank then runs the same number of forwards).

Evaluation lengths differ from training (Dai et al. §3.2: longer memory, clamp_len and
same_length at test time); the family's ``eval_lengths`` sets them and restores the training values
afterwards, also when scoring fails. With ``warm_tokens`` every stream is first run over the
tokens that precede it (NVIDIA's warm start), so every scored token has full memory.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from models import LanguageModel
from pipeline.data.streams import open_streams
from pipeline.runtime import distributed


def unwrap(model) -> LanguageModel:
    """The family behind a DeepSpeed engine (its ``module``), or the model itself."""
    module = model if isinstance(model, LanguageModel) else getattr(model, "module", model)
    if not isinstance(module, LanguageModel):
        raise TypeError(f"expected a models.LanguageModel or a DeepSpeed engine around one, "
                        f"got {type(module).__name__}")
    return module


def eval_lengths(model, **lengths):
    """``model.eval_lengths(...)`` of a model or of the family inside a DeepSpeed engine."""
    return unwrap(model).eval_lengths(**lengths)


@torch.no_grad()
def score_split(model, shard_dir: str | Path, split: str, *, n_streams: int, tgt_len: int,
                mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                same_length: Optional[bool] = None, cmem_len: Optional[int] = None, warm_tokens: int = 0,
                max_steps: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None,
                device: Optional[torch.device] = None, memory_dtype: Optional[torch.dtype] = None,
                reduce: bool = True, on_scored: Optional[Callable] = None, attention_buckets: int = 0,
                document_reset: bool = False, accuracy: bool = False) -> dict:
    """NLL summed over the split's scored tokens and their count, over all ranks (see module doc).

    ``max_steps`` > 0 scores only the first ``max_steps`` segments of every stream (the same
    count on every rank). ``reduce=False`` returns this rank's sums only. ``on_scored(batch, nll)``
    sees every scored batch and its per-token NLL (the evaluation stage's per-token dump).
    ``attention_buckets`` > 0 also measures where the scored segments' attention goes
    (models/diagnostics.py), returned as ``attention`` (None for a family without it).
    ``document_reset``: no token sees an earlier document (and a target that opens one is not
    scored); shards with scored targets (the sorting task) count only those. ``accuracy`` also
    counts the scored targets whose argmax prediction is right (``correct``).
    """
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    module = unwrap(model)
    param = next(module.parameters())
    device = param.device if device is None else device
    was_training = module.training
    model.eval()
    streams = open_streams(shard_dir, split, n_streams=n_streams, tgt_len=tgt_len, rank=rank,
                           world_size=world_size, warm_tokens=warm_tokens, drop_last=False)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    correct = torch.zeros((), dtype=torch.float64, device=device)
    mass = None
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(module.eval_lengths(tgt_len=tgt_len, mem_len=mem_len, clamp_len=clamp_len,
                                                    same_length=same_length, cmem_len=cmem_len))
            if attention_buckets:
                mass = stack.enter_context(module.record_attention(attention_buckets))
            memory = module.init_memory(len(streams.ids), device=device)
            if memory_dtype is not None:
                memory = memory.to(dtype=memory_dtype)
            scored = 0
            for batch in streams:
                if mass is not None:
                    mass.active = not batch.warmup         # warm-up forwards are not scored
                inputs, targets = batch.inputs.to(device), batch.targets.to(device)
                doc_start, weights = (None if x is None else x.to(device) for x in batch.masks(document_reset))
                out = model(inputs, targets, memory=memory, doc_start=doc_start, return_logprobs=accuracy)
                memory = out.memory
                if batch.warmup:
                    continue
                nll = out.nll if weights is None else out.nll.masked_fill(~weights, 0.0)
                nll_sum += nll.double().sum()
                if accuracy:
                    right = out.logprobs.argmax(dim=-1) == targets
                    correct += (right if weights is None else right & weights).double().sum()
                if on_scored is not None:
                    on_scored(batch, out.nll if weights is None else out.nll.masked_fill(~weights, float("nan")))
                tokens += targets.numel() if weights is None else int(weights.sum())
                scored += 1
                if max_steps and scored >= max_steps:
                    break
    finally:
        streams.close()
        model.train(was_training)
    result = {"nll_sum": float(nll_sum), "tokens": tokens, "correct": float(correct)}
    if reduce:
        total, count, right, *attention = distributed.all_reduce_sum(
            [result["nll_sum"], float(tokens), result["correct"]] + ([] if mass is None else mass.flat()))
        result = {"nll_sum": total, "tokens": int(count), "correct": right}
        if mass is not None:
            mass.load_flat(attention)
    result["attention"] = None if mass is None else mass.summary()
    return result


def summarize(nll_sum: float, tokens: int, bpc: bool) -> dict:
    """``loss`` (nats per token) and ``ppl`` or ``bpc``."""
    loss = nll_sum / max(tokens, 1)
    out = {"loss": loss}
    if bpc:
        out["bpc"] = loss / math.log(2)
    else:
        out["ppl"] = math.exp(min(loss, 700.0))
    return out
