"""Binary: two classes, one logit; the positive class when its probability reaches a threshold
tuned on the validation split (``task.threshold``).

Output units are ``[negative, positive]`` (``task.positive_label``, default the last class in
sorted order); the target of an image is 0 or 1. Test metrics: accuracy, precision, recall and
F1 at the tuned threshold, balanced accuracy, ROC-AUC, average precision, NLL, calibration
error; PR and ROC curves; a 2x2 confusion matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from taxonomist.data.manifest import Record, split_labels
from taxonomist.errors import DataError
from taxonomist.evaluation.report import Evaluation, rounded, worst_first
from taxonomist.tasks.base import Decision, Task, separator, sigmoid, tune_threshold, with_prob_columns
from taxonomist.tasks.registry import register

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torchmetrics import MetricCollection

    from taxonomist.tasks.uncertainty import Question


@register
class BinaryTask(Task):
    """One logit; ``probabilities`` are the positive class's, shape (N,)."""

    name = "binary"
    keys = ("positive_label", "class_weights", "balanced_sampling")
    primary_val = "val/auroc"  # threshold-free: thresholds are tuned after training
    primary_test = "test/f1"
    curves = ("train/acc", "val/acc", "val/f1", "val/auroc")
    output_text = "`label` (one of the two classes), `score`, and `prob_<class>` for both classes"
    calibration = "platt"

    @classmethod
    def check_records(cls, records: list[Record], cfg: DictConfig) -> list[Record]:
        """One label per image, exactly two classes, and the positive label among them."""
        records = super().check_records(records, cfg)
        classes = sorted({r.labels[0] for r in records})
        if len(classes) != 2:
            raise DataError(f"task binary needs exactly 2 classes, the data has {len(classes)}: {classes[:10]}")
        positive = cfg.task.positive_label
        if positive is not None and str(positive) not in classes:
            raise DataError(f"task.positive_label={positive!r} is not one of the classes {classes}")
        return records

    @classmethod
    def from_labels(cls, label_cells: Iterable[str], task_cfg: DictConfig | None = None) -> BinaryTask:
        """``[negative, positive]`` from the two classes of the data."""
        seen = sorted({label for cell in label_cells for label in split_labels(cell)})
        if len(seen) != 2:
            raise DataError(f"task binary needs exactly 2 classes, the data has {len(seen)}: {seen}")
        chosen = task_cfg.get("positive_label") if task_cfg is not None else None
        positive = str(chosen) if chosen is not None else seen[-1]
        if positive not in seen:
            raise DataError(f"task.positive_label={positive!r} is not one of the classes {seen}")
        return cls([c for c in seen if c != positive] + [positive])

    @property
    def positive(self) -> str:
        """The positive class."""
        return self.classes[1]

    @property
    def num_outputs(self) -> int:
        return 1

    def loss(self, label_smoothing: float = 0.0, weights: list[float] | None = None) -> torch.nn.Module:
        from taxonomist.tasks.nn import BinaryCrossEntropy

        return BinaryCrossEntropy(weights, single=True)

    def metrics(self) -> MetricCollection:
        from taxonomist.tasks.nn import binary_metrics

        return binary_metrics()

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.torch_probabilities(logits), target.long()

    def torch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(logits.float()[:, 0])

    def class_weights(self, targets: np.ndarray) -> list[float]:
        """The BCE ``pos_weight``: negatives / positives."""
        pos = max(int(targets.sum()), 1)
        return [float((len(targets) - pos) / pos)]

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        return sigmoid(logits[:, 0] if logits.ndim == 2 else logits)

    def tune(self, probs: np.ndarray, target: np.ndarray, task_cfg: DictConfig) -> Decision:
        th = task_cfg.threshold
        return Decision([tune_threshold(probs, target, str(th.mode), float(th.value))], separator(task_cfg))

    def decide(self, probs: np.ndarray, decision: Decision) -> np.ndarray:
        return (probs >= decision.thresholds[0]).astype(np.int64)

    def questions(self, probs: np.ndarray) -> list[Question]:
        """One question over the two classes."""
        from taxonomist.tasks.uncertainty import Question

        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        return [Question("", self.classes, np.stack([1.0 - p, p], axis=1))]

    def decision_text(self, decision: Decision) -> str:
        return f"`{self.positive}` when its probability >= {decision.thresholds[0]:.4f} (tuned on the validation split)"

    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Binary metrics at the tuned threshold, plus threshold-free ROC-AUC and average precision."""
        import torch
        from torchmetrics.functional.classification import (
            binary_accuracy,
            binary_auroc,
            binary_average_precision,
            binary_calibration_error,
            binary_f1_score,
            binary_precision,
            binary_precision_recall_curve,
            binary_recall,
            binary_roc,
            multiclass_confusion_matrix,
        )

        from taxonomist.evaluation.metrics import per_class_table

        p, t = torch.from_numpy(probs).double(), torch.from_numpy(target).long()
        th = decision.thresholds[0]
        pred = self.decide(probs, decision)
        metrics = rounded(
            {
                "acc": binary_accuracy(p, t, threshold=th),
                "precision": binary_precision(p, t, threshold=th),
                "recall": binary_recall(p, t, threshold=th),
                "f1": binary_f1_score(p, t, threshold=th),
                "balanced_acc": (_recall_of(pred, target, 1) + _recall_of(pred, target, 0)) / 2,
                "roc_auc": binary_auroc(p, t),
                "average_precision": binary_average_precision(p, t),
                "nll": torch.nn.functional.binary_cross_entropy(p.clamp(1e-12, 1 - 1e-12), t.double()),
                "ece": binary_calibration_error(p, t, n_bins=15),
                "threshold": th,
            }
        )
        two = np.stack([1 - probs, probs], axis=1)
        onehot = np.zeros((len(pred), 2), dtype=np.float64)
        onehot[np.arange(len(pred)), pred] = 1.0  # so per-class functions count exactly these decisions
        table = per_class_table(torch.from_numpy(onehot), t, self.classes)
        precision, recall, thresholds = binary_precision_recall_curve(p, t)
        fpr, tpr, roc_th = binary_roc(p, t)
        curves = {
            "pr_curve": pd.DataFrame(
                {"recall": recall[:-1].numpy(), "precision": precision[:-1].numpy(), "threshold": thresholds.numpy()}
            ),
            "roc_curve": pd.DataFrame({"fpr": fpr.numpy(), "tpr": tpr.numpy(), "threshold": roc_th.numpy()}),
        }
        conf = two[np.arange(len(pred)), pred]
        predictions = pd.DataFrame(
            {
                "actual": [self.classes[i] for i in target],
                "predicted": [self.classes[i] for i in pred],
                "confidence": conf.round(5),
                f"prob_{self.positive}": probs.round(5),
            }
        )
        matrix = multiclass_confusion_matrix(torch.from_numpy(pred), t, 2).numpy()
        wrong = np.flatnonzero(pred != target)
        return Evaluation(
            metrics, table, predictions, {"confusion_matrix": (matrix, self.classes)}, curves, worst_first(wrong, conf)
        )

    def answer(self, probs: np.ndarray, decision: Decision) -> pd.DataFrame:
        picked = self.decide(probs, decision)
        two = np.stack([1.0 - probs, probs], axis=1)
        rows = np.arange(len(probs))
        frame = pd.DataFrame({"label": [self.classes[i] for i in picked], "score": two[rows, picked]})
        return with_prob_columns(frame, self.classes, two)


def _recall_of(pred: np.ndarray, target: np.ndarray, cls: int) -> float:
    """Recall of one class (specificity for class 0)."""
    return float(((pred == cls) & (target == cls)).sum() / max((target == cls).sum(), 1))
