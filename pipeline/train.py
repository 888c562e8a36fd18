"""Stage 2: train with DeepSpeed over memory-carrying streams.

    python -m pipeline.train --config configs/tiny.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m pipeline.train --config ...      (or srun: cluster/train.sh)

One step (one optimizer update) = ``train.micro_batches`` micro-batches per rank. Micro-batch m
owns a block of streams and its own memory ``memories[m]`` (NVIDIA's batch_chunk); each runs
forward → backward → ``engine.step()`` (DeepSpeed averages over the accumulation and updates at
the boundary) and its new memory feeds the same streams next. From ``train.late_update_step`` on,
a step runs ``train.late_update_every`` rounds of them, consecutive segments of every stream
accumulated into one update (Rae et al.'s late-training alternative to a lower learning rate).
At every boundary one all-reduce sums the loss and agrees on two flags: a non-finite loss (stop
with an error naming step, ranks and streams, before the update is applied; under fp16 the loss
scaler skips instead) and a preemption signal (all ranks save, rank 0 requeues under SLURM,
exit 0). A checkpoint resumes bitwise on the same world size and by stream id on another
(pipeline/runtime/checkpoint.py, resume.py).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from models import ModelOutput, build_model
from models.diagnostics import attention_metrics
from pipeline.common import XlpipeError, atomic_write_bytes, atomic_write_json
from pipeline.config import Config, ConfigError, arg_parser, check_values, parse_args, to_dict, to_yaml
from pipeline.data.remote import shard_dir
from pipeline.data.shards import Manifest
from pipeline.data.streams import Batch, open_streams
from pipeline.evaluation.scoring import score_split, summarize, unwrap
from pipeline.runtime import checkpoint as ckpt
from pipeline.runtime import distributed
from pipeline.runtime.engine import apply_tf32, build_engine, check_precision, engine_dtype, grad_norm, loss_scale
from pipeline.runtime.rank_state import Generators, RankState, StreamCursors, StreamMemory, save_states
from pipeline.runtime.resume import ResumePoint, find_resume, restore
from pipeline.runtime.shard_check import verify_splits
from pipeline.runtime.stage import exit_now, run_stage, setup_logging
from pipeline.runtime.tracking import Tracker

log = logging.getLogger("pipeline.train")
BPC_TOKENIZERS = ("char", "byte")


class NonFiniteLoss(XlpipeError, RuntimeError):
    """A NaN/inf training loss (outside fp16, whose loss scaler handles overflow)."""


@dataclasses.dataclass
class Hooks:
    """Optional callbacks (tests, research code): after every micro-batch's forward, and after
    every step with that step's figures (``loss`` averaged over all ranks, ``lr``, ...)."""

    on_micro_batch: Optional[Callable[[int, Batch, ModelOutput], None]] = None
    on_step: Optional[Callable[[int, dict], None]] = None


# ----------------------------------------------------------------------------- configuration


def resolve_config(cfg: Config, manifest: Manifest, shard_dir: str) -> Config:
    """A copy with the values taken from elsewhere filled in: n_token from the manifest,
    train.tgt_len from the model when 0, eval_tgt_len from tgt_len when 0."""
    cfg = copy.deepcopy(cfg)
    vocab = int(manifest.tokenizer["vocab_size"])
    if cfg.model.n_token not in (0, vocab):
        raise ConfigError(f"model.n_token={cfg.model.n_token} but the tokenizer of {shard_dir} has vocab_size "
                          f"{vocab}; set model.n_token=0 (take it from the manifest) or point data.output at "
                          f"the shards the model was meant for")
    cfg.model.n_token = vocab
    t = cfg.train
    if t.tgt_len == 0:
        t.tgt_len = cfg.model.tgt_len
    elif t.tgt_len != cfg.model.tgt_len:
        raise ConfigError(f"train.tgt_len={t.tgt_len} differs from model.tgt_len={cfg.model.tgt_len}; the model "
                          f"is sized for its segment length: set both, or train.tgt_len=0 to use the model's")
    if t.eval_tgt_len == 0:
        t.eval_tgt_len = t.tgt_len
    if t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be >= 1")
    check_document_reset(t.document_reset, manifest, shard_dir, "train.document_reset")
    return cfg


def check_document_reset(reset: bool, manifest: Manifest, shard_dir: str, key: str) -> None:
    if reset and not manifest.boundaries:
        raise ConfigError(f"{key}=true but the shards of {shard_dir} (corpus {manifest.corpus}) record no document "
                          f"starts; prepare a corpus that has them (text, stdlib, pg19, sort, lm1b sentences, or "
                          f"wt103 with data.wt103_articles=true) or set {key}=false")


def check_layout(t, world_size: int) -> None:
    """Streams split evenly over ranks and micro-batches (training) and over ranks (validation)."""
    if t.n_streams % (world_size * t.micro_batches):
        raise ConfigError(f"train.n_streams={t.n_streams} is not divisible by world size {world_size} x "
                          f"train.micro_batches={t.micro_batches}; choose a multiple of "
                          f"{world_size * t.micro_batches}")
    n_eval = t.eval_n_streams or t.n_streams
    if t.eval_every and n_eval % world_size:
        raise ConfigError(f"train.eval_n_streams={n_eval} is not divisible by world size {world_size}")


def stream_mode(cfg: Config, manifest: Manifest) -> str:
    if cfg.train.stream_mode != "auto":
        return cfg.train.stream_mode
    return "shuffled_sentences" if manifest.sentences else "ordered"


# ----------------------------------------------------------------------------- logging


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def _line(step: int, max_steps: int, m: dict) -> str:
    parts = [f"step {step}/{max_steps}", f"loss {m['loss']:.4f}"]
    parts.append(f"bpc {m['bpc']:.4f}" if "bpc" in m else f"ppl {m['ppl']:.2f}")
    parts.append(f"lr {m['lr']:.3e}")
    if "grad_norm" in m:
        parts.append(f"grad-norm {m['grad_norm']:.3f}")
    if "loss_scale" in m:
        parts.append(f"loss-scale {m['loss_scale']:g} (skipped {int(m['skipped_steps'])})")
    parts.append(f"tok/s {m['tokens_per_s']:,.0f}")
    parts.append(f"peak-mem {m['peak_mem_gib']:.2f} GiB")
    return " | ".join(parts)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- the stage


def train(cfg: Config, hooks: Optional[Hooks] = None) -> dict:
    """Train (or resume) as ``cfg`` says; returns a summary (the same on every rank)."""
    hooks = hooks or Hooks()
    check_values(cfg)                    # a Config built in Python gets the checks load_config makes
    env = distributed.init_distributed()
    setup_logging("train", env.rank)   # also for callers of train() that skip the stage runner
    shards = shard_dir(cfg.data)       # data.output, or a URL's node-local cache
    manifest = Manifest.load(shards)
    cfg = resolve_config(cfg, manifest, cfg.data.output)
    t = cfg.train
    # Everything that can be refused is refused before an MLflow run exists.
    check_precision(t.precision)
    check_layout(t, env.world_size)
    verify_splits(shards, manifest, ["train", "valid"] if t.eval_every else ["train"])
    point = find_resume(cfg, manifest, env.world_size)

    # Started before seeding: MLflow names new runs with Python's `random`.
    tracker = Tracker(cfg.tracking, rank=env.rank).start(
        run_name=cfg.tracking.run_name or None, run_id=point.meta.mlflow_run_id if point else None,
        params=cfg, world_size=env.world_size, parent_run_id=cfg.tracking.parent_run_id or None,
        tags={"stage": "train", "zero_stage": t.zero_stage, "precision": t.precision,
              "resumed_from_step": point.step if point else 0, "output": str(Path(t.output).resolve())})
    with distributed.StopSignal() as stop, tracker:
        run = Run(cfg, shards, manifest, point, env, tracker)
        while run.step < t.max_steps:
            stats = run.train_step(hooks, stop.requested)
            if hooks.on_step:
                hooks.on_step(run.step, stats)
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                run.log()
            if t.eval_every and (run.step % t.eval_every == 0 or run.step == t.max_steps):
                run.validate()
            if stats["stop"]:
                run.preempted()
                break
            if t.save_every and run.step % t.save_every == 0:
                run.save()
        else:
            run.save()
        run.close()
    return run.summary


class Run:
    """The state of one training process: engine, streams, memory per micro-batch, step."""

    def __init__(self, cfg: Config, shards: Path, manifest: Manifest, point: Optional[ResumePoint],
                 env: distributed.DistEnv, tracker: Tracker):
        t = self.t = cfg.train
        self.cfg, self.shards, self.manifest, self.tracker = cfg, shards, manifest, tracker
        self.rank, self.world = env.rank, env.world_size
        # The same initial weights on every rank (ZeRO-3 partitions each rank's own copy),
        # then a per-rank generator for dropout.
        _seed(t.seed)
        model = build_model(cfg.model)
        self.engine, ds_config = build_engine(cfg, model, self.world, load_universal=bool(point and point.universal))
        self.module, self.device = self.engine.module, self.engine.device
        apply_tf32(self.device.type, t.precision, t.tf32)
        if t.compile:
            # DeepSpeed compiles its module in place (nn.Module.compile): no ``_orig_mod.`` prefix
            # in any state dict. Static shapes: the first segment's empty memory, the full one and
            # validation's lengths each compile once (dynamic shapes fail in inductor here).
            self.engine.compile(compile_kwargs={"dynamic": False})
        self.memory_dtype = engine_dtype(self.engine)
        _seed(t.seed + self.rank)

        self.streams = open_streams(shards, "train", n_streams=t.n_streams, tgt_len=t.tgt_len,
                                    rank=self.rank, world_size=self.world, micro_batches=t.micro_batches,
                                    seed=t.seed, roll=t.roll, mode=stream_mode(cfg, manifest), drop_last=True,
                                    pin_memory=self.device.type == "cuda")
        self.micro_ids = [self.streams.micro_batch_ids(m) for m in range(t.micro_batches)]
        self.memories = [self.module.init_memory(len(ids), device=self.device).to(dtype=self.memory_dtype)
                         for ids in self.micro_ids]
        self.step = 0
        if point is not None:
            self.step = point.step
            restore(self.engine, cfg, point, self.rank_state(), self.rank, t.micro_batches)
            log.info("resumed from %s at step %d", point.path, self.step)

        self.bpc = manifest.tokenizer.get("kind") in BPC_TOKENIZERS
        self.tokens_per_round = t.n_streams * t.tgt_len
        self.base_batch = self.engine.train_batch_size()
        self.rounds = 1              # the engine is built for one round; train_step switches it
        out = Path(t.output)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "config.yaml", to_yaml(cfg).encode())
            atomic_write_json(out / "deepspeed.json", ds_config)
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(out / "deepspeed.json")
        self.skipped0 = self.engine.skipped_steps
        self._reset_window()
        self.summary: dict = {"start_step": self.step, "losses": [], "stopped": False, "requeued": False,
                              "run_id": tracker.run_id, "valid": None, "checkpoint": None}
        self.engine.train()

    def _reset_window(self) -> None:
        self.window = {"loss": 0.0, "count": 0.0, "time": 0.0, "tokens": 0}

    def rounds_at(self, step: int) -> int:
        """Segments of every stream the update after ``step`` updates accumulates."""
        t = self.t
        return t.late_update_every if t.late_update_every > 1 and step >= t.late_update_step else 1

    def tokens_seen(self, step: int) -> int:
        t = self.t
        late = max(0, step - t.late_update_step) if t.late_update_every > 1 else 0
        return (step - late + late * t.late_update_every) * self.tokens_per_round

    def _set_rounds(self) -> None:
        """DeepSpeed's accumulation count (its loss scaling) for the next update's rounds."""
        rounds = self.rounds_at(self.step)
        if rounds != self.rounds:
            self.engine.set_train_batch_size(self.base_batch * rounds)
            self.rounds = rounds

    def train_step(self, hooks: Hooks, stop_requested: bool) -> dict:
        """One optimizer step over every micro-batch; ``stop`` says whether any rank was signalled."""
        t, engine = self.t, self.engine
        tic = time.perf_counter()
        self.module.set_progress(self.step / t.max_steps)
        self._set_rounds()
        n_micro = self.rounds * t.micro_batches
        batches = [next(self.streams) for _ in range(n_micro)]
        masks = [b.masks(t.document_reset) for b in batches]
        # Only some targets count (task corpora, document starts): every micro-batch's NLL sum is
        # divided by the step's scored targets over all ranks (one more all-reduce), so the update
        # is the token-weighted mean whatever the micro-batch each target fell into.
        scale = None
        if any(w is not None for _, w in masks):
            (n_scored,) = distributed.all_reduce_sum([float(sum(int(w.sum()) for _, w in masks))])
            scale = n_micro * self.world / max(n_scored, 1.0)
        loss_sum, bad = 0.0, []
        for k, batch in enumerate(batches):
            m = k % t.micro_batches
            inputs = batch.inputs.to(self.device, non_blocking=True)
            targets = batch.targets.to(self.device, non_blocking=True)
            doc_start, weights = (None if x is None else x.to(self.device, non_blocking=True) for x in masks[k])
            # The boundary is ours to say: DeepSpeed's own count (micro steps modulo the
            # accumulation) would be off after the accumulation count changes mid-run.
            engine.set_gradient_accumulation_boundary(k == n_micro - 1)
            out = engine(inputs, targets, memory=self.memories[m], doc_start=doc_start)
            objective = out.objective
            if scale is not None:
                nll = (out.nll * weights).sum()
                objective = nll * scale if out.aux_loss is None else nll * scale + out.aux_loss
                value = float(nll.detach().float())             # summed; the step divides by n_scored
            else:
                value = float(out.loss.detach().float())
            if math.isfinite(float(objective.detach().float())):
                loss_sum += value
            else:
                bad.append((m, batch.stream_ids, value))
            if hooks.on_micro_batch:
                hooks.on_micro_batch(self.step, batch, out)
            engine.backward(objective)
            self.memories[m] = out.memory
            if k < n_micro - 1:
                engine.step()        # accumulates; DeepSpeed updates at the boundary only
        # One collective per step: the loss, and the non-finite and stop flags of every rank.
        total, n_good, n_bad, n_stop = distributed.all_reduce_sum(
            [loss_sum, float(n_micro - len(bad)), float(len(bad)), float(stop_requested)])
        if n_bad and t.precision != "fp16":      # before the update: nothing is trained through
            raise _non_finite(self.step, self.rank, bad)
        engine.step()
        self.step += 1
        if engine.global_steps != self.step:
            raise RuntimeError(f"DeepSpeed counted {engine.global_steps} steps, the loop {self.step}")
        # Every micro-batch scores the same number of tokens: the mean of the means is token-weighted.
        # With scored targets the sums are NLL sums over n_scored targets (none: the loss is NaN).
        if scale is not None:
            n_good = n_scored
        loss = total / n_good if n_good else float("nan")
        self.window["loss"] += total
        self.window["count"] += n_good
        self.window["time"] += time.perf_counter() - tic
        self.window["tokens"] += self.rounds * self.tokens_per_round
        self.summary["losses"].append(loss)
        return {"loss": loss, "lr": engine.get_lr()[0], "stop": bool(n_stop), "non_finite": int(n_bad)}

    def log(self) -> None:
        """One line (rank 0) and the same figures as MLflow metrics, over the steps since the last."""
        w, engine = self.window, self.engine
        if w["count"]:
            metrics = summarize(w["loss"], w["count"], self.bpc)
        else:
            metrics = {"loss": float("nan"), "bpc" if self.bpc else "ppl": float("nan")}
        metrics["lr"] = engine.get_lr()[0]
        gn = grad_norm(engine)
        if gn is not None:
            metrics["grad_norm"] = gn
        scale = loss_scale(engine)
        if scale is not None:
            metrics["loss_scale"] = scale
            metrics["skipped_steps"] = engine.skipped_steps - self.skipped0
        metrics["tokens_per_s"] = w["tokens"] / max(w["time"], 1e-9)
        metrics["peak_mem_gib"] = _peak_memory_gib(self.device)
        metrics["tokens_seen"] = self.tokens_seen(self.step)
        if self.rank == 0:
            log.info("%s", _line(self.step, self.t.max_steps, metrics))
        self.tracker.log_metrics(metrics, self.step)
        self._reset_window()

    def validate(self) -> dict:
        valid = validate(self.engine, self.cfg, self.shards, self.bpc, self.memory_dtype, self.manifest.scored)
        self.summary["valid"] = valid
        self.tracker.log_metrics({f"valid_{k}": v for k, v in valid.items()}, self.step)
        if self.rank == 0:
            shown = f"bpc {valid['bpc']:.4f}" if self.bpc else f"ppl {valid['ppl']:.2f}"
            log.info("step %d | valid loss %.4f | valid %s", self.step, valid["loss"], shown)
        return valid

    def rank_state(self) -> dict[str, RankState]:
        """What this rank saves beside DeepSpeed's state, each entry saving and loading itself."""
        def put(memories: list) -> None:
            self.memories = memories

        # A rank the saved run did not have gets a fresh generator, reproducibly.
        def fresh() -> None:
            _seed(self.t.seed + self.rank + 1_000_003 * self.step)

        return {"streams": StreamCursors(self.streams),
                "memory": StreamMemory(lambda: self.memories, put, self.micro_ids, type(self.memories[0]),
                                       self.device, self.memory_dtype),
                "rng": Generators(fresh)}

    def save(self) -> Path:
        t = self.t
        rank_state = save_states(self.rank_state(), self.rank)
        meta = ckpt.CheckpointMeta(
            tag=ckpt.tag_for(self.step), step=self.step, world_size=self.world, micro_batches=t.micro_batches,
            n_streams=t.n_streams, tokens_seen=self.tokens_seen(self.step), mlflow_run_id=self.tracker.run_id,
            manifest=ckpt.manifest_summary(self.manifest), config=to_dict(self.cfg), zero_stage=t.zero_stage,
            precision=t.precision)
        path = ckpt.save(self.engine, t.output, rank_state, meta, t.keep_last)
        self.summary["checkpoint"] = str(path)
        if self.rank == 0:
            log.info("step %d | saved %s", self.step, path)
        return path

    def preempted(self) -> None:
        """All ranks save, then rank 0 requeues the SLURM job (docs/architecture.md)."""
        path = self.save()
        requeued = distributed.requeue() if self.rank == 0 else False
        self.tracker.mark_preempted(requeued, self.step)
        self.summary.update(stopped=True, requeued=requeued)
        if self.rank == 0:
            log.warning("stopped by signal at step %d; saved %s%s", self.step, path,
                        "; job requeued" if requeued else "")

    def close(self) -> None:
        self.summary.update(step=self.step, tokens_seen=self.tokens_seen(self.step))
        self.streams.close()
        self.engine = self.module = self.memories = None   # see release_process_group


def validate(engine, cfg: Config, shards: Path, bpc: bool, memory_dtype: torch.dtype, scored: bool = False) -> dict:
    """The valid split with memory, at the eval tgt_len and the memory that keeps the span, and
    the share of attention on each part of the memory."""
    t = cfg.train
    mem_len = unwrap(engine).eval_mem_len(t.eval_tgt_len)   # the family's rule for keeping the span
    n = t.eval_n_streams or t.n_streams
    sums = score_split(engine, shards, "valid", n_streams=n, tgt_len=t.eval_tgt_len, mem_len=mem_len,
                       max_steps=t.eval_max_steps, memory_dtype=memory_dtype,
                       attention_buckets=cfg.eval.attention_buckets, document_reset=t.document_reset,
                       accuracy=scored)
    # where attention went (attn_segment, attn_memory, ... : models/diagnostics.py), for the curves
    accuracy = {"accuracy": sums["correct"] / max(sums["tokens"], 1)} if scored else {}
    return (summarize(sums["nll_sum"], sums["tokens"], bpc) | {"tokens": sums["tokens"]} | accuracy
            | attention_metrics(sums["attention"] or {}))


def _non_finite(step: int, rank: int, bad: list) -> NonFiniteLoss:
    """The same error on every rank, naming what each rank saw (an all-gather)."""
    mine = [{"rank": rank, "micro_batch": m, "streams": f"{ids[0]}-{ids[-1]}", "loss": v} for m, ids, v in bad]
    seen = [x for part in distributed.all_gather_object(mine) for x in part]
    where = "; ".join(f"rank {x['rank']} micro-batch {x['micro_batch']} streams {x['streams']} loss {x['loss']}"
                      for x in seen)
    return NonFiniteLoss(f"non-finite training loss at step {step + 1} ({where}); the update was not applied. "
                         f"Lower train.lr, check train.clip and the data of those streams, or use bf16/fp32")


# ----------------------------------------------------------------------------- entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = arg_parser("train", "train a memory language model with DeepSpeed (stage 2)")
    cfg, _ = parse_args(parser, argv)
    # 0 also after a preemption: the job saved (and requeued itself under SLURM).
    return run_stage("train", lambda: train(cfg) and 0)


if __name__ == "__main__":
    exit_now(main())
