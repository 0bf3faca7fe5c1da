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


# ---------------------------------------------------------------------- ordinal (CORAL)


class CoralHead(torch.nn.Module):
    """CORAL (Cao, Mirjalili & Raschka 2020, "Rank consistent ordinal regression"): a backbone
    with one output, the shared score ``s``, plus ``K - 1`` learnable biases; the logits are
    ``s + b_k`` (shape (N, K-1)), logit ``k`` being that of ``P(y > k)``.

    The biases start at the logits of a uniform class distribution, ``P(y > k) = (K-1-k) / K``
    (descending, so ``P(y > k)`` falls with ``k`` from the first step). The forward pass is a
    slice and an add, so torch.onnx exports it as it is.
    """

    def __init__(self, backbone: torch.nn.Module, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"CORAL needs at least 2 classes, got {num_classes}")
        self.backbone = backbone
        above = torch.arange(num_classes - 1, 0, -1, dtype=torch.float32) / num_classes
        self.bias = torch.nn.Parameter(torch.log(above / (1.0 - above)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.backbone(x)[:, :1]  # (N, 1)
        return score + self.bias


def coral_levels(target: torch.Tensor, thresholds: int) -> torch.Tensor:
    """The binary CORAL targets ``[y > k]`` for ``k = 0 .. thresholds-1``: (N, thresholds) float."""
    ks = torch.arange(thresholds, device=target.device)
    return (target.long().unsqueeze(1) > ks).float()


class CoralLoss(WeightedLoss):
    """The CORAL loss: the sum over the ``K - 1`` thresholds of the BCE between logit ``k`` and
    ``[y > k]``, averaged over the batch (as in the paper and ``coral_pytorch``). ``weights``
    are per class (:meth:`Task.class_weights`): an image counts with the weight of its class and
    the batch mean is weighted, as cross-entropy's ``weight`` does."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        levels = coral_levels(target, logits.shape[1])
        per_image = F.binary_cross_entropy_with_logits(logits, levels, reduction="none").sum(dim=1)
        weights = self.weight
        if weights is None:
            return per_image.mean()
        w = weights[target.long()]
        return (per_image * w).sum() / w.sum()


def coral_rank(logits: torch.Tensor) -> torch.Tensor:
    """Decided class indices from CORAL logits: the number of thresholds ``k`` with
    ``P(y > k) > 0.5``, the cumulative probabilities made non-increasing first (a running
    minimum, as :meth:`OrdinalTask.probabilities` does), i.e. the median of the distribution."""
    above = torch.sigmoid(logits.float())
    above = torch.cummin(above, dim=1).values
    return (above > 0.5).sum(dim=1)


def ordinal_metrics(n: int) -> MetricCollection:
    """Accuracy, mean absolute error in classes, quadratic weighted kappa and macro F1 over ``n``
    ordered classes, updated with decided class indices."""
    from torchmetrics.classification import MulticlassCohenKappa
    from torchmetrics.regression import MeanAbsoluteError

    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=n, average="micro"),
            "mae": MeanAbsoluteError(),
            "qwk": MulticlassCohenKappa(num_classes=n, weights="quadratic"),
            "f1_macro": MulticlassF1Score(num_classes=n, average="macro"),
        }
    )


# ---------------------------------------------------------------------- multiattribute
# One attribute's place in the outputs and targets: (name, (first, end) output column,
# (first, end) target column, single-answer). A single-answer attribute has one target column
# holding its value's index, -1 when unanswered (task.allow_empty); a multi-label one a 0/1
# column per label. The datamodule hands 2-D targets over as float32: slices are cast back here.
AttributeLayout = tuple[str, tuple[int, int], tuple[int, int], bool]
MetricInputs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def attribute_slice(
    logits: torch.Tensor, target: torch.Tensor, layout: AttributeLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attribute's logits and its targets in its sub-task's form (single-answer: 1-D long
    class indices; multi-label: long 0/1 matrix), without its unanswered rows."""
    _, (o0, o1), (t0, t1), single = layout
    part_logits, part_target = logits[:, o0:o1], target[:, t0:t1].long()
    if not single:
        return part_logits, part_target
    part_target = part_target[:, 0]
    keep = part_target >= 0
    if bool(keep.all()):
        return part_logits, part_target
    return part_logits[keep], part_target[keep]


def _module_keys(names: list[str]) -> list[str]:
    """ModuleDict keys for attribute names (which may hold ``.``; kept unique)."""
    keys: list[str] = []
    for name in names:
        key = name.replace(".", "_") or "_"
        while key in keys:
            key += "_"
        keys.append(key)
    return keys


class PerAttributeLoss(torch.nn.Module):
    """Multi-attribute loss: the MEAN over the attributes of each attribute's own loss (its
    sub-task's: cross-entropy, BCE, ...) on its output and target columns. An attribute with no
    answered row in the batch adds 0 (and keeps the graph)."""

    def __init__(self, losses: dict[str, torch.nn.Module], layout: list[AttributeLayout]):
        super().__init__()
        self.layout = list(layout)
        self.keys = _module_keys([name for name, *_ in self.layout])
        self.losses = torch.nn.ModuleDict(
            {key: losses[name] for key, (name, *_) in zip(self.keys, self.layout, strict=True)}
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        for key, layout in zip(self.keys, self.layout, strict=True):
            part_logits, part_target = attribute_slice(logits, target, layout)
            if len(part_target) == 0:
                total = total + part_logits.float().sum() * 0.0
            else:
                total = total + self.losses[key](part_logits, part_target)
        return total / max(len(self.layout), 1)


class PerAttributeMetrics(Metric):
    """Multi-attribute metrics: each attribute's sub-task metrics on its slice, as
    ``<attribute>/<metric>``, plus summaries (each the mean over the attributes of one metric
    per attribute: ``summaries`` maps a summary name to those per-attribute metric names).

    ``update(logits, target)`` takes the whole logits and targets; each attribute's slice goes
    through its sub-task's ``metric_inputs`` (``inputs``) into its collection.
    """

    full_state_update = False

    def __init__(
        self,
        layout: list[AttributeLayout],
        inputs: list[MetricInputs],
        collections: list[MetricCollection],
        summaries: dict[str, list[str]],
    ):
        super().__init__()
        self.layout, self.inputs, self.summaries = list(layout), list(inputs), dict(summaries)
        self.names = [name for name, *_ in self.layout]
        self.parts = torch.nn.ModuleDict(dict(zip(_module_keys(self.names), collections, strict=True)))

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        for layout, inputs, collection in zip(self.layout, self.inputs, self.parts.values(), strict=True):
            part_logits, part_target = attribute_slice(logits, target, layout)
            if len(part_target):
                collection.update(*inputs(part_logits, part_target))

    def compute(self) -> dict[str, torch.Tensor]:
        values = {name: collection.compute() for name, collection in zip(self.names, self.parts.values(), strict=True)}
        out = {
            summary: torch.stack([values[name][key].float() for name, key in zip(self.names, keys, strict=True)]).mean()
            for summary, keys in self.summaries.items()
        }
        out.update({f"{name}/{key}": value for name, part in values.items() for key, value in part.items()})
        return out

    def reset(self) -> None:
        super().reset()
        for collection in self.parts.values():
            collection.reset()
