"""The preprocessed cache: one uint8 array per split, memory-mapped by the loader.

``data/processed/<split>_images.npy`` holds (N, H, W, C) uint8 pixels and
``<split>_labels.npy`` the targets (int64 indices, or a uint8 multi-hot matrix for
multi-label data); ``labels.json`` holds the label space (task, classes, label tree).
Decoding happens once, in preprocess, never per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taxonomist.files import atomic_write_json, read_json
from taxonomist.tasks.labels import LabelSpace

LABELS_FILE = "labels.json"


@dataclass
class SplitArrays:
    """Images (N, H, W, C) uint8 and targets ((N,) int64 or (N, L) uint8) of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split's arrays (plain .npy, so they can be memory-mapped)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    labels = np.asarray(labels)
    np.save(folder / f"{split}_labels.npy", labels.astype(np.uint8 if labels.ndim == 2 else np.int64))


def read_split(folder: str | Path, split: str, mmap: bool = True) -> SplitArrays:
    """Read one split; images are memory-mapped unless ``mmap`` is false."""
    folder = Path(folder)
    path = folder / f"{split}_images.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    images = np.load(path, mmap_mode="r" if mmap else None)
    labels = np.load(folder / f"{split}_labels.npy")
    return SplitArrays(images=images, labels=labels)


def write_labels(folder: Path, space: LabelSpace) -> None:
    """Write the label space (``labels.json``)."""
    atomic_write_json(folder / LABELS_FILE, space.to_dict())


def read_labels(folder: str | Path) -> LabelSpace:
    """The label space written by :func:`write_labels`."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the preprocess stage first")
    return LabelSpace.from_dict(read_json(path))
