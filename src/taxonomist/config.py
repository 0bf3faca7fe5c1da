"""The pipeline config: compose ``conf/`` with Hydra, load and validate ``params.yaml``.

``conf/`` is the Hydra tree; ``params.yaml`` is its composed, resolved form that DVC stages
read. :func:`compose` builds the composition (optionally with overrides), :func:`write_params`
writes it, and :func:`load_params` reads ``params.yaml`` back and checks every key against the
schema below, so a typo in a key fails with the key's name instead of being ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from taxonomist.errors import ConfigError

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONFIG_NAME = "config"


@dataclass
class DataConfig:
    source: str = "builtin:fashion-mnist"
    format: str = "auto"  # auto | folder | manifest | archive | label_studio
    builtin_dir: str = "/usr/share/datasets/fashion-mnist"
    download: bool = True
    download_url: str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
    image_root: str | None = None  # where manifest / export image paths are resolved (default: beside the file)
    max_labels: int = 0  # multi-label: keep only the N most frequent labels (0 = all)


@dataclass
class ThresholdConfig:
    """How binary and multi-label decision thresholds are tuned on the validation split."""

    mode: str = "max_f1"  # max_f1 | min_precision | min_recall | fixed
    value: float = 0.5  # the target precision/recall, or the fixed threshold


@dataclass
class TaskConfig:
    name: str = "multiclass"  # binary | multiclass | multilabel | hierarchical
    positive_label: str | None = None  # binary: the positive class (default: the last in sorted order)
    class_weights: str = "none"  # none | balanced: weight the loss by inverse class frequency
    balanced_sampling: bool = False  # multiclass/binary: sample training images class-balanced
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    allow_empty: bool = False  # multilabel: accept images with no label at all
    taxonomy: str | None = None  # hierarchical: a YAML tree of labels (default: from the label paths)
    path_separator: str = " > "  # hierarchical: how predicted paths are shown


@dataclass
class ModelConfig:
    name: str = "resnet18"
    pretrained: bool = False
    checkpoint: str | None = None
    drop_rate: float = 0.0
    channels_last: bool = True
    compile: bool = False  # torch.compile the backbone (pays a compile delay once per stage)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class AugmentConfig:
    train: list[Any] = field(default_factory=list)
    tta: str = "none"  # test-time augmentation in evaluate and the package: none | hflip


@dataclass
class PreprocessConfig:
    image_size: int = 28
    resize_mode: str = "squash"
    channels: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    min_images_per_class: int = 2
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])


@dataclass
class EmaConfig:
    """An exponential moving average of the weights, used for validation and the checkpoint."""

    enabled: bool = False
    decay: float = 0.999  # per optimizer step


@dataclass
class MixupConfig:
    """timm's mixup / cutmix of training batches (multiclass only; 0 alphas = off)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # chance a batch is mixed at all
    switch_prob: float = 0.5  # with both alphas set: chance of cutmix instead of mixup


@dataclass
class TrainConfig:
    batch_size: int = 128
    num_workers: int = 0
    label_smoothing: float = 0.0
    monitor: str = "auto"  # "auto": the task's primary validation metric
    early_stopping_patience: int = 5
    ema: EmaConfig = field(default_factory=EmaConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "auto"
    devices: Any = "auto"
    precision: str = "32-true"
    deterministic: Any = "warn"
    gradient_clip_val: float | None = None
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    log_every_n_steps: int = 50
    num_threads: int = 0


@dataclass
class EvaluateConfig:
    batch_size: int = 512
    misclassified_examples: int = 36


@dataclass
class PackageConfig:
    model_name: str = "taxonomist"
    onnx_opset: int = 18
    verify_atol: float = 1e-4
    verify_rtol: float = 1e-4  # of the largest |logit|: float32 differences grow with the logits' scale
    champion_metric: str = "auto"  # "auto": the task's primary test metric


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlartifacts"
    experiment: str = "taxonomist"


@dataclass
class SweepConfig:
    """``taxonomist sweep``: the sweep's name, the metric trials are ranked by, the Optuna storage."""

    name: str | None = None
    objective: str = "auto"  # "auto": the task's primary validation metric
    storage: str | None = None


@dataclass
class PipelineConfig:
    """Schema of ``params.yaml``; optimizer and scheduler are free-form ``_target_`` blocks."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 42
    task: TaskConfig = field(default_factory=TaskConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


SUPPORTED_TASKS = ("binary", "multiclass", "multilabel", "hierarchical")
THRESHOLD_MODES = ("max_f1", "min_precision", "min_recall", "fixed")
RESIZE_MODES = ("squash", "center_crop", "pad")
TTA_MODES = ("none", "hflip")  # taxonomist.models.tta (not imported here: it needs torch)


def validate(raw: DictConfig | dict[str, Any], origin: str = PARAMS_FILE) -> DictConfig:
    """Merge ``raw`` onto the schema; raise :class:`ConfigError` naming any bad key or value."""
    schema = OmegaConf.structured(PipelineConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = f"{err.full_key}" if getattr(err, "full_key", None) else str(err)
        raise ConfigError(
            f"{origin}: unknown config key '{key}'. Check the spelling against conf/ "
            f"(run `taxonomist compose` to regenerate {PARAMS_FILE})."
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: invalid value for '{err.full_key}': {err.msg}") from None
    _check_values(cfg, origin)
    return cfg  # type: ignore[return-value]


def _check_values(cfg: DictConfig, origin: str) -> None:
    task = cfg.task
    if task.name not in SUPPORTED_TASKS:
        raise ConfigError(f"{origin}: task.name={task.name!r} is not supported; use one of {SUPPORTED_TASKS}")
    if task.threshold.mode not in THRESHOLD_MODES:
        raise ConfigError(f"{origin}: task.threshold.mode={task.threshold.mode!r}; use one of {THRESHOLD_MODES}")
    low = 0.0 if task.threshold.mode == "fixed" else 1e-9
    if not low <= float(task.threshold.value) < 1.0:
        raise ConfigError(f"{origin}: task.threshold.value must be in [{low:g}, 1), got {task.threshold.value}")
    if task.balanced_sampling and task.name == "multilabel":
        raise ConfigError(f"{origin}: task.balanced_sampling needs a single-label task, not multilabel")
    if task.name == "hierarchical" and task.threshold.mode != "fixed":
        raise ConfigError(
            f"{origin}: task hierarchical takes task.threshold.mode=fixed (value = the probability a node "
            "needs for the predicted path to go down to it)"
        )
    if task.class_weights not in ("none", "balanced"):
        raise ConfigError(f"{origin}: task.class_weights={task.class_weights!r}; use none or balanced")
    pre = cfg.preprocess
    if pre.resize_mode not in RESIZE_MODES:
        raise ConfigError(f"{origin}: preprocess.resize_mode={pre.resize_mode!r}; use one of {RESIZE_MODES}")
    if pre.channels not in (1, 3):
        raise ConfigError(f"{origin}: preprocess.channels={pre.channels}; use 1 (grayscale) or 3 (RGB)")
    if len(pre.mean) != pre.channels or len(pre.std) != pre.channels:
        raise ConfigError(
            f"{origin}: preprocess.mean and preprocess.std need {pre.channels} value(s) "
            f"(one per channel), got {list(pre.mean)} and {list(pre.std)}"
        )
    if not 0.0 < pre.val_fraction < 1.0:
        raise ConfigError(f"{origin}: preprocess.val_fraction must be in (0, 1), got {pre.val_fraction}")
    if pre.image_size < 8:
        raise ConfigError(f"{origin}: preprocess.image_size must be >= 8, got {pre.image_size}")
    _check_training(cfg, origin)
    if cfg.augment.tta not in TTA_MODES:
        raise ConfigError(f"{origin}: augment.tta={cfg.augment.tta!r}; use one of {TTA_MODES}")
    if "_target_" not in cfg.optimizer:
        raise ConfigError(f"{origin}: optimizer needs a _target_ (e.g. torch.optim.AdamW)")


def _check_training(cfg: DictConfig, origin: str) -> None:
    ema, mix = cfg.train.ema, cfg.train.mixup
    if not 0.0 < float(ema.decay) < 1.0:
        raise ConfigError(f"{origin}: train.ema.decay must be in (0, 1), got {ema.decay}")
    if min(float(mix.mixup_alpha), float(mix.cutmix_alpha)) < 0:
        raise ConfigError(f"{origin}: train.mixup alphas must be >= 0 (0 = off)")
    for key in ("prob", "switch_prob"):
        if not 0.0 <= float(mix[key]) <= 1.0:
            raise ConfigError(f"{origin}: train.mixup.{key} must be in [0, 1], got {mix[key]}")
    if (mix.mixup_alpha or mix.cutmix_alpha) and cfg.task.name != "multiclass":
        raise ConfigError(
            f"{origin}: train.mixup needs task.name=multiclass (mixed images get mixed class targets), "
            f"not {cfg.task.name}; set train.mixup.mixup_alpha=0 and train.mixup.cutmix_alpha=0"
        )


def load_params(path: str | Path = PARAMS_FILE) -> DictConfig:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path} not found. Run stages from the project root, or create it with `taxonomist compose`."
        )
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    return validate(raw, origin=str(path))


def compose(overrides: list[str] | None = None, conf_dir: str | Path = CONF_DIR) -> DictConfig:
    """Compose ``conf/`` with Hydra overrides into a resolved, validated config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"{conf_dir}/{CONFIG_NAME}.yaml not found")
    try:
        with initialize_config_dir(config_dir=str(conf_dir)):
            cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides or []))
    except HydraException as err:  # an unknown key or group option, a malformed override
        message = str(err).split("Config search path")[0] + (f" ({err.__cause__})" if err.__cause__ else "")
        raise ConfigError(re.sub(r"\s+", " ", message).strip()) from None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return validate(resolved, origin=f"{conf_dir}")


def to_yaml(cfg: DictConfig) -> str:
    """The YAML text of a config as ``params.yaml`` holds it."""
    return yaml.safe_dump(OmegaConf.to_container(cfg, resolve=True), sort_keys=False)


def write_params(cfg: DictConfig, path: str | Path = PARAMS_FILE) -> Path:
    """Write ``cfg`` to ``params.yaml`` atomically."""
    from taxonomist.files import atomic_write_text

    return atomic_write_text(Path(path), to_yaml(cfg))


def flatten(cfg: DictConfig | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config to ``{"a.b.c": value}``; lists become compact strings."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}
    for key, value in container.items():  # type: ignore[union-attr]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, list):
            out[name] = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        else:
            out[name] = value
    return out
