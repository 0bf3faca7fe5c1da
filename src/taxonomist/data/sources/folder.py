"""A folder-per-class tree of images.

Layout: ``<root>/<label>/<image>``; images are found recursively under each first-level
folder. For ``task.name=hierarchical`` the nested folders are the hierarchy: an image's label
is its folder path below ``root`` joined with ``/``, so ``root/Apparel/Footwear/Sneaker/x.jpg``
is labelled ``Apparel/Footwear/Sneaker`` and ``root/Apparel/y.jpg`` is labelled ``Apparel``.
For the other tasks an image is labelled by its first-level folder wherever it lies below it
(nested folders are often just organisation); when images lie in nested folders a warning
names ``task=hierarchical``, which would read the nesting as a label tree.
Hidden files and folders (``.name``) and ``__MACOSX`` are skipped; so are images directly in
``root`` (they have no label).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from taxonomist.data.manifest import PATH_SEP, Record
from taxonomist.data.sources.common import IMAGE_SUFFIXES, SourceImage, check_label, is_hidden, stage_images
from taxonomist.errors import DataError, Problems

log = logging.getLogger(__name__)


def _labels_are_paths(cfg: DictConfig) -> bool:
    """Whether the config's task labels an image with a path (nested folders = the hierarchy)."""
    from taxonomist.tasks import task_of

    return task_of(cfg).label_form == "path"


def scan_folder(root: Path, hierarchical: bool = False) -> dict[str, list[Path]]:
    """Map each label under ``root`` to its image files, with clear errors.

    By default the label is the first-level folder (images found recursively below it); with
    ``hierarchical`` it is the image's folder path relative to ``root``, joined with ``/``.
    Every empty class folder and every folder name that cannot be a label is reported in one
    :class:`~taxonomist.errors.DataError`.
    """
    if not root.exists():
        raise DataError(f"data.source: {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data.source: {root} is not a folder (expected <root>/<label>/<image>)")
    problems = Problems()
    checked: set[Path] = set()
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
            problems.add(
                f"class folder(s) of data.source {root} hold no images (looked for "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}); remove them or add images",
                f"class folder {class_dir}",
            )
        for path in files:
            folders = path.parent.relative_to(root).parts if hierarchical else (class_dir.name,)
            for depth, name in enumerate(folders, start=1):
                folder = root.joinpath(*folders[:depth])
                if folder not in checked:  # each folder once, however many images it holds
                    checked.add(folder)
                    with problems.collect("folder name(s) of data.source cannot be labels"):
                        check_label(name, f"folder {folder}")
            classes.setdefault(PATH_SEP.join(folders), []).append(path)
    problems.raise_if_any()
    if not hierarchical:
        warn_nested(root, classes)
    if not classes:
        raise DataError(f"data.source: {root} has no class folders (expected <root>/<label>/<image>)")
    if len(classes) < 2:
        only = next(iter(classes))
        raise DataError(f"data.source: {root} has one class ({only!r}); classification needs at least two")
    return dict(sorted(classes.items()))


def warn_nested(root: Path, classes: dict[str, list[Path]]) -> None:
    """Log a warning when images lie in folders nested in their class folder (labelled by the
    first-level folder), naming ``task=hierarchical`` for a tree of nested class folders."""
    nested = [path for files in classes.values() for path in files if len(path.relative_to(root).parts) > 2]
    if nested:
        example = nested[0].relative_to(root)
        log.warning(
            "data.source %s: %d image(s) lie in sub-folders of their class folder (e.g. %s), labelled by the "
            "first-level folder (%r); if the nested folders are a label tree, use task=hierarchical",
            root,
            len(nested),
            example.as_posix(),
            example.parts[0],
        )


def materialise_folder(cfg: DictConfig, root: Path, out_dir: Path) -> list[Record]:
    """Stage the images of a folder-per-class tree (nested folders = a hierarchy) as ``out_dir/images``."""
    classes = scan_folder(root, hierarchical=_labels_are_paths(cfg))
    images = [
        SourceImage(src, (label,), "", src.relative_to(root).as_posix())
        for label, files in classes.items()
        for src in files
    ]
    return stage_images(images, out_dir, desc=f"ingest {root.name}")
