"""LightningDataModule over the preprocessed cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from taxonomist.data.auto import fill_size
from taxonomist.data.cache import SplitArrays, images_path, read_labels, read_split
from taxonomist.data.dataset import (
    BlockRows,
    BlockShuffleSampler,
    CachedImageDataset,
    collate_batch,
    seed_worker_augment,
)
from taxonomist.data.transforms import build_augment
from taxonomist.models.distributed import RankShard

log = logging.getLogger(__name__)
MEMORY_SHARE = 0.5  # loading: auto reads the training split into memory up to this share of the RAM
BLOCK_BATCHES = 8  # a block holds at least this many batches (how well a batch is mixed) ...
BLOCK_BYTES = 256 * 2**20  # ... and at least this many bytes (one sequential read)


def choose_loading(setting: str, split_bytes: int, total_memory: int | None = None) -> tuple[str, str]:
    """``fit.loading`` resolved: ``memory`` or ``blocks``, and why."""
    if setting in ("memory", "blocks"):
        return setting, "set in fit.loading"
    if setting != "auto":
        raise ValueError(f"fit.loading={setting!r}: expected auto, memory or blocks")
    if total_memory is None:
        total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gib = 2**30
    if split_bytes <= MEMORY_SHARE * total_memory:
        return (
            "memory",
            f"the training images ({split_bytes / gib:.1f} GiB) fit in half the RAM ({total_memory / gib:.0f} GiB)",
        )
    return (
        "blocks",
        f"the training images ({split_bytes / gib:.1f} GiB) exceed half the RAM ({total_memory / gib:.0f} GiB)",
    )


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders over ``data/processed`` with the configured augmentation."""

    def __init__(self, cfg: DictConfig, processed_dir: str | Path = "data/processed"):
        super().__init__()
        self.cfg = cfg
        self.processed_dir = Path(processed_dir)
        self.task = read_labels(self.processed_dir)
        self.datasets: dict[str, CachedImageDataset] = {}
        self.block = 0  # rows per block when the training split is read in blocks (0: in memory)

    @property
    def classes(self) -> list[str]:
        """The model's output units (see :class:`taxonomist.tasks.Task`)."""
        return self.task.classes

    def train_targets(self) -> np.ndarray:
        """The training split's targets (for class weights and balanced sampling)."""
        return np.asarray(read_split(self.processed_dir, "train", mmap=True).labels)

    def balanced_sampler(self) -> WeightedRandomSampler:
        """Draw training images with probability inversely proportional to their class size."""
        targets = self.train_targets()
        weights = self.task.sample_weights(targets)
        return EpochWeightedSampler(torch.as_tensor(weights, dtype=torch.double), len(targets), int(self.cfg.seed))

    def setup(self, stage: str | None = None) -> None:
        pre = self.cfg.preprocess
        mean, std = list(pre.mean), list(pre.std)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        splits = wanted.get(stage or "", ("train", "val", "test"))
        for split in splits:
            if split in self.datasets:
                continue
            # Training reads random rows: into memory when it fits, else a block at a time; the
            # others stream from the mmap.
            arrays = read_split(self.processed_dir, split, mmap=True)
            if split == "train":
                arrays = self._training_arrays(arrays)
            augment = None
            if split == "train":  # sizes and paddings left at `auto` follow the cached images' size
                entries = fill_size(
                    OmegaConf.to_container(self.cfg.augment.train, resolve=True), arrays.images.shape[1]
                )
                # Under DDP each process augments its own images with its own draws (rank 0: the seed).
                augment = build_augment(entries, seed=int(self.cfg.seed) + 7919 * self.replicas()[1])
            self.datasets[split] = CachedImageDataset(arrays, mean, std, augment)

    def _training_arrays(self, arrays: SplitArrays) -> SplitArrays:
        """The training split in memory, or as :class:`BlockRows` (``fit.loading``)."""
        images = arrays.images
        split_bytes = int(images.size) * images.itemsize
        loading, why = choose_loading(str(self.cfg.fit.get("loading", "auto")), split_bytes)
        log.info("fit.loading: %s (%s)", loading, why)
        if loading == "memory":
            return SplitArrays(np.array(images), arrays.labels)
        if bool(self.cfg.task.balanced_sampling):  # weighted draws jump between blocks
            log.warning("task.balanced_sampling reads random rows of the memory-mapped split, not blocks")
            return arrays
        row_bytes = max(1, split_bytes // max(1, len(images)))
        batch = int(self.cfg.fit.batch_size) if str(self.cfg.fit.batch_size).isdigit() else 256
        self.block = max(BLOCK_BATCHES * batch, -(-BLOCK_BYTES // row_bytes))
        return SplitArrays(BlockRows(images_path(self.processed_dir, "train"), self.block), arrays.labels)

    def replicas(self) -> tuple[int, int]:
        """The number of training processes and this one's rank (1, 0 outside DDP)."""
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        """A loader of ``split``. A shuffled loader draws its order from ``(seed, epoch)`` alone
        (the sampler's ``set_epoch``, which Lightning calls each epoch), never from the global
        RNG, and its own generator gives the loader's worker seeds: so an epoch's order does not
        depend on when the loader's iterator was made, and training resumed from a checkpoint
        (:mod:`taxonomist.models.resume`) sees the same batches as an uninterrupted run.

        Under DDP (:mod:`taxonomist.models.distributed`) each process takes its shard of that
        order (:class:`RankShard`); an unshuffled loader (val, test) is the whole split in every
        process. Lightning's own sampler replacement is off (``use_distributed_sampler``: see
        :func:`taxonomist.models.callbacks.build_trainer`)."""
        workers = int(self.cfg.fit.num_workers)
        seed = int(self.cfg.seed)
        sampler: Sampler[int] | None = None
        if shuffle and bool(self.cfg.task.balanced_sampling):
            sampler = self.balanced_sampler()
        elif shuffle:  # in memory: one block, the whole split shuffled
            sampler = BlockShuffleSampler(len(self.datasets[split]), self.block or len(self.datasets[split]), seed)
        world, rank = self.replicas()
        if sampler is not None and world > 1:
            sampler = RankShard(sampler, world, rank)
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            worker_init_fn=seed_worker_augment if workers > 0 else None,
            collate_fn=collate_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, int(self.cfg.fit.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, int(self.cfg.evaluate.batch_size))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, int(self.cfg.evaluate.batch_size))


class EpochWeightedSampler(WeightedRandomSampler):
    """:class:`~torch.utils.data.WeightedRandomSampler` whose draws of an epoch come from
    ``(seed, epoch)`` alone: Lightning calls :meth:`set_epoch` before each epoch (otherwise each
    pass moves on to the next epoch), so a resumed run draws the same images as an
    uninterrupted one."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int) -> None:
        super().__init__(weights, num_samples, generator=torch.Generator())
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the images of ``epoch`` next."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
        self.generator.manual_seed(int(state[0]) << 32 | int(state[1]))
        self.epoch += 1
        return super().__iter__()
