"""Decode, validate and resize images into uint8 arrays of one size and channel count."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from taxonomist.errors import DataError

# Decompression-bomb guard: refuse images over this many pixels instead of exhausting memory.
MAX_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class InvalidImage(DataError):
    """An image that cannot be used; the message says why (preprocess quarantines it)."""


@dataclass(frozen=True)
class ImageSpec:
    """Target geometry for the cache: ``size`` x ``size`` pixels with ``channels`` channels."""

    size: int
    channels: int
    resize_mode: str = "squash"


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (1 channel) or "RGB" (3), flattening alpha onto white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr / hi * 255.0).astype(np.uint8), mode="L")
    return img.convert("L" if channels == 1 else "RGB")


def resize(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """Resize to ``spec.size`` square: squash, center_crop (cover then crop) or pad (letterbox)."""
    target = (spec.size, spec.size)
    if img.size == target:
        return img
    if spec.resize_mode == "center_crop":
        return ImageOps.fit(img, target, method=Image.Resampling.BILINEAR)
    if spec.resize_mode == "pad":
        return ImageOps.pad(img, target, method=Image.Resampling.BILINEAR, color=0)
    return img.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)


def decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode encoded image bytes into a (size, size, channels) uint8 array.

    Raises :class:`InvalidImage` for data that does not decode fully (truncated, corrupt,
    not an image, or too large).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            img = ImageOps.exif_transpose(img) or img
            if img.width < 1 or img.height < 1:
                raise InvalidImage(f"empty image ({img.width}x{img.height})")
            out = resize(to_mode(img, spec.channels), spec)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as err:
        raise InvalidImage(f"too large: {err}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidImage(f"cannot decode: {err}") from None
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr
