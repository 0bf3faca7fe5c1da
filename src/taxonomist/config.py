"""The pipeline config: compose ``conf/`` with Hydra, load and validate ``params.yaml``.

``conf/`` is the Hydra tree; ``params.yaml`` is its composed, resolved form that DVC stages
read. :func:`compose` builds the composition (optionally with overrides), :func:`write_params`
writes it, and :func:`load_params` reads ``params.yaml`` back and checks every key against the
schema below, so a typo in a key fails with the key's name instead of being ignored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from taxonomist.errors import ConfigError

PARAMS_FILE = "params.yaml"
CONF_DIR = "conf"
CONFIG_NAME = "config"


# The schema: names and types only. Every value, default included, lives in conf/ (and so in
# params.yaml); a key missing there fails with its name instead of falling back to a value here.


@dataclass
class DataConfig:
    source: str = MISSING
    format: str = MISSING  # auto | folder | manifest | archive | label_studio
    builtin_dir: str = MISSING
    download: bool = MISSING
    download_url: str = MISSING
    image_root: Optional[str] = MISSING  # noqa: UP045  (OmegaConf needs typing.Optional)
    max_labels: int = MISSING
    group_by: Optional[str] = MISSING  # noqa: UP045  (a manifest column, or a regex on the source path)


@dataclass
class ThresholdConfig:
    mode: str = MISSING
    value: float = MISSING


@dataclass
class TaskConfig:
    """Every task section has all these keys; a task takes its own (``Task.keys``) and the
    others stay at their "unset" value (see :data:`taxonomist.tasks.base.UNSET`)."""

    name: str = MISSING
    threshold: ThresholdConfig = MISSING
    positive_label: Optional[str] = MISSING  # noqa: UP045
    class_weights: str = MISSING
    balanced_sampling: bool = MISSING
    allow_empty: bool = MISSING
    taxonomy: Optional[str] = MISSING  # noqa: UP045
    path_separator: Optional[str] = MISSING  # noqa: UP045
    order: Optional[list[str]] = MISSING  # noqa: UP045
    attributes: Optional[dict[str, str]] = MISSING  # noqa: UP045


@dataclass
class AutoModelConfig:
    """``model=auto``: the candidates (full model blocks) and the rules between them."""

    transfer: dict[str, Any] = MISSING
    scratch: dict[str, Any] = MISSING
    small: dict[str, Any] | None = None
    transfer_below_images: int = MISSING
    small_below_px: int | None = None


@dataclass
class ModelConfig:
    """A model; with ``name: auto`` every other key is null and ``auto`` holds the candidates."""

    name: str = MISSING
    pretrained: Optional[bool] = MISSING  # noqa: UP045
    checkpoint: Optional[str] = MISSING  # noqa: UP045
    drop_rate: Optional[float] = MISSING  # noqa: UP045
    channels_last: Optional[bool] = MISSING  # noqa: UP045
    compile: Optional[bool] = MISSING  # noqa: UP045
    kwargs: Optional[dict[str, Any]] = MISSING  # noqa: UP045
    min_image_size: Optional[int] = MISSING  # noqa: UP045  (image_size: auto stays within these)
    max_image_size: Optional[int] = MISSING  # noqa: UP045
    auto: Optional[AutoModelConfig] = MISSING  # noqa: UP045
    features: Optional[dict[str, Any]] = None  # noqa: UP045  (model=embeddings: the extractor)
    classifier: Optional[dict[str, Any]] = None  # noqa: UP045  (model=embeddings: the scikit-learn classifier)


@dataclass
class AugmentConfig:
    train: list[Any] = MISSING
    tta: str = MISSING


@dataclass
class PreprocessConfig:
    """``auto`` (image_size, resize_mode, channels, mean, std) is resolved from the training
    split by the preprocess stage (:mod:`taxonomist.data.auto`)."""

    image_size: Any = MISSING  # int | auto
    resize_mode: str = MISSING
    channels: Any = MISSING  # 1 | 3 | auto
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    min_images_per_class: int = MISSING
    mean: Any = MISSING  # list[float] | auto
    std: Any = MISSING  # list[float] | auto
    near_duplicates: str = MISSING  # warn | drop | fail (near-duplicates across splits)
    near_duplicate_distance: int = MISSING  # perceptual-hash bits that may differ
    workers: Any = "auto"  # int | auto: decode processes (not a DVC param: the output does not depend on it)


@dataclass
class FinetuneConfig:
    """Fine-tuning schedule of a model that starts from pretrained weights."""

    head_warmup_epochs: int = MISSING
    backbone_lr_scale: float = MISSING


@dataclass
class MixupConfig:
    mixup_alpha: float = MISSING
    cutmix_alpha: float = MISSING
    prob: float = MISSING
    switch_prob: float = MISSING


@dataclass
class SelfTrainingConfig:
    """Pseudo-labels from ``fit.unlabelled`` (model=embeddings): :mod:`taxonomist.models.embeddings.semi`."""

    threshold: float = 0.95
    max_iter: int = 5


@dataclass
class FitConfig:
    """How the model is fitted (was ``train``); the Lightning Trainer's own arguments are ``trainer``."""

    batch_size: Any = MISSING  # int | auto (taxonomist.data.auto.choose_batch_size)
    num_workers: int = MISSING
    num_threads: int = MISSING
    loading: str = "auto"  # auto | memory | blocks (how the training split is read)
    label_smoothing: float = MISSING
    monitor: str = MISSING
    mixup: MixupConfig = MISSING
    finetune: FinetuneConfig = MISSING
    unlabelled: Optional[list[str]] = None  # noqa: UP045  (model=embeddings: a pool for self-training)
    self_training: SelfTrainingConfig = field(default_factory=lambda: SelfTrainingConfig())


@dataclass
class TrainerConfig:
    """The Lightning Trainer's arguments (built with ``hydra.utils.instantiate``): the ones
    conf/trainer sets, typed, so ``trainer.max_epochs=many`` fails before anything runs."""

    _target_: str = MISSING
    max_epochs: int = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING  # int | auto | list of GPU ids: per machine (taxonomist.models.distributed)
    strategy: Any = MISSING  # auto | ddp | a _target_ block (e.g. lightning.pytorch.strategies.DDPStrategy)
    num_nodes: int = MISSING
    sync_batchnorm: bool = MISSING
    precision: str = MISSING
    deterministic: Any = MISSING
    gradient_clip_val: Optional[float] = MISSING  # noqa: UP045
    accumulate_grad_batches: int = MISSING
    limit_train_batches: float = MISSING
    limit_val_batches: float = MISSING
    check_val_every_n_epoch: int = MISSING
    log_every_n_steps: int = MISSING
    enable_model_summary: bool = MISSING
    logger: bool = MISSING


@dataclass
class EvaluateConfig:
    batch_size: int = MISSING
    misclassified_examples: int = MISSING
    explain_examples: int = MISSING
    calibration: str = MISSING  # auto | none
    coverage: Optional[float] = MISSING  # noqa: UP045  (null: no prediction sets)


@dataclass
class GateConfig:
    """When ``@champion`` moves: the candidate beats the champion on the same test images."""

    alpha: float = MISSING
    bootstrap: int = MISSING
    class_tolerance: float = MISSING


@dataclass
class Int8Config:
    """The INT8 ONNX copy and when it ships (:class:`taxonomist.export.quantize.Int8Settings`)."""

    enabled: bool = MISSING
    method: str = MISSING  # static | dynamic
    calibration_images: int = MISSING
    tolerance: float = MISSING
    class_tolerance: float = MISSING
    latency_runs: int = MISSING
    threads: int = MISSING


@dataclass
class ServingConfig:
    """Limits the packaged model enforces on every request (:class:`taxonomist.export.serving.Limits`)."""

    max_pixels: int = 25_000_000
    max_images: int = 256
    max_request_mb: float = 64.0


@dataclass
class PackageConfig:
    model_name: str = MISSING  # auto = taxonomist-<data set>-<task>
    onnx_opset: int = MISSING
    verify_atol: float = MISSING
    verify_rtol: float = MISSING
    champion_metric: str = MISSING
    gate: GateConfig = MISSING
    int8: Int8Config = MISSING
    serving: ServingConfig = field(default_factory=ServingConfig)


@dataclass
class TrackingConfig:
    uri: str = MISSING
    artifact_location: str = MISSING
    experiment: str = MISSING


@dataclass
class CvConfig:
    """``taxonomist cv``: k-fold cross-validation over the training pool (:mod:`taxonomist.crossval`)."""

    folds: int = MISSING
    seed: int = MISSING
    stratified: bool = MISSING
    groups: Any = MISSING  # auto | true | false
    work_dir: str = MISSING
    keep_work: bool = MISSING
    stage: bool = MISSING  # ready pipelines: `taxonomist pipelines` adds a `cv` DVC stage


@dataclass
class LabelErrorsConfig:
    """``taxonomist label-errors``: cleanlab on the out-of-fold probabilities of ``taxonomist cv``."""

    filter_by: str = MISSING
    rank_by: str = MISSING
    examples: int = MISSING
    stage: bool = MISSING  # ready pipelines: a `label_errors` DVC stage after `cv` (needs cv.stage)


@dataclass
class SweepConfig:
    name: Optional[str] = MISSING  # noqa: UP045
    objective: str = MISSING
    storage: Optional[str] = MISSING  # noqa: UP045


@dataclass
class ClusterConfig:
    """``taxonomist cluster`` (:mod:`taxonomist.explore.cluster`)."""

    features: str = MISSING  # a conf/model/features/ name, or "model" (the trained model's features)
    method: str = MISSING  # kmeans | gmm
    k: Any = MISSING  # int | auto
    k_range: list[int] = MISSING
    pca: Optional[int] = MISSING  # noqa: UP045  (principal components before clustering; null = none)
    covariance: str = MISSING  # gmm covariance_type
    image_size: int = MISSING
    resize_mode: str = MISSING
    examples_per_cluster: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING


@dataclass
class LabelStudioConfig:
    """How ``taxonomist suggest`` writes Label Studio tasks."""

    from_name: str = MISSING
    to_name: str = MISSING
    document_root: Optional[str] = MISSING  # noqa: UP045  (null: the pool's common folder)


@dataclass
class SuggestConfig:
    """``taxonomist suggest`` (:mod:`taxonomist.explore.suggest`)."""

    budget: int = MISSING
    uncertainty: str = MISSING  # entropy | margin
    diversity: str = MISSING  # none | kmeans | kcenter
    candidates_factor: float = MISSING
    kmeans_pick: str = MISSING  # centre | uncertain
    batch_size: int = MISSING
    label_studio: LabelStudioConfig = MISSING


@dataclass
class PipelineConfig:
    """Schema of ``params.yaml``. ``optimizer``, ``scheduler`` and ``callbacks`` are ``_target_``
    blocks built with ``hydra.utils.instantiate``: their keys are the arguments of the class
    they name, checked when it is built. ``trainer`` is one too, with its keys typed here."""

    seed: int = MISSING
    data: DataConfig = MISSING
    task: TaskConfig = MISSING
    model: ModelConfig = MISSING
    augment: AugmentConfig = MISSING
    optimizer: dict[str, Any] = MISSING
    scheduler: dict[str, Any] = MISSING
    trainer: TrainerConfig = MISSING
    callbacks: dict[str, Any] = MISSING
    preprocess: PreprocessConfig = MISSING
    fit: FitConfig = MISSING
    evaluate: EvaluateConfig = MISSING
    package: PackageConfig = MISSING
    tracking: TrackingConfig = MISSING
    sweep: SweepConfig = MISSING
    cv: CvConfig = MISSING
    label_errors: LabelErrorsConfig = MISSING
    cluster: ClusterConfig = MISSING
    suggest: SuggestConfig = MISSING


RESIZE_MODES = ("squash", "center_crop", "pad")
AUTO = "auto"  # a setting the preprocess stage resolves from the data (taxonomist.data.auto)
NEAR_DUPLICATE_ACTIONS = ("warn", "drop", "fail")
# Keys of a model block (with model.name=auto the chosen candidate's are used).
MODEL_KEYS = ("pretrained", "checkpoint", "drop_rate", "channels_last", "compile", "kwargs")
TTA_MODES = ("none", "hflip")  # taxonomist.models.tta (not imported here: it needs torch)
INT8_METHODS = ("static", "dynamic")  # package.int8.method (taxonomist.export.quantize)
# label_errors.filter_by and rank_by: cleanlab.filter.find_label_issues's (not imported here: it is slow to import)
LABEL_ERROR_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
LABEL_ERROR_RANKS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
CLUSTER_METHODS = ("kmeans", "gmm")  # cluster.method (taxonomist.explore.cluster)
GMM_COVARIANCES = ("full", "diag", "spherical", "tied")
UNCERTAINTIES = ("entropy", "margin")  # suggest.uncertainty (taxonomist.explore.suggest)
DIVERSITIES = ("none", "kmeans", "kcenter")  # suggest.diversity
KMEANS_PICKS = ("centre", "uncertain")  # suggest.kmeans_pick
# Sections renamed in this version: an old params.yaml names them, and the error says the new name.
RENAMED = {
    "train": "fit (train.early_stopping_patience -> callbacks.early_stopping.patience, train.ema -> callbacks.ema)",
    "trainer.num_threads": "fit.num_threads",
}


def validate(raw: DictConfig | dict[str, Any], origin: str = PARAMS_FILE) -> DictConfig:
    """Merge ``raw`` onto the schema; raise :class:`ConfigError` naming any unknown, missing or
    mistyped key, or a value the pipeline cannot use."""
    schema = OmegaConf.structured(PipelineConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = f"{err.full_key}" if getattr(err, "full_key", None) else str(err)
        renamed = next((new for old, new in RENAMED.items() if key == old or key.startswith(old + ".")), None)
        hint = f" It was renamed: {renamed}." if renamed else ""
        raise ConfigError(
            f"{origin}: unknown config key '{key}'.{hint} Check the spelling against conf/ "
            f"(run `taxonomist compose` to regenerate {PARAMS_FILE})."
        ) from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: invalid value for '{err.full_key}': {str(err.msg).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{origin}: missing config key(s) {', '.join(repr(k) for k in missing)}: every setting has its "
            f"value in conf/ (run `taxonomist compose` to regenerate {PARAMS_FILE})"
        )
    _check_values(cfg, origin)
    return cfg  # type: ignore[return-value]


def _check_values(cfg: DictConfig, origin: str) -> None:
    from taxonomist.tasks import get_task

    task = get_task(str(cfg.task.name))
    task.check_config(cfg.task, cfg, origin)
    _check_preprocess(cfg.preprocess, origin)
    _check_model(cfg.model, origin)
    pre = cfg.preprocess
    if not 0.0 < pre.val_fraction < 1.0:
        raise ConfigError(f"{origin}: preprocess.val_fraction must be in (0, 1), got {pre.val_fraction}")
    gate = cfg.package.gate
    if not 0.0 < float(gate.alpha) < 1.0:
        raise ConfigError(f"{origin}: package.gate.alpha must be in (0, 1), got {gate.alpha}")
    if int(gate.bootstrap) < 100:
        raise ConfigError(f"{origin}: package.gate.bootstrap must be >= 100 resamples, got {gate.bootstrap}")
    _check_int8(cfg.package.int8, origin)
    _check_cv(cfg, origin)
    _check_explore(cfg, origin)
    serving = cfg.package.serving
    if min(int(serving.max_pixels), int(serving.max_images)) < 1 or float(serving.max_request_mb) <= 0:
        raise ConfigError(
            f"{origin}: package.serving limits must be positive, got max_pixels={serving.max_pixels}, "
            f"max_images={serving.max_images}, max_request_mb={serving.max_request_mb}"
        )
    if float(cfg.fit.finetune.backbone_lr_scale) <= 0 or int(cfg.fit.finetune.head_warmup_epochs) < 0:
        raise ConfigError(
            f"{origin}: fit.finetune needs backbone_lr_scale > 0 and head_warmup_epochs >= 0, "
            f"got {cfg.fit.finetune.backbone_lr_scale} and {cfg.fit.finetune.head_warmup_epochs}"
        )
    _check_training(cfg, task.mixup, origin)
    if cfg.augment.tta not in TTA_MODES:
        raise ConfigError(f"{origin}: augment.tta={cfg.augment.tta!r}; use one of {TTA_MODES}")
    for section in ("optimizer", "trainer"):
        if "_target_" not in cfg[section]:
            example = "torch.optim.AdamW" if section == "optimizer" else "lightning.Trainer"
            raise ConfigError(f"{origin}: {section} needs a _target_ (e.g. {example})")
    for name, block in cfg.callbacks.items():
        if block is not None and "_target_" not in block:
            raise ConfigError(f"{origin}: callbacks.{name} needs a _target_ (or null to turn it off)")


def _check_int8(int8: DictConfig, origin: str) -> None:
    """``package.int8``: a known method, at least one calibration image and timed run,
    non-negative tolerances and thread count."""
    if int8.method not in INT8_METHODS:
        raise ConfigError(f"{origin}: package.int8.method={int8.method!r}; use one of {INT8_METHODS}")
    if int(int8.calibration_images) < 1 or int(int8.latency_runs) < 1:
        raise ConfigError(
            f"{origin}: package.int8.calibration_images and latency_runs must be >= 1, "
            f"got {int8.calibration_images} and {int8.latency_runs}"
        )
    for key in ("tolerance", "class_tolerance", "threads"):
        if float(int8[key]) < 0:
            raise ConfigError(f"{origin}: package.int8.{key} must be >= 0, got {int8[key]}")


def _check_cv(cfg: DictConfig, origin: str) -> None:
    """``cv`` and ``label_errors``: at least two folds, a known groups setting and cleanlab method."""
    if int(cfg.cv.folds) < 2:
        raise ConfigError(f"{origin}: cv.folds must be >= 2, got {cfg.cv.folds}")
    if cfg.cv.groups not in (AUTO, True, False):
        raise ConfigError(f"{origin}: cv.groups={cfg.cv.groups!r}; use auto, true or false")
    errors = cfg.label_errors
    if errors.stage and not cfg.cv.stage:
        raise ConfigError(f"{origin}: label_errors.stage=true reads the cv stage's outputs: set cv.stage=true too")
    if errors.filter_by not in LABEL_ERROR_FILTERS:
        raise ConfigError(f"{origin}: label_errors.filter_by={errors.filter_by!r}; use one of {LABEL_ERROR_FILTERS}")
    if errors.rank_by not in LABEL_ERROR_RANKS:
        raise ConfigError(f"{origin}: label_errors.rank_by={errors.rank_by!r}; use one of {LABEL_ERROR_RANKS}")
    if int(errors.examples) < 0:
        raise ConfigError(f"{origin}: label_errors.examples must be >= 0, got {errors.examples}")


def _check_explore(cfg: DictConfig, origin: str) -> None:
    """``cluster`` and ``suggest``: known methods, k an integer >= 2 or auto, sane ranges."""
    cl = cfg.cluster
    if cl.method not in CLUSTER_METHODS:
        raise ConfigError(f"{origin}: cluster.method={cl.method!r}; use one of {CLUSTER_METHODS}")
    if cl.covariance not in GMM_COVARIANCES:
        raise ConfigError(f"{origin}: cluster.covariance={cl.covariance!r}; use one of {GMM_COVARIANCES}")
    if cl.k != AUTO and (isinstance(cl.k, bool) or not isinstance(cl.k, int) or cl.k < 2):
        raise ConfigError(f"{origin}: cluster.k must be an integer >= 2 or auto, got {cl.k!r}")
    k_range = list(cl.k_range)
    if len(k_range) != 2 or not 2 <= int(k_range[0]) <= int(k_range[1]):
        raise ConfigError(
            f"{origin}: cluster.k_range is [smallest, largest] with 2 <= smallest <= largest, got {k_range}"
        )
    if cl.resize_mode not in RESIZE_MODES:
        raise ConfigError(f"{origin}: cluster.resize_mode={cl.resize_mode!r}; use one of {RESIZE_MODES}")
    if int(cl.image_size) < 8 or int(cl.examples_per_cluster) < 1 or int(cl.batch_size) < 1:
        raise ConfigError(f"{origin}: cluster.image_size >= 8, examples_per_cluster >= 1 and batch_size >= 1")
    if cl.pca is not None and int(cl.pca) < 1:
        raise ConfigError(f"{origin}: cluster.pca is a number of components >= 1, or null, got {cl.pca}")
    sg = cfg.suggest
    if sg.uncertainty not in UNCERTAINTIES:
        raise ConfigError(f"{origin}: suggest.uncertainty={sg.uncertainty!r}; use one of {UNCERTAINTIES}")
    if sg.diversity not in DIVERSITIES:
        raise ConfigError(f"{origin}: suggest.diversity={sg.diversity!r}; use one of {DIVERSITIES}")
    if sg.kmeans_pick not in KMEANS_PICKS:
        raise ConfigError(f"{origin}: suggest.kmeans_pick={sg.kmeans_pick!r}; use one of {KMEANS_PICKS}")
    if int(sg.budget) < 1 or float(sg.candidates_factor) < 1 or int(sg.batch_size) < 1:
        raise ConfigError(f"{origin}: suggest.budget >= 1, suggest.candidates_factor >= 1 and batch_size >= 1")


def _check_preprocess(pre: DictConfig, origin: str) -> None:
    if pre.resize_mode not in (*RESIZE_MODES, AUTO):
        raise ConfigError(f"{origin}: preprocess.resize_mode={pre.resize_mode!r}; use one of {(*RESIZE_MODES, AUTO)}")
    if pre.channels not in (1, 3, AUTO):
        raise ConfigError(f"{origin}: preprocess.channels={pre.channels!r}; use 1 (grayscale), 3 (RGB) or auto")
    if pre.image_size != AUTO and (not isinstance(pre.image_size, int) or pre.image_size < 8):
        raise ConfigError(f"{origin}: preprocess.image_size must be an integer >= 8 or auto, got {pre.image_size!r}")
    if (pre.mean == AUTO) != (pre.std == AUTO):
        raise ConfigError(f"{origin}: set preprocess.mean and preprocess.std together (both lists, or both auto)")
    if pre.mean != AUTO:
        values = [pre.mean, pre.std]
        if not all(isinstance(v, Sequence) and not isinstance(v, str) for v in values):
            raise ConfigError(f"{origin}: preprocess.mean and preprocess.std are per-channel lists of floats, or auto")
        if len(pre.mean) != len(pre.std) or (pre.channels != AUTO and len(pre.mean) != pre.channels):
            raise ConfigError(
                f"{origin}: preprocess.mean and preprocess.std need one value per channel "
                f"(preprocess.channels={pre.channels}), got {list(pre.mean)} and {list(pre.std)}"
            )
        if pre.channels == AUTO:
            raise ConfigError(
                f"{origin}: preprocess.mean/std are set by hand but preprocess.channels=auto: set the channels "
                f"too (preprocess.channels={len(pre.mean)}), or mean and std to auto"
            )
        if min(float(v) for v in pre.std) <= 0:
            raise ConfigError(f"{origin}: preprocess.std values must be > 0, got {list(pre.std)}")
    if pre.near_duplicates not in NEAR_DUPLICATE_ACTIONS:
        raise ConfigError(
            f"{origin}: preprocess.near_duplicates={pre.near_duplicates!r}; use one of {NEAR_DUPLICATE_ACTIONS}"
        )
    if not 0 <= int(pre.near_duplicate_distance) <= 16:
        raise ConfigError(
            f"{origin}: preprocess.near_duplicate_distance must be in [0, 16] bits, got {pre.near_duplicate_distance}"
        )


def _check_model(model: DictConfig, origin: str) -> None:
    if model.name == AUTO:
        if model.auto is None:
            raise ConfigError(f"{origin}: model.name=auto needs model.auto (use model=auto, conf/model/auto.yaml)")
        for which in ("transfer", "scratch", "small"):
            if model.auto.get(which) is None and which == "small":
                continue
            candidate = dict(model.auto[which])
            if candidate.get("name") in (None, AUTO):
                raise ConfigError(f"{origin}: model.auto.{which} needs a model name")
            try:
                _check_model(OmegaConf.merge(OmegaConf.structured(ModelConfig), candidate), origin)
            except (ValidationError, ConfigKeyError, ConfigAttributeError) as err:
                raise ConfigError(f"{origin}: model.auto.{which}: {err}") from None
        return
    if model.name == "embeddings":
        from taxonomist.models.embeddings.features import EXTRACTORS
        from taxonomist.models.embeddings.heads import CLASSIFIERS

        for part, known in (("features", EXTRACTORS), ("classifier", CLASSIFIERS)):
            chosen = model.get(part)
            if chosen is None or chosen.get("name") not in known:
                raise ConfigError(
                    f"{origin}: model.name=embeddings needs model.{part}.name, one of {', '.join(known)} "
                    f"(conf/model/{part}/); use model=embeddings, which sets both"
                )
    # A timm name in place of auto (`-S model.name=resnet34`) uses the other keys as they are.
    for key in (*[k for k in MODEL_KEYS if k != "checkpoint"], "min_image_size", "max_image_size"):
        if model[key] is None:
            raise ConfigError(
                f"{origin}: model.{key} needs a value for model.name={model.name!r}; to pick a model, choose "
                "the model group (model=resnet18, or model=resnet10_narrow model.name=<timm name>): it sets every key"
            )
    if not 8 <= int(model.min_image_size) <= int(model.max_image_size):
        raise ConfigError(
            f"{origin}: model.min_image_size ({model.min_image_size}) must be >= 8 and <= model.max_image_size "
            f"({model.max_image_size})"
        )


def _check_training(cfg: DictConfig, mixup_ok: bool, origin: str) -> None:
    batch = cfg.fit.batch_size
    if batch != AUTO and (not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"{origin}: fit.batch_size must be a positive integer or auto, got {batch!r}")
    mix = cfg.fit.mixup
    ema = cfg.callbacks.get("ema")
    if ema is not None and "decay" in ema and not 0.0 < float(ema.decay) < 1.0:
        raise ConfigError(f"{origin}: callbacks.ema.decay must be in (0, 1), got {ema.decay}")
    if min(float(mix.mixup_alpha), float(mix.cutmix_alpha)) < 0:
        raise ConfigError(f"{origin}: fit.mixup alphas must be >= 0 (0 = off)")
    for key in ("prob", "switch_prob"):
        if not 0.0 <= float(mix[key]) <= 1.0:
            raise ConfigError(f"{origin}: fit.mixup.{key} must be in [0, 1], got {mix[key]}")
    if (mix.mixup_alpha or mix.cutmix_alpha) and not mixup_ok:
        raise ConfigError(
            f"{origin}: fit.mixup needs task.name=multiclass (mixed images get mixed class targets), "
            f"not {cfg.task.name}; set fit.mixup.mixup_alpha=0 and fit.mixup.cutmix_alpha=0"
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
