"""A folder-per-class tree of images.

Layout: ``<root>/<label>/<image>``; images are found recursively under each first-level
folder. For ``task.name=hierarchical`` the nested folders are the hierarchy: an image's label
is its folder path below ``root`` joined with ``/``, so ``root/Apparel/Footwear/Sneaker/x.jpg``
is labelled ``Apparel/Footwear/Sneaker`` and ``root/Apparel/y.jpg`` is labelled ``Apparel``.
Hidden files and folders (``.name``) and ``__MACOSX`` are skipped; so are images directly in
``root`` (they have no label).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from taxonomist.data.manifest import PATH_SEP, Record
from taxonomist.data.sources import SourceError
from taxonomist.data.sources.common import IMAGE_SUFFIXES, SourceImage, check_label, copy_images, is_hidden


def _task_name(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "task.name", default="multiclass"))


def scan_folder(root: Path, hierarchical: bool = False) -> dict[str, list[Path]]:
    """Map each label under ``root`` to its image files, with clear errors.

    By default the label is the first-level folder (images found recursively below it); with
    ``hierarchical`` it is the image's folder path relative to ``root``, joined with ``/``.
    """
    if not root.exists():
        raise SourceError(f"data.source: {root} does not exist")
    if not root.is_dir():
        raise SourceError(f"data.source: {root} is not a folder (expected <root>/<label>/<image>)")
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not any(is_hidden(part) for part in p.relative_to(class_dir).parts)
        )
        if not files:
            raise SourceError(
                f"data.source: class folder {class_dir} holds no images "
                f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add images"
            )
        for path in files:
            folders = path.parent.relative_to(root).parts if hierarchical else (class_dir.name,)
            for name in folders:
                check_label(name, f"data.source: folder {path.parent}")
            classes.setdefault(PATH_SEP.join(folders), []).append(path)
    if not classes:
        raise SourceError(f"data.source: {root} has no class folders (expected <root>/<label>/<image>)")
    if len(classes) < 2:
        only = next(iter(classes))
        raise SourceError(f"data.source: {root} has one class ({only!r}); classification needs at least two")
    return dict(sorted(classes.items()))


def materialise_folder(cfg: DictConfig, root: Path, out_dir: Path) -> list[Record]:
    """Copy the images of a folder-per-class tree (nested folders = a hierarchy) into ``out_dir/images``."""
    classes = scan_folder(root, hierarchical=_task_name(cfg) == "hierarchical")
    images = [
        SourceImage(src, (label,), "", src.relative_to(root).as_posix())
        for label, files in classes.items()
        for src in files
    ]
    return copy_images(images, out_dir, desc=f"ingest {root.name}")
