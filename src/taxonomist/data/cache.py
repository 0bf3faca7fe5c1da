"""The preprocessed cache: one uint8 array per split, memory-mapped by the loader.

``data/processed/<split>_images.npy`` holds (N, H, W, C) uint8 pixels and
``<split>_labels.npy`` the int64 class indices; ``labels.json`` maps indices to names.
Decoding happens once, in preprocess, never per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxonomist.files import atomic_write_json, read_json

LABELS_FILE = "labels.json"


@dataclass
class SplitArrays:
    """Images (N, H, W, C) uint8 and labels (N,) int64 of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split's arrays (plain .npy, so they can be memory-mapped)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    np.save(folder / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))


def read_split(folder: str | Path, split: str, mmap: bool = True) -> SplitArrays:
    """Read one split; images are memory-mapped unless ``mmap`` is false."""
    folder = Path(folder)
    path = folder / f"{split}_images.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    images = np.load(path, mmap_mode="r" if mmap else None)
    labels = np.load(folder / f"{split}_labels.npy")
    return SplitArrays(images=images, labels=labels)


def write_labels(folder: Path, classes: list[str]) -> None:
    """Write the class names in index order."""
    atomic_write_json(folder / LABELS_FILE, {"classes": classes})


def read_labels(folder: str | Path) -> list[str]:
    """Class names in index order."""
    return list(read_json(Path(folder) / LABELS_FILE)["classes"])
