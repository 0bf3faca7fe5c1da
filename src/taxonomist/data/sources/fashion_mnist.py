"""Fashion-MNIST: read from Debian's dataset-fashion-mnist, else download and verify.

The IDX files are decoded and written out as PNG files with a manifest, exactly as a user's
folder of images would be, with the official test split kept as the test split.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.request
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from taxonomist.data.manifest import Record
from taxonomist.data.sources.builtin import png_bytes, write_record
from taxonomist.errors import DataError

CLASSES = [
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot",
]  # fmt: skip

# MD5 checksums published with the dataset (zalandoresearch/fashion-mnist README).
FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
HOW_TO_GET = (
    "Install Debian's package (`apt-get install dataset-fashion-mnist`, files in "
    "/usr/share/datasets/fashion-mnist), or set data.builtin_dir to a folder holding the four "
    "*-ubyte.gz files, or allow data.download=true with network access."
)


def md5_file(path: Path) -> str:
    """Hex MD5 of a file (the checksum Fashion-MNIST publishes)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def locate(data_cfg: DictConfig, download_dir: Path) -> Path:
    """Return a folder with the four verified IDX files, downloading them if allowed."""
    builtin = Path(str(data_cfg.builtin_dir))
    if _has_all(builtin):
        return builtin
    if _has_all(download_dir) and all(md5_file(download_dir / n) == m for n, m in FILES.items()):
        return download_dir
    if not data_cfg.download:
        raise DataError(f"Fashion-MNIST not found in {builtin} and data.download=false. {HOW_TO_GET}")
    download_dir.mkdir(parents=True, exist_ok=True)
    base = str(data_cfg.download_url).rstrip("/")
    for name, md5 in FILES.items():
        target = download_dir / name
        if target.is_file() and md5_file(target) == md5:
            continue
        url = f"{base}/{name}"
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, tmp.open("wb") as fh:
                shutil.copyfileobj(resp, fh)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise DataError(f"Could not download {url}: {err}. {HOW_TO_GET}") from None
        got = md5_file(tmp)
        if got != md5:
            tmp.unlink(missing_ok=True)
            raise DataError(f"Checksum mismatch for {url}: md5 {got}, expected {md5}. {HOW_TO_GET}")
        tmp.replace(target)
    return download_dir


def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decode a pair of IDX files into uint8 images (N, 28, 28) and int64 labels (N,)."""
    with gzip.open(images_gz, "rb") as fh:
        raw = fh.read()
    if len(raw) < 16:
        raise DataError(f"{images_gz}: not an IDX image file ({len(raw)} bytes)")
    magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise DataError(f"{images_gz}: not an IDX image file (magic {magic})")
    if len(raw) != 16 + int(count) * int(rows) * int(cols):
        raise DataError(f"{images_gz}: truncated or corrupt ({len(raw)} bytes for {count}x{rows}x{cols})")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(int(count), int(rows), int(cols))
    with gzip.open(labels_gz, "rb") as fh:
        raw = fh.read()
    magic, n_labels = np.frombuffer(raw[:8], dtype=">u4") if len(raw) >= 8 else (0, 0)
    if magic != 2049 or n_labels != count or len(raw) != 8 + int(count):
        raise DataError(f"{labels_gz}: not an IDX label file matching {images_gz.name}")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


def materialise_fashion_mnist(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Write Fashion-MNIST as PNG files under ``out_dir/images/<split>/<label>/``."""
    folder = locate(cfg.data, download_dir=Path("data/downloads/fashion-mnist"))
    records: list[Record] = []
    for split, (img_file, lbl_file) in SPLIT_FILES.items():
        images, labels = read_idx(folder / img_file, folder / lbl_file)
        for idx in tqdm(range(len(images)), desc=f"fashion-mnist {split}", unit="img", mininterval=1):
            label = CLASSES[labels[idx]]
            rel = f"images/{split}/{label}/{split}_{idx:05d}.png"
            source_id = f"fashion-mnist:{split}:{idx}"
            records.append(write_record(out_dir, rel, png_bytes(images[idx]), (label,), source_id, split=split))
    return records
