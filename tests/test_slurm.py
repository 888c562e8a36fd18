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
        "SBATCH_EXTRA": "--hold", "PREPARE_TASKS": "4", "PREPARE_THROTTLE": "2",
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
