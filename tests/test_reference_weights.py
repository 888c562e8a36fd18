"""Reference Transformer-XL weights: HF's TransfoXLLMHeadModel (transformers 4.35.2) and the
authors' PyTorch naming load into our model with the same per-token NLL; import-reference makes
an export our pipeline evaluates.

The expected NLLs come from HF's own model (tests/fixtures/transfo_xl, written by
tools/make_reference_fixture.py in the reference environment), so transformers is not needed here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.reference import ReferenceWeightsError, config_from_hf, convert_state_dict, load_reference
from models.transformer_xl import TXLMemory

FIXTURES = Path(__file__).parent / "fixtures" / "transfo_xl"
CASES = ("untied_div2", "shared_div1")


def fixture(name: str):
    d = FIXTURES / name
    case = json.loads((d / "case.json").read_text())
    hf = json.loads((d / "config.json").read_text())
    return hf, case, load_file(str(d / "model.safetensors")), load_file(str(d / "expected.safetensors"))


def segment_nll(model, ids: torch.Tensor, case: dict, memory) -> torch.Tensor:
    """Per-token NLL over case["segments"] consecutive segments, memory carried."""
    t, out = case["tgt_len"], []
    with torch.no_grad():
        for s in range(case["segments"]):
            res = model(ids[:, s * t:(s + 1) * t], ids[:, s * t + 1:(s + 1) * t + 1], memory)
            memory = res.memory
            out.append(res.nll)
    return torch.cat(out, dim=1)


def authors_state(hf_state: dict) -> dict:
    """The authors' PyTorch naming, written out by hand: no 'transformer.' prefix, every tied
    copy present (torch.save of MemTransformerLM.state_dict()), and the softmax head's cluster
    columns in their order (cluster i at column -i: the rows of HF's cluster_weight reversed)."""
    out = {k.removeprefix("transformer."): v.clone() for k, v in hf_state.items()}
    out["crit.cluster_weight"] = out["crit.cluster_weight"].flip(0)
    out["crit.cluster_bias"] = out["crit.cluster_bias"].flip(0)
    out["crit.out_layers.0.weight"] = out["word_emb.emb_layers.0.weight"]   # tie_weight, div_val 1
    out["crit.out_projs.1"] = out["word_emb.emb_projs.0"]                   # tie_projs [F, T, F]
    return out


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("start", ["empty", "zero"])
def test_hf_weights_give_hf_nll_over_three_segments(name, start):
    hf, case, state, expected = fixture(name)
    cfg = config_from_hf(hf, tgt_len=case["tgt_len"])
    model = load_reference(state, cfg)
    b = case["batch"]
    # empty: the authors' convention; zero: HF's default (mems=None) of mem_len zero states
    memory = (model.init_memory(b) if start == "empty" else
              TXLMemory(hidden=torch.zeros(b, cfg.n_layer, cfg.mem_len, cfg.d_model)))
    nll = segment_nll(model, expected["input_ids"], case, memory)
    torch.testing.assert_close(nll, expected[f"nll_{start}_memory"], rtol=0, atol=1e-5)


def test_config_from_hf_reads_the_fields():
    hf, _, _, _ = fixture("untied_div2")
    cfg = config_from_hf(hf, tgt_len=6)
    assert (cfg.n_token, cfg.cutoffs, cfg.div_val, cfg.untie_r, cfg.same_length, cfg.clamp_len) == \
        (250, [30, 80, 150], 2, True, True, 7)
    assert cfg.tie_projs == [False, True, True, True] and cfg.tie_weight and not cfg.pre_lnorm
    hf1, _, _, _ = fixture("shared_div1")
    cfg1 = config_from_hf(hf1)
    assert (cfg1.clamp_len, cfg1.d_embed, cfg1.tie_projs, cfg1.pre_lnorm) == (-1, 24, [False, True, False], True)
    with pytest.raises(ReferenceWeightsError, match="attn_type=1"):
        config_from_hf({**hf, "attn_type": 1})
    with pytest.raises(ReferenceWeightsError, match="sample_softmax=8"):
        config_from_hf({**hf, "sample_softmax": 8})
    with pytest.raises(ReferenceWeightsError, match="no 'd_inner'"):
        config_from_hf({k: v for k, v in hf.items() if k != "d_inner"})


def test_authors_naming_with_every_tied_copy_gives_the_same_nll():
    hf, case, state, expected = fixture("shared_div1")
    cfg = config_from_hf(hf, tgt_len=case["tgt_len"])
    ids, want = expected["input_ids"], expected["nll_empty_memory"]
    theirs = authors_state(state)
    model = load_reference(theirs, cfg)                        # auto: no prefix means the authors'
    torch.testing.assert_close(segment_nll(model, ids, case, model.init_memory(case["batch"])), want,
                               rtol=0, atol=1e-5)
    # the cluster order matters: read as HF's order, the same tensors give other numbers
    wrong = load_reference({"transformer." + k if not k.startswith("crit.") else k: v for k, v in theirs.items()},
                           cfg, naming="hf")
    assert (segment_nll(wrong, ids, case, wrong.init_memory(case["batch"])) - want).abs().max() > 1e-2


def test_hf_state_dict_with_per_layer_references_to_shared_biases():
    """torch.save(TransfoXLLMHeadModel.state_dict()) with untie_r=False also lists the shared u/v
    under every layer (and the tied copies HF's safetensors writer drops)."""
    hf, case, state, expected = fixture("shared_div1")
    cfg = config_from_hf(hf, tgt_len=case["tgt_len"])
    full = dict(state)
    for layer in range(cfg.n_layer):
        for bias in ("r_w_bias", "r_r_bias"):
            full[f"transformer.layers.{layer}.dec_attn.{bias}"] = state[f"transformer.{bias}"]
    full["crit.out_layers.0.weight"] = state["transformer.word_emb.emb_layers.0.weight"]
    model = load_reference(full, cfg)
    torch.testing.assert_close(segment_nll(model, expected["input_ids"], case, model.init_memory(case["batch"])),
                               expected["nll_empty_memory"], rtol=0, atol=1e-5)
    full["transformer.layers.1.dec_attn.r_w_bias"] = state["transformer.r_w_bias"] + 1
    with pytest.raises(ReferenceWeightsError, match=r"transformer.layers.1.dec_attn.r_w_bias should be tied to "
                                                    r"transformer.r_w_bias"):
        convert_state_dict(full, cfg)


def test_errors_name_the_tensors():
    hf, case, state, _ = fixture("untied_div2")
    cfg = config_from_hf(hf, tgt_len=case["tgt_len"])
    missing = {k: v for k, v in state.items() if k != "transformer.layers.2.pos_ff.CoreNet.3.bias"}
    with pytest.raises(ReferenceWeightsError, match=r"not in the file: \['layers.2.pos_ff.ff2.bias'\]"):
        convert_state_dict(missing, cfg)
    with pytest.raises(ReferenceWeightsError, match=r"\['transformer.layers.3.dec_attn.o_net.weight'\]"):
        convert_state_dict({**state, "transformer.layers.3.dec_attn.o_net.weight": torch.zeros(32, 32)}, cfg)
    with pytest.raises(ReferenceWeightsError, match=r"transformer.layers.0.pos_ff.CoreNet.0.weight: shape "
                                                    r"\(48, 32\) in the file, \(64, 32\) in the model"):
        convert_state_dict(state, config_from_hf({**hf, "d_inner": 64}))
    bad = {**state, "crit.out_projs.2": state["transformer.word_emb.emb_projs.2"] * 2}
    with pytest.raises(ReferenceWeightsError, match=r"should be tied.*tie_projs"):
        convert_state_dict(bad, cfg)
    with pytest.raises(ReferenceWeightsError, match="pos_emb.inv_freq: not the sinusoid frequencies of d_model=64"):
        convert_state_dict(state, config_from_hf({**hf, "d_model": 64}))
    with pytest.raises(ReferenceWeightsError, match="not part of this authors-named"):
        convert_state_dict(state, cfg, naming="authors")


# ----------------------------------------------------------------------------- import-reference


@pytest.fixture(scope="module")
def ref_shards(tmp_path_factory) -> tuple[Path, Path, Path]:
    """WikiText-103-layout shards whose vocabulary is the untied_div2 checkpoint's (250 symbols)."""
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("refshards")
    symbols = ["<eos>", "<unk>"] + [f"w{i}" for i in range(2, 250)]
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(symbols) + "\n")
    rng = np.random.default_rng(0)
    corpus = root / "wt103"
    corpus.mkdir()
    for split, lines in (("train", 60), ("valid", 20), ("test", 20)):
        text = "".join(" ".join(symbols[i] for i in rng.integers(2, 250, 12)) + " \n" for _ in range(lines))
        (corpus / f"wiki.{split}.tokens").write_text(text)
    cfg = load_config(None, ["data.corpus=wt103", f"data.path={corpus}", f"data.output={root / 'shards'}",
                             f"tokenizer.vocab_file={vocab}"])
    prepare(cfg, progress=False)
    config = root / "ref.yaml"
    config.write_text(f"data:\n  corpus: wt103\n  output: {root / 'shards'}\nmodel:\n  tgt_len: 6\n"
                      f"tracking:\n  enabled: false\n")
    return config, vocab, root


def test_import_reference_makes_an_export_the_pipeline_evaluates(ref_shards, tmp_path):
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate
    from pipeline.export import load_export
    from pipeline.import_reference import main

    config, vocab, root = ref_shards
    hf, case, state, expected = fixture("untied_div2")
    weights = tmp_path / "pytorch_model.bin"
    torch.save(state, weights)                     # a .bin, read with weights_only=True
    out = tmp_path / "export"
    assert main(["--config", str(config), "--weights", str(weights), "--hf-config",
                 str(FIXTURES / "untied_div2" / "config.json"), "--vocab", str(vocab), "--output", str(out)]) == 0
    model, tokenizer, meta = load_export(out)
    assert tokenizer.vocab_size == 250 and meta.tag == "reference" and meta.reference["naming"] == "auto"
    nll = segment_nll(model, expected["input_ids"], case, model.init_memory(case["batch"]))
    torch.testing.assert_close(nll, expected["nll_empty_memory"], rtol=0, atol=1e-5)

    cfg = load_config(config, [f"eval.source={out}", f"eval.output={tmp_path / 'eval'}", "eval.split=test",
                               "eval.n_streams=2", "eval.tgt_len=6", "eval.mem_len=10"])
    row = evaluate(cfg)["results"][0]
    assert row["tokens"] > 0 and math.isfinite(row["metrics"]["ppl"])
    # a random checkpoint on uniform text: near-uniform predictions, far from a broken model's
    assert row["metrics"]["ppl"] > 100


def test_import_reference_refuses_what_does_not_match(ref_shards, tmp_path, caplog):
    from pipeline.import_reference import main

    config, vocab, root = ref_shards
    hf_config = str(FIXTURES / "untied_div2" / "config.json")
    weights = FIXTURES / "untied_div2" / "model.safetensors"
    other = tmp_path / "vocab.txt"
    other.write_text(vocab.read_text().replace("w7\n", "w7x\n"))
    assert main(["--config", str(config), "--weights", str(weights), "--hf-config", hf_config,
                 "--vocab", str(other), "--output", str(tmp_path / "a")]) == 1
    assert "id 7 is 'w7x', in the shards' vocabulary 'w7'" in caplog.text
    small = FIXTURES / "shared_div1"
    assert main(["--config", str(config), "--weights", str(small / "model.safetensors"), "--hf-config",
                 str(small / "config.json"), "--output", str(tmp_path / "b")]) == 1
    assert "n_token=120 but the tokenizer" in caplog.text
    pickled = tmp_path / "model.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)      # a pickled module: refused, not run
    assert main(["--config", str(config), "--weights", str(pickled), "--hf-config", hf_config,
                 "--output", str(tmp_path / "c")]) == 1
    assert "not a plain state dict" in caplog.text
    assert not any((tmp_path / n).exists() for n in "abc")


REF_PYTHON = Path(__file__).resolve().parents[1] / ".venv-ref" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not REF_PYTHON.exists(), reason="no .venv-ref (make reference-env)")
def test_fixtures_regenerate_identically_in_the_reference_env(tmp_path):
    """The committed fixtures are what transformers 4.35.2 computes today: the same weights byte
    for byte, the same NLLs up to float reduction order (thread count)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "tools" / "make_reference_fixture.py"
    subprocess.run([str(REF_PYTHON), str(script), "--out", str(tmp_path)], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    for name in CASES:
        for f in ("model.safetensors", "config.json"):
            assert (tmp_path / name / f).read_bytes() == (FIXTURES / name / f).read_bytes(), f"{name}/{f} differs"
        live, kept = load_file(str(tmp_path / name / "expected.safetensors")), fixture(name)[3]
        assert torch.equal(live["input_ids"], kept["input_ids"])
        for key in ("nll_empty_memory", "nll_zero_memory"):
            torch.testing.assert_close(live[key], kept[key], rtol=0, atol=1e-6)
