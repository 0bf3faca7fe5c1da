"""Check a whole sweep before any trial trains.

Every value of every swept key (command-line sweeps such as ``optimizer.lr=1e-3,3e-3`` and the
Optuna search space in ``hydra.sweeper.params``; both ends of an interval) is composed with the
fixed overrides and checked: the config schema, the model name, the optimizer and scheduler
targets, the augmentations, and the objective. The first failure raises :class:`ConfigError`
naming the override, so a typo in the tenth value fails in seconds, not after nine trials.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from taxonomist.config import CONFIG_NAME, validate
from taxonomist.errors import ConfigError


def swept_values(override: Any) -> Iterator[str]:
    """The values a sweep override can take, as override strings (interval: both ends)."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        yield str(value.start)
        yield str(value.end)
        return
    yield from override.sweep_string_iterator()


def check_config(cfg: DictConfig, hydra_node: DictConfig | None = None) -> DictConfig:
    """Validate one composed config and build what training would build first; return it."""
    import torch
    from hydra.utils import instantiate

    from taxonomist.data.auto import fill_size
    from taxonomist.data.transforms import build_augment
    from taxonomist.models.backbone import check_model_name
    from taxonomist.models.module import OPTIMIZER_TARGETS, SCHEDULER_TARGETS
    from taxonomist.tasks import task_of

    raw: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    raw.pop("hparams_search", None)
    pcfg = validate(raw, origin="sweep")
    models = [pcfg.model.auto.transfer, pcfg.model.auto.scratch] if pcfg.model.name == "auto" else [pcfg.model]
    for model in models:  # model=auto: both candidates must exist
        check_model_name(str(model["name"]))
    opt = OmegaConf.to_container(pcfg.optimizer, resolve=True)
    try:
        instantiate(opt, _execution_whitelist_=list(OPTIMIZER_TARGETS))(params=[torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:
        raise ValueError(f"optimizer ({opt.get('_target_')}): {err}") from None  # type: ignore[union-attr]
    sched = dict(OmegaConf.to_container(pcfg.scheduler, resolve=True))  # type: ignore[arg-type]
    sched.pop("interval", None)
    if sched.get("_target_"):  # resolves the class through the whitelist; its steps come from the trainer
        try:
            instantiate({**sched, "_partial_": True}, _execution_whitelist_=list(SCHEDULER_TARGETS))
        except Exception as err:
            raise ValueError(f"scheduler ({sched['_target_']}): {err}") from None
    # image_size: auto is chosen by preprocess; any size checks the augmentation's own arguments.
    size = 64 if pcfg.preprocess.image_size == "auto" else int(pcfg.preprocess.image_size)
    build_augment(fill_size(OmegaConf.to_container(pcfg.augment.train, resolve=True), size))
    objective = task_of(pcfg).val_metric(str(pcfg.sweep.objective))
    if not objective.startswith("val/"):
        raise ValueError(f"sweep.objective: {objective!r} is not a validation metric (val/...)")
    direction = OmegaConf.select(hydra_node, "sweeper.direction") if hydra_node is not None else None
    if direction == "maximize" and objective.endswith("loss"):
        raise ValueError(f"sweep.objective {objective} is a loss but hydra.sweeper.direction is maximize")
    return pcfg


def check_sweep(overrides: list[str], conf_dir: str | Path = "conf", config_name: str = CONFIG_NAME) -> DictConfig:
    """Compose and check every swept value; return the composed config of the fixed overrides
    (with its ``hydra`` node). Raises :class:`ConfigError` naming the failing override."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as err:
        raise ConfigError(_one_line(str(err))) from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]

    def checked(extra: list[str], what: str) -> DictConfig:
        try:
            cfg = compose(config_name=config_name, overrides=fixed + extra, return_hydra_config=True)
            hydra_node = cfg.hydra
            with_hydra = OmegaConf.to_container(cfg, resolve=False)
            with_hydra.pop("hydra")  # type: ignore[union-attr]
            check_config(OmegaConf.create(with_hydra), hydra_node)
        except (HydraException, ValueError, TypeError) as err:
            message = str(err).split("Config search path")[0]
            if err.__cause__ and str(err.__cause__) not in message:
                message += f" ({err.__cause__})"
            raise ConfigError(f"{what}: {_one_line(message)}") from None
        return cfg

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / f"{config_name}.yaml").is_file():
        raise ConfigError(f"{conf_dir}/{config_name}.yaml not found: run taxonomist sweep from the project root")
    with initialize_config_dir(config_dir=str(conf_dir)):
        base = checked([], "overrides " + " ".join(fixed) if fixed else "the config")
        space = OmegaConf.select(base, "hydra.sweeper.params") or {}
        try:
            searched = parser.parse_overrides([f"{k}={v}" for k, v in space.items()])
        except HydraException as err:
            raise ConfigError(f"hydra.sweeper.params: {_one_line(str(err))}") from None
        for override in sweeps + searched:
            key = override.get_key_element()
            source = "search space" if override in searched else "sweep"
            for value in swept_values(override):
                checked([f"{key}={value}"], f"{source} value '{key}={value}'")
    return base


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
