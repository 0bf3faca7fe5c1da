"""Multi-class: one label per image out of several; softmax, cross-entropy, the most probable class.

Test metrics: accuracy, macro/weighted precision, recall and F1, NLL, calibration error,
top-5 accuracy (with at least 5 classes), a confusion matrix.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd

from taxonomist.evaluation.report import Evaluation, worst_first
from taxonomist.tasks.base import Decision, Task
from taxonomist.tasks.registry import register


@register
class MulticlassTask(Task):
    """Softmax over the classes; the answer is the most probable class."""

    name = "multiclass"
    keys = ("class_weights", "balanced_sampling")
    primary_val = "val/f1_macro"
    primary_test = "test/f1_macro"
    curves = ("train/acc", "val/acc", "val/f1_macro")
    mixup: ClassVar[bool] = True
    output_text = "`label`, `score` and one `prob_<class>` column per class"

    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Multi-class metrics (argmax decisions)."""
        return evaluate_classes(probs, target, self.classes, probs.argmax(1))


def evaluate_classes(probs: np.ndarray, target: np.ndarray, classes: list[str], pred: np.ndarray) -> Evaluation:
    """The multi-class :class:`Evaluation` of class probabilities with decisions ``pred``."""
    import torch

    from taxonomist.evaluation.metrics import confusion, per_class_table, summary_metrics

    p, t = torch.from_numpy(probs).float(), torch.from_numpy(target).long()
    conf = probs[np.arange(len(pred)), pred]
    predictions = pd.DataFrame(
        {
            "actual": [classes[i] for i in target],
            "predicted": [classes[i] for i in pred],
            "confidence": conf.round(5),
        }
    )
    wrong = np.flatnonzero(pred != target)
    return Evaluation(
        summary_metrics(p, t),
        per_class_table(p, t, classes),
        predictions,
        {"confusion_matrix": (confusion(p, t).numpy(), classes)},
        {},
        worst_first(wrong, conf),
    )
