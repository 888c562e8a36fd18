"""pipeline.compare end to end on a tiny corpus: two families trained as their own processes under one
MLflow parent run, evaluated with the same settings, RECL over the pair, one report; a re-run in a
fresh directory gives the same numbers (seeded training)."""
from __future__ import annotations

import json

import pytest
import yaml

from pipeline.config import load_config

from train_fixtures import TINY, make_shards

pytestmark = pytest.mark.slow


MEMBERS = [{"name": "txl", "overrides": []},
           {"name": "lstm", "overrides": ["model.family=lstm", "model.lstm.proj_size=16"]}]


def write_config(tmp_path, shards, out, seeds=(), members=MEMBERS) -> str:
    cfg = {"compare": {"output": str(out), "splits": ["valid"], "seeds": list(seeds), "members": list(members)},
           "eval": {"tgt_len": 8, "n_streams": 2, "mem_lens": [0, 8], "warm_tokens": 0, "max_steps": 5,
                    "recl": {"contexts": [4, 8, 16], "positions": 40, "batch_size": 8}}}
    path = tmp_path / f"compare-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_compare(tmp_path, shards, name: str, db, seeds=(), members=MEMBERS) -> dict:
    from pipeline.compare import compare

    out = tmp_path / name
    config = write_config(tmp_path, shards, out, seeds, members)
    overrides = [f"data.output={shards}", *TINY, "train.max_steps=4", "train.save_every=4", "train.eval_every=2",
                 "tracking.enabled=true", f"tracking.uri=sqlite:///{db}", "tracking.system_metrics=false",
                 "tracking.experiment=test-compare"]
    overrides = [o for o in overrides if o != "tracking.enabled=false"]
    cfg = load_config(config, overrides)
    return compare(cfg, config, overrides)


def test_compare_trains_evaluates_and_reports(tmp_path):
    shards = make_shards(tmp_path / "data", n_docs=200)
    db = tmp_path / "mlflow.db"
    # Two seeds: the config's own (1111) and another; the report's value is their mean.
    report = run_compare(tmp_path, shards, "a", db, seeds=[1111, 7])
    members = report["members"]
    assert list(members) == ["txl", "lstm"] and report["seeds"] == [1111, 7]
    assert members["txl"]["family"] == "transformer_xl" and members["lstm"]["family"] == "lstm"
    for name, m in members.items():
        assert m["steps"] == 4 and m["tokens_seen"] == 4 * 4 * 8 and m["parameters"] > 0
        assert [r["mem_len"] for r in m["eval"]["valid"]] == [0, 8]
        assert len(m["valid_curve"]) == 2                 # validation at steps 2 and 4, from MLflow
        by_seed = m["seeds"]
        assert by_seed["7"]["eval"] != by_seed["1111"]["eval"]
        for row, a, b in zip(m["eval"]["valid"], by_seed["1111"]["eval"]["valid"], by_seed["7"]["eval"]["valid"]):
            assert row["loss_seeds"] == [a["loss"], b["loss"]]
            assert row["loss"] == pytest.approx((a["loss"] + b["loss"]) / 2, abs=1e-12)
        assert (tmp_path / "a" / name / "seed-7" / "checkpoints").is_dir()
    assert set(report["recl"]["table"]["models"]) == {"txl", "lstm"}
    assert set(report["recl_seeds"]) == {"1111", "7"} and report["recl_seeds"]["1111"] == report["recl"]["table"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert md.count("|") > 10 and "±" in md
    assert set(report["plots"]) >= {"valid_loss", "memory"}
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved["members"]["txl"]["seeds"]["1111"]["eval"] == members["txl"]["seeds"]["1111"]["eval"]
    # One parent run, each member's training nested under it.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    for m in members.values():
        for run in m["seeds"].values():
            assert client.get_run(run["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == report["parent_run_id"]
    # Without compare.seeds, in a fresh directory: the config's own seed trains again to the same
    # numbers (seeded training, its own process), under <output>/<name>.
    again = run_compare(tmp_path, shards, "b", db, members=MEMBERS[:1])
    assert again["seeds"] == [1111] and list(again["members"]) == ["txl"]
    assert again["members"]["txl"]["seeds"]["1111"]["eval"] == members["txl"]["seeds"]["1111"]["eval"]
    assert (tmp_path / "b" / "txl" / "checkpoints").is_dir()


def test_compare_refuses_repeated_seeds(tmp_path):
    from pipeline.compare import CompareError, compare

    config = write_config(tmp_path, None, tmp_path / "out", seeds=[3, 3])
    with pytest.raises(CompareError, match="repeats a seed"):
        compare(load_config(config, ["tracking.enabled=false"]), config)
