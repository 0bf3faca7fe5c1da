"""Seeded, stratified train/val(/test) assignment for rows whose split is not fixed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from taxonomist.errors import DataError


def require_min_images(counts: pd.Series, minimum: int, what: str, remedy: str) -> None:
    """Raise :class:`~taxonomist.errors.DataError` naming every entry of ``counts`` (images per class or label)
    below ``minimum``."""
    small = counts[counts < minimum]
    if len(small):
        listing = ", ".join(f"{name!r} ({n})" for name, n in small.items())
        raise DataError(
            f"{what} with fewer than preprocess.min_images_per_class={minimum} images: {listing}; "
            f"add images or {remedy}"
        )


def assign_splits(
    frame: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    min_images_per_class: int = 2,
    by: str = "label",
) -> pd.DataFrame:
    """Return a copy of ``frame`` with every row's ``split`` set to train, val or test.

    Rows already marked ``test`` or ``val`` keep their split (a source's own split is kept).
    Unassigned rows become test (stratified ``test_fraction``) only when no row is marked
    test, and val (stratified ``val_fraction`` of the remaining pool) only when no row is
    marked val. Strata are the values of column ``by`` (the class, by default).
    """
    out = frame.copy()
    require_min_images(out.groupby(by).size(), min_images_per_class, "class(es)", "remove the class")
    has_test = (out["split"] == "test").any()
    has_val = (out["split"] == "val").any()
    pool = out.index[~out["split"].isin(["test", "val"])]
    if not has_test:
        pool_train, pool_test = _stratified(out.loc[pool], test_fraction, seed, "test", by)
        out.loc[pool_test, "split"] = "test"
        pool = pool_train
    if has_val:
        out.loc[pool, "split"] = "train"
        return out
    train_idx, val_idx = _stratified(out.loc[pool], val_fraction, seed + 1, "val", by)
    out.loc[train_idx, "split"] = "train"
    out.loc[val_idx, "split"] = "val"
    return out


def _stratified(part: pd.DataFrame, fraction: float, seed: int, name: str, by: str) -> tuple[pd.Index, pd.Index]:
    """Split ``part`` per class: ``round(n * fraction)`` images of each class are taken, but
    always at least one and never all, so every class lands on both sides."""
    counts = part.groupby(by).size()
    if counts.min() < 2:
        low = counts.idxmin()
        raise DataError(
            f"cannot make a stratified {name} split of {fraction:.0%}: class {low!r} has "
            f"{counts.min()} image(s) in the pool of {len(part)}, and every class needs at least "
            f"one image on each side; add images or change preprocess.{name}_fraction"
        )
    rng = np.random.default_rng(seed)
    keep: list = []
    take: list = []
    for label in sorted(counts.index, key=str):
        index = part.index[part[by] == label].to_numpy()
        n_take = min(max(round(len(index) * fraction), 1), len(index) - 1)
        shuffled = rng.permutation(index)
        take.extend(shuffled[:n_take])
        keep.extend(shuffled[n_take:])
    return pd.Index(sorted(keep)), pd.Index(sorted(take))
