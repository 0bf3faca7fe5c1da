"""Ordinal: one label per image out of ordered classes (quality grades, severity levels, age
bands, skin tones); CORAL, the median of the predicted grade distribution.

Class order: ``task.order`` (the class names, low to high) when set, and then it must name
exactly the classes of the data; otherwise the natural order of the names, numbers compared
as numbers (``"2" < "10"``, ``"1-light" < "2-medium-light"``). ``labels.json`` stores the
classes in that order, and a class's 0-based position in it is its rank.

Model: CORAL (Cao, Mirjalili & Raschka 2020, "Rank consistent ordinal regression"). The
backbone has one output, a shared score ``s``; :class:`~taxonomist.tasks.nn.CoralHead` adds
``K - 1`` learnable biases, so the model returns ``K - 1`` logits ``s + b_k``, logit ``k``
being that of ``P(y > k)``. The loss is the sum over the thresholds of the BCE between logit
``k`` and ``[y > k]``; ``task.class_weights: balanced`` weights each image by the balanced
weight of its class (``N / (K * n_c)``). ``fit.label_smoothing`` does not apply (as for the
other sigmoid tasks, binary and multilabel).

Probabilities: ``P(y > k) = sigmoid(logit_k)``, made non-increasing in ``k`` by a running
minimum (the shared score keeps them ordered whenever the biases are; the running minimum is
the safety net for when they are not), then ``p_0 = 1 - P(y > 0)``,
``p_k = P(y > k-1) - P(y > k)``, ``p_{K-1} = P(y > K-2)``: non-negative and summing to 1 with no
clipping. Decision: CORAL's rule, the number of thresholds with ``P(y > k) > 0.5`` (the median
of the distribution, which is not always its most probable class); :meth:`OrdinalTask.decide`
recovers ``P(y > k) = 1 - cumsum(p)[k]`` from the class probabilities, so the served answer,
evaluation and the per-epoch metrics (:func:`~taxonomist.tasks.nn.coral_rank`) agree.

Classes: at least 2. With 2 classes CORAL is plain logistic regression and the decision a
fixed 0.5 threshold, so task=binary (a threshold tuned on the validation split) is the better
choice there; 3 or more is where the order carries information.

Test metrics: accuracy, mean absolute error in classes (``mae``), the mean signed error
(``mean_error``: > 0 grades too high), quadratic weighted kappa (``qwk``), the share within
one class (``off_by_one``), balanced accuracy, macro/weighted precision, recall and F1 of the
decided classes, the NLL of the distribution; a per-class table (with each true class's MAE),
a confusion matrix in class order, and predictions with the signed ``error``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from taxonomist.data.manifest import Record, split_labels
from taxonomist.errors import ConfigError, DataError
from taxonomist.evaluation.report import Evaluation, rounded
from taxonomist.tasks.base import Decision, Task, sigmoid, with_prob_columns
from taxonomist.tasks.registry import register

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torchmetrics import MetricCollection

log = logging.getLogger(__name__)

_CHUNKS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[tuple[int, int, str], ...], str]:
    """Sort key comparing the digit runs of ``name`` as numbers and the rest case-insensitively
    (``"2" < "10"``, ``"grade 9" < "Grade 10"``); the name itself breaks ties."""
    parts = tuple(
        (0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk.casefold()) for chunk in _CHUNKS.split(name) if chunk
    )
    return parts, name


def ordered_classes(seen: Iterable[str], order: Sequence[Any] | None) -> list[str]:
    """The classes ``seen`` in the data, low to high: ``order`` (``task.order``) when given,
    which must name exactly those classes (a :class:`DataError` lists the missing and extra
    ones), else their natural order (:func:`natural_key`)."""
    seen = sorted(set(seen))
    if order is None:
        return sorted(seen, key=natural_key)
    wanted = [str(c) for c in order]
    missing = [c for c in seen if c not in wanted]
    extra = [c for c in wanted if c not in seen]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the data has classes task.order does not list: {missing}")
        if extra:
            parts.append(f"task.order lists classes the data does not have: {extra}")
        raise DataError(f"task.order={wanted} must list every class of the data once; " + "; ".join(parts))
    return wanted


@register
class OrdinalTask(Task):
    """CORAL over ordered classes: ``K - 1`` logits of ``P(y > k)``; the answer is the median grade."""

    name = "ordinal"
    keys = ("class_weights", "balanced_sampling", "order")
    primary_val = "val/qwk"
    primary_test = "test/qwk"
    headline = "val/acc"
    curves = ("train/acc", "val/acc", "val/mae", "val/qwk")
    output_text = (
        "`label` (the predicted grade), `rank` (its 0-based position in the class order), `score` "
        "(that grade's probability) and one `prob_<class>` column per class"
    )

    # ------------------------------------------------------------------ config and data checks
    @classmethod
    def check_config(cls, task_cfg: DictConfig, cfg: DictConfig, origin: str) -> None:
        """The shared checks, and ``task.order``: null or a list of at least 2 distinct names."""
        super().check_config(task_cfg, cfg, origin)
        order = task_cfg.get("order")
        if order is None:
            return
        if isinstance(order, str) or not isinstance(order, Sequence):
            raise ConfigError(f"{origin}: task.order must be a list of the class names, low to high; got {order!r}")
        names = [str(c) for c in order]
        duplicated = sorted({c for c in names if names.count(c) > 1})
        if duplicated:
            raise ConfigError(f"{origin}: task.order lists {duplicated} more than once")
        if len(names) < 2:
            raise ConfigError(f"{origin}: task.order needs at least 2 classes, got {names}")

    @classmethod
    def check_records(cls, records: list[Record], cfg: DictConfig) -> list[Record]:
        """One label per image, at least two classes, and (with ``task.order``) exactly the ordered ones."""
        records = super().check_records(records, cfg)
        ordered_classes((r.labels[0] for r in records), cfg.task.get("order"))
        return records

    @classmethod
    def from_labels(cls, label_cells: Iterable[str], task_cfg: DictConfig | None = None) -> OrdinalTask:
        """The classes of the data in ``task.order``, or in natural order."""
        seen = {label for cell in label_cells for label in split_labels(cell)}
        if len(seen) < 2:
            raise DataError(f"task ordinal needs at least 2 classes, the data has {len(seen)}: {sorted(seen)}")
        order = task_cfg.get("order") if task_cfg is not None else None
        classes = ordered_classes(seen, order)
        if len(classes) == 2:
            log.warning("task ordinal with 2 classes is logistic regression at 0.5: task=binary tunes the threshold")
        log.info("ordinal classes, low to high: %s", " < ".join(classes))
        return cls(classes)

    # ------------------------------------------------------------------ label space
    @property
    def num_outputs(self) -> int:
        """``K - 1`` logits, those of ``P(y > k)``."""
        return len(self.classes) - 1

    @property
    def num_backbone_outputs(self) -> int:
        """One shared score; :meth:`wrap_model` adds the biases."""
        return 1

    def size_text(self) -> str:
        """E.g. ``5 ordered classes (1 < 2 < 3 < 4 < 5)``."""
        shown = self.classes if len(self.classes) <= 8 else [*self.classes[:3], "...", *self.classes[-2:]]
        return f"{len(self.classes)} ordered classes ({' < '.join(shown)})"

    # ------------------------------------------------------------------ training (torch)
    def wrap_model(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """The backbone's score plus ``K - 1`` CORAL biases (:class:`~taxonomist.tasks.nn.CoralHead`)."""
        from taxonomist.tasks.nn import CoralHead

        return CoralHead(backbone, len(self.classes))

    def loss(self, label_smoothing: float = 0.0, weights: list[float] | None = None) -> torch.nn.Module:
        """The CORAL loss; ``weights`` per class; ``label_smoothing`` does not apply."""
        from taxonomist.tasks.nn import CoralLoss

        return CoralLoss(weights)

    def metrics(self) -> MetricCollection:
        """Accuracy, MAE, QWK and macro F1 of the decided classes."""
        from taxonomist.tasks.nn import ordinal_metrics

        return ordinal_metrics(len(self.classes))

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decided class indices, targets)."""
        from taxonomist.tasks.nn import coral_rank

        return coral_rank(logits), target.long()

    def torch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Torch counterpart of :meth:`probabilities`."""
        import torch

        above = torch.cummin(torch.sigmoid(logits.float()), dim=1).values
        ones = torch.ones_like(above[:, :1])
        return torch.cat([ones, above], dim=1) - torch.cat([above, torch.zeros_like(ones)], dim=1)

    # ------------------------------------------------------------------ decisions (NumPy)
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class probabilities (N, K) from the ``K - 1`` CORAL logits (see the module docstring)."""
        logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), self.num_outputs)
        above = np.minimum.accumulate(sigmoid(logits), axis=1)  # P(y > k), non-increasing in k
        ones = np.ones((len(above), 1))
        return np.concatenate([ones, above], axis=1) - np.concatenate([above, np.zeros_like(ones)], axis=1)

    def decide(self, probs: np.ndarray, decision: Decision) -> np.ndarray:
        """CORAL's rule: the number of thresholds ``k`` with ``P(y > k) = 1 - cumsum(p)[k] > 0.5``
        (the median grade)."""
        probs = np.asarray(probs, dtype=np.float64)
        above = 1.0 - np.cumsum(probs, axis=1)[:, :-1]
        return (above > 0.5).sum(axis=1).astype(np.int64)

    def decision_text(self, decision: Decision) -> str:
        """The decision in words (model card)."""
        return "the median of the predicted grade distribution (CORAL: grades whose P(y > k) > 0.5 are counted)"

    # ------------------------------------------------------------------ evaluation and serving
    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Ordinal metrics (MAE, QWK, within one class) and the multi-class ones of the decided classes."""
        import torch
        from torchmetrics.functional.classification import multiclass_cohen_kappa, multiclass_confusion_matrix

        from taxonomist.evaluation.metrics import per_class_table, summary_metrics

        k = len(self.classes)
        probs = np.asarray(probs, dtype=np.float64)
        target = np.asarray(target, dtype=np.int64)
        pred = self.decide(probs, decision)
        rows = np.arange(len(pred))
        error = pred - target
        t, picked = torch.from_numpy(target), torch.from_numpy(pred)
        onehot = torch.from_numpy(np.eye(k)[pred])  # the per-class functions count exactly these decisions
        decided = summary_metrics(onehot, t)  # its nll, ece and top-5 are those of one-hot rows: not kept
        kept = ("acc", "balanced_acc", "precision_macro", "recall_macro", "f1_macro")
        kept += ("precision_weighted", "recall_weighted", "f1_weighted")
        metrics = {name: decided[name] for name in kept}
        metrics |= rounded(
            {
                "mae": np.abs(error).mean(),
                "mean_error": error.mean(),
                "qwk": multiclass_cohen_kappa(picked, t, k, weights="quadratic"),
                "off_by_one": (np.abs(error) <= 1).mean(),
                "nll": -np.log(np.clip(probs[rows, target], 1e-12, None)).mean(),
            }
        )
        table = per_class_table(onehot, t, self.classes)
        support = np.bincount(target, minlength=k)
        table["mae"] = (np.bincount(target, weights=np.abs(error), minlength=k) / np.maximum(support, 1)).round(6)
        conf = probs[rows, pred]
        predictions = pd.DataFrame(
            {
                "actual": [self.classes[i] for i in target],
                "predicted": [self.classes[i] for i in pred],
                "confidence": conf.round(5),
                "error": error,
            }
        )
        matrix = multiclass_confusion_matrix(picked, t, k).numpy()
        wrong = np.flatnonzero(error != 0)
        mistakes = wrong[np.lexsort((-conf[wrong], -np.abs(error[wrong])))]  # largest |error|, then most confident
        return Evaluation(metrics, table, predictions, {"confusion_matrix": (matrix, self.classes)}, {}, mistakes)

    def answer(self, probs: np.ndarray, decision: Decision) -> pd.DataFrame:
        """``label`` (the grade), ``rank`` (its 0-based index), ``score`` and ``prob_<class>`` columns."""
        picked = self.decide(probs, decision)
        rows = np.arange(len(probs))
        frame = pd.DataFrame(
            {
                "label": [self.classes[i] for i in picked],
                "rank": picked,
                "score": np.asarray(probs, dtype=np.float64)[rows, picked],
            }
        )
        return with_prob_columns(frame, self.classes, probs)

    def answer_text(self, row: pd.Series) -> str:
        """``label<TAB>score<TAB>(level r of K)``, ``r`` counted from 1."""
        return f"{row['label']}\t{row['score']:.4f}\t(level {int(row['rank']) + 1} of {len(self.classes)})"
