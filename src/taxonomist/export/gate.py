"""The champion gate: is a candidate better than the champion on the same test images?

Pure functions (no MLflow): :mod:`taxonomist.export.registry` runs both models on the
candidate's raw test images and hands their probabilities here. A candidate replaces the
champion only when

1. both have the same label space (:func:`label_space` of ``Task.to_dict()``);
2. the lower bound of the two-sided ``1 - alpha`` paired bootstrap percentile interval of
   (candidate metric - champion metric) is above 0: the test images are resampled with
   replacement, and each resample scores both models on the same images;
3. no class's F1 is lower than the champion's by more than ``class_tolerance``.

The exact McNemar p-value of the per-image correctness (the decided answer equals the
target; a multi-column target: every column) is reported alongside, as information.

The bootstrap scores a resample from the decided answers with vectorised counting
(:data:`FAST_METRICS`; single-label answers: accuracy, balanced accuracy, macro precision,
recall and F1, weighted F1, binary F1, quadratic weighted kappa; label sets: macro and micro
F1, subset accuracy), about a second for 1000 resamples of 10,000 images, and only where that
reproduces the task's own :meth:`~taxonomist.tasks.base.Task.evaluate` on the whole test set
and on the first resample. Any other metric (NLL, hierarchical F1, ...) is computed with
``Task.evaluate`` per resample: exact, but 20-50 ms a call on 10,000 images, a minute or more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from taxonomist.evaluation.report import Evaluation
from taxonomist.tasks.base import Decision, Task, prob_column

log = logging.getLogger(__name__)
PROMOTED, REFUSED = "promoted", "refused"
CHUNK = 1_000_000  # resampled image indices held in memory at once
AGREEMENT = 1e-6  # a vectorised metric must match Task.evaluate (rounded to 6 decimals) this closely
NAMES_SHOWN = 3  # class names a label-space description lists


@dataclass(frozen=True)
class GateSettings:
    """``package.gate`` and the seed of the bootstrap."""

    alpha: float = 0.05
    bootstrap: int = 1000
    class_tolerance: float = 0.02
    seed: int = 0


@dataclass
class Scored:
    """One model's answers on the gate's test images."""

    probs: np.ndarray  # as Task.probabilities gives them
    decision: Decision
    pred: np.ndarray  # Task.decide
    evaluation: Evaluation  # Task.evaluate on every test image


def label_space(labels: Mapping[str, Any]) -> str:
    """The sha256 of the canonical JSON (sorted keys, compact) of a label space (``Task.to_dict()``)."""
    text = json.dumps(labels, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_space(task: Task) -> str:
    """A label space in words: ``multiclass, 10 classes: T-shirt/top, Trouser, Pullover, ...``."""
    names = task.classes
    listed = ", ".join(names[:NAMES_SHOWN]) + (", ..." if len(names) > NAMES_SHOWN else "")
    return f"{task.name}, {task.size_text()}: {listed}"


def probability_matrix(task: Task, answers: pd.DataFrame) -> np.ndarray:
    """The probabilities (as :meth:`Task.probabilities` gives them) of a served answer frame:
    its ``prob_<name>`` columns in ``task.target_names`` order. A task with one probability per
    image (binary) serves it with its complement first, so the last column is kept."""
    probs = answers[[prob_column(name) for name in task.target_names]].to_numpy(dtype=np.float64)
    if np.ndim(task.probabilities(np.zeros((1, task.num_outputs)))) == 1:
        return probs[:, -1]
    return probs


def score(task: Task, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Scored:
    """Decide and evaluate one model's probabilities on the test targets."""
    return Scored(probs, decision, task.decide(probs, decision), task.evaluate(probs, target, decision))


def correct(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per image: the decided answer equals the target (a multi-column target: the whole row;
    a negative entry, an attribute the image does not answer, is not compared)."""
    pred, target = np.asarray(pred).astype(np.int64), np.asarray(target).astype(np.int64)
    same = (pred == target) | (target < 0)
    return same if same.ndim == 1 else same.all(axis=1)


def mcnemar(candidate_correct: np.ndarray, champion_correct: np.ndarray) -> dict[str, Any]:
    """The exact McNemar test of paired correctness: a two-sided binomial test (p = 1/2) of the
    images only the candidate answers right among those exactly one of the models does."""
    from scipy.stats import binomtest

    only_candidate = int((candidate_correct & ~champion_correct).sum())
    only_champion = int((~candidate_correct & champion_correct).sum())
    discordant = only_candidate + only_champion
    p = float(binomtest(only_candidate, discordant, 0.5).pvalue) if discordant else 1.0
    return {"candidate_only_correct": only_candidate, "champion_only_correct": only_champion, "p": p}


# ---------------------------------------------------------------------- bootstrap


def resamples(n: int, count: int, seed: int) -> Iterator[np.ndarray]:
    """``count`` resamples of ``n`` image indices with replacement, in chunks of rows (seeded)."""
    rng = np.random.default_rng(seed)
    rows = max(1, CHUNK // max(n, 1))
    for start in range(0, count, rows):
        yield rng.integers(0, n, size=(min(rows, count - start), n))


@dataclass
class Counts:
    """Per resample (rows) and class (columns): true positives, true and predicted counts; per
    resample: the images, the right answers and the squared rank error (single-label answers;
    undefined, NaN, for label sets)."""

    tp: np.ndarray
    n_true: np.ndarray
    n_pred: np.ndarray
    images: int
    right: np.ndarray
    squared_error: np.ndarray
    multilabel: bool = False


def _per_class(values: np.ndarray, idx: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per resample row of ``idx``: the (weighted) count of each class ``0..k-1`` in ``values[idx]``."""
    rows = len(idx)
    codes = (values[idx] + k * np.arange(rows)[:, None]).ravel()
    return np.bincount(codes, None if weights is None else weights[idx].ravel(), minlength=rows * k).reshape(rows, k)


def single_label_counts(pred: np.ndarray, target: np.ndarray, idx: np.ndarray) -> Counts:
    """:class:`Counts` of single-label answers (class indices) on the resamples ``idx``."""
    k = int(max(pred.max(), target.max(), 1)) + 1  # at least the two classes of a binary task
    right = (pred == target).astype(np.float64)
    return Counts(
        tp=_per_class(target, idx, k, right),
        n_true=_per_class(target, idx, k),
        n_pred=_per_class(pred, idx, k),
        images=idx.shape[1],
        right=right[idx].sum(axis=1),
        squared_error=((pred - target).astype(np.float64) ** 2)[idx].sum(axis=1),
    )


def label_set_counts(pred: np.ndarray, target: np.ndarray, idx: np.ndarray) -> Counts:
    """:class:`Counts` of label-set answers (0/1 matrices) on the resamples ``idx``."""
    n = len(target)
    rows = len(idx)
    weights = np.bincount((idx + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n).reshape(rows, n)
    weights = weights.astype(np.float64)
    pred, target = pred.astype(np.float64), target.astype(np.float64)
    return Counts(
        tp=weights @ (pred * target),
        n_true=weights @ target,
        n_pred=weights @ pred,
        images=n,
        right=weights @ (pred == target).all(axis=1).astype(np.float64),
        squared_error=np.full(rows, np.nan),
        multilabel=True,
    )


def _f1(c: Counts) -> np.ndarray:
    return 2 * c.tp / np.maximum(c.n_true + c.n_pred, 1)


def _macro(per_class: np.ndarray, c: Counts) -> np.ndarray:
    """The mean over classes as torchmetrics takes it: single-label over the classes that
    occur (as a target or an answer), label sets over every label."""
    if c.multilabel:
        return per_class.mean(axis=1)
    present = (c.n_true + c.n_pred) > 0
    return (per_class * present).sum(axis=1) / present.sum(axis=1)


def _qwk(c: Counts) -> np.ndarray:
    """Quadratic weighted kappa from the marginals: 1 - sum (t - p)^2 / sum over the chance
    table ``n_true x n_pred / n`` of (i - j)^2."""
    ranks = np.arange(c.n_true.shape[1], dtype=np.float64)
    st, sp = c.n_true @ ranks, c.n_pred @ ranks
    chance = c.n_true @ ranks**2 + c.n_pred @ ranks**2 - 2 * st * sp / c.images
    return 1 - c.squared_error / chance


def _recall_macro(c: Counts) -> np.ndarray:
    return _macro(c.tp / np.maximum(c.n_true, 1), c)


FAST_METRICS: dict[tuple[str, str], Callable[[Counts], np.ndarray]] = {
    ("single", "acc"): lambda c: c.right / c.images,
    ("single", "balanced_acc"): _recall_macro,
    ("single", "precision_macro"): lambda c: _macro(c.tp / np.maximum(c.n_pred, 1), c),
    ("single", "recall_macro"): _recall_macro,
    ("single", "f1_macro"): lambda c: _macro(_f1(c), c),
    ("single", "f1_weighted"): lambda c: (_f1(c) * c.n_true).sum(axis=1) / c.images,
    ("single", "f1"): lambda c: _f1(c)[:, 1],  # binary: the positive class
    ("single", "qwk"): _qwk,
    ("sets", "f1_macro"): lambda c: _macro(_f1(c), c),
    ("sets", "f1_micro"): lambda c: 2 * c.tp.sum(axis=1) / np.maximum((c.n_true + c.n_pred).sum(axis=1), 1),
    ("sets", "subset_acc"): lambda c: c.right / c.images,
}


def answer_form(pred: np.ndarray, target: np.ndarray) -> str | None:
    """``single`` (class indices), ``sets`` (0/1 matrices) or None (another form: no vectorised metrics)."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape or not len(target):
        return None
    if target.ndim == 1 and min(pred.min(), target.min()) >= 0:
        return "single"
    if target.ndim == 2 and np.isin(target, (0, 1)).all() and np.isin(pred, (0, 1)).all():
        return "sets"
    return None


def _fast_scores(form: str, metric: str, pred: np.ndarray, target: np.ndarray, idx: np.ndarray) -> np.ndarray:
    counts = (single_label_counts if form == "single" else label_set_counts)(pred, target, idx)
    return FAST_METRICS[(form, metric)](counts)


def _evaluated_scores(task: Task, model: Scored, target: np.ndarray, metric: str, idx: np.ndarray) -> np.ndarray:
    return np.array([task.evaluate(model.probs[i], target[i], model.decision).metrics[metric] for i in idx])


def _fast_form(task: Task, models: tuple[Scored, Scored], target: np.ndarray, metric: str, seed: int) -> str | None:
    """The answer form whose vectorised ``metric`` reproduces ``Task.evaluate`` for both models
    (on every image and on the first resample), or None."""
    forms = {answer_form(m.pred, target) for m in models}
    form = forms.pop() if len(forms) == 1 else None
    if form is None or (form, metric) not in FAST_METRICS:
        return None
    first = next(resamples(len(target), 1, seed))
    for model in models:
        expected = [model.evaluation.metrics[metric], *_evaluated_scores(task, model, target, metric, first)]
        every = np.arange(len(target))[None, :]
        got = [
            *_fast_scores(form, metric, model.pred, target, every),
            *_fast_scores(form, metric, model.pred, target, first),
        ]
        if not np.allclose(got, expected, rtol=0.0, atol=AGREEMENT, equal_nan=True):
            log.info(
                "gate: the vectorised %s differs from the task's (%s vs %s): evaluating each resample",
                metric,
                got,
                expected,
            )
            return None
    return form


def bootstrap(
    task: Task, target: np.ndarray, candidate: Scored, champion: Scored, metric: str, count: int, seed: int
) -> tuple[np.ndarray, str]:
    """Paired bootstrap differences (candidate - champion) of ``metric`` over ``count``
    resamples of the test images (the same resamples for both models, seeded), and the method
    used (``vectorised`` or ``Task.evaluate``)."""
    form = _fast_form(task, (candidate, champion), target, metric, seed)
    if form is None:
        log.info("gate: %s by Task.evaluate on each of %d resamples (slow on large test sets)", metric, count)
    diffs = []
    for idx in resamples(len(target), count, seed):
        if form is None:
            scores = [_evaluated_scores(task, m, target, metric, idx) for m in (candidate, champion)]
        else:
            scores = [_fast_scores(form, metric, m.pred, target, idx) for m in (candidate, champion)]
        diffs.append(scores[0] - scores[1])
    return np.concatenate(diffs), "Task.evaluate" if form is None else "vectorised"


# ---------------------------------------------------------------------- the decision


def _base(task: Task, candidate: Scored, version: str, metric: str) -> dict[str, Any]:
    return {
        "metric": metric,
        "candidate_version": str(version),
        "label_space": label_space(task.to_dict()),
        "images": len(candidate.pred),
        "candidate_score": float(candidate.evaluation.metrics[metric.removeprefix("test/")]),
    }


def first_version(task: Task, candidate: Scored, version: str, metric: str) -> dict[str, Any]:
    """The gate's record when there is no champion yet: promoted."""
    return {
        "decision": PROMOTED,
        "promoted": True,
        "reason": "first version",
        **_base(task, candidate, version, metric),
        "champion_version": None,
    }


def other_label_space(
    task: Task, candidate: Scored, version: str, champion_task: Task, champion_version: str, metric: str
) -> dict[str, Any]:
    """The gate's record when the champion has another label space: refused, naming both."""
    return {
        "decision": REFUSED,
        "promoted": False,
        "reason": f"champion v{champion_version} has another label space ({describe_space(champion_task)}; "
        f"candidate: {describe_space(task)})",
        **_base(task, candidate, version, metric),
        "champion_version": str(champion_version),
        "champion_label_space": label_space(champion_task.to_dict()),
    }


def class_deltas(candidate: Evaluation, champion: Evaluation) -> pd.DataFrame:
    """Per class: both F1s, the difference (candidate - champion) and the support; worst first."""
    both = candidate.per_class[["class", "f1", "support"]].merge(
        champion.per_class[["class", "f1"]], on="class", suffixes=("_candidate", "_champion")
    )
    table = pd.DataFrame(
        {
            "class": both["class"].astype(str),
            "candidate_f1": both["f1_candidate"].astype(float).round(6),
            "champion_f1": both["f1_champion"].astype(float).round(6),
            "delta": (both["f1_candidate"] - both["f1_champion"]).astype(float).round(6),
            "support": both["support"].astype(int),
        }
    )
    return table.sort_values(["delta", "class"], kind="stable").reset_index(drop=True)


def compare(
    task: Task,
    target: np.ndarray,
    candidate: Scored,
    champion: Scored,
    version: str,
    champion_version: str,
    metric: str,
    settings: GateSettings,
) -> dict[str, Any]:
    """The gate's record for a candidate and a champion of the same label space, both scored on
    the same test images: promoted when the interval lies above 0 and no class drops too far."""
    short = metric.removeprefix("test/")
    n = len(target)
    started = time.perf_counter()
    diffs, method = bootstrap(task, target, candidate, champion, short, settings.bootstrap, settings.seed)
    seconds = time.perf_counter() - started
    low, high = (float(q) for q in np.quantile(diffs, [settings.alpha / 2, 1 - settings.alpha / 2]))
    deltas = class_deltas(candidate.evaluation, champion.evaluation)
    drops = deltas[deltas["delta"] < -settings.class_tolerance]
    better = low > 0
    promoted = better and drops.empty
    cand_score = float(candidate.evaluation.metrics[short])
    champ_score = float(champion.evaluation.metrics[short])
    level = f"{100 * (1 - settings.alpha):g}%"
    interval = f"{level} interval of the difference [{low:+.4f}, {high:+.4f}]"
    scores = f"{metric} {cand_score:.4f} vs {champ_score:.4f} on the same {n} test images"
    if promoted:
        reason = (
            f"v{version} beats champion v{champion_version}: {scores}, {interval}; "
            f"no {task.unit} F1 lower by more than {settings.class_tolerance:g}"
        )
    else:
        failures = [] if better else [f"the {interval} does not lie above 0"]
        if not drops.empty:
            worst = drops.iloc[0]
            more = f" (and {len(drops) - 1} more)" if len(drops) > 1 else ""
            failures.append(
                f"{task.unit} {worst['class']} F1 {worst['candidate_f1']:.4f} vs {worst['champion_f1']:.4f} "
                f"({worst['delta']:+.4f}, tolerance {settings.class_tolerance:g}){more}"
            )
        reason = f"v{version} does not replace champion v{champion_version}: {scores}; " + "; ".join(failures)
    return {
        "decision": PROMOTED if promoted else REFUSED,
        "promoted": promoted,
        "reason": reason,
        **_base(task, candidate, version, metric),
        "champion_version": str(champion_version),
        "champion_score": champ_score,
        "difference": cand_score - champ_score,
        "interval": [low, high],
        "alpha": settings.alpha,
        "bootstrap": {"resamples": settings.bootstrap, "seed": settings.seed, "method": method, "seconds": seconds},
        "class_tolerance": settings.class_tolerance,
        "classes_below_tolerance": drops["class"].tolist(),
        "mcnemar": mcnemar(correct(candidate.pred, target), correct(champion.pred, target)),
        "per_class": deltas.to_dict(orient="records"),
    }
