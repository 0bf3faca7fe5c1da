"""One MLflow run per pipeline execution, shared by the train, evaluate and package stages.

Train opens the run and records its id in ``models/run.json``; evaluate and package reopen
it from there. The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri``
(default: an SQLite file at the project root); artifacts go to ``tracking.artifact_location``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from taxonomist.config import flatten
from taxonomist.files import atomic_write_json, read_json

RUN_FILE = Path("models/run.json")
MAX_PARAM_LENGTH = 6000


def tracking_uri(cfg: DictConfig) -> str:
    """The tracking URI in force: the environment's, else the config's (made absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(cfg.tracking.uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def artifact_location(cfg: DictConfig) -> str:
    """Where new experiments keep artifacts: a URI, or a local path made absolute."""
    loc = str(cfg.tracking.artifact_location)
    if "://" in loc:
        return loc
    return Path(loc).resolve().as_uri()


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    name = str(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A tracking server decides where artifacts go (it proxies them); a local store uses ours.
        remote = tracking_uri(cfg).startswith(("http://", "https://"))
        return client.create_experiment(name, artifact_location=None if remote else artifact_location(cfg))
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def git_commit() -> str:
    """The current git commit, or "unknown" outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_name(cfg: DictConfig) -> str:
    """A readable run name: model, dataset and time."""
    source = str(cfg.data.source).replace("builtin:", "").rstrip("/").split("/")[-1]
    return f"{cfg.model.name}-{source}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_pipeline_run(cfg: DictConfig, tags: dict[str, str]) -> str:
    """Create the run for this pipeline execution, log the config, write ``models/run.json``."""
    import mlflow

    experiment_id = setup(cfg)
    client = mlflow.MlflowClient()
    all_tags = {
        "git_commit": git_commit(),
        "task": str(cfg.task.name),
        "model_name": str(cfg.model.name),
        "mlflow.source.name": "dvc repro",
        **tags,
    }
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        all_tags["dvc_experiment"] = exp_name
    run = client.create_run(experiment_id, run_name=run_name(cfg), tags=all_tags)
    params = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(cfg).items()}
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    atomic_write_json(
        RUN_FILE,
        {
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "tracking_uri": tracking_uri(cfg),
        },
    )
    return run.info.run_id


def read_run_id(path: Path = RUN_FILE) -> str:
    """The run id train recorded."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the train stage first")
    return str(read_json(path)["run_id"])


@contextmanager
def resume_run(cfg: DictConfig, run_id: str | None = None) -> Iterator[Any]:
    """Reopen the pipeline run (from ``models/run.json`` by default) as the active run."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_id=run_id or read_run_id()) as run:
        yield run


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / :`` and spaces); others become ``_``."""
    return re.sub(r"[^\w\-./: ]", "_", name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run (names may contain ``/``)."""
    import mlflow

    mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()}, step=step)
