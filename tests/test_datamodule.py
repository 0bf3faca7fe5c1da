"""The DataModule's loaders and seeded augmentation; training reproducible from the seed."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from taxonomist.data.cache import SplitArrays
from taxonomist.data.datamodule import CachedImageDataset, ImageDataModule, seed_worker_augment
from taxonomist.data.transforms import build_augment
from taxonomist.models.module import ClassifierModule

# --------------------------------------------------------------------------- seeded augmentation and training

AUGMENT = [
    {"_target_": "albumentations.HorizontalFlip", "p": 0.5},
    {"_target_": "albumentations.Affine", "translate_px": {"x": [-4, 4], "y": [-4, 4]}, "p": 0.5},
]


def augmented(seed: int | None, n: int = 12) -> np.ndarray:
    image = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32, 1)
    augment = build_augment(AUGMENT, seed=seed)
    return np.stack([augment(image=image)["image"] for _ in range(n)])


def test_augmentation_is_seeded():
    np.testing.assert_array_equal(augmented(3), augmented(3))
    assert not np.array_equal(augmented(3), augmented(4))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_is_deterministic(staged, workers):
    cfg = staged["cfg"].copy()
    cfg.train.num_workers = workers
    cfg.trainer.max_epochs = 2

    def fit_once() -> dict[str, torch.Tensor]:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = ImageDataModule(cfg, staged["processed"])
        module = ClassifierModule(OmegaConf.to_container(cfg, resolve=True), datamodule.classes, in_chans=3)
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
        )
        trainer.fit(module, datamodule=datamodule)
        return {k: v.clone() for k, v in module.state_dict().items()}

    first, second = fit_once(), fit_once()
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


def test_loader_workers_augment_differently():
    # Every item is the same image: with one shared seed, worker 0 and worker 1 would return
    # identical first batches.
    image = np.arange(32 * 32, dtype=np.uint8).reshape(1, 32, 32, 1).repeat(16, axis=0)
    dataset = CachedImageDataset(
        SplitArrays(image, np.zeros(16, dtype=np.int64)), [0.5], [0.25], build_augment(AUGMENT, 0)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, worker_init_fn=seed_worker_augment)
    first, second = (x for x, _ in loader)
    assert not torch.equal(first, second)
