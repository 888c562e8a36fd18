"""Corpus readers on generated fixtures in each corpus's exact layout."""
from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pipeline.config import DataConfig
from pipeline.data.corpora import SPLITS, CorpusError, open_corpus, text8_normalise
from pipeline.data.corpora.base import hash_split, line_boundaries

from corpus_fixtures import LM1B_TOP, make_bytes_file, make_lm1b, make_ptb, make_text, make_wt103

REPO = Path(__file__).resolve().parents[1]


def data(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_line_boundaries_cover_file_and_cut_after_newlines(tmp_path):
    path = tmp_path / "f.txt"
    raw = b"".join(b"x" * (i % 37) + b"\n" for i in range(200)) + b"tail without newline"
    path.write_bytes(raw)
    for ub in (1, 10, 64, 1000, 10 ** 6):
        cuts = line_boundaries(str(path), 0, len(raw), ub)
        assert cuts[0] == 0 and cuts[-1] == len(raw) and cuts == sorted(set(cuts))
        assert all(raw[c - 1:c] == b"\n" for c in cuts[1:-1])
        # naive: the first newline at or after every multiple of ub, one past it, deduplicated
        expect = set()
        for m in range(ub, len(raw), ub):
            nl = raw.find(b"\n", m)
            if 0 <= nl < len(raw) - 1:
                expect.add(nl + 1)
        assert cuts == [0] + sorted(expect) + [len(raw)]
    assert line_boundaries(str(path), 0, len(raw), 10) != line_boundaries(str(path), 0, len(raw), 11)


@pytest.mark.parametrize("names", [("wiki.{}.tokens",), ("{}.txt",)])
def test_wt103_layouts_units_and_text(tmp_path, names):
    root = make_wt103(tmp_path / "wikitext-103", names)
    corpus = open_corpus(data(corpus="wt103", path=str(root), unit_bytes=300))
    plan = corpus.plan()
    for split in SPLITS:
        path = root / names[0].format(split)
        raw = path.read_text(encoding="utf-8")
        units = plan[split]
        assert [u.index for u in units] == list(range(len(units)))
        assert len(units) > 1
        text = "".join(corpus.read_text(u) for u in units)
        assert text == (raw if raw.endswith("\n") else raw + "\n")  # unterminated last line gets its end
        assert all(corpus.read_text(u).endswith("\n") for u in units)


def test_wt103_missing_files_name_what_and_where(tmp_path):
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / "wiki.train.tokens").write_text("a\n")
    with pytest.raises(CorpusError) as exc:
        open_corpus(data(corpus="wt103", path=str(tmp_path / "wt"))).plan()
    msg = str(exc.value)
    assert "wiki.valid.tokens or valid.txt" in msg and "wiki.test.tokens or test.txt" in msg
    assert str((tmp_path / "wt").resolve()) in msg and "README.md" in msg and "WikiText-103" in msg
    with pytest.raises(CorpusError, match="data.path is empty"):
        open_corpus(data(corpus="wt103"))


def test_empty_split_is_an_error(tmp_path):
    root = make_wt103(tmp_path / "wt")
    (root / "wiki.valid.tokens").write_text("")
    with pytest.raises(CorpusError, match=r"split 'valid' is empty.*wiki.valid.tokens"):
        open_corpus(data(corpus="wt103", path=str(root))).plan()


def test_non_utf8_names_file_and_offset_unless_replace(tmp_path):
    root = make_wt103(tmp_path / "wt")
    path = root / "wiki.valid.tokens"
    raw = path.read_bytes()
    bad_at = raw.index(b"\n", len(raw) // 2) + 3
    path.write_bytes(raw[:bad_at] + b"\xff\xfe" + raw[bad_at:])
    corpus = open_corpus(data(corpus="wt103", path=str(root), unit_bytes=64))
    units = corpus.plan()["valid"]
    expected = rf"wiki.valid.tokens: invalid UTF-8 at byte offset {bad_at} .*data.errors=replace"
    with pytest.raises(CorpusError, match=expected):
        for u in units:
            corpus.read_text(u)
    lenient = open_corpus(data(corpus="wt103", path=str(root), unit_bytes=64, errors="replace"))
    text = "".join(lenient.read_text(u) for u in lenient.plan()["valid"])
    assert "\ufffd\ufffd" in text


def test_ptb_layout(tmp_path):
    root = make_ptb(tmp_path / "ptb")
    corpus = open_corpus(data(corpus="ptb", path=str(root)))
    plan = corpus.plan()
    assert corpus.read_text(plan["train"][0]) == (root / "ptb.train.txt").read_text()
    d = corpus.tokenizer_defaults()
    assert d.lower_case and d.count_on == SPLITS and d.eos == "<eos>"


def test_lm1b_layout_splits_and_vocab(tmp_path):
    make_lm1b(tmp_path / "lm1b")
    for path in (tmp_path / "lm1b", tmp_path / "lm1b" / LM1B_TOP):  # the parent or the r13output dir
        corpus = open_corpus(data(corpus="lm1b", path=str(path)))
        plan = corpus.plan()
        assert [Path(u.pieces[0].path).name for u in plan["train"]] == \
            [f"news.en-{i:05d}-of-00100" for i in (1, 2, 3)]
        assert Path(plan["test"][0].pieces[0].path).name == "news.en.heldout-00000-of-00050"
        assert Path(plan["valid"][0].pieces[0].path).name == "news.en.heldout-00001-of-00050"
    assert corpus.tokenizer_defaults().vocab_file == str(tmp_path / "lm1b" / "1b_word_vocab.txt")
    other = open_corpus(data(corpus="lm1b", path=str(tmp_path / "lm1b"), lm1b_valid_shard=2)).plan()
    assert Path(other["valid"][0].pieces[0].path).name == "news.en.heldout-00002-of-00050"
    with pytest.raises(CorpusError, match="heldout-00000, the test set"):
        open_corpus(data(corpus="lm1b", path=str(tmp_path / "lm1b"), lm1b_valid_shard=0)).plan()
    with pytest.raises(CorpusError, match=r"heldout-00049-of-00050.*One Billion Word"):
        open_corpus(data(corpus="lm1b", path=str(tmp_path / "lm1b"), lm1b_valid_shard=49)).plan()
    with pytest.raises(CorpusError, match="training-monolingual.tokenized.shuffled"):
        open_corpus(data(corpus="lm1b", path=str(tmp_path))).plan()


def test_enwik8_reference_split_on_the_real_size(tmp_path):
    path = tmp_path / "enwik8"
    with open(path, "wb") as f:  # sparse 100,000,000-byte file: the split is computed, not read
        f.truncate(100_000_000)
    corpus = open_corpus(data(corpus="enwik8", path=str(tmp_path), unit_bytes=1 << 24))
    assert corpus.split_ranges() == {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000),
                                     "test": (95_000_000, 100_000_000)}
    plan = corpus.plan()
    assert sum(u.nbytes for u in plan["train"]) == 90_000_000
    assert [u.nbytes for u in plan["valid"]] == [5_000_000]


def test_enwik8_small_file_needs_explicit_split_and_keeps_newlines(tmp_path):
    path = make_bytes_file(tmp_path / "enwik8", 1000)
    with pytest.raises(CorpusError, match="1,000 bytes, not the reference 100,000,000.*data.valid_bytes"):
        open_corpus(data(corpus="enwik8", path=str(path))).plan()
    raw = path.read_bytes()
    for keep in (True, False):
        corpus = open_corpus(data(corpus="enwik8", path=str(path), valid_bytes=100, test_bytes=50,
                                  unit_bytes=128, keep_newline=keep))
        plan = corpus.plan()
        got = {s: b"".join(corpus.read_bytes(u) for u in plan[s]) for s in SPLITS}
        expect = {"train": raw[:850], "valid": raw[850:950], "test": raw[950:]}
        if not keep:
            expect = {s: v.replace(b"\n", b"") for s, v in expect.items()}
        assert got == expect
        assert (b"\n" in got["train"]) == keep


def test_text8_layout(tmp_path):
    path = make_bytes_file(tmp_path / "text8", 500, alphabet=b" abcdefghijklmnopqrstuvwxyz")
    corpus = open_corpus(data(corpus="text8", path=str(tmp_path), valid_bytes=40, test_bytes=60, unit_bytes=100))
    plan = corpus.plan()
    assert "".join(corpus.read_text(u) for u in plan["test"]) == path.read_text()[-60:]
    assert len(plan["train"]) == 4
    with pytest.raises(CorpusError, match=r"raw text8 file.*README.md.*text8"):
        open_corpus(data(corpus="text8", path=str(tmp_path / "nope"))).plan()


def naive_text8(text: str) -> str:
    """wikifil.pl's last steps, char by char."""
    digits = "zero one two three four five six seven eight nine".split()
    s = []
    for ch in " " + text + " ":
        if "A" <= ch <= "Z":
            s.append(ch.lower())
        elif "a" <= ch <= "z":
            s.append(ch)
        elif "0" <= ch <= "9":
            s.append(" " + digits[int(ch)] + " ")
        else:
            s.append(" ")
    out = "".join(s)
    while "  " in out:
        out = out.replace("  ", " ")
    return out[:-1]


def test_text8_normaliser():
    assert text8_normalise("Hello, World! In 1984 (or 20).") == " hello world in one nine eight four or two zero"
    assert text8_normalise("Ünïcode café\n\nNEW line\t") == " n code caf new line"
    assert text8_normalise("") == "" and text8_normalise("!!!") == ""
    for text in ["a\nb", "  Mixed CASE 42  text\r\nwith\u2028breaks 7", "x" * 5 + "9" * 3]:
        assert text8_normalise(text) == naive_text8(text)
        assert set(text8_normalise(text)) <= set(" abcdefghijklmnopqrstuvwxyz")


def test_text8_normalise_cli(tmp_path):
    src, dst = tmp_path / "in.txt", tmp_path / "out" / "text8"
    src.write_text("The 2 Towers\nby Tolkien.\n")
    subprocess.run([sys.executable, "-m", "pipeline.data.corpora", "text8-normalise", str(src), str(dst)],
                   check=True, cwd=REPO, capture_output=True)
    assert dst.read_text() == " the two towers by tolkien"


def test_text_globs_jsonl_and_hash_split(tmp_path):
    root = make_text(tmp_path)
    globs = f"{root}/docs/**/*.txt,{root}/docs/*.jsonl"
    corpus = open_corpus(data(corpus="text", path=globs, unit_bytes=400, valid_fraction=0.2,
                              test_fraction=0.2, text_field="body"))
    plan = corpus.plan()
    keys = dict((str(p), k) for p, k in corpus.sources())
    assert "sub/doc000.txt" in keys.values() and "records.jsonl" in keys.values()
    seen = {}
    for split in SPLITS:
        for unit in plan[split]:
            for piece in unit.pieces:
                if piece.path.endswith(".txt"):
                    assert hash_split(keys[piece.path], 0.2, 0.2) == split
                    seen[piece.path] = split
    assert len(seen) == 40  # every text file in exactly one split
    # every JSONL record lands in exactly one split, by its key
    import json
    recs = {s: [d for u in plan[s] for d, _, end in corpus.read_documents(u)
                if u.pieces and any(p.path.endswith(".jsonl") for p in u.pieces)] for s in SPLITS}
    bodies = [json.loads(l)["body"] + "\n" for l in (root / "docs" / "records.jsonl").read_text().splitlines()]
    got = [d for s in SPLITS for d in recs[s] if d in bodies]
    assert sorted(got) == sorted(b for b in bodies if b != "\n")
    assert all(recs[s] for s in SPLITS)


def test_text_bad_jsonl_and_missing_globs(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"txt": "no field"}\n')
    corpus = open_corpus(data(corpus="text", path=str(tmp_path / "*.jsonl"), valid_fraction=0.0, test_fraction=0.0))
    from pipeline.data.corpora.base import Piece, Unit
    size = (tmp_path / "a.jsonl").stat().st_size
    unit = Unit("train", 0, (Piece(str(tmp_path / "a.jsonl"), 0, size, size),))
    with pytest.raises(CorpusError, match=r"a.jsonl: the record at byte offset 15 has no string field 'text'"):
        corpus.read_documents(unit)
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{not json\n')
    size = (tmp_path / "b.jsonl").stat().st_size
    unit = Unit("train", 0, (Piece(str(tmp_path / "b.jsonl"), 0, size, size),))
    with pytest.raises(CorpusError, match=r"b.jsonl: invalid JSON in the record at byte offset 15"):
        corpus.read_documents(unit)
    with pytest.raises(CorpusError, match=r"glob .*nothing\*.txt.* matches no files"):
        open_corpus(data(corpus="text", path=str(tmp_path / "nothing*.txt"))).plan()
    (tmp_path / "only.txt").write_text("one document\n")
    with pytest.raises(CorpusError, match=r"split 'valid' is empty: no file hashed to it"):
        open_corpus(data(corpus="text", path=str(tmp_path / "only.txt"), valid_fraction=0.0)).plan()


def test_stdlib_corpus_files_and_stable_split():
    corpus = open_corpus(data(corpus="stdlib"))
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = corpus.sources()
    keys = [k for _, k in sources]
    assert "os.py" in keys and "json/decoder.py" in keys
    assert not any(re.search(r"(^|/)(site-packages|test|tests|idle_test)/", k) for k in keys)
    expect = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                    if not {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
                    & set(p.relative_to(root).parts[:-1]))
    assert keys == expect
    plan = corpus.plan()
    files = {s: {corpus._rel(p.path) for u in plan[s] for p in u.pieces} for s in SPLITS}
    assert set().union(*files.values()) == set(keys)
    assert sum(len(f) for f in files.values()) == len(keys)
    for s in SPLITS:
        assert all(hash_split(k, 0.02, 0.02) == s for k in files[s])
    assert all(u.nbytes <= corpus.cfg.unit_bytes or len(u.pieces) == 1 for s in SPLITS for u in plan[s])


def test_hash_split_fractions_are_respected():
    keys = [f"dir/file{i}.txt" for i in range(20000)]
    counts = {s: sum(hash_split(k, 0.1, 0.05) == s for k in keys) for s in SPLITS}
    assert abs(counts["valid"] / 20000 - 0.1) < 0.01 and abs(counts["test"] / 20000 - 0.05) < 0.01
    assert hash_split("dir/file1.txt", 0.1, 0.05) == hash_split("dir/file1.txt", 0.1, 0.05)


def test_unknown_corpus_is_rejected():
    cfg = data()
    object.__setattr__(cfg, "corpus", "wt2")
    with pytest.raises(CorpusError, match="data.corpus='wt2' is unknown"):
        open_corpus(cfg)
