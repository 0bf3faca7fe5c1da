"""The preprocessed cache: one uint8 array per split, memory-mapped by the loader.

``data/processed/<split>_images.npy`` holds (N, H, W, C) uint8 pixels and
``<split>_labels.npy`` the targets, as the task encodes them (int64 indices, a uint8
multi-hot matrix for multi-label data, ...); ``labels.json`` holds the task's label space.
Decoding happens once, in preprocess, never per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from taxonomist.tasks import Task

from taxonomist.errors import missing_input
from taxonomist.files import atomic_write_json, read_json

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
    np.save(folder / f"{split}_labels.npy", labels)  # in the dtype the task's encode chose


def read_split(folder: str | Path, split: str, mmap: bool = True) -> SplitArrays:
    """Read one split; images are memory-mapped unless ``mmap`` is false."""
    folder = Path(folder)
    path = folder / f"{split}_images.npy"
    if not path.is_file():
        raise missing_input(path, "preprocess")
    labels_path = folder / f"{split}_labels.npy"
    if not labels_path.is_file():
        raise missing_input(labels_path, "preprocess")
    images = np.load(path, mmap_mode="r" if mmap else None)
    labels = np.load(labels_path)
    return SplitArrays(images=images, labels=labels)


def write_labels(folder: Path, space: Task) -> None:
    """Write the label space (``labels.json``)."""
    atomic_write_json(folder / LABELS_FILE, space.to_dict())


def read_labels(folder: str | Path) -> Task:
    """The label space written by :func:`write_labels`."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        raise missing_input(path, "preprocess")
    from taxonomist.tasks import load_task  # tasks import this package's modules

    return load_task(read_json(path))
