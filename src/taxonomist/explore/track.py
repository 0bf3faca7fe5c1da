"""MLflow runs of the exploring commands (``taxonomist cluster``, ``taxonomist suggest``): one
run each in the ``<tracking.experiment>-explore`` experiment (apart from the pipeline's runs,
which compare models), with the command's settings as params, its numbers as metrics and its
report as artifacts. A store that is down or refuses does not lose the report: one warning."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def log_run(
    cfg: DictConfig,
    command: str,
    name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    files: Sequence[Path],
    args: Sequence[str],
    artifact_path: str | None = None,
) -> str:
    """Log one run of ``command`` (its ``name`` gets a timestamp); return its id. Metrics are
    logged as ``<command>/<key>``, files under ``artifact_path`` (default: ``command``)."""
    import mlflow

    from taxonomist.tracking import runs
    from taxonomist.tracking.redact import redact, redact_all

    explore = OmegaConf.merge(cfg, {"tracking": {"experiment": f"{cfg.tracking.experiment}-explore"}})
    experiment_id = runs.setup(explore)  # type: ignore[arg-type]
    client = mlflow.MlflowClient()
    tags = {"command": command, "inputs": " ".join(args)[:500], "git_commit": runs.git_commit()}
    run = client.create_run(experiment_id, run_name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", tags=redact_all(tags))
    for key, value in redact_all(params).items():
        client.log_param(run.info.run_id, key, str(value)[: runs.MAX_PARAM_LENGTH])
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, runs.metric_name(f"{command}/{key}"), float(value))
    for path in files:
        client.log_artifact(run.info.run_id, str(path), artifact_path=artifact_path or command)
    client.set_terminated(run.info.run_id)
    log.info("%s: MLflow run %s (%s)", command, run.info.run_id, redact(runs.tracking_uri(cfg)))
    return run.info.run_id


def try_log(command: str, out: Path, log_it: Callable[[], str]) -> str | None:
    """``log_it()``, or None with one warning when the store fails: the report in ``out`` stays."""
    try:
        return log_it()
    except Exception as err:
        from taxonomist.tracking.redact import redact

        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        log.warning("%s: the report is in %s, but MLflow did not take the run (%s)", command, out, redact(first))
        return None
