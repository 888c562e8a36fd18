"""Integration tier: pipeline.runtime.distributed under a real SLURM (munged + slurmctld + slurmd).

The cluster comes from tests/slurm_harness.py (skips without the Debian packages unless
XLPIPE_REQUIRE_SLURM=1). Each job runs the venv's python from the repo root.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from slurm_harness import REPO, slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slow
PY = sys.executable


def job_env() -> dict[str, str]:
    # Jobs inherit the submitting environment (sbatch --export=ALL).
    return {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def wait_files(paths, timeout: float = 90.0, cluster=None, job=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in paths):
            return
        if cluster is not None and cluster.job(job).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.2)
    missing = [str(p) for p in paths if not p.exists()]
    if not missing:  # written just as the job left RUNNING (e.g. requeued right after)
        return
    out = cluster.job(job) if cluster is not None else {}
    log = Path(out.get("StdOut", "")).read_text() if out.get("StdOut") and Path(out["StdOut"]).exists() else ""
    raise AssertionError(f"missing {missing}; job {out.get('JobState')}; output:\n{log}")


def test_srun_resolves_ranks_and_all_reduces(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(["-n", "2", f"--chdir={REPO}", f"--output={out}",
                                "--wrap", f"srun {PY} -m pipeline.runtime.distributed"], env=job_env())
    info = slurm_cluster.wait(job, timeout=120)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    reports = sorted((json.loads(line) for line in text.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1], text
    # Independent expectations: SLURM's own node list and the documented port rule.
    first = slurm_cluster.run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()[0]
    for r in reports:
        assert r["launcher"] == "srun"
        assert r["world_size"] == 2 and r["local_rank"] == r["rank"]
        assert r["slurm_job_id"] == job
        assert r["master_addr"] == first
        assert r["master_port"] == 20000 + int(job) % 12000
        assert r["rank0_master"] == f"{first}:{r['master_port']}"
        assert r["backend"] == "gloo"
        assert r["all_reduce_sum"] == 1 + 2  # ranks contribute rank + 1
    assert reports[0]["pid"] != reports[1]["pid"]


def _wait_gone(pid: int, timeout: float = 60.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    raise AssertionError(f"task {pid} of the first run is still alive {timeout:.0f} s after the requeue")


def test_one_rank_signalled_both_stop_then_requeue(slurm_cluster, tmp_path):
    """SIGUSR1 to rank 1 only: both ranks stop at the same step; rank 0 requeues; run 2 resumes."""
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch(["-n", "2", "--requeue", "--open-mode=append", f"--chdir={REPO}",
                                f"--output={out}", "--wrap",
                                f"srun {PY} tests/preempt_worker.py {tmp_path}"], env=job_env())
    ready = [tmp_path / f"ready-{r}.json" for r in (0, 1)]
    wait_files(ready, cluster=slurm_cluster, job=job)
    pid1 = json.loads(ready[1].read_text())["pid"]
    os.kill(pid1, signal.SIGUSR1)

    stops = [tmp_path / f"stop-{r}.json" for r in (0, 1)]
    wait_files(stops + [tmp_path / "requeue-0.json"], cluster=slurm_cluster, job=job)
    s0, s1 = (json.loads(p.read_text()) for p in stops)
    assert s0["step"] is not None and s0["step"] == s1["step"]  # agreed at one boundary
    assert s1["received"] == "SIGUSR1" and s0["received"] is None  # only rank 1 was signalled
    assert json.loads((tmp_path / "requeue-0.json").read_text())["requeued"] is True

    # SLURM counts the requeue; the job waits (Reason=BeginTime) before it may start again.
    info = slurm_cluster.wait(job, timeout=60, until=lambda i: i.get("Restarts") == "1"
                              and i.get("JobState") == "PENDING")
    # The first run's tasks must be gone before the second starts: it rendezvouses on the same
    # port (derived from the job id), which a slow-to-exit task of the first run would still hold.
    for path in ready:
        _wait_gone(json.loads(path.read_text())["pid"])
    slurm_cluster.release(job)
    info = slurm_cluster.wait(job, timeout=120)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (
        f"{info}\n--- job output\n{out.read_text()}\n--- slurmctld\n{slurm_cluster.logs('slurmctld')}"
        f"\n--- slurmd\n{slurm_cluster.logs('slurmd')}")
    for r in (0, 1):
        resumed = json.loads((tmp_path / f"resumed-{r}.json").read_text())
        assert resumed["restart_count"] == 1 and resumed["world_size"] == 2
        assert resumed["ranks_seen"] == 2.0
    assert "DUE TO JOB REQUEUE" in out.read_text()  # --open-mode=append kept the first run's log


def test_scancel_signal_reaches_every_task_not_the_batch_shell(slurm_cluster, tmp_path):
    """``scancel --signal=USR1`` (what ``--signal=USR1@N`` without B: does) reaches each srun task."""
    out = tmp_path / "job.out"
    # The batch shell would die on an unhandled USR1; it must survive and report the step's status.
    job = slurm_cluster.sbatch(["-n", "2", f"--chdir={REPO}", f"--output={out}", "--wrap",
                                f"srun {PY} tests/preempt_worker.py {tmp_path} --no-requeue; echo step-exit=$?"],
                               env=job_env())
    wait_files([tmp_path / f"ready-{r}.json" for r in (0, 1)], cluster=slurm_cluster, job=job)
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    wait_files([tmp_path / f"stop-{r}.json" for r in (0, 1)], cluster=slurm_cluster, job=job)
    stops = [json.loads((tmp_path / f"stop-{r}.json").read_text()) for r in (0, 1)]
    assert [s["received"] for s in stops] == ["SIGUSR1", "SIGUSR1"]
    assert stops[0]["step"] == stops[1]["step"]
    info = slurm_cluster.wait(job, timeout=60)
    assert info["JobState"] == "COMPLETED" and "step-exit=0" in out.read_text(), out.read_text()


def test_requeue_refused_by_scontrol_is_logged(slurm_cluster, monkeypatch, caplog):
    import logging

    from pipeline.runtime import distributed

    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    monkeypatch.delenv("RANK", raising=False)
    with caplog.at_level(logging.ERROR, logger="pipeline.runtime.distributed"):
        assert distributed.requeue("1") is False  # no such job on this cluster
    assert "scontrol requeue 1 exited" in caplog.text and "Invalid job id" in caplog.text


# ---------------------------------------------------------------------------- cluster/*.sh

# Stands in for pipeline.train in the tests of the scripts' own behaviour (headers, warnings,
# chaining): the same CLI, then the self-check. The training stage itself runs for real below.
STUB_STAGE = '''
import json, os, sys
from pipeline.runtime import distributed
from pipeline.config import arg_parser
args = arg_parser("train", "stub").parse_args()
report = distributed.self_check()
report.update(argv=sys.argv[1:], omp=os.environ.get("OMP_NUM_THREADS"), config=args.config,
              overrides=args.overrides, python=sys.executable)
print(json.dumps(report), flush=True)
'''


def _copy_repo(root):
    import shutil

    for d in ("cluster", "pipeline", "models", "configs"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "logs").mkdir()
    return root


@pytest.fixture
def stub_repo(tmp_path):
    """A copy of the repo whose pipeline.train is the stub above."""
    root = _copy_repo(tmp_path / "repo")
    (root / "pipeline" / "train.py").write_text(STUB_STAGE)
    (root / "configs" / "t.yaml").write_text("train:\n  max_steps: 2\n")
    return root


@pytest.fixture(scope="module")
def train_repo(tmp_path_factory):
    """A copy of the repo (jobs write logs/ and runs/ there) and real shards for configs/tiny.yaml."""
    from train_fixtures import make_shards

    base = tmp_path_factory.mktemp("slurm-train")
    return _copy_repo(base / "repo"), make_shards(base / "data")


def _train_overrides(shards, out, db, **kw) -> list[str]:
    from train_fixtures import TINY

    args = [*TINY, f"data.output={shards}", f"train.output={out}", "tracking.enabled=true",
            f"tracking.uri=sqlite:///{db}", "tracking.system_metrics=false", "tracking.experiment=slurm"]
    return args + [f"{k}={v}" for k, v in kw.items()]


def _run_of(db, run_id):
    import sqlite3

    with sqlite3.connect(db) as con:
        status = con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0]
        tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())
        steps = [s for (s,) in con.execute("SELECT step FROM metrics WHERE run_uuid = ? AND key = 'loss'",
                                           (run_id,)).fetchall()]
        n_runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    return status, tags, sorted(steps), n_runs


def test_train_sh_trains_two_tasks_with_a_checkpoint_and_an_mlflow_run(slurm_cluster, train_repo, tmp_path):
    from slurm_harness import SMALL_JOB

    repo, shards = train_repo
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    # Rank variables left in the submitting shell must not override what srun gives each task.
    env = job_env() | {"XLPIPE_PYTHON": PY, "RANK": "7", "WORLD_SIZE": "9", "LOCAL_RANK": "3"}
    job = slurm_cluster.sbatch([*SMALL_JOB, "cluster/train.sh", "configs/tiny.yaml",
                                *_train_overrides(shards, out, db, **{"train.save_every": 0})], cwd=repo, env=env)
    info = slurm_cluster.wait(job, timeout=240)
    text = (repo / "logs" / f"xlpipe-train-{job}.out").read_text()   # --output=logs/%x-%j.out
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info["Requeue"] == "1"  # --requeue from the header
    assert "=== xlpipe train" in text and "config configs/tiny.yaml  overrides:" in text
    assert "tasks 2 (2/node)" in text and "gpus/node 2" in text and "WARNING" not in text
    assert "train[0]: step 6/6 | loss" in text
    meta = json.loads((out / "checkpoints" / "global_step6" / "xlpipe" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6
    assert sorted(p.name for p in (out / "checkpoints" / "global_step6" / "xlpipe").glob("rank*.pt")) == \
        ["rank0.pt", "rank1.pt"]
    status, tags, steps, _ = _run_of(db, meta["mlflow_run_id"])
    assert status == "FINISHED" and steps == [2, 4, 6]
    assert tags["slurm_job_id"] == job and tags["world_size"] == "2" and tags["slurm_restart_count"] == "0"


def test_train_sh_preempted_saves_requeues_and_resumes_in_the_same_run(slurm_cluster, train_repo, tmp_path):
    """scancel --signal=USR1 (what --signal=USR1@120 does) -> every task saves -> rank 0 requeues ->
    the requeued job resumes from the checkpoint in the same MLflow run and finishes."""
    from slurm_harness import SMALL_JOB

    repo, shards = train_repo
    out, db = tmp_path / "run", tmp_path / "mlflow.db"
    steps = 2000
    job = slurm_cluster.sbatch([*SMALL_JOB, "cluster/train.sh", "configs/tiny.yaml",
                                *_train_overrides(shards, out, db, **{"train.max_steps": steps,
                                                                      "train.save_every": 0,
                                                                      "train.log_every": 20})],
                               cwd=repo, env=job_env() | {"XLPIPE_PYTHON": PY})
    log = repo / "logs" / f"xlpipe-train-{job}.out"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.exists() and f"step 40/{steps}" in log.read_text()):
        assert slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    info = slurm_cluster.wait(job, timeout=120, until=lambda i: i.get("Restarts") == "1"
                              and i.get("JobState") == "PENDING")
    text = log.read_text()
    assert "stopped by signal at step" in text and "job requeued" in text, text[-4000:]
    stop_step = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert 40 <= stop_step < steps
    first = json.loads((out / "checkpoints" / f"global_step{stop_step}" / "xlpipe" / "meta.json").read_text())
    status, tags, _, _ = _run_of(db, first["mlflow_run_id"])
    assert status == "SCHEDULED" and tags["requeued"] == "true" and tags["preempted_at_step"] == str(stop_step)

    slurm_cluster.release(job)
    info = slurm_cluster.wait(job, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-5000:]
    assert f"resumed from {out / 'checkpoints' / f'global_step{stop_step}'} at step {stop_step}" in text
    final = json.loads((out / "checkpoints" / f"global_step{steps}" / "xlpipe" / "meta.json").read_text())
    assert final["mlflow_run_id"] == first["mlflow_run_id"]
    status, tags, logged, n_runs = _run_of(db, final["mlflow_run_id"])
    assert status == "FINISHED" and n_runs == 1 and tags["slurm_restart_count"] == "1"
    assert logged[-1] == steps


def test_mismatched_tasks_and_gpus_warn(slurm_cluster, stub_repo):
    env = job_env() | {"XLPIPE_PYTHON": PY}
    job = slurm_cluster.sbatch(["--ntasks-per-node=1", "--gpus-per-node=2", "--cpus-per-task=1",
                                "cluster/train.sh", "configs/t.yaml"], cwd=stub_repo, env=env)
    slurm_cluster.wait(job, timeout=120)
    text = (stub_repo / "logs" / f"xlpipe-train-{job}.out").read_text()
    assert "WARNING: 1 tasks per node but 2 GPUs per node" in text


def test_missing_config_fails_fast(slurm_cluster, stub_repo):
    job = slurm_cluster.sbatch(["--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
                                "cluster/train.sh", "configs/nope.yaml"], cwd=stub_repo, env=job_env())
    info = slurm_cluster.wait(job, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    text = (stub_repo / "logs" / f"xlpipe-train-{job}.out").read_text()
    assert "config file 'configs/nope.yaml' not found" in text


def test_pipeline_sh_chains_all_stages(slurm_cluster, stub_repo):
    """Submit the whole chain held (nothing runs); check the array and the afterok links."""
    import subprocess

    env = slurm_cluster.env | job_env() | {
        "XLPIPE_PYTHON": PY, "SBATCH_EXTRA": "--hold", "PREPARE_TASKS": "4", "PREPARE_THROTTLE": "2",
        "TRAIN_SBATCH": "--ntasks-per-node=2 --gpus-per-node=2 --cpus-per-task=1"}
    r = subprocess.run(["bash", "cluster/pipeline.sh", "configs/t.yaml", "train.max_steps=3"], cwd=stub_repo,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ids = dict(line.split()[:2] for line in r.stdout.splitlines() if line.split()[0] in
               ("prepare", "merge", "train", "evaluate", "export"))
    assert list(ids) == ["prepare", "merge", "train", "evaluate", "export"], r.stdout
    try:
        jobs = {name: slurm_cluster.job(i) for name, i in ids.items()}
        assert jobs["prepare"]["ArrayTaskId"] == "0-3%2"
        assert jobs["merge"]["Dependency"].startswith(f"afterok:{ids['prepare']}_*")
        for stage, before in (("train", "merge"), ("evaluate", "train"), ("export", "evaluate")):
            assert jobs[stage]["Dependency"].startswith(f"afterok:{ids[before]}"), jobs[stage]
        assert jobs["merge"]["JobName"] == "xlpipe-merge" and jobs["train"]["JobName"] == "xlpipe-train"
        assert jobs["train"]["NumTasks"] == "2" and jobs["train"]["Requeue"] == "1"
        assert all(j["JobState"] == "PENDING" for j in jobs.values())
        # The command lines the jobs will run (scontrol shows the script's arguments).
        cmd = slurm_cluster.run(["scontrol", "show", "job", ids["merge"]]).stdout
        assert "cluster/prepare.sh --merge configs/t.yaml train.max_steps=3" in cmd
    finally:
        slurm_cluster.run(["scancel", *ids.values()], check=False)


def test_other_scripts_pass_sbatch_validation(slurm_cluster, stub_repo):
    for script in ("evaluate.sh", "export.sh", "mlflow_server.sh", "prepare.sh"):
        r = slurm_cluster.run(["sbatch", "--test-only", f"cluster/{script}", "configs/t.yaml"],
                              cwd=stub_repo, check=False)
        assert r.returncode == 0 and "to start at" in r.stderr, (script, r.stderr)


# ------------------------------------------------------------------ two nodes, the whole chain

TWO_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10")


def test_two_nodes_resolve_ranks_from_the_node_list(slurm_cluster, tmp_path):
    """One task on each slurmd: ranks from SLURM, the rendezvous from the node list, gloo across."""
    assert len(slurm_cluster.nodes) == 2
    out = tmp_path / "job.out"
    job = slurm_cluster.sbatch([*TWO_NODES, f"--chdir={REPO}", f"--output={out}",
                                "--wrap", f"srun {PY} -m pipeline.runtime.distributed"], env=job_env())
    info = slurm_cluster.wait(job, timeout=120)
    text = out.read_text()
    assert info["JobState"] == "COMPLETED", text
    reports = sorted((json.loads(line) for line in text.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    hosts = slurm_cluster.run(["scontrol", "show", "hostnames", info["NodeList"]]).stdout.split()
    assert hosts == slurm_cluster.nodes
    assert [r["world_size"] for r in reports] == [2, 2] and [r["local_rank"] for r in reports] == [0, 0]
    assert all(r["master_addr"] == hosts[0] and r["all_reduce_sum"] == 3 for r in reports)


CHAIN_CONFIG = """
data: {{corpus: text, path: {corpus}, output: {out}/shards, workers: 1, unit_bytes: 8192,
        valid_fraction: 0.15, test_fraction: 0.05}}
tokenizer: {{kind: byte}}
model: {{family: transformer_xl, n_token: 0, n_layer: 2, d_model: 32, n_head: 2, d_head: 16, d_inner: 64,
         tgt_len: 8, mem_len: 8, dropout: 0.1, cutoffs: [], tie_weight: true}}
train: {{output: {out}/run, seed: 1111, max_steps: {steps}, n_streams: 4, warmup_steps: 2, lr: 0.003,
         log_every: {log_every}, eval_every: 0, save_every: 0, zero_stage: 2}}
eval: {{split: valid, tgt_len: 8, n_streams: 2, max_steps: 5, warm_tokens: 0}}
export: {{output: {out}/export}}
tracking: {{enabled: true, uri: "sqlite:///{out}/mlflow.db", experiment: chain, system_metrics: false}}
"""


@pytest.fixture(scope="module")
def chain_repo(tmp_path_factory):
    """A copy of the repo and a JSONL corpus big enough for several input units."""
    from corpus_fixtures import sentences

    base = tmp_path_factory.mktemp("slurm-chain")
    lines = sentences(11, 1600, lo=3, hi=12)
    corpus = base / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(lines[i:i + 4]) + "\n"}) + "\n"
                              for i in range(0, len(lines), 4)))
    return _copy_repo(base / "repo"), corpus


def _chain_config(repo, corpus, out, steps=6, log_every=2) -> str:
    path = repo / "configs" / f"chain-{out.name}.yaml"
    path.write_text(CHAIN_CONFIG.format(corpus=corpus, out=out, steps=steps, log_every=log_every))
    return str(path.relative_to(repo))


def _submit_chain(cluster, repo, config, env=None) -> dict[str, str]:
    import subprocess

    env = cluster.env | job_env() | {
        "XLPIPE_PYTHON": PY, "PREPARE_TASKS": "2", "PREPARE_SBATCH": "--cpus-per-task=1 --time=10",
        "TRAIN_SBATCH": " ".join(TWO_NODES), "EVALUATE_SBATCH": "--gpus-per-node=1 --cpus-per-task=1 --time=10",
        "EXPORT_SBATCH": "--cpus-per-task=1 --mem=1G --time=10"} | dict(env or {})
    r = subprocess.run(["bash", "cluster/pipeline.sh", config], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dict(line.split()[:2] for line in r.stdout.splitlines()
                if line.split() and line.split()[0] in ("prepare", "merge", "train", "evaluate", "export"))


def _logs(repo) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((repo / "logs").glob("*.out")))


def test_pipeline_sh_runs_the_whole_chain_on_two_nodes(slurm_cluster, chain_repo, tmp_path):
    """prepare array (2 tasks) → merge → train on 2 nodes x 1 task → evaluate → export, for real."""
    import numpy as np
    import torch

    from models import build_model
    from pipeline.config import load_config
    from pipeline.prepare import prepare
    from pipeline.runtime.checkpoint import consolidated_state_dict
    from pipeline.runtime.exports import model_config

    from test_export import load_without_deepspeed

    repo, corpus = chain_repo
    out = tmp_path / "chain"
    config = _chain_config(repo, corpus, out)
    ids = _submit_chain(slurm_cluster, repo, config)
    assert list(ids) == ["prepare", "merge", "train", "evaluate", "export"]
    info = slurm_cluster.wait(ids["export"], timeout=600, until=lambda i: i.get("JobState") in
                              ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
    assert info["JobState"] == "COMPLETED", _logs(repo)
    states = {name: slurm_cluster.job(i) for name, i in ids.items()}
    assert all(s["JobState"] == "COMPLETED" for s in states.values()), {n: s["JobState"] for n, s in states.items()}
    assert states["train"]["NumNodes"] == "2" and states["train"]["NodeList"] == "127.0.0.[1-2]"
    prep_logs = sorted((repo / "logs").glob(f"xlpipe-prepare-{ids['prepare']}_*.out"))
    assert len(prep_logs) == 2 and all("array task" in p.read_text() for p in prep_logs)

    # The array's shards and manifest are byte-identical to one process's prepare.
    alone = tmp_path / "alone"
    prepare(load_config(repo / config, [f"data.output={alone}"]), progress=False)
    assert (out / "shards" / "manifest.json").read_bytes() == (alone / "manifest.json").read_bytes()
    shards = json.loads((alone / "manifest.json").read_text())
    assert sum(len(s["shards"]) for s in shards["splits"].values()) >= 3
    # Training ran on both nodes into one checkpoint.
    ckpt = out / "run" / "checkpoints" / "global_step6"
    meta = json.loads((ckpt / "xlpipe" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 6
    train_log = (repo / "logs" / f"xlpipe-train-{ids['train']}.out").read_text()
    assert "nodes 2 [127.0.0.[1-2]]" in train_log and "head node 127.0.0.1" in train_log
    # Evaluation wrote its report.
    reports = list((out / "run" / "eval").glob("valid-*.json"))
    assert reports and json.loads(reports[0].read_text())["results"][0]["tokens"] > 0
    # The export loads where DeepSpeed cannot be imported, and equals the checkpoint's weights.
    export = next(p for p in (out / "export").rglob("model.safetensors")).parent
    seg = torch.randint(0, 256, (2, 3, 8), generator=torch.Generator().manual_seed(0))
    got = load_without_deepspeed(export, seg, tmp_path / "lp")
    cfg = json.loads((ckpt / "xlpipe" / "meta.json").read_text())["config"]
    model = build_model(model_config(cfg))
    model.load_state_dict(consolidated_state_dict(ckpt), strict=False)
    model.eval()
    memory, want = model.init_memory(3), []
    with torch.no_grad():
        for s in seg:
            res = model(s, memory=memory, return_logprobs=True)
            memory = res.memory
            want.append(res.logprobs.numpy())
    np.testing.assert_allclose(got, np.stack(want), rtol=0, atol=1e-6)


def test_a_failing_stage_cancels_the_rest_of_the_chain(slurm_cluster, chain_repo, tmp_path):
    """An array task fails on the corpus (invalid UTF-8): the merge and everything after it is cancelled."""
    repo, corpus = chain_repo
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(corpus.read_bytes() + b'{"text": "caf\xe9"}\n')
    config = _chain_config(repo, bad, tmp_path / "broken")
    ids = _submit_chain(slurm_cluster, repo, config)
    assert list(ids) == ["prepare", "merge", "train", "evaluate", "export"]
    for stage in ("merge", "train", "evaluate", "export"):
        info = slurm_cluster.wait(ids[stage], timeout=180)
        assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", (stage, info)
    tasks = sorted((repo / "logs").glob(f"xlpipe-prepare-{ids['prepare']}_*.out"))
    assert any("invalid UTF-8" in p.read_text() for p in tasks), _logs(repo)


def test_scripts_fail_before_any_task_starts(slurm_cluster, chain_repo, tmp_path):
    """Shards that are not there, streams that do not split over the tasks, an impossible request:
    each refused at once with the key and the fix, and no partial chain left queued."""
    import subprocess

    repo, corpus = chain_repo
    config = _chain_config(repo, corpus, tmp_path / "none")          # never prepared
    env = job_env() | {"XLPIPE_PYTHON": PY}
    job = slurm_cluster.sbatch([*TWO_NODES, "cluster/train.sh", config], cwd=repo, env=env)
    info = slurm_cluster.wait(job, timeout=60)
    text = (repo / "logs" / f"xlpipe-train-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text
    assert f"data.output={tmp_path / 'none' / 'shards'}: no manifest.json there" in text
    assert "train[0]" not in text                                     # no task started

    job = slurm_cluster.sbatch([*TWO_NODES, "cluster/train.sh", config, "train.n_streams=3",
                                f"data.output={tmp_path}"], cwd=repo, env=env)
    slurm_cluster.wait(job, timeout=60)
    text = (repo / "logs" / f"xlpipe-train-{job}.out").read_text()
    assert "train.n_streams=3 does not split over 2 tasks" in text, text

    before = set(slurm_cluster.squeue())
    run = dict(cwd=repo, capture_output=True, text=True)
    r = subprocess.run(["bash", "cluster/pipeline.sh", config], env=slurm_cluster.env | env | {"SKIP_PREPARE": "1"},
                       **run)
    assert r.returncode == 2 and "no manifest.json there" in r.stderr and not r.stdout.strip(), r
    # Three nodes on a two-node cluster: refused before anything is submitted (SLURM itself would
    # queue the dependent training job and leave it pending for ever).
    r = subprocess.run(["bash", "cluster/pipeline.sh", config],
                       env=slurm_cluster.env | env | {"PREPARE_TASKS": "2",
                                                      "TRAIN_SBATCH": "--nodes=3 --ntasks-per-node=1"}, **run)
    assert r.returncode == 2 and "SLURM refuses the request of 'cluster/train.sh" in r.stderr, r
    assert "Requested node configuration is not available" in r.stderr and not r.stdout.strip(), r
    assert set(slurm_cluster.squeue()) <= before


def test_two_node_training_preempted_resumes_to_the_same_weights(slurm_cluster, chain_repo, tmp_path):
    """USR1 before the time limit: both nodes save, rank 0 requeues, the job resumes on both nodes
    and ends with the weights of an uninterrupted two-node run, in the same MLflow run."""
    from pipeline.config import load_config
    from pipeline.prepare import prepare

    from test_train import assert_same_weights, weights

    repo, corpus = chain_repo
    steps = 400
    runs = {name: tmp_path / name for name in ("straight", "preempted")}
    configs = {name: _chain_config(repo, corpus, out, steps=steps, log_every=10) for name, out in runs.items()}
    shards = tmp_path / "shards"
    prepare(load_config(repo / configs["straight"], [f"data.output={shards}"]), progress=False)
    env = job_env() | {"XLPIPE_PYTHON": PY}
    jobs = {name: slurm_cluster.sbatch([*TWO_NODES, "cluster/train.sh", configs[name], f"data.output={shards}"],
                                       cwd=repo, env=env) for name in runs}
    log = repo / "logs" / f"xlpipe-train-{jobs['preempted']}.out"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.exists() and f"step 20/{steps}" in log.read_text()):
        assert slurm_cluster.job(jobs["preempted"]).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--signal=USR1", jobs["preempted"]])
    slurm_cluster.wait(jobs["preempted"], timeout=120,
                       until=lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING")
    out = runs["preempted"] / "run"
    stop_step = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("global_step"))
    assert 20 <= stop_step < steps, log.read_text()[-3000:]
    first = json.loads((out / "checkpoints" / f"global_step{stop_step}" / "xlpipe" / "meta.json").read_text())
    assert first["world_size"] == 2
    slurm_cluster.release(jobs["preempted"])
    for name, job in jobs.items():
        info = slurm_cluster.wait(job, timeout=400)
        assert info["JobState"] == "COMPLETED", (repo / "logs" / f"xlpipe-train-{job}.out").read_text()[-4000:]
    text = log.read_text()
    assert f"resumed from {out / 'checkpoints' / f'global_step{stop_step}'} at step {stop_step}" in text
    assert text.count("nodes 2 [127.0.0.[1-2]]") == 2          # both runs on both nodes
    final = out / "checkpoints" / f"global_step{steps}"
    assert_same_weights(weights(final), weights(runs["straight"] / "run" / "checkpoints" / f"global_step{steps}"))
    meta = json.loads((final / "xlpipe" / "meta.json").read_text())
    assert meta["mlflow_run_id"] == first["mlflow_run_id"]
    status, tags, logged, n_runs = _run_of(runs["preempted"] / "mlflow.db", meta["mlflow_run_id"])
    assert status == "FINISHED" and n_runs == 1 and tags["slurm_restart_count"] == "1" and logged[-1] == steps
