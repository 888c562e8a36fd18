"""A tiny training read back from MLflow's REST API and from its UI in headless chromium.

Two stores, each with a real training (``python -m pipeline.train``, 6 steps of the tiny model):
the tracking server of ``cluster/mlflow_server.sh`` (through ``MLFLOW_TRACKING_URI``) and the
embedded SQLite store that ``make ui`` serves. The run, its params, metrics and artifacts are read
with plain HTTP; the UI must show the run, its loss metric and the model-training view (MLflow
3.17 opens an experiment as a GenAI app, "Evaluation runs", unless told otherwise). Screenshots
are kept (``$XLPIPE_TEST_ARTIFACTS``, else the test's tmp dir; the path is printed).
"""
from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import TrackingConfig
from pipeline.runtime.tracking import Tracker

from train_fixtures import REPO, TINY, clean_env, free_port, launch, make_shards
from ui_harness import (
    chromium,  # noqa: F401  (pytest fixture)
    get_bytes,
    get_json,
    group_alive,
    keep_artifact,
    render,
    served_mlflow,
)

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
EXPERIMENT = "xlpipe-ui"
ML_VIEW = "?workflowType=machine_learning"


# ----------------------------------------------------------------------------- experiment kind


def _experiment_tags(db: Path, name: str) -> dict:
    with sqlite3.connect(db) as con:
        return dict(con.execute("SELECT t.key, t.value FROM experiment_tags t JOIN experiments e "
                                "ON e.experiment_id = t.experiment_id WHERE e.name = ?", (name,)).fetchall())


@pytest.mark.filterwarnings("ignore:.*noload.* loader strategy is deprecated")
def test_experiments_are_tagged_model_training_without_overriding_a_kind(tmp_path):
    import mlflow

    db = tmp_path / "kind.db"
    uri = f"sqlite:///{db}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())  # made before the tag
    genai = client.create_experiment("mine", artifact_location=(tmp_path / "b").as_uri())
    client.set_experiment_tag(genai, KIND_TAG, "genai_development")                  # a user's choice

    for name in ("new", "old", "mine"):
        with Tracker(TrackingConfig(uri=uri, experiment=name, system_metrics=False)).start(run_name=name):
            pass
    assert _experiment_tags(db, "new")[KIND_TAG] == KIND
    assert _experiment_tags(db, "old")[KIND_TAG] == KIND
    assert _experiment_tags(db, "mine")[KIND_TAG] == "genai_development"


# ----------------------------------------------------------------------------- server and UI


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("ui-data"))


def train(shards: Path, out: Path, run_name: str, cwd: Path, env: dict | None = None) -> str:
    """6 steps of the tiny model, tracked; returns the training's log."""
    args = ["-m", "pipeline.train", "--config", str(REPO / "configs" / "tiny.yaml"), f"data.output={shards}",
            *TINY, f"train.output={out}", "tracking.enabled=true", "tracking.system_metrics=false",
            f"tracking.experiment={EXPERIMENT}", f"tracking.run_name={run_name}"]
    [(rc, text)] = launch(1, args, cwd=cwd, env=env)
    assert rc == 0, f"training failed:\n{text[-6000:]}"
    return text


def check_rest(url: str, run_name: str, out: Path, artifacts_proxied: bool) -> tuple[str, str]:
    """The run as MLflow's REST API returns it, against the training's own files; (experiment, run) ids."""
    api = f"{url}/api/2.0/mlflow"
    exp = get_json(f"{api}/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}.get(KIND_TAG) == KIND
    runs = get_json(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                            "filter": f"attributes.run_name = '{run_name}'"})["runs"]
    assert len(runs) == 1, runs
    rid = runs[0]["info"]["run_id"]
    run = get_json(f"{api}/runs/get?run_id={rid}")["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == run_name

    config = yaml.safe_load((out / "config.yaml").read_text())   # what training resolved and saved
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.n_layer"] == "2" == str(config["model"]["n_layer"])
    assert params["train.max_steps"] == "6" and params["tracking.experiment"] == EXPERIMENT
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["stage"] == "train" and tags["world_size"] == "1"

    hist = get_json(f"{api}/metrics/get-history?run_id={rid}&metric_key=loss")["metrics"]
    assert [m["step"] for m in hist] == [2, 4, 6]                 # train.log_every=2, max_steps=6
    assert all(0 < m["value"] < 10 for m in hist)                  # bytes: ln 256 = 5.5 at the start
    latest = {m["key"] for m in run["data"]["metrics"]}
    assert {"loss", "lr", "tokens_per_s"} <= latest

    listed = get_json(f"{api}/artifacts/list?run_id={rid}")
    assert {"config.yaml", "deepspeed.json"} <= {f["path"] for f in listed.get("files", [])}
    if artifacts_proxied:   # the server holds them; download through its artifact proxy
        got = get_bytes(f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp['experiment_id']}/{rid}"
                        f"/artifacts/config.yaml")
    else:                   # the UI's own download route over a local store
        got = get_bytes(f"{url}/get-artifact?path=config.yaml&run_uuid={rid}")
    assert got == (out / "config.yaml").read_bytes()
    return exp["experiment_id"], rid


def check_ui(chromium: str, url: str, exp_id: str, rid: str, run_name: str, tmp_path: Path, tag: str) -> None:
    """The run page and the experiment's runs table, in the model-training view."""
    shots = []
    run_page = render(chromium, f"{url}/#/experiments/{exp_id}/runs/{rid}{ML_VIEW}",
                      tmp_path / f"mlflow-ui-{tag}-run.png", tmp_path / f"profile-{tag}-run")
    shots.append(run_page.screenshot)
    table = render(chromium, f"{url}/#/experiments/{exp_id}{ML_VIEW}",
                   tmp_path / f"mlflow-ui-{tag}-experiment.png", tmp_path / f"profile-{tag}-experiment")
    shots.append(table.screenshot)
    kept = [keep_artifact(p) for p in shots]
    print(f"\nMLflow UI screenshots ({tag}): " + ", ".join(map(str, kept)))

    for page in (run_page, table):
        assert page.screenshot.stat().st_size > 10_000, f"blank screenshot of {page.url}"
        # Model training: the experiment's Runs tab and the model registry in the sidebar, nothing
        # of the GenAI view (its "Evaluation runs" tab, the "Evaluations" breadcrumb).
        runs_tab = [h for h, t in page.links if t == "Runs" and h.split("?")[0] == f"#/experiments/{exp_id}/runs"
                    and "workflowType=machine_learning" in h]
        assert runs_tab, page.text[:3000]
        assert "Model registry" in page.link_texts("#/models"), page.text[:3000]
        assert not [h for h, _ in page.links if "evaluation-runs" in h], page.text[:3000]
        assert "Evaluation runs" not in page.text and "Evaluations" not in page.text
        assert run_name in page.text, page.text[:3000]
    # The run page: its name as the title, the breadcrumb back to the runs, the loss metric.
    assert f"Run {rid} - MLflow" in run_page.dom
    assert "Runs" in run_page.link_texts(f"#/experiments/{exp_id}/runs")
    assert "loss" in run_page.link_texts(f"#/experiments/{exp_id}/runs/{rid}/model-metrics"), run_page.text[:3000]
    assert "Parameters" in run_page.text and "model.n_layer" in run_page.text
    # The experiment page opened on its runs table, with the run in it.
    assert f"Runs - Experiment {exp_id} - MLflow" in table.text
    assert run_name in table.link_texts(f"#/experiments/{exp_id}/runs/{rid}"), table.text[:3000]


@pytest.mark.slow
def test_a_training_on_the_cluster_server_reads_back_over_rest_and_in_the_ui(shards, chromium, tmp_path):
    port, store, out = free_port(), tmp_path / "store", tmp_path / "run"
    url = f"http://127.0.0.1:{port}"
    cmd = ["bash", str(REPO / "cluster" / "mlflow_server.sh"), "--port", str(port), "--store", str(store)]
    t0 = time.monotonic()
    with served_mlflow(cmd, url, tmp_path / "server.log", env=clean_env()) as proc:
        banner = (tmp_path / "server.log").read_text()
        assert f"ssh -N -L 5000:127.0.0.1:{port} " in banner and "http://localhost:5000/" in banner
        log = train(shards, out, "ui-server", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
        assert not (tmp_path / "mlruns.db").exists()                        # nothing went to a local store
        exp_id, rid = check_rest(url, "ui-server", out, artifacts_proxied=True)
        assert list((store / "artifacts").rglob("deepspeed.json"))          # proxied into the server's store
        # The link training prints opens the run in the model-training view.
        assert f"MLflow UI: {url}/#/experiments/{exp_id}/runs/{rid}{ML_VIEW}" in log
        check_ui(chromium, url, exp_id, rid, "ui-server", tmp_path, "server")
    assert proc.stopped_by_term and not group_alive(proc.pid), "MLflow server processes needed SIGKILL"
    print(f"server test: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_make_ui_serves_a_training_of_the_embedded_store(shards, chromium, tmp_path):
    work, out = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    t0 = time.monotonic()
    train(shards, out, "ui-embedded", cwd=work)                             # no URI: sqlite:///<cwd>/mlruns.db
    db = work / "mlruns.db"
    assert db.exists()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The Makefile's own target on a free port; -o: never reinstall the venv from a test.
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed-stamp", "ui",
           f"UI_PORT={port}", f"UI_STORE=sqlite:///{db}"]
    dry = subprocess.run([*cmd, "-n"], capture_output=True, text=True, check=True).stdout
    assert "mlflow ui" in dry and f"--port {port}" in dry and "pip install" not in dry
    with served_mlflow(cmd, url, tmp_path / "ui.log", env=clean_env()) as proc:
        exp_id, rid = check_rest(url, "ui-embedded", out, artifacts_proxied=False)
        check_ui(chromium, url, exp_id, rid, "ui-embedded", tmp_path, "embedded")
    assert proc.stopped_by_term and not group_alive(proc.pid), "mlflow ui processes needed SIGKILL"
    print(f"embedded test: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_the_server_script_stops_early_on_a_bad_store_or_a_busy_port(tmp_path):
    script = ["bash", str(REPO / "cluster" / "mlflow_server.sh")]
    env = clean_env()

    def refused(*args: str) -> str:
        res = subprocess.run([*script, *args], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "xlpipe MLflow server" not in res.stdout        # nothing started
        return res.stderr

    free = str(free_port())
    assert "parent directory" in refused("--port", free, "--store", str(tmp_path / "no" / "store"))
    assert not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("")
    assert "not a directory" in refused("--port", free, "--store", str(tmp_path / "file"))
    assert "not a port number" in refused("--port", "70000", "--store", str(tmp_path / "s"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        err = refused("--port", port, "--store", str(tmp_path / "s"))
    assert f"127.0.0.1:{port}" in err and "already in use" in err and "another --port" in err
    assert not (tmp_path / "s").exists()                          # refused before the store was made


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not Path("/usr/bin/setpriv").exists(),
                    reason="as root the check needs setpriv (util-linux) to run as nobody")
def test_the_server_script_refuses_a_store_it_cannot_write():
    # Root writes anywhere, so the check runs as nobody over a directory that is root's.
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)
        store = base / "store"
        store.mkdir(mode=0o555)
        store.chmod(0o555)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        for target, expect in ((store, "not writable by"), (store / "sub", "cannot create it in")):
            res = subprocess.run([*prefix, "bash", str(REPO / "cluster" / "mlflow_server.sh"), "--port",
                                  str(free_port()), "--store", str(target)],
                                 capture_output=True, text=True, env=clean_env(), timeout=60)
            assert res.returncode == 2 and expect in res.stderr, res.stdout + res.stderr
        assert list(store.iterdir()) == []
    finally:
        store.chmod(0o755)
        subprocess.run(["rm", "-rf", str(base)], check=False)
