"""What evaluate writes: the :class:`Evaluation` a task returns, and the files and plots made of it.

A task's :meth:`~taxonomist.tasks.base.Task.evaluate` fills an :class:`Evaluation` (metrics, a
per-class table, predictions, confusion matrices, curves, the worst mistakes);
:func:`write_reports` writes its tables and plots under ``reports/eval/``. The small helpers
here are the arithmetic several tasks share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.files import atomic_write_text

NONE = "(none)"  # the predicted column of "no answer" (a path stopped above the first level)


@dataclass
class Evaluation:
    """Everything evaluate writes: metrics, tables, confusion matrices and curves."""

    metrics: dict[str, float]
    per_class: pd.DataFrame  # columns: class, precision, recall, f1, support (+ task extras)
    predictions: pd.DataFrame  # columns: actual, predicted, confidence (+ task extras)
    confusions: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)  # name -> (matrix, names)
    curves: dict[str, pd.DataFrame] = field(default_factory=dict)
    mistakes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # worst first


def rounded(values: dict[str, object]) -> dict[str, float]:
    """Metric values as floats rounded to 6 decimals."""
    return {k: round(float(v), 6) for k, v in values.items()}


def prf(tp: np.ndarray, n_pred: np.ndarray, n_true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from true positives, predicted and true counts (0 where undefined)."""
    precision = tp / np.maximum(n_pred, 1)
    recall = tp / np.maximum(n_true, 1)
    f1 = 2 * tp / np.maximum(n_pred + n_true, 1)
    return precision, recall, f1


def worst_first(wrong: np.ndarray, badness: np.ndarray, kind: str = "quicksort") -> np.ndarray:
    """The indices ``wrong`` ordered by decreasing ``badness`` (their confidence, or error count)."""
    return wrong[np.argsort(-badness[wrong], kind=kind)]


def write_reports(
    result: Evaluation, images: np.ndarray, out_dir: Path, examples: int = 36, history: Path | None = None
) -> None:
    """Write the tables, confusion matrices, curves and plots of an evaluation (and the
    training curves of ``history``, a per-epoch CSV, when it exists)."""
    from taxonomist.evaluation import plots  # matplotlib: not for the served model, which imports the tasks

    atomic_write_text(out_dir / "per_class.csv", result.per_class.to_csv(index=False))
    atomic_write_text(out_dir / "predictions.csv", result.predictions.to_csv(index=False))
    for name, (matrix, names) in result.confusions.items():
        rows = names[: matrix.shape[0]]
        frame = pd.DataFrame(matrix, index=rows, columns=names[: matrix.shape[1]])
        atomic_write_text(out_dir / f"{name}.csv", frame.to_csv(index_label="true\\predicted"))
        plots.plot_confusion(matrix, rows, out_dir / f"{name}.png", columns=names[: matrix.shape[1]])
    for name, frame in result.curves.items():
        atomic_write_text(out_dir / f"{name}.csv", frame.to_csv(index=False))
    if "pr_curve" in result.curves:
        plots.plot_curves(result.curves["pr_curve"], result.curves["roc_curve"], out_dir / "pr_roc_curves.png")
    plots.plot_per_class(result.per_class, out_dir / "per_class.png")
    shown = result.mistakes[:examples]
    plots.plot_misclassified(
        np.asarray(images[shown]) if len(shown) else np.zeros((0, 1, 1, 1), np.uint8),
        [str(result.predictions["actual"].iloc[i]) for i in shown],
        [str(result.predictions["predicted"].iloc[i]) for i in shown],
        [
            float(result.predictions["confidence"].iloc[i]) if "confidence" in result.predictions else None
            for i in shown
        ],
        out_dir / "misclassified.png",
    )
    if history is not None and history.is_file():
        plots.plot_history(pd.read_csv(history), out_dir / "training_curves.png")
