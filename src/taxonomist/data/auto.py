"""Settings chosen from the data: ``auto`` in ``preprocess`` and ``model=auto``.

The preprocess stage looks at every image once (:func:`taxonomist.data.images.image_facts`),
then :func:`choose` resolves each ``auto`` value from the *training* split and says why:

* ``model`` (``model.name=auto``): transfer learning (``model.auto.transfer``, pretrained
  weights) for fewer than ``model.auto.transfer_below_images`` training images, otherwise
  ``model.auto.small`` (small images) or ``model.auto.scratch`` from random weights
  (:func:`choose_model` says why).
* ``channels``: 1 only when every image is gray (a gray mode, or equal channels), else 3.
* ``image_size``: the median short side, rounded to a multiple of 8 (of 4 up to 64 px) and kept within the
  model's ``[min_image_size, max_image_size]``.
* ``resize_mode``: ``squash`` when 90% of the images are within 10% of square, ``center_crop``
  when they are within 2:1, else ``pad`` (cropping elongated images would cut off too much).
* ``mean`` / ``std``: measured per channel on the training split at the chosen settings.
* ``trainer.precision`` (resolved by :func:`resolve`, from the machine, not the data):
  :func:`choose_precision`.
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
SIZE_STEP = 8  # image sizes are multiples of 8 ...
SMALL_SIZE_STEP, SMALL_SIZE = 4, 64  # ... or of 4 up to 64 px (28 px Fashion-MNIST stays 28 px)
MAX_BATCH, MIN_BATCH, STEPS_PER_EPOCH = 256, 16, 16  # fit.batch_size: auto
# Keys of an augmentation entry that follow the image size (conf/augment: height: ${preprocess.image_size}).
SIZE_KEYS = ("height", "width", "size")
PAD_KEY, PAD_PER_PX = "padding", 14  # padding: auto = 1 px per 14 px of image (2 at 28 px, 4 at 56 px)


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


def choose_model(
    model_cfg: DictConfig, train_images: int, short_side: float | None = None
) -> tuple[dict[str, Any], str | None]:
    """The model block to train (one of ``model.auto``'s candidates, or the configured model
    as it is) and the reason when it was chosen.

    Transfer learning below ``model.auto.transfer_below_images`` training images, else a small
    network from scratch: measured with ``benchmarks/transfer.py`` (README), ImageNet weights
    won on 136 face crops and lost on 1,222 digits and 1,095 colour emoji, where
    ``resnet10_narrow`` from scratch was best by far. From scratch, images whose median short
    side (``short_side``) is at most ``model.auto.small_below_px`` get ``model.auto.small``,
    a network for their own resolution (``resnet10_native``: 28 px Fashion-MNIST is not
    upsampled to 56 px), the others ``model.auto.scratch``.
    """
    block = OmegaConf.to_container(model_cfg, resolve=True)
    assert isinstance(block, dict)
    if not is_auto(block["name"]):
        return block, None
    auto = block["auto"]
    limit = int(auto["transfer_below_images"])
    small = auto.get("small_below_px")
    if train_images < limit:
        chosen = auto["transfer"]
        reason = f"transfer learning from pretrained weights ({train_images:,} training images < {limit:,})"
    elif small is not None and short_side is not None and short_side <= float(small):
        chosen = auto["small"]
        reason = (
            f"from scratch ({train_images:,} training images >= {limit:,}), at the images' own resolution "
            f"(median short side {short_side:g} px <= {small} px)"
        )
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
    """The median short side, rounded to a multiple of 8 (of 4 up to 64 px), within the model's size range."""
    median = float(np.median(short_sides))
    low, high = int(model["min_image_size"]), int(model["max_image_size"])
    step = SMALL_SIZE_STEP if median <= SMALL_SIZE else SIZE_STEP
    rounded = max(step, step * round(median / step))
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
    short = np.minimum(train_facts["width"], train_facts["height"])
    model, why = choose_model(cfg.model, len(train_facts), float(np.median(short)) if len(short) else None)
    if why:
        choice.reasons["model"] = why
    choice.model = model
    if is_auto(pre.image_size):
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


def choose_precision(accelerator: str = "auto") -> tuple[str, str]:
    """``trainer.precision: auto``: mixed precision where the hardware computes it natively,
    else full precision; with the reason.

    CUDA: ``bf16-mixed`` where the GPU supports bfloat16, else ``16-mixed``. CPU: ``bf16-mixed``
    on CPUs with bfloat16 instructions (AMX or AVX-512 BF16), else ``32-true``: without them
    bfloat16 is emulated, and bf16 autocast trained 8x slower than fp32 on an AVX2-only AMD
    EPYC (``benchmarks/training.py``, README). Other accelerators (MPS, ...) get ``32-true``.
    """
    import torch

    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", "a CUDA GPU with bfloat16"
        return "16-mixed", "a CUDA GPU without bfloat16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator}"
    caps = torch.cpu.get_capabilities()
    native = [flag for flag in ("amx_bf16", "avx512_bf16") if caps.get(flag)]
    name = caps.get("cpu_name") or "this CPU"
    if native:
        return "bf16-mixed", f"{name} has {' and '.join(native)}"
    return "32-true", f"{name} has no bfloat16 instructions (no AMX, no AVX-512 BF16): fp32 is faster"


class PixelStats:
    """Per-channel sums of the pixel values and of their squares (exact integers), added up
    batch by batch, or across processes with ``+``: the measured normalisation of a split
    that never sits in memory at once."""

    def __init__(self, channels: int) -> None:
        self.total = np.zeros(channels, np.int64)
        self.squares = np.zeros(channels, np.int64)
        self.count = 0  # pixels per channel

    def add(self, images: np.ndarray) -> PixelStats:
        """Add uint8 images (..., C); return self."""
        flat = np.asarray(images, dtype=np.uint8).reshape(-1, len(self.total))
        levels = np.arange(256, dtype=np.int64)
        for c in range(len(self.total)):  # a histogram per channel: exact, and no int64 copy of the pixels
            counts = np.bincount(flat[:, c], minlength=256)
            self.total[c] += counts @ levels
            self.squares[c] += counts @ (levels * levels)
        self.count += len(flat)
        return self

    def __add__(self, other: PixelStats) -> PixelStats:
        out = PixelStats(len(self.total))
        out.total, out.squares, out.count = (
            self.total + other.total,
            self.squares + other.squares,
            self.count + other.count,
        )
        return out

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units, 4 decimals (0.5 each when empty)."""
        channels = len(self.total)
        if self.count == 0:
            return [0.5] * channels, [0.5] * channels
        mean = self.total / (255.0 * self.count)
        std = np.sqrt(np.maximum(self.squares / (255.0**2 * self.count) - np.square(mean), 0.0))
        std = np.where(std < 1e-3, 1.0, std)  # a constant channel: leave its scale alone
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def measure_normalisation(train_images: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (in [0, 1] units, 4 decimals) of uint8 (N, H, W, C) images."""
    stats = PixelStats(train_images.shape[-1])
    for start in range(0, len(train_images), chunk):
        stats.add(train_images[start : start + chunk])
    return stats.mean_std()


def add_normalisation(
    choice: Choice, cfg: DictConfig, train_images: np.ndarray | PixelStats, images: int | None = None
) -> None:
    """Record the measured mean/std (used where ``preprocess.mean/std`` are ``auto``) of the
    training images, given as an array or as their :class:`PixelStats` (then ``images`` is
    how many there were)."""
    if isinstance(train_images, PixelStats):
        mean, std = train_images.mean_std()
        count = int(images or 0)
    else:
        mean, std = measure_normalisation(train_images)
        count = len(train_images)
    choice.preprocess["measured_mean"], choice.preprocess["measured_std"] = mean, std
    if is_auto(cfg.preprocess.mean):
        choice.preprocess["mean"], choice.preprocess["std"] = mean, std
        choice.reasons["preprocess.mean"] = f"measured on the {count:,} training images"
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
    if is_auto(out.trainer.get("precision")):
        out.trainer.precision = choose_precision(str(out.trainer.accelerator))[0]
    size = int(pre.image_size)
    out.augment.train = fill_size(OmegaConf.to_container(out.augment.train) or [], size)
    return out


def fill_size(entry: Any, size: int) -> Any:
    """``entry`` (augmentation entries) with every ``height``/``width``/``size: auto`` set to
    ``size`` and every ``padding: auto`` to ``size / 14`` (a shift of up to 7% of the image)."""
    if isinstance(entry, dict):
        return {k: _filled(k, v, size) for k, v in entry.items()}
    if isinstance(entry, list):
        return [fill_size(v, size) for v in entry]
    return entry


def _filled(key: str, value: Any, size: int) -> Any:
    if not is_auto(value):
        return fill_size(value, size)
    if key in SIZE_KEYS:
        return size
    if key == PAD_KEY:
        return max(1, round(size / PAD_PER_PX))
    return value


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
