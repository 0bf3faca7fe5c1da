"""Test-split evaluation of each task: summary metrics, a per-class table, predictions,
confusion matrices and curves, from probabilities and the tuned :class:`Decision`.

- binary: accuracy, precision, recall, F1 (at the tuned threshold), ROC-AUC, average precision,
  NLL, calibration error; PR and ROC curves; a 2x2 confusion matrix.
- multiclass: see :mod:`taxonomist.evaluation.metrics`.
- multilabel: micro and macro precision/recall/F1, subset accuracy, Hamming loss, macro
  average precision; a per-label table with the tuned thresholds.
- hierarchical: exact-node accuracy, hierarchical precision/recall/F1 (ancestor-augmented
  sets), accuracy and macro-F1 per level; a per-node table; a confusion matrix per level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
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
    multilabel_average_precision,
    multilabel_exact_match,
    multilabel_f1_score,
    multilabel_hamming_distance,
    multilabel_precision,
    multilabel_recall,
)

from taxonomist.data.manifest import LABEL_SEP
from taxonomist.evaluation.metrics import confusion, per_class_table, summary_metrics
from taxonomist.tasks.decide import Decision, decide, path_text
from taxonomist.tasks.labels import LabelSpace

NONE = "(none)"


@dataclass
class Evaluation:
    """Everything evaluate writes: metrics, tables, confusion matrices and curves."""

    metrics: dict[str, float]
    per_class: pd.DataFrame  # columns: class, precision, recall, f1, support (+ task extras)
    predictions: pd.DataFrame  # columns: actual, predicted, confidence (+ task extras)
    confusions: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)  # name -> (matrix, names)
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    mistakes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # worst first


def _rounded(values: dict[str, object]) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in values.items()}


def _prf(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    precision = tp / np.maximum(n_pred, 1)
    recall = tp / np.maximum(n_true, 1)
    f1 = 2 * tp / np.maximum(n_pred + n_true, 1)
    return precision, recall, f1


def evaluate_binary(probs: np.ndarray, target: np.ndarray, space: LabelSpace, decision: Decision) -> Evaluation:
    """Binary metrics at the tuned threshold, plus threshold-free ROC-AUC and average precision."""
    p, t = torch.from_numpy(probs).double(), torch.from_numpy(target).long()
    th = decision.thresholds[0]
    pred = decide(probs, space, decision)
    metrics = _rounded(
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
    table = per_class_table(torch.from_numpy(_onehot_like(pred, 2)), t, space.classes)
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
            "actual": [space.classes[i] for i in target],
            "predicted": [space.classes[i] for i in pred],
            "confidence": conf.round(5),
            f"prob_{space.positive}": probs.round(5),
        }
    )
    matrix = multiclass_confusion_matrix(torch.from_numpy(pred), t, 2).numpy()
    wrong = np.flatnonzero(pred != target)
    return Evaluation(
        metrics,
        table,
        predictions,
        {"confusion_matrix": (matrix, space.classes)},
        curves,
        wrong[np.argsort(-conf[wrong])],
    )


def _recall_of(pred: np.ndarray, target: np.ndarray, cls: int) -> float:
    """Recall of one class (specificity for class 0 of a binary task)."""
    return float(((pred == cls) & (target == cls)).sum() / max((target == cls).sum(), 1))


def _onehot_like(pred: np.ndarray, n: int) -> np.ndarray:
    """Decisions as one-hot scores, so per-class functions count exactly these decisions."""
    out = np.zeros((len(pred), n), dtype=np.float64)
    out[np.arange(len(pred)), pred] = 1.0
    return out


def evaluate_multiclass(probs: np.ndarray, target: np.ndarray, space: LabelSpace, decision: Decision) -> Evaluation:
    """Multi-class metrics (argmax decisions)."""
    p, t = torch.from_numpy(probs).float(), torch.from_numpy(target).long()
    pred = probs.argmax(1)
    conf = probs.max(1)
    predictions = pd.DataFrame(
        {
            "actual": [space.classes[i] for i in target],
            "predicted": [space.classes[i] for i in pred],
            "confidence": conf.round(5),
        }
    )
    wrong = np.flatnonzero(pred != target)
    return Evaluation(
        summary_metrics(p, t),
        per_class_table(p, t, space.classes),
        predictions,
        {"confusion_matrix": (confusion(p, t).numpy(), space.classes)},
        {},
        wrong[np.argsort(-conf[wrong])],
    )


def evaluate_multilabel(probs: np.ndarray, target: np.ndarray, space: LabelSpace, decision: Decision) -> Evaluation:
    """Multi-label metrics at the tuned per-label thresholds."""
    n = len(space.classes)
    pred = decide(probs, space, decision)
    p_int, t = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64))
    metrics = _rounded(
        {
            "subset_acc": multilabel_exact_match(p_int, t, n),
            "hamming_loss": multilabel_hamming_distance(p_int, t, n, average="micro"),
            "precision_micro": multilabel_precision(p_int, t, n, average="micro"),
            "recall_micro": multilabel_recall(p_int, t, n, average="micro"),
            "f1_micro": multilabel_f1_score(p_int, t, n, average="micro"),
            "precision_macro": multilabel_precision(p_int, t, n, average="macro"),
            "recall_macro": multilabel_recall(p_int, t, n, average="macro"),
            "f1_macro": multilabel_f1_score(p_int, t, n, average="macro"),
            "precision_samples": _samples_mean(pred, target, "precision"),
            "recall_samples": _samples_mean(pred, target, "recall"),
            "ap_macro": multilabel_average_precision(torch.from_numpy(probs).float(), t, n, average="macro"),
        }
    )
    tp = (pred & (target == 1)).sum(0)
    precision, recall, f1 = _prf(tp, pred.sum(0), target.sum(0))
    ap = multilabel_average_precision(torch.from_numpy(probs).float(), t, n, average=None).numpy()
    table = pd.DataFrame(
        {
            "class": space.classes,
            "precision": precision.round(6),
            "recall": recall.round(6),
            "f1": f1.round(6),
            "support": target.sum(0).astype(int),
            "predicted": pred.sum(0).astype(int),
            "threshold": np.round(decision.thresholds, 6),
            "average_precision": np.nan_to_num(ap).round(6),
        }
    )
    errors = (pred != (target == 1)).sum(1)
    predictions = pd.DataFrame(
        {
            "actual": [LABEL_SEP.join(np.asarray(space.classes)[row == 1]) for row in target],
            "predicted": [LABEL_SEP.join(np.asarray(space.classes)[row]) for row in pred],
            "wrong_labels": errors,
        }
    )
    mistakes = np.flatnonzero(errors > 0)
    return Evaluation(metrics, table, predictions, {}, {}, mistakes[np.argsort(-errors[mistakes], kind="stable")])


def _samples_mean(pred: np.ndarray, target: np.ndarray, kind: str) -> float:
    """Per-image precision or recall, averaged over the images (an empty set counts as 1 when
    both sets are empty, else 0)."""
    tp = (pred & (target == 1)).sum(1)
    denom = pred.sum(1) if kind == "precision" else (target == 1).sum(1)
    both_empty = (pred.sum(1) == 0) & (target.sum(1) == 0)
    return float(np.where(denom > 0, tp / np.maximum(denom, 1), both_empty.astype(float)).mean())


def evaluate_hierarchical(probs: np.ndarray, target: np.ndarray, space: LabelSpace, decision: Decision) -> Evaluation:
    """Hierarchical metrics: exact node, hP/hR/hF, and per level accuracy and macro-F1."""
    pred = decide(probs, space, decision)
    depths, anc = space.node_depths(), space.ancestor_matrix()
    pred_sets = np.where(pred[:, None] >= 0, anc[np.maximum(pred, 0)], False)
    true_sets = anc[target]
    overlap = (pred_sets & true_sets).sum()
    hp = overlap / max(pred_sets.sum(), 1)
    hr = overlap / max(true_sets.sum(), 1)
    metrics: dict[str, object] = {
        "acc": (pred == target).mean(),
        "hprecision": hp,
        "hrecall": hr,
        "hf1": 2 * hp * hr / max(hp + hr, 1e-12),
    }
    confusions: dict[str, tuple[np.ndarray, list[str]]] = {}
    for level in range(1, int(depths.max()) + 1):
        columns = np.flatnonzero(depths == level)
        names = [space.nodes[i] for i in columns]
        true_l, pred_l = _at_level(true_sets[:, columns]), _at_level(pred_sets[:, columns])
        has = true_l < len(names)  # images whose label reaches this level
        if not has.any():
            continue
        matrix = np.zeros((len(names), len(names) + 1), dtype=np.int64)
        np.add.at(matrix, (true_l[has], pred_l[has]), 1)
        tp = np.diag(matrix[:, : len(names)])
        _, _, f1 = _prf(tp, matrix[:, : len(names)].sum(0), matrix.sum(1))
        support = matrix.sum(1) > 0
        metrics[f"acc_level{level}"] = (true_l[has] == pred_l[has]).mean()
        metrics[f"f1_macro_level{level}"] = f1[support].mean()
        labels = [nm.rpartition("/")[2] for nm in names]
        confusions[f"confusion_level{level}"] = (matrix, [*labels, NONE])
    tp = (pred_sets & true_sets).sum(0)
    precision, recall, f1 = _prf(tp, pred_sets.sum(0), true_sets.sum(0))
    table = pd.DataFrame(
        {
            "class": space.nodes,
            "level": depths,
            "precision": precision.round(6),
            "recall": recall.round(6),
            "f1": f1.round(6),
            "support": true_sets.sum(0),
        }
    )
    conf = np.where(pred >= 0, probs[np.arange(len(pred)), np.maximum(pred, 0)], 0.0)
    sep = decision.path_separator
    predictions = pd.DataFrame(
        {
            "actual": [path_text(space, i, sep) for i in target],
            "predicted": [path_text(space, i, sep) or NONE for i in pred],
            "confidence": conf.round(5),
        }
    )
    wrong = np.flatnonzero(pred != target)
    return Evaluation(_rounded(metrics), table, predictions, confusions, {}, wrong[np.argsort(-conf[wrong])])


def _at_level(level_sets: np.ndarray) -> np.ndarray:
    """Per row, the position of its node among one level's nodes (a path has at most one per
    level), or the number of those nodes when the path does not reach the level."""
    return np.where(level_sets.any(axis=1), level_sets.argmax(axis=1), level_sets.shape[1])


EVALUATORS = {
    "binary": evaluate_binary,
    "multiclass": evaluate_multiclass,
    "multilabel": evaluate_multilabel,
    "hierarchical": evaluate_hierarchical,
}


def evaluate(probs: np.ndarray, target: np.ndarray, space: LabelSpace, decision: Decision) -> Evaluation:
    """The :class:`Evaluation` of the space's task."""
    return EVALUATORS[space.task](probs, target, space, decision)
