"""A CSV or Parquet manifest: one row per image.

Columns (names are matched case-insensitively):

* ``path`` (or ``image``): the image file, absolute or relative to ``data.image_root``
  (default: the folder holding the manifest).
* ``label``: one label per row; for hierarchical tasks a path such as ``Apparel/Footwear/Sneaker``.
* or ``labels``: a list of labels per row (multi-label data); a row may hold any number of
  labels, or none. In Parquet a list column; in CSV either a JSON list (``["cat", "dog"]``) or
  labels joined with ``|`` (``cat|dog``), the manifest's own separator, so no label may contain
  ``|``. An empty cell (or ``[]``) is zero labels.
* ``split`` (optional): ``train``, ``val`` or ``test``, or empty (assigned later);
  ``training``, ``valid`` and ``validation`` are accepted too.

Rows are numbered from 1 for the first data row (the CSV header is not counted, so row N is
on line N+1 of a CSV file without multi-line cells); errors and source ids name rows as
``labels.csv row 12``. A manifest with both a filled ``label`` and a filled ``labels`` column,
or a ``label`` cell holding several labels, mixes single and multi labels and is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from taxonomist.data.manifest import LABEL_SEP, Record
from taxonomist.data.sources import SourceError
from taxonomist.data.sources.common import (
    SourceImage,
    check_label,
    clean_labels,
    copy_images,
    image_root,
    report_problems,
    resolve_image,
)

PATH_COLUMNS = ("path", "image")
SPLIT_ALIASES = {
    "": "",
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (all cells as text) or Parquet manifest; column names lower-cased and stripped."""
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError) as err:  # pandas' and pyarrow's read errors subclass these
        raise SourceError(f"{path}: cannot read the manifest ({err})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if frame.empty:
        raise SourceError(f"{path}: the manifest has no rows")
    return frame


def _is_missing(value: Any) -> bool:
    return not isinstance(value, list | tuple | np.ndarray) and bool(pd.isna(value))


def _text(value: Any) -> str:
    """A cell as stripped text ("" for an empty or missing cell)."""
    return "" if _is_missing(value) else str(value).strip()


def _is_list(value: Any) -> bool:
    if isinstance(value, list | tuple | np.ndarray):
        return True
    text = _text(value)
    if not text.startswith("["):
        return False
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


def _filled(column: pd.Series) -> bool:
    return any(_is_list(v) or _text(v) for v in column)


def parse_label(value: Any, where: str) -> tuple[str, ...]:
    """The one label of a ``label`` cell; refuse an empty cell or one holding a list."""
    if _is_list(value) or LABEL_SEP in _text(value):
        raise SourceError(
            f"{where}: label cell {_text(value)!r} holds several labels, but 'label' is one label per image "
            "(the manifest mixes single and multi labels); put label lists in a 'labels' column"
        )
    return (check_label(_text(value), where),)


def parse_labels(value: Any, where: str) -> tuple[str, ...]:
    """The labels of a ``labels`` cell: a list, a JSON list or ``|``-joined text (empty: none)."""
    if isinstance(value, list | tuple | np.ndarray):
        items = list(value)
    else:
        text = _text(value)
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise SourceError(f"{where}: labels cell {text!r} is not a valid JSON list ({err.msg})") from None
            if not isinstance(items, list):
                raise SourceError(f"{where}: labels cell {text!r} is not a JSON list")
        else:
            items = text.split(LABEL_SEP) if text else []
    for item in items:
        if not isinstance(item, str | Integral) or isinstance(item, bool):
            raise SourceError(f"{where}: labels must be names, got {item!r}")
    return clean_labels((str(item) for item in items), where)


def parse_split(value: Any, where: str) -> str:
    """The split of a ``split`` cell: train, val, test or "" (assigned later)."""
    text = _text(value).lower()
    if text not in SPLIT_ALIASES:
        raise SourceError(f"{where}: split {_text(value)!r} is not train, val, test or empty")
    return SPLIT_ALIASES[text]


def _label_column(frame: pd.DataFrame, name: str) -> tuple[str, Callable[[Any, str], tuple[str, ...]]]:
    present = [c for c in ("label", "labels") if c in frame.columns]
    if not present:
        raise SourceError(
            f"{name}: no 'label' or 'labels' column (found: {', '.join(frame.columns)}); "
            "use 'label' for one label per image or 'labels' for a list"
        )
    if len(present) == 2:
        filled = [c for c in present if _filled(frame[c])]
        if len(filled) == 2:
            raise SourceError(
                f"{name}: both a 'label' and a 'labels' column hold values, so the manifest mixes single and "
                "multi labels; keep one of them"
            )
        present = filled or ["label"]
    column = present[0]
    return column, parse_label if column == "label" else parse_labels


def materialise_table(cfg: DictConfig, path: Path, out_dir: Path, *, inside: Path | None = None) -> list[Record]:
    """Copy the images listed in a CSV or Parquet manifest into ``out_dir/images``.

    With ``inside`` (the archive reader's extraction folder) ``data.image_root`` is ignored:
    images are resolved beside the manifest and must lie inside ``inside``.
    """
    frame = read_table(path)
    name = path.name
    path_column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
    if path_column is None:
        raise SourceError(f"{name}: no 'path' or 'image' column (found: {', '.join(frame.columns)})")
    label_column, parse = _label_column(frame, name)
    root = path.parent if inside is not None else image_root(cfg) or path.parent
    has_split = "split" in frame.columns
    images: list[SourceImage] = []
    missing: list[str] = []
    for row, record in enumerate(frame.to_dict("records"), start=1):
        where = f"{name} row {row}"
        ref = _text(record[path_column])
        if not ref:
            raise SourceError(f"{where}: empty {path_column!r} cell")
        labels = parse(record[label_column], where)
        split = parse_split(record["split"], where) if has_split else ""
        src, problem = resolve_image(ref, root, inside)
        if problem:
            missing.append(f"{where}: {problem}")
        else:
            images.append(SourceImage(src, labels, split, where))
    report_problems(f"row(s) of {name} name images that cannot be used", missing)
    return copy_images(images, out_dir, desc=f"ingest {name}")
