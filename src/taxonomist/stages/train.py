"""Train: fit the classifier on the cached train split, pick the best epoch on val.

Outputs: ``models/best.ckpt`` (best checkpoint by ``train.monitor``), ``models/labels.json``,
``models/run.json`` (the MLflow run this pipeline execution logs to) and
``reports/train_history.csv`` (per-epoch metrics for ``dvc plots``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar, WeightAveraging
from omegaconf import DictConfig, OmegaConf

from taxonomist.data.datamodule import ImageDataModule
from taxonomist.errors import ConfigError, StageOrderError
from taxonomist.files import atomic_write_json, read_json, sha256_file
from taxonomist.models.callbacks import EpochHistory
from taxonomist.models.module import ClassifierModule
from taxonomist.tracking import runs

log = logging.getLogger(__name__)
MODELS_DIR = Path("models")
HISTORY_FILE = Path("reports/train_history.csv")


def configure_torch(cfg: DictConfig) -> None:
    """Seed everything and set the CPU thread count."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    threads = int(cfg.trainer.num_threads)
    if threads > 0:
        torch.set_num_threads(threads)


def step_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks that act on every training step: the progress bar and, when
    ``train.ema.enabled``, the EMA of the weights."""
    callbacks: list[L.Callback] = [TQDMProgressBar(refresh_rate=20)]
    if cfg.train.ema.enabled:
        callbacks.append(ema_callback(float(cfg.train.ema.decay)))
    return callbacks


def ema_callback(decay: float) -> WeightAveraging:
    """An EMA of the weights (and BatchNorm statistics), updated every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs
    and small datasets average recent weights rather than the random initial ones. Validation
    runs on the averaged weights, so the monitored metric and the saved checkpoint
    (``state_dict`` = the average) are those of the EMA model.
    """
    return WeightAveraging(multi_avg_fn=ema_update(decay), use_buffers=True)


def ema_update(decay: float):
    """``AveragedModel`` multi-tensor update: EMA with :func:`ema_callback`'s warm-up."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # counters (BatchNorm's num_batches_tracked)
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def build_module(cfg: DictConfig, datamodule: ImageDataModule, in_chans: int) -> ClassifierModule:
    """The LightningModule for ``cfg`` over the datamodule's label space (and class weights)."""
    task = datamodule.task
    weights = task.class_weights(datamodule.train_targets()) if cfg.task.class_weights == "balanced" else None
    return ClassifierModule(OmegaConf.to_container(cfg, resolve=True), task.to_dict(), in_chans, weights)


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], default_root_dir: Path, **overrides) -> L.Trainer:
    """The Trainer of the ``trainer`` config section; ``overrides`` replace any Trainer argument."""
    tcfg = cfg.trainer
    kwargs = {
        "max_epochs": int(tcfg.max_epochs),
        "accelerator": str(tcfg.accelerator),
        "devices": tcfg.devices,
        "precision": str(tcfg.precision),
        "deterministic": tcfg.deterministic,
        "gradient_clip_val": tcfg.gradient_clip_val,
        "limit_train_batches": tcfg.limit_train_batches,
        "limit_val_batches": tcfg.limit_val_batches,
        "log_every_n_steps": int(tcfg.log_every_n_steps),
        "logger": False,
        "callbacks": callbacks,
        "enable_model_summary": False,
        "default_root_dir": str(default_root_dir),
    }
    return L.Trainer(**{**kwargs, **overrides})


def data_hash(processed_dir: Path) -> str:
    """Content hash of the processed split assignment (identifies the exact training data)."""
    return sha256_file(processed_dir / "splits.csv")


def run(
    cfg: DictConfig,
    processed_dir: Path = Path("data/processed"),
    models_dir: Path = MODELS_DIR,
    spec: runs.RunSpec | None = None,
) -> dict:
    """Train and write the best checkpoint; return the run id, the monitored metric, its best
    value, the epoch that reached it and that epoch's train/ and val/ metrics. ``spec`` names
    and places the MLflow run (sweeps)."""
    configure_torch(cfg)
    datamodule = ImageDataModule(cfg, processed_dir)
    report = read_json(processed_dir / "report.json")
    in_chans = int(report["image_shape"][2])
    task = datamodule.task
    if task.name != str(cfg.task.name):
        raise StageOrderError(
            f"data/processed holds {task.name} labels but task.name={cfg.task.name}: run the preprocess stage again"
        )
    module = build_module(cfg, datamodule, in_chans)

    models_dir.mkdir(parents=True, exist_ok=True)
    run_id = runs.start_pipeline_run(cfg, tags={"data_hash": data_hash(processed_dir), "stage": "train"}, spec=spec)
    ckpt_dir = models_dir / ".checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    monitor = task.val_metric(str(cfg.train.monitor))
    mode = "min" if monitor.endswith("loss") else "max"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=monitor, mode=mode, save_top_k=1, save_last=False
    )
    # Epoch-level train/ and val/ metrics (and train/lr) go to MLflow with the epoch as the step.
    history = EpochHistory(HISTORY_FILE, on_row=runs.epoch_logger(run_id))
    callbacks = [
        checkpoint,
        EarlyStopping(monitor=monitor, mode=mode, patience=int(cfg.train.early_stopping_patience)),
        history,
        *step_callbacks(cfg),
    ]
    trainer = build_trainer(cfg, callbacks, default_root_dir=models_dir)
    trainer.fit(module, datamodule=datamodule)
    if not checkpoint.best_model_path:
        raise ConfigError(f"training produced no checkpoint: train.monitor={monitor!r} was never logged")
    shutil.move(checkpoint.best_model_path, models_dir / "best.ckpt")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    atomic_write_json(models_dir / "labels.json", task.to_dict())
    best = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
    # The epoch the checkpoint comes from: the first that reached the best score.
    best_row = next((r for r in history.rows if r.get(monitor) == best), {})
    best_epoch = int(best_row["epoch"]) if best_row else None
    summary = {
        "run_id": run_id,
        "monitor": monitor,
        "best": best,
        "best_epoch": best_epoch,
        "best_epoch_metrics": {k: v for k, v in best_row.items() if k != "epoch"},
        "epochs": trainer.current_epoch,
    }
    log.info("train: best %s = %.4f at epoch %s (run %s)", monitor, best, best_epoch, run_id)
    return summary
