"""Training-side figures: the pipeline's Lightning loop against a minimal raw PyTorch loop,
the data loader against what a training step consumes, and time per epoch as the data grows.

All of them use the project's default config (``params.yaml``) and its preprocessed data
(``data/processed``), so run the pipeline (or at least its preprocess stage) first.

- **Raw loop**: the same timm backbone, batch size, precision, channels-last setting and
  optimizer, over the training split held in memory as one standardised tensor; no
  augmentation, no metrics, no callbacks. This is the compute a training step costs.
- **Pipeline loop**: ``ClassifierModule`` + ``ImageDataModule`` + the train stage's
  per-step callbacks under the train stage's ``Trainer``: augmentation, metrics, EMA and the
  progress bar included. Both are timed over the same number of steps after a warm-up.
- **Loader**: the train stage's ``DataLoader`` alone (default augmentation), in images/s.
- **Scaling**: one pipeline epoch over the first 10k, 30k and 60k images of train + val.
- **Seeds**: the train stage with other seeds on the same preprocessed data (test accuracy of
  each, for the mean and spread of the default recipe).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from taxonomist.config import load_params
from taxonomist.data import auto
from taxonomist.data.cache import read_labels, read_split, write_labels, write_split
from taxonomist.data.datamodule import ImageDataModule
from taxonomist.data.transforms import standardisation
from taxonomist.models.backbone import create_backbone
from taxonomist.models.callbacks import build_callbacks, build_trainer
from taxonomist.models.module import OPTIMIZER_TARGETS
from taxonomist.stages import train

PROCESSED = Path("data/processed")


def default_config(root: Path) -> DictConfig:
    cfg = auto.resolve(load_params(root / "params.yaml"), root / PROCESSED)  # the settings preprocess chose
    train.configure_torch(cfg)
    return cfg


def _autocast(cfg: DictConfig):
    precision = str(cfg.trainer.precision)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast("cpu", dtype=dtype, enabled=precision.endswith("-mixed"))


def raw_loop(cfg: DictConfig, processed: Path, steps: int, warmup: int) -> float:
    """Images/s of a minimal PyTorch training loop (see the module docstring)."""
    arrays = read_split(processed, "train", mmap=False)
    space = read_labels(processed)
    scale, shift = standardisation(cfg.preprocess.mean, cfg.preprocess.std)
    x_all = torch.from_numpy(arrays.images.astype(np.float32) * scale + shift)
    x_all = x_all.permute(0, 3, 1, 2)  # channels-last memory, NCHW shape
    if not cfg.model.channels_last:
        x_all = x_all.contiguous()
    y_all = torch.as_tensor(np.asarray(arrays.labels))
    model = create_backbone(cfg.model, num_classes=space.num_outputs, in_chans=x_all.shape[1])
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer = instantiate(opt_cfg, _execution_whitelist_=list(OPTIMIZER_TARGETS))(params=model.parameters())
    batch = int(cfg.fit.batch_size)
    generator = torch.Generator().manual_seed(0)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.randint(len(y_all), (batch,), generator=generator)
        x, y = x_all[idx], y_all[idx]
        with _autocast(cfg):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


class StepTimer(L.Callback):
    """Times training batches ``warmup`` .. the last (loading included): images/s, and the
    seconds each epoch took."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0
        self.images = 0
        self.epoch_seconds: list[float] = []
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.start = now
        elif self.start is not None:
            self.images += len(batch[1])
            self.end = now

    @property
    def throughput(self) -> float:
        return self.images / (self.end - self.start) if self.start is not None and self.end > self.start else 0.0


def pipeline_fit(cfg: DictConfig, processed: Path, warmup: int, steps: int | None = None) -> StepTimer:
    """Fit one epoch (``steps`` batches, or all) as the train stage does, without validation."""
    datamodule = ImageDataModule(cfg, processed)
    in_chans = int(read_split(processed, "val").images.shape[-1])
    module = train.build_module(cfg, datamodule, in_chans)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        # The configured per-step callbacks (progress bar, EMA); no checkpoint or early stopping.
        trainer = build_trainer(
            cfg,
            [timer, *build_callbacks(cfg).values()],
            default_root_dir=Path(tmp),
            max_epochs=1,
            limit_train_batches=(warmup + steps) if steps else 1.0,
            limit_val_batches=0,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=datamodule)
    return timer


def loader(cfg: DictConfig, processed: Path, batches: int, warmup: int = 2) -> float:
    """Images/s of the train stage's training DataLoader (default augmentation) on its own."""
    datamodule = ImageDataModule(cfg, processed)
    datamodule.setup("fit")
    images, start = 0, 0.0
    for i, (x, _) in enumerate(datamodule.train_dataloader()):
        if i == warmup:
            start = time.perf_counter()
        elif i > warmup:
            images += len(x)
        if i == warmup + batches:
            break
    return images / (time.perf_counter() - start)


def scaling(cfg: DictConfig, processed: Path, sizes: tuple[int, ...]) -> dict[int, float]:
    """Seconds of one pipeline training epoch over the first N images of train + val."""
    train_split, val_split = read_split(processed, "train", mmap=False), read_split(processed, "val", mmap=False)
    images = np.concatenate([train_split.images, val_split.images])
    labels = np.concatenate([train_split.labels, val_split.labels])
    order = np.random.default_rng(0).permutation(len(labels))
    seconds = {}
    for n in sizes:
        if n > len(labels):
            raise SystemExit(f"scaling: {n} images asked for, the data has {len(labels)}")
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_split(folder, "train", images[order[:n]], labels[order[:n]])
            write_split(folder, "val", val_split.images[:256], val_split.labels[:256])
            write_labels(folder, read_labels(processed))
            seconds[n] = pipeline_fit(cfg, folder, warmup=1).epoch_seconds[0]
    return seconds


def seed_accuracy(root: Path, seed: int) -> float:
    """Test accuracy of the default config trained (the train stage, in a temporary folder,
    logged to a temporary MLflow store) with ``seed`` on the current ``data/processed``."""
    from taxonomist.models.inference import load_classifier
    from taxonomist.stages.evaluate import predict_split

    params = load_params(root / "params.yaml")
    params.seed = seed
    processed = root / PROCESSED
    with tempfile.TemporaryDirectory() as tmp:
        params.tracking.uri = f"sqlite:///{tmp}/mlflow.db"
        params.tracking.artifact_location = f"{tmp}/mlartifacts"
        train.run(params, processed, models_dir=Path(tmp) / "models", history_file=Path(tmp) / "history.csv")
        cfg = auto.resolve(params, processed)
        model = load_classifier(Path(tmp) / "models/best.ckpt", tta=str(cfg.augment.tta))
    pre = cfg.preprocess
    logits, target = predict_split(model, processed, "test", 512, pre.mean, pre.std)
    return float((logits.argmax(1) == target).mean())
