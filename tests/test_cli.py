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
