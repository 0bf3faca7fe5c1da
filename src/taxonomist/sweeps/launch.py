"""``taxonomist sweep``: the Hydra entry point (``@hydra.main`` over ``conf/``, always multirun).

Examples::

    taxonomist sweep model.name=resnet10_narrow,resnet18 optimizer.lr=1e-3,3e-3   # a 2x2 grid
    taxonomist sweep hparams_search=optuna hydra.sweeper.n_trials=10              # Optuna (TPE)
    taxonomist sweep hparams_search=optuna hydra/launcher=joblib hydra.launcher.n_jobs=2
    taxonomist sweep hparams_search=optuna hydra/launcher=slurm                   # trials as SLURM jobs

Before Hydra starts, every swept value is checked (:mod:`~taxonomist.sweeps.preflight`), the
sweep gets a stable default name (so the same command resumes it) and the Optuna storage
defaults to ``optuna.db`` beside the MLflow store.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from taxonomist.config import CONF_DIR, CONFIG_NAME
from taxonomist.sweeps.preflight import check_sweep
from taxonomist.sweeps.slurm import check_launcher
from taxonomist.sweeps.state import is_optuna, pipeline_config
from taxonomist.sweeps.trial import run_trial
from taxonomist.tracking.runs import tracking_uri

# Hydra's command-line flags that take a value, and those that only print (no sweep runs).
VALUE_FLAGS = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c", "--package", "-p"}
PRINT_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc"}


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags with their values, overrides); ``-m``/``--multirun`` are dropped (always on)."""
    flags: list[str] = []
    overrides: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in ("-m", "--multirun"):
            continue
        if arg.startswith("-"):
            flags.append(arg)
            if arg in VALUE_FLAGS:
                flags.append(next(it, ""))
        else:
            overrides.append(arg)
    return flags, overrides


def default_name(overrides: list[str]) -> str:
    """``<search>-<hash>``: the same overrides give the same name (and so resume the same sweep).
    ``hydra.*`` overrides (launcher, trial count) do not change it."""
    kept = sorted(o for o in overrides if not o.startswith(("hydra.", "hydra/", "sweep.")))
    search = next((o.split("=", 1)[1] for o in kept if o.startswith("hparams_search=")), "grid")
    return f"{search}-{hashlib.sha256(chr(10).join(kept).encode()).hexdigest()[:8]}"


def optuna_storage(cfg, root: Path) -> str:
    """``sqlite:///.../optuna.db`` in the folder of an SQLite MLflow store, else in the project root."""
    uri = tracking_uri(pipeline_config(cfg, root))
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else root
    return f"sqlite:///{folder / 'optuna.db'}"


def resume_optuna(base, default_storage: str) -> list[str]:
    """Overrides that resume this sweep's Optuna study, if it exists: ``hydra.sweeper.n_trials``
    lowered to the trials still missing, and trial folders numbered after the study's trials.
    Trials left running by an interrupted run are marked failed (their processes are gone)."""
    import optuna  # with SQLAlchemy: only when an Optuna sweep is resumed

    if not is_optuna(base):
        return []
    storage = OmegaConf.select(base, "hydra.sweeper.storage") or default_storage
    name = OmegaConf.select(base, "hydra.sweeper.study_name")
    if not name:
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=str(name), storage=str(storage))
    except KeyError:  # a new study
        return []
    states = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, state=states.FAIL)
    finished = len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))
    total = int(base.hydra.sweeper.n_trials)
    missing = max(0, total - finished)
    print(f"resuming Optuna study {name!r}: {finished} of {total} trials finished, {missing} to run")
    offset = len(study.trials)
    overrides = [
        f"hydra.sweeper.n_trials={missing}",
        f"hydra.sweep.subdir='${{taxonomist_add:${{hydra.job.num}},{offset}}}'",
    ]
    seed = OmegaConf.select(base, "hydra.sweeper.sampler.seed")
    if seed is not None:  # a sampler seeded as before would propose the study's first trials again
        overrides.append(f"hydra.sweeper.sampler.seed={int(seed) + offset}")
    return overrides


def main(args: list[str]) -> int:
    """Run ``taxonomist sweep [hydra flags] [overrides]``; return the exit code."""
    # Hydra instantiates the sweep callback named in conf/config.yaml without an execution whitelist.
    warnings.filterwarnings("ignore", message=r".*_target_='taxonomist\.sweeps\.", category=UserWarning)
    flags, overrides = split_args(args)
    config_name = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f in ("--config-name", "-cn")), CONFIG_NAME)
    root = Path.cwd()
    extra: list[str] = []
    if not any(f in PRINT_FLAGS for f in flags):  # a real sweep
        if not any(o.startswith("sweep.name=") for o in overrides):
            extra.append(f"sweep.name={default_name(overrides)}")
        base = check_sweep(overrides + extra, CONF_DIR, config_name)
        check_launcher(base)  # hydra/launcher=slurm: the cluster answers and has the partition
        storage = base.sweep.storage or optuna_storage(base, root)
        if base.sweep.storage is None:
            extra.append(f"sweep.storage='{storage}'")
        extra += resume_optuna(base, storage)
    printing = any(f in PRINT_FLAGS for f in flags)  # Hydra refuses -m with these
    sys.argv = ["taxonomist sweep", *([] if printing else ["-m"]), *flags, *overrides, *extra]
    hydra.main(config_path=str(root / CONF_DIR), config_name=config_name)(run_trial)()
    return 0
