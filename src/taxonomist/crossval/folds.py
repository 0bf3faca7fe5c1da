"""The training pool and its folds: which image is held out by which fold.

The pool is the train and val splits of ``data/processed`` (the test split stays untouched);
:func:`read_pool` lists it from ``splits.csv`` (path, sha256, label, group) with each image's
row in its split's arrays and its encoded target. :func:`assign_folds` draws the folds:
stratified by class (``StratifiedKFold``), by whole groups where the data has them
(``StratifiedGroupKFold``: every image of a group is held out by the same fold), seeded.
:func:`fold_statistics` is the mean and spread of the per-fold metrics.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from taxonomist.data.cache import read_labels
from taxonomist.errors import ConfigError, DataError, missing_input
from taxonomist.files import read_text_csv

log = logging.getLogger(__name__)
POOL_SPLITS = ("train", "val")  # cross-validated; test is never read
SINGLE_LABEL_TASKS = ("multiclass", "binary")


@dataclass
class Pool:
    """The training pool: one row per image (``frame``: path, sha256, labels, split, group,
    ``row`` = its index in ``<split>_images.npy``), its targets and the label space."""

    frame: pd.DataFrame
    targets: np.ndarray
    classes: list[str]
    task_name: str

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def groups(self) -> np.ndarray | None:
        """The group key of every image, or None when the data has no groups."""
        if "group" not in self.frame.columns:
            return None
        keys = self.frame["group"].astype(str).to_numpy()
        return keys if (keys != "").all() else None


def read_pool(processed_dir: Path) -> Pool:
    """The train + val images of ``processed_dir`` with their targets, in split order
    (train rows, then val rows, each in its array's order)."""
    processed_dir = Path(processed_dir)
    splits_file = processed_dir / "splits.csv"
    if not splits_file.is_file():
        raise missing_input(splits_file, "preprocess")
    task = read_labels(processed_dir)
    if task.name not in SINGLE_LABEL_TASKS:
        raise ConfigError(
            f"taxonomist cv cross-validates single-label tasks ({', '.join(SINGLE_LABEL_TASKS)}); "
            f"data/processed holds {task.name} labels"
        )
    frame = read_text_csv(splits_file)
    parts, targets = [], []
    for split in POOL_SPLITS:
        part = frame[frame["split"] == split].copy()
        part["row"] = np.arange(len(part))
        labels_file = processed_dir / f"{split}_labels.npy"
        if not labels_file.is_file():
            raise missing_input(labels_file, "preprocess")
        y = np.load(labels_file)
        if len(y) != len(part):
            raise DataError(
                f"{labels_file} has {len(y)} targets but splits.csv lists {len(part)} {split} images: "
                "run the preprocess stage again"
            )
        parts.append(part)
        targets.append(np.asarray(y, dtype=np.int64).reshape(-1))
    pool = pd.concat(parts, ignore_index=True)
    return Pool(pool, np.concatenate(targets), list(task.classes), task.name)


def effective_folds(wanted: int, targets: np.ndarray, groups: np.ndarray | None, stratified: bool) -> int:
    """How many folds the pool allows: ``wanted``, or fewer (with a warning) when the smallest
    class has fewer images (stratified), or there are fewer groups (grouped). A pool with one
    class, or a class of one image, cannot be cross-validated: :class:`DataError`."""
    classes, counts = np.unique(targets, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            f"cross-validation needs at least 2 classes in the training pool; it has {len(classes)} "
            f"({len(targets)} image(s))"
        )
    limit, why = wanted, ""
    if stratified and counts.min() < limit:
        limit, why = int(counts.min()), f"the smallest class has {int(counts.min())} image(s)"
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < limit:
            limit, why = n_groups, f"there are {n_groups} group(s)"
    if limit < 2:
        raise DataError(
            f"cannot cross-validate with {wanted} folds: {why}; every class needs at least 2 images (and the "
            "pool at least 2 groups) so that each held-out image's class is also in its fold's training part"
        )
    if limit < wanted:
        log.warning("cv: %d folds instead of cv.folds=%d: %s", limit, wanted, why)
    return limit


def assign_folds(
    targets: np.ndarray,
    folds: int,
    seed: int,
    stratified: bool = True,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """The fold (0 .. folds-1) that holds out each image: stratified by ``targets``, whole
    ``groups`` together when given, shuffled with ``seed``. Every image is held out by exactly one fold."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    x = np.zeros(len(targets))
    if groups is not None:
        splitter = (
            StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            if stratified
            else GroupKFold(n_splits=folds)
        )
        args: tuple = (x, targets, groups)
    elif stratified:
        splitter, args = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), (x, targets)
    else:
        splitter, args = KFold(n_splits=folds, shuffle=True, random_state=seed), (x,)
    fold_of = np.full(len(targets), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(*args)):
            fold_of[held_out] = k
    if (fold_of < 0).any():  # cannot happen with scikit-learn's splitters; a guard for the invariant
        raise DataError(f"{int((fold_of < 0).sum())} image(s) were held out by no fold")
    empty = [k for k in range(folds) if not (fold_of == k).any()]
    if empty:
        raise DataError(f"fold(s) {empty} hold out no image: use fewer cv.folds")
    return fold_of


def fold_statistics(rows: list[dict[str, float]]) -> dict[str, float]:
    """``<metric>_mean`` and ``<metric>_std`` (sample standard deviation, ddof=1; 0 for one fold)
    of every metric the per-fold ``rows`` share."""
    if not rows:
        return {}
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    out: dict[str, float] = {}
    for key in keys:
        values = np.asarray([float(r[key]) for r in rows], dtype=np.float64)
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out
