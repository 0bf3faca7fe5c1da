"""Synthetic photo folders for the data-at-scale benchmark: real photos, many distinct files.

Each image is a random crop (40-100 % of the area), mirror and exposure gain of one of
scikit-image's colour sample photos, scaled to 1024x768 and saved as a JPEG (quality 90):
a photo-sized JPEG that decodes like a camera's, distinct in content (and content hash) from
every other. The class is the sample photo it came from. Image ``i`` is the same bytes
every time (seeded by ``i``), so folders of 10k, 30k and 100k share their first images and a
larger folder is the smaller one plus new files.

Usage: ``python benchmarks/photos.py FOLDER N`` (files already there are kept).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("astronaut", "coffee", "chelsea", "rocket")
SIZE = (1024, 768)
QUALITY = 90


@cache
def _sample(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def photo(index: int) -> tuple[str, bytes]:
    """The class and JPEG bytes of image ``index``."""
    rng = np.random.default_rng(index)
    label = CLASSES[index % len(CLASSES)]
    base = _sample(label)
    area = rng.uniform(0.4, 1.0)
    w = int(base.width * np.sqrt(area))
    h = min(base.height, int(w * SIZE[1] / SIZE[0]))
    x, y = int(rng.integers(0, base.width - w + 1)), int(rng.integers(0, base.height - h + 1))
    img = base.crop((x, y, x + w, y + h)).resize(SIZE, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    gain = rng.uniform(0.7, 1.3)
    img = img.point([min(255, int(v * gain)) for v in range(256)] * 3)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY)
    return label, buf.getvalue()


def path_of(folder: Path, index: int) -> Path:
    """Where image ``index`` lives: ``folder/<class>/<index>.jpg``."""
    return folder / CLASSES[index % len(CLASSES)] / f"{index:07d}.jpg"


def _write(args: tuple[str, int]) -> None:
    folder, index = Path(args[0]), args[1]
    target = path_of(folder, index)
    if not target.is_file():
        _, data = photo(index)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def make(folder: Path, count: int, start: int = 0, workers: int | None = None) -> Path:
    """Images ``start`` .. ``start + count - 1`` in ``folder`` (missing ones are written)."""
    for label in CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), i) for i in range(start, start + count) if not path_of(folder, i).is_file()]
    if jobs:
        with multiprocessing.get_context("fork").Pool(workers or os.cpu_count()) as pool:
            for done, _ in enumerate(pool.imap_unordered(_write, jobs, chunksize=64), 1):
                if done % 5000 == 0:
                    print(f"  photos: {done:,}/{len(jobs):,}", flush=True)
    return folder


def view(pool: Path, folder: Path, count: int) -> Path:
    """A folder of symlinks to the first ``count`` images of ``pool`` (a data set of that size)."""
    for label in CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = path_of(folder, i)
        if not link.is_symlink():
            link.symlink_to(path_of(pool, i))
    return folder


if __name__ == "__main__":
    make(Path(sys.argv[1]), int(sys.argv[2]))
