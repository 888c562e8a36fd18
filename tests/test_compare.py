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


def write_config(tmp_path, shards, out) -> str:
    cfg = {"compare": {"output": str(out), "splits": ["valid"],
                       "members": [{"name": "txl", "overrides": []},
                                   {"name": "lstm", "overrides": ["model.family=lstm", "model.lstm.proj_size=16"]}]},
           "eval": {"tgt_len": 8, "n_streams": 2, "mem_lens": [0, 8], "warm_tokens": 0, "max_steps": 5,
                    "recl": {"contexts": [4, 8, 16], "positions": 40, "batch_size": 8}}}
    path = tmp_path / f"compare-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_compare(tmp_path, shards, name: str, db) -> dict:
    from pipeline.compare import compare

    out = tmp_path / name
    config = write_config(tmp_path, shards, out)
    overrides = [f"data.output={shards}", *TINY, "train.max_steps=4", "train.save_every=4", "train.eval_every=2",
                 "tracking.enabled=true", f"tracking.uri=sqlite:///{db}", "tracking.system_metrics=false",
                 "tracking.experiment=test-compare"]
    overrides = [o for o in overrides if o != "tracking.enabled=false"]
    cfg = load_config(config, overrides)
    return compare(cfg, config, overrides)


def test_compare_trains_evaluates_and_reports(tmp_path):
    shards = make_shards(tmp_path / "data", n_docs=200)
    db = tmp_path / "mlflow.db"
    report = run_compare(tmp_path, shards, "a", db)
    members = report["members"]
    assert list(members) == ["txl", "lstm"]
    assert members["txl"]["family"] == "transformer_xl" and members["lstm"]["family"] == "lstm"
    for m in members.values():
        assert m["steps"] == 4 and m["tokens_seen"] == 4 * 4 * 8 and m["parameters"] > 0
        assert [r["mem_len"] for r in m["eval"]["valid"]] == [0, 8]
        assert len(m["valid_curve"]) == 2                 # validation at steps 2 and 4, from MLflow
    assert set(report["recl"]["table"]["models"]) == {"txl", "lstm"}
    assert (tmp_path / "a" / "report.md").read_text().count("|") > 10
    assert set(report["plots"]) >= {"valid_loss", "memory"}
    # One parent run, each member's training nested under it.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    for m in members.values():
        assert client.get_run(m["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == report["parent_run_id"]
    # The same seeds, a fresh directory: the same numbers.
    again = run_compare(tmp_path, shards, "b", db)
    for name in members:
        assert again["members"][name]["eval"] == members[name]["eval"]
    assert json.loads((tmp_path / "b" / "report.json").read_text())["members"]["txl"]["eval"] == members["txl"]["eval"]
