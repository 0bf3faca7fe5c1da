"""Data sources: each turns its input into image files under ``<out>/images`` plus manifest records.

``data.source`` names the input: ``builtin:<name>`` for a built-in set, or a path to a
folder-per-class tree (nested folders = a hierarchy), a CSV or Parquet manifest, a zip or
tar(.gz) archive of either, or a Label Studio JSON export. ``data.format`` forces one reader
when the path alone does not say (``auto`` by default).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from taxonomist.data.manifest import Record
from taxonomist.errors import DataError

BUILTIN_PREFIX = "builtin:"
# builtin name -> "module:function"; each function takes (cfg, out_dir) and returns records.
BUILTINS = {
    "fashion-mnist": "taxonomist.data.sources.fashion_mnist:materialise_fashion_mnist",
    "digits": "taxonomist.data.sources.builtin:materialise_digits",
    "faces": "taxonomist.data.sources.builtin:materialise_faces",
    "emoji-tags": "taxonomist.data.sources.emoji:materialise_emoji_tags",
    "emoji-categories": "taxonomist.data.sources.emoji:materialise_emoji_categories",
    "emoji-skin-tones": "taxonomist.data.sources.emoji:materialise_emoji_skin_tones",
    "emoji-attributes": "taxonomist.data.sources.emoji:materialise_emoji_attributes",
}
# data.format -> "module:function"; each takes (cfg, source path, out_dir) and returns records.
READERS = {
    "folder": "taxonomist.data.sources.folder:materialise_folder",
    "manifest": "taxonomist.data.sources.table:materialise_table",
    "archive": "taxonomist.data.sources.archive:materialise_archive",
    "label_studio": "taxonomist.data.sources.label_studio:materialise_label_studio",
}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _load(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def detect_format(path: Path) -> str:
    """The reader for ``path`` judged from what it is: folder, table, archive or JSON export."""
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith(ARCHIVE_SUFFIXES):
        return "archive"
    if name.endswith((".csv", ".parquet", ".pq")):
        return "manifest"
    if name.endswith(".json"):
        return "label_studio"
    raise DataError(
        f"data.source: cannot tell what {path} is; use a folder, a .csv/.parquet manifest, a .zip/.tar(.gz) "
        "archive or a Label Studio .json export (or set data.format)"
    )


def materialise(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Write the images of ``cfg.data.source`` under ``out_dir/images`` and return their records."""
    source = str(cfg.data.source)
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise DataError(f"data.source: unknown built-in dataset {name!r} (known: {', '.join(BUILTINS)})")
        return _load(BUILTINS[name])(cfg, out_dir)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: {path} does not exist")
    fmt = str(cfg.data.format)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in READERS:
        raise DataError(f"data.format={fmt!r} is not known; use auto or one of {', '.join(READERS)}")
    return _load(READERS[fmt])(cfg, path, out_dir)
