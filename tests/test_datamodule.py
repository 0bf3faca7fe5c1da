"""The DataModule's loaders and seeded augmentation; training reproducible from the seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from taxonomist.data.cache import SplitArrays, read_split
from taxonomist.data.datamodule import ImageDataModule
from taxonomist.data.dataset import BlockRows, BlockShuffleSampler, CachedImageDataset, seed_worker_augment
from taxonomist.data.transforms import build_augment
from taxonomist.models.callbacks import ema_update
from taxonomist.models.inference import load_classifier
from taxonomist.stages import train

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


@pytest.mark.parametrize(("workers", "precision"), [(0, "bf16-mixed"), (2, "32-true")])
def test_train_stage_is_reproducible_from_the_seed(staged, tmp_path, monkeypatch, workers, precision):
    """Two runs of the real train stage with the same seed write bit-identical weights."""
    monkeypatch.chdir(tmp_path)  # the stage writes reports/train_history.csv relative to the project
    cfg = staged["cfg"].copy()
    cfg.fit.num_workers = workers
    cfg.trainer.max_epochs = 2
    cfg.trainer.precision = precision
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.artifact_location = str(tmp_path / "mlartifacts")

    def weights(models_dir: Path) -> dict[str, torch.Tensor]:
        train.run(cfg, processed_dir=staged["processed"], models_dir=models_dir)
        return torch.load(models_dir / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    first, second = weights(tmp_path / "run1"), weights(tmp_path / "run2")
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


def test_balanced_sampling_draws_classes_evenly(staged, monkeypatch):
    cfg = staged["cfg"].copy()
    cfg.task.balanced_sampling = True
    module = ImageDataModule(cfg, staged["processed"])
    module.setup("fit")
    targets = np.array([0] * 90 + [1] * 10)  # a 9:1 imbalance
    monkeypatch.setattr(module, "train_targets", lambda: targets)
    drawn = targets[list(module.balanced_sampler())]
    assert len(drawn) == 100 and 0.35 < drawn.mean() < 0.65  # about half from the 10% class
    assert list(module.balanced_sampler()) == list(module.balanced_sampler())  # seeded
    loader = module.train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    cfg.task.balanced_sampling = False
    plain = ImageDataModule(cfg, staged["processed"])
    plain.setup("fit")
    assert isinstance(plain.train_dataloader().sampler, BlockShuffleSampler)


def test_an_epochs_order_depends_on_the_seed_and_the_epoch_only(staged, monkeypatch):
    """The training order of epoch n is the same however often the global RNG was drawn from,
    and in a fresh loader told the epoch (a resumed run): what resuming bit-identically needs."""
    for balanced in (False, True):
        cfg = staged["cfg"].copy()
        cfg.task.balanced_sampling = balanced
        module = ImageDataModule(cfg, staged["processed"])
        module.setup("fit")
        sampler = module.train_dataloader().sampler
        orders = [list(sampler) for _ in range(3)]  # epochs 0, 1, 2 (each pass moves on)
        assert orders[0] != orders[1] != orders[2]
        fresh = module.train_dataloader().sampler
        torch.rand(100)  # the global RNG moves: no effect
        fresh.set_epoch(2)
        assert list(fresh) == orders[2], balanced


def test_dataset_targets_are_float_rows_for_multilabel_data():
    arrays = SplitArrays(np.zeros((2, 4, 4, 1), np.uint8), np.array([[1, 0, 1], [0, 0, 0]], np.uint8))
    _, target = CachedImageDataset(arrays, [0.5], [0.5])[0]
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 0.0, 1.0]
    single = SplitArrays(np.zeros((2, 4, 4, 1), np.uint8), np.array([2, 0]))
    assert CachedImageDataset(single, [0.5], [0.5])[0][1].dtype == torch.long


def test_ema_checkpoint_holds_the_averaged_weights(staged, tmp_path, monkeypatch):
    """With the EMA callback the checkpoint's state_dict is the EMA (what evaluate and package
    load), and the raw weights ride along under current_model_state."""
    monkeypatch.chdir(tmp_path)
    cfg = staged["cfg"].copy()
    cfg.trainer.max_epochs = 2
    cfg.callbacks.ema = {"_target_": "taxonomist.models.callbacks.EMAWeightAveraging", "decay": 0.5}
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.artifact_location = str(tmp_path / "mlartifacts")
    train.run(cfg, processed_dir=staged["processed"], models_dir=tmp_path / "models")
    ckpt = torch.load(tmp_path / "models/best.ckpt", map_location="cpu", weights_only=False)
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    assert averaged.keys() == current.keys()
    weights = [k for k, v in averaged.items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(averaged[k], current[k]) for k in weights)
    loaded = load_classifier(tmp_path / "models/best.ckpt").state_dict()
    assert all(torch.equal(loaded[k], averaged[k]) for k in averaged if k.startswith("model."))  # not the losses
    assert len(loaded) == sum(k.startswith("model.") for k in averaged)


def test_batched_fetch_matches_single_items(staged):
    arrays = read_split(staged["processed"], "val")
    dataset = CachedImageDataset(arrays, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    batch = dataset.__getitems__([2, 0, 1])
    for (x, y), i in zip(batch, [2, 0, 1], strict=True):
        single_x, single_y = dataset[i]
        torch.testing.assert_close(x, single_x)
        assert y == single_y
    # The multiply-add standardises as (pixel / 255 - mean) / std.
    expected = (torch.from_numpy(np.array(arrays.images[2])).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(batch[0][0], expected)


def test_ema_decay_warms_up():
    update = ema_update(0.998)
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    update(averaged, current, torch.tensor(0))  # 1 - min(0.998, 1/10): 90% of the new weights
    torch.testing.assert_close(averaged[0], torch.full((3,), 0.9))
    averaged = [torch.zeros(3)]
    update(averaged, current, torch.tensor(100_000))  # warmed up: the configured decay
    torch.testing.assert_close(averaged[0], torch.full((3,), 0.002))
    counters = [torch.tensor(0)]
    update(counters, [torch.tensor(7)], torch.tensor(5))
    assert counters[0].item() == 7


def test_loaders_use_the_fetched_batch_as_it_is(staged):
    module = ImageDataModule(staged["cfg"], staged["processed"])
    module.setup("fit")
    x, y = next(iter(module.val_dataloader()))
    dataset = module.datasets["val"]
    batch = dataset.__getitems__(list(range(len(y))))
    assert torch.equal(x, batch.x) and torch.equal(y, batch.y)
    assert x.is_contiguous(memory_format=torch.channels_last)  # what a channels-last model takes
    # A loader with the default collate_fn still gets (image, target) samples from the batch.
    plain_x, plain_y = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(y))))
    torch.testing.assert_close(plain_x, x)
    assert torch.equal(plain_y, y)


def test_blocks_loading_reads_every_training_image_once_an_epoch(staged):
    cfg = staged["cfg"].copy()
    cfg.fit.loading = "blocks"
    module = ImageDataModule(cfg, staged["processed"])
    module.setup("fit")
    assert isinstance(module.datasets["train"].images, BlockRows)
    loader = module.train_dataloader()
    assert isinstance(loader.sampler, BlockShuffleSampler)
    cfg.fit.loading = "memory"
    memory = ImageDataModule(cfg, staged["processed"])
    memory.setup("fit")
    expected = np.sort(memory.datasets["train"].images.reshape(len(memory.datasets["train"]), -1), axis=0)
    for _ in range(2):  # two epochs, each a different order of the same images
        seen = np.concatenate([module.datasets["train"].images[idx] for idx in loader.batch_sampler])
        np.testing.assert_array_equal(np.sort(seen.reshape(len(seen), -1), axis=0), expected)
