"""cluster/common.sh's environment, read back from a real bash that sources it: the NCCL and
allocator defaults a GPU job runs with, a user's own values kept, srun's rank variables not
shadowed by the submitting shell's, one OpenMP pool per task's CPUs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "PYTORCH_ALLOC_CONF", "OMP_NUM_THREADS",
        "PYTHONUNBUFFERED", "PYTHONFAULTHANDLER", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")


def sourced_env(**env: str) -> dict[str, str]:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "XLPIPE_PYTHON": "python3"}
    script = "source cluster/common.sh; " + "; ".join(f'echo "{k}=${{{k}-<unset>}}"' for k in KEYS)
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env=base | env, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_defaults_for_a_gpu_job():
    got = sourced_env(SLURM_CPUS_PER_TASK="8")
    assert got["NCCL_DEBUG"] == "WARN"                       # NCCL's own errors in the log, not a silent hang
    assert got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"     # a failed collective ends the job
    assert got["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert got["OMP_NUM_THREADS"] == "8"                     # the task's CPUs, not every core on the node
    assert got["PYTHONUNBUFFERED"] == "1" and got["PYTHONFAULTHANDLER"] == "1"


def test_user_values_kept_and_rank_variables_left_to_srun():
    got = sourced_env(NCCL_DEBUG="INFO", TORCH_NCCL_ASYNC_ERROR_HANDLING="3", OMP_NUM_THREADS="2",
                      SLURM_CPUS_PER_TASK="8", RANK="5", LOCAL_RANK="1", WORLD_SIZE="9", MASTER_ADDR="10.0.0.7")
    assert got["NCCL_DEBUG"] == "INFO" and got["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert got["OMP_NUM_THREADS"] == "2"
    # sbatch exports the submitting shell's environment: a stale RANK would beat srun's SLURM_PROCID.
    assert got["RANK"] == got["LOCAL_RANK"] == got["WORLD_SIZE"] == "<unset>"
    assert got["MASTER_ADDR"] == "10.0.0.7"                  # set on purpose: kept


def test_one_thread_without_slurm():
    assert sourced_env()["OMP_NUM_THREADS"] == "1"
