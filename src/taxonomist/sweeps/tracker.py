"""The sweep's parent MLflow run, kept by a Hydra callback.

At the start of a multirun, :class:`SweepTracker` finds the parent run of this sweep (by its
name) or creates it, logs the sweep definition, and writes ``sweeps/<name>/sweep.json`` for the
trials. A rerun of an interrupted sweep finds the same parent: its unfinished child runs are
marked killed (``taxonomist sweep`` resumes the Optuna study itself, before Hydra starts).
At the end it logs the best trial's params and metrics and a summary table and plot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from taxonomist.files import atomic_write_json
from taxonomist.sweeps.state import OBJECTIVE_METRIC, ROLE_TAG, STATE_FILE, SWEEP_TAG, child_runs, pipeline_config
from taxonomist.sweeps.summary import summarise
from taxonomist.tracking import runs
from taxonomist.tracking.redact import redact, redact_all

log = logging.getLogger(__name__)


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a sweep varies: command-line sweeps (``a=1,2``) and the Optuna search space."""
    task_overrides = list(config.hydra.overrides.task)
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    parsed = OverridesParser.create().parse_overrides(task_overrides)
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in params if str(k) not in keys]


def sweep_definition(config: DictConfig) -> dict[str, Any]:
    """What defines the sweep: the overrides, the sweeper and its search space."""
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    return {
        "name": str(config.sweep.name),
        "overrides": list(config.hydra.overrides.task),
        "sweeper": sweeper,
        "launcher": str(OmegaConf.select(config, "hydra.launcher._target_", default="")),
    }


def find_parent(client: Any, experiment_id: str, name: str) -> Any | None:
    """The parent run of sweep ``name`` in the experiment, if an earlier run of it exists."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'sweep' AND tags.`{SWEEP_TAG}` = '{name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return found[0] if found else None


def finished_trial(cfg: DictConfig, parent_run_id: str, key: str) -> tuple[str, float] | None:
    """(run id, objective) of a finished child run of the sweep with trial key ``key``, if any."""
    import mlflow

    experiment_id = runs.setup(cfg)
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND tags.`sweep.trial_key` = '{key}' "
            "AND attributes.status = 'FINISHED'"
        ),
        max_results=1,
    )
    if not found or OBJECTIVE_METRIC not in found[0].data.metrics:
        return None
    return found[0].info.run_id, float(found[0].data.metrics[OBJECTIVE_METRIC])


class SweepTracker(Callback):
    """Hydra callback: the sweep's MLflow parent run, its resume state and its summary."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Find or create the parent run, prepare resuming, and write ``sweep.json``."""
        import mlflow

        from taxonomist.tasks import task_of

        root = Path(config.hydra.runtime.cwd)
        state_file = root / str(config.hydra.sweep.dir) / STATE_FILE
        # Hydra turns a callback's exception into a warning: without this file the trials stop at once
        # instead of using the state of an earlier run.
        state_file.unlink(missing_ok=True)
        cfg = pipeline_config(config, root)
        name = str(config.sweep.name)
        experiment_id = runs.setup(cfg)
        client = mlflow.MlflowClient()
        objective = task_of(cfg).val_metric(str(cfg.sweep.objective))
        definition = sweep_definition(config)
        parent = find_parent(client, experiment_id, name)
        if parent is None:
            parent = client.create_run(
                experiment_id,
                run_name=name,
                tags=redact_all(
                    {
                        ROLE_TAG: "sweep",
                        SWEEP_TAG: name,
                        "task": str(cfg.task.name),
                        "dataset": runs.dataset_name(cfg),
                        "git_commit": runs.git_commit(),
                        "mlflow.source.name": "taxonomist sweep",
                        "mlflow.note.content": describe_sweep(definition, objective),
                    }
                ),
            )
            client.log_param(parent.info.run_id, "sweep.objective", objective)
            client.log_param(parent.info.run_id, "sweep.overrides", redact(" ".join(definition["overrides"]))[:6000])
            definition_yaml = OmegaConf.to_yaml(OmegaConf.create(definition))
            client.log_text(parent.info.run_id, redact(definition_yaml), "sweep/definition.yaml")
        else:
            log.info("resuming sweep %r (parent run %s)", name, parent.info.run_id)
            client.update_run(parent.info.run_id, status="RUNNING")
            for child in child_runs(client, experiment_id, parent.info.run_id):
                if child.info.status == "RUNNING":  # left over from the interrupted run
                    client.set_terminated(child.info.run_id, status="KILLED")
        self.parent_run_id = parent.info.run_id
        atomic_write_json(
            state_file,
            {
                "name": name,
                "parent_run_id": parent.info.run_id,
                "swept": swept_keys(config),
                "objective": objective,
                "direction": direction(config, objective),
            },
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Log the best trial and the summary to the parent run and close it."""
        if self.parent_run_id is None:
            return
        root = Path(config.hydra.runtime.cwd)
        summarise(config, root, self.parent_run_id)


def direction(config: DictConfig, objective: str) -> str:
    """``maximize`` or ``minimize``: the Optuna sweeper's, else by the metric's name."""
    configured = OmegaConf.select(config, "hydra.sweeper.direction")
    if isinstance(configured, str):
        return configured
    return "minimize" if objective.endswith("loss") else "maximize"


def describe_sweep(definition: dict[str, Any], objective: str) -> str:
    """The parent run's description (Markdown)."""
    sweeper = definition["sweeper"]
    kind = "Optuna search" if "optuna" in str(sweeper.get("_target_", "")).lower() else "grid"
    lines = [f"**Sweep `{definition['name']}`**: {kind}, trials ranked by `{objective}`."]
    lines.append("- overrides: `" + " ".join(definition["overrides"]) + "`")
    for key, space in (sweeper.get("params") or {}).items():
        lines.append(f"- `{key}`: `{space}`")
    return "\n".join(lines)
