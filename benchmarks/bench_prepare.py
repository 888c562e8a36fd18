"""Prepare throughput on a WikiText-103-format corpus against a reference-style baseline.

    python benchmarks/bench_prepare.py [--tokens 20000000] [--workers 1 2] [--repeat 1]

The corpus is generated deterministically (Zipf-like word frequencies over 200k types, ~100-token
lines, WikiText-style headings and blank lines) into .cache/bench_prepare/ and reused. The
baseline is written here in the style of the Transformer-XL reference (kimiyoung/transformer-xl
``Vocab.count_file`` / ``build_vocab`` / ``encode_file(ordered=True)``: a Counter updated line by
line, then per-line id lists turned into LongTensors and concatenated). Both produce the same
ids (checked). Results go to benchmarks/results/prepare.json. Timings on a shared machine are noisy:
re-run on a quiet one for numbers to quote.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.common import atomic_write_bytes  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.shards import Manifest, SplitTokens  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, regressions  # noqa: E402

CACHE = REPO / ".cache" / "bench_prepare"
RESULTS = REPO / "benchmarks" / "results" / "prepare.json"
SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------- corpus


def _word_types(n: int, rng: np.random.Generator) -> list[str]:
    syll = ["ka", "to", "ri", "ne", "mo", "sa", "lu", "pe", "di", "go", "ha", "vi", "ze", "bo", "fu", "xi"]
    out, seen = ["the", ",", ".", "of", "and", "in", "<unk>", "@-@", "=", "\"", "'s"], set()
    seen.update(out)
    while len(out) < n:
        w = "".join(syll[i] for i in rng.integers(0, len(syll), int(rng.integers(1, 7))))  # 16^6 possible
        if rng.random() < 0.1:
            w = w.capitalize()
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _write_split(path: Path, ids: np.ndarray, words: np.ndarray, rng: np.random.Generator) -> None:
    lines, pos = [" \n"], 0
    while pos < len(ids):
        n = int(rng.integers(50, 151))
        chunk = words[ids[pos:pos + n]]
        pos += n
        if rng.random() < 0.05:  # a heading, then a blank line, as in WikiText
            lines.append(f" = {' '.join(chunk[:3])} = \n \n")
        lines.append(" " + " ".join(chunk) + " \n")
        if rng.random() < 0.3:
            lines.append(" \n")
    atomic_write_bytes(path, "".join(lines).encode("utf-8"))


def make_corpus(train_tokens: int, vocab: int = 200_000) -> Path:
    root = CACHE / f"wt103_synth_{train_tokens}"
    if all((root / f"wiki.{s}.tokens").is_file() for s in SPLITS):
        return root
    rng = np.random.default_rng(1234)
    words = np.array(_word_types(vocab, rng), dtype=object)
    p = 1.0 / (np.arange(vocab) + 2.7)  # Zipf–Mandelbrot
    p /= p.sum()
    train = rng.choice(vocab, size=train_tokens, p=p)
    seen = np.unique(train)  # valid/test words all occur in train, as in WikiText-103
    q = p[seen] / p[seen].sum()
    _write_split(root / "wiki.train.tokens", train, words, rng)
    for split in ("valid", "test"):
        _write_split(root / f"wiki.{split}.tokens", seen[rng.choice(len(seen), size=train_tokens // 40, p=q)],
                     words, rng)
    return root


# ----------------------------------------------------------------------------- reference-style baseline


class ReferenceStyleVocab:
    """Our own code, written the way the reference's Vocab works (per-line Python objects)."""

    def __init__(self, special=(), lower_case=False):
        self.counter = Counter()
        self.special = list(special)
        self.lower_case = lower_case

    def tokenize(self, line, add_eos=False):
        line = line.strip()
        if self.lower_case:
            line = line.lower()
        symbols = line.split()
        return symbols + ["<eos>"] if add_eos else symbols

    def count_file(self, path):
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                self.counter.update(self.tokenize(line))

    def build_vocab(self):
        self.idx2sym, self.sym2idx = [], OrderedDict()
        for sym in self.special:
            self.add_symbol(sym)
        for sym, _ in self.counter.most_common():
            self.add_symbol(sym)

    def add_symbol(self, sym):
        if sym not in self.sym2idx:
            self.idx2sym.append(sym)
            self.sym2idx[sym] = len(self.idx2sym) - 1

    def get_idx(self, sym):
        return self.sym2idx[sym]

    def encode_file(self, path):
        import torch
        encoded = []
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                encoded.append(torch.LongTensor([self.get_idx(s) for s in self.tokenize(line, add_eos=True)]))
        return torch.cat(encoded)


def run_baseline(root: Path):
    t0 = time.perf_counter()
    vocab = ReferenceStyleVocab(special=["<eos>"])
    vocab.count_file(root / "wiki.train.tokens")
    vocab.build_vocab()
    data = {s: vocab.encode_file(root / f"wiki.{s}.tokens") for s in SPLITS}
    return time.perf_counter() - t0, data, len(vocab.idx2sym)


# ----------------------------------------------------------------------------- ours


def run_ours(root: Path, out: Path, workers: int):
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, ["data.corpus=wt103", f"data.path={root}", f"data.output={out}"])
    t0 = time.perf_counter()
    manifest = prepare(cfg, workers=workers, progress=False)
    return time.perf_counter() - t0, manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000_000, help="train tokens to generate (words)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting; the best is kept")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a figure misses the goal or falls under half the committed one (same CPU)")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    root = make_corpus(args.tokens)
    gen_s = time.perf_counter() - t0
    corpus_bytes = sum((root / f"wiki.{s}.tokens").stat().st_size for s in SPLITS)
    print(f"corpus {root} ({corpus_bytes / 1e6:.0f} MB; generated/reused in {gen_s:.1f}s)", flush=True)

    base_times = []
    for _ in range(args.repeat):
        secs, ref, vocab_size = run_baseline(root)
        base_times.append(secs)
    total = sum(len(v) for v in ref.values())
    base = min(base_times)
    print(f"baseline (reference style): {total:,} tokens in {base:.1f}s = {total / base:,.0f} tokens/s", flush=True)

    results = {"baseline": {"seconds": base, "tokens_per_s": total / base, "runs": base_times}}
    out = CACHE / "shards"
    for w in args.workers:
        times = []
        for _ in range(args.repeat):
            secs, manifest = run_ours(root, out, w)
            times.append(secs)
        for split in SPLITS:  # same ids as the baseline, or the comparison means nothing
            reader = SplitTokens(out, Manifest.load(out), split)
            ours = reader.read(0, len(reader))
            reader.close()
            if not np.array_equal(ours.astype(np.int64), ref[split].numpy()):
                raise SystemExit(f"{split}: prepare's tokens differ from the baseline's")
        assert manifest.tokenizer["vocab_size"] == vocab_size
        best = min(times)
        results[f"prepare_workers_{w}"] = {"seconds": best, "tokens_per_s": total / best, "runs": times,
                                           "speedup_vs_baseline": base / best}
        print(f"prepare, {w} worker(s): {best:.1f}s = {total / best:,.0f} tokens/s, "
              f"{base / best:.2f}x the baseline", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    report = {
        "benchmark": "prepare throughput, WikiText-103-format synthetic corpus (word vocabulary, <eos> per line)",
        "corpus": {"train_tokens_generated": args.tokens, "total_tokens_with_eos": total, "bytes": corpus_bytes,
                   "vocab_size": vocab_size},
        "what_is_timed": "vocabulary counting on train + encoding train/valid/test; ours also writes shards, "
                         "sidecars and manifest (end-to-end prepare())",
        "results": results,
        "goal": ">= 3x the baseline's tokens/s",
        "machine": machine_info() | {"load_avg_1m_at_end": os.getloadavg()[0], "platform": platform.platform()},
        "caveat": "measured on a shared machine; re-run on a quiet one for numbers to quote",
    }
    # the regression check's names: our tokens/s and our speedup over the baseline, per worker count
    report["figures"] = {f"{k} {x}": v[x] for k, v in results.items() if k != "baseline"
                         for x in ("tokens_per_s", "speedup_vs_baseline")}
    lost = regressions(Path(args.output), report["figures"],
                       {name: 3.0 for name in report["figures"] if name.endswith("speedup_vs_baseline")})
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.output, (json.dumps(report, indent=1) + "\n").encode())
    print(f"wrote {args.output}")
    for line in lost:
        print(f"regression: {line}", file=sys.stderr)
    return 1 if (args.check and lost) else 0


if __name__ == "__main__":
    sys.exit(main())
