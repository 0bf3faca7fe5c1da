"""LightningDataModule over the preprocessed cache."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, WeightedRandomSampler

from taxonomist.data.auto import fill_size
from taxonomist.data.cache import read_labels, read_split
from taxonomist.data.dataset import CachedImageDataset, collate_batch, seed_worker_augment
from taxonomist.data.transforms import build_augment


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders over ``data/processed`` with the configured augmentation."""

    def __init__(self, cfg: DictConfig, processed_dir: str | Path = "data/processed"):
        super().__init__()
        self.cfg = cfg
        self.processed_dir = Path(processed_dir)
        self.task = read_labels(self.processed_dir)
        self.datasets: dict[str, CachedImageDataset] = {}

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
        generator = torch.Generator().manual_seed(int(self.cfg.seed))
        return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(targets), generator=generator)

    def setup(self, stage: str | None = None) -> None:
        pre = self.cfg.preprocess
        mean, std = list(pre.mean), list(pre.std)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        splits = wanted.get(stage or "", ("train", "val", "test"))
        for split in splits:
            if split in self.datasets:
                continue
            # Training reads random rows: load it into memory; the others stream from the mmap.
            arrays = read_split(self.processed_dir, split, mmap=split != "train")
            augment = None
            if split == "train":  # sizes and paddings left at `auto` follow the cached images' size
                entries = fill_size(
                    OmegaConf.to_container(self.cfg.augment.train, resolve=True), arrays.images.shape[1]
                )
                augment = build_augment(entries, seed=int(self.cfg.seed))
            self.datasets[split] = CachedImageDataset(arrays, mean, std, augment)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        workers = int(self.cfg.fit.num_workers)
        sampler = self.balanced_sampler() if shuffle and bool(self.cfg.task.balanced_sampling) else None
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
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
