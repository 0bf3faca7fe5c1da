"""What the sweep modules share: the state file, the objective metric, the trial's config.

:mod:`~taxonomist.sweeps.launch`, :mod:`~taxonomist.sweeps.tracker`,
:mod:`~taxonomist.sweeps.trial` and :mod:`~taxonomist.sweeps.summary` all import this
module and none of it imports them, so the sweep modules import each other in one direction
only (launch -> trial -> tracker -> summary -> state). Only light libraries here: MLflow is
imported by the functions that need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from taxonomist.config import validate

STATE_FILE = "sweep.json"  # in the sweep folder: parent run id, swept keys, objective
OBJECTIVE_METRIC = "sweep/objective"  # logged to each trial's run: the value the sweep ranks by
ROLE_TAG = "taxonomist.role"
SWEEP_TAG = "sweep"


def is_optuna(config: DictConfig) -> bool:
    """Whether the sweeper is Optuna's."""
    return "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")).lower()


def child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of a parent run (all statuses)."""
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def pipeline_config(cfg: DictConfig, root: Path) -> DictConfig:
    """The trial's validated pipeline config, with relative paths taken from the project root."""
    unresolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=False)  # type: ignore[assignment]
    unresolved.pop("hydra", None)  # the callback's config still has it; it resolves only inside Hydra
    unresolved.pop("hparams_search", None)
    raw = OmegaConf.to_container(OmegaConf.create(unresolved), resolve=True)
    out = validate(raw, origin="sweep trial")
    uri = str(out.tracking.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out.tracking.uri = "sqlite:///" + str(root / uri[len("sqlite:///") :])
    loc = str(out.tracking.artifact_location)
    if "://" not in loc and not Path(loc).is_absolute():
        out.tracking.artifact_location = str(root / loc)
    for key in ("data.source", "data.image_root", "task.taxonomy", "data.builtin_dir"):
        value = OmegaConf.select(out, key)
        if value and "://" not in str(value) and ":" not in str(value)[:10] and not Path(value).is_absolute():
            OmegaConf.update(out, key, str(root / str(value)))
    return out
