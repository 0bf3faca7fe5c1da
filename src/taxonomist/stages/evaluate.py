"""Evaluate: calibrate and tune the decision on the validation split, then measure the test split.

On the validation split, in this order: the scores are calibrated (``evaluate.calibration``:
temperature or Platt scaling, :mod:`taxonomist.evaluation.calibration`), binary and
multi-label thresholds are tuned on the calibrated scores (``task.threshold``), and the
split-conformal thresholds are fitted (``evaluate.coverage``). All three are written to
``reports/eval/decision.json``, which the package stage ships with the model, so served
probabilities are calibrated and answers carry ``plausible`` and ``abstain``.

Outputs: ``reports/metrics.json`` (``dvc metrics show``) and, under ``reports/eval/``,
``per_class.csv``, ``predictions.csv`` (``dvc plots`` confusion matrix), confusion matrices,
curves (binary: PR and ROC), ``calibration.csv`` and ``reliability.png`` (calibration error
before and after), ``explanations.png`` (Grad-CAM or integrated-gradients heatmaps of a sample
of test images, mistakes included) and PNG plots; the same numbers and files are logged to the
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
from taxonomist.errors import ConfigError, DataError, StageOrderError
from taxonomist.evaluation.calibration import (
    CALIBRATION_MODES,
    calibration_report,
    conformal_thresholds,
    fit_calibration,
)
from taxonomist.evaluation.explain import explanation_grid, output_names, output_scores, pick_examples
from taxonomist.evaluation.report import Evaluation, write_reports
from taxonomist.files import atomic_directory, atomic_write_json
from taxonomist.models.inference import Classifier, load_classifier
from taxonomist.stages.paths import DECISION_FILE, HISTORY_FILE, METRICS_FILE, MODELS_DIR, PROCESSED_DIR, REPORTS_DIR
from taxonomist.tasks import Decision, Task
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


def fit_decision(task: Task, val_logits: np.ndarray, val_target: np.ndarray, cfg: DictConfig) -> Decision:
    """The decision fitted on the validation split: calibration, thresholds on the calibrated
    scores, conformal thresholds (see the module docstring). No validation images: no
    calibration, thresholds at 0.5, no conformal sets."""
    mode, coverage = str(cfg.evaluate.calibration), cfg.evaluate.coverage
    if mode not in CALIBRATION_MODES:
        raise ConfigError(f"evaluate.calibration={mode!r}; use one of {CALIBRATION_MODES}")
    if coverage is not None and not 0.0 < float(coverage) < 1.0:
        raise ConfigError(f"evaluate.coverage must be in (0, 1) or null (no prediction sets), got {coverage}")
    scale, bias = fit_calibration(task, val_logits, val_target) if mode == "auto" else ([], [])
    val_probs = task.calibrated_probabilities(val_logits, Decision(scale=scale, bias=bias))
    decision = task.tune(val_probs, val_target, cfg.task)
    decision.scale, decision.bias = scale, bias
    if coverage is not None and len(val_target):
        decision.coverage = float(coverage)
        decision.qhat = conformal_thresholds(task, val_probs, val_target, float(coverage))
        if max(decision.qhat) >= 1.0:
            log.warning(
                "conformal sets: too few validation images for coverage %s; every option stays plausible "
                "(answers always abstain) for at least one question",
                coverage,
            )
    return decision


def explain_examples(
    model: Classifier, task: Task, logits: np.ndarray, result: Evaluation, images, cfg: DictConfig, path: Path
) -> None:
    """``evaluate.explain_examples`` test images, about half of them mistakes, beside heatmaps
    of where the network looked for its top output (:mod:`taxonomist.evaluation.explain`)."""
    n = int(cfg.evaluate.explain_examples)
    path.unlink(missing_ok=True)
    if n <= 0:
        return
    actual, predicted = result.predictions["actual"], result.predictions["predicted"]
    picked = pick_examples(predicted.to_numpy(), actual.to_numpy(), n, int(cfg.seed))
    units = output_scores(task, logits[picked]).argmax(axis=1)
    names = output_names(task)
    titles = [
        f"true {actual.iloc[i]}\npred {predicted.iloc[i]}" + (f" ({names[u]})" if task.num_outputs == 1 else "")
        for i, u in zip(picked, units, strict=True)
    ]
    pre = cfg.preprocess
    explanation_grid(model, np.asarray(images[picked]), pre.mean, pre.std, units.tolist(), titles, path)


def run(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    models_dir: Path = MODELS_DIR,
    out_dir: Path = REPORTS_DIR,
    metrics_file: Path = METRICS_FILE,
) -> dict[str, float]:
    """Tune the decision on val, evaluate ``models/best.ckpt`` on test; return the metrics.
    ``out_dir`` is built beside the old one and swapped in at the end (an error, a full disk or
    Ctrl-C leaves the previous reports as they were)."""
    with atomic_directory(out_dir) as building:
        return _evaluate(cfg, processed_dir, models_dir, building, metrics_file)


def _evaluate(
    cfg: DictConfig, processed_dir: Path, models_dir: Path, out_dir: Path, metrics_file: Path
) -> dict[str, float]:
    """:func:`run`, writing into ``out_dir`` (the folder being built)."""
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
    decision = fit_decision(task, val_logits, val_target, cfg)
    probs = task.calibrated_probabilities(logits, decision)
    result = task.evaluate(probs, target, decision)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = result.metrics | calibration_report(task, task.probabilities(logits), probs, target, decision, out_dir)

    atomic_write_json(metrics_file, {"test": metrics})
    atomic_write_json(out_dir / DECISION_FILE, {"task": task.name, **decision.to_dict()})
    test_images = read_split(processed_dir, "test").images
    write_reports(result, test_images, out_dir, int(cfg.evaluate.misclassified_examples), HISTORY_FILE)
    explain_examples(module, task, logits, result, test_images, cfg, out_dir / "explanations.png")

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
