"""MLflow tracking from rank 0; the other ranks get the run id by broadcast and do nothing.

    tracker = Tracker(cfg.tracking).start(run_name="wt103-base", run_id=ckpt_run_id,
                                          params=cfg, tags={"stage": "train"})
    with tracker:                                   # FINISHED / FAILED / KILLED on exit
        tracker.log_metrics({"loss": 3.2, "lr": 2.5e-4}, step=100)
        tracker.log_dict(ds_config, "deepspeed.json")
        with tracker.child("eval-mem640") as ev:    # nested run under the training run
            ev.log_metrics({"valid_ppl": 24.0}, step=100)

``start`` and ``child`` are collectives when a process group is running (rank 0 broadcasts the
run id, or its error, so no rank waits forever). MLflow is imported on rank 0 only.

Where runs go: ``tracking.uri`` if set, else ``$MLFLOW_TRACKING_URI`` (e.g. the server started
by cluster/mlflow_server.sh), else ``sqlite:///<cwd>/mlruns.db`` with artifacts in ``<cwd>/mlruns``.

Experiments are tagged ``mlflow.experimentKind = custom_model_development`` (model training, not
a GenAI app) when created, or when found without the tag; a kind someone set is left alone.
MLflow 3.17's UI takes the kind from its GenAI / Model training switch instead (remembered by the
browser, or ``?workflowType=machine_learning`` in the URL): ``ui_url`` gives links that carry it.

Resuming (``run_id=``, or ``$MLFLOW_RUN_ID``) reopens the same run as RUNNING. Params are immutable in MLflow: a param
already logged with the same value is skipped; a changed one is kept and the new value is logged
as the tag ``param_changed.<key>``. Params go in batches of 100 (MLflow's limit); values longer
than MLflow's limit are cut, tagged ``param_truncated.<key>`` and kept whole in the artifact
``params/truncated.json``.

End states: FINISHED on a clean exit; FAILED on an exception; KILLED on KeyboardInterrupt, a
non-zero SystemExit, or a stop by signal that was not requeued; SCHEDULED after a clean
preemption that requeued the job (``mark_preempted(requeued=True)``): the run will go on.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

from pipeline.common import XlpipeError, git, git_commit
from pipeline.config import TrackingConfig, flatten
from pipeline.runtime import distributed

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100     # MLflow's LogBatch limits (mlflow.utils.validation)
MAX_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
DEFAULT_DB = "mlruns.db"
# Model training, not a GenAI app: the tag MLflow 3's experiment-kind selector writes (values from
# its ExperimentKind enum), read by its UIs before 3.17's GenAI / Model training switch.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def tracking_uri(cfg: Optional[TrackingConfig] = None) -> str:
    """``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the working directory."""
    if cfg is not None and cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # Absolute, so a later chdir (or a stage run from elsewhere) cannot split the store.
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def ui_url(base: str, experiment_id: str, run_id: Optional[str] = None) -> str:
    """The UI page of an experiment (its runs table) or of one run, in the model-training view.

    MLflow 3.17's UI opens every experiment as a GenAI one unless the URL (or the browser's last
    choice of the sidebar switch) says ``workflowType=machine_learning``.
    """
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def _quiet_store_logs() -> None:
    # The SQL store's migrations log every step at INFO on first use; SQLAlchemy 2.1 warns
    # about a loader MLflow uses. None of it is actionable for a user.
    # The system-metrics thread announces start, stop and "no GPU" at INFO on every run.
    for name in ("alembic", "sqlalchemy", "mlflow.store.db.utils", "mlflow.store.db",
                 "mlflow.system_metrics"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*noload.* loader strategy is deprecated")


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_tags(world_size: Optional[int] = None) -> dict[str, str]:
    """Git commit, SLURM job and restart count, world size, host and library versions."""
    import torch

    tags = {
        "world_size": str(world_size if world_size is not None else distributed.get_world_size()),
        "host": socket.gethostname(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "deepspeed_version": _version("deepspeed"),  # metadata only: importing it costs seconds
        "mlflow_version": _version("mlflow"),
        "slurm_restart_count": str(distributed.restart_count()),
    }
    commit = git_commit()
    if commit:  # sbatch may run from a copy of the tree, so record it explicitly
        tags["git_commit"] = commit
        tags["git_dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
                "SLURM_JOB_NODELIST", "SLURM_CLUSTER_NAME"):
        if os.environ.get(key):
            tags[key.lower()] = os.environ[key]
    return tags


def _str_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


class TrackingError(XlpipeError, RuntimeError):
    """MLflow could not start or resume the run (raised on every rank)."""


class Tracker:
    """One MLflow run; a no-op on ranks other than 0 and when ``cfg.enabled`` is false."""

    def __init__(self, cfg: Optional[TrackingConfig] = None, rank: Optional[int] = None):
        self.cfg = cfg or TrackingConfig()
        self.rank = distributed.get_rank() if rank is None else rank
        self.run_id: Optional[str] = None
        self.final_status = "FINISHED"       # what a clean exit ends the run with
        self._client = None
        self._ended = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        """True where this process talks to MLflow: rank 0 with tracking enabled."""
        return self.cfg.enabled and self.rank == 0

    @property
    def uri(self) -> str:
        return tracking_uri(self.cfg)

    def start(self, run_name: Optional[str] = None, run_id: Optional[str] = None,
              params: Any = None, tags: Optional[Mapping[str, Any]] = None,
              parent_run_id: Optional[str] = None, nested: bool = False,
              world_size: Optional[int] = None) -> "Tracker":
        """Start (or with ``run_id`` resume) the run; a collective under a process group.

        ``params``: a config dataclass (flattened) or a flat mapping. ``parent_run_id`` makes it
        a child of a run in another process (evaluation under a training run).
        """
        payload: Any = None
        if self.active:
            try:
                self.run_id = self._start(run_name, run_id, parent_run_id, nested, tags, world_size)
                if params is not None:
                    self.log_params(params)
                payload = {"run_id": self.run_id}
            except Exception as exc:
                payload = {"error": f"{type(exc).__name__}: {exc}"}
                distributed.broadcast_object(payload)
                if self.run_id is not None:  # started, then failed (e.g. on its params)
                    try:
                        self.end("FAILED")
                    except Exception:  # noqa: BLE001 - the first error is the one to report
                        pass
                raise
        payload = distributed.broadcast_object(payload)
        if payload is not None and "error" in payload:
            raise TrackingError(f"rank 0 could not start the MLflow run at {self.uri}: {payload['error']}")
        if not self.active:
            self.run_id = payload["run_id"] if payload else None
        return self

    def _start(self, run_name, run_id, parent_run_id, nested, tags, world_size) -> str:
        _quiet_store_logs()
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        self._client = mlflow.MlflowClient(self.uri)
        if self.cfg.system_metrics:
            mlflow.system_metrics.set_system_metrics_sampling_interval(self.cfg.system_metrics_interval)
            mlflow.system_metrics.set_system_metrics_samples_before_logging(1)
        # MLFLOW_RUN_ID names the top-level run to resume; consume it (as MLflow does) so a
        # child started later cannot pick it up too.
        env_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
        if not (nested or parent_run_id):
            run_id = run_id or env_run_id or None
        all_tags = environment_tags(world_size) | {k: _str_value(v) for k, v in (tags or {}).items()}
        if run_id:
            self._check_resumable(run_id)
            run = mlflow.start_run(run_id=run_id, nested=nested or mlflow.active_run() is not None,
                                   log_system_metrics=self.cfg.system_metrics)
            all_tags["resumed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        else:
            run = mlflow.start_run(experiment_id=self._experiment_id(), run_name=run_name or self.cfg.run_name or None,
                                   nested=nested, parent_run_id=parent_run_id,
                                   log_system_metrics=self.cfg.system_metrics)
        self.run_id = run.info.run_id
        self.set_tags(all_tags)
        log.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if run_id else "new", self.uri)
        if self.uri.startswith(("http://", "https://")):
            log.info("MLflow UI: %s", ui_url(self.uri, run.info.experiment_id, self.run_id))
        return self.run_id

    def _check_resumable(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise TrackingError(f"cannot resume MLflow run {run_id!r} at {self.uri}: it does not exist "
                                f"there ({exc.error_code}); was the checkpoint tracked on another server? "
                                f"Set tracking.uri / MLFLOW_TRACKING_URI to that store") from None
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow run {run_id} at {self.uri} is deleted; restore it in the UI "
                                f"or start a new run")

    def _experiment_id(self) -> str:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            self._mark_model_training(exp)
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts next to the database, not in the cwd
            safe = re.sub(r"[^\w.-]+", "_", self.cfg.experiment)
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlruns" / safe).as_uri()
        try:
            return self._client.create_experiment(self.cfg.experiment, artifact_location=location,
                                                  tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created meanwhile by another job: use it
            exp = self._client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                raise
            self._mark_model_training(exp)
            return exp.experiment_id

    def _mark_model_training(self, exp) -> None:
        """Tag an experiment made before the tag existed (or by someone else); never change a kind."""
        if EXPERIMENT_KIND_TAG in exp.tags:
            return
        try:
            self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as exc:  # noqa: BLE001 - e.g. READ permission only: the run matters more
            log.warning("could not tag MLflow experiment %r as model training: %s", exp.name, exc)

    def child(self, run_name: str, params: Any = None, tags: Optional[Mapping[str, Any]] = None) -> "Tracker":
        """A started nested run under this one (same config); a collective like ``start``."""
        child = Tracker(self.cfg, rank=self.rank)
        if not self.active:
            return child.start()
        return child.start(run_name=run_name, params=params, tags=tags, parent_run_id=self.run_id, nested=True)

    def mark_preempted(self, requeued: bool, step: Optional[int] = None) -> None:
        """After a signal stop: SCHEDULED when the job was requeued (the run goes on), else KILLED."""
        self.final_status = "SCHEDULED" if requeued else "KILLED"
        self.set_tags({"preempted": "true", "requeued": str(bool(requeued)).lower(),
                       **({"preempted_at_step": str(step)} if step is not None else {})})

    def end(self, status: Optional[str] = None) -> None:
        """End the run with ``status`` (default ``final_status``); idempotent."""
        if not self.active or self._ended or self.run_id is None:
            return
        import mlflow

        self._ended = True
        status = status or self.final_status
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)  # also stops this run's system-metrics thread
        else:
            self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # A tracking server that is gone must neither hide the real exception nor fail a
        # finished training: log it and move on.
        try:
            if exc_type is None or (exc_type is SystemExit and exc.code in (0, None)):
                self.end()
            elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                self.end("KILLED")
            else:
                try:
                    self.set_tags({"error": f"{exc_type.__name__}: {exc}"})
                finally:
                    self.end("FAILED")
        except Exception as end_exc:  # noqa: BLE001
            log.error("could not end MLflow run %s at %s: %s", self.run_id, self.uri, end_exc)
        return False

    # ------------------------------------------------------------------ logging
    def log_params(self, params: Any) -> None:
        """Log a config dataclass (flattened) or a mapping; safe to repeat on resume."""
        if not self.active:
            return
        from mlflow.entities import Param

        flat = flatten(params) if dataclasses.is_dataclass(params) else flatten(dict(params))
        existing = self._client.get_run(self.run_id).data.params
        new, changed, truncated = [], {}, {}
        for key, value in flat.items():
            text = _str_value(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                truncated[key] = text
                text = text[:MAX_PARAM_VAL_LENGTH]
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed[f"param_changed.{key}"] = text
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_PER_BATCH])
        if changed:
            log.warning("MLflow params are immutable; %d changed value(s) logged as param_changed.* tags: %s",
                        len(changed), ", ".join(k.split(".", 1)[1] for k in changed))
            self.set_tags(changed)
        if truncated:
            log.warning("param value(s) longer than MLflow's %d characters cut (full values in the artifact "
                        "params/truncated.json): %s", MAX_PARAM_VAL_LENGTH, ", ".join(truncated))
            self.set_tags({f"param_truncated.{k}": f"{len(v)} characters" for k, v in truncated.items()})
            self.log_dict(truncated, "params/truncated.json")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, _str_value(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=items[i:i + MAX_TAGS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Metrics at ``step`` (floats or 1-element tensors); already reduced across ranks."""
        if not self.active or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v.item() if hasattr(v, "item") else v), now, int(step))
                 for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=items[i:i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """A file or a directory (recursively) under ``artifact_path``."""
        if not self.active:
            return
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"artifact {path} does not exist")
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """A dict as JSON or YAML (by the file's extension)."""
        if self.active:
            self._client.log_dict(self.run_id, obj, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.active:
            self._client.log_text(self.run_id, text, artifact_file)
