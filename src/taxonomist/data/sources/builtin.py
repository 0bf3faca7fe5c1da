"""Small built-in sets that ship inside Python packages (offline): scikit-learn digits, scikit-image faces.

Both are written out as grayscale PNG files with a manifest, exactly as a user's folder of
images would be; no split is assigned (preprocess draws train/val/test).

The helpers :func:`png_bytes` and :func:`write_record` are shared with the other built-in
sources that write image files.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from taxonomist.data.manifest import Record
from taxonomist.files import sha256_bytes

FACE, NON_FACE = "face", "non-face"
N_FACES = 100  # lfw_subset(): "100 first images are faces and subsequent 100 are non-faces"


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image array: (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA."""
    if image.dtype != np.uint8:
        raise TypeError(f"png_bytes needs a uint8 array, got {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def write_record(
    out_dir: Path, rel: str, data: bytes, labels: Sequence[str], source_id: str, split: str = ""
) -> Record:
    """Write ``data`` to ``out_dir/rel`` and return its :class:`Record` (unsplit by default)."""
    target = out_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return Record(rel, tuple(labels), split, sha256_bytes(data), source_id)


def to_uint8(images: np.ndarray, max_value: float) -> np.ndarray:
    """Scale an array with values in ``[0, max_value]`` to uint8 ``[0, 255]`` (rounded)."""
    scaled = np.rint(np.asarray(images, dtype=np.float64) * (255.0 / max_value))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def write_arrays(images: np.ndarray, labels: Sequence[str], out_dir: Path, name: str) -> list[Record]:
    """Write uint8 ``images`` as ``out_dir/images/<label>/<name>_<index>.png``; source ids ``<name>:<index>``."""
    if len(images) != len(labels):
        raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
    records = []
    for idx in tqdm(range(len(images)), desc=name, unit="img", mininterval=1):
        rel = f"images/{labels[idx]}/{name}_{idx:05d}.png"
        records.append(write_record(out_dir, rel, png_bytes(images[idx]), (labels[idx],), f"{name}:{idx}"))
    return records


def materialise_digits(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """scikit-learn's handwritten digits: 1,797 8x8 grayscale images, labels "0".."9".

    The pixel values (0..16) are scaled to 0..255. ``cfg`` is not used: the data ships with
    scikit-learn.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = [str(int(t)) for t in digits.target]
    return write_arrays(to_uint8(digits.images, 16.0), labels, out_dir, "digits")


def materialise_faces(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """scikit-image's LFW subset: 200 25x25 grayscale crops, 100 "face" then 100 "non-face".

    ``skimage.data.lfw_subset()`` returns floats in 0..1 (its docstring says uint8, but the
    shipped array is float64); they are scaled to 0..255. ``cfg`` is not used: the data ships
    with scikit-image.
    """
    from skimage.data import lfw_subset

    images = lfw_subset()
    labels = [FACE if idx < N_FACES else NON_FACE for idx in range(len(images))]
    return write_arrays(to_uint8(images, 1.0), labels, out_dir, "faces")
