"""The cached splits as a torch ``Dataset``, for training (augmented) and prediction (plain).

Kept apart from the ``LightningDataModule`` (:mod:`taxonomist.data.datamodule`) so evaluate,
package and the benchmarks read the cache without importing Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from taxonomist.data.cache import NpyRows, SplitArrays
from taxonomist.data.transforms import standardisation


class Batch(list):
    """A fetched batch: a list of ``(image, target)`` samples, as any ``collate_fn`` expects,
    that also keeps the stacked ``x`` (N, C, H, W; channels-last memory) and ``y`` it came from."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(zip(x, y, strict=True))
        self.x, self.y = x, y


def collate_batch(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """``collate_fn`` that takes a :class:`Batch` as it is (no second stacking of its images)."""
    if isinstance(samples, Batch):
        return samples.x, samples.y
    return default_collate(samples)


class CachedImageDataset(Dataset):
    """Items of one cached split: (float CHW tensor, target), augmented when ``augment`` is set.

    Targets are class/node indices (long), or float multi-hot rows for multi-label data.
    A :class:`~torch.utils.data.DataLoader` fetches whole batches through
    :meth:`__getitems__`: the images are augmented one by one (albumentations), then
    standardised together (one multiply-add) as a channels-last batch; with
    :func:`collate_batch` as the loader's ``collate_fn`` that batch is used as it is.
    """

    def __init__(self, arrays: SplitArrays, mean: list[float], std: list[float], augment=None):
        self.images = arrays.images
        labels = np.asarray(arrays.labels)
        self.labels = torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)
        self.augment = augment
        scale, shift = standardisation(mean, std)
        self.scale, self.shift = torch.from_numpy(scale), torch.from_numpy(shift)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, idx: int) -> np.ndarray:
        """One image as uint8 (H, W, C), augmented when the dataset augments."""
        image = np.array(self.images[idx])  # a writable copy (the array may be a read-only mmap)
        if self.augment is not None:
            image = self.augment(image=image)["image"]
            if image.ndim == 2:
                image = image[:, :, None]
        return image

    def __getitems__(self, indices: list[int]) -> Batch:
        if self.augment is None:
            pixels = np.asarray(self.images[np.asarray(indices)])
        else:
            pixels = np.stack([self.pixels(i) for i in indices])
        x = torch.from_numpy(pixels).to(torch.float32).mul_(self.scale).add_(self.shift)
        return Batch(x.permute(0, 3, 1, 2), self.labels[indices])

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([idx])[0]


class BlockRows:
    """A split's image file read one block of consecutive rows at a time.

    For a split larger than memory: each block is one sequential read (``pread``, not a
    memory map, so the pages go to the page cache and not into the process), kept until a row
    of another block is asked for. With :class:`BlockShuffleSampler` every block is read once
    an epoch. Indexes like the array it stands for (an int, or an array of ints).
    """

    def __init__(self, path: str | Path, block: int) -> None:
        self.path, self.block = Path(path), max(1, int(block))
        with NpyRows(self.path) as rows:  # the header only; each process opens its own below
            self.shape = rows.shape
        self._rows: NpyRows | None = None
        self._block_id, self._data = -1, np.zeros((0, *self.shape[1:]), np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:  # a loader worker opens the file anew
        return {**self.__dict__, "_rows": None, "_block_id": -1, "_data": self._data[:0]}

    def _row(self, idx: int) -> np.ndarray:
        block_id = int(idx) // self.block
        if block_id != self._block_id:
            if self._rows is None:
                self._rows = NpyRows(self.path)
            self._data = self._rows.read(block_id * self.block, self.block)
            self._block_id = block_id
        return self._data[int(idx) - block_id * self.block]

    def __getitem__(self, idx: int | np.ndarray) -> np.ndarray:
        if np.ndim(idx) == 0:
            return self._row(int(idx))
        return np.stack([self._row(i) for i in np.asarray(idx)])


class BlockShuffleSampler(Sampler[int]):
    """Random order at two levels: the blocks of ``block`` consecutive rows in a random order,
    and the rows of each block in a random order; new orders each epoch (seeded).

    Meant for :class:`BlockRows` over a split preprocess stored in a seeded random order, so
    each block is already a random sample of the split: a batch drawn from one block is as
    mixed as a fully shuffled one, and every block is read once, sequentially, per epoch.
    With one block as long as the split it is a plain shuffle whose order depends on
    ``(seed, epoch)`` only (the training split in memory).
    """

    def __init__(self, length: int, block: int, seed: int) -> None:
        self.length, self.block, self.seed = int(length), max(1, int(block)), int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (Lightning calls this; otherwise each pass advances it)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        blocks = -(-self.length // self.block)
        for block_id in rng.permutation(blocks):
            start = int(block_id) * self.block
            rows = np.arange(start, min(start + self.block, self.length))
            yield from rng.permutation(rows).tolist()


def seed_worker_augment(worker_id: int) -> None:
    """Give each loader worker's copy of the augmentation its own seed, derived from the
    worker's torch seed (itself derived from the seeded main process): reproducible, and not
    the same augmentations in every worker."""
    info = torch.utils.data.get_worker_info()
    augment = getattr(info.dataset, "augment", None) if info is not None else None
    if augment is not None:
        augment.set_random_seed(info.seed % 2**32)
