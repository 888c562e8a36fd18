"""pipeline.runtime.distributed: environment resolution, process group helpers, preemption flag.

The SLURM-launched versions of these checks live in test_slurm.py (real daemons).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime import distributed
from pipeline.runtime.distributed import StopSignal, first_host, first_host_parsed, resolve_env, setup_env

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def srun_env(**extra) -> dict:
    """What srun sets for task 1 of 4 (2 nodes × 2 tasks) of job 123456, plus ``extra``."""
    env = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "gpu[007-008]",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_RESTART_COUNT": "2"}
    env.update(extra)
    return env


def test_srun_environment():
    env = resolve_env(srun_env())
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 123456 % 12000 == 23456      # below the ephemeral ports
    assert env.launcher == "srun" and env.slurm_job_id == "123456" and env.restart_count == 2
    assert not env.is_main


def test_explicit_variables_win_over_slurm():
    env = resolve_env(srun_env(MASTER_ADDR="10.0.0.5", MASTER_PORT="31337", WORLD_SIZE="8", RANK="5"))
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)  # LOCAL_RANK still from SLURM
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 31337)


def test_srun_then_torchrun_uses_torchrun_values():
    # `srun --ntasks-per-node=1 torchrun ...`: torchrun's children carry both sets of variables.
    env = resolve_env(srun_env(SLURM_PROCID="1", SLURM_LOCALID="0", TORCHELASTIC_RUN_ID="123456",
                               RANK="6", LOCAL_RANK="2", WORLD_SIZE="8", MASTER_ADDR="gpu007",
                               MASTER_PORT="29400"))
    assert env.launcher == "torchrun"
    assert (env.rank, env.local_rank, env.world_size, env.master_port) == (6, 2, 8, 29400)


def test_plain_env_and_single_process():
    env = resolve_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert env.launcher == "env"
    assert (env.rank, env.local_rank, env.world_size) == (1, 1, 2)
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)

    single = resolve_env({})
    assert single.launcher == "single"
    assert (single.rank, single.local_rank, single.world_size) == (0, 0, 1)
    # A free port, not a fixed one two unrelated single-process runs could both take.
    with socket.socket() as s:
        s.bind(("127.0.0.1", single.master_port))


def test_batch_script_outside_srun_is_one_process(caplog):
    env = {k: v for k, v in srun_env(SLURM_PROCID="0", SLURM_LOCALID="0").items()
           if not k.startswith("SLURM_STEP")}
    with caplog.at_level(logging.WARNING, logger="pipeline.runtime.distributed"):
        got = resolve_env(env)
    assert (got.launcher, got.world_size, got.rank) == ("single", 1, 0)
    assert "not started by srun" in caplog.text and "4 tasks" in caplog.text


@pytest.mark.parametrize("bad, needle", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one'"),
    (srun_env(SLURM_PROCID="x"), "SLURM_PROCID='x'"),
])
def test_bad_values_name_the_variable(bad, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_env(bad)


def test_setup_env_exports_all_five():
    environ = srun_env(MASTER_ADDR="gpu007")
    got = setup_env(environ)
    assert {k: environ[k] for k in distributed.ENV_KEYS} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "gpu007", "MASTER_PORT": "23456"}
    assert got.rank == 3


# Hostlists with the first host SLURM gives for them (`scontrol show hostnames`).
HOSTLISTS = {
    "localhost": "localhost",
    "node[001-004,007],gpu5": "node001",
    "a-b[09-10]": "a-b09",
    "n1,n2": "n1",
    "gpu[3]": "gpu3",
    "x[2-3]y[5-6]": "x2y5",
}


@pytest.fixture(scope="module")
def offline_slurm_conf(tmp_path_factory):
    """A minimal slurm.conf: enough for ``scontrol show hostnames`` (which needs some config)."""
    path = tmp_path_factory.mktemp("slurmconf") / "slurm.conf"
    path.write_text("ClusterName=offline\nSlurmctldHost=localhost(127.0.0.1)\n"
                    "NodeName=localhost CPUs=1\nPartitionName=p Nodes=ALL\n")
    return str(path)


@pytest.mark.parametrize("nodelist, first", HOSTLISTS.items())
def test_first_host(nodelist, first, offline_slurm_conf, monkeypatch):
    assert first_host_parsed(nodelist) == first
    if shutil.which("scontrol"):  # the authority agrees with the table
        monkeypatch.setenv("SLURM_CONF", offline_slurm_conf)
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        assert r.stdout.split()[0] == first, r.stderr
    assert first_host(nodelist) == first


def test_first_host_rejects_malformed():
    with pytest.raises(ValueError, match="malformed"):
        first_host_parsed("node[1-2")


def test_stop_signal_sets_flag_only_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.requested and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM and stop.should_stop()  # no group: the local flag
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_requeue_outside_slurm_and_without_scontrol(monkeypatch, caplog, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert distributed.requeue() is False
    # Under SLURM but scontrol is not on PATH: the failure is logged and training goes on.
    # (A job scontrol refuses is covered against the real cluster in test_slurm.py.)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.ERROR, logger="pipeline.runtime.distributed"):
        assert distributed.requeue() is False
    assert "scontrol requeue 4242" in caplog.text and "will not restart" in caplog.text


def test_init_distributed_single_process(monkeypatch):
    for key in [*distributed.ENV_KEYS, "TORCHELASTIC_RUN_ID"] + [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.setenv(key, "")  # recorded, so the exported values are undone afterwards
        monkeypatch.delenv(key)
    import deepspeed.ops
    import torch.distributed as dist

    env = distributed.init_distributed()
    try:
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        assert all(k in os.environ for k in distributed.ENV_KEYS)  # DeepSpeed needs LOCAL_RANK too
        assert os.environ["MASTER_PORT"] == str(env.master_port)
        assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False  # no JIT build
        assert distributed.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
        assert distributed.broadcast_object("x") == "x"
        again = distributed.init_distributed()  # idempotent: the running group's environment
        assert (again.rank, again.world_size, again.master_port) == (env.rank, env.world_size, env.master_port)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two interpreters importing torch + DeepSpeed: ~10 s on 2 shared cores
def test_two_ranks_helpers_and_agreed_stop(tmp_path):
    port = distributed._free_port()
    procs = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        env.pop("LOCAL_RANK", None)
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "dist_worker.py")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = outs
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["is_main"] and not r1["is_main"]
    for r in outs:
        assert r["world"] == 2
        assert r["sum_float"] == 1 + 2
        assert r["sum_list"] == [0 + 1, 1.5 + 1.5]
        assert r["sum_tensor"] == [[1.0, 2.0]]  # [[0, 0]] + [[1, 2]]
        assert r["broadcast"] == {"run_id": "abc123", "from": 0}
        assert r["stop_step"] == 3  # rank 1 was signalled before step 3; rank 0 agrees
        assert r["requeued"] is False
    assert r0["tensor_untouched"] == [[0.0, 0.0]] and r1["tensor_untouched"] == [[1.0, 2.0]]
    assert (r0["local_flag"], r1["local_flag"]) == (False, True)
