"""Multi-label: any set of labels per image; a sigmoid and a threshold per label.

Targets are multi-hot rows over the labels. Thresholds are tuned per label on the validation
split (``task.threshold``). ``data.max_labels=N`` keeps the N most frequent labels; images
left without labels are dropped, or kept as negatives with ``task.allow_empty=true``. The
split is stratified by each image's rarest label. Test metrics: micro and macro
precision/recall/F1, subset accuracy, Hamming loss, macro average precision; a per-label table.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pandas as pd

from taxonomist.data.manifest import LABEL_SEP, Record, split_labels
from taxonomist.data.split import require_min_images
from taxonomist.errors import DataError, Problems
from taxonomist.evaluation.report import Evaluation, prf, rounded, worst_first
from taxonomist.tasks.base import Decision, Task, separator, sigmoid, tune_threshold, with_prob_columns
from taxonomist.tasks.registry import register

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torchmetrics import MetricCollection

    from taxonomist.tasks.uncertainty import Question

log = logging.getLogger(__name__)


@register
class MultilabelTask(Task):
    """A sigmoid per label; label ``j`` is on when ``p_j >= thresholds[j]``."""

    name = "multilabel"
    label_form = "set"
    keys = ("class_weights", "allow_empty")
    primary_val = "val/ap_macro"  # threshold-free: thresholds are tuned after training
    primary_test = "test/f1_macro"
    headline = "val/subset_acc"
    curves = ("train/f1_macro", "val/f1_macro", "val/ap_macro", "val/subset_acc")
    confusion_plot = None
    predictions_confusion = False  # predictions are label sets: no confusion matrix
    unit: ClassVar[str] = "label"
    calibration = "platt"
    output_text = (
        "`labels` (the list of labels whose probability reaches their threshold) and one "
        "`prob_<label>` column per label"
    )

    @classmethod
    def check_records(cls, records: list[Record], cfg: DictConfig) -> list[Record]:
        """Labels sorted and unique; empty rows only with ``task.allow_empty``; ``data.max_labels``
        keeps the most frequent labels (rows left with none are dropped unless empty rows are allowed)."""
        allow_empty = bool(cfg.task.allow_empty)
        if not allow_empty:
            problems = Problems()
            problems.add(
                "multi-label images have no labels (set task.allow_empty=true if they are negatives)",
                [f"{r.source_id}: no labels" for r in records if not r.labels],
            )
            problems.raise_if_any()
        records = [replace(r, labels=tuple(sorted(set(r.labels)))) for r in records]
        max_labels = int(cfg.data.max_labels)
        if max_labels > 0:
            freq = Counter(lbl for r in records for lbl in r.labels)
            keep = {lbl for lbl, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:max_labels]}
            filtered = [replace(r, labels=tuple(lbl for lbl in r.labels if lbl in keep)) for r in records]
            emptied = sum(1 for old, new in zip(records, filtered, strict=True) if old.labels and not new.labels)
            if not allow_empty:
                filtered = [r for r in filtered if r.labels]
            log.info(
                "data.max_labels=%d: kept %d of %d labels; %d images lost all their labels (%s)",
                max_labels,
                len(keep),
                len(freq),
                emptied,
                "kept as negatives" if allow_empty else "dropped",
            )
            records = filtered
        if len({lbl for r in records for lbl in r.labels}) < 2:
            raise DataError("multi-label classification needs at least 2 labels in the data")
        return records

    @classmethod
    def strata(cls, label_cells: pd.Series, min_images_per_class: int) -> pd.Series:
        """The rarest label of each image (images without labels form their own stratum; strata
        too small to split join the largest one). Every label needs ``min_images_per_class`` images."""
        lists = label_cells.map(split_labels)
        freq = lists.explode().value_counts()
        require_min_images(freq, min_images_per_class, "label(s)", "lower data.max_labels or remove the label")
        rarest = lists.map(lambda labels: min(labels, key=lambda lbl: (freq[lbl], lbl)) if labels else "(no label)")
        sizes = rarest.value_counts()
        tiny = set(sizes[sizes < 3].index)
        return rarest.where(~rarest.isin(tiny), sizes.index[0])

    def size_text(self) -> str:
        return f"{len(self.classes)} labels"

    def encode(self, label_cells: Iterable[str]) -> np.ndarray:
        """A uint8 multi-hot matrix over the labels."""
        cells = list(label_cells)
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.zeros((len(cells), len(self.classes)), dtype=np.uint8)
        for row, cell in enumerate(cells):
            for label in split_labels(cell):
                if label not in index:
                    raise DataError(f"label {label!r} is not one of the model's labels")
                out[row, index[label]] = 1
        return out

    def loss(self, label_smoothing: float = 0.0, weights: list[float] | None = None) -> torch.nn.Module:
        from taxonomist.tasks.nn import BinaryCrossEntropy

        return BinaryCrossEntropy(weights)

    def metrics(self) -> MetricCollection:
        from taxonomist.tasks.nn import multilabel_metrics

        return multilabel_metrics(len(self.classes))

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.torch_probabilities(logits), target.long()

    def torch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.sigmoid(logits.float())

    def class_weights(self, targets: np.ndarray) -> list[float]:
        """One BCE ``pos_weight`` per label: negatives / positives, clipped to [0.1, 100]."""
        pos = np.maximum(targets.sum(axis=0), 1).astype(np.float64)
        return ((len(targets) - pos) / pos).clip(0.1, 100.0).tolist()

    def sample_weights(self, targets: np.ndarray) -> np.ndarray:
        raise DataError("task.balanced_sampling needs a single-label task, not multilabel")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits)

    def tune(self, probs: np.ndarray, target: np.ndarray, task_cfg: DictConfig) -> Decision:
        th = task_cfg.threshold
        return Decision(
            [tune_threshold(probs[:, j], target[:, j], str(th.mode), float(th.value)) for j in range(probs.shape[1])],
            separator(task_cfg),
        )

    def decide(self, probs: np.ndarray, decision: Decision) -> np.ndarray:
        """A bool matrix: label ``j`` on where ``p_j >= thresholds[j]``."""
        return probs >= np.asarray(decision.thresholds, dtype=np.float64)[None, :]

    def questions(self, probs: np.ndarray) -> list[Question]:
        """A yes/no question per label; ``plausible`` lists the labels that may apply."""
        from taxonomist.tasks.uncertainty import yes_no

        probs = np.asarray(probs, dtype=np.float64)
        return [yes_no(label, probs[:, j]) for j, label in enumerate(self.classes)]

    def question_targets(self, target: np.ndarray) -> list[np.ndarray]:
        """Per label: 1 when the image has it, else 0."""
        target = np.asarray(target, dtype=np.int64)
        return [target[:, j] for j in range(len(self.classes))]

    def decision_text(self, decision: Decision) -> str:
        th = decision.thresholds
        return f"per-label thresholds tuned on the validation split ({min(th):.3f} to {max(th):.3f})"

    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Multi-label metrics at the tuned per-label thresholds."""
        import torch
        from torchmetrics.functional.classification import (
            multilabel_average_precision,
            multilabel_exact_match,
            multilabel_f1_score,
            multilabel_hamming_distance,
            multilabel_precision,
            multilabel_recall,
        )

        n = len(self.classes)
        pred = self.decide(probs, decision)
        p_int, t = torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(target.astype(np.int64))
        metrics = rounded(
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
        precision, recall, f1 = prf(tp, pred.sum(0), target.sum(0))
        ap = multilabel_average_precision(torch.from_numpy(probs).float(), t, n, average=None).numpy()
        table = pd.DataFrame(
            {
                "class": self.classes,
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
        names = np.asarray(self.classes)
        predictions = pd.DataFrame(
            {
                "actual": [LABEL_SEP.join(names[row == 1]) for row in target],
                "predicted": [LABEL_SEP.join(names[row]) for row in pred],
                "wrong_labels": errors,
            }
        )
        mistakes = worst_first(np.flatnonzero(errors > 0), errors, kind="stable")
        return Evaluation(metrics, table, predictions, {}, {}, mistakes)

    def answer(self, probs: np.ndarray, decision: Decision) -> pd.DataFrame:
        """``labels`` (a list) and one ``prob_<label>`` column per label."""
        picked = self.decide(probs, decision)
        labels = np.asarray(self.classes, dtype=object)
        frame = pd.DataFrame({"labels": [list(labels[row]) for row in picked]})
        return with_prob_columns(frame, self.classes, probs)

    def answer_text(self, row: pd.Series) -> str:
        labels = list(row["labels"])
        if not labels:
            return "(no label)"
        return ", ".join(f"{lbl} ({row[f'prob_{lbl}']:.2f})" for lbl in labels)


def _samples_mean(pred: np.ndarray, target: np.ndarray, kind: str) -> float:
    """Per-image precision or recall, averaged over the images (an empty set counts as 1 when
    both sets are empty, else 0)."""
    tp = (pred & (target == 1)).sum(1)
    denom = pred.sum(1) if kind == "precision" else (target == 1).sum(1)
    both_empty = (pred.sum(1) == 0) & (target.sum(1) == 0)
    return float(np.where(denom > 0, tp / np.maximum(denom, 1), both_empty.astype(float)).mean())
