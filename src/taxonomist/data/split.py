"""Seeded, stratified train/val(/test) assignment for rows whose split is not fixed.

Without groups every class is split on its own (:func:`_stratified`). With groups
(``data.group_by``; the keys come from :func:`group_keys`) whole groups are drawn with
scikit-learn's ``StratifiedGroupKFold``, so every image of a group lands in one split and the
class mix of each split stays close to the whole's (see :func:`assign_splits`).
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from taxonomist.errors import DataError

log = logging.getLogger(__name__)

GROUP_COLUMN = "group"  # the manifest column a source fills when data.group_by names one of its columns
EXAMPLES = 3  # how many source ids an error or warning shows


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


def _examples(values: Sequence[str] | pd.Series) -> str:
    shown = [repr(str(v)) for v in list(values)[:EXAMPLES]]
    return ", ".join(shown) + (", ..." if len(values) > EXAMPLES else "")


def group_keys(frame: pd.DataFrame, group_by: str | None) -> pd.Series | None:
    """The group key of every row of a manifest ``frame``, or None when ``group_by`` is off.

    ``group_by`` is ``data.group_by``. When it names a column of the source, ingest filled the
    manifest's ``group`` column with it, and those keys are used (every row must have one).
    Otherwise it is a regular expression searched in each row's ``source_id`` (a folder
    image's path below the source, ``labels.csv row 3`` for a manifest row, ``export.json task
    17`` for a Label Studio task, prefixed ``<archive>:`` inside an archive): its first capture
    group, or the whole match when it has none, is the key. A pattern that does not compile,
    matches no row, or leaves some rows without a (non-empty) key is a
    :class:`~taxonomist.errors.DataError` naming ``data.group_by``, with the count and examples.
    """
    if group_by is None or not str(group_by).strip():
        return None
    key = str(group_by)
    if GROUP_COLUMN in frame.columns and (frame[GROUP_COLUMN] != "").any():
        keys = frame[GROUP_COLUMN].astype(str)
        empty = frame.loc[keys == "", "source_id"]
        if len(empty):
            raise DataError(
                f"data.group_by={key!r}: {len(empty)} of {len(frame)} images have no group in data/raw/manifest.csv "
                f"(e.g. {_examples(empty)}); fill the column in the source and run the ingest stage again"
            )
        return keys
    try:
        pattern = re.compile(key)
    except re.error as err:
        raise DataError(
            f"data.group_by={key!r} is not a column of the source and not a valid regular expression ({err}); "
            "name a manifest column / Label Studio data field, or give a regex on the source id"
        ) from None

    def match(source_id: str) -> str:
        found = pattern.search(source_id)
        if found is None:
            return ""
        return (found.group(1) if pattern.groups else found.group(0)) or ""

    keys = frame["source_id"].astype(str).map(match)
    unmatched = frame.loc[keys == "", "source_id"]
    if len(unmatched) == len(frame):
        raise DataError(
            f"data.group_by={key!r} is not a column of the source, and as a regular expression it matches none of "
            f"the {len(frame)} images' source ids (e.g. {_examples(frame['source_id'])}); name a manifest column / "
            "Label Studio data field, or give a regex whose first group (or whole match) is the group key"
        )
    if len(unmatched):
        raise DataError(
            f"data.group_by={key!r}: the regular expression gives no group for {len(unmatched)} of {len(frame)} "
            f"images (e.g. {_examples(unmatched)}); every image needs a group: widen the regex"
        )
    return keys


def assign_splits(
    frame: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    min_images_per_class: int = 2,
    by: str = "label",
    group: str | None = None,
) -> pd.DataFrame:
    """Return a copy of ``frame`` with every row's ``split`` set to train, val or test.

    Rows already marked ``test`` or ``val`` keep their split (a source's own split is kept).
    Unassigned rows become test (stratified ``test_fraction``) only when no row is marked
    test, and val (stratified ``val_fraction`` of the remaining pool) only when no row is
    marked val. Strata are the values of column ``by`` (the class, by default).

    ``group`` names a column of group keys (``data.group_by``, see :func:`group_keys`): then
    whole groups are drawn (:func:`_grouped`), so a group's images share a split. Unmarked rows
    of a group the source put in test or val join that split; a group the source put in
    several splits is kept as the source has it, with a warning naming it.

    The draws see only the columns they need (a copy of the whole frame would cost its size
    again for every image); the result is ``frame`` with its new ``split`` column.
    """
    out = frame[list(dict.fromkeys([by, "split"] if group is None else [by, group, "split"]))].copy()
    require_min_images(out.groupby(by).size(), min_images_per_class, "class(es)", "remove the class")
    if group is not None:
        _follow_fixed_groups(out, group)
    has_test = (out["split"] == "test").any()
    has_val = (out["split"] == "val").any()
    pool = out.index[~out["split"].isin(["test", "val"])]
    draw = _stratified if group is None else functools.partial(_grouped, group=group)
    if not has_test:
        pool_train, pool_test = draw(out.loc[pool], test_fraction, seed, "test", by)
        out.loc[pool_test, "split"] = "test"
        pool = pool_train
    if has_val:
        out.loc[pool, "split"] = "train"
    else:
        train_idx, val_idx = draw(out.loc[pool], val_fraction, seed + 1, "val", by)
        out.loc[train_idx, "split"] = "train"
        out.loc[val_idx, "split"] = "val"
    if group is not None:
        drawn = [split for split, fixed in (("test", has_test), ("val", has_val)) if not fixed]
        _warn_missing_classes(out, by, group, drawn)
    return frame.assign(split=out["split"].array)


def _follow_fixed_groups(out: pd.DataFrame, group: str) -> None:
    """Warn about groups the source put in several splits; move the unmarked rows of a group
    the source put in test or val (only) into that split, in place."""
    marked = out[out["split"] != ""]
    splits_of = marked.groupby(group)["split"].agg(lambda s: sorted(set(s)))
    mixed = splits_of[splits_of.map(len) > 1]
    if len(mixed):
        listing = "; ".join(f"{name!r} ({', '.join(splits)})" for name, splits in list(mixed.items())[:EXAMPLES])
        more = f"; and {len(mixed) - EXAMPLES} more" if len(mixed) > EXAMPLES else ""
        log.warning(
            "data.group_by: the source put %d group(s) in several splits, kept as the source has them: %s%s",
            len(mixed),
            listing,
            more,
        )
    pinned = splits_of[splits_of.map(lambda s: s in (["test"], ["val"]))].map(lambda s: s[0])
    follow = (out["split"] == "") & out[group].isin(pinned.index)
    out.loc[follow, "split"] = out.loc[follow, group].map(pinned)


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


def _grouped(
    part: pd.DataFrame, fraction: float, seed: int, name: str, by: str, group: str
) -> tuple[pd.Index, pd.Index]:
    """Split ``part`` by whole groups (column ``group``), stratified by ``by``: one fold of
    scikit-learn's ``StratifiedGroupKFold`` (shuffled with ``seed``) with ``round(1 / fraction)``
    folds is taken, so about ``fraction`` of the images, in the class mix of the whole.

    There are never more folds than groups, nor than images in the largest class (a warning
    says so when that makes the fold larger than ``fraction``)."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = part[group].astype(str).to_numpy()
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise DataError(
            f"cannot draw a {name} split with data.group_by: the {len(part)} image(s) left for it are in "
            f"{n_groups} group; a split by groups needs at least 2 (add groups, or set data.group_by=null)"
        )
    strata = part[by].astype(str).to_numpy()
    wanted = max(2, round(1 / fraction)) if fraction > 0 else n_groups
    n_splits = min(wanted, n_groups, int(pd.Series(strata).value_counts().max()))
    n_splits = max(n_splits, 2)
    if n_splits < wanted:
        log.warning(
            "data.group_by: the %s split takes about 1/%d of %d images instead of preprocess.%s_fraction=%g: "
            "there are only %d groups (largest class: %d images)",
            name,
            n_splits,
            len(part),
            name,
            fraction,
            n_groups,
            int(pd.Series(strata).value_counts().max()),
        )
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            # the first fold that leaves images on both sides (folds are rarely empty)
            take = next(t for _, t in folds.split(np.zeros(len(part)), strata, groups) if 0 < len(t) < len(part))
    except (ValueError, StopIteration) as err:
        raise DataError(
            f"cannot draw a {name} split of {fraction:.0%} by data.group_by from {len(part)} image(s) in "
            f"{n_groups} groups ({err or 'every fold is empty'}); add images or groups, or set data.group_by=null"
        ) from None
    taken = np.zeros(len(part), dtype=bool)
    taken[take] = True
    return pd.Index(sorted(part.index[~taken])), pd.Index(sorted(part.index[taken]))


def _warn_missing_classes(out: pd.DataFrame, by: str, group: str, drawn: list[str]) -> None:
    """Warn about classes without an image in a drawn split: with groups, a class whose images
    are in few groups cannot be on every side."""
    groups_per_class = out.groupby(by)[group].nunique()
    for split in drawn:
        present = set(out.loc[out["split"] == split, by])
        absent = [c for c in groups_per_class.index if c not in present]
        if absent:
            listing = ", ".join(f"{c!r} ({groups_per_class[c]} group(s))" for c in absent[:10])
            more = f", and {len(absent) - 10} more" if len(absent) > 10 else ""
            log.warning(
                "data.group_by: %d class(es) have no image in the %s split, their images being in few groups: "
                "%s%s; add groups of these classes for a fuller %s split",
                len(absent),
                split,
                listing,
                more,
                split,
            )
