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

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from taxonomist.data import auto
from taxonomist.data.cache import read_labels, read_split
from taxonomist.data.dataset import CachedImageDataset, collate_batch
from taxonomist.errors import DataError, StageOrderError
from taxonomist.evaluation.report import write_reports
from taxonomist.files import atomic_write_json
from taxonomist.models.inference import Classifier, load_classifier
from taxonomist.stages.paths import DECISION_FILE, HISTORY_FILE, METRICS_FILE, MODELS_DIR, PROCESSED_DIR, REPORTS_DIR
from taxonomist.tracking import runs

log = logging.getLogger(__name__)


def device_of(model: torch.nn.Module) -> torch.device:
    """The first CUDA device when there is one (the model is moved there), else the CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    return device


@torch.inference_mode()
def predict_split(
    model: Classifier, processed_dir: Path, split: str, batch_size: int, mean, std
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and targets of one cached split, in batches with a progress bar."""
    arrays = read_split(processed_dir, split)
    if len(arrays) == 0:
        return np.zeros((0, model.task.num_outputs), np.float32), np.asarray(arrays.labels)
    dataset = CachedImageDataset(arrays, list(mean), list(std))
    device = device_of(model)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch, pin_memory=device.type == "cuda"
    )
    logits = [
        model(x.to(device, non_blocking=True)).float().cpu()
        for x, _ in tqdm(loader, desc=f"predict {split}", unit="batch", mininterval=1, leave=False)
    ]
    return torch.cat(logits).numpy(), np.asarray(arrays.labels)


def run(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    models_dir: Path = MODELS_DIR,
    out_dir: Path = REPORTS_DIR,
    metrics_file: Path = METRICS_FILE,
) -> dict[str, float]:
    """Tune the decision on val, evaluate ``models/best.ckpt`` on test; return the metrics."""
    cfg = auto.resolve(cfg, processed_dir)
    torch.manual_seed(int(cfg.seed))
    module = load_classifier(models_dir / "best.ckpt", tta=str(cfg.augment.tta))
    trained_on = module.task
    task = read_labels(processed_dir)
    if trained_on != task:
        raise StageOrderError(
            "models/best.ckpt was trained on other labels than data/processed holds: run the train stage again"
        )
    pre, batch = cfg.preprocess, int(cfg.evaluate.batch_size)
    val_logits, val_target = predict_split(module, processed_dir, "val", batch, pre.mean, pre.std)
    logits, target = predict_split(module, processed_dir, "test", batch, pre.mean, pre.std)
    if len(target) == 0:
        raise DataError("the test split is empty: nothing to evaluate")
    val_probs = task.probabilities(val_logits)  # no val images: tuned thresholds stay at 0.5
    decision = task.tune(val_probs, val_target, cfg.task)
    result = task.evaluate(task.probabilities(logits), target, decision)
    metrics = result.metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(metrics_file, {"test": metrics})
    atomic_write_json(out_dir / DECISION_FILE, {"task": task.name, **decision.to_dict()})
    test_images = read_split(processed_dir, "test").images
    write_reports(result, test_images, out_dir, int(cfg.evaluate.misclassified_examples), HISTORY_FILE)

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
    log.info("evaluate (%s): %s", task.name, headline)
    return metrics
