"""The preprocessed cache: one uint8 array per split, memory-mapped by the loader.

``data/processed/<split>_images.npy`` holds (N, H, W, C) uint8 pixels and
``<split>_labels.npy`` the targets, as the task encodes them (int64 indices, a uint8
multi-hot matrix for multi-label data, ...); ``labels.json`` holds the task's label space.
Decoding happens once, in preprocess, never per epoch.

Preprocess writes the image arrays row by row as its workers decode (:class:`NpyRows`: plain
``pwrite``/``pread`` at a row's offset, no memory map), so its memory does not grow with the
data set; the arrays are still ordinary ``.npy`` files that :func:`read_split` memory-maps.
"""

from __future__ import annotations

import os
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


class NpyRows:
    """Rows of a C-ordered ``.npy`` file, read and written in place with ``pread``/``pwrite``.

    :meth:`create` writes the header and sizes the file (sparse until written); any process
    can then open it and write its own rows, so parallel decoders never pass pixels around.
    Plain file I/O rather than a memory map: the pages written or read go to the page cache,
    not into the process's resident memory.
    """

    def __init__(self, path: str | Path, writable: bool = False) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(fh)
            self.offset = fh.tell()
        if fortran:
            raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, ...], dtype: np.dtype | str = np.uint8) -> NpyRows:
        """A new ``.npy`` file of ``shape`` (rows read as zeros until written), open for writing."""
        path = Path(path)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        with open(path, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, header)
            fh.truncate(fh.tell() + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
        return cls(path, writable=True)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (of this file's row shape and dtype) from row ``start`` on."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.shape[1:] != self.row_shape or start < 0 or start + len(data) > len(self):
            raise ValueError(f"{self.path}: cannot write {data.shape} at row {start} of {self.shape}")
        view = memoryview(data).cast("B")
        position = self.offset + start * self.row_bytes
        while view:  # pwrite may write less than asked (a full disk raises OSError instead)
            written = os.pwrite(self.fd, view, position)
            view, position = view[written:], position + written

    def read(self, start: int, count: int = 1) -> np.ndarray:
        """``count`` rows from row ``start`` on, as a new array."""
        count = max(0, min(count, len(self) - start))
        data = os.pread(self.fd, count * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != count * self.row_bytes:
            raise OSError(f"{self.path}: short read at row {start} (the file is truncated)")
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.row_shape).copy()

    def sync(self) -> None:
        """Wait until what was written is on disk (``fsync``)."""
        os.fsync(self.fd)

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def images_path(folder: str | Path, split: str) -> Path:
    """The image array file of ``split`` in a processed folder."""
    return Path(folder) / f"{split}_images.npy"


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split's arrays (plain .npy, so they can be memory-mapped)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_images.npy", np.ascontiguousarray(images, dtype=np.uint8))
    labels = np.asarray(labels)
    np.save(folder / f"{split}_labels.npy", labels)  # in the dtype the task's encode chose


def read_split(folder: str | Path, split: str, mmap: bool = True) -> SplitArrays:
    """Read one split; images are memory-mapped unless ``mmap`` is false."""
    folder = Path(folder)
    path = images_path(folder, split)
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
