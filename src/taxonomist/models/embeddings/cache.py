"""Feature vectors of image arrays, and the ``data/features/`` cache of the processed splits.

:func:`embed` runs an extractor over uint8 images (N, H, W, C) in batches, with a progress bar.
:func:`split_features` keeps each split's vectors in ``data/features/<split>.npy`` beside
``key.json``, which records what they were built from: the extractor's config and code, the
split's pixels (the hash of ``data/processed/<split>_images.npy``) and the split assignment. A
cache built from anything else (another extractor, other data) is rebuilt, with a log line saying why, never reused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from taxonomist.data.cache import read_split
from taxonomist.files import atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)
FEATURES_DIR = Path("data/features")
KEY_FILE = "key.json"


@torch.inference_mode()
def embed(extractor: nn.Module, images: np.ndarray, batch_size: int = 256, desc: str = "features") -> np.ndarray:
    """Features (N, D) float32 of uint8 ``images`` (N, H, W, C), read ``batch_size`` rows at a time."""
    extractor.eval()
    parts: list[np.ndarray] = []
    total = len(images)
    with tqdm(total=total, desc=desc, unit="img", disable=total < 4 * batch_size, leave=False) as bar:
        for start in range(0, total, batch_size):
            rows = np.array(images[start : start + batch_size])  # a copy: memory-mapped rows are read-only
            x = torch.from_numpy(rows).permute(0, 3, 1, 2).float().div_(255.0)
            parts.append(extractor(x).float().numpy())
            bar.update(len(rows))
    if not parts:
        raise ValueError("no images to embed")
    return np.concatenate(parts).astype(np.float32, copy=False)


def cache_key(spec: dict[str, Any], processed_dir: Path, split: str) -> dict[str, Any]:
    """What ``split``'s cached features depend on."""
    from taxonomist.models.embeddings.features import __file__ as extractor_code

    return {
        "extractor": spec,
        "extractor_code": sha256_file(Path(extractor_code))[:16],
        "splits": sha256_file(processed_dir / "splits.csv")[:16],
        "images": sha256_file(processed_dir / f"{split}_images.npy")[:16],
    }


def split_features(
    extractor: nn.Module,
    spec: dict[str, Any],
    processed_dir: Path,
    split: str,
    folder: Path = FEATURES_DIR,
    batch_size: int = 256,
) -> np.ndarray:
    """``split``'s features, from ``folder`` when they were built from the same extractor and
    data (:func:`cache_key`), else built now and written there."""
    folder.mkdir(parents=True, exist_ok=True)
    key_file, path = folder / KEY_FILE, folder / f"{split}.npy"
    keys = read_json(key_file) if key_file.is_file() else {}
    want = json.loads(json.dumps(cache_key(spec, processed_dir, split), sort_keys=True))
    have = keys.get(split)
    if have == want and path.is_file():
        log.info("features: %s from the cache (%s)", split, path)
        return np.load(path)
    if have is not None:
        why = "another extractor" if have.get("extractor") != want["extractor"] else "other data or code"
        log.info("features: %s in %s were built from %s: rebuilding", split, folder, why)
    arrays = read_split(processed_dir, split, mmap=True)
    features = embed(extractor, arrays.images, batch_size, desc=f"features {split}")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, features)
    tmp.replace(path)
    keys[split] = want
    atomic_write_json(key_file, keys)
    return features
