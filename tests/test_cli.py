"""The `xlpipe <stage>` console script dispatches to each stage's main."""
from __future__ import annotations

import subprocess
import sys

from pipeline.cli import STAGES


def xlpipe(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120)


def test_lists_stages_and_rejects_unknown():
    ok = xlpipe()
    assert ok.returncode == 0 and all(stage in ok.stdout for stage in STAGES)
    bad = xlpipe("trian")
    assert bad.returncode == 2 and "stages: prepare" in bad.stderr


def test_stage_help_and_exit_code_pass_through(tmp_path):
    assert xlpipe("train", "--help").returncode == 0
    # a failing stage's exit code and message come back
    missing = xlpipe("evaluate", "--config", str(tmp_path / "absent.yaml"))
    assert missing.returncode != 0 and "absent.yaml" in missing.stderr


def test_a_bad_value_fails_every_stage_before_any_work_or_mlflow_run(tmp_path):
    db = tmp_path / "mlflow.db"
    common = ["--config", "configs/tiny.yaml", f"tracking.uri=sqlite:///{db}", f"data.output={tmp_path / 'shards'}",
              f"train.output={tmp_path / 'run'}"]
    for stage, bad, named in (("train", "train.lr=-1", "train.lr=-1.0 is out of range: it must be > 0.0"),
                              ("train", "train.n_streams=0", "train.n_streams=0 is out of range"),
                              ("evaluate", "eval.mem_len=-5", "eval.mem_len=-5 is out of range"),
                              ("prepare", "data.workers=-3", "data.workers=-3 is out of range")):
        res = xlpipe(stage, *common, bad)
        assert res.returncode == 2, res.stderr[-2000:]            # a usage error, as argparse's own
        assert named in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not db.exists() and not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()
