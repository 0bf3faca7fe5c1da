"""The training side of each task: loss, class weights and the torchmetrics logged per epoch.

The metric a task is judged by (``train.monitor: auto`` and ``package.champion_metric: auto``)
is in :data:`PRIMARY_VAL` and :data:`PRIMARY_TEST`. Checkpoints are picked by a
threshold-free metric where decisions use tuned thresholds (binary: ROC-AUC, multilabel:
macro average precision), because thresholds are only tuned after training.
"""

from __future__ import annotations

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

from taxonomist.tasks.decide import descend
from taxonomist.tasks.labels import LabelSpace

PRIMARY_VAL = {
    "binary": "val/auroc",
    "multiclass": "val/f1_macro",
    "multilabel": "val/ap_macro",
    "hierarchical": "val/hf1",
}
PRIMARY_TEST = {
    "binary": "test/f1",
    "multiclass": "test/f1_macro",
    "multilabel": "test/f1_macro",
    "hierarchical": "test/hf1",
}


def resolve_monitor(monitor: str, task: str) -> str:
    """``train.monitor``, with ``auto`` replaced by the task's primary validation metric."""
    return PRIMARY_VAL[task] if monitor == "auto" else monitor


def resolve_champion_metric(metric: str, task: str) -> str:
    """``package.champion_metric``, with ``auto`` replaced by the task's primary test metric."""
    return PRIMARY_TEST[task] if metric == "auto" else metric


class HierarchicalF1(Metric):
    """Exact-node accuracy and hierarchical precision/recall/F1 (ancestor-augmented sets)."""

    full_state_update = False

    def __init__(self, space: LabelSpace, key: str = "hf1"):
        super().__init__()
        self.space = space
        self.key = key
        self.register_buffer("membership_nodes", torch.from_numpy(space.ancestor_matrix()), persistent=False)
        for name in ("overlap", "predicted", "true", "exact", "count"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, node_probs: torch.Tensor, target: torch.Tensor) -> None:
        pred = torch.from_numpy(descend(node_probs.detach().float().cpu().numpy(), self.space, 0.0))
        pred = pred.to(target.device)
        anc = self.membership_nodes.to(target.device)
        pred_sets = torch.where(pred[:, None] >= 0, anc[pred.clamp_min(0)], torch.zeros_like(anc[:1]))
        true_sets = anc[target]
        self.overlap += (pred_sets & true_sets).sum()
        self.predicted += pred_sets.sum()
        self.true += true_sets.sum()
        self.exact += (pred == target).sum()
        self.count += len(target)

    def compute(self) -> dict[str, torch.Tensor]:
        hp = self.overlap / self.predicted.clamp_min(1)
        hr = self.overlap / self.true.clamp_min(1)
        return {
            "acc": self.exact / self.count.clamp_min(1),
            "hprecision": hp,
            "hrecall": hr,
            "hf1": 2 * hp * hr / (hp + hr).clamp_min(1e-12),
        }


def task_metrics(space: LabelSpace) -> MetricCollection:
    """The metrics logged for train and val every epoch (decisions at threshold 0.5)."""
    n = len(space.classes)
    if space.task == "binary":
        return MetricCollection(
            {
                "acc": BinaryAccuracy(),
                "precision": BinaryPrecision(),
                "recall": BinaryRecall(),
                "f1": BinaryF1Score(),
                "auroc": BinaryAUROC(),
            }
        )
    if space.task == "multilabel":
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
    if space.task == "hierarchical":
        return MetricCollection({"h": HierarchicalF1(space)})
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes=n, average="macro"),
            "recall_macro": MulticlassRecall(num_classes=n, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
        }
    )


def class_weights(space: LabelSpace, targets: np.ndarray) -> list[float]:
    """Balanced loss weights from the training targets (``task.class_weights: balanced``).

    binary: the BCE ``pos_weight`` (negatives / positives); multilabel: one ``pos_weight`` per
    label; multiclass: ``N / (C * n_c)`` per class; hierarchical: per leaf, from the images
    whose label is that leaf (inner-node labels do not count).
    """
    if space.task == "binary":
        pos = max(int(targets.sum()), 1)
        return [float((len(targets) - pos) / pos)]
    if space.task == "multilabel":
        pos = np.maximum(targets.sum(axis=0), 1).astype(np.float64)
        return ((len(targets) - pos) / pos).clip(0.1, 100.0).tolist()
    if space.task == "hierarchical":
        leaf_of_node = {space.nodes.index(leaf): j for j, leaf in enumerate(space.classes)}
        counts = np.bincount([leaf_of_node[t] for t in targets if t in leaf_of_node], minlength=len(space.classes))
    else:
        counts = np.bincount(targets, minlength=len(space.classes))
    counts = np.maximum(counts, 1).astype(np.float64)
    return (counts.sum() / (len(counts) * counts)).tolist()


class TaskLoss(torch.nn.Module):
    """The loss of a task: CE (multiclass), BCE (binary, multilabel), or the negative log of
    the target node's probability (hierarchical: the sum of its leaves' softmax)."""

    def __init__(self, space: LabelSpace, label_smoothing: float = 0.0, weights: list[float] | None = None):
        super().__init__()
        self.task = space.task
        self.label_smoothing = label_smoothing
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) if weights else torch.empty(0))
        if self.task == "hierarchical":
            self.register_buffer("membership", torch.from_numpy(space.membership()))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        weights = self.weights if self.weights.numel() else None
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), pos_weight=weights)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=weights)
        if self.task == "hierarchical":
            logp = F.log_softmax(logits, dim=1)
            node_logp = logp.masked_fill(~self.membership[target], float("-inf")).logsumexp(dim=1)
            if weights is not None:
                leaf_w = (self.membership[target].float() * weights).sum(1) / self.membership[target].sum(1)
                return -(node_logp * leaf_w).sum() / leaf_w.sum()
            return -node_logp.mean()
        # Class-probability targets (mixup/cutmix) come already smoothed.
        smoothing = 0.0 if target.is_floating_point() else self.label_smoothing
        return F.cross_entropy(logits, target, weight=weights, label_smoothing=smoothing)


def to_probabilities(logits: torch.Tensor, space: LabelSpace, membership: torch.Tensor | None = None) -> torch.Tensor:
    """Torch counterpart of :func:`taxonomist.tasks.decide.probabilities` (for metrics)."""
    logits = logits.float()
    if space.task == "binary":
        return torch.sigmoid(logits[:, 0])
    if space.task == "multilabel":
        return torch.sigmoid(logits)
    probs = torch.softmax(logits, dim=1)
    if space.task == "hierarchical" and membership is not None:
        return probs @ membership.T.float()
    return probs
