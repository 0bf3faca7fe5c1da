"""The manifest: one row per image with path, label, split, content hash and source id.

Every source (built-in or the user's) is materialised as image files under ``data/raw/images``
plus ``data/raw/manifest.csv``, so the rest of the pipeline has a single code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from taxonomist.files import atomic_write_text

COLUMNS = ["path", "label", "split", "sha256", "source_id"]
SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"


@dataclass(frozen=True)
class Record:
    """One ingested image: ``path`` is relative to the raw data folder."""

    path: str
    label: str
    split: str  # "train", "test" or "" (the split is assigned in preprocess)
    sha256: str
    source_id: str


def write_manifest(records: list[Record], folder: Path) -> Path:
    """Write the manifest CSV for ``records`` into ``folder``."""
    frame = pd.DataFrame([r.__dict__ for r in records], columns=COLUMNS)
    return atomic_write_text(folder / MANIFEST_FILE, frame.to_csv(index=False))


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the ingest stage first")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    return frame
