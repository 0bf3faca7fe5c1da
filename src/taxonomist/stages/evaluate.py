"""Evaluate: tune the decision on the validation split, then measure the test split.

Binary and multi-label thresholds are tuned on the validation split (``task.threshold``) and
written to ``reports/eval/decision.json``, which the package stage ships with the model.

Outputs: ``reports/metrics.json`` (``dvc metrics show``) and, under ``reports/eval/``,
``per_class.csv``, ``predictions.csv`` (``dvc plots`` confusion matrix), confusion matrices,
curves (binary: PR and ROC) and PNG plots; the same numbers and files are logged to the
pipeline's MLflow run.
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
from taxonomist.data.datamodule import CachedImageDataset, collate_batch
from taxonomist.evaluation import plots
from taxonomist.evaluation.tasks import Evaluation, evaluate
from taxonomist.files import atomic_write_json, atomic_write_text
from taxonomist.models.module import load_classifier
from taxonomist.tasks.decide import probabilities, tune
from taxonomist.tracking import runs

log = logging.getLogger(__name__)
REPORTS_DIR = Path("reports/eval")
METRICS_FILE = Path("reports/metrics.json")
HISTORY_FILE = Path("reports/train_history.csv")
DECISION_FILE = "decision.json"


def predict_split(
    module: L.LightningModule, processed_dir: Path, split: str, batch_size: int, mean, std
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets of one cached split, through ``Trainer.predict``."""
    arrays = read_split(processed_dir, split)
    if len(arrays) == 0:
        return np.zeros((0, module.space.num_outputs), np.float32), np.asarray(arrays.labels)
    dataset = CachedImageDataset(arrays, list(mean), list(std))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
    )
    logits = torch.cat(trainer.predict(module, dataloaders=loader))  # type: ignore[arg-type]
    return logits.float().numpy(), np.asarray(arrays.labels)


def write_reports(result: Evaluation, images: np.ndarray, out_dir: Path, examples: int = 36) -> None:
    """Write the tables, confusion matrices, curves and plots of an evaluation."""
    atomic_write_text(out_dir / "per_class.csv", result.per_class.to_csv(index=False))
    atomic_write_text(out_dir / "predictions.csv", result.predictions.to_csv(index=False))
    for name, (matrix, names) in result.confusions.items():
        rows = names[: matrix.shape[0]]
        frame = pd.DataFrame(matrix, index=rows, columns=names[: matrix.shape[1]])
        atomic_write_text(out_dir / f"{name}.csv", frame.to_csv(index_label="true\\predicted"))
        plots.plot_confusion(matrix, rows, out_dir / f"{name}.png", columns=names[: matrix.shape[1]])
    for name, frame in result.curves.items():
        atomic_write_text(out_dir / f"{name}.csv", frame.to_csv(index=False))
    if "pr_curve" in result.curves:
        plots.plot_curves(result.curves["pr_curve"], result.curves["roc_curve"], out_dir / "pr_roc_curves.png")
    plots.plot_per_class(result.per_class, out_dir / "per_class.png")
    shown = result.mistakes[:examples]
    plots.plot_misclassified(
        np.asarray(images[shown]) if len(shown) else np.zeros((0, 1, 1, 1), np.uint8),
        [str(result.predictions["actual"].iloc[i]) for i in shown],
        [str(result.predictions["predicted"].iloc[i]) for i in shown],
        [
            float(result.predictions["confidence"].iloc[i]) if "confidence" in result.predictions else None
            for i in shown
        ],
        out_dir / "misclassified.png",
    )
    if HISTORY_FILE.is_file():
        plots.plot_history(pd.read_csv(HISTORY_FILE), out_dir / "training_curves.png")


def run(
    cfg: DictConfig,
    processed_dir: Path = Path("data/processed"),
    models_dir: Path = Path("models"),
    out_dir: Path = REPORTS_DIR,
    metrics_file: Path = METRICS_FILE,
) -> dict[str, float]:
    """Tune the decision on val, evaluate ``models/best.ckpt`` on test; return the metrics."""
    L.seed_everything(int(cfg.seed), verbose=False)
    module = load_classifier(models_dir / "best.ckpt", tta=str(cfg.augment.tta))
    space = read_labels(processed_dir)
    if module.space != space:
        raise RuntimeError("models/best.ckpt was trained on other labels than data/processed holds: retrain")
    pre, batch = cfg.preprocess, int(cfg.evaluate.batch_size)
    val_logits, val_target = predict_split(module, processed_dir, "val", batch, pre.mean, pre.std)
    logits, target = predict_split(module, processed_dir, "test", batch, pre.mean, pre.std)
    if len(target) == 0:
        raise RuntimeError("the test split is empty: nothing to evaluate")
    th = cfg.task.threshold
    val_probs = probabilities(val_logits, space)  # no val images: tuned thresholds stay at 0.5
    decision = tune(val_probs, val_target, space, str(th.mode), float(th.value), str(cfg.task.path_separator))
    result = evaluate(probabilities(logits, space), target, space, decision)
    metrics = result.metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_file, {"test": metrics})
    atomic_write_json(out_dir / DECISION_FILE, {"task": space.task, **decision.to_dict()})
    write_reports(result, read_split(processed_dir, "test").images, out_dir, int(cfg.evaluate.misclassified_examples))

    with runs.resume_run(cfg):
        runs.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        runs.log_metrics(
            {
                runs.metric_name(f"test/{m}/{row['class']}"): row[m]
                for _, row in result.per_class.iterrows()
                for m in ("precision", "recall", "f1")
            }
        )
        mlflow.log_artifacts(str(out_dir), artifact_path="evaluation")
        mlflow.log_artifact(str(metrics_file), artifact_path="evaluation")
    headline = ", ".join(f"{k} {v:.4f}" for k, v in list(metrics.items())[:4])
    log.info("evaluate (%s): %s", space.task, headline)
    return metrics
