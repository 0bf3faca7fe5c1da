"""Helpers every file-based reader shares (folder, manifest, archive, Label Studio).

* :func:`stage_images` stages the found images as ``out_dir/images/<generated name>`` (never a
  name built from user text) and returns their records; ingest packs (and hashes) them;
* :func:`check_label` refuses label names the manifest cannot hold, :func:`clean_labels`
  tidies a label list;
* :func:`group_by`, :func:`group_value` and :func:`missing_group_kind` read ``data.group_by``
  when it names a column of the source (a manifest column, a Label Studio data field);
* :func:`image_root` and :func:`resolve_image` resolve image references, and
  :func:`report_problems` reports every bad row in a single error (or adds them to a
  :class:`~taxonomist.errors.Problems` that collects every kind of problem of one reader).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from taxonomist.data.manifest import LABEL_SEP, Record
from taxonomist.errors import DataError, Problems

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IGNORED_NAMES = frozenset({"__MACOSX"})  # macOS zip resource forks
_SAFE_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")


@dataclass(frozen=True)
class SourceImage:
    """An image file found by a reader, before it is copied: its labels, split, origin and
    group key (``data.group_by`` naming a column of the source; "" otherwise)."""

    src: Path
    labels: tuple[str, ...]
    split: str
    source_id: str
    group: str = ""


def is_hidden(name: str) -> bool:
    """True for names readers skip: dot-files/folders and macOS ``__MACOSX`` folders."""
    return name.startswith(".") or name in IGNORED_NAMES


def check_label(label: str, where: str) -> str:
    """Return ``label`` if the manifest can hold it; refuse an empty one or one holding ``|``."""
    if not label:
        raise DataError(f"{where}: empty label")
    if LABEL_SEP in label:
        raise DataError(
            f"{where}: label {label!r} contains {LABEL_SEP!r}, which separates labels in the manifest; rename it"
        )
    return label


def clean_labels(labels: Iterable[str], where: str) -> tuple[str, ...]:
    """A label list as a record holds it: stripped, empty ones dropped, each checked and kept once (in order)."""
    stripped = (label.strip() for label in labels)
    return tuple(dict.fromkeys(check_label(label, where) for label in stripped if label))


def _safe_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    return suffix if _SAFE_SUFFIX.fullmatch(suffix) else ""


def stage_images(images: Sequence[SourceImage], out_dir: Path, desc: str) -> list[Record]:
    """Stage ``images`` as ``out_dir/images/<index><ext>`` and return their records.

    Destination names are generated (a running number plus the original, lower-cased
    extension), never built from paths or labels, so nothing can land outside ``out_dir``.
    Nothing is copied here: each name is a symbolic link to the user's file (a hard link when
    the file lies inside ``out_dir``, e.g. an extracted archive that is removed before packing),
    so ingest reads every image once, when it packs and hashes it
    (:func:`~taxonomist.data.manifest.pack_images`); the records' ``sha256`` is filled in then.
    """
    folder = out_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    inside = out_dir.resolve()
    records: list[Record] = []
    for i, image in enumerate(tqdm(images, desc=desc, unit="img", mininterval=1)):
        rel = f"images/{i:06d}{_safe_suffix(image.src)}"
        src = Path(image.src).resolve()
        if src.is_relative_to(inside):
            os.link(src, out_dir / rel)
        else:
            os.symlink(src, out_dir / rel)
        records.append(Record(rel, image.labels, image.split, "", image.source_id, image.group))
    return records


def image_root(cfg: DictConfig) -> Path | None:
    """``data.image_root``, where manifest and export image paths are resolved (None: not set)."""
    configured = OmegaConf.select(cfg, "data.image_root", default=None)
    return Path(str(configured)).expanduser() if configured else None


def group_by(cfg: DictConfig) -> str | None:
    """``data.group_by`` as set (None when unset or empty: groups are off)."""
    value = OmegaConf.select(cfg, "data.group_by", default=None)
    return str(value) if value is not None and str(value).strip() else None


def group_value(value: object) -> str:
    """A group cell as a key: stripped text, "" for an empty or missing cell; an integer
    stored as a float (a Parquet integer column with nulls) loses its ``.0``."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):  # None, NaN, NA, NaT
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def missing_group_kind(key: str, where: str, what: str) -> str:
    """The :class:`~taxonomist.errors.Problems` kind of images whose group ``what`` (a column,
    a data field) is empty, naming ``data.group_by``."""
    return (
        f"image(s) of {where} have no value in {what}, which data.group_by={key!r} names; every image needs "
        "a group (fill it in, or set data.group_by=null)"
    )


def resolve_image(ref: str, root: Path, inside: Path | None = None) -> tuple[Path, str | None]:
    """Resolve an image path (absolute, or relative to ``root``); return it and a problem, if any.

    The problem is None when the file exists (and, with ``inside``, lies inside that folder);
    otherwise it reads e.g. ``image file 'x.png' not found (looked in /abs/x.png)``.
    """
    path = (root / Path(ref).expanduser()).resolve()
    if inside is not None and not path.is_relative_to(inside.resolve()):
        return path, f"image file {ref!r} lies outside the archive"
    if not path.is_file():
        return path, f"image file {ref!r} not found (looked in {path})"
    return path, None


def report_problems(header: str, problems: Sequence[str], into: Problems | None = None) -> None:
    """Report ``problems`` (one kind, described by ``header``) in a single error.

    Without ``into``, raise one :class:`~taxonomist.errors.DataError` listing the first ones
    and how many there are; with ``into``, add them to it, so a reader that collects several
    kinds of problems raises them all at once (``into.raise_if_any()``).
    """
    collected = Problems() if into is None else into
    collected.add(header, problems)
    if into is None:
        collected.raise_if_any()
