"""Settings chosen from the data: ``auto`` in ``preprocess`` and ``model=auto``.

The preprocess stage looks at every image once (:func:`taxonomist.data.images.image_facts`),
then :func:`choose` resolves each ``auto`` value from the *training* split and says why:

* ``model`` (``model.name=auto``): transfer learning (``model.auto.transfer``, pretrained
  weights) for fewer than ``model.auto.transfer_below_images`` training images, otherwise
  ``model.auto.scratch`` from random weights (:func:`choose_model` says why).
* ``channels``: 1 only when every image is gray (a gray mode, or equal channels), else 3.
* ``image_size``: the median short side, rounded to a multiple of 8 and kept within the
  model's ``[min_image_size, max_image_size]``.
* ``resize_mode``: ``squash`` when 90% of the images are within 10% of square, ``center_crop``
  when they are within 2:1, else ``pad`` (cropping elongated images would cut off too much).
* ``mean`` / ``std``: measured per channel on the training split at the chosen settings.
* ``fit.batch_size`` (resolved by :func:`resolve`, from the training split's size): 256, or a
  sixteenth of the training images for smaller sets (a power of two, at least 16), so a small
  set still gets enough optimizer steps per epoch.

Explicit values always win. The choices are recorded in ``data/processed/report.json``
(``settings``); :func:`resolve` puts them into the config the later stages use, so training,
evaluation, the MLflow params and the model card all see numbers, never ``auto``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from taxonomist.config import AUTO
from taxonomist.errors import StageOrderError, missing_input
from taxonomist.files import read_json

REPORT_FILE = "report.json"
SQUARE_RATIO = 1.1  # squash when 90% of the images are within this aspect ratio of square...
CROP_RATIO = 2.0  # ... center_crop when within this one, else pad
SIZE_STEP = 8
MAX_BATCH, MIN_BATCH, STEPS_PER_EPOCH = 256, 16, 16  # fit.batch_size: auto
# Keys of an augmentation entry that follow the image size (conf/augment: height: ${preprocess.image_size}).
SIZE_KEYS = ("height", "width", "size")


@dataclass
class Choice:
    """The resolved settings and, for every ``auto`` one, the reason (one line, for people)."""

    preprocess: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``settings`` block of ``report.json``."""
        return {"preprocess": self.preprocess, "model": self.model, "auto": self.reasons}


def is_auto(value: Any) -> bool:
    """Whether a config value asks to be chosen from the data."""
    return isinstance(value, str) and value == AUTO


def choose_model(model_cfg: DictConfig, train_images: int) -> tuple[dict[str, Any], str | None]:
    """The model block to train (``model.auto``'s transfer or scratch candidate, or the
    configured model as it is) and the reason when it was chosen.

    Transfer learning below ``model.auto.transfer_below_images`` training images, else the
    small network from scratch: measured with ``benchmarks/transfer.py`` (README), ImageNet
    weights won on 136 face crops and lost on 1,222 digits and 1,095 colour emoji, where
    ``resnet10_narrow`` from scratch was best by far.
    """
    block = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(block, dict)
    if not is_auto(block["name"]):
        return block, None
    auto = block["auto"]
    limit = int(auto["transfer_below_images"])
    if train_images < limit:
        chosen = auto["transfer"]
        reason = f"transfer learning from pretrained weights ({train_images:,} training images < {limit:,})"
    else:
        chosen = auto["scratch"]
        reason = f"from scratch ({train_images:,} training images >= {limit:,})"
    return dict(chosen), f"{chosen['name']}, {reason}"


def choose_channels(gray: pd.Series) -> tuple[int, str]:
    """1 when every image is gray, else 3; with the reason."""
    colour = int((~gray.astype(bool)).sum())
    if colour == 0:
        return 1, f"all {len(gray):,} images are grayscale"
    return 3, f"{colour:,} of {len(gray):,} images have colour"


def choose_image_size(short_sides: pd.Series, model: dict[str, Any]) -> tuple[int, str]:
    """The median short side, rounded to a multiple of 8, within the model's size range."""
    median = float(np.median(short_sides))
    low, high = int(model["min_image_size"]), int(model["max_image_size"])
    rounded = max(SIZE_STEP, SIZE_STEP * round(median / SIZE_STEP))
    size = min(max(rounded, low), high)
    why = f"median short side {median:g} px"
    if size != rounded:
        bound = "raised to" if size == low else "lowered to"
        why += f", {bound} {model['name']}'s {'minimum' if size == low else 'maximum'} {size} px"
    return size, why


def choose_resize_mode(widths: pd.Series, heights: pd.Series) -> tuple[str, str]:
    """squash / center_crop / pad from the 90th percentile of the images' aspect ratios."""
    ratio = np.maximum(widths, heights) / np.maximum(np.minimum(widths, heights), 1)
    p90 = float(np.quantile(ratio, 0.9))
    if p90 <= SQUARE_RATIO:
        return "squash", f"90% of the images are within {SQUARE_RATIO}:1 of square"
    if p90 <= CROP_RATIO:
        return "center_crop", f"90% of the aspect ratios are within {p90:.2f}:1 (cropping keeps the scale)"
    return "pad", f"10% of the images are more elongated than {p90:.2f}:1 (padding keeps all of them)"


def choose(cfg: DictConfig, train_facts: pd.DataFrame) -> Choice:
    """Resolve the ``auto`` settings that decide how images are decoded (all but mean/std,
    which :func:`measure_normalisation` adds after decoding) from the training split's facts
    (columns ``width``, ``height``, ``gray``)."""
    pre = cfg.preprocess
    choice = Choice()
    if is_auto(pre.channels):
        channels, choice.reasons["preprocess.channels"] = choose_channels(train_facts["gray"])
    else:
        channels = int(pre.channels)
    model, why = choose_model(cfg.model, len(train_facts))
    if why:
        choice.reasons["model"] = why
    choice.model = model
    if is_auto(pre.image_size):
        short = np.minimum(train_facts["width"], train_facts["height"])
        size, choice.reasons["preprocess.image_size"] = choose_image_size(short, model)
    else:
        size = int(pre.image_size)
    if is_auto(pre.resize_mode):
        mode, choice.reasons["preprocess.resize_mode"] = choose_resize_mode(train_facts["width"], train_facts["height"])
    else:
        mode = str(pre.resize_mode)
    choice.preprocess = {"image_size": size, "resize_mode": mode, "channels": channels}
    return choice


def choose_batch_size(train_images: int) -> tuple[int, str]:
    """``fit.batch_size: auto``: at most 256, and small enough for 16 steps an epoch (a power of two >= 16)."""
    fits = max(train_images // STEPS_PER_EPOCH, 1)
    size = max(MIN_BATCH, min(MAX_BATCH, 1 << (fits.bit_length() - 1)))
    if size == MAX_BATCH:
        return size, f"{train_images:,} training images"
    return size, f"{train_images:,} training images: {STEPS_PER_EPOCH}+ steps an epoch"


def measure_normalisation(train_images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units, 4 decimals) of uint8 (N, H, W, C) images."""
    channels = train_images.shape[-1]
    total = np.zeros(channels)
    squares = np.zeros(channels)
    count = 0
    for start in range(0, len(train_images), chunk):
        part = np.asarray(train_images[start : start + chunk], dtype=np.float64).reshape(-1, channels) / 255.0
        total += part.sum(axis=0)
        squares += np.square(part).sum(axis=0)
        count += len(part)
    if count == 0:
        return [0.5] * channels, [0.5] * channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    std = np.where(std < 1e-3, 1.0, std)  # a constant channel: leave its scale alone
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def add_normalisation(choice: Choice, cfg: DictConfig, train_images: np.ndarray) -> None:
    """Record the measured mean/std (used where ``preprocess.mean/std`` are ``auto``)."""
    mean, std = measure_normalisation(train_images)
    choice.preprocess["measured_mean"], choice.preprocess["measured_std"] = mean, std
    if is_auto(cfg.preprocess.mean):
        choice.preprocess["mean"], choice.preprocess["std"] = mean, std
        choice.reasons["preprocess.mean"] = f"measured on the {len(train_images):,} training images"
    else:
        choice.preprocess["mean"] = [float(v) for v in cfg.preprocess.mean]
        choice.preprocess["std"] = [float(v) for v in cfg.preprocess.std]


def read_settings(processed_dir: str | Path) -> dict[str, Any]:
    """The ``settings`` block preprocess recorded in ``report.json``."""
    path = Path(processed_dir) / REPORT_FILE
    if not path.is_file():
        raise missing_input(path, "preprocess")
    settings = read_json(path).get("settings")
    if not settings:
        raise StageOrderError(f"{path} records no settings (written by an older version): run the preprocess stage")
    return settings


def resolve(cfg: DictConfig, processed_dir: str | Path) -> DictConfig:
    """A copy of ``cfg`` with every ``auto`` replaced by what preprocess chose (and the
    augmentation's ``height``/``width``/``size: auto`` by the image size).

    Explicit mean/std (train-stage settings) win over the measured ones; an explicit decode
    setting (size, channels, resize mode) that differs from the data preprocess wrote means
    preprocess has not run since it changed: :class:`StageOrderError`.
    """
    settings = read_settings(processed_dir)
    chosen = settings["preprocess"]
    train_images = int(read_json(Path(processed_dir) / REPORT_FILE)["per_split"]["train"])
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    pre = out.preprocess
    for key in ("image_size", "resize_mode", "channels"):
        if not is_auto(pre[key]) and pre[key] != chosen[key]:
            raise StageOrderError(
                f"preprocess.{key}={pre[key]} but data/processed was made with {chosen[key]}: run the preprocess stage"
            )
        pre[key] = chosen[key]
    if is_auto(pre.mean):
        pre.mean, pre.std = list(chosen["mean"]), list(chosen["std"])
    if is_auto(out.model.name):
        out.model = settings["model"]
    if is_auto(out.fit.batch_size):
        out.fit.batch_size = choose_batch_size(train_images)[0]
    size = int(pre.image_size)
    out.augment.train = fill_size(OmegaConf.to_container(out.augment.train) or [], size)
    return out


def fill_size(entry: Any, size: int) -> Any:
    """``entry`` (augmentation entries) with every ``height``/``width``/``size: auto`` set to ``size``."""
    if isinstance(entry, dict):
        return {k: size if k in SIZE_KEYS and is_auto(v) else fill_size(v, size) for k, v in entry.items()}
    if isinstance(entry, list):
        return [fill_size(v, size) for v in entry]
    return entry


def describe(settings: dict[str, Any]) -> list[str]:
    """One line per ``auto`` choice: ``preprocess.channels = 3 (412 of 720 images have colour)``."""
    pre, lines = settings["preprocess"], []
    for key, why in settings.get("auto", {}).items():
        if key == "model":
            lines.append(f"model = {why}")
            continue
        name = key.split(".", 1)[1]
        lines.append(f"{key} = {pre[name]} ({why})")
    return lines
