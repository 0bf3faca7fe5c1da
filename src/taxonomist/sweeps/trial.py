"""One sweep trial: prepare (or reuse) the data, train, evaluate, return the objective.

Hydra calls :func:`run_trial` in the trial's own folder (``hydra.job.chdir``), so ``models/`` and
``reports/`` of parallel trials never meet. Ingest and preprocess outputs are shared by every
trial with the same data settings: they are built once, under a file lock, in
``sweeps/.data/<key>/``. A trial that already finished in an earlier, interrupted run of the
same sweep is not trained again: its logged objective is returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import yaml
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from taxonomist.errors import ConfigError, RegistryError
from taxonomist.files import read_json
from taxonomist.stages.paths import MODELS_DIR
from taxonomist.sweeps import tracker
from taxonomist.sweeps.state import OBJECTIVE_METRIC, STATE_FILE, pipeline_config
from taxonomist.tracking import runs

log = logging.getLogger(__name__)
DATA_CACHE = Path("sweeps/.data")
# What ingest and preprocess read when the project has no dvc.yaml to say it.
DATA_SECTIONS = ("seed", "data", "task", "preprocess")


def scheduler_tags() -> dict[str, str]:
    """The SLURM job the trial runs in (``hydra/launcher=slurm``), as ``squeue`` shows it (an
    array task as ``<array job>_<task>``, which also names its folder under ``.submitit/``)."""
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        return {}
    job = env["SLURM_JOB_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"slurm.job_id": job, "slurm.node": env.get("SLURMD_NODENAME", "")}


def data_params(root: Path) -> list[str]:
    """The params ingest and preprocess read, from the project's ``dvc.yaml``."""
    dvc_file = root / "dvc.yaml"
    if not dvc_file.is_file():
        return list(DATA_SECTIONS)
    stages = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {})
    keys = [k for name in ("ingest", "preprocess") for k in stages.get(name, {}).get("params", [])]
    return [k for k in keys if isinstance(k, str)] or list(DATA_SECTIONS)


def data_key(cfg: DictConfig, keys: list[str]) -> str:
    """A hash of the values of ``keys``: trials with the same key share prepared data."""
    values = {
        k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
        for k in keys
        for v in [OmegaConf.select(cfg, k)]
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepared_data(cfg: DictConfig, root: Path) -> Path:
    """``data/processed`` for this trial's data settings: built once, then shared."""
    from taxonomist.stages import ingest, preprocess  # the data stack: only when a trial runs

    folder = root / DATA_CACHE / data_key(cfg, data_params(root))
    processed = folder / "processed"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.with_suffix(".lock")):  # one process prepares, the others wait
        if not (processed / "report.json").is_file():
            log.info("preparing the data once for every trial that shares it: %s", folder)
            ingest.run(cfg, out_dir=folder / "raw")
            preprocess.run(cfg, raw_dir=folder / "raw", out_dir=processed)  # health report: beside it
    return processed


def trial_overrides(overrides: list[str], swept: list[str]) -> dict[str, str]:
    """This trial's values of the swept keys, from its Hydra overrides."""
    values = dict(o.split("=", 1) for o in overrides if "=" in o)
    return {k: values[k] for k in swept if k in values}


def short(value: str) -> str:
    """A swept value for a run name: floats to 4 significant digits (the params keep them all)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "." not in value else f"{number:.4g}"


def trial_key(overrides: list[str]) -> str:
    """Identifies a trial within its sweep: a hash of its overrides (sweep.* and hydra.* left out)."""
    kept = sorted(o for o in overrides if not o.lstrip("+~").startswith(("sweep.", "hydra.")))
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


def objective_value(best_epoch_metrics: dict[str, float], objective: str) -> float:
    """The objective at the epoch whose checkpoint was kept (the model evaluate measured)."""
    if objective not in best_epoch_metrics:
        raise ConfigError(f"sweep.objective {objective!r} was not logged (logged: {sorted(best_epoch_metrics)})")
    return float(best_epoch_metrics[objective])


def limit_threads(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """Trials run in parallel by the joblib launcher share the cores instead of each taking all."""
    if "joblib" not in str(OmegaConf.select(hydra_cfg, "launcher._target_", default="")).lower():
        return
    if int(cfg.fit.num_threads) > 0:
        return
    n_jobs = int(OmegaConf.select(hydra_cfg, "launcher.n_jobs", default=-1) or -1)
    cores = os.cpu_count() or 1
    jobs = cores if n_jobs < 1 else min(n_jobs, cores)
    cfg.fit.num_threads = max(1, cores // jobs)


def run_trial(cfg: DictConfig) -> float:
    """Hydra task function of ``taxonomist sweep``: train and evaluate one trial, return its objective."""
    from taxonomist.stages import evaluate, train  # torch and Lightning: only when a trial runs
    from taxonomist.tasks import task_of

    hydra_cfg = HydraConfig.get()
    root = Path(hydra_cfg.runtime.cwd)
    sweep_dir = Path(hydra_cfg.sweep.dir)
    sweep_dir = sweep_dir if sweep_dir.is_absolute() else root / sweep_dir
    if not (sweep_dir / STATE_FILE).is_file():
        raise RegistryError(
            f"{sweep_dir / STATE_FILE} is missing: the sweep's parent run could not be set up (see the warning "
            "from SweepTracker.on_multirun_start above)"
        )
    state = read_json(sweep_dir / STATE_FILE)
    overrides = list(hydra_cfg.overrides.task)
    pcfg = pipeline_config(cfg, root)
    objective = task_of(pcfg).val_metric(str(pcfg.sweep.objective))
    key = trial_key(overrides)

    done = tracker.finished_trial(pcfg, state["parent_run_id"], key)
    if done is not None:
        log.info("trial %s already finished in run %s: %s = %.4f", key, done[0], objective, done[1])
        return done[1]

    limit_threads(pcfg, hydra_cfg)
    processed = prepared_data(pcfg, root)
    values = trial_overrides(overrides, state["swept"])
    folder = Path.cwd().name  # hydra.sweep.subdir: the job number (plus earlier trials of a resumed study)
    number = int(folder) if folder.isdigit() else int(hydra_cfg.job.num)
    label = ", ".join(f"{k}={short(v)}" for k, v in values.items()) or "defaults"
    spec = runs.RunSpec(
        name=f"{state['name']}-{number:03d}: {label}",
        parent_run_id=state["parent_run_id"],
        tags={
            "sweep": state["name"],
            "sweep.trial": str(number),
            "sweep.trial_key": key,
            "sweep.overrides": json.dumps(values),
            "sweep.objective_metric": objective,
            **scheduler_tags(),
        },
        launched_by=f"`taxonomist sweep` (sweep `{state['name']}`, trial {number}: {label})",
    )
    summary = train.run(pcfg, processed_dir=processed, models_dir=MODELS_DIR, spec=spec)
    evaluate.run(pcfg, processed_dir=processed, models_dir=MODELS_DIR)
    value = objective_value(summary["best_epoch_metrics"], objective)
    with runs.resume_run(pcfg, summary["run_id"]):
        runs.log_metrics({OBJECTIVE_METRIC: value})
    log.info("trial %d (%s): %s = %.4f", number, label, objective, value)
    return value
