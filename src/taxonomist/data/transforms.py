"""Albumentations pipelines built from config, and the normalisation shared by all paths."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no update check over the network

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    import albumentations as A

# Config-controlled ``_target_`` values an ``augment.train`` entry may name.
AUGMENT_TARGETS = ("albumentations.*",)


def build_augment(entries: ListConfig | Sequence[Any] | None, seed: int | None = None) -> A.Compose | None:
    """Instantiate a list of ``{_target_: albumentations.X, ...}`` entries as one Compose.

    Albumentations keeps its own random state, which global seeding does not reach: ``seed``
    makes the sequence of augmentations reproducible.
    """
    if not entries:
        return None
    items = OmegaConf.to_container(entries, resolve=True) if isinstance(entries, ListConfig) else entries
    transforms = []
    for i, entry in enumerate(items):  # type: ignore[arg-type]
        try:
            transforms.append(instantiate(entry, _execution_whitelist_=list(AUGMENT_TARGETS)))
        except Exception as err:
            raise ValueError(f"augment.train[{i}] ({entry.get('_target_')}): {err}") from err
    import albumentations as A  # imported by the stages that augment only (it takes seconds)

    return A.Compose(transforms, seed=seed)


def standardisation(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(scale, shift)`` with ``pixel * scale + shift == (pixel / 255 - mean) / std``:
    standardising uint8 pixels becomes one multiply and one add."""
    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (255.0 * std64)).astype(np.float32), (-mean64 / std64).astype(np.float32)


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), scaled to [0, 1] then standardised."""
    scale, shift = standardisation(mean, std)
    x = np.asarray(images, dtype=np.uint8).astype(np.float32) * scale + shift
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_settings(cfg: DictConfig) -> dict[str, Any]:
    """The preprocessing a packaged model must repeat on raw images."""
    pre = cfg.preprocess
    return {
        "image_size": int(pre.image_size),
        "channels": int(pre.channels),
        "resize_mode": str(pre.resize_mode),
        "mean": [float(v) for v in pre.mean],
        "std": [float(v) for v in pre.std],
    }
