"""The evaluation stage against independent computations on a tiny Transformer-XL.

Shards come from the real prepare stage (text corpus, byte tokenizer); tokens for the expected
values are read straight from the tar files (tarfile + numpy), and the model is called directly:
segment by segment with its memory (the reference loop), or in one full-length forward over a
stream and its true preceding context. Multi-rank runs are separate processes on gloo (slow).
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models import ModelConfig, build_model
from pipeline.config import load_config, to_dict
from pipeline.data.shards import Manifest
from pipeline.data.tokenizers import load_tokenizer
from pipeline.evaluate import EvalError, evaluate, metrics
from pipeline.runtime.exports import ExportError, save_export

from train_fixtures import REPO, launch, make_shards

CONFIG = REPO / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("eval") / "data", n_docs=300)


def raw_tokens(shard_dir: Path, split: str) -> np.ndarray:
    """The split's tokens read from its tars in manifest order (no pipeline reader involved)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    parts = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(shard_dir / shard["file"]) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if not member.name.endswith(".tokens.npy"):      # starts.npy: where documents open
                    continue
                parts.append(np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False))
    return np.concatenate(parts).astype(np.int64)


def make_export(shards: Path, out: Path, mlflow_run_id=None, **model) -> Path:
    """An export of a randomly initialised tiny Transformer-XL trained on nothing (fast)."""
    torch.manual_seed(7)
    cfg = load_config(CONFIG, [f"data.output={shards}"])
    cfg.model = ModelConfig(**{**dict(n_token=256, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64,
                                      dropout=0.0, tgt_len=8, mem_len=8, init_std=0.3), **model})
    net = build_model(cfg.model)
    manifest = Manifest.load(shards)
    save_export(net, to_dict(cfg), load_tokenizer(shards), out,
                {"step": 7, "tag": "global_step7", "mlflow_run_id": mlflow_run_id,
                 "manifest_sha256": manifest.sha256()})
    return out


@pytest.fixture(scope="module")
def export_dir(shards, tmp_path_factory) -> Path:
    return make_export(shards, tmp_path_factory.mktemp("export") / "tiny")


def run_eval(shards: Path, source: Path, out: Path, *overrides: str) -> dict:
    cfg = load_config(CONFIG, [f"data.output={shards}", f"eval.source={source}", f"eval.output={out}",
                               "tracking.enabled=false", *overrides])
    return evaluate(cfg)


def direct_model(export_dir: Path):
    from pipeline.export import load_export

    model, _, _ = load_export(export_dir)
    return model


# ----------------------------------------------------------------------------- equal to independent loops


def test_paper_settings_equal_a_direct_segment_loop(shards, export_dir, tmp_path):
    """Cold start, same_length + clamp_len: the reference's loop over the raw tokens."""
    n, tgt, mem, clamp, steps = 3, 5, 7, 4, 30
    rep = run_eval(shards, export_dir, tmp_path, f"eval.n_streams={n}", f"eval.tgt_len={tgt}",
                   f"eval.mem_len={mem}", f"eval.clamp_len={clamp}", "eval.same_length=true",
                   "eval.warm_tokens=0", f"eval.max_steps={steps}", f"eval.dump={tmp_path / 'dump.npz'}")
    x = raw_tokens(shards, "valid")
    L = (len(x) - 1) // n
    assert L > tgt * steps
    model = direct_model(export_dir)
    model.reset_length(tgt, 0, mem)
    model.same_length, model.clamp_len = True, clamp
    total, count = 0.0, 0
    want = np.full(len(x), np.nan)
    with torch.no_grad():
        for b in range(n):
            memory = model.init_memory(1)
            for s in range(0, tgt * steps, tgt):
                e = s + tgt
                inp = torch.from_numpy(x[b * L + s: b * L + e])[None]
                tgt_ids = torch.from_numpy(x[b * L + s + 1: b * L + e + 1])[None]
                out = model(inp, tgt_ids, memory=memory)
                memory = out.memory
                total += float(out.nll.double().sum())
                count += e - s
                want[b * L + s + 1: b * L + e + 1] = out.nll[0].numpy()
    row = rep["results"][0]
    assert row["tokens"] == count == n * tgt * steps
    assert row["nll_sum"] == pytest.approx(total, rel=1e-7)          # batch of 3 vs 1: float32 rounding
    assert row["metrics"]["bpc"] == pytest.approx(total / count / math.log(2), rel=1e-7)
    assert row["settings"] | {"start": "cold"} == row["settings"]
    dump = np.load(tmp_path / "dump.npz")
    np.testing.assert_array_equal(np.isnan(dump["nll"]), np.isnan(want))
    np.testing.assert_allclose(dump["nll"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(dump["tokens"], x)
    assert rep["checkpoint"]["step"] == 7 and rep["manifest"]["sha256"] == Manifest.load(shards).sha256()


def full_forward_nll(model, tokens: np.ndarray) -> np.ndarray:
    """NLL of tokens[1:] from one causal forward over all of them, no memory, no clamp."""
    model.reset_length(len(tokens) - 1, 0, 0)
    model.same_length, model.clamp_len = False, -1
    with torch.no_grad():
        t = torch.from_numpy(tokens)[None]
        return model(t[:, :-1], t[:, 1:]).nll[0].double().numpy()


@pytest.mark.parametrize("kv_cache", [True, False])
def test_long_memory_equals_full_length_forward(shards, export_dir, tmp_path, kv_cache):
    """With or without reusing the memory rows' keys and values (eval.kv_cache)."""
    n, tgt, steps = 4, 6, 12
    rep = run_eval(shards, export_dir, tmp_path, f"eval.n_streams={n}", f"eval.tgt_len={tgt}",
                   "eval.mem_len=1000", "eval.warm_tokens=0", f"eval.max_steps={steps}",
                   f"eval.dump={tmp_path / 'dump.npz'}", f"eval.kv_cache={str(kv_cache).lower()}")
    assert rep["kv_cache"] is kv_cache
    x = raw_tokens(shards, "valid")
    L = (len(x) - 1) // n
    got = np.load(tmp_path / "dump.npz")["nll"]
    model = direct_model(export_dir)
    total = 0.0
    for b in range(n):
        want = full_forward_nll(model, x[b * L: b * L + tgt * steps + 1])
        np.testing.assert_allclose(got[b * L + 1: b * L + tgt * steps + 1], want, rtol=1e-4, atol=1e-4)
        total += want.sum()
    assert rep["results"][0]["tokens"] == n * tgt * steps
    assert np.isfinite(got).sum() == n * tgt * steps
    assert rep["results"][0]["nll_sum"] == pytest.approx(total, rel=1e-5)


def test_warm_start_equals_the_true_preceding_context(shards, export_dir, tmp_path):
    """Each stream first runs over the w tokens before it (stream 0: the split's last w tokens)."""
    n, tgt, steps, w = 4, 5, 10, 12
    rep = run_eval(shards, export_dir, tmp_path, f"eval.n_streams={n}", f"eval.tgt_len={tgt}",
                   "eval.mem_len=1000", f"eval.warm_tokens={w}", f"eval.max_steps={steps}",
                   f"eval.dump={tmp_path / 'dump.npz'}")
    assert rep["results"][0]["settings"]["start"] == "warm"
    x = raw_tokens(shards, "valid")
    L = (len(x) - 1) // n
    got = np.load(tmp_path / "dump.npz")["nll"]
    model = direct_model(export_dir)
    for b in range(n):
        context = np.concatenate([x[len(x) - w:], x[:1]]) if b == 0 else x[b * L - w: b * L + 1]
        seq = np.concatenate([context[:-1], x[b * L: b * L + tgt * steps + 1]])
        want = full_forward_nll(model, seq)[w:]           # only the stream's own targets are scored
        np.testing.assert_allclose(got[b * L + 1: b * L + tgt * steps + 1], want, rtol=1e-4, atol=1e-4)
    # Cold start differs on the first tokens of every stream (no context there).
    cold = run_eval(shards, export_dir, tmp_path / "cold", f"eval.n_streams={n}", f"eval.tgt_len={tgt}",
                    "eval.mem_len=1000", "eval.warm_tokens=0", f"eval.max_steps={steps}")
    assert cold["results"][0]["nll_sum"] != pytest.approx(rep["results"][0]["nll_sum"], rel=1e-6)


def test_alrfou_stride_one_equals_the_sliding_window(shards, tmp_path):
    """The Al-Rfou model streamed 1 token at a time with L - 1 tokens of memory (warm) is the
    paper's stride-1 window: models.vanilla.sliding_window_nll over the stream and its context."""
    from models.vanilla import sliding_window_nll

    L, n, steps = 12, 4, 40
    export = make_export(shards, tmp_path / "v", family="vanilla", attn_type="learned", tgt_len=L, mem_len=L - 1)
    run_eval(shards, export, tmp_path, f"eval.n_streams={n}", "eval.tgt_len=1", f"eval.mem_len={L - 1}",
             f"eval.max_steps={steps}", f"eval.dump={tmp_path / 'dump.npz'}")
    x = raw_tokens(shards, "valid")
    S = (len(x) - 1) // n
    got = np.load(tmp_path / "dump.npz")["nll"]
    model = direct_model(export)
    for b in range(1, n):
        seq = torch.from_numpy(x[b * S - (L - 1): b * S + steps + 1])
        want = sliding_window_nll(model, seq, stride=1, window=L)[L - 1:]   # full windows only
        np.testing.assert_allclose(got[b * S + 1: b * S + steps + 1], want.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- metrics, sweep, report


def test_sentencepiece_metrics_per_word_byte_char():
    # 100 tokens scored of a 101-token split with 40 words, 300 chars, 320 bytes.
    nll_sum, tokens, split_tokens = 250.0, 100, 101
    text = {"words": 40, "chars": 300, "bytes": 320, "lines": 5}
    m = metrics(nll_sum, tokens, "sentencepiece", split_tokens, text)
    per_token = nll_sum / tokens
    assert m["ppl"] == pytest.approx(math.exp(2.5))
    assert m["word_ppl"] == pytest.approx(math.exp(per_token * 101 / 40))
    assert m["bpb"] == pytest.approx(per_token * 101 / 320 / math.log(2))
    assert m["bpc"] == pytest.approx(per_token * 101 / 300 / math.log(2))
    # Every token scored: exactly total NLL / words.
    assert metrics(nll_sum, 40, "sentencepiece", 40, text)["word_ppl"] == pytest.approx(math.exp(250.0 / 40))
    assert set(metrics(nll_sum, tokens, "word", split_tokens, text)) == {"loss", "ppl"}
    assert set(metrics(nll_sum, tokens, "byte", split_tokens, text)) == {"loss", "bpc"}
    with pytest.raises(EvalError, match="no token"):
        metrics(0.0, 0, "word", 10, None)


def test_manifest_records_split_text_statistics(shards):
    """prepare's per-split words/chars/bytes/lines equal counts over the split's decoded text."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in ("train", "valid", "test"):
        text = bytes(raw_tokens(shards, split).astype(np.uint8)).decode("utf-8")   # byte tokenizer
        want = {"words": len(text.split()), "chars": len(text), "bytes": len(text.encode()),
                "lines": text.count("\n")}
        assert manifest["splits"][split]["text"] == want
        assert Manifest.load(shards).split(split).text == want


def test_sweep_report_plot_and_eval_speed(shards, export_dir, tmp_path):
    rep = run_eval(shards, export_dir, tmp_path, "eval.n_streams=4", "eval.tgt_len=8", "eval.max_steps=10",
                   "eval.mem_lens=[0,8,32]", "eval.speed.attn_lens=[16,32]", "eval.speed.cached_tokens=64",
                   "eval.speed.sliding_windows=2", "eval.speed.repeats=1")
    path = Path(rep["path"])
    assert path.parent == tmp_path and path.name == "valid-global_step7-tgt8-sweep-warm.json"
    saved = json.loads(path.read_text())
    assert [r["settings"]["mem_len"] for r in saved["results"]] == [0, 8, 32]
    assert [r["settings"]["start"] for r in saved["results"]] == ["cold", "warm", "warm"]
    assert all(r["tokens"] == 4 * 8 * 10 for r in saved["results"])
    assert saved["source"]["kind"] == "export" and saved["checkpoint"]["step"] == 7
    assert Path(saved["plot"]).read_bytes()[:4] == b"\x89PNG"
    rows = saved["speed"]["rows"]
    assert [r["attn_len"] for r in rows] == [16, 32]
    assert [(r["tgt_len"], r["mem_len"]) for r in rows] == [(8, 8), (8, 24)]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["sliding_s_per_token"] / r["cached_s_per_token"])
        assert r["cached_s_per_token"] > 0 and r["sliding_s_per_token"] > 0


def test_recl_of_a_group_from_exports(shards, export_dir, tmp_path):
    other = make_export(shards, tmp_path / "other", n_layer=1)
    cfg = load_config(CONFIG, [f"data.output={shards}", "tracking.enabled=false", "eval.perplexity=false",
                               f"eval.recl.sources=[{other},{export_dir}]", "eval.recl.names=[one,two]",
                               "eval.recl.contexts=[4,8,16]", "eval.recl.positions=50"])
    rep = evaluate(cfg)
    assert Path(rep["path"]) == other / "eval" / "valid-recl.json"       # beside the first source
    table = rep["recl"]["table"]
    assert table["contexts"] == [4, 8, 16] and table["positions"] == 50
    assert set(table["models"]) == {"two", "one"}
    for row in table["models"].values():
        assert set(row) == {"0.1", "0.5", "1.0"}
        assert all(v["recl"] in (4, 8, 16) for v in row.values())
    assert Path(rep["recl"]["plot"]).is_file()


def test_errors_name_what_is_wrong(shards, export_dir, tmp_path):
    with pytest.raises(ExportError, match="neither a checkpoint"):
        run_eval(shards, tmp_path, tmp_path)
    with pytest.raises(ExportError, match=r"nowhere does not exist; point export.source / eval.source at a run"):
        run_eval(shards, tmp_path / "nowhere", tmp_path)
    other = make_shards(tmp_path / "other", n_docs=120)
    with pytest.raises(EvalError, match="manifest sha256"):
        run_eval(other, export_dir, tmp_path)
    from pipeline.data.streams import StreamError

    with pytest.raises(StreamError, match="n_streams"):
        run_eval(shards, export_dir, tmp_path, "eval.n_streams=100000")
    with pytest.raises(EvalError, match="nothing to evaluate"):
        run_eval(shards, export_dir, tmp_path, "eval.perplexity=false")
    with pytest.raises(EvalError, match="increasing context lengths"):
        run_eval(shards, export_dir, tmp_path, f"eval.recl.sources=[{export_dir}]", "eval.recl.contexts=[8,4]")
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    with pytest.raises(EvalError, match="eval.output=.*a-file is a file, not a directory"):
        run_eval(shards, export_dir, taken)                   # refused before any scoring
    assert taken.read_text() == "mine"


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_run_nested_under_the_training_run(shards, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("train-exp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp).info.run_id
    source = make_export(shards, tmp_path / "export", mlflow_run_id=parent)
    cfg = load_config(CONFIG, [f"data.output={shards}", f"eval.source={source}", f"eval.output={tmp_path}",
                               "eval.n_streams=4", "eval.max_steps=5", "eval.mem_lens=[0,8]",
                               f"tracking.uri={uri}", "tracking.experiment=other-exp",
                               "tracking.system_metrics=false"])
    rep = evaluate(cfg)
    run = client.get_run(rep["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.info.experiment_id == exp                      # beside its training run
    assert run.data.metrics["valid_bpc"] == pytest.approx(rep["results"][0]["metrics"]["bpc"])
    assert run.data.params["eval.mem_lens"] == "[0, 8]"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert names == {f"eval/{Path(rep['path']).name}", f"eval/{Path(rep['plot']).name}"}
    sweep = client.get_metric_history(run.info.run_id, "sweep_valid_bpc")
    assert sorted(m.step for m in sweep) == [0, 8]


# ----------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_equal_one_rank(shards, export_dir, tmp_path):
    args = ["-m", "pipeline.evaluate", "--config", str(CONFIG), f"data.output={shards}",
            f"eval.source={export_dir}", "eval.n_streams=4", "eval.tgt_len=6", "eval.mem_len=12",
            "eval.same_length=true", "tracking.enabled=false"]
    res = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        ran = launch(world, [*args, f"eval.output={out}", f"eval.dump={out / 'dump.npz'}"], cwd=REPO, timeout=300)
        for rc, text in ran:
            assert rc == 0, text[-4000:]
        (path,) = out.glob("*.json")
        res[world] = (json.loads(path.read_text()), np.load(out / "dump.npz")["nll"])
    (one, d1), (two, d2) = res[1], res[2]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["results"][0]["tokens"] == one["results"][0]["tokens"]
    assert two["results"][0]["nll_sum"] == pytest.approx(one["results"][0]["nll_sum"], rel=1e-6)
    np.testing.assert_allclose(d2, d1, rtol=1e-5, atol=1e-6)
    assert np.isfinite(d1).sum() == one["results"][0]["tokens"]


@pytest.mark.slow
def test_from_a_tracked_training_checkpoint(shards, tmp_path):
    """A real 2-rank ZeRO-2 run tracked in MLflow: evaluating its run directory nests under its run,
    and gives the numbers its export gives."""
    import mlflow

    from train_fixtures import TINY

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--config", str(CONFIG), f"data.output={shards}", *TINY, f"train.output={tmp_path / 'run'}",
              "train.zero_stage=2", "train.max_steps=4", "train.save_every=0", "tracking.enabled=true",
              f"tracking.uri={uri}", "tracking.system_metrics=false", "tracking.experiment=t"]
    for rc, text in launch(2, ["-m", "pipeline.train", *common], cwd=REPO, timeout=300):
        assert rc == 0, text[-4000:]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "global_step4" / "xlpipe" / "meta.json").read_text())
    settings = ["eval.n_streams=4", "eval.tgt_len=8", "eval.mem_len=16", "eval.max_steps=20"]
    cfg = load_config(CONFIG, [*common[2:], *settings])
    rep = evaluate(cfg)
    assert Path(rep["path"]).parent == tmp_path / "run" / "eval"
    assert rep["source"]["kind"] == "checkpoint" and rep["checkpoint"] == {"step": 4, "tag": "global_step4"}
    run = mlflow.MlflowClient(uri).get_run(rep["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == meta["mlflow_run_id"]
    from pipeline.export import export

    out = export(load_config(CONFIG, [*common[2:], f"export.output={tmp_path / 'export'}"]))
    assert json.loads((out / "export.json").read_text())["metrics"]  # the evaluation above, by setting
    again = run_eval(shards, out, tmp_path / "from-export", *settings)
    assert again["results"][0]["nll_sum"] == pytest.approx(rep["results"][0]["nll_sum"], rel=1e-12)


def test_compressive_evaluation_equals_the_naive_model_and_reports_attention(shards, tmp_path):
    """A Compressive Transformer export, evaluated with a shorter compressed memory than it was
    built with, against tests/naive_compressive.py over the raw stream tokens (cold start)."""
    from naive_compressive import naive_compressive

    from models.compressive import CompressiveConfig

    export = make_export(shards, tmp_path / "c", family="compressive", tgt_len=4, mem_len=4,
                         compressive=CompressiveConfig(cmem_len=6, ratio=2))
    n, steps = 2, 9
    rep = run_eval(shards, export, tmp_path / "out", f"eval.n_streams={n}", "eval.tgt_len=4", "eval.mem_len=4",
                   "eval.cmem_len=3", "eval.warm_tokens=0", f"eval.max_steps={steps}", "eval.attention_buckets=3")
    row = rep["results"][0]
    assert row["settings"]["cmem_len"] == 3 and row["settings"]["mem_len"] == 4
    x = raw_tokens(shards, "valid")
    L = (len(x) - 1) // n
    model = direct_model(export)
    model.set_lengths(cmem_len=3)
    total = sum(float(naive_compressive(model, torch.from_numpy(x[b * L: b * L + 4 * steps + 1])[None], 4)
                      .double().sum()) for b in range(n))
    assert row["tokens"] == n * 4 * steps
    assert row["nll_sum"] == pytest.approx(total, rel=1e-6)
    attention = row["attention"]
    assert set(attention["regions"]) == {"compressed", "memory", "segment"}
    assert sum(attention["regions"].values()) == pytest.approx(1.0)
    assert attention["regions"]["compressed"] > 0 and len(attention["age_buckets"]["memory"]) == 3
    assert len(attention["per_layer"]["segment"]) == 2


def test_infinite_former_evaluation_equals_the_naive_model(shards, tmp_path):
    """An ∞-former export (sticky off) against tests/naive_infinite.py over the raw stream tokens."""
    from naive_infinite import naive_infinite

    from models.infinite_former import InfiniteFormerConfig

    export = make_export(shards, tmp_path / "i", family="infinite_former", tgt_len=4, mem_len=4,
                         infinite_former=InfiniteFormerConfig(n_basis=8, widths=[0.1, 0.3], n_samples=6))
    n, steps = 2, 8
    rep = run_eval(shards, export, tmp_path / "out", f"eval.n_streams={n}", "eval.tgt_len=4", "eval.mem_len=4",
                   "eval.warm_tokens=0", f"eval.max_steps={steps}")
    row = rep["results"][0]
    x = raw_tokens(shards, "valid")
    L = (len(x) - 1) // n
    model = direct_model(export)
    total = sum(float(naive_infinite(model, torch.from_numpy(x[b * L: b * L + 4 * steps + 1])[None], 4)
                      .double().sum()) for b in range(n))
    assert row["tokens"] == n * 4 * steps
    assert row["nll_sum"] == pytest.approx(total, rel=1e-6)
    assert set(row["attention"]["regions"]) == {"memory", "segment"}
