"""Hydra sweeps: ``taxonomist sweep`` runs a grid or an Optuna search, one MLflow child run a trial.

- :mod:`~taxonomist.sweeps.launch`: the ``@hydra.main`` entry point and the sweep's default name.
- :mod:`~taxonomist.sweeps.preflight`: every swept value is composed and checked before training.
- :mod:`~taxonomist.sweeps.trial`: one trial: cached data, train, evaluate; returns the objective.
- :mod:`~taxonomist.sweeps.tracker`: the Hydra callback that owns the sweep's parent run.
- :mod:`~taxonomist.sweeps.summary`: the table, plot and best trial at the end of a sweep.
- :mod:`~taxonomist.sweeps.state`: what they share (no imports among them go the other way).

The files a sweep shares between its processes live in ``sweeps/<name>/`` (see
:data:`~taxonomist.sweeps.state.STATE_FILE`).
"""

from __future__ import annotations

from omegaconf import OmegaConf

# ``hydra.sweep.subdir`` of a resumed Optuna sweep (set by ``taxonomist sweep``): the job number plus the
# trials already in the study, so a trial's folder is its Optuna trial number, never an earlier trial's.
OmegaConf.register_resolver("taxonomist_add", lambda a, b: int(a) + int(b), replace=True)
