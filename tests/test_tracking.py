"""pipeline.runtime.tracking against real MLflow stores: SQLite files here, a real server (slow).

What a run holds is read back with plain sqlite3 / the server's REST API / the artifact files,
not through the Tracker.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from pipeline.config import Config, TrackingConfig, flatten
from pipeline.runtime.tracking import MAX_PARAM_VAL_LENGTH, Tracker, tracking_uri

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                                                                    "RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    # One store for the module: creating MLflow's schema costs ~1.5 s.
    return tmp_path_factory.mktemp("mlflow") / "runs.db"


def cfg_for(db: Path, **kw) -> TrackingConfig:
    kw.setdefault("system_metrics", False)
    return TrackingConfig(uri=f"sqlite:///{db}", experiment=kw.pop("experiment", "tests"), **kw)


def query(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args).fetchall()


def run_row(db: Path, run_id: str) -> dict:
    cols = ["status", "artifact_uri", "experiment_id", "name"]
    row = query(db, f"SELECT {', '.join(cols)} FROM runs WHERE run_uuid = ?", run_id)
    assert row, f"run {run_id} not in {db}"
    return dict(zip(cols, row[0]))


def params(db: Path, run_id: str) -> dict:
    return dict(query(db, "SELECT key, value FROM params WHERE run_uuid = ?", run_id))


def tags(db: Path, run_id: str) -> dict:
    return dict(query(db, "SELECT key, value FROM tags WHERE run_uuid = ?", run_id))


def history(db: Path, run_id: str, key: str) -> list[tuple]:
    return query(db, "SELECT step, value FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY step, timestamp",
                 run_id, key)


def artifact_dir(db: Path, run_id: str) -> Path:
    uri = run_row(db, run_id)["artifact_uri"]
    return Path(urllib.parse.urlparse(uri).path)


def test_run_holds_params_metrics_artifacts_tags(db, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    cfg = Config()
    flat = flatten(cfg)
    extra = {f"sweep.p{i:03d}": i for i in range(150)}  # > 100 params: MLflow takes 100 per batch
    long_value = "x" * (MAX_PARAM_VAL_LENGTH + 500)
    note = tmp_path / "note.txt"
    note.write_text("hello\n")

    with Tracker(cfg_for(db)).start(run_name="full", params=flat | extra | {"long": long_value},
                                    tags={"stage": "train"}) as run:
        assert query(db, "SELECT status FROM runs WHERE run_uuid = ?", run.run_id) == [("RUNNING",)]
        for step in range(1, 6):
            run.log_metrics({"loss": 10.0 / step, "lr": torch.tensor(0.5 * step)}, step=step)
        run.log_artifact(note, "misc")
        run.log_dict({"zero": 2, "bf16": True}, "deepspeed.json")
        run.log_text("resolved: yes\n", "config.yaml")

    rid = run.run_id
    assert run_row(db, rid)["status"] == "FINISHED" and run_row(db, rid)["name"] == "full"
    got = params(db, rid)
    assert len(got) == len(flat) + 150 + 1
    assert got["train.lr"] == str(cfg.train.lr) and got["sweep.p149"] == "149"
    assert got["train.betas"] == "[0.9, 0.999]"
    assert got["long"] == long_value[:MAX_PARAM_VAL_LENGTH]

    assert history(db, rid, "loss") == [(s, 10.0 / s) for s in range(1, 6)]
    assert history(db, rid, "lr") == [(s, 0.5 * s) for s in range(1, 6)]

    t = tags(db, rid)
    assert t["stage"] == "train" and t["world_size"] == "1"
    assert t["slurm_job_id"] == "4242" and t["slurm_restart_count"] == "3"
    assert t["torch_version"] == torch.__version__
    assert t["python_version"] == ".".join(map(str, sys.version_info[:3]))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        assert t["git_commit"] == commit.stdout.strip()
    assert t["param_truncated.long"] == f"{len(long_value)} characters"

    art = artifact_dir(db, rid)
    assert (art / "misc" / "note.txt").read_text() == "hello\n"
    assert json.loads((art / "deepspeed.json").read_text()) == {"zero": 2, "bf16": True}
    assert (art / "config.yaml").read_text() == "resolved: yes\n"
    assert json.loads((art / "params" / "truncated.json").read_text()) == {"long": long_value}
    assert art.is_relative_to(db.parent)  # artifacts beside the database, not in the cwd


def test_resume_continues_the_same_run(db):
    cfg = cfg_for(db, experiment="resume")
    with Tracker(cfg).start(run_name="first", params={"a": 1, "b": 2}) as run:
        run.log_metrics({"loss": 3.0}, step=1)
    rid = run.run_id

    with Tracker(cfg).start(run_id=rid, params={"a": 1, "b": 3, "c": 4}) as again:
        assert again.run_id == rid
        assert run_row(db, rid)["status"] == "RUNNING"
        again.log_metrics({"loss": 2.0}, step=2)
    assert run_row(db, rid)["status"] == "FINISHED"
    assert params(db, rid) == {"a": "1", "b": "2", "c": "4"}  # MLflow params are immutable
    t = tags(db, rid)
    assert t["param_changed.b"] == "3" and "param_changed.a" not in t and "resumed_at" in t
    assert history(db, rid, "loss") == [(1, 3.0), (2, 2.0)]
    exp = run_row(db, rid)["experiment_id"]
    assert query(db, "SELECT COUNT(*) FROM runs WHERE experiment_id = ?", exp) == [(1,)]


def test_resume_from_mlflow_run_id_env(db, monkeypatch):
    cfg = cfg_for(db, experiment="resume-env")
    with Tracker(cfg).start(run_name="first") as run:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", run.run_id)
    with Tracker(cfg).start() as again:
        with again.child("eval") as child:  # a child is a new run, not the one named in the env
            pass
    assert again.run_id == run.run_id and child.run_id != run.run_id
    assert tags(db, child.run_id)["mlflow.parentRunId"] == run.run_id


def test_resume_unknown_run_is_a_clear_error(db):
    with pytest.raises(Exception, match="cannot resume MLflow run 'f00d'.*does not exist"):
        Tracker(cfg_for(db)).start(run_id="f00d")


@pytest.mark.parametrize("how, status", [
    ("exception", "FAILED"),
    ("ctrl-c", "KILLED"),
    ("exit-1", "KILLED"),
    ("exit-0", "FINISHED"),
    ("preempted-requeued", "SCHEDULED"),
    ("preempted-stopped", "KILLED"),
])
def test_end_status(db, how, status):
    exc = {"exception": ValueError("bad batch"), "ctrl-c": KeyboardInterrupt(), "exit-1": SystemExit(1),
           "exit-0": SystemExit(0)}.get(how)
    run = Tracker(cfg_for(db, experiment="status")).start(run_name=how)
    try:
        with run:
            if how.startswith("preempted"):
                run.mark_preempted(requeued=how == "preempted-requeued", step=7)
            if exc is not None:
                raise exc
    except (ValueError, KeyboardInterrupt, SystemExit):
        pass
    assert run_row(db, run.run_id)["status"] == status
    t = tags(db, run.run_id)
    if how == "exception":
        assert t["error"] == "ValueError: bad batch"
    if how.startswith("preempted"):
        assert t["preempted_at_step"] == "7" and t["requeued"] == str(how == "preempted-requeued").lower()


def test_nested_child_run(db):
    with Tracker(cfg_for(db, experiment="nested")).start(run_name="train") as parent:
        with parent.child("eval-mem640", params={"eval.mem_len": 640}) as child:
            child.log_metrics({"valid_ppl": 24.0}, step=100)
        assert run_row(db, child.run_id)["status"] == "FINISHED"
        assert run_row(db, parent.run_id)["status"] == "RUNNING"
    assert tags(db, child.run_id)["mlflow.parentRunId"] == parent.run_id
    assert params(db, child.run_id) == {"eval.mem_len": "640"}
    # A child started in another process (an evaluation job) under the finished training run.
    with Tracker(cfg_for(db, experiment="nested")).start(run_name="eval-job", parent_run_id=parent.run_id) as ev:
        pass
    assert tags(db, ev.run_id)["mlflow.parentRunId"] == parent.run_id


def test_system_metrics_are_logged(db):
    with Tracker(cfg_for(db, experiment="sysmetrics", system_metrics=True,
                         system_metrics_interval=0.3)).start() as run:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not history(db, run.run_id, "system/cpu_utilization_percentage"):
            time.sleep(0.2)
    keys = {k for (k,) in query(db, "SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", run.run_id)}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys


def test_default_uri_and_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri(TrackingConfig()) == "http://mlflow.example:5000"
    assert tracking_uri(TrackingConfig(uri="sqlite:////x/y.db")) == "sqlite:////x/y.db"


def test_disabled_and_non_zero_rank_do_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    off = Tracker(TrackingConfig(enabled=False)).start(run_name="x", params={"a": 1})
    off.log_metrics({"loss": 1.0}, step=1)
    off.end()
    rank1 = Tracker(TrackingConfig(), rank=1).start(run_name="x", params={"a": 1})
    rank1.log_metrics({"loss": 1.0}, step=1)
    rank1.log_dict({"a": 1}, "a.json")
    rank1.end()
    assert off.run_id is None and rank1.run_id is None and not rank1.active
    assert list(tmp_path.iterdir()) == []  # no store, no artifacts


@pytest.mark.slow  # two interpreters importing torch, DeepSpeed and MLflow
def test_two_ranks_only_rank0_logs(tmp_path):
    db = tmp_path / "two.db"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "tracking_worker.py"), f"sqlite:///{db}"],
                                      env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = outs
    assert r1["run_id"] == r0["run_id"] and r1["child_id"] == r0["child_id"]  # by broadcast
    assert r0["active"] and r0["has_client"] and not r1["active"] and not r1["has_client"]
    rid, cid = r0["run_id"], r0["child_id"]
    assert query(db, "SELECT COUNT(*) FROM runs") == [(2,)]  # one run + its child, not one per rank
    assert params(db, rid) == {"logged_by": "0"} and params(db, cid) == {"child_logged_by": "0"}
    metric_keys = {k for (k,) in query(db, "SELECT DISTINCT key FROM metrics WHERE run_uuid IN (?, ?)", rid, cid)}
    assert metric_keys == {"from_rank_0", "child_from_rank_0"}
    t = tags(db, rid)
    assert t["world_size"] == "2" and "tag_from_rank_0" in t and "tag_from_rank_1" not in t
    assert sorted(p.name for p in artifact_dir(db, rid).iterdir()) == ["rank0.txt"]
    assert not (tmp_path / "mlruns.db").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str | None = None, auth: tuple[str, str] | None = None) -> tuple[int, dict]:
    headers = {"Host": host} if host else {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
            return r.status, json.loads(body) if body.startswith(b"{") else {}
    except urllib.error.HTTPError as e:
        return e.code, {}


@contextlib.contextmanager
def served(tmp_path: Path, *args: str):
    """cluster/mlflow_server.sh on a free port (connected to through 127.0.0.1); stopped by its PID."""
    import psutil

    port = _free_port()
    store = tmp_path / "server"
    log = open(tmp_path / "server.log", "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow_server.sh"), "--port", str(port),
                             "--store", str(store), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    children = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.3)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield url, store, tmp_path / "server.log"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"server processes left after SIGTERM: {alive}"


@pytest.fixture
def mlflow_server(tmp_path):
    """The documented default: 127.0.0.1, no authentication."""
    with served(tmp_path, "--host", "127.0.0.1") as server:
        yield server


@pytest.mark.slow
def test_real_server_receives_a_run(mlflow_server, monkeypatch, tmp_path):
    url, store, log = mlflow_server
    assert f"export MLFLOW_TRACKING_URI={url}" in log.read_text()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.chdir(tmp_path)
    with Tracker(TrackingConfig(experiment="served", system_metrics=False)).start(
            run_name="via-server", params={"model.n_layer": 16}) as run:
        run.log_metrics({"loss": 4.0}, step=1)
        run.log_metrics({"loss": 3.5}, step=2)
        run.log_text("report\n", "eval/report.txt")
    assert not (tmp_path / "mlruns.db").exists()  # the URI was honoured, nothing local

    status, body = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run.run_id}")
    assert status == 200
    info, data = body["run"]["info"], body["run"]["data"]
    assert info["status"] == "FINISHED" and info["run_name"] == "via-server"
    assert {p["key"]: p["value"] for p in data["params"]} == {"model.n_layer": "16"}
    _, hist = _get(f"{url}/api/2.0/mlflow/metrics/get-history?run_id={run.run_id}&metric_key=loss")
    assert [(m["step"], m["value"]) for m in hist["metrics"]] == [(1, 4.0), (2, 3.5)]
    # Artifacts were proxied into the server's store.
    found = list((store / "artifacts").rglob("report.txt"))
    assert len(found) == 1 and found[0].read_text() == "report\n"
    # Host headers: on loopback only localhost names are served (no DNS rebinding, no other names).
    by_name = f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=served"
    assert _get(by_name, host="localhost:1")[0] == 200
    assert _get(by_name, host=f"{socket.gethostname()}:1")[0] == 403
    assert _get(by_name, host="evil.example")[0] == 403


def _credentials(tmp_path: Path, mode: int = 0o600) -> Path:
    creds = tmp_path / "mlflow-admin"
    creds.write_text("xladmin:s3cret%password\n")
    creds.chmod(mode)
    return creds


@pytest.mark.slow
def test_beyond_loopback_the_server_needs_credentials_only_its_user_can_read(tmp_path):
    script = ["bash", str(REPO / "cluster" / "mlflow_server.sh"), "--store", str(tmp_path / "s")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MLFLOW_"))}
    res = subprocess.run([*script, "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=30)
    assert res.returncode == 2 and "refusing to listen on 0.0.0.0 without authentication" in res.stderr
    loose = _credentials(tmp_path, 0o644)
    res = subprocess.run([*script, "--host", "0.0.0.0", "--auth", str(loose)], capture_output=True, text=True,
                         env=env, timeout=30)
    assert res.returncode == 2 and "readable by you only (chmod 600" in res.stderr
    assert not (tmp_path / "s").exists()                     # refused before anything was written


@pytest.mark.slow
def test_an_authenticated_server_refuses_anonymous_requests_and_takes_a_training_run(tmp_path, monkeypatch):
    creds = _credentials(tmp_path)
    with served(tmp_path, "--host", "0.0.0.0", "--auth", str(creds)) as (url, store, log):
        text = log.read_text()
        assert "export MLFLOW_TRACKING_USERNAME=xladmin" in text and "s3cret" not in text
        assert oct((store / "basic_auth.ini").stat().st_mode & 0o777) == "0o600"
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
        assert _get(search)[0] == 401                                      # no credentials
        assert _get(search, auth=("xladmin", "wrong"))[0] == 401
        assert _get(search, auth=("xladmin", "s3cret%password"))[0] == 200
        # A training stage logs through MLflow's own client variables.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "xladmin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret%password")
        monkeypatch.chdir(tmp_path)
        with Tracker(TrackingConfig(experiment="guarded", system_metrics=False)).start(run_name="authed") as run:
            run.log_metrics({"loss": 2.5}, step=1)
        status, body = _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run.run_id}", auth=("xladmin", "s3cret%password"))
        assert status == 200 and body["run"]["info"]["status"] == "FINISHED"
        assert _get(f"{url}/api/2.0/mlflow/runs/get?run_id={run.run_id}")[0] == 401
