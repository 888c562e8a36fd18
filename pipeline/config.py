"""One typed schema for every stage: dataclasses + YAML + dotted ``key=value`` overrides.

``load_config("configs/tiny.yaml", ["train.max_steps=10"])`` returns a ``Config``.
OmegaConf checks the YAML and the overrides against the dataclasses, so an unknown key
or a value of the wrong type is an error that names the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import field
from pathlib import Path
from typing import Any, List, Literal, Optional, Sequence
from urllib.parse import urlparse

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models import check_model_config
from models.config import ModelConfig
from pipeline.common import XlpipeError


@dataclasses.dataclass
class DataConfig:
    corpus: Literal["wt103", "lm1b", "enwik8", "text8", "ptb", "text", "stdlib", "pg19", "sort"] = "stdlib"
    path: str = ""                   # raw corpus: a directory, a file, or globs (text corpus)
    output: str = "shards"           # shard directory written by prepare, read by every later stage
    # Later stages also read data.output from a URL (pipeline/data/remote.py): https://host/path or
    # "pipe:aws s3 cp s3://bucket/path/{file} -". Its files are staged, verified, into this node-local
    # directory ("": $TMPDIR or the system temp dir), under a subdirectory per manifest.
    cache_dir: str = ""
    workers: int = 1                 # tokenizer processes in prepare (0: every CPU this process may use)
    # Input units and shards (pipeline/prepare.py): independent of workers and job-array tasks.
    unit_bytes: int = 1 << 24        # raw bytes per input unit; shard i of a split = unit i's tokens
    chunk_tokens: int = 1 << 20      # tokens per webdataset sample
    errors: Literal["strict", "replace"] = "strict"  # invalid UTF-8: error naming file+offset, or U+FFFD
    # Corpus options (README "Corpora").
    keep_newline: bool = True        # enwik8: keep byte 10 (the reference pipeline dropped it: false)
    valid_bytes: int = 0             # enwik8/text8: 0 = the reference 5,000,000 (needs the 100,000,000-byte file)
    test_bytes: int = 0              # enwik8/text8: as valid_bytes; test is the file's last test_bytes
    valid_fraction: float = 0.02     # text/stdlib: share of documents in valid (stable hash of the path)
    test_fraction: float = 0.02      # text/stdlib: share of documents in test
    text_field: str = "text"         # text: JSONL key holding each document
    lm1b_valid_shard: int = 1        # lm1b: heldout shard used as valid (00000 is the test set)
    wt103_articles: bool = False     # wt103: record article starts (" = Title = " lines) for document_reset
    # sort: the ∞-former paper's synthetic sorting task, generated (pipeline/data/corpora/sort.py)
    sort_length: int = 4000          # symbols per sequence before the separator and the 20 answers
    sort_sequences: List[int] = field(default_factory=lambda: [8000, 800, 800])   # train, valid, test
    sort_seed: int = 0
    sort_unit_sequences: int = 200   # sequences per input unit (shard)


@dataclasses.dataclass
class TokenizerConfig:
    kind: Literal["word", "char", "byte", "sentencepiece", "huggingface"] = "word"
    path: str = ""                   # huggingface: a local directory with a saved tokenizer (tokenizer.json)
    vocab_size: int = 8000           # sentencepiece only
    # word/char vocabularies (reference semantics: frequency order, ties in first-occurrence order)
    lower_case: Optional[bool] = None  # None: the corpus's reference setting (ptb true, others false)
    count_on: Literal["auto", "train", "all"] = "auto"  # auto: reference (wt103/text train; ptb/text8 all)
    min_freq: int = 0                # drop counted symbols seen fewer times
    max_size: int = 0                # keep at most this many counted symbols (0: all)
    vocab_file: str = ""             # word: fixed vocabulary, first column per line (lm1b: 1b_word_vocab.txt)
    # sentencepiece (byte_fallback, identity normalisation: decode(encode(x)) == x)
    model_type: Literal["bpe", "unigram"] = "bpe"
    sample_bytes: int = 200_000_000  # cap on the train text sampled for training
    character_coverage: float = 0.9995


@dataclasses.dataclass
class TrainConfig:
    output: str = "runs/default"     # checkpoints and run files
    seed: int = 1111
    max_steps: int = 100

    # Streams (docs/architecture.md, contract 2): global and fixed, independent of the world size.
    n_streams: int = 8               # batch rows = streams; each rank owns n_streams / world
    tgt_len: int = 0                 # 0: model.tgt_len (a different non-zero value is an error)
    micro_batches: int = 1           # gradient accumulation: each micro-batch owns its streams and memory
    roll: bool = True                # per-epoch random cyclic shift of every stream (NVIDIA's --roll)
    stream_mode: Literal["auto", "ordered", "shuffled_sentences"] = "auto"  # auto: shuffled for sentence corpora (lm1b)
    # no token attends across a document start, in a segment or through memory; a target that
    # opens a document is not scored (shards must record starts: text, stdlib, pg19, sort, lm1b)
    document_reset: bool = False

    # Optimisation.
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 2.5e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.99           # sgd (Al-Rfou et al. used 0.99)
    schedule: Literal["cosine", "inv_sqrt", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0        # cosine floor as a fraction of lr (reference PyTorch 0, TF 0.01)
    clip: float = 0.25               # global grad-norm clip; 0 disables
    fused_optimizer: bool = True     # fused Adam/AdamW: DeepSpeed's (or apex's) on CUDA, torch's on CPU
    tf32: bool = True                # fp32 on CUDA: TF32 matmuls/convolutions (false: strict fp32); no effect on CPU
    # torch.compile the model (in place, so checkpoint keys are unchanged; static shapes: one
    # compilation per segment / memory length). Off by default: see README "GPU paths".
    compile: bool = False
    # Rae et al.'s alternative to a lower learning rate late in training: from update
    # late_update_step on, one optimizer update per late_update_every segments of every stream
    # (gradients accumulated over them; 1: off). Steps count updates everywhere.
    late_update_step: int = 0
    late_update_every: int = 1

    # Precision and ZeRO.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    # ZeRO-3: parameters with fewer elements stay gathered (DeepSpeed's
    # stage3_param_persistence_threshold, default 100,000); 0 partitions every parameter
    zero3_persistence_threshold: int = 100_000
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    fp16_hysteresis: int = 2
    fp16_min_loss_scale: float = 1.0

    # Loop, validation, checkpoints.
    log_every: int = 10
    eval_every: int = 0              # 0: no periodic validation
    eval_tgt_len: int = 0            # 0: tgt_len; memory is extended to keep tgt_len + mem_len (reference)
    eval_max_steps: int = 0          # 0: the whole valid split
    eval_n_streams: int = 0          # 0: n_streams (a multiple of the world size)
    save_every: int = 0              # 0: only at the end and on preemption
    keep_last: int = 3
    resume: bool = True              # continue from output/latest when it exists


@dataclasses.dataclass
class EvalSpeedConfig:
    """Eval speed (Dai et al. Table 9): cached-memory evaluation vs Al-Rfou's sliding window."""

    attn_lens: List[int] = field(default_factory=list)  # attention lengths to measure; empty: not measured
    tgt_len: int = 0                 # cached path segment (0: eval.tgt_len); its mem_len = attn_len - tgt_len
    batch_size: int = 1              # streams (cached) and windows (sliding) per forward
    cached_tokens: int = 2048        # predictions timed per repeat on the cached path (after the memory is full)
    sliding_windows: int = 16        # predictions (full windows) timed per repeat on the sliding path
    repeats: int = 3                 # the median repeat is reported


@dataclasses.dataclass
class ReclConfig:
    """Relative effective context length of a group of models (Dai et al. §4.3, Appendix C)."""

    sources: List[str] = field(default_factory=list)    # run dirs, checkpoint dirs or exports; empty: no RECL
    names: List[str] = field(default_factory=list)      # one per source (default: the directory names)
    contexts: List[int] = field(default_factory=list)   # growing context lengths c0 < c0+Δ < ...
    ratios: List[float] = field(default_factory=lambda: [0.1, 0.5, 1.0])  # r: share of the hardest positions
    threshold: float = 0.01          # stop when the relative gain falls below 1 %
    positions: int = 1000            # target positions sampled from the split (the same for every model)
    batch_size: int = 16


@dataclasses.dataclass
class EvalConfig:
    """``python -m pipeline.evaluate`` (README "Evaluation"). Lengths default to the model's."""

    source: str = ""                 # run dir, checkpoint dir (global_stepN) or export dir; "": train.output
    split: str = "valid"
    perplexity: bool = True          # false: only the eval-speed and/or RECL parts
    tgt_len: int = 0                 # 0: model.tgt_len
    mem_len: int = -1                # -1: keep the training attention span (model.mem_len + model.tgt_len - tgt_len)
    clamp_len: Optional[int] = None  # None: model.clamp_len (-1: no clamp)
    same_length: Optional[bool] = None  # None: model.same_length
    cmem_len: int = -1               # compressive family: -1 keeps model.compressive.cmem_len
    n_streams: int = 10              # eval batch (streams); a multiple of the world size
    warm_tokens: int = -1            # -1: mem_len (NVIDIA's warm start: every scored token has full memory); 0: cold
    max_steps: int = 0               # 0: the whole split; else the first max_steps segments of every stream
    mem_lens: List[int] = field(default_factory=list)   # sweep: one evaluation per memory length, plus a plot
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"     # model weights on the device (NLL sums stay fp64)
    tf32: bool = False               # fp32 on CUDA: TF32 matmuls (faster; off keeps the figures strict fp32)
    # reuse the memory rows' keys and values from the previous segment (same products; holds K/V of
    # one segment plus memory per layer); false: project them again every segment
    kv_cache: bool = True
    # where attention goes (segment / memory / compressed memory, each in age buckets), also in
    # training's validation; 0: not measured
    attention_buckets: int = 6
    document_reset: Optional[bool] = None   # None: the run's train.document_reset
    # per-token NLL (.npz: nll per split position, NaN where unscored; a sweep: its first mem_len)
    dump: str = ""
    output: str = ""                 # report directory; "": <run dir>/eval or <export dir>/eval
    speed: EvalSpeedConfig = field(default_factory=EvalSpeedConfig)
    recl: ReclConfig = field(default_factory=ReclConfig)


@dataclasses.dataclass
class ExportConfig:
    """``python -m pipeline.export``: a checkpoint → model.safetensors + config + tokenizer + meta."""

    source: str = ""                 # run dir (its latest checkpoint) or checkpoint dir; "": train.output
    output: str = ""                 # "": <run dir>/export/<tag>
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    overwrite: bool = False


@dataclasses.dataclass
class GenerateConfig:
    """``python -m pipeline.generate``: sampling from an export with cached memory."""

    export: str = ""                 # export directory
    prompt: str = ""
    prompt_file: str = ""            # read the prompt from this file instead
    tokens: int = 200                # new tokens to sample
    temperature: float = 1.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1.0: off (nucleus sampling below 1)
    seed: int = 0
    mem_len: int = 0                 # 0: model.mem_len (bounds the context, and the cost per token)
    clamp_len: Optional[int] = None  # None: model.clamp_len


@dataclasses.dataclass
class TrackingConfig:
    enabled: bool = True             # False: no MLflow at all (every tracking call is a no-op)
    experiment: str = "xlpipe"
    uri: str = ""                    # "": $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the working directory
    run_name: str = ""               # "": MLflow picks one
    system_metrics: bool = True      # CPU/RAM/disk/network (+GPU with nvidia-ml-py) from rank 0
    system_metrics_interval: float = 10.0  # seconds between samples
    parent_run_id: str = ""          # training: nest the run under this one (pipeline.compare's parent run)


@dataclasses.dataclass
class CompareEntry:
    """One member of a comparison: its name and the overrides that make it (``model.family=lstm`` ...)."""

    name: str = ""
    overrides: List[str] = field(default_factory=list)


@dataclasses.dataclass
class CompareConfig:
    """``python -m pipeline.compare``: every member trained on the same shards with the same budget
    (train.*), evaluated with the same settings (eval.*), RECL over the group, one report."""

    output: str = "runs/compare"     # <output>/<name>/ per member; report.{json,md} and plots here
    members: List[CompareEntry] = field(default_factory=list)
    splits: List[str] = field(default_factory=lambda: ["valid", "test"])
    recl: bool = True                # RECL over the members (eval.recl.contexts / ratios / positions)
    # []: train.seed alone. Two or more: every member trained and evaluated once per seed (in
    # <output>/<name>/seed-<s>/), the report giving the mean and each seed's value (the spread).
    seeds: List[int] = field(default_factory=list)


@dataclasses.dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


class ConfigError(XlpipeError, ValueError):
    """A config file or override that does not fit the schema."""


# ----------------------------------------------------------------------------- value ranges
# Checked by load_config, so a bad value fails before any work, file or MLflow run (the schema's
# types are checked by OmegaConf). `None` values (unset optionals) are not checked here.


def _ge(lo):
    return (lambda v: v >= lo), f">= {lo}"


def _gt(lo):
    return (lambda v: v > lo), f"> {lo}"


def _within(lo, hi, hi_open=False):
    return ((lambda v: lo <= v < hi) if hi_open else (lambda v: lo <= v <= hi)), \
        f"in [{lo}, {hi})" if hi_open else f"in [{lo}, {hi}]"


RANGES: dict[str, tuple] = {
    "data.workers": (*_ge(0), "0: every CPU"),
    "data.unit_bytes": (*_ge(1), ""),
    "data.chunk_tokens": (*_ge(1), ""),
    "data.valid_bytes": (*_ge(0), "0: the reference size"),
    "data.test_bytes": (*_ge(0), "0: the reference size"),
    "data.valid_fraction": (*_within(0.0, 1.0, hi_open=True), ""),
    "data.test_fraction": (*_within(0.0, 1.0, hi_open=True), ""),
    "data.lm1b_valid_shard": (*_within(1, 49), "heldout shard 0 is the test set"),
    "data.sort_length": (*_ge(1), ""),
    "data.sort_seed": (*_ge(0), ""),
    "data.sort_unit_sequences": (*_ge(1), ""),
    "tokenizer.vocab_size": (*_ge(2), ""),
    "tokenizer.min_freq": (*_ge(0), ""),
    "tokenizer.max_size": (*_ge(0), "0: all"),
    "tokenizer.sample_bytes": (*_ge(1), ""),
    "tokenizer.character_coverage": ((lambda v: 0.0 < v <= 1.0), "in (0, 1]", ""),
    "train.max_steps": (*_ge(1), ""),
    "train.n_streams": (*_ge(1), "a multiple of world size x micro_batches"),
    "train.tgt_len": (*_ge(0), "0: model.tgt_len"),
    "train.micro_batches": (*_ge(1), "1: no gradient accumulation"),
    "train.lr": (*_gt(0.0), ""),
    "train.weight_decay": (*_ge(0.0), ""),
    "train.eps": (*_gt(0.0), ""),
    "train.momentum": (*_within(0.0, 1.0, hi_open=True), ""),
    "train.warmup_steps": (*_ge(0), ""),
    "train.min_lr_ratio": (*_within(0.0, 1.0), ""),
    "train.clip": (*_ge(0.0), "0: no clipping"),
    "train.late_update_step": (*_ge(0), ""),
    "train.late_update_every": (*_ge(1), "1: every step updates"),
    "train.zero_stage": (*_within(0, 3), ""),
    "train.zero3_persistence_threshold": (*_ge(0), "0: every parameter partitioned"),
    "train.fp16_initial_scale_power": (*_within(0, 64), ""),
    "train.fp16_loss_scale_window": (*_ge(1), ""),
    "train.fp16_hysteresis": (*_ge(1), ""),
    "train.fp16_min_loss_scale": (*_gt(0.0), ""),
    "train.log_every": (*_ge(1), ""),
    "train.eval_every": (*_ge(0), "0: no periodic validation"),
    "train.eval_tgt_len": (*_ge(0), "0: tgt_len"),
    "train.eval_max_steps": (*_ge(0), "0: the whole split"),
    "train.eval_n_streams": (*_ge(0), "0: n_streams"),
    "train.save_every": (*_ge(0), "0: only at the end and on preemption"),
    "train.keep_last": (*_ge(0), "0: keep all"),
    "eval.tgt_len": (*_ge(0), "0: model.tgt_len"),
    "eval.mem_len": (*_ge(-1), "-1: keep the training attention span"),
    "eval.clamp_len": (*_ge(-1), "-1: no clamp"),
    "eval.cmem_len": (*_ge(-1), "-1: model.compressive.cmem_len"),
    "eval.attention_buckets": (*_ge(0), "0: attention not measured"),
    "eval.n_streams": (*_ge(1), "a multiple of the world size"),
    "eval.warm_tokens": (*_ge(-1), "-1: mem_len, 0: cold start"),
    "eval.max_steps": (*_ge(0), "0: the whole split"),
    "eval.speed.tgt_len": (*_ge(0), "0: eval.tgt_len"),
    "eval.speed.batch_size": (*_ge(1), ""),
    "eval.speed.cached_tokens": (*_ge(1), ""),
    "eval.speed.sliding_windows": (*_ge(1), ""),
    "eval.speed.repeats": (*_ge(1), ""),
    "eval.recl.threshold": (*_ge(0.0), ""),
    "eval.recl.positions": (*_ge(1), ""),
    "eval.recl.batch_size": (*_ge(1), ""),
    "generate.tokens": (*_ge(0), ""),
    "generate.temperature": (*_ge(0.0), "0: greedy"),
    "generate.top_k": (*_ge(0), "0: off"),
    "generate.top_p": ((lambda v: 0.0 < v <= 1.0), "in (0, 1]", "1: off"),
    "generate.mem_len": (*_ge(0), "0: model.mem_len"),
    "generate.clamp_len": (*_ge(-1), "-1: no clamp"),
    "tracking.system_metrics_interval": (*_gt(0.0), ""),
}
# Lists whose every element has a range.
ITEM_RANGES: dict[str, tuple] = {
    "eval.mem_lens": _ge(0),
    "eval.speed.attn_lens": _ge(2),
    "eval.recl.contexts": _ge(1),
    "eval.recl.ratios": ((lambda v: 0.0 < v <= 1.0), "in (0, 1]"),
    "train.betas": _within(0.0, 1.0, hi_open=True),
    "data.sort_sequences": _ge(1),
    "compare.seeds": _ge(0),
}


def _value(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# data.output forms read through webdataset's opener (pipeline/data/remote.py); anything else is a path.
SHARD_URLS = ("http://", "https://", "pipe:")


def is_shard_url(location: str) -> bool:
    return location.startswith(SHARD_URLS)


def check_data_location(d: DataConfig) -> None:
    """data.output is a path, an http(s) URL with a host, or a pipe: command with {file}; data.cache_dir a path."""
    out = d.output
    if out.startswith("pipe:") and "{file}" not in out:
        raise ConfigError(f"data.output={out!r} is a pipe: command without {{file}}: write where each file name "
                          f"goes, e.g. 'pipe:aws s3 cp s3://bucket/shards/{{file}} -'")
    if out.startswith(("http://", "https://")) and not urlparse(out).netloc:
        raise ConfigError(f"data.output={out!r} has no host: write https://host/path, the URL under which "
                          f"manifest.json and the shard tars live")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", out)
    if scheme and not is_shard_url(out):
        raise ConfigError(f"data.output={out!r}: {scheme.group(1)}:// is not read directly; use an http(s) URL or a "
                          f"pipe: command that writes the file to stdout, e.g. "
                          f"'pipe:aws s3 cp s3://bucket/shards/{{file}} -' or 'pipe:gsutil cat gs://bucket/shards/{{file}}'")
    if is_shard_url(d.cache_dir) or "://" in d.cache_dir:
        raise ConfigError(f"data.cache_dir={d.cache_dir!r} must be a local directory (node-local disk the shards "
                          f"of a URL data.output are staged into), not a URL")


def check_values(cfg: "Config") -> None:
    """Every value in its allowed range, named by its dotted key, before anything runs."""
    for key, (ok, allowed, note) in RANGES.items():
        value = _value(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}"
                              + (f" ({note})" if note else ""))
    for key, (ok, allowed) in ITEM_RANGES.items():
        for i, value in enumerate(_value(cfg, key)):
            if not ok(value):
                raise ConfigError(f"{key}[{i}]={value!r} is out of range: every entry must be {allowed}")
    if len(cfg.data.sort_sequences) != 3:
        raise ConfigError(f"data.sort_sequences={cfg.data.sort_sequences} must hold three counts (train, valid, test)")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas={cfg.train.betas} must hold two values (beta1, beta2)")
    if cfg.train.compile and cfg.train.zero_stage == 3:
        # the compiled graph sees ZeRO-3's empty parameter partitions: its gather hooks never run
        raise ConfigError("train.compile=true does not run with train.zero_stage=3 (torch.compile traces the "
                          "partitioned, empty parameters); use zero_stage 0-2 or train.compile=false")
    check_data_location(cfg.data)
    if cfg.data.valid_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError(f"data.valid_fraction + data.test_fraction = "
                          f"{cfg.data.valid_fraction + cfg.data.test_fraction} leaves no train split; keep it < 1")
    try:
        check_model_config(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    where = f" at key '{key}'" if key else ""
    return ConfigError(f"{source}{where}: {msg}")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults, then the YAML file, then dotted overrides (last wins)."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
        except yaml.YAMLError as exc:            # a syntax error: where, and what the parser expected
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}{where}: not valid YAML ({what}); fix the file") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override {item!r}") from None
    cfg = OmegaConf.to_object(merged)
    check_values(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.00025, ...}`` for tracking params."""
    out: dict[str, Any] = {}
    items = to_dict(cfg).items() if dataclasses.is_dataclass(cfg) else cfg.items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def arg_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """The common ``--config FILE [key=value ...]`` command line of every stage."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}", description=description)
    parser.add_argument("--config", required=True, help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=10")
    return parser


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None) -> tuple[Config, argparse.Namespace]:
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, args
