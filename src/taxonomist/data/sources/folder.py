"""A folder-per-class tree of images: ``<root>/<label>/<image>``."""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from taxonomist.data.manifest import Record
from taxonomist.data.sources import SourceError
from taxonomist.files import sha256_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def scan_folder(root: Path) -> dict[str, list[Path]]:
    """Map each class folder under ``root`` to its image files, with clear errors."""
    if not root.exists():
        raise SourceError(f"data.source: {root} does not exist")
    if not root.is_dir():
        raise SourceError(f"data.source: {root} is not a folder (expected <root>/<label>/<image>)")
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(
                f"data.source: class folder {class_dir} holds no images "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add images"
            )
        classes[class_dir.name] = files
    if not classes:
        raise SourceError(f"data.source: {root} has no class folders (expected <root>/<label>/<image>)")
    if len(classes) < 2:
        only = next(iter(classes))
        raise SourceError(f"data.source: {root} has one class ({only!r}); classification needs at least two")
    return classes


def materialise_folder(root: Path, out_dir: Path) -> list[Record]:
    """Copy the images of a folder-per-class tree into ``out_dir/images/<label>/``."""
    classes = scan_folder(root)
    records: list[Record] = []
    total = sum(len(v) for v in classes.values())
    with tqdm(total=total, desc=f"ingest {root.name}", unit="img", mininterval=1) as bar:
        for label, files in classes.items():
            (out_dir / "images" / label).mkdir(parents=True, exist_ok=True)
            for i, src in enumerate(files):
                rel = f"images/{label}/{i:06d}{src.suffix.lower()}"
                shutil.copyfile(src, out_dir / rel)
                records.append(Record(rel, label, "", sha256_file(out_dir / rel), str(src.relative_to(root))))
                bar.update()
    return records
