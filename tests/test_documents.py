"""Documents as boundaries, end to end: prepare records where documents start (text, stdlib,
PG-19, WikiText-103 articles, the sorting task), streams carry the starts and the scored targets,
and scoring with ``document_reset`` gives every document the NLL it gets alone from empty memory
(an independent full-length forward per document). The sorting task's generator is checked
against the reference's recipe (``collections.Counter.most_common``) and its statistics."""
from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest
import torch

from models import build_model
from models.compressive import CompressiveConfig
from models.config import ModelConfig
from models.infinite_former import InfiniteFormerConfig
from pipeline.config import ConfigError, load_config
from pipeline.data.corpora import open_corpus
from pipeline.data.corpora.sort import N_SYMBOLS, SEP, drift_weights, generate_sequence, sorted_symbols
from pipeline.data.shards import Manifest, ShardError, SplitInfo, SplitTokens, write_shard
from pipeline.data.streams import StreamError, open_streams
from pipeline.data.tokenizers import load_tokenizer
from pipeline.evaluation.scoring import score_split
from pipeline.prepare import prepare

from corpus_fixtures import make_wt103, sentences

N_TOKEN = 40


# ----------------------------------------------------------------------------- scoring with resets


def write_docs(root, raw: np.ndarray, starts: np.ndarray) -> None:
    """A 'valid' split in two shards of 32-token chunks (shard 1 opens mid-document, so a document
    crosses chunks and shards)."""
    cut = int(starts[11]) + 7
    infos = [write_shard(root, "valid", 0, raw[:cut], 32, "uint16", doc_starts=starts[starts < cut]),
             write_shard(root, "valid", 1, raw[cut:], 32, "uint16", doc_starts=starts[starts >= cut] - cut)]
    Manifest("test", {"kind": "word", "vocab_size": N_TOKEN}, "uint16", 32, False, {"valid": SplitInfo(infos)},
             documents=True).save(root)


@pytest.fixture(scope="module")
def doc_split(tmp_path_factory):
    """Documents of 1..60 random tokens; returns (shard dir, tokens, document starts)."""
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(5)
    lengths = [int(n) for n in rng.integers(1, 60, 24)] + [1, 2, 45]
    starts = np.cumsum([0] + lengths[:-1])
    raw = rng.integers(0, N_TOKEN, sum(lengths)).astype("uint16")
    write_docs(root, raw, starts)
    return root, raw.astype(np.int64), starts


def tiny(family: str = "transformer_xl", **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(n_token=N_TOKEN, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.0, tgt_len=8,
              mem_len=64) | kw
    cfg = ModelConfig(family=family, **kw)
    return build_model(cfg).eval()


def test_split_tokens_and_streams_carry_the_document_starts(doc_split):
    root, raw, starts = doc_split
    manifest = Manifest.load(root)
    assert manifest.documents and manifest.boundaries and not manifest.sentences
    tokens = SplitTokens(root, manifest, "valid")
    flags = np.zeros(len(raw), dtype=bool)
    tokens.flags(0, len(raw), flags, None)
    assert np.flatnonzero(flags).tolist() == starts.tolist()
    part = np.ones(50, dtype=bool)
    tokens.flags(100, 150, part, None)
    assert np.array_equal(part, np.isin(np.arange(100, 150), starts))
    tokens.close()
    # Stream b reads raw[b*L : (b+1)*L + 1]; its flags are the starts in that range.
    streams = open_streams(root, "valid", n_streams=2, tgt_len=8, drop_last=False)
    L = streams.tokens_per_stream
    seen = {b: [] for b in range(2)}
    for batch in streams:
        for row, b in enumerate(batch.stream_ids):
            seen[b].append(batch.starts[row, :-1].numpy())
        assert batch.starts.shape == (2, batch.inputs.shape[1] + 1) and batch.scored is None
    streams.close()
    for b in range(2):
        got = np.concatenate(seen[b])
        assert np.array_equal(got, np.isin(np.arange(b * L, b * L + len(got)), starts))


def test_streamed_with_resets_equals_every_document_scored_alone(doc_split):
    """The issue's check: each document from empty memory, one full-length forward (memory 64
    covers every document), against the streamed evaluation with resets, token by token."""
    root, raw, starts = doc_split
    model = tiny()
    got = {}

    def keep(batch, nll):
        got[len(got)] = (batch, nll.clone())

    n = 1                                                  # one stream: every target but x[0]
    sums = score_split(model, root, "valid", n_streams=n, tgt_len=8, mem_len=64, document_reset=True,
                       on_scored=keep)
    streamed = torch.cat([nll for _, nll in got.values()], dim=1)[0]          # target x[p+1] at p
    ends = list(starts[1:]) + [len(raw)]
    expected = torch.full((len(raw) - 1,), float("nan"))
    with torch.no_grad(), model.eval_lengths(mem_len=0):
        for s, e in zip(starts, ends):
            if e - s < 2:
                continue
            doc = torch.from_numpy(raw[s:e]).view(1, -1)
            with model.eval_lengths(tgt_len=e - s - 1):
                expected[s: e - 1] = model(doc[:, :-1], doc[:, 1:]).nll[0]
    # A target that opens a document is not scored (NaN in the dump), everything else is.
    scored = ~torch.isnan(expected)
    assert torch.equal(~torch.isnan(streamed), scored)
    torch.testing.assert_close(streamed[scored], expected[scored], rtol=1e-5, atol=1e-5)
    assert sums["tokens"] == int(scored.sum())
    assert sums["nll_sum"] == pytest.approx(float(expected[scored].double().sum()), rel=1e-6)
    # Without resets every target is scored and memory crosses documents.
    plain = score_split(model, root, "valid", n_streams=n, tgt_len=8, mem_len=64)
    assert plain["tokens"] == len(raw) - 1


def dump(model, root, mem_len: int, n_streams: int = 2) -> torch.Tensor:
    got = []
    score_split(model, root, "valid", n_streams=n_streams, tgt_len=8, mem_len=mem_len, document_reset=True,
                on_scored=lambda batch, nll: got.append(nll.clone()))
    return torch.cat(got, dim=1)


@pytest.mark.parametrize("family", ["compressive", "infinite_former", "vanilla"])
def test_every_family_keeps_documents_apart_through_the_evaluation_loop(doc_split, tmp_path, family):
    """Behind the same seam, every family's NLL of a document stays the same when the documents
    before it change (the contract test checks each family's exact reference)."""
    root, raw, starts = doc_split
    kw = {"vanilla": dict(attn_type="learned", tie_weight=False, mem_len=7),
          "compressive": dict(mem_len=8, compressive=CompressiveConfig(cmem_len=4, ratio=2)),
          "infinite_former": dict(mem_len=8, infinite_former=InfiniteFormerConfig(n_basis=8, widths=[0.1, 0.3],
                                                                                  n_samples=6))}[family]
    model = tiny(family, **kw)
    base = dump(model, root, kw["mem_len"])
    L = (len(raw) - 1) // 2
    # Rewrite every document before the one holding position j of each stream (same lengths).
    j = [int(starts[np.searchsorted(starts, b * L + 90)]) for b in range(2)]
    other = raw.copy()
    for b in range(2):
        other[b * L: j[b]] = np.random.default_rng(b).integers(0, N_TOKEN, j[b] - b * L)
    write_docs(tmp_path, other.astype("uint16"), starts)
    changed = dump(model, tmp_path, kw["mem_len"])
    for b in range(2):
        # targets x[p+1] for inputs p >= j (stream 0's last target x[L] is one that changed)
        keep = slice(j[b] - b * L, L - 1 if b == 0 else None)
        torch.testing.assert_close(changed[b, keep], base[b, keep], rtol=1e-5, atol=1e-5, equal_nan=True)
        assert not torch.allclose(changed[b, : j[b] - b * L - 1], base[b, : j[b] - b * L - 1], equal_nan=True)


# ----------------------------------------------------------------------------- prepare


def _prepare(tmp_path, *overrides):
    cfg = load_config(None, [f"data.output={tmp_path / 'shards'}", "data.workers=1", *overrides])
    prepare(cfg, progress=False)
    return tmp_path / "shards", cfg


def _all_starts(shards, split):
    manifest = Manifest.load(shards)
    tokens = SplitTokens(shards, manifest, split)
    flags = np.zeros(len(tokens), dtype=bool)
    tokens.flags(0, len(tokens), flags, None)
    ids = tokens.read(0, len(tokens))
    tokens.close()
    return manifest, ids, np.flatnonzero(flags)


def test_text_documents_record_their_starts(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {f"d{i:02d}.txt": "\n".join(sentences(40 + i, 3 + i % 4, lo=1)) + "\n" for i in range(30)}
    for name, text in texts.items():
        (docs / name).write_text(text)
    shards, cfg = _prepare(tmp_path, "data.corpus=text", f"data.path={docs}/*.txt", "tokenizer.kind=char",
                           "data.valid_fraction=0.2", "data.test_fraction=0.2", "data.chunk_tokens=64")
    manifest, ids, starts = _all_starts(shards, "train")
    assert manifest.documents and not manifest.sentences
    corpus = open_corpus(cfg.data)
    files = [p for u in corpus.plan()["train"] for p in u.pieces]
    tok = load_tokenizer(shards)
    lengths = [len(tok.encode(texts[p.path.rsplit("/", 1)[1]])) for p in files]
    assert starts.tolist() == np.cumsum([0] + lengths[:-1]).tolist()
    assert sum(s.documents for s in manifest.split("train").shards) == len(files)


def test_pg19_layout_books_as_documents(tmp_path):
    root = tmp_path / "pg19"
    books = {}
    for split, folder, n in (("train", "train", 6), ("valid", "validation", 2), ("test", "test", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            text = "\n".join(sentences(hash((split, i)) % 1000, 20, lo=2)) + "\n"
            (root / folder / f"{1000 + i}.txt").write_text(text)
            books.setdefault(split, []).append(text)
    (root / "metadata.csv").write_text("id,title\n")
    shards, _ = _prepare(tmp_path, "data.corpus=pg19", f"data.path={root}", "tokenizer.kind=word",
                         "data.unit_bytes=400")                 # books span several units
    for split, texts in books.items():
        manifest, ids, starts = _all_starts(shards, split)
        assert len(starts) == len(texts)
        # The README's word counts: whitespace-separated words of the books, from the manifest.
        assert manifest.split(split).text["words"] == sum(len(t.split()) for t in texts)
    (root / "validation" / "1000.txt").unlink()
    (root / "validation" / "1001.txt").unlink()
    with pytest.raises(Exception, match="validation holds no"):
        _prepare(tmp_path / "again", "data.corpus=pg19", f"data.path={root}")


def test_wt103_articles_are_recorded_only_when_asked_and_the_tokens_stay(tmp_path):
    root = make_wt103(tmp_path / "wt103")
    plain, _ = _prepare(tmp_path / "a", "data.corpus=wt103", f"data.path={root}")
    marked, _ = _prepare(tmp_path / "b", "data.corpus=wt103", f"data.path={root}", "data.wt103_articles=true")
    assert not Manifest.load(plain).boundaries
    for split in ("train", "valid", "test"):
        _, ids_a, _ = _all_starts(marked, split)
        tokens = SplitTokens(plain, Manifest.load(plain), split)
        assert np.array_equal(tokens.read(0, len(tokens)), ids_a)
        tokens.close()
        text = (root / f"wiki.{split}.tokens").read_text()
        lines = text.splitlines()
        # word tokens: each line's words + <eos>; an article opens at each ' = Title = ' line
        offsets = np.cumsum([0] + [len(line.split()) + 1 for line in lines[:-1]])
        titles = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = = ")]
        _, _, starts = _all_starts(marked, split)
        assert starts.tolist() == [int(offsets[i]) for i in titles]
    cfg = load_config(None, [f"data.output={plain}", "train.document_reset=true"])
    from pipeline.train import resolve_config
    with pytest.raises(ConfigError, match="record no document starts.*wt103_articles"):
        resolve_config(cfg, Manifest.load(plain), str(plain))


# ----------------------------------------------------------------------------- the sorting task


def reference_target(x: np.ndarray) -> list[int]:
    """The reference generator's rule, literally: Counter.most_common, then unseen ascending."""
    order = [s for s, _ in collections.Counter(x.tolist()).most_common()]
    return order + sorted(set(range(N_SYMBOLS)) - set(order))


def test_sort_targets_follow_the_reference_rule():
    rng = np.random.default_rng(0)
    for n in (1, 3, 7, 25, 200):
        for _ in range(40):
            x = rng.integers(0, N_SYMBOLS, n) if n > 7 else rng.integers(0, 6, n)
            assert sorted_symbols(x).tolist() == reference_target(x)
    for i in range(5):
        x, y = generate_sequence(500, 3, "valid", i)
        assert y.tolist() == reference_target(x)


def test_sort_sequences_drift_from_one_distribution_to_another():
    n, seed = 100_000, 1
    x, _ = generate_sequence(n, seed, "train", 0)
    # The documented seeding: p0, p1 are the first draw of SeedSequence([seed, split, index]).
    w = np.random.default_rng([seed, 0, 0]).integers(1, 10, size=(2, N_SYMBOLS)).astype(float)
    p0, p1 = w[0] / w[0].sum(), w[1] / w[1].sum()
    tenth = n // 10
    for lo, hi in ((0, tenth), (n - tenth, n)):
        empirical = np.bincount(x[lo:hi], minlength=N_SYMBOLS) / (hi - lo)
        expected = drift_weights(n, p0, p1)[lo:hi].mean(axis=0)
        assert 0.5 * np.abs(empirical - expected).sum() < 0.03
    first = np.bincount(x[:tenth], minlength=N_SYMBOLS) / tenth
    last = np.bincount(x[-tenth:], minlength=N_SYMBOLS) / tenth
    assert 0.5 * np.abs(first - last).sum() > 0.5 * 0.5 * np.abs(p0 - p1).sum()


def _sort_shards(tmp_path, workers: int, per_unit: int):
    return _prepare(tmp_path, "data.corpus=sort", "data.sort_length=60", "data.sort_sequences=[9,4,3]",
                    f"data.sort_unit_sequences={per_unit}", f"data.workers={workers}", "data.chunk_tokens=100")[0]


def _digest(shards) -> dict:
    manifest = Manifest.load(shards)
    out = {}
    for split in ("train", "valid", "test"):
        tokens = SplitTokens(shards, manifest, split)
        starts, scored = np.zeros(len(tokens), bool), np.zeros(len(tokens), bool)
        tokens.flags(0, len(tokens), starts, scored)
        out[split] = (tokens.read(0, len(tokens)).tolist(), np.flatnonzero(starts).tolist(),
                      np.flatnonzero(scored).tolist())
        tokens.close()
    return out


def test_sort_shards_are_deterministic_and_mark_the_answers(tmp_path):
    one = _sort_shards(tmp_path / "w1", workers=1, per_unit=4)
    two = _sort_shards(tmp_path / "w2", workers=2, per_unit=4)
    for name in ("manifest.json", "train/shard-000000.tar", "train/shard-000002.tar"):
        assert hashlib.sha256((one / name).read_bytes()).digest() == hashlib.sha256((two / name).read_bytes()).digest()
    # Another grouping into units: other shards, the same sequences, starts and answers.
    regrouped = _sort_shards(tmp_path / "u3", workers=1, per_unit=3)
    assert _digest(regrouped) == _digest(one)
    manifest = Manifest.load(one)
    assert manifest.scored and manifest.documents and manifest.tokenizer["vocab_size"] == 22
    for split, count in (("train", 9), ("valid", 4)):
        ids, starts, scored = _digest(one)[split]
        size = 60 + 1 + N_SYMBOLS
        assert starts == [i * size for i in range(count)]
        assert scored == [i * size + 61 + k for i in range(count) for k in range(N_SYMBOLS)]
        for i in range(count):
            x, y = generate_sequence(60, 0, split, i)
            assert ids[i * size: (i + 1) * size] == x.tolist() + [SEP] + y.tolist()
    tok = load_tokenizer(one)
    assert tok.decode([3, SEP, 21]) == "3 <sep> <pad>"


def test_sort_streams_score_only_the_answers(tmp_path):
    shards = _sort_shards(tmp_path, workers=1, per_unit=4)
    streams = open_streams(shards, "valid", n_streams=1, tgt_len=16, drop_last=False)
    n_scored = 0
    for batch in streams:
        doc_start, weights = batch.masks(document_reset=True)
        assert torch.equal(doc_start, batch.starts[:, :-1])
        assert torch.equal(weights, batch.scored & ~batch.starts[:, 1:])
        n_scored += int(weights.sum())
    streams.close()
    assert n_scored == 4 * N_SYMBOLS


def test_document_reset_needs_shards_with_starts(tmp_path):
    raw = np.arange(200, dtype="uint16") % N_TOKEN
    Manifest("test", {"kind": "word", "vocab_size": N_TOKEN}, "uint16", 64, False,
             {"valid": SplitInfo([write_shard(tmp_path, "valid", 0, raw, 64, "uint16")])}).save(tmp_path)
    streams = open_streams(tmp_path, "valid", n_streams=2, tgt_len=8)
    batch = next(streams)
    assert batch.starts is None and batch.masks(document_reset=False) == (None, None)
    with pytest.raises(StreamError, match="document_reset needs shards"):
        batch.masks(document_reset=True)
    with pytest.raises(ShardError, match="records no sentence or document starts"):
        streams.tokens.sentence_starts(0)
    streams.close()
