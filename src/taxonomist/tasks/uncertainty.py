"""Calibrated scores and "not sure" answers: what the evaluate stage fits and the served model applies.

**Calibration.** Evaluate fits a scale and a bias per logit on the validation split
(:mod:`taxonomist.evaluation.calibration`); probabilities are those of ``logits * scale + bias``.
How the scales are tied is the task's (:meth:`Task.calibration_groups`): temperature scaling
(one scale shared by a softmax, no bias: the most probable class never changes) for
multiclass, hierarchical and ordinal outputs; Platt scaling (a scale and a bias per sigmoid)
for binary and multi-label outputs; each attribute its own for multiattribute.

**Questions.** Every task's answer is one or more choices among options: multiclass, ordinal
and hierarchical (its leaves) one question over the classes; binary one over its two classes;
multi-label a yes/no question per label; multiattribute those of each attribute
(:meth:`Task.questions`). Calibration error and conformal sets are measured per question and
pooled.

**Conformal sets.** Split-conformal prediction with the LAC score ``1 - p(true option)``
(Sadinle, Lei and Wasserman 2019: the smallest sets on average): on the validation split, the
threshold ``qhat`` of each question is the ``ceil((n + 1) * coverage) / n`` quantile of the
scores; an option is plausible when ``p >= 1 - qhat``. On exchangeable data the set holds the
true option with probability at least ``coverage``. The served answer carries the plausible
options (``plausible``) and ``abstain``: true when a question's set is not exactly one option
(several are plausible, or none is: typical of an image unlike the training data). The
threshold is a quantile of scores, three lines of NumPy; a conformal library (MAPIE, crepes)
wants a scikit-learn estimator around the network and adds nothing here.

NumPy only: the served model imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAUSIBLE_COLUMN = "plausible"
ABSTAIN_COLUMN = "abstain"


@dataclass
class Question:
    """One choice the task's answer makes: ``probs`` (N, options) sum to 1 per row; ``shown``
    names each option in the ``plausible`` column (``None``: not listed, e.g. a label's "no")."""

    name: str
    options: list[str]
    probs: np.ndarray
    shown: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.probs = np.asarray(self.probs, dtype=np.float64).reshape(len(self.probs), len(self.options))
        if not self.shown:
            self.shown = list(self.options)

    def prefixed(self, prefix: str) -> Question:
        """The same question under ``prefix`` (an attribute's name)."""
        name = f"{prefix}: {self.name}" if self.name else prefix
        shown = [None if s is None else f"{prefix}: {s}" for s in self.shown]
        return Question(name, self.options, self.probs, shown)


def yes_no(name: str, p_yes: np.ndarray) -> Question:
    """A yes/no question (a label of a multi-label task) from the probability of yes."""
    p = np.asarray(p_yes, dtype=np.float64).reshape(-1)
    return Question(name, ["no", "yes"], np.stack([1.0 - p, p], axis=1), [None, name])


def calibrate(logits: np.ndarray, scale: Sequence[float], bias: Sequence[float]) -> np.ndarray:
    """``logits * scale + bias`` per output column; empty ``scale``/``bias`` leave the logits as they are."""
    out = np.asarray(logits, dtype=np.float64)
    if len(scale):
        out = out * np.asarray(scale, dtype=np.float64)
    if len(bias):
        out = out + np.asarray(bias, dtype=np.float64)
    return out


def conformal_threshold(probs: np.ndarray, target: np.ndarray, coverage: float) -> float:
    """``qhat`` of one question from validation probabilities and target option indices
    (negative: not answered, skipped). 1.0 (every option plausible) when there are too few
    answered images for the coverage (fewer than ``1 / (1 - coverage) - 1``)."""
    probs, target = np.asarray(probs, dtype=np.float64), np.asarray(target, dtype=np.int64)
    keep = target >= 0
    n = int(keep.sum())
    level = math.ceil((n + 1) * coverage) / max(n, 1)
    if n == 0 or level > 1.0:
        return 1.0
    scores = 1.0 - probs[keep, target[keep]]
    return float(np.quantile(scores, level, method="higher"))


def prediction_sets(probs: np.ndarray, qhat: float) -> np.ndarray:
    """Bool (N, options): the plausible options of each row (``p >= 1 - qhat``)."""
    return np.asarray(probs, dtype=np.float64) >= 1.0 - qhat - 1e-12


def uncertainty_columns(questions: Sequence[Question], qhat: Sequence[float]) -> tuple[list[list[str]], np.ndarray]:
    """Per row: the plausible options (their ``shown`` names) of every question, and whether
    to abstain (some question's set is not exactly one option)."""
    n = len(questions[0].probs) if questions else 0
    plausible: list[list[str]] = [[] for _ in range(n)]
    abstain = np.zeros(n, dtype=bool)
    for question, q in zip(questions, qhat, strict=True):
        sets = prediction_sets(question.probs, q)
        abstain |= sets.sum(axis=1) != 1
        for j, shown in enumerate(question.shown):
            if shown is not None:
                for row in np.flatnonzero(sets[:, j]):
                    plausible[row].append(shown)
    return plausible, abstain


def conformal_summary(questions: Sequence[Question], targets: Sequence[np.ndarray], qhat: Sequence[float]) -> dict:
    """Coverage (share of answered questions whose set holds the truth), mean set size, the
    share of images the model abstains on, and the accuracy of the answers it gives (left out
    when it abstains on every image)."""
    covered = sizes = 0.0
    count = 0
    n = len(questions[0].probs) if questions else 0
    abstain = np.zeros(n, dtype=bool)
    right = np.ones(n, dtype=bool)
    for question, target, q in zip(questions, targets, qhat, strict=True):
        target = np.asarray(target, dtype=np.int64)
        sets = prediction_sets(question.probs, q)
        keep = target >= 0
        covered += float(sets[keep, target[keep]].sum())
        sizes += float(sets[keep].sum())
        count += int(keep.sum())
        abstain |= sets.sum(axis=1) != 1
        right &= (question.probs.argmax(axis=1) == target) | ~keep
    answered = ~abstain
    out = {
        "conformal_coverage": covered / max(count, 1),
        "conformal_set_size": sizes / max(count, 1),
        "abstain_rate": float(abstain.mean()) if n else 0.0,
    }
    if answered.any():  # nothing answered: no accuracy to give
        out["answered_acc"] = float(right[answered].mean())
    return out


def top_label(questions: Sequence[Question], targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled over the questions' answered rows: the top option's probability and whether it is right."""
    conf, right = [], []
    for question, target in zip(questions, targets, strict=True):
        target = np.asarray(target, dtype=np.int64)
        keep = target >= 0
        conf.append(question.probs[keep].max(axis=1))
        right.append(question.probs[keep].argmax(axis=1) == target[keep])
    if not conf:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(conf), np.concatenate(right)


def reliability_bins(conf: np.ndarray, right: np.ndarray, bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (NaN in an empty bin).
    Their count-weighted mean gap is the expected calibration error (torchmetrics' ``l1`` ECE)."""
    conf, right = np.asarray(conf, dtype=np.float64), np.asarray(right, dtype=np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        accuracy = np.bincount(which, weights=right, minlength=bins) / count
    return mean_conf, accuracy, count


def unsure_text(row: Mapping[str, Any]) -> str:
    """The note ``taxonomist predict`` adds to an answer it abstains on: a tab and ``not sure,
    plausible: a | b`` (``none`` when no option is), else ""."""
    if not row.get(ABSTAIN_COLUMN):
        return ""
    plausible = list(row.get(PLAUSIBLE_COLUMN) or [])
    return "\tnot sure, plausible: " + (" | ".join(plausible) if plausible else "none")
