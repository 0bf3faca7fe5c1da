"""Semi-supervised learning for the embeddings family: confidence-thresholded self-training.

The classifier is fitted on the labelled vectors, predicts the unlabelled pool, and the pool
vectors it is at least ``threshold`` sure of join the training set with the predicted class as
their label (pseudo-labels); it is fitted again, up to ``max_iter`` rounds or until no new
vector passes. Written here rather than with scikit-learn's ``SelfTrainingClassifier`` because
that one needs ``predict_proba``, which the SVMs lack: here the linear models' decision values
go through a softmax (``logistic`` gives real probabilities; use it for self-training).

The pool comes from ``fit.unlabelled`` (folders, globs, list files or archives, as
``taxonomist predict`` reads them), decoded and resized exactly as preprocess made the cache
(the same :func:`taxonomist.data.images.decode`); pool images whose content is already in the
data set (same sha256 as a row of ``data/processed/splits.csv``) are reported and left out.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from taxonomist.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class SelfTraining:
    """What a self-training fit did: pseudo-labels added per round, and in all."""

    rounds: list[int] = field(default_factory=list)

    @property
    def added(self) -> int:
        """Pool vectors that ended up with a pseudo-label."""
        return int(sum(self.rounds))


def class_probabilities(pipeline: Any, x: np.ndarray) -> np.ndarray:
    """``predict_proba`` where the classifier has it, else a softmax of its decision values."""
    if hasattr(pipeline, "predict_proba"):
        try:
            return pipeline.predict_proba(x)
        except AttributeError:  # a pipeline whose last step has no predict_proba
            pass
    scores = pipeline.decision_function(x)
    if scores.ndim == 1:
        scores = np.stack([-scores / 2, scores / 2], 1)
    scores = scores - scores.max(1, keepdims=True)
    exp = np.exp(scores)
    return exp / exp.sum(1, keepdims=True)


def self_train(
    fit: Any, x: np.ndarray, y: np.ndarray, pool: np.ndarray, threshold: float = 0.95, max_iter: int = 10
) -> tuple[Any, SelfTraining]:
    """Self-training: ``fit(x, y)`` returns a fitted classifier (with ``classes_``); returns the
    last fit and a :class:`SelfTraining` record."""
    record = SelfTraining()
    model = fit(x, y)
    remaining = np.arange(len(pool))
    taken_x, taken_y = [x], [y]
    for _ in range(int(max_iter)):
        if not len(remaining):
            break
        probs = class_probabilities(model, pool[remaining])
        sure = probs.max(1) >= threshold
        if not sure.any():
            break
        labels = np.asarray(model.classes_)[probs.argmax(1)]
        taken_x.append(pool[remaining[sure]])
        taken_y.append(labels[sure])
        record.rounds.append(int(sure.sum()))
        remaining = remaining[~sure]
        model = fit(np.concatenate(taken_x), np.concatenate(taken_y))
    log.info(
        "self-training: %d of %d unlabelled images pseudo-labelled in %d round(s) (threshold %.2f)",
        record.added,
        len(pool),
        len(record.rounds),
        threshold,
    )
    return model, record


def read_pool(patterns: list[str], processed_dir: Path, image_spec: Any) -> tuple[np.ndarray, dict[str, int]]:
    """Decode the unlabelled pool into (N, H, W, C) uint8 as the cache holds images; leave out
    files already in the data set and files that do not decode (both counted)."""
    from taxonomist.data.images import InvalidImage, decode
    from taxonomist.predict.inputs import ImageReader, expand

    try:
        keys = expand(patterns)
    except DataError as err:  # an empty folder, a missing file: say which setting named it
        raise DataError(f"fit.unlabelled: {err}") from None
    if not keys:
        raise DataError(f"fit.unlabelled: {', '.join(patterns)} holds no images")
    known: set[str] = set()
    splits = processed_dir / "splits.csv"
    if splits.is_file():
        columns = pd.read_csv(splits, nrows=0).columns
        if "sha256" in columns:
            known = set(pd.read_csv(splits, usecols=["sha256"])["sha256"].astype(str))
    rows, counts = [], {"images": len(keys), "in_data_set": 0, "unreadable": 0, "duplicates": 0}
    seen: set[str] = set()
    with ImageReader() as reader:
        for key in keys:
            data = reader.read(key)
            digest = hashlib.sha256(data).hexdigest()
            if digest in known:
                counts["in_data_set"] += 1
                continue
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            try:
                rows.append(decode(data, image_spec))
            except InvalidImage:
                counts["unreadable"] += 1
    if counts["in_data_set"]:
        log.warning(
            "fit.unlabelled: %d of %d pool images are already in the data set (same content): left out, "
            "not counted twice",
            counts["in_data_set"],
            counts["images"],
        )
    if not rows:
        raise DataError(f"fit.unlabelled: none of the {len(keys)} pool images is new and readable ({counts})")
    return np.stack(rows), counts
