"""Tokenizers against the Transformer-XL reference's vocabulary semantics, computed independently
here the way the reference does it (per-line Counter.update, specials, most_common)."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter

import numpy as np
import pytest

from pipeline.data.shards import Manifest, SplitInfo
from pipeline.data.tokenizers import (
    ByteTokenizer,
    CharVocab,
    SentencePieceTokenizer,
    TokenizerError,
    UnknownSymbolError,
    WordVocab,
    load_tokenizer,
    read_tokenizer,
    save_tokenizer,
    train_sentencepiece,
)
from pipeline.data.tokenizers.word_vocab import (
    CountMerger,
    count_chars,
    count_words,
    read_vocab_file,
    vocab_from_counts,
)

from corpus_fixtures import file_lines, ref_encode, ref_vocab

# Ties (b/c/a each twice, in that first-occurrence order), an empty line, a blank line, upper case,
# unicode whitespace the reference's str.split() also splits on, a literal <unk>.
TEXT = "b c  a\n\nB b c a <unk>\n   \nd\u00a0e\u3000c\tx y\nz a\n"


@pytest.mark.parametrize("lower_case", [False, True])
@pytest.mark.parametrize("min_freq,max_size", [(0, None), (2, None), (0, 3), (2, 2)])
def test_word_vocab_matches_reference(lower_case, min_freq, max_size):
    lines = file_lines(TEXT)
    expect = ref_vocab(lines, ["<eos>"], lower_case, min_freq, max_size)
    got = vocab_from_counts(count_words(TEXT, lower_case), ["<eos>"], min_freq, max_size or 0)
    assert got == expect
    assert got[0] == "<eos>"


def test_counts_merged_in_unit_order_keep_first_occurrence_ties():
    # Counting two halves separately and merging in order equals counting line by line.
    lines = file_lines(TEXT)
    half = len(lines) // 2
    merged = CountMerger()
    merged.add(*count_words("".join(lines[:half]), False))
    merged.add(*count_words("".join(lines[half:]), False))
    assert vocab_from_counts(merged.result(), ["<eos>"]) == ref_vocab(lines, ["<eos>"])
    # c and a both occur 3 times; c occurs first, so it comes first (then b, 2 times)
    assert vocab_from_counts(merged.result())[:3] == ["c", "a", "b"]


# Random texts over everything str.split() and text-mode reading care about.
POOL = ["a", "b", "ab", "The", "the", "x" * 15, "y" * 16, "z" * 40, "naïve", "中文", "<eos>", "<S>", "\x00",
        "a\x00", "é" * 8, "İstanbul", "ΣΑΣ", "<unk>", "ß"]
SEPS = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\xa0", "\u3000", "\u2028",
        "\x85", "\u2009", "\n\n", " \n "]


def random_texts(n=200, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            parts.append(rng.choice(POOL) if rng.random() < 0.7 else
                         "".join(rng.choice("abcXYZé中\x00") for _ in range(rng.randint(1, 20))))
            parts.append(rng.choice(SEPS))
        yield "".join(parts[:-1] if rng.random() < 0.3 else parts)


def test_unicode_spaces_are_exactly_pythons():
    from pipeline.data.tokenizers.fastwords import ASCII_SPACES, UNICODE_SPACES
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    assert spaces == [chr(b) for b in ASCII_SPACES] + list(UNICODE_SPACES)
    assert all(len(f"a{c}b".split()) == 2 for c in spaces)


@pytest.mark.parametrize("lower_case", [False, True])
def test_vectorised_words_equal_the_python_path(lower_case):
    for text in random_texts():
        lines = file_lines(text)
        words, counts = count_words(text, lower_case)
        ref = Counter()
        for line in lines:
            ref.update((line.strip().lower() if lower_case else line.strip()).split())
        assert words == list(ref) and counts.tolist() == list(ref.values())
        symbols = ref_vocab(lines, ["<eos>", "<unk>"], lower_case)
        tok = WordVocab(symbols, lower_case, eos="<eos>", unk="<unk>")
        got = tok.encode(text).tolist()
        # text ends without a newline: the reference's file reading still gives that last line <eos>
        expect = ref_encode(lines, symbols, lower_case)
        if text and not text.endswith(("\n", "\r")):
            expect = expect[:-1]
        assert got == expect, repr(text)
        sent = WordVocab(["<S>", "<UNK>"] + [w for w in symbols if w not in ("<S>", "<UNK>")], lower_case,
                         bos="<S>", unk="<UNK>")
        ids, starts = sent.encode_sentences(text)
        ref_ids, ref_starts = [], []
        for line in lines:
            ref_starts.append(len(ref_ids))
            ref_ids += [sent.symbols.index(w) if w in sent.symbols else 1
                        for w in ["<S>"] + (line.lower() if lower_case else line).split()]
        assert ids.tolist() == ref_ids and starts.tolist() == ref_starts, repr(text)


def test_count_chars_equals_counter():
    for text in random_texts(50, seed=1):
        chars, counts = count_chars(text)
        ref = Counter(text)
        assert chars == list(ref) and counts.tolist() == list(ref.values())


def test_word_encode_eos_every_line_including_empty_ones():
    lines = file_lines(TEXT)
    symbols = ref_vocab(lines, ["<eos>"])
    tok = WordVocab(symbols, lower_case=False, eos="<eos>", unk="<unk>")
    assert tok.encode(TEXT).tolist() == ref_encode(lines, symbols)
    assert tok.eos_id == 0 and tok.unk_id == symbols.index("<unk>")
    # \r\n and \r end lines as in text-mode reading
    crlf = TEXT.replace("\n", "\r\n")
    assert tok.encode(crlf).tolist() == ref_encode(file_lines(crlf), symbols)
    old_mac = TEXT.replace("\n", "\r")
    assert tok.encode(old_mac).tolist() == ref_encode(file_lines(old_mac), symbols)


def test_word_unknown_maps_to_unk_or_errors():
    with_unk = WordVocab(["<eos>", "a", "<unk>"], eos="<eos>", unk="<unk>")
    assert with_unk.encode("a zz\n").tolist() == [1, 2, 0]
    without = WordVocab(["<eos>", "a"], eos="<eos>")
    assert without.unk_id is None
    with pytest.raises(UnknownSymbolError, match="'zz'"):
        without.encode("a zz\n")


def test_word_lower_case_and_decode():
    tok = WordVocab(["<eos>", "hello", "world"], lower_case=True, eos="<eos>")
    ids = tok.encode("Hello WORLD\n\nhello\n")
    assert ids.tolist() == [1, 2, 0, 0, 1, 0]
    assert tok.decode(ids) == "hello world\n\nhello\n"


def test_vocab_file_first_column_and_lm1b_sentences(tmp_path):
    vf = tmp_path / "1b_word_vocab.txt"
    vf.write_text("<S>\t0\n</S> 0\n<UNK> 0\nthe 100\nof 50\nthe 3\ncat 1\n")
    symbols = read_vocab_file(vf)
    assert symbols == ["<S>", "</S>", "<UNK>", "the", "of", "cat"]
    tok = WordVocab(symbols, bos="<S>", unk="<UNK>")
    assert tok.unk_id == 2 and tok.bos_id == 0
    text = "the cat\nof dog the\n\n"
    ids, starts = tok.encode_sentences(text)
    assert starts.tolist() == [0, 3, 7]
    # Reference: each sentence ['<S>'] + words + ['<S>']; LMShuffledIterator consumes the last
    # token only as a target. Our concatenation gives exactly those (input, target) pairs, except
    # the very last sentence's closing <S>.
    sym2idx = {s: i for i, s in enumerate(symbols)}
    ref_pairs = []
    for line in file_lines(text):
        sent = [sym2idx.get(s, tok.unk_id) for s in ["<S>"] + line.strip().split() + ["<S>"]]
        ref_pairs += list(zip(sent[:-1], sent[1:]))
    ours = list(zip(ids[:-1].tolist(), ids[1:].tolist()))
    assert ours == ref_pairs[:-1]
    empty = tmp_path / "bad.txt"
    empty.write_text("a\n\nb\n")
    with pytest.raises(TokenizerError, match=r"bad.txt: line 2 is empty"):
        read_vocab_file(empty)


def test_char_vocab_order_and_unknown():
    text = "ba ab  c"
    symbols = vocab_from_counts(Counter(text))
    expect = [s for s, _ in Counter(text).most_common()]
    assert symbols == expect == [" ", "b", "a", "c"]
    tok = CharVocab(symbols)
    assert tok.encode(text).tolist() == [symbols.index(ch) for ch in text]
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(UnknownSymbolError, match="'z'"):
        tok.encode("abz")
    assert CharVocab(["a", "?"], unk="?").encode("az").tolist() == [0, 1]


def test_bytes_roundtrip():
    tok = ByteTokenizer()
    text = "naïve ☃\n\tx"
    ids = tok.encode(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text and tok.vocab_size == 256


def _spm_corpus():
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "    ", "import", "class"]
    rng = np.random.default_rng(0)
    return ["".join(words[i] + (" " if rng.random() < 0.7 else "") for i in rng.integers(0, len(words), 12))
            for _ in range(400)]


@pytest.fixture(scope="module")
def spm_model():
    return train_sentencepiece(_spm_corpus(), vocab_size=320, threads=1)


def test_sentencepiece_roundtrip_and_determinism(spm_model):
    assert train_sentencepiece(_spm_corpus(), vocab_size=320, threads=2) == spm_model  # any thread count
    tok = SentencePieceTokenizer(spm_model, threads=1)
    for text in ["alpha beta\n", "  leading spaces\n\ttab", "x  y   z ", "naïve ☃ 中文\r\n", "", "\n\n",
                 "class Foo:\n    def f(self):\n        return 1\n"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # newline is the byte piece; batch encoding equals one-by-one
    assert tok.newline_id == tok.sp.piece_to_id("<0x0A>")
    texts = ["a\nb", "", "gamma delta\n"]
    assert [a.tolist() for a in tok.encode_batch(texts)] == [tok.encode(t).tolist() for t in texts]
    assert tok.special() == {"eos": 1, "unk": 0, "newline": tok.newline_id}


def test_sentencepiece_vocab_too_large_is_clear():
    with pytest.raises(TokenizerError, match="tokenizer.vocab_size=100000"):
        train_sentencepiece(["tiny corpus"] * 10, vocab_size=100000, threads=1)


def _manifest(entry):
    return Manifest(corpus="x", tokenizer=entry, dtype="uint16", chunk_tokens=8, sentences=False,
                    splits={"train": SplitInfo([])})


@pytest.mark.parametrize("kind", ["word", "char", "byte", "sentencepiece"])
def test_save_load_verified_against_manifest(tmp_path, kind, spm_model):
    tok = {"word": lambda: WordVocab(["<eos>", "a", "<unk>"], eos="<eos>", unk="<unk>"),
           "char": lambda: CharVocab(["a", "b"]),
           "byte": ByteTokenizer,
           "sentencepiece": lambda: SentencePieceTokenizer(spm_model)}[kind]()
    entry = save_tokenizer(tok, tmp_path)
    for name, sha in entry["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == sha
    manifest = _manifest(entry)
    manifest.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.kind == kind and loaded.vocab_size == tok.vocab_size
    assert loaded.special() == tok.special() == entry["special"]
    assert sorted(p.name for p in loaded.files()) == sorted(entry["files"])
    sample = "a b\n" if kind != "char" else "abba"
    assert loaded.encode(sample).tolist() == tok.encode(sample).tolist()
    # A tokenizer file that no longer matches the manifest is an error naming it.
    victim = tmp_path / ("tokenizer.model" if kind == "sentencepiece" else "tokenizer.json")
    victim.write_bytes(victim.read_bytes() + b" ")
    with pytest.raises(TokenizerError, match=victim.name):
        load_tokenizer(tmp_path, manifest)


def test_read_tokenizer_rejects_garbage(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "magic"}))
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'magic'"):
        read_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        read_tokenizer(tmp_path / "nowhere")
