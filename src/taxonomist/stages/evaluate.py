"""Evaluate: test-split metrics, per-class table, confusion matrix and plots.

Outputs: ``reports/metrics.json`` (``dvc metrics show``) and, under ``reports/eval/``,
``per_class.csv``, ``predictions.csv`` (``dvc plots`` confusion matrix), ``confusion_matrix.csv``
and PNG plots; the same numbers and files are logged to the pipeline's MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from taxonomist.data.cache import read_labels, read_split
from taxonomist.data.datamodule import CachedImageDataset
from taxonomist.evaluation import plots
from taxonomist.evaluation.metrics import confusion, per_class_table, summary_metrics
from taxonomist.files import atomic_write_json, atomic_write_text
from taxonomist.models.module import load_classifier
from taxonomist.tracking import runs

log = logging.getLogger(__name__)
REPORTS_DIR = Path("reports/eval")
METRICS_FILE = Path("reports/metrics.json")
HISTORY_FILE = Path("reports/train_history.csv")


def predict_split(
    module: L.LightningModule, processed_dir: Path, split: str, batch_size: int, mean, std
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and targets of one cached split, through ``Trainer.predict``."""
    arrays = read_split(processed_dir, split)
    dataset = CachedImageDataset(arrays, list(mean), list(std))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
    )
    probs = torch.cat(trainer.predict(module, dataloaders=loader))  # type: ignore[arg-type]
    return probs.float(), dataset.labels


def run(
    cfg: DictConfig,
    processed_dir: Path = Path("data/processed"),
    models_dir: Path = Path("models"),
    out_dir: Path = REPORTS_DIR,
    metrics_file: Path = METRICS_FILE,
) -> dict[str, float]:
    """Evaluate ``models/best.ckpt`` on the test split; return the summary metrics."""
    L.seed_everything(int(cfg.seed), verbose=False)
    module = load_classifier(models_dir / "best.ckpt")
    classes = read_labels(processed_dir)
    if list(module.classes) != classes:
        raise RuntimeError("models/best.ckpt was trained on other classes than data/processed holds")
    pre = cfg.preprocess
    probs, target = predict_split(module, processed_dir, "test", int(cfg.evaluate.batch_size), pre.mean, pre.std)
    if len(target) == 0:
        raise RuntimeError("the test split is empty: nothing to evaluate")

    metrics = summary_metrics(probs, target)
    table = per_class_table(probs, target, classes)
    matrix = confusion(probs, target).numpy()
    pred = probs.argmax(1)
    conf = probs.max(1).values

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_file, {"test": metrics})
    atomic_write_text(out_dir / "per_class.csv", table.to_csv(index=False))
    atomic_write_text(
        out_dir / "predictions.csv",
        pd.DataFrame(
            {
                "actual": [classes[i] for i in target],
                "predicted": [classes[i] for i in pred],
                "confidence": conf.numpy().round(5),
            }
        ).to_csv(index=False),
    )
    atomic_write_text(
        out_dir / "confusion_matrix.csv",
        pd.DataFrame(matrix, index=classes, columns=classes).to_csv(index_label="true\\predicted"),
    )
    plots.plot_confusion(matrix, classes, out_dir / "confusion_matrix.png")
    plots.plot_per_class(table, out_dir / "per_class.png")
    wrong = torch.nonzero(pred != target).flatten()
    wrong = wrong[torch.argsort(conf[wrong], descending=True)][: int(cfg.evaluate.misclassified_examples)]
    images = (
        np.asarray(read_split(processed_dir, "test").images[wrong.numpy()]) if len(wrong) else np.zeros((0, 1, 1, 1))
    )
    plots.plot_misclassified(
        images,
        [classes[target[i]] for i in wrong],
        [classes[pred[i]] for i in wrong],
        [float(conf[i]) for i in wrong],
        out_dir / "misclassified.png",
    )
    if HISTORY_FILE.is_file():
        plots.plot_history(pd.read_csv(HISTORY_FILE), out_dir / "training_curves.png")

    with runs.resume_run(cfg):
        runs.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        runs.log_metrics(
            {f"test/{m}/{row['class']}": row[m] for _, row in table.iterrows() for m in ("precision", "recall", "f1")}
        )
        mlflow.log_artifacts(str(out_dir), artifact_path="evaluation")
        mlflow.log_artifact(str(metrics_file), artifact_path="evaluation")
    log.info("evaluate: test acc %.4f, macro-F1 %.4f", metrics["acc"], metrics["f1_macro"])
    return metrics
