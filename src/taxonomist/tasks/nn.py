"""The torch side of the tasks: losses, and the metrics torchmetrics does not have.

Task modules import this inside the methods training and evaluation call, so the served
model (NumPy + ONNX Runtime) never imports torch. Each loss keeps its class weights in a
``weights`` buffer (empty when unweighted).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)


class WeightedLoss(torch.nn.Module):
    """A loss with optional per-class weights (a ``weights`` buffer)."""

    def __init__(self, weights: list[float] | None = None):
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) if weights else torch.empty(0))

    @property
    def weight(self) -> torch.Tensor | None:
        """The weights, or None when unweighted."""
        return self.weights if self.weights.numel() else None


class CrossEntropy(WeightedLoss):
    """Softmax cross-entropy with label smoothing (class-probability targets from mixup/cutmix
    come already smoothed)."""

    def __init__(self, label_smoothing: float = 0.0, weights: list[float] | None = None):
        super().__init__(weights)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        smoothing = 0.0 if target.is_floating_point() else self.label_smoothing
        return F.cross_entropy(logits.float(), target, weight=self.weight, label_smoothing=smoothing)


class BinaryCrossEntropy(WeightedLoss):
    """BCE on logits; ``weights`` is the ``pos_weight`` (one per output). ``single`` trains the
    first logit column against a 1-D target (binary task)."""

    def __init__(self, weights: list[float] | None = None, single: bool = False):
        super().__init__(weights)
        self.single = single

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.single:
            logits = logits[:, 0]
        return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=self.weight)


class NodeLikelihood(WeightedLoss):
    """Hierarchical loss: the negative log of the target node's probability, the sum of its
    leaves' softmax (``membership``: (nodes, leaves) bool); ``weights`` are per leaf."""

    def __init__(self, membership: np.ndarray, weights: list[float] | None = None):
        super().__init__(weights)
        self.register_buffer("membership", torch.from_numpy(membership))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        node_logp = logp.masked_fill(~self.membership[target], float("-inf")).logsumexp(dim=1)
        weights = self.weight
        if weights is not None:
            leaf_w = (self.membership[target].float() * weights).sum(1) / self.membership[target].sum(1)
            return -(node_logp * leaf_w).sum() / leaf_w.sum()
        return -node_logp.mean()


def binary_metrics() -> MetricCollection:
    """Accuracy, precision, recall, F1 (at 0.5) and ROC-AUC of one positive class."""
    return MetricCollection(
        {
            "acc": BinaryAccuracy(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "f1": BinaryF1Score(),
            "auroc": BinaryAUROC(),
        }
    )


def multiclass_metrics(n: int) -> MetricCollection:
    """Accuracy and macro precision/recall/F1 over ``n`` classes."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes=n, average="macro"),
            "recall_macro": MulticlassRecall(num_classes=n, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
        }
    )


def multilabel_metrics(n: int) -> MetricCollection:
    """Subset accuracy, macro/micro F1, macro precision/recall (at 0.5) and macro AP over ``n`` labels."""
    return MetricCollection(
        {
            "subset_acc": MultilabelExactMatch(num_labels=n),
            "precision_macro": MultilabelPrecision(num_labels=n, average="macro"),
            "recall_macro": MultilabelRecall(num_labels=n, average="macro"),
            "f1_macro": MultilabelF1Score(num_labels=n, average="macro"),
            "f1_micro": MultilabelF1Score(num_labels=n, average="micro"),
            "ap_macro": MultilabelAveragePrecision(num_labels=n, average="macro"),
        }
    )


class CountMetric(Metric):
    """Sums the counts a NumPy function returns for each batch and turns them into metrics.

    ``counts(preds, target)`` (NumPy arrays in) returns a dict of counts; ``finish(sums)`` turns
    the summed counts into the metric values (float32 here; evaluation passes float64). The
    same two functions compute the test metrics in evaluation, so the per-epoch and the test
    numbers come from one definition.
    """

    full_state_update = False

    def __init__(
        self,
        names: tuple[str, ...],
        counts: Callable[[np.ndarray, np.ndarray], dict[str, float]],
        finish: Callable[[dict[str, float]], dict[str, float]],
    ):
        super().__init__()
        self.names, self.counts, self.finish = names, counts, finish
        for name in names:
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        counts = self.counts(preds.detach().float().cpu().numpy(), target.detach().cpu().numpy())
        for name in self.names:
            setattr(self, name, getattr(self, name) + float(counts[name]))

    def compute(self) -> dict[str, torch.Tensor]:
        # float32 sums, so the arithmetic of ``finish`` is float32 as the states are
        sums = {name: np.float32(getattr(self, name).item()) for name in self.names}
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in self.finish(sums).items()}
