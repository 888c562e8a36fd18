"""prepare: shards equal direct (reference-style) encoding; re-runs, worker counts and job arrays
give byte-identical files; bad input gives clear errors and leaves nothing half-written."""
from __future__ import annotations

import hashlib
import json
import logging
import string
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.corpora import CorpusError
from pipeline.data.shards import ShardError, ShardReader
from pipeline.data.tokenizers import TokenizerError, load_tokenizer
from pipeline.prepare import PrepareError, main, prepare

from corpus_fixtures import make_bytes_file, make_lm1b, make_ptb, make_text, make_wt103, ref_encode, ref_vocab
from train_fixtures import split_tokens

SPLITS = ("train", "valid", "test")


def config(out: Path, *overrides: str):
    return load_config(None, [f"data.output={out}", *overrides])


def file_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:  # exactly how the reference reads a corpus file
        return list(f)


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def wt103(tmp_path):
    return make_wt103(tmp_path / "wikitext-103")


def wt103_cfg(root, out, *extra):
    return config(out, "data.corpus=wt103", f"data.path={root}", "data.unit_bytes=700", "data.chunk_tokens=50",
                  *extra)


def test_wt103_shards_equal_reference_encoding(wt103, tmp_path):
    out = tmp_path / "shards"
    manifest = prepare(wt103_cfg(wt103, out), workers=1)
    symbols = ref_vocab(file_lines(wt103 / "wiki.train.tokens"), ["<eos>"])
    for split in SPLITS:
        expect = ref_encode(file_lines(wt103 / f"wiki.{split}.tokens"), symbols)
        assert split_tokens(out, split).tolist() == expect
        info = manifest.splits[split]
        assert info.total_tokens == len(expect)
        assert all(c <= 50 for s in info.shards for c in s.chunks)
    assert len(manifest.splits["train"].shards) > 2
    tok = manifest.tokenizer
    assert tok["kind"] == "word" and tok["vocab_size"] == len(symbols) and manifest.dtype == "uint16"
    assert tok["special"] == {"eos": 0, "unk": symbols.index("<unk>")}
    assert manifest.options["tokenizer"]["count_on"] == ["train"]
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["splits"]["test"]["total_tokens"] == manifest.splits["test"].total_tokens
    # the tokenizer later stages load decodes the shards back to the words
    loaded = load_tokenizer(out)
    assert loaded.decode(split_tokens(out, "test")).split() == \
        [w for line in file_lines(wt103 / "wiki.test.tokens") for w in line.split()]
    # and webdataset reads the same tokens, in order
    import webdataset as wds
    urls = [str(out / s.file) for s in manifest.splits["train"].shards]
    ds = wds.WebDataset(urls, shardshuffle=False).decode()
    got = np.concatenate([sample["tokens.npy"] for sample in ds])
    assert got.tolist() == split_tokens(out, "train").tolist()


def test_ptb_vocab_over_all_splits_lower_cased(tmp_path):
    root = make_ptb(tmp_path / "ptb")
    out = tmp_path / "shards"
    prepare(config(out, "data.corpus=ptb", f"data.path={root}"), workers=1)
    lines = {s: file_lines(root / f"ptb.{s}.txt") for s in SPLITS}
    symbols = ref_vocab(lines["train"] + lines["valid"] + lines["test"], ["<eos>"], lower_case=True)
    assert load_tokenizer(out).symbols == symbols
    for split in SPLITS:
        assert split_tokens(out, split).tolist() == ref_encode(lines[split], symbols, lower_case=True)


@pytest.mark.parametrize("vocab_file", [True, False])
def test_lm1b_sentences(tmp_path, vocab_file):
    root = make_lm1b(tmp_path / "lm1b", vocab=vocab_file)
    out = tmp_path / "shards"
    manifest = prepare(config(out, "data.corpus=lm1b", f"data.path={root}", "data.chunk_tokens=40"), workers=2)
    base = root / "1-billion-word-language-modeling-benchmark-r13output"
    train_files = sorted((base / "training-monolingual.tokenized.shuffled").iterdir())
    if vocab_file:
        symbols = [line.split()[0] for line in file_lines(root / "1b_word_vocab.txt")]
    else:
        symbols = ref_vocab([l for f in train_files for l in file_lines(f)], ["<S>", "<UNK>"])
    assert load_tokenizer(out).symbols == symbols
    sym2idx = {s: i for i, s in enumerate(symbols)}
    assert manifest.sentences and manifest.tokenizer["special"] == {"bos": sym2idx["<S>"], "unk": sym2idx["<UNK>"]}
    files = {"train": train_files,
             "valid": [base / "heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-of-00050"],
             "test": [base / "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050"]}
    for split in SPLITS:
        # reference: each sentence ['<S>'] + words + ['<S>'], unknown words -> <UNK>; stored as <S> w1 .. wn
        sents = [[sym2idx.get(w, sym2idx["<UNK>"]) for w in ["<S>"] + line.split()]
                 for f in files[split] for line in file_lines(f)]
        assert split_tokens(out, split).tolist() == [t for s in sents for t in s]
        starts = []
        info = manifest.splits[split]
        offset = 0
        for shard in info.shards:
            reader = ShardReader(out, shard, manifest.dtype, sentences=True)
            for c, n in enumerate(shard.chunks):
                starts += (reader.starts(c) + offset).tolist()
                offset += n
            reader.close()
        assert starts == list(np.cumsum([0] + [len(s) for s in sents[:-1]]))
        assert sum(s.sentences for s in info.shards) == len(sents)
    if vocab_file:  # the fixture vocabulary lacks one word: it became <UNK>
        assert (split_tokens(out, "train") == sym2idx["<UNK>"]).any()


@pytest.mark.parametrize("keep", [True, False])
def test_enwik8_bytes(tmp_path, keep):
    path = make_bytes_file(tmp_path / "enwik8" / "enwik8", 3000)
    out = tmp_path / "shards"
    manifest = prepare(config(out, "data.corpus=enwik8", f"data.path={path.parent}", "tokenizer.kind=byte",
                              "data.valid_bytes=500", "data.test_bytes=400", "data.unit_bytes=1000",
                              "data.chunk_tokens=256", f"data.keep_newline={str(keep).lower()}"), workers=2)
    raw = path.read_bytes()
    parts = {"train": raw[:2100], "valid": raw[2100:2600], "test": raw[2600:]}
    for split in SPLITS:
        expect = parts[split] if keep else parts[split].replace(b"\n", b"")
        assert split_tokens(out, split).astype(np.uint8).tobytes() == expect
    assert manifest.tokenizer["vocab_size"] == 256 and manifest.dtype == "uint16"
    assert manifest.options["corpus"]["keep_newline"] is keep
    assert manifest.options["corpus"]["splits"] == {"train": [0, 2100], "valid": [2100, 2600], "test": [2600, 3000]}
    with pytest.raises(PrepareError, match="tokenizer.kind='word' does not fit data.corpus='enwik8'"):
        prepare(config(out, "data.corpus=enwik8", f"data.path={path}", "data.valid_bytes=5", "data.test_bytes=5"))


def test_text8_chars(tmp_path):
    path = make_bytes_file(tmp_path / "text8", 2000, seed=3, alphabet=(" " + string.ascii_lowercase).encode())
    out = tmp_path / "shards"
    prepare(config(out, "data.corpus=text8", f"data.path={path}", "tokenizer.kind=char", "data.valid_bytes=300",
                   "data.test_bytes=300", "data.unit_bytes=512"), workers=1)
    text = path.read_text()
    tok = load_tokenizer(out)
    # reference: counted over train+valid+test, most common first
    assert tok.symbols == [c for c, _ in Counter(text).most_common()] and tok.vocab_size == 27
    assert tok.decode(split_tokens(out, "test")) == text[-300:]
    assert [tok.symbols[i] for i in split_tokens(out, "train")] == list(text[:1400])


def test_text_corpus_sentencepiece_documents(tmp_path):
    root = make_text(tmp_path / "mine")
    out = tmp_path / "shards"
    cfg = config(out, "data.corpus=text", f"data.path={root}/docs/**/*.txt,{root}/docs/*.jsonl", "data.text_field=body",
                 "data.valid_fraction=0.2", "data.test_fraction=0.2", "data.unit_bytes=600",
                 "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300")
    manifest = prepare(cfg, workers=2)
    tok = load_tokenizer(out)
    assert manifest.tokenizer["special"]["eos"] == tok.eos_id == tok.doc_end
    from pipeline.data.corpora import open_corpus
    corpus = open_corpus(cfg.data)
    plan = corpus.plan()
    for split in SPLITS:
        docs = [d for u in plan[split] for d, _, _ in corpus.read_documents(u)]
        ids = split_tokens(out, split)
        # documents end with </s>; between them the text decodes exactly
        bounds = np.flatnonzero(ids == tok.eos_id)
        assert len(bounds) == len(docs)
        pieces = np.split(ids, bounds + 1)[:-1]
        assert [tok.decode(p) for p in pieces] == docs


def test_text_corpus_word_vocab(tmp_path):
    import io
    root = make_text(tmp_path / "mine")
    out = tmp_path / "shards"
    cfg = config(out, "data.corpus=text", f"data.path={root}/docs/**/*.txt,{root}/docs/*.jsonl", "data.text_field=body",
                 "data.valid_fraction=0.2", "data.test_fraction=0.2", "data.unit_bytes=700")
    prepare(cfg, workers=2)
    from pipeline.data.corpora import open_corpus
    corpus = open_corpus(cfg.data)
    plan = corpus.plan()
    lines = {s: list(io.StringIO("".join(d for u in plan[s] for d, _, _ in corpus.read_documents(u)), newline=None))
             for s in SPLITS}
    symbols = ref_vocab(lines["train"], ["<eos>", "<unk>"])
    assert load_tokenizer(out).symbols == symbols
    for split in SPLITS:
        assert split_tokens(out, split).tolist() == ref_encode(lines[split], symbols, unk="<unk>")


def test_stdlib_sentencepiece(tmp_path):
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"]) / "json"
    out = tmp_path / "shards"
    manifest = prepare(config(out, "data.corpus=stdlib", f"data.path={root}", "data.valid_fraction=0.3",
                              "data.test_fraction=0.3", "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=400"),
                       workers=1)
    tok = load_tokenizer(out)
    text = tok.decode(split_tokens(out, "train"))
    some = [p for p in sorted(root.glob("*.py")) if p.read_text() in text]
    assert some and manifest.corpus == "stdlib"


def test_rerun_is_byte_identical_and_worker_count_invariant(wt103, tmp_path, caplog):
    out = tmp_path / "shards"
    prepare(wt103_cfg(wt103, out), workers=1)
    first = tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    with caplog.at_level(logging.INFO, logger="xlpipe.prepare"):
        prepare(wt103_cfg(wt103, out), workers=2)  # verifies and keeps everything
    assert "0 shards written" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == mtimes
    assert tree_digest(out) == first
    prepare(wt103_cfg(wt103, out), workers=2, force=True)  # rebuilt by 2 workers
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} != mtimes
    assert tree_digest(out) == first
    other = tmp_path / "other"
    prepare(wt103_cfg(wt103, other), workers=2)
    assert tree_digest(other) == first


@pytest.mark.parametrize("corpus", ["wt103", "text"])
def test_job_array_and_merge_equal_a_single_run(tmp_path, corpus):
    if corpus == "wt103":
        root = make_wt103(tmp_path / "wt")
        cfg = lambda out: wt103_cfg(root, out)  # noqa: E731
    else:
        root = make_text(tmp_path / "mine")
        cfg = lambda out: config(out, "data.corpus=text", f"data.path={root}/docs/**/*,", "data.text_field=body",  # noqa: E731
                                 "data.valid_fraction=0.2", "data.test_fraction=0.2", "data.unit_bytes=500",
                                 "tokenizer.kind=sentencepiece", "tokenizer.vocab_size=300")
    single, array = tmp_path / "single", tmp_path / "array"
    prepare(cfg(single), workers=2)
    with pytest.raises(PrepareError, match="tokenizer in .* is missing.*--stage tokenizer"):
        prepare(cfg(array), task_id=1, num_tasks=3)  # only task 0 builds it; no wait asked
    assert prepare(cfg(array), stage="tokenizer", workers=2) is None
    for t in (2, 0):
        assert prepare(cfg(array), task_id=t, num_tasks=3, workers=1) is None
    with pytest.raises(ShardError, match=r"shard\(s\) not ready: .*shard-\d+.tar: missing"):
        prepare(cfg(array), stage="merge")
    assert not (array / "manifest.json").exists()
    prepare(cfg(array), task_id=1, num_tasks=3, workers=2)
    manifest = prepare(cfg(array), stage="merge")
    assert manifest is not None and tree_digest(array) == tree_digest(single)


def test_array_tasks_wait_for_task_0_to_build_the_tokenizer(wt103, tmp_path):
    import threading
    out = tmp_path / "array"
    errors = []

    def task(t, *extra):
        try:
            prepare(wt103_cfg(wt103, out, *extra), task_id=t, num_tasks=2, workers=1, tokenizer_wait=60)
        except Exception as exc:  # noqa: BLE001  (checked below)
            errors.append(exc)

    # task 0 fails to build (a vocabulary too large for the corpus): the waiting task fails too, soon
    bad = ("tokenizer.kind=sentencepiece", "tokenizer.vocab_size=100000")
    waiter = threading.Thread(target=task, args=(1, *bad))
    waiter.start()
    t0 = time.monotonic()
    task(0, *bad)
    waiter.join(30)
    assert time.monotonic() - t0 < 30 and not waiter.is_alive()
    assert isinstance(errors[0], TokenizerError) and "vocab_size=100000" in str(errors[0])
    assert isinstance(errors[1], PrepareError) and "task 0 failed to build the tokenizer" in str(errors[1])
    errors.clear()
    # now task 1 starts first, waits, and goes on once task 0 has built it
    waiter = threading.Thread(target=task, args=(1,))
    waiter.start()
    time.sleep(0.3)
    task(0)
    waiter.join(60)
    assert not errors
    single = tmp_path / "single"
    prepare(wt103_cfg(wt103, single), workers=1)
    prepare(wt103_cfg(wt103, out), stage="merge")
    assert {k: v for k, v in tree_digest(out).items() if k != "tokenizer.failed.json"} == tree_digest(single)


def test_task_ranges_are_disjoint_and_cover(wt103):
    from pipeline.data.corpora import open_corpus
    from pipeline.prepare import task_units
    cfg = load_config(None, ["data.corpus=wt103", f"data.path={wt103}", "data.unit_bytes=300"])
    plan = open_corpus(cfg.data).plan()
    every = [(u.split, u.index) for s in SPLITS for u in plan[s]]
    for n in (1, 2, 3, 7, 50):
        got = [(u.split, u.index) for t in range(n) for u in task_units(plan, t, n)]
        assert got == every


def test_corrupt_shard_detected_rebuilt_and_named(wt103, tmp_path, caplog):
    out = tmp_path / "shards"
    manifest = prepare(wt103_cfg(wt103, out), workers=1)
    before = tree_digest(out)
    info = manifest.splits["train"].shards[1]
    tar = out / info.file
    tar.write_bytes(tar.read_bytes()[:-1024])  # truncated
    with pytest.raises(ShardError, match=info.file.split("/")[1]):
        ShardReader(out, info, manifest.dtype)
    with pytest.raises(ShardError, match=rf"{info.file}: corrupt"):
        prepare(wt103_cfg(wt103, out), stage="merge")
    other = out / manifest.splits["valid"].shards[0].file
    data = bytearray(other.read_bytes())
    data[600] ^= 0xFF
    other.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="xlpipe.prepare"):
        prepare(wt103_cfg(wt103, out), workers=2)
    assert "corrupt" in caplog.text and "rebuilding" in caplog.text
    assert tree_digest(out) == before


def test_tokenizer_mismatch(wt103, tmp_path):
    out = tmp_path / "shards"
    prepare(wt103_cfg(wt103, out), workers=1)
    before = tree_digest(out)
    tj = out / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<eos>"', '"<EOS>"', 1))
    with pytest.raises(TokenizerError, match="tokenizer.json does not match the sha256"):
        load_tokenizer(out)
    with pytest.raises(PrepareError, match="changed after it was built"):
        prepare(wt103_cfg(wt103, out), task_id=1, num_tasks=2)  # task 0 would rebuild it
    prepare(wt103_cfg(wt103, out), workers=1)  # a single run rebuilds it (same inputs: same bytes)
    assert tree_digest(out) == before
    # another tokenizer option: rebuilt, and every shard with it
    m = prepare(wt103_cfg(wt103, out, "tokenizer.lower_case=true"), workers=1)
    assert m.options["tokenizer"]["lower_case"] is True
    assert all(w == w.lower() for w in load_tokenizer(out).symbols)


def test_failure_leaves_nothing_half_written(wt103, tmp_path):
    path = wt103 / "wiki.test.tokens"
    raw = path.read_bytes()
    path.write_bytes(raw[:100] + b"\xc3\x28" + raw[100:])
    out = tmp_path / "shards"
    with pytest.raises(CorpusError, match=r"wiki.test.tokens: invalid UTF-8 at byte offset 100"):
        prepare(wt103_cfg(wt103, out), workers=2)
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    for side in out.rglob("shard-*.json"):  # what was written is complete and verifies
        rec = json.loads(side.read_text())
        assert hashlib.sha256(side.with_suffix(".tar").read_bytes()).hexdigest() == rec["shard"]["sha256"]
    m = prepare(wt103_cfg(wt103, out, "data.errors=replace"), workers=1)
    assert m.options["corpus"]["errors"] == "replace"


def test_unknown_word_without_unk_names_file_and_line(tmp_path):
    root = tmp_path / "wt"
    root.mkdir()
    (root / "wiki.train.tokens").write_text("a b\nb c\n")
    (root / "wiki.valid.tokens").write_text("a\n\nc zebra\n")
    (root / "wiki.test.tokens").write_text("a\n")
    with pytest.raises(CorpusError, match=r"wiki.valid.tokens, line 3: 'zebra' is not in the vocabulary"):
        prepare(config(tmp_path / "out", "data.corpus=wt103", f"data.path={root}"), workers=1)
    m = prepare(config(tmp_path / "out", "data.corpus=wt103", f"data.path={root}", "tokenizer.count_on=all"), workers=1)
    assert m.tokenizer["vocab_size"] == 5


def test_stale_shards_removed_when_the_plan_shrinks(wt103, tmp_path):
    out = tmp_path / "shards"
    many = prepare(wt103_cfg(wt103, out, "data.unit_bytes=300"), workers=1)
    few = prepare(wt103_cfg(wt103, out, "data.unit_bytes=100000"), workers=1)
    assert len(many.splits["train"].shards) > len(few.splits["train"].shards) == 1
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    single = tmp_path / "single"
    prepare(wt103_cfg(wt103, single, "data.unit_bytes=100000"), workers=1)
    assert tree_digest(single) == tree_digest(out)


def test_cli_slurm_array_env_and_errors(wt103, tmp_path, monkeypatch, caplog):
    out = tmp_path / "shards"
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"data:\n  corpus: wt103\n  path: {wt103}\n  output: {out}\n  unit_bytes: 700\n")
    assert main(["--config", str(yaml), "--stage", "tokenizer"]) == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    for task in ("1", "2"):  # --array=1-2
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        assert main(["--config", str(yaml)]) == 0
        assert not (out / "manifest.json").exists()
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert main(["--config", str(yaml), "--merge"]) == 0
    single = tmp_path / "single"
    assert main(["--config", str(yaml), f"data.output={single}", "--workers", "2"]) == 0
    assert tree_digest(single) == tree_digest(out)
    with caplog.at_level(logging.ERROR, logger="xlpipe.prepare"):
        assert main(["--config", str(yaml), f"data.path={tmp_path / 'missing'}"]) == 1
    assert "expected wiki.train.tokens" in caplog.text and "missing (data.path)" in caplog.text



def test_a_failed_first_prepare_leaves_no_output_and_a_file_is_refused(tmp_path):
    out = tmp_path / "shards"
    with pytest.raises(CorpusError):
        prepare(config(out, "data.corpus=wt103", f"data.path={tmp_path / 'absent'}"))
    assert not out.exists()
    out.write_text("a file of mine")
    with pytest.raises(PrepareError, match="data.output=.*shards is a file"):
        prepare(config(out, "data.corpus=wt103", f"data.path={tmp_path / 'absent'}"))
    assert out.read_text() == "a file of mine"
