"""A real SLURM for tests: munged + slurmctld + one slurmd per node from the Debian packages.

Two "nodes" by default, both on 127.0.0.1 with their own names, ports, spool and logs (one
slurmd each; platform-notes §5), so ``--nodes=2`` jobs run across them. Node names are names that
resolve to this host (``localhost`` and the host name), so a rendezvous taken from the job's node
list works as on a real cluster.

Everything (config, state, spool, logs, pids, munge socket and key) lives under one base
directory; daemons and clients find it through ``SLURM_CONF``, so ``/etc/slurm`` is never
touched. Settings that work on these VMs (platform-notes §5): proctrack/linuxproc and task/none
(no cgroup freezer here), select/cons_tres, SlurmUser=root, MailProg=/bin/true, the munge socket
directory chmod 755 and ``AuthInfo=socket=...``.

Use from tests through the session fixture (import it into the test module)::

    from slurm_harness import slurm_cluster  # noqa: F401  (pytest fixture)

    @pytest.mark.slow
    def test_x(slurm_cluster, tmp_path):
        job = slurm_cluster.sbatch(["-n", "2", "--wrap", "srun hostname"], cwd=tmp_path)
        info = slurm_cluster.wait(job)
        assert info["JobState"] == "COMPLETED"

Running a cluster script (jobs inherit the submitting environment; submit from the repo root)::

    job = slurm_cluster.sbatch([*SMALL_JOB, "cluster/train.sh", "configs/tiny.yaml"], cwd=REPO)

By hand: ``python tests/slurm_harness.py start BASE`` prints the ``export SLURM_CONF=...`` line;
``python tests/slurm_harness.py stop BASE`` stops the daemons by their recorded PIDs.

Without the binaries the fixture skips with the reason, unless ``XLPIPE_REQUIRE_SLURM=1`` (CI),
where a missing SLURM is a failure. The temp base dir is removed afterwards unless
``XLPIPE_KEEP_SLURM=1`` (then its logs are kept for debugging).
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
# Header overrides that fit cluster/train.sh (8 GPUs per node by default) onto this test node.
SMALL_JOB = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10")
_FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")
# Inherited from an enclosing job or launcher, these would leak into the test cluster's jobs
# (sbatch exports the whole environment) and override what srun gives each task.
_CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
_LAUNCHER_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                  "GROUP_RANK", "TORCHELASTIC_RUN_ID"}


class SlurmUnavailable(RuntimeError):
    """The SLURM/munge binaries are not installed."""


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None
            and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not readable)"
    return "\n".join(lines[-n:])


def node_names(n: int) -> list[str]:
    """``n`` node names that are addresses of this host: 127.0.0.1, 127.0.0.2, ... (all of 127/8 is
    loopback on Linux), so a rendezvous taken from the job's node list reaches this host."""
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


class SlurmCluster:
    """``nodes`` nodes on 127.0.0.1, partition ``debug``, each with ``cpus`` CPUs and ``gpus`` fake GPUs.

    ``cpus`` (and the 256 GB of memory) may exceed the hardware (``SlurmdParameters=config_overrides``:
    nothing is enforced without cgroups) so the cluster scripts' headers and a few small
    multi-task jobs fit at once on 2 cores; ``gpus`` declares a ``gpu`` GRES backed by harmless
    character devices (/dev/null, ...) so scripts with ``--gpus-per-node`` schedule here
    unchanged; CUDA stays unavailable, so jobs run on CPU with gloo.
    """

    def __init__(self, base: str | Path, cpus: int = 8, gpus: int = 2, nodes: int = 2):
        self.base = Path(base).resolve()
        self.cpus, self.gpus = cpus, gpus
        self.conf = self.base / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}
        self.nodes = node_names(nodes)
        self.node = self.nodes[0]

    # ------------------------------------------------------------------ config
    def write_config(self) -> None:
        for d in ("state", "spool", "log", "pids", "munge"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:  # avoids a "Domain socket directory" error
            (self.base / "spool" / node).mkdir(exist_ok=True)
        os.chmod(self.base / "munge", 0o755)  # munged: "execute permissions for all required"
        key = self.base / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                           capture_output=True)
            os.chmod(key, 0o600)
        b = self.base
        ctld_host = socket.gethostname().split(".")[0]
        # A random first job id: MASTER_PORT is derived from the job id, so two test clusters
        # running at once on this machine (other engineers' sessions) rarely pick the same port.
        first_job = random.randint(1000, 900_000)
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        lines = [
            "ClusterName=xlpipe-test",
            f"SlurmctldHost={ctld_host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={b}/state",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmctldPidFile={b}/pids/slurmctld.pid",
            f"SlurmdPidFile={b}/pids/slurmd-%n.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdLogFile={b}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "JobRequeue=1",
            f"FirstJobId={first_job}",
            "KillWait=5",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            "SchedulerParameters=sched_interval=2",
            *(["GresTypes=gpu"] if self.gpus else []),
            # One slurmd per node on this host: each its own port.
            # NodeHostname: SLURM refuses two nodes of one host name (and maps "localhost" to it).
            *(f"NodeName={node} NodeHostname=xlpipe-node{i} NodeAddr={node} Port={_free_port()} "
              f"CPUs={self.cpus} RealMemory=256000{gres} State=UNKNOWN" for i, node in enumerate(self.nodes, 1)),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.conf)
        if self.gpus:
            # slurmd drops file-less GPUs, so stand harmless character devices in for them.
            if self.gpus > len(_FAKE_GPU_FILES):
                raise ValueError(f"at most {len(_FAKE_GPU_FILES)} fake GPUs, asked for {self.gpus}")
            files = ",".join(_FAKE_GPU_FILES[: self.gpus])
            (b / "gres.conf").write_text(f"NodeName={','.join(self.nodes)} Name=gpu File={files}\n")

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM clients (sbatch, squeue, ...) talking to this cluster."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(_CLIENT_ENV_PREFIXES) and k not in _LAUNCHER_VARS}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ------------------------------------------------------------------ daemons
    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.base / "log" / f"{name}.stdout", "ab")
        # Own session: a Ctrl-C in pytest must not hit the daemons before we stop them in order.
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.base, start_new_session=True)
        log.close()
        self.procs[name] = proc
        (self.base / "pids" / f"{name}.real.pid").write_text(f"{proc.pid}\n")

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"SLURM/munge binaries not found: {', '.join(missing)} "
                                   f"(apt-get install slurm-wlm munge)")
        self.write_config()
        m = self.base / "munge"
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket", "munged")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._idle, timeout, f"{len(self.nodes)} nodes idle in sinfo", "slurmctld",
                       *self.slurmds)
        atexit.register(self.stop)
        return self

    @property
    def slurmds(self) -> list[str]:
        return [f"slurmd-{node}" for node in self.nodes]

    def _idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return r.returncode == 0 and all(states.get(node) == "idle" for node in self.nodes)

    def _wait_for(self, cond, timeout: float, what: str, *daemons: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in daemons:
                rc = self.procs[name].poll()
                if rc is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited with {rc} while waiting for {what}; log:\n{self.logs(name)}")
            if cond():
                return
            time.sleep(0.2)
        logs = "\n".join(f"--- {d}\n{self.logs(d)}" for d in daemons)
        self.stop()
        raise TimeoutError(f"SLURM test cluster under {self.base}: no {what} after {timeout:.0f}s\n{logs}")

    def logs(self, name: str) -> str:
        if name == "slurmd":  # every node's
            return "\n".join(f"[{d}]\n{self.logs(d)}" for d in self.slurmds)
        path = {"munged": self.base / "munge" / "munged.log"}.get(name, self.base / "log" / f"{name}.log")
        return _tail(path) + "\n" + _tail(self.base / "log" / f"{name}.stdout", 10)

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop slurmd, slurmctld and munged by their PIDs."""
        if not self.procs:
            return
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.3)
        for name in (*self.slurmds, "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()

    # ------------------------------------------------------------------ clients
    def run(self, argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        r = subprocess.run(list(argv), capture_output=True, text=True, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def sbatch(self, args: Sequence[str], cwd: str | Path | None = None,
               env: Optional[Mapping[str, str]] = None) -> str:
        """Submit; returns the job id. ``env`` adds to the client environment (jobs inherit it)."""
        full = self.env | dict(env or {})
        r = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=full)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        out: dict[str, str] = {}
        for item in r.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                out.setdefault(k, v)
        return out

    def wait(self, job_id: str, timeout: float = 120.0, until=None) -> dict[str, str]:
        """Poll until the job reaches a terminal state (or ``until(info)`` is true)."""
        until = until or (lambda info: info.get("JobState") in TERMINAL_STATES)
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s: {info}\n"
                           f"--- slurmctld\n{self.logs('slurmctld')}\n--- slurmd\n{self.logs('slurmd')}")

    def release(self, job_id: str) -> None:
        """Start a requeued job now: SLURM holds requeued jobs ~2 min (Reason=BeginTime).

        Not within the second of the requeue: slurmd revokes the job's credential then, at one-second
        granularity, and refuses a relaunch whose credential is from that same second ("Killing
        non-startable batch job: Job credential revoked": the run fails with no output). Two
        seconds clear it."""
        time.sleep(2.0)
        self.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"])

    def squeue(self) -> list[str]:
        r = self.run(["squeue", "-h", "-o", "%i %T"], check=False)
        return [line for line in r.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------------- pytest fixture
_shared: Optional[SlurmCluster] = None


def shared_cluster() -> SlurmCluster:
    """One cluster per test process, whichever test module asks first (stopped at exit)."""
    global _shared
    if _shared is None:
        base = tempfile.mkdtemp(prefix="xlpipe-slurm-")
        _shared = SlurmCluster(base).start()
    return _shared


def _stop_shared() -> None:
    """Stop the shared cluster; its base dir (logs, state) stays only with XLPIPE_KEEP_SLURM=1."""
    global _shared
    if _shared is None:
        return
    _shared.stop()
    if os.environ.get("XLPIPE_KEEP_SLURM", "") in ("", "0"):
        shutil.rmtree(_shared.base, ignore_errors=True)
    else:
        print(f"SLURM test cluster files kept in {_shared.base}", file=sys.stderr)
    _shared = None


def _require() -> bool:
    return os.environ.get("XLPIPE_REQUIRE_SLURM", "") not in ("", "0")


try:
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster():
        missing = missing_binaries()
        if missing:
            msg = (f"SLURM not installed (missing {', '.join(missing)}); "
                   f"apt-get install slurm-wlm munge, or see .ci/run")
            if _require():
                pytest.fail(msg + " — XLPIPE_REQUIRE_SLURM=1 makes this a failure", pytrace=False)
            pytest.skip(msg)
        cluster = shared_cluster()
        yield cluster
        _stop_shared()
except ImportError:  # used as a script without pytest
    pass


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_harness.py start|stop BASE_DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "start":
        cluster.base.mkdir(parents=True, exist_ok=True)
        cluster.start()
        atexit.unregister(cluster.stop)
        pids = {n: p.pid for n, p in cluster.procs.items()}
        print(f"# daemons {pids}; stop with: python tests/slurm_harness.py stop {cluster.base}")
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if cluster.conf.exists():  # jobs first, so no slurmstepd outlives its slurmd
        subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=cluster.env, capture_output=True)
        time.sleep(2)
    for name in (*cluster.slurmds, "slurmctld", "munged"):
        pid_file = cluster.base / "pids" / f"{name}.real.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
        pid_file.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
