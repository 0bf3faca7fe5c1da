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
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from taxonomist.data import auto
from taxonomist.data.datamodule import ImageDataModule
from taxonomist.errors import ConfigError, StageOrderError
from taxonomist.files import atomic_write_json, read_json, sha256_file
from taxonomist.models.callbacks import EpochHistory, build_callbacks, build_trainer
from taxonomist.models.module import ClassifierModule
from taxonomist.stages.paths import HISTORY_FILE, MODELS_DIR, PROCESSED_DIR, health_dir_for
from taxonomist.tasks import task_of
from taxonomist.tracking import runs

log = logging.getLogger(__name__)


def configure_torch(cfg: DictConfig) -> None:
    """Seed everything and set the CPU thread count."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    threads = int(cfg.fit.num_threads)
    if threads > 0:
        torch.set_num_threads(threads)


def build_module(cfg: DictConfig, datamodule: ImageDataModule, in_chans: int) -> ClassifierModule:
    """The LightningModule for ``cfg`` over the datamodule's label space (and class weights)."""
    task = datamodule.task
    weights = task.class_weights(datamodule.train_targets()) if cfg.task.class_weights == "balanced" else None
    return ClassifierModule(OmegaConf.to_container(cfg, resolve=True), task.to_dict(), in_chans, weights)


def data_hash(processed_dir: Path) -> str:
    """Content hash of the processed split assignment (identifies the exact training data)."""
    return sha256_file(processed_dir / "splits.csv")


def run(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    models_dir: Path = MODELS_DIR,
    spec: runs.RunSpec | None = None,
    health_dir: Path | None = None,
    history_file: Path = HISTORY_FILE,
) -> dict:
    """Train and write the best checkpoint; return the run id, the monitored metric, its best
    value, the epoch that reached it and that epoch's train/ and val/ metrics. ``spec`` names
    and places the MLflow run (sweeps)."""
    batch_auto = auto.is_auto(cfg.fit.batch_size)
    precision_auto = auto.is_auto(cfg.trainer.precision)
    cfg = auto.resolve(cfg, processed_dir)  # the numbers preprocess chose for every `auto`
    if batch_auto:
        log.info("auto: fit.batch_size = %s", cfg.fit.batch_size)
    if precision_auto:
        log.info("auto: trainer.precision = %s (%s)", *auto.choose_precision(str(cfg.trainer.accelerator)))
    configure_torch(cfg)
    datamodule = ImageDataModule(cfg, processed_dir)
    report = read_json(processed_dir / "report.json")
    in_chans = int(report["image_shape"][2])
    task = datamodule.task
    if type(task) is not task_of(cfg):
        raise StageOrderError(
            f"data/processed holds {task.name} labels but task.name={cfg.task.name}: run the preprocess stage again"
        )
    module = build_module(cfg, datamodule, in_chans)

    models_dir.mkdir(parents=True, exist_ok=True)
    digest = data_hash(processed_dir)
    run_id = runs.start_pipeline_run(cfg, tags={"data_hash": digest, "stage": "train"}, spec=spec)
    runs.log_dataset(run_id, cfg, processed_dir, digest, report, health_dir or health_dir_for(processed_dir))
    ckpt_dir = models_dir / ".checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    monitor = task.val_metric(str(cfg.fit.monitor))
    configured = build_callbacks(cfg, monitor, checkpoint={"dirpath": str(ckpt_dir)})
    checkpoint = configured.get("checkpoint")
    if not isinstance(checkpoint, ModelCheckpoint):
        raise ConfigError("callbacks.checkpoint must be a ModelCheckpoint: the train stage keeps its best epoch")
    # Epoch-level train/ and val/ metrics (and train/lr) go to MLflow with the epoch as the step.
    history = EpochHistory(history_file, on_row=runs.epoch_logger(run_id))
    trainer = build_trainer(cfg, [*configured.values(), history], default_root_dir=models_dir)
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
