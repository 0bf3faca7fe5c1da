"""Calibration and conformal sets, fitted on the validation split by the evaluate stage.

:func:`fit_calibration` minimises the task's own training loss (its negative log-likelihood,
without label smoothing or class weights) over the calibration parameters the task names
(:meth:`Task.calibration_groups`: a temperature per softmax, Platt's scale and bias per
sigmoid) with L-BFGS on the validation logits; the network is not touched. Temperature
scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") and Platt scaling are
the standard post-hoc fixes, one or two numbers per output group, so a few hundred validation
images are enough. :func:`calibration_report` measures the expected calibration error
(torchmetrics, 15 bins, top option of each question) before and after, and draws the
reliability diagram; :func:`conformal_thresholds` fits the split-conformal thresholds (see
:mod:`taxonomist.tasks.uncertainty`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from taxonomist.tasks import Decision, Task
from taxonomist.tasks.uncertainty import (
    conformal_summary,
    conformal_threshold,
    reliability_bins,
    top_label,
)

log = logging.getLogger(__name__)
CALIBRATION_MODES = ("auto", "none")
MIN_IMAGES = 20  # fewer validation images: no calibration (the fit would chase noise)
BINS = 15


def fit_calibration(task: Task, logits: np.ndarray, target: np.ndarray) -> tuple[list[float], list[float]]:
    """Per output column: the ``scale`` and ``bias`` that minimise the task's loss on
    validation ``logits`` and ``target`` (see the module docstring). Identity (all ones and
    zeros) when there are fewer than :data:`MIN_IMAGES` images or the fit does not lower the loss."""
    import torch

    n_out = task.num_outputs
    identity = ([1.0] * n_out, [0.0] * n_out)
    if len(logits) < MIN_IMAGES:
        log.warning(
            "calibration: %d validation images, fewer than %d: scores stay uncalibrated", len(logits), MIN_IMAGES
        )
        return identity
    groups = task.calibration_groups()
    column_group = np.zeros(n_out, dtype=np.int64)
    for g, (columns, _) in enumerate(groups):
        column_group[columns] = g
    has_bias = torch.tensor([kind == "platt" for _, kind in groups], dtype=torch.float64)
    index = torch.from_numpy(column_group)
    x = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    t = torch.as_tensor(np.asarray(target))
    loss_fn = task.loss(0.0, None)
    log_scale = torch.zeros(len(groups), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(groups), dtype=torch.float64, requires_grad=True)

    def loss_of(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return loss_fn((x * scale[index] + (shift * has_bias)[index]).float(), t).double()

    with torch.enable_grad():
        before = float(loss_of(torch.ones(len(groups), dtype=torch.float64), torch.zeros(len(groups))))
        optimizer = torch.optim.LBFGS([log_scale, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = loss_of(log_scale.exp(), bias)
            loss.backward()
            return loss

        optimizer.step(closure)
        after = float(loss_of(log_scale.exp(), bias).detach())
    if not np.isfinite(after) or after > before:
        log.warning("calibration: the fit did not lower the validation loss (%.4f -> %.4f): left out", before, after)
        return identity
    scale = log_scale.detach().exp()[index].tolist()
    shift = (bias.detach() * has_bias)[index].tolist()
    log.info("calibration: validation NLL %.4f -> %.4f", before, after)
    return scale, shift


def conformal_thresholds(task: Task, probs: np.ndarray, target: np.ndarray, coverage: float) -> list[float]:
    """``qhat`` of each of the task's questions from calibrated validation probabilities."""
    questions, targets = task.questions(probs), task.question_targets(target)
    return [conformal_threshold(q.probs, t, coverage) for q, t in zip(questions, targets, strict=True)]


def expected_calibration_error(conf: np.ndarray, right: np.ndarray) -> float:
    """torchmetrics' binary (``l1``, 15 bins) calibration error of top-option confidences."""
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    if len(conf) == 0:
        return float("nan")
    value = binary_calibration_error(
        torch.as_tensor(conf, dtype=torch.float64), torch.as_tensor(right, dtype=torch.long), n_bins=BINS
    )
    return round(float(value), 6)


def calibration_report(
    task: Task, raw_probs: np.ndarray, probs: np.ndarray, target: np.ndarray, decision: Decision, out_dir: Path
) -> dict[str, float]:
    """Test metrics of calibration and conformal sets, ``calibration.csv`` (``dvc plots``) and
    ``reliability.png`` in ``out_dir``. ``raw_probs``: uncalibrated, ``probs``: calibrated."""
    targets = task.question_targets(target)
    raw_conf, raw_right = top_label(task.questions(raw_probs), targets)
    conf, right = top_label(task.questions(probs), targets)
    metrics = {
        "ece_uncalibrated": expected_calibration_error(raw_conf, raw_right),
        "ece": expected_calibration_error(conf, right),
    }
    if decision.qhat:
        summary = conformal_summary(task.questions(probs), targets, decision.qhat)
        metrics |= {k: round(v, 6) for k, v in summary.items()}
    frame = reliability_frame(raw_conf, raw_right, conf, right)
    frame.to_csv(out_dir / "calibration.csv", index=False)
    plot_reliability(frame, metrics, out_dir / "reliability.png")
    return metrics


def reliability_frame(raw_conf: np.ndarray, raw_right: np.ndarray, conf: np.ndarray, right: np.ndarray) -> pd.DataFrame:
    """One row per confidence bin: its centre, the accuracy of the uncalibrated and of the
    calibrated top options in it (empty bins are dropped per curve: NaN) and the image counts."""
    centre = (np.arange(BINS) + 0.5) / BINS
    _, raw_acc, raw_n = reliability_bins(raw_conf, raw_right, BINS)
    _, acc, n = reliability_bins(conf, right, BINS)
    return pd.DataFrame(
        {
            "confidence": centre.round(4),
            "uncalibrated": np.round(raw_acc, 6),
            "calibrated": np.round(acc, 6),
            "ideal": centre.round(4),
            "images_uncalibrated": raw_n.astype(int),
            "images_calibrated": n.astype(int),
        }
    )


def plot_reliability(frame: pd.DataFrame, metrics: dict[str, float], path: Path) -> Path:
    """The reliability diagram: accuracy against confidence per bin, before and after calibration."""
    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    ece_raw, ece = metrics["ece_uncalibrated"], metrics["ece"]
    ax.plot(frame.confidence, frame.uncalibrated, "o-", color="tab:red", label=f"uncalibrated (ECE {ece_raw:.3f})")
    ax.plot(frame.confidence, frame.calibrated, "s-", color="tab:blue", label=f"calibrated (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title="Reliability (test)")
    ax.legend(loc="upper left", fontsize=8)
    width = 1.0 / BINS
    hist.bar(frame.confidence - width / 4, frame.images_uncalibrated, width / 2, color="tab:red", alpha=0.6)
    hist.bar(frame.confidence + width / 4, frame.images_calibrated, width / 2, color="tab:blue", alpha=0.6)
    hist.set(xlabel="confidence of the top option", ylabel="images", yscale="log")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
