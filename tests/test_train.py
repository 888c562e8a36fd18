"""The training stage on real DeepSpeed: 2 gloo ranks (separate processes, env-var launch), CPU,
a tiny Transformer-XL, real shards from the prepare stage, a real MLflow SQLite store.

Every expectation comes from another run, never from the code under test: ZeRO stages against
each other, a resumed run against the uninterrupted one, accumulation against one batch over the
same streams, stream inputs against the split's raw bytes. Runs are shared between tests
(module-scoped cache); each is a few steps.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train_fixtures import REPO, TINY, finish, launch, make_shards

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "tiny.yaml")


class Runs:
    """Named training runs, each launched once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.shards = make_shards(root / "data")
        self.db = root / "mlflow.db"
        self.results: dict[str, list[dict]] = {}

    def args(self, name: str, extra=()) -> list[str]:
        return ["--config", CONFIG, f"data.output={self.shards}", *TINY, f"train.output={self.root / name}",
                *extra]

    def run(self, name: str, extra=(), world: int = 2, record: bool = True, seed_from: tuple | None = None,
            tracked: bool = False) -> list[dict]:
        if name in self.results:
            return self.results[name]
        if seed_from is not None:   # start from another run's checkpoint at a step ("stop at N")
            src, step = seed_from
            dst = self.root / name / "checkpoints"
            dst.mkdir(parents=True)
            shutil.copytree(self.root / src / "checkpoints" / f"global_step{step}", dst / f"global_step{step}")
            (dst / "latest").write_text(f"global_step{step}\n")
        extra = list(extra)
        if tracked:
            extra += ["tracking.enabled=true", f"tracking.uri=sqlite:///{self.db}", "tracking.system_metrics=false",
                      "tracking.experiment=test-train"]
        cmd = ["tests/train_worker.py", str(self.root / name), *(["--record"] if record else []), "--",
               *self.args(name, extra)]
        res = launch(world, cmd, cwd=REPO)
        for rc, text in res:
            assert rc == 0, f"run {name} failed:\n{text[-6000:]}"
        self.results[name] = [json.loads(Path(f"{self.root / name}.rank{r}.json").read_text()) for r in range(world)]
        return self.results[name]

    def ckpt(self, name: str, step: int) -> Path:
        return self.root / name / "checkpoints" / f"global_step{step}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("train"))


def weights(path: Path) -> dict[str, torch.Tensor]:
    from pipeline.runtime.checkpoint import consolidated_state_dict

    return consolidated_state_dict(path)


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k}: max |diff| {(a[k] - b[k]).abs().max()}"
        else:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def per_stream(results: list[dict]) -> dict[int, dict[int, list]]:
    """{step: {stream_id: [mean nll, inputs]}} merged over ranks."""
    out: dict[int, dict[int, list]] = {}
    for r in results:
        for step, streams in r["seen"].items():
            out.setdefault(int(step), {}).update({int(s): v for s, v in streams.items()})
    return out


# ----------------------------------------------------------------------------- ZeRO stages


def test_zero_stages_agree_bitwise_without_clipping(runs):
    ref = runs.run("noclip0", ["train.zero_stage=0", "train.clip=0"], record=False)
    losses = ref[0]["losses"]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]                                 # it learns
    assert ref[0]["losses"] == ref[1]["losses"]                    # all-reduced: every rank has them
    w0 = weights(runs.ckpt("noclip0", 6))
    for stage in (1, 2, 3):
        got = runs.run(f"noclip{stage}", [f"train.zero_stage={stage}", "train.clip=0"], record=False)
        assert got[0]["losses"] == losses, f"stage {stage}"
        assert_same_weights(weights(runs.ckpt(f"noclip{stage}", 6)), w0)


def test_zero_stages_agree_with_clipping_to_rounding(runs):
    """With gradient clipping the stages agree to the last bits only: stage 0 takes the global
    norm over whole gradients, ZeRO over each rank's partitions then all-reduced, so the clip
    coefficient can differ by an ulp (measured: weights within 1e-7, losses within 3e-7)."""
    ref = runs.run("stage0", ["train.zero_stage=0"])
    w0 = weights(runs.ckpt("stage0", 6))
    for stage in (2, 3):
        got = runs.run(f"stage{stage}", [f"train.zero_stage={stage}"])
        assert got[0]["losses"] == pytest.approx(ref[0]["losses"], rel=1e-6)
        assert_same_weights(weights(runs.ckpt(f"stage{stage}", 6)), w0, atol=1e-6)


def test_streams_are_the_split_in_order(runs):
    """What the model saw is contiguous raw split bytes per stream (rolled), step after step."""
    from pipeline.data.shards import Manifest, SplitTokens

    seen = per_stream(runs.run("stage0", ["train.zero_stage=0"]))
    tokens = SplitTokens(runs.shards, Manifest.load(runs.shards), "train")
    raw = tokens.read(0, len(tokens)).astype(np.int64)
    tokens.close()
    L = (len(raw) - 1) // 4
    for sid in range(4):
        text = np.concatenate([np.array(seen[s][sid][1]) for s in range(6)])
        stream = raw[sid * L: (sid + 1) * L + 1]
        # roll: the stream's L+1 tokens rotated; find the rotation and check 48 contiguous tokens
        doubled = np.concatenate([stream, stream])
        hits = [i for i in range(L + 1) if np.array_equal(doubled[i: i + len(text)], text)]
        assert hits, f"stream {sid} inputs are not a contiguous piece of its rotated stream"


# ----------------------------------------------------------------------------- accumulation


def test_two_micro_batches_equal_one_batch_over_the_same_streams(runs):
    """Each micro-batch owns its streams and memory, and DeepSpeed averages the two halves'
    gradients: the same training as one batch of all the rank's streams. Not bitwise: the sum
    of two half-batch gradients is rounded differently from one full-batch gradient (and Adam
    divides by sqrt(v) + eps, which amplifies the last bits a little)."""
    common = ["train.zero_stage=2", "model.dropout=0.0"]
    one = per_stream(runs.run("accum1", common + ["train.micro_batches=1"]))
    two = per_stream(runs.run("accum2", common + ["train.micro_batches=2"]))
    for step in range(6):
        assert one[step].keys() == two[step].keys() == {0, 1, 2, 3}
        for sid in range(4):
            assert one[step][sid][1] == two[step][sid][1]                       # same tokens
            assert two[step][sid][0] == pytest.approx(one[step][sid][0], rel=1e-5, abs=1e-6), (step, sid)
    assert_same_weights(weights(runs.ckpt("accum2", 6)), weights(runs.ckpt("accum1", 6)), atol=1e-5)


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bitwise(runs, stage):
    """N + M steps uninterrupted == N steps, a new process resuming from step N, M more steps."""
    full = runs.run(f"stage{stage}", [f"train.zero_stage={stage}"])
    resumed = runs.run(f"resume{stage}", [f"train.zero_stage={stage}"], seed_from=(f"stage{stage}", 3))
    assert resumed[0]["start_step"] == 3
    assert resumed[0]["losses"] == full[0]["losses"][3:]
    a, b = per_stream(full), per_stream(resumed)
    for step in (3, 4, 5):
        assert a[step] == b[step]                          # every stream: same tokens, same loss
    assert_same_weights(weights(runs.ckpt(f"resume{stage}", 6)), weights(runs.ckpt(f"stage{stage}", 6)))


def test_checkpoint_files_and_pruning(runs):
    from pipeline.runtime.checkpoint import latest_tag, list_tags

    runs.run("stage2", ["train.zero_stage=2"])
    root = runs.root / "stage2" / "checkpoints"
    assert latest_tag(root) == "global_step6"
    assert [t for _, t in list_tags(root)] == ["global_step3", "global_step6"]
    ours = root / "global_step6" / "xlpipe"
    meta = json.loads((ours / "meta.json").read_text())
    assert meta["step"] == 6 and meta["world_size"] == 2 and meta["tokens_seen"] == 6 * 4 * 8
    assert meta["config"]["train"]["zero_stage"] == 2 and meta["config"]["model"]["n_token"] == 256
    for r in (0, 1):
        state = torch.load(ours / f"rank{r}.pt", weights_only=True)   # no pickle needed
        assert state["memory"]["ids"] == [2 * r, 2 * r + 1]
        assert state["memory"]["fields"]["hidden"].shape == (2, 2, 8, 32)   # streams, layers, mem_len, d_model
        assert sorted(state["streams"]["streams"]) == [2 * r, 2 * r + 1]
    assert not list((root / ".tmp").glob("global_step*"))               # staging emptied
    assert (root / "zero_to_fp32.py").is_file()

    # keep_last=1 on a continued run leaves only the newest
    runs.run("prune", ["train.zero_stage=2", "train.keep_last=1", "train.max_steps=9"], seed_from=("stage2", 6),
             record=False)
    assert [t for _, t in list_tags(runs.root / "prune" / "checkpoints")] == ["global_step9"]


def test_a_crash_before_latest_moved_resumes_from_the_newest_complete_checkpoint(runs):
    """The save window: global_step6 renamed into place, `latest` still naming global_step3. The
    resumed run continues from step 6 (not 3), exactly as a resume from step 6 does, and its saves
    move `latest` on."""
    ref = runs.run("prune", ["train.zero_stage=2", "train.keep_last=1", "train.max_steps=9"], seed_from=("stage2", 6),
                   record=False)
    dst = runs.root / "window" / "checkpoints"
    dst.mkdir(parents=True)
    for step in (3, 6):
        shutil.copytree(runs.ckpt("stage2", step), dst / f"global_step{step}")
    (dst / "latest").write_text("global_step3\n")
    res = runs.run("window", ["train.zero_stage=2", "train.max_steps=9"], record=False)
    assert all(r["start_step"] == 6 for r in res)
    assert res[0]["losses"] == ref[0]["losses"]
    assert (dst / "latest").read_text().strip() == "global_step9"
    # A step saved already (the window again, at the end) is kept and named by `latest`, never skipped silently.
    (dst / "latest").write_text("global_step6\n")
    out = launch(2, ["-m", "pipeline.train", *runs.args("window", ["train.zero_stage=2", "train.max_steps=9"])],
                 cwd=REPO)
    assert [rc for rc, _ in out] == [0, 0], out[0][1][-3000:]
    assert "checkpoint" in out[0][1] and "exists already (complete); latest -> global_step9" in out[0][1]
    assert (dst / "latest").read_text().strip() == "global_step9"


# ----------------------------------------------------------------------------- preemption


def test_sigusr1_to_one_rank_saves_exits_zero_and_resumes_to_the_same_weights(runs):
    ref = runs.run("stage2", ["train.zero_stage=2"])
    name = "preempt"
    prefix = runs.root / name
    cmd = ["tests/train_worker.py", str(prefix), "--wait-signal", "1:2", "--",
           *runs.args(name, ["train.zero_stage=2", "tracking.enabled=true", f"tracking.uri=sqlite:///{runs.db}",
                             "tracking.system_metrics=false", "tracking.experiment=test-train"])]
    procs = launch(2, cmd, cwd=REPO, wait=False)
    ready = prefix.with_suffix(".ready")
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert ready.exists(), finish(procs)
    os.kill(json.loads(ready.read_text())["pid"], signal.SIGUSR1)   # rank 1 only, after its step 2
    prefix.with_suffix(".sent").touch()
    res = finish(procs)
    assert [rc for rc, _ in res] == [0, 0], res[0][1][-4000:] + res[1][1][-4000:]
    first = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]
    assert all(s["stopped"] and not s["requeued"] for s in first)         # not under SLURM: no requeue
    stop_step = first[0]["step"]
    assert first[1]["step"] == stop_step and 2 <= stop_step < 6
    assert first[0]["losses"] == ref[0]["losses"][:stop_step]
    assert (runs.root / name / "checkpoints" / "latest").read_text().strip() == f"global_step{stop_step}"
    run_id = first[0]["run_id"]
    assert _status(runs.db, run_id) == "KILLED"                          # stopped, not requeued

    (prefix.with_suffix(".sent")).unlink()
    again = runs.run("preempt-resume", ["train.zero_stage=2", "tracking.enabled=true",
                                        f"tracking.uri=sqlite:///{runs.db}", "tracking.system_metrics=false",
                                        "tracking.experiment=test-train"],
                     seed_from=(name, stop_step))
    assert again[0]["start_step"] == stop_step and again[0]["losses"] == ref[0]["losses"][stop_step:]
    assert again[0]["run_id"] == run_id                                  # the same MLflow run goes on
    assert _status(runs.db, run_id) == "FINISHED"
    assert_same_weights(weights(runs.ckpt("preempt-resume", 6)), weights(runs.ckpt("stage2", 6)))


# ----------------------------------------------------------------------------- late updates

LATE = ["train.late_update_step=3", "train.late_update_every=2"]


def test_late_updates_accumulate_consecutive_segments(runs):
    """Rae et al.'s late-training trick: from update 3 on, each update accumulates 2 consecutive
    segments of every stream. Until then the run is the plain one; after, it reads the stream
    two segments per update; a resume at the switch and ZeRO-2 reach the same weights."""
    ref = runs.run("stage0", ["train.zero_stage=0"])
    late = runs.run("late", ["train.zero_stage=0", *LATE])
    assert late[0]["tokens_seen"] == (3 + 3 * 2) * 4 * 8 and late[0]["step"] == 6
    assert late[0]["losses"][:3] == ref[0]["losses"][:3]
    a, r = per_stream(late), per_stream(ref)
    for step in (0, 1, 2):
        assert a[step] == r[step]
    for sid in range(4):
        assert a[3][sid][1] == r[4][sid][1]                 # update 4's last round: the plain run's step 5
    assert all(math.isfinite(x) for x in late[0]["losses"])
    resumed = runs.run("late-resumed", ["train.zero_stage=0", *LATE], seed_from=("late", 3))
    assert resumed[0]["losses"] == late[0]["losses"][3:]
    assert_same_weights(weights(runs.ckpt("late-resumed", 6)), weights(runs.ckpt("late", 6)))
    runs.run("late2", ["train.zero_stage=2", *LATE], record=False)
    assert_same_weights(weights(runs.ckpt("late2", 6)), weights(runs.ckpt("late", 6)), atol=1e-6)


# ----------------------------------------------------------------------------- elastic


def test_elastic_two_ranks_to_one_continues_every_stream(runs):
    """A ZeRO-2 checkpoint of 2 ranks resumed on 1: streams reassigned and memory re-sliced by
    stream id, Adam state re-partitioned through DeepSpeed's universal checkpoint. Without
    dropout the one-rank run computes what the two-rank run did (to rounding)."""
    common = ["train.zero_stage=2", "model.dropout=0.0", "train.micro_batches=2"]
    two = runs.run("accum2", common)
    one = runs.run("elastic", common, world=1, seed_from=("accum2", 3))
    assert one[0]["start_step"] == 3 and all(math.isfinite(x) for x in one[0]["losses"])
    a, b = per_stream(two), per_stream(one)
    for step in (3, 4, 5):
        assert b[step].keys() == {0, 1, 2, 3}
        for sid in range(4):
            assert b[step][sid][1] == a[step][sid][1], (step, sid)               # stream offsets continue
            # the loss of step 3 depends on the re-sliced memory rows and the loaded weights
            assert b[step][sid][0] == pytest.approx(a[step][sid][0], rel=1e-5, abs=1e-6), (step, sid)
    # Adam moments carried over: the weights after 3 more updates match the two-rank run.
    assert_same_weights(weights(runs.ckpt("elastic", 6)), weights(runs.ckpt("accum2", 6)), atol=1e-5)
    assert (runs.ckpt("elastic", 3) / "universal" / "zero").is_dir()
    state = torch.load(runs.ckpt("elastic", 6) / "xlpipe" / "rank0.pt", weights_only=True)
    assert state["memory"]["ids"] == [0, 1, 2, 3]
    two_final = [torch.load(runs.ckpt("accum2", 6) / "xlpipe" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert state["streams"]["streams"] == {**two_final[0]["streams"]["streams"], **two_final[1]["streams"]["streams"]}


def test_elastic_zero3_two_ranks_to_one(runs):
    """ZeRO-3 partitions the weights too; the universal checkpoint re-partitions both."""
    two = runs.run("stage3", ["train.zero_stage=3"])
    one = runs.run("elastic3", ["train.zero_stage=3"], world=1, seed_from=("stage3", 3))
    assert one[0]["start_step"] == 3 and len(one[0]["losses"]) == 3
    assert all(math.isfinite(x) for x in one[0]["losses"])
    a, b = per_stream(two), per_stream(one)
    for step in (3, 4, 5):
        assert {s: v[1] for s, v in b[step].items()} == {s: v[1] for s, v in a[step].items()}   # same tokens
    # dropout draws differ (one rank's generator now serves all streams): close, not equal
    assert one[0]["losses"] == pytest.approx(two[0]["losses"][3:], rel=0.02)


# ----------------------------------------------------------------------------- MLflow


def _status(db: Path, run_id: str) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT status FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0]


def test_mlflow_run_has_params_metrics_artifacts_and_resume_keeps_the_run(runs):
    first = runs.run("tracked", ["train.zero_stage=1", "train.eval_every=3"], tracked=True)
    run_id = first[0]["run_id"]
    assert run_id and first[1]["run_id"] == run_id                      # rank 1 learned it by broadcast
    resumed = runs.run("tracked-resume", ["train.zero_stage=1", "train.eval_every=3", "train.max_steps=8"],
                       tracked=True, seed_from=("tracked", 6))
    assert resumed[0]["run_id"] == run_id
    with sqlite3.connect(runs.db) as con:
        params = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)).fetchall())
        metrics = con.execute("SELECT key, step, value FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
        tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,)).fetchall())
        status, art = con.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
        names = [n for (n,) in con.execute("SELECT name FROM runs").fetchall()]
    assert status == "FINISHED"
    assert len(set(names)) == len(names)          # distinct runs get distinct names
    assert params["train.zero_stage"] == "1" and params["model.d_model"] == "32" and params["model.n_token"] == "256"
    assert tags["param_changed.train.max_steps"] == "8"                 # immutable params: the change is a tag
    assert tags["world_size"] == "2" and tags["stage"] == "train" and "git_commit" in tags
    by_key: dict[str, list] = {}
    for key, step, value in metrics:
        by_key.setdefault(key, []).append((step, value))
    for key in ("loss", "bpc", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "valid_loss", "valid_bpc"):
        assert key in by_key, key
    assert sorted(s for s, _ in by_key["loss"]) == [2, 4, 6, 8]
    assert sorted(s for s, _ in by_key["valid_loss"]) == [3, 6, 8]
    # logged loss = the token-weighted mean of the per-step losses the ranks agreed on
    loss = dict(by_key["loss"])
    assert loss[2] == pytest.approx(sum(first[0]["losses"][:2]) / 2, rel=1e-9)
    assert by_key["bpc"][0][1] == pytest.approx(dict(by_key["loss"])[by_key["bpc"][0][0]] / math.log(2))
    files = {p.name for p in Path(art.replace("file://", "")).rglob("*") if p.is_file()}
    assert {"config.yaml", "deepspeed.json"} <= files
    ds = json.loads((runs.root / "tracked" / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage"] == 1


def test_validation_matches_an_independent_scoring_of_the_checkpoint(runs):
    """valid_loss logged at step 6 == the consolidated step-6 weights scored in this process
    (a plain model, one process holding every stream)."""
    from models import build_model
    from pipeline.config import load_config
    from pipeline.evaluation.scoring import score_split

    res = runs.run("tracked", ["train.zero_stage=1", "train.eval_every=3"], tracked=True)
    cfg = load_config(CONFIG, [*TINY, "model.n_token=256"])
    model = build_model(cfg.model)
    model.load_state_dict(weights(runs.ckpt("tracked", 6)))
    sums = score_split(model, runs.shards, "valid", n_streams=4, tgt_len=8, mem_len=8, max_steps=3,
                       rank=0, world_size=1, reduce=False)
    assert res[0]["valid"]["tokens"] == sums["tokens"] == 4 * 8 * 3
    assert res[0]["valid"]["loss"] == pytest.approx(sums["nll_sum"] / sums["tokens"], rel=1e-5)


def test_torchrun_launch(runs):
    """`make demo`'s launcher: torchrun sets the rank variables (and TORCHELASTIC_RUN_ID)."""
    import subprocess
    import sys

    from train_fixtures import clean_env, free_port

    args = runs.args("torchrun", ["train.max_steps=2", "train.save_every=0"])
    r = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2",
                        f"--master_port={free_port()}", "-m", "pipeline.train", *args],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    meta = json.loads((runs.ckpt("torchrun", 2) / "xlpipe" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2


# ----------------------------------------------------------------------------- failures


def test_non_finite_loss_stops_naming_step_and_streams(runs):
    args = runs.args("nan", ["train.lr=1e30", "train.warmup_steps=0", "train.clip=0", "train.save_every=0"])
    res = launch(2, ["-m", "pipeline.train", *args], cwd=REPO)
    for rc, text in res:
        assert rc == 1, text[-3000:]
    text = res[0][1]
    assert "non-finite training loss at step 2" in text, text[-3000:]
    assert "rank 0 micro-batch 0 streams 0-1" in text and "rank 1 micro-batch 0 streams 2-3" in text
    assert not (runs.root / "nan" / "checkpoints" / "latest").exists()      # nothing trained through


def test_bf16_runs_on_cpu(runs):
    res = runs.run("bf16", ["train.precision=bf16", "train.max_steps=2", "train.save_every=0"], world=1)
    assert len(res[0]["losses"]) == 2 and all(math.isfinite(x) for x in res[0]["losses"])
    state = torch.load(runs.ckpt("bf16", 2) / "xlpipe" / "rank0.pt", weights_only=True)
    assert state["memory"]["fields"]["hidden"].dtype == torch.bfloat16     # memory follows the precision


def _fp16_supported() -> bool:
    from pipeline.runtime.engine import precision_support

    return precision_support()["fp16"]


def test_fp16_follows_the_machine(runs):
    """Where DeepSpeed's accelerator has fp16 (AVX512-FP16/AMX CPUs, GPUs) it trains with the
    dynamic loss scaler; elsewhere it is refused by name before any work."""
    if not _fp16_supported():
        out = launch(1, ["-m", "pipeline.train", *runs.args("fp16", ["train.precision=fp16"])], cwd=REPO)
        assert out[0][0] == 1 and "train.precision=fp16 is not supported" in out[0][1], out[0][1][-2000:]
        assert not (runs.root / "fp16" / "checkpoints").exists()
        return
    # A start scale of 2^24 overflows fp16 gradients: the scaler must skip those steps and halve the
    # scale each time (hysteresis 1) until the gradients fit, then the weights move.
    args = runs.args("fp16", ["train.precision=fp16", "train.max_steps=20", "train.save_every=0",
                              "train.log_every=1", "train.fp16_initial_scale_power=24", "train.fp16_hysteresis=1"])
    out = launch(1, ["-m", "pipeline.train", *args], cwd=REPO)
    rc, text = out[0]
    assert rc == 0, text[-3000:]
    scales = [float(m) for m in re.findall(r"loss-scale (\S+) \(skipped", text)]
    skipped = [int(m) for m in re.findall(r"\(skipped (\d+)\)", text)]
    assert len(scales) == 20, text[-3000:]
    assert scales[0] < 2.0 ** 24                              # the first step overflowed and was skipped
    assert all(b <= a for a, b in zip(scales, scales[1:]))    # only halving within 20 steps (window 1000)
    assert 1 <= skipped[-1] < 20                              # skipped since the start: some, not all
    assert all(abs(math.log2(s) - round(math.log2(s))) < 1e-4 for s in scales)   # halvings of 2^24
    assert all(math.isfinite(float(x)) for x in re.findall(r"\| loss (\S+) \|", text)[-5:])


def test_changed_shards_are_refused_on_resume(runs):
    runs.run("stage0", ["train.zero_stage=0"])
    other = make_shards(runs.root / "data-other", n_docs=450)
    dst = runs.root / "wrong-data" / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(runs.ckpt("stage0", 6), dst / "global_step6")
    (dst / "latest").write_text("global_step6\n")
    args = runs.args("wrong-data", [f"data.output={other}", "train.max_steps=8"])
    out = launch(1, ["-m", "pipeline.train", *args], cwd=REPO)
    assert out[0][0] == 1
    assert "are not the ones checkpoint" in out[0][1] and "splits.train.tokens" in out[0][1], out[0][1][-2000:]


# ----------------------------------------------------------------------------- torch.compile


def test_compile_gives_the_same_losses_and_checkpoint_keys(runs):
    """train.compile=true on one rank: the eager run's losses and validation (dropout off: the
    compiled graph draws its own dropout masks) and the same checkpoint keys, no ``_orig_mod.``."""
    args = ["model.dropout=0.0", "train.max_steps=4", "train.save_every=0", "train.eval_every=4"]
    eager = runs.run("compile-off", args, world=1, record=False)[0]
    compiled = runs.run("compile-on", [*args, "train.compile=true"], world=1, record=False)[0]
    assert len(eager["losses"]) == 4
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=0, atol=1e-5)
    assert abs(compiled["valid"]["loss"] - eager["valid"]["loss"]) <= 1e-5
    w_eager, w_compiled = weights(runs.ckpt("compile-off", 4)), weights(runs.ckpt("compile-on", 4))
    assert w_compiled.keys() == w_eager.keys() and not any("_orig_mod" in k for k in w_compiled)
    assert_same_weights(w_compiled, w_eager, atol=1e-5)
