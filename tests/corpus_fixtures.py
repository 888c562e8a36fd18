"""Tiny corpora in each corpus's exact on-disk layout (for test_corpora / test_prepare)."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- the reference's semantics
# Written here the way kimiyoung/transformer-xl's Vocab does it (per-line tokenize, Counter.update,
# specials then most_common), independently of pipeline.data.tokenizers.


def ref_vocab(lines, specials=(), lower_case=False, min_freq=0, max_size=None):
    counter = Counter()
    for line in lines:
        line = line.strip()
        if lower_case:
            line = line.lower()
        counter.update(line.split())
    idx2sym = []
    for sym in specials:
        if sym not in idx2sym:
            idx2sym.append(sym)
    for sym, cnt in counter.most_common(max_size):
        if cnt < min_freq:
            break
        if sym not in idx2sym:
            idx2sym.append(sym)
    return idx2sym


def ref_encode(lines, idx2sym, lower_case=False, eos="<eos>", unk=None):
    sym2idx = {s: i for i, s in enumerate(idx2sym)}
    out = []
    for line in lines:
        line = line.strip()
        if lower_case:
            line = line.lower()
        for sym in line.split() + [eos]:
            out.append(sym2idx[sym] if sym in sym2idx else sym2idx[unk])
    return out


def file_lines(text):
    """Lines as Python's text-mode file iteration yields them (universal newlines)."""
    return list(io.StringIO(text, newline=None))


# ----------------------------------------------------------------------------- corpus layouts

WORDS = ["the", "of", "and", "in", "to", "a", "was", "The", "is", "for", "on", "as", "by", "with",
         "he", "at", "from", "his", "an", "were", "@-@", ",", ".", "<unk>", "Valkyria", "naïve", "año"]


def sentences(seed: int, n: int, words=WORDS, lo: int = 0, hi: int = 14) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    return [" ".join(words[i] for i in rng.choice(len(words), size=int(rng.integers(lo, hi)), p=p))
            for _ in range(n)]


def wt103_text(seed: int, n: int) -> str:
    """WikiText-style: ' = Heading = ' lines, blank ' ' lines, paragraphs with leading spaces."""
    out = []
    for i, s in enumerate(sentences(seed, n, lo=1)):
        if i % 7 == 0:
            out.append(f" = {s.split()[0]} = \n")
        elif i % 5 == 0:
            out.append(" \n")
        else:
            out.append(f" {s} \n")
    return "".join(out)


def make_wt103(root: Path, names=("wiki.{}.tokens",), n=(120, 30, 30)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, count, seed in zip(("train", "valid", "test"), n, (1, 2, 3)):
        text = wt103_text(seed, count)
        if split == "test":  # a last line without newline: the reference still gives it <eos>
            text = text.rstrip("\n")
        (root / names[0].format(split)).write_text(text, encoding="utf-8")
    # valid/test words must be in the train vocabulary (as in WikiText-103): add them to train
    train = root / names[0].format("train")
    train.write_text(train.read_text(encoding="utf-8") + " " + " ".join(WORDS) + " \n", encoding="utf-8")
    return root


def make_ptb(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, seed, n in (("train", 4, 80), ("valid", 5, 20), ("test", 6, 20)):
        text = "".join(f" {s.lower() if seed % 2 else s} \n" for s in sentences(seed, n, lo=1))
        (root / f"ptb.{split}.txt").write_text(text, encoding="utf-8")
    return root


LM1B_TOP = "1-billion-word-language-modeling-benchmark-r13output"


def make_lm1b(root: Path, n_train: int = 3, vocab: bool = True) -> Path:
    base = root / LM1B_TOP
    tr = base / "training-monolingual.tokenized.shuffled"
    ho = base / "heldout-monolingual.tokenized.shuffled"
    tr.mkdir(parents=True)
    ho.mkdir(parents=True)
    for i in range(1, n_train + 1):
        (tr / f"news.en-{i:05d}-of-00100").write_text("".join(s + "\n" for s in sentences(10 + i, 25)))
    for k in range(3):
        (ho / f"news.en.heldout-{k:05d}-of-00050").write_text("".join(s + "\n" for s in sentences(20 + k, 15)))
    if vocab:
        # the real file: "<S>\t<count>" lines; our words minus one so that <UNK> gets used
        lines = ["<S>\t0", "</S>\t0", "<UNK>\t0"] + [f"{w}\t{100 - i}" for i, w in enumerate(WORDS[:-1])]
        (root / "1b_word_vocab.txt").write_text("\n".join(lines) + "\n")
    return root


def make_bytes_file(path: Path, n: int, seed: int = 0, alphabet: bytes | None = None) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if alphabet is None:  # enwik8-like: mostly ASCII XML-ish text with newlines and some UTF-8
        chunk = "<page>\n  <title>Año naïve</title>\n  <text>Some [[link]] text &amp; more.</text>\n</page>\n"
        data = (chunk.encode("utf-8") * (n // len(chunk) + 1))[:n]
        data = bytes(b ^ 1 if rng.random() < 0.05 and 97 <= b < 122 else b for b in data)
    else:
        data = rng.choice(list(alphabet), size=n).astype(np.uint8).tobytes()
    path.write_bytes(data)
    return path


def make_text(root: Path, n_files: int = 40) -> Path:
    (root / "docs" / "sub").mkdir(parents=True)
    for i in range(n_files):
        d = root / "docs" / ("sub" if i % 3 == 0 else "")
        (d / f"doc{i:03d}.txt").write_text("\n".join(sentences(100 + i, 6)) + ("\n" if i % 2 else ""))
    with open(root / "docs" / "records.jsonl", "w", encoding="utf-8") as f:
        for i, s in enumerate(sentences(7, 60, lo=1)):
            f.write(json.dumps({"id": i, "body": s}) + "\n")
    return root
