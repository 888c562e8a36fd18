"""Who am I in the job, the process group, and the preemption flag.

``resolve_env()`` reads the launcher's environment (srun, torchrun, plain env vars, or nothing)
into a ``DistEnv``; ``init_distributed()`` exports RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT (DeepSpeed requires all five, LOCAL_RANK included) and starts the process group
through ``deepspeed.init_distributed``: NCCL on CUDA, gloo on CPU.

Preemption (docs/architecture.md): SIGUSR1/SIGTERM only set a flag (``StopSignal``); at a step boundary
``should_stop()`` all-reduces it with MAX so every rank stops at the same step; after all ranks
saved, rank 0 calls ``requeue()`` (``scontrol requeue $SLURM_JOB_ID``) and the job exits 0.

``python -m pipeline.runtime.distributed`` prints the resolved environment as JSON and all-reduces
``rank + 1`` as a self-check (the SLURM tests run it under ``srun``).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_PORT = 29500          # torchrun's default, for plain multi-process env without a port
# MASTER_PORT = 20000 + job_id % 12000 under SLURM: 20000-31999, below Linux's ephemeral range
# (32768-60999), so no outgoing connection on a node can hold the port a job rendezvouses on.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 12000


def _prefer_cpu_accelerator() -> None:
    # DeepSpeed warns on every import when it has to detect the CPU accelerator; naming it
    # up front (before anything imports deepspeed) is the same choice without the noise.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


_prefer_cpu_accelerator()


# ----------------------------------------------------------------------------- environment


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str                   # "srun", "torchrun", "env" or "single"
    slurm_job_id: Optional[str] = None
    restart_count: int = 0          # SLURM_RESTART_COUNT: how often this job was requeued

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def as_environ(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank),
                "WORLD_SIZE": str(self.world_size), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: ``node[003-004,7],gpu1`` → ``node003``.

    ``scontrol show hostnames`` is the authority when installed; this expansion of the first
    element (each bracket group → its first value, zero padding kept) is the fallback.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM node list")
    if shutil.which("scontrol"):
        try:
            r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, timeout=30)
            if r.returncode == 0 and r.stdout.strip():
                return r.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("scontrol show hostnames %s failed (%s); parsing the node list", nodelist, exc)
    return first_host_parsed(nodelist)


def first_host_parsed(nodelist: str) -> str:
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # first element: up to the first comma outside brackets
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    if first.count("[") != first.count("]"):
        raise ValueError(f"malformed SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]\-,]+)[^\]]*\]", r"\1", first)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Rank, local rank, world size and rendezvous from the environment; explicit vars win.

    Under ``srun`` (a job step: SLURM_STEP_ID and SLURM_PROCID set) RANK←SLURM_PROCID,
    LOCAL_RANK←SLURM_LOCALID, WORLD_SIZE←SLURM_STEP_NUM_TASKS (SLURM_NTASKS), MASTER_ADDR←first
    host of the step's node list, MASTER_PORT←20000 + job_id % 12000 (the same on every rank,
    different for jobs sharing a node). A batch script outside ``srun`` is one process, whatever
    ``--ntasks`` says. torchrun and hand-set variables set RANK/WORLD_SIZE/... themselves.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    derived: dict[str, Any] = {}
    if in_step:
        derived["RANK"] = _int(env, "SLURM_PROCID")
        derived["LOCAL_RANK"] = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        derived["WORLD_SIZE"] = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if "MASTER_ADDR" not in env:  # scontrol is only worth calling when the value is used
            nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            derived["MASTER_ADDR"] = first_host(nodes) if nodes else "127.0.0.1"
        if job_id:
            derived["MASTER_PORT"] = SLURM_PORT_BASE + _job_number(job_id) % SLURM_PORT_SPAN
    if "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif in_step:
        launcher = "srun"
    elif "RANK" in env or "WORLD_SIZE" in env:
        launcher = "env"
    else:
        launcher = "single"
        if job_id and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
            log.warning("SLURM job %s has %s tasks but this process was not started by srun; "
                        "running as a single process (launch with `srun python -m ...` to use them all)",
                        job_id, env["SLURM_NTASKS"])

    def pick(key: str, default: Any) -> Any:
        if key in env:  # explicit variables win over SLURM-derived ones
            return _int(env, key) if key != "MASTER_ADDR" else env[key]
        return derived.get(key, default)

    rank = pick("RANK", 0)
    world = pick("WORLD_SIZE", 1)
    # Hand-set RANK without LOCAL_RANK: assume one node (DeepSpeed insists on LOCAL_RANK).
    local_rank = pick("LOCAL_RANK", rank if launcher == "env" else 0)
    addr = pick("MASTER_ADDR", "127.0.0.1")
    # One process needs no agreed port: a free one avoids clashing with other jobs on the host.
    port = pick("MASTER_PORT", DEFAULT_PORT if world > 1 else None)
    if port is None:
        port = _free_port()
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world} (launcher: {launcher})")
    if not 0 <= local_rank <= rank:
        raise ValueError(f"LOCAL_RANK={local_rank} must be in [0, RANK={rank}] (launcher: {launcher})")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, master_addr=addr,
                   master_port=int(port), launcher=launcher, slurm_job_id=job_id, restart_count=restarts)


def _job_number(job_id: str) -> int:
    # Array tasks have their own SLURM_JOB_ID; a heterogeneous "123+1" keeps its leading number.
    m = re.match(r"\d+", job_id)
    if not m:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} does not start with a number")
    return int(m.group())


def setup_env(environ: Optional[dict] = None) -> DistEnv:
    """``resolve_env`` and export the five variables into ``environ`` (default ``os.environ``)."""
    target = os.environ if environ is None else environ
    env = resolve_env(target)
    target.update(env.as_environ())
    return env


def restart_count() -> int:
    """How many times SLURM requeued this job (0 on the first run and outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


# ----------------------------------------------------------------------------- process group


def init_distributed(timeout_s: float = 1800.0, verbose: bool = False) -> DistEnv:
    """Export the environment and start the process group (also for world size 1).

    NCCL with the CUDA device set from LOCAL_RANK when CUDA is available, else gloo. A second
    call returns the environment of the group already running.
    """
    env = setup_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(_cuda_device(env.local_rank))
    if dist.is_available() and dist.is_initialized():
        return env
    import deepspeed
    import deepspeed.ops

    if not cuda:
        # DeepSpeed would JIT-build its shm_comm op on first init (34 s and a compiler, even
        # for one process); gloo does the same job here.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                               verbose=verbose, timeout=datetime.timedelta(seconds=timeout_s))
    return env


def shutdown() -> None:
    """Leave the process group (after a barrier). Exiting with a live gloo group can abort
    the interpreter ("terminate called without an active exception")."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()


def _cuda_device(local_rank: int) -> int:
    # Usually every task sees all GPUs of its node (index = LOCAL_RANK); with per-task GPU
    # binding (--gpus-per-task, gres binding) each task sees exactly its own one.
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise RuntimeError(f"LOCAL_RANK={local_rank} but this task sees {count} GPUs "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                       f"start one task per GPU (--ntasks-per-node = --gpus-per-node)")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return get_rank() == 0


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (e.g. the MLflow run id); identity without a group."""
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` without a group."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def all_reduce_sum(value: "float | Sequence[float] | torch.Tensor") -> Any:
    """Sum over ranks of a float, a list of floats (one reduction) or a tensor (a new tensor).

    For metrics: e.g. ``loss_sum, n_tokens = all_reduce_sum([loss_sum, n_tokens])``.
    """
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        if is_initialized() and dist.get_world_size() > 1:
            moved = out.to(_comm_device())
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            out = moved.to(value.device)
        return out
    scalar = isinstance(value, (int, float))
    t = torch.tensor([float(value)] if scalar else [float(v) for v in value], dtype=torch.float64)
    if is_initialized() and dist.get_world_size() > 1:
        t = t.to(_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    values = t.cpu().tolist()
    return values[0] if scalar else values


def _all_reduce_max_flag(flag: bool) -> bool:
    if not is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- preemption


class StopSignal:
    """SIGUSR1/SIGTERM set a flag; ``should_stop()`` agrees on it across ranks.

    The handler only records the signal: saving from inside a handler would run in the middle
    of a step, on one rank only. Use as a context manager (or ``install``/``uninstall``)::

        with StopSignal() as stop:
            for step in ...:
                train_step()
                if stop.should_stop():       # collective: call on every rank, every step
                    save(); stop.requeue(); break

    DataLoader workers inherit the handler; they should call ``StopSignal.ignore_in_worker``.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, signals: Iterable[int] = SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[int] = None      # the last signal caught on this rank
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def install(self) -> "StopSignal":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        """This rank caught a signal (local view; use ``should_stop`` to decide)."""
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank when any rank caught a signal (all-reduce MAX; a collective)."""
        return _all_reduce_max_flag(self.requested)

    def requeue(self) -> bool:
        return requeue()

    @staticmethod
    def ignore_in_worker(_worker_id: int = 0) -> None:
        """``worker_init_fn`` for DataLoader workers: only the trainer reacts to the signals."""
        for s in StopSignal.SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def requeue(job_id: Optional[str] = None) -> bool:
    """``scontrol requeue`` this SLURM job from rank 0; False (logged) when not possible.

    Call it after every rank has saved: SLURM then stops the job and queues it again with
    SLURM_RESTART_COUNT incremented. Outside SLURM and on ranks other than 0 it does nothing.
    """
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id or not is_main():
        return False
    cmd = ["scontrol", "requeue", job_id]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("%s failed: %s; the job will not restart by itself", " ".join(cmd), exc)
        return False
    if r.returncode != 0:
        log.error("%s exited %d: %s; the job will not restart by itself", " ".join(cmd), r.returncode,
                  (r.stderr or r.stdout).strip())
        return False
    log.info("requeued SLURM job %s", job_id)
    return True


# ----------------------------------------------------------------------------- self-check


def self_check() -> dict:
    """Start the group, all-reduce ``rank + 1`` and report what this rank resolved."""
    env = init_distributed()
    total = all_reduce_sum(float(env.rank + 1))
    peers = broadcast_object({"master": f"{env.master_addr}:{env.master_port}"} if env.is_main else None)
    report = dataclasses.asdict(env) | {
        "backend": dist.get_backend(), "all_reduce_sum": total,
        "expected_sum": env.world_size * (env.world_size + 1) / 2,
        "rank0_master": peers["master"], "host": socket.gethostname(), "pid": os.getpid(),
    }
    shutdown()
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.runtime.distributed",
                                     description="Print the resolved rank/world/master and all-reduce once.")
    parser.parse_args(argv)
    report = self_check()
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["all_reduce_sum"] == report["expected_sum"] else 1


if __name__ == "__main__":
    sys.exit(main())
