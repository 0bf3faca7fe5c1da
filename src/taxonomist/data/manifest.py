"""The manifest: one row per image with path, labels, split, content hash and source id.

Every source (built-in or the user's) is materialised as image files under ``data/raw/images``
plus ``data/raw/manifest.csv``, so the rest of the pipeline has a single code path.

The ``labels`` column holds a record's labels joined with ``|`` (:data:`LABEL_SEP`): one label
for binary and multi-class data, any number (or none) for multi-label data. A hierarchical
label is one path whose levels are joined with ``/`` (:data:`PATH_SEP`), e.g.
``Apparel/Footwear/Sneaker``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from taxonomist.files import atomic_write_text

COLUMNS = ["path", "labels", "split", "sha256", "source_id"]
SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"
LABEL_SEP = "|"
PATH_SEP = "/"


@dataclass(frozen=True)
class Record:
    """One ingested image.

    ``path`` is relative to the raw data folder; ``labels`` has one entry for single-label data
    and any number for multi-label data; ``split`` is "train", "val", "test" or "" (assigned
    in preprocess); ``source_id`` says where the image came from (a file, or a manifest row)
    and is what error messages name.
    """

    path: str
    labels: tuple[str, ...]
    split: str
    sha256: str
    source_id: str


def join_labels(labels: tuple[str, ...] | list[str]) -> str:
    """The manifest text of a label list."""
    return LABEL_SEP.join(labels)


def split_labels(text: str) -> list[str]:
    """The label list of a manifest ``labels`` cell (empty text: no labels)."""
    return [part for part in str(text).split(LABEL_SEP) if part]


def write_manifest(records: list[Record], folder: Path) -> Path:
    """Write the manifest CSV for ``records`` into ``folder``."""
    frame = pd.DataFrame(
        [(r.path, join_labels(r.labels), r.split, r.sha256, r.source_id) for r in records], columns=COLUMNS
    )
    return atomic_write_text(folder / MANIFEST_FILE, frame.to_csv(index=False))


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the ingest stage first")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; run the ingest stage again")
    return frame
