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
* a group column (optional): when ``data.group_by`` names a column (case-insensitively), its
  value is the image's group key (``Record.group``; preprocess keeps a group in one split).
  Every row needs a value: empty cells are an error listing the rows. The column is not an
  attribute of multi-attribute data.

Rows are numbered from 1 for the first data row (the CSV header is not counted, so row N is
on line N+1 of a CSV file without multi-line cells); errors and source ids name rows as
``labels.csv row 12``. A manifest with both a filled ``label`` and a filled ``labels`` column,
or a ``label`` cell holding several labels, mixes single and multi labels and is refused.

Multi-attribute data (a task whose ``label_form`` is ``attributes``, e.g. ``task=multiattribute``)
has one column per attribute instead of ``label``/``labels``: the keys of ``task.attributes``
when that mapping is non-empty (matched case-insensitively; a missing one is an error listing
the columns), else every column other than ``path``/``image``, ``split``, ``label`` and
``labels`` (the attribute is then named by the lower-cased header). A cell holds one value,
or several as a list (a Parquet list, a JSON list or ``a|b``, as in ``labels``); an empty cell
is no value for that attribute. A row's labels are ``attribute=value`` strings, sorted:
``weather=sunny`` and ``tags=["dog","grass"]`` give ``("tags=dog", "tags=grass", "weather=sunny")``.
The helpers for that encoding (:func:`check_attribute`, :func:`attribute_labels`,
:func:`label_form`, :func:`task_attributes`) are shared with the other sources.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from taxonomist.data.manifest import LABEL_SEP, PATH_SEP, Record
from taxonomist.data.sources.common import (
    SourceImage,
    check_label,
    clean_labels,
    group_by,
    group_value,
    image_root,
    missing_group_kind,
    resolve_image,
    stage_images,
)
from taxonomist.errors import ConfigError, DataError, Problems
from taxonomist.tasks.multiattribute import ATTRIBUTE_SEP, configured_attributes

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
NON_ATTRIBUTE_COLUMNS = frozenset({*PATH_COLUMNS, "split", "label", "labels"})


def label_form(cfg: DictConfig) -> str:
    """How the config's task labels an image: ``one``, ``set``, ``path`` or ``attributes`` (its ``label_form``)."""
    from taxonomist.tasks import task_of  # here, not at the top: the tasks import the data modules

    return str(task_of(cfg).label_form)


def task_attributes(cfg: DictConfig) -> dict[str, str]:
    """``task.attributes`` (attribute -> kind) as a dict; empty when unset or empty."""
    attributes = configured_attributes(OmegaConf.select(cfg, "task", default=None))
    for attribute in attributes:
        check_attribute(attribute, "task.attributes", error=ConfigError)
    return attributes


def check_attribute(name: str, where: str, error: type[Exception] = DataError) -> str:
    """Return the attribute name ``name`` if labels can carry it: non-empty, without ``=``, ``|`` or ``/``."""
    if not name:
        raise error(f"{where}: empty attribute name")
    bad = [sep for sep in (ATTRIBUTE_SEP, LABEL_SEP, PATH_SEP) if sep in name]
    if bad:
        raise error(f"{where}: attribute name {name!r} contains {bad[0]!r}; attribute names may not hold = | or /")
    return name


def attribute_labels(values: Mapping[str, Iterable[str]], where: str) -> tuple[str, ...]:
    """The sorted ``attribute=value`` labels of ``values`` (attribute -> its values; none is fine)."""
    labels = set()
    for attribute, items in values.items():
        check_attribute(attribute, where)
        labels.update(f"{attribute}{ATTRIBUTE_SEP}{value}" for value in clean_labels(items, where))
    return tuple(sorted(labels))


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (all cells as text) or Parquet manifest; column names lower-cased and stripped."""
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError) as err:  # pandas' and pyarrow's read errors subclass these
        raise DataError(f"{path}: cannot read the manifest ({err})") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if frame.empty:
        raise DataError(f"{path}: the manifest has no rows")
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
        raise DataError(
            f"{where}: label cell {_text(value)!r} holds several labels, but 'label' is one label per image "
            "(the manifest mixes single and multi labels); put label lists in a 'labels' column"
        )
    return (check_label(_text(value), where),)


def parse_labels(value: Any, where: str, cell: str = "labels cell") -> tuple[str, ...]:
    """The labels of a ``labels`` cell: a list, a JSON list or ``|``-joined text (empty: none).

    ``cell`` names the cell in errors (``labels cell``, ``attribute cell``).
    """
    if isinstance(value, list | tuple | np.ndarray):
        items = list(value)
    else:
        text = _text(value)
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: {cell} {text!r} is not a valid JSON list ({err.msg})") from None
            if not isinstance(items, list):
                raise DataError(f"{where}: {cell} {text!r} is not a JSON list")
        else:
            items = text.split(LABEL_SEP) if text else []
    for item in items:
        if not isinstance(item, str | Integral) or isinstance(item, bool):
            raise DataError(f"{where}: labels must be names, got {item!r}")
    return clean_labels((str(item) for item in items), where)


def parse_split(value: Any, where: str) -> str:
    """The split of a ``split`` cell: train, val, test or "" (assigned later)."""
    text = _text(value).lower()
    if text not in SPLIT_ALIASES:
        raise DataError(f"{where}: split {_text(value)!r} is not train, val, test or empty")
    return SPLIT_ALIASES[text]


def _label_column(frame: pd.DataFrame, name: str) -> tuple[str, Callable[[Any, str], tuple[str, ...]]]:
    present = [c for c in ("label", "labels") if c in frame.columns]
    if not present:
        raise DataError(
            f"{name}: no 'label' or 'labels' column (found: {', '.join(frame.columns)}); "
            "use 'label' for one label per image or 'labels' for a list"
        )
    if len(present) == 2:
        filled = [c for c in present if _filled(frame[c])]
        if len(filled) == 2:
            raise DataError(
                f"{name}: both a 'label' and a 'labels' column hold values, so the manifest mixes single and "
                "multi labels; keep one of them"
            )
        present = filled or ["label"]
    column = present[0]
    return column, parse_label if column == "label" else parse_labels


def attribute_columns(frame: pd.DataFrame, name: str, attributes: Sequence[str] = ()) -> dict[str, str]:
    """Column -> attribute of a multi-attribute manifest (see the module notes).

    ``attributes`` are the keys of ``task.attributes``: each needs a column (matched
    case-insensitively; the attribute keeps its configured spelling). Without them every
    column but ``path``/``image``, ``split``, ``label`` and ``labels`` is an attribute.
    """
    if attributes:
        reserved = [a for a in attributes if a.strip().lower() in (*PATH_COLUMNS, "split")]
        if reserved:
            raise ConfigError(f"task.attributes: {reserved[0]!r} is a manifest column, not an attribute; rename it")
        missing = [a for a in attributes if a.strip().lower() not in frame.columns]
        if missing:
            raise DataError(
                f"{name}: no column for attribute(s) {', '.join(map(repr, missing))} of task.attributes "
                f"(found: {', '.join(frame.columns)})"
            )
        return {a.strip().lower(): a for a in attributes}
    columns = [c for c in frame.columns if c not in NON_ATTRIBUTE_COLUMNS]
    if not columns:
        raise DataError(
            f"{name}: no attribute columns (found: {', '.join(frame.columns)}); a multi-attribute manifest has one "
            "column per attribute besides path/image and split"
        )
    return {c: check_attribute(c, f"{name}: column {c!r}") for c in columns}


def parse_attributes(record: Mapping[str, Any], columns: Mapping[str, str], where: str) -> tuple[str, ...]:
    """The sorted ``attribute=value`` labels of one manifest row (``columns``: column -> attribute).

    A cell holds one value, or several as a list / JSON list / ``a|b``; an empty cell is no value.
    Errors name the row and the column.
    """
    values = {}
    for column, attribute in columns.items():
        value = record[column]
        if isinstance(value, float) and value.is_integer():  # an integer Parquet column with nulls reads as float
            value = int(value)
        values[attribute] = parse_labels(value, f"{where}, column {column!r}", cell="attribute cell")
    return attribute_labels(values, where)


def materialise_table(cfg: DictConfig, path: Path, out_dir: Path, *, inside: Path | None = None) -> list[Record]:
    """Copy the images listed in a CSV or Parquet manifest into ``out_dir/images``.

    With ``inside`` (the archive reader's extraction folder) ``data.image_root`` is ignored:
    images are resolved beside the manifest and must lie inside ``inside``.
    """
    frame = read_table(path)
    name = path.name
    path_column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
    if path_column is None:
        raise DataError(f"{name}: no 'path' or 'image' column (found: {', '.join(frame.columns)})")
    group_key = group_by(cfg)
    group_column = group_key.strip().lower() if group_key else None
    if group_column not in frame.columns:
        group_column = None  # data.group_by is then a regex on the source id (see taxonomist.data.split)
    elif group_column in ("label", "labels"):
        raise ConfigError(
            f"data.group_by={group_key!r} names {name}'s {group_column!r} column: each class would be one group, "
            "in one split only; name a column that groups related images (a patient, a session, a source)"
        )
    if label_form(cfg) == "attributes":
        candidates = frame.drop(columns=[group_column]) if group_column else frame
        columns = attribute_columns(candidates, name, list(task_attributes(cfg)))

        def labels_of(record: dict[str, Any], where: str) -> tuple[str, ...]:
            return parse_attributes(record, columns, where)
    else:
        label_column, parse = _label_column(frame, name)

        def labels_of(record: dict[str, Any], where: str) -> tuple[str, ...]:
            return parse(record[label_column], where)

    root = path.parent if inside is not None else image_root(cfg) or path.parent
    has_split = "split" in frame.columns
    images: list[SourceImage] = []
    problems = Problems()  # every problem of every row, reported together
    for row, record in enumerate(frame.to_dict("records"), start=1):
        where = f"{name} row {row}"
        labels = split = None
        with problems.collect(f"row(s) of {name} have unusable labels"):
            labels = labels_of(record, where)
        with problems.collect(f"row(s) of {name} have an unknown split"):
            split = parse_split(record["split"], where) if has_split else ""
        ref = _text(record[path_column])
        if not ref:
            problems.add(f"row(s) of {name} have no image", [f"{where}: empty {path_column!r} cell"])
            continue
        group = ""
        if group_column is not None:
            group = group_value(record[group_column])
            if not group:
                problems.add(missing_group_kind(str(group_key), name, f"column {group_column!r}"), where)
        src, problem = resolve_image(ref, root, inside)
        if problem:
            problems.add(f"row(s) of {name} name images that cannot be used", [f"{where}: {problem}"])
        elif labels is not None and split is not None:
            images.append(SourceImage(src, labels, split, where, group))
    problems.raise_if_any()
    return stage_images(images, out_dir, desc=f"ingest {name}")
