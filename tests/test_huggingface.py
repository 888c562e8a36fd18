"""A pretrained tokenizer from a local directory (``tokenizer.kind: huggingface``): prepare encodes
with it exactly as the ``tokenizers`` library does, stores its files with their sha256, and later
stages decode with it. The tokenizer is a tiny byte-level BPE trained here and saved the way
``save_pretrained`` saves one (nothing is downloaded)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.shards import Manifest, SplitTokens
from pipeline.data.tokenizers import TokenizerError, load_tokenizer
from pipeline.prepare import prepare

from corpus_fixtures import sentences

tokenizers = pytest.importorskip("tokenizers")


def make_bpe(directory, texts):
    """A byte-level BPE like GPT-2's, with ``<|endoftext|>``, saved with its config files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory.mkdir(parents=True, exist_ok=True)
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                 "bos_token": "<|endoftext|>"}))
    return tk


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    docs = root / "docs"
    docs.mkdir()
    texts = {f"d{i:02d}.txt": "\n".join(sentences(i, 4, lo=2)) + "\n" for i in range(20)}
    for name, text in texts.items():
        (docs / name).write_text(text)
    tk = make_bpe(root / "bpe", list(texts.values()))
    cfg = load_config(None, ["data.corpus=text", f"data.path={docs}/*.txt", f"data.output={root / 'shards'}",
                             "data.workers=1", "data.valid_fraction=0.2", "data.test_fraction=0.2",
                             "tokenizer.kind=huggingface", f"tokenizer.path={root / 'bpe'}"])
    prepare(cfg, progress=False)
    return root, tk, texts, cfg


def test_prepare_encodes_with_the_pretrained_tokenizer(prepared):
    root, tk, texts, cfg = prepared
    shards = root / "shards"
    manifest = Manifest.load(shards)
    eos = tk.token_to_id("<|endoftext|>")
    assert manifest.tokenizer["kind"] == "huggingface"
    assert manifest.tokenizer["vocab_size"] == tk.get_vocab_size(with_added_tokens=True)
    assert manifest.tokenizer["special"]["eos"] == eos
    assert set(manifest.tokenizer["files"]) == {"tokenizer.json", "hf-tokenizer.json", "hf-tokenizer_config.json"}
    from pipeline.data.corpora import open_corpus

    plan = open_corpus(cfg.data).plan()
    for split in ("train", "valid"):
        files = [p.path.rsplit("/", 1)[1] for u in plan[split] for p in u.pieces]
        # Each document encoded by the library itself, then <|endoftext|>, as GPT-2 was trained.
        expected = np.concatenate([np.array(tk.encode(texts[f], add_special_tokens=False).ids + [eos]) for f in files])
        tokens = SplitTokens(shards, manifest, split)
        assert np.array_equal(tokens.read(0, len(tokens)), expected)
        tokens.close()
    tok = load_tokenizer(shards)
    text = texts["d03.txt"]
    assert tok.decode(tok.encode(text)) == text
    assert tok.special()["eos"] == eos and tok.doc_end == eos


def test_changed_tokenizer_files_are_refused(prepared, tmp_path):
    root, *_ = prepared
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(root / "shards", copy)
    path = copy / "hf-tokenizer_config.json"
    path.write_text(path.read_text().replace("endoftext", "endoftxt"))
    with pytest.raises(TokenizerError, match="hf-tokenizer_config.json"):
        load_tokenizer(copy)


def test_a_missing_directory_is_named(tmp_path):
    cfg = load_config(None, ["data.corpus=stdlib", f"data.output={tmp_path / 's'}", "tokenizer.kind=huggingface",
                             f"tokenizer.path={tmp_path / 'nope'}"])
    with pytest.raises(TokenizerError, match="nope.*is not a directory"):
        prepare(cfg, progress=False)
