"""Test metrics of a multi-class classifier from predicted probabilities."""

from __future__ import annotations

import pandas as pd
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)


def summary_metrics(probs: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Accuracy; macro and weighted precision/recall/F1; NLL; calibration error."""
    n = probs.shape[1]
    out = {
        "acc": multiclass_accuracy(probs, target, n, average="micro"),
        "balanced_acc": multiclass_recall(probs, target, n, average="macro"),
        "precision_macro": multiclass_precision(probs, target, n, average="macro"),
        "recall_macro": multiclass_recall(probs, target, n, average="macro"),
        "f1_macro": multiclass_f1_score(probs, target, n, average="macro"),
        "precision_weighted": multiclass_precision(probs, target, n, average="weighted"),
        "recall_weighted": multiclass_recall(probs, target, n, average="weighted"),
        "f1_weighted": multiclass_f1_score(probs, target, n, average="weighted"),
        "nll": torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), target),
        "ece": multiclass_calibration_error(probs, target, n, n_bins=15),
    }
    if n >= 5:
        out["acc_top5"] = multiclass_accuracy(probs, target, n, average="micro", top_k=5)
    return {k: round(float(v), 6) for k, v in out.items()}


def per_class_table(probs: torch.Tensor, target: torch.Tensor, classes: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support for each class."""
    n = len(classes)
    return pd.DataFrame(
        {
            "class": classes,
            "precision": multiclass_precision(probs, target, n, average=None).numpy().round(6),
            "recall": multiclass_recall(probs, target, n, average=None).numpy().round(6),
            "f1": multiclass_f1_score(probs, target, n, average=None).numpy().round(6),
            "support": torch.bincount(target, minlength=n).numpy(),
        }
    )


def confusion(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Confusion matrix counts: rows are true classes, columns predicted."""
    return multiclass_confusion_matrix(probs, target, probs.shape[1])
