"""Export: safetensors with tied weights stored once and re-tied on load, the Al-Rfou model without
its training-only heads, loading in a process where DeepSpeed cannot be imported, atomic writes,
and (slow) real ZeRO-2/3 checkpoints from 2-rank training whose export gives the engine's
log-probabilities on a fixed batch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models import ModelConfig, build_model
from pipeline.config import load_config, to_dict
from pipeline.data.tokenizers import load_tokenizer
from pipeline.export import load_export
from pipeline.runtime.exports import ExportError, save_export

from train_fixtures import PY, REPO, TINY, clean_env, launch, make_shards

CONFIG = REPO / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("export") / "data", n_docs=150)


def config_dict(shards: Path, model: ModelConfig) -> dict:
    cfg = load_config(CONFIG, [f"data.output={shards}"])
    cfg.model = model
    return to_dict(cfg)


def adaptive_txl() -> torch.nn.Module:
    """Adaptive input/softmax with tied embeddings and tied tail projections (WT103 style)."""
    torch.manual_seed(3)
    return build_model(ModelConfig(n_token=256, n_layer=2, d_model=48, n_head=2, d_head=24, d_inner=64,
                                   d_embed=32, cutoffs=[64, 128], div_val=2, tie_weight=True,
                                   tie_projs=[False, True, True], dropout=0.0, tgt_len=6, mem_len=6)).eval()


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Two segments, the second with the first's memory."""
    memory = model.init_memory(ids.shape[1])
    outs = []
    with torch.no_grad():
        for seg in ids:
            res = model(seg, memory=memory, return_logprobs=True)
            memory = res.memory
            outs.append(res.logprobs)
    return torch.stack(outs)


IDS = torch.randint(0, 256, (2, 3, 6), generator=torch.Generator().manual_seed(0))
INFO = {"step": 3, "tag": "global_step3", "mlflow_run_id": None, "manifest_sha256": "x"}


def test_tied_tensors_are_stored_once_and_tied_again(shards, tmp_path):
    model = adaptive_txl()
    ties = {"crit.out_layers.0.weight": "word_emb.emb_layers.0.weight",
            "crit.out_layers.1.weight": "word_emb.emb_layers.1.weight",
            "crit.out_projs.1": "word_emb.emb_projs.1", "crit.out_projs.2": "word_emb.emb_projs.2"}
    for a, b in ties.items():   # what the model itself shares
        assert model.get_parameter(a) is model.get_parameter(b)
    info = save_export(model, config_dict(shards, model.cfg), load_tokenizer(shards), tmp_path / "e", INFO)
    for a, b in ties.items():
        assert info.tied[a] == b
    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert not stored & set(ties) and set(ties.values()) <= stored
    assert stored | set(info.tied) == set(model.state_dict())
    loaded, tok, meta = load_export(tmp_path / "e")
    for a, b in ties.items():
        assert loaded.get_parameter(a) is loaded.get_parameter(b)
    torch.testing.assert_close(logprobs(loaded, IDS), logprobs(model, IDS), rtol=0, atol=0)
    assert tok.kind == "byte" and meta.step == 3 and meta.n_params == sum(
        p.numel() for p in model.parameters())
    assert sorted(meta.files) == ["config.yaml", "model.safetensors", "tokenizer.json"]


def test_alrfou_export_leaves_out_training_heads(shards, tmp_path):
    torch.manual_seed(4)
    model = build_model(ModelConfig(family="vanilla", attn_type="learned", n_token=256, n_layer=3, d_model=32,
                                    n_head=2, d_head=16, d_inner=64, tgt_len=8, mem_len=7, dropout=0.0)).eval()
    save_export(model, config_dict(shards, model.cfg), load_tokenizer(shards), tmp_path / "v", INFO)
    with safe_open(str(tmp_path / "v" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert stored == set(model.inference_state_dict()) - {"head.weight"}     # head tied to the embedding
    assert not any(k.startswith("train_heads.") for k in stored)
    loaded, _, _ = load_export(tmp_path / "v")
    ids = IDS[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, ids).nll, model(ids, ids).nll, rtol=0, atol=0)


def test_bf16_export_and_integrity_checks(shards, tmp_path):
    model = adaptive_txl()
    save_export(model, config_dict(shards, model.cfg), load_tokenizer(shards), tmp_path / "b", INFO, dtype="bf16")
    assert next(model.parameters()).dtype == torch.float32            # the caller's model is untouched
    loaded, _, meta = load_export(tmp_path / "b")
    assert meta.dtype == "bf16" and next(loaded.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(loaded.word_emb.emb_layers[0].weight,
                               model.word_emb.emb_layers[0].weight.bfloat16(), rtol=0, atol=0)
    # Changed bytes are caught; an existing output is not overwritten unless asked.
    weights = tmp_path / "b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    changed = "model.safetensors does not match the sha256 in .*export.json: the export was changed"
    with pytest.raises(ExportError, match=changed):
        load_export(tmp_path / "b")
    with pytest.raises(ExportError, match="exists"):
        save_export(model, config_dict(shards, model.cfg), load_tokenizer(shards), tmp_path / "b", INFO)


def test_overwrite_replaces_only_an_export_of_ours(shards, tmp_path):
    model = adaptive_txl()

    def save(out, step=3):
        return save_export(model, config_dict(shards, model.cfg), load_tokenizer(shards), out, INFO | {"step": step},
                           overwrite=True)

    save(tmp_path / "e")
    save(tmp_path / "e", step=4)                                # an export of ours: replaced
    assert load_export(tmp_path / "e")[2].step == 4
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"replaces only an export written by xlpipe, and .*mine is not one"):
        save(notes)
    plain = tmp_path / "file.bin"
    plain.write_bytes(b"data")
    with pytest.raises(ExportError, match="file.bin exists and is not an export directory"):
        save(plain)
    (tmp_path / "e" / "notes.txt").write_text("mine too")
    with pytest.raises(ExportError, match=r"also holds \['notes.txt'\], which export.overwrite would delete"):
        save(tmp_path / "e")
    assert (notes / "notes.txt").read_text() == "keep me" and plain.read_bytes() == b"data"
    assert (tmp_path / "e" / "notes.txt").read_text() == "mine too" and not list(tmp_path.glob(".*tmp*"))


def test_a_failed_export_leaves_nothing(shards, tmp_path):
    model = adaptive_txl()

    class Broken:
        kind, vocab_size = "byte", 256

        def files(self):
            return [tmp_path / "no-such-tokenizer.json"]

    with pytest.raises(FileNotFoundError):
        save_export(model, config_dict(shards, model.cfg), Broken(), tmp_path / "x", INFO)
    assert list(tmp_path.iterdir()) == []


NO_DEEPSPEED = r"""
import sys
sys.modules["deepspeed"] = None            # any `import deepspeed` now raises ImportError
sys.path.insert(0, sys.argv[3])
import numpy as np, torch
from pipeline.export import load_export
model, tok, meta = load_export(sys.argv[1])
ids = torch.from_numpy(np.load(sys.argv[2] + ".ids.npy"))
memory, out = model.init_memory(ids.shape[1]), []
with torch.no_grad():
    for seg in ids:
        res = model(seg, memory=memory, return_logprobs=True)
        memory = res.memory
        out.append(res.logprobs.numpy())
loaded = sorted(k for k, v in sys.modules.items() if k.startswith("deepspeed") and v is not None)
assert not loaded, loaded
np.save(sys.argv[2], np.stack(out))
print(tok.decode([104, 105]), meta.step)
"""


def load_without_deepspeed(export: Path, ids: torch.Tensor, out: Path) -> np.ndarray:
    np.save(str(out) + ".ids.npy", ids.numpy())
    res = subprocess.run([PY, "-c", NO_DEEPSPEED, str(export), str(out), str(REPO)], capture_output=True, text=True,
                         env=clean_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.split()[0] == "hi"
    return np.load(str(out) + ".npy")


def test_loads_where_deepspeed_cannot_be_imported(shards, tmp_path):
    model = adaptive_txl()
    save_export(model, config_dict(shards, model.cfg), load_tokenizer(shards), tmp_path / "e", INFO)
    got = load_without_deepspeed(tmp_path / "e", IDS, tmp_path / "lp")
    np.testing.assert_array_equal(got, logprobs(model, IDS).numpy())


# ----------------------------------------------------------------------------- real ZeRO checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_checkpoint_export_matches_the_engine(shards, tmp_path, stage):
    common = ["--config", str(CONFIG), f"data.output={shards}", *TINY, f"train.output={tmp_path / 'run'}",
              f"train.zero_stage={stage}", "train.max_steps=4", "train.save_every=0"]
    for rc, text in launch(2, ["-m", "pipeline.train", *common], cwd=REPO, timeout=300):
        assert rc == 0, text[-4000:]
    res = subprocess.run([PY, "-m", "pipeline.export", *common, f"export.output={tmp_path / 'export'}"],
                         cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["step"] == 4 and meta["zero_stage"] == stage and meta["tied"]
    # The engine (2 ranks, ZeRO-partitioned weights loaded by DeepSpeed) on a fixed batch ...
    engine_out = tmp_path / "engine.npy"
    for rc, text in launch(2, ["tests/export_worker.py", str(engine_out), "--", *common], cwd=REPO, timeout=300):
        assert rc == 0, text[-4000:]
    want = np.load(engine_out)
    # ... and the export in a process without DeepSpeed, on the same batch.
    sys.path.insert(0, str(REPO / "tests"))
    from export_worker import fixed_batch

    got = load_without_deepspeed(tmp_path / "export", fixed_batch(256), tmp_path / "export_lp")
    assert got.shape == want.shape == (2, 3, 12, 256)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
