"""What ``taxonomist predict`` classifies: image files named by folders, globs, manifests,
archives and list files, each image under a key (what the output's ``path`` column holds).

* a **folder**: every image file below it (recursively; hidden files and ``__MACOSX`` skipped),
  keyed by its path;
* a **glob** (quote it, so the shell leaves it alone): ``'photos/**/*.jpg'``;
* a **manifest**, ``.csv`` or ``.parquet`` with a ``path`` (or ``image``, ``filepath``, ``file``)
  column: paths relative to the manifest's folder;
* an **archive**, ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``: its image
  members, read without extracting, keyed ``<archive>:<member>``;
* a **list file**, ``.txt`` or ``.lst``: one path per line (relative to the list file's
  folder; blank lines and ``#`` comments skipped);
* an **image file** itself.

Image files are recognised by their suffix (:data:`~taxonomist.data.sources.common.IMAGE_SUFFIXES`).
A path a manifest or list names that does not exist is kept: its row gets an error, the
others are classified. Keys repeat only once (the first wins).
"""

from __future__ import annotations

import glob
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd

from taxonomist.data.sources import ARCHIVE_SUFFIXES
from taxonomist.data.sources.common import IMAGE_SUFFIXES, is_hidden
from taxonomist.errors import DataError

MANIFEST_COLUMNS = ("path", "image", "filepath", "file")
LIST_SUFFIXES = (".txt", ".lst")
ARCHIVE_SEP = ":"


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix."""
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _folder(root: Path) -> Iterator[str]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and is_image_name(path.name) and not any(is_hidden(p) for p in path.relative_to(root).parts):
            yield str(path)


def _manifest(path: Path) -> Iterator[str]:
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path, dtype=str)
    except Exception as err:  # pandas raises many kinds for a file that is not a table
        raise DataError(f"{path}: cannot read it as a manifest ({type(err).__name__}: {err})") from None
    column = next((c for c in MANIFEST_COLUMNS if c in frame.columns), None)
    if column is None:
        raise DataError(f"{path}: a manifest needs a column of image paths named one of {', '.join(MANIFEST_COLUMNS)}")
    for value in frame[column].dropna().astype(str):
        ref = Path(value.strip()).expanduser()
        yield str(ref if ref.is_absolute() else path.parent / ref)


def _list_file(path: Path) -> Iterator[str]:
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ref = Path(line).expanduser()
            yield str(ref if ref.is_absolute() else path.parent / ref)


def _archive_members(path: Path) -> Iterator[str]:
    if path.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [i.filename for i in zf.infolist() if not i.is_dir()]
        except zipfile.BadZipFile as err:
            raise DataError(f"{path}: not a readable zip archive ({err})") from None
    else:
        try:
            with tarfile.open(path) as tf:
                names = [m.name for m in tf.getmembers() if m.isfile()]
        except tarfile.TarError as err:
            raise DataError(f"{path}: not a readable tar archive ({err})") from None
    for name in names:
        if is_image_name(name) and not any(is_hidden(part) for part in Path(name).parts):
            yield f"{path}{ARCHIVE_SEP}{name}"


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand(args: Sequence[str]) -> list[str]:
    """The image keys the command line names (see the module docstring), in order, each once.

    A :class:`~taxonomist.errors.DataError` when an argument does not exist (and is not a glob)
    or when nothing at all is found.
    """
    keys: dict[str, None] = {}
    for arg in args:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = list(_folder(path))
        elif path.is_file():
            name = path.name.lower()
            if name.endswith(ARCHIVE_SUFFIXES):
                found = list(_archive_members(path))
            elif name.endswith((".csv", ".parquet", ".pq")):
                found = list(_manifest(path))
            elif name.endswith(LIST_SUFFIXES):
                found = list(_list_file(path))
            else:
                found = [str(path)]  # an image file (or not: its row will say so)
        elif _is_glob(arg):
            found = [p for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file() and is_image_name(p)]
        else:
            raise DataError(f"{arg}: no such file or folder")
        if not found:
            raise DataError(
                f"{arg}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
                if not path.is_file()
                else f"{arg}: names no images"
            )
        keys.update(dict.fromkeys(found))
    return list(keys)


class ImageReader:
    """Reads the bytes behind keys from :func:`expand`; archives are opened once and kept
    open. Use as a context manager. A file larger than ``max_bytes`` is not read (an error)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._archives: dict[str, zipfile.ZipFile | tarfile.TarFile] = {}

    def _member(self, key: str) -> tuple[str, str] | None:
        """``(archive, member)`` for an archive key, None for a plain file."""
        if Path(key).is_file():
            return None
        for suffix in ARCHIVE_SUFFIXES:
            marker = f"{suffix}{ARCHIVE_SEP}"
            at = key.lower().find(marker)
            if at >= 0:
                return key[: at + len(suffix)], key[at + len(marker) :]
        return None

    def _too_big(self, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise OSError(f"file of {size / 1e6:.1f} MB is over the {self.max_bytes / 1e6:g} MB limit of one request")

    def read(self, key: str) -> bytes:
        """The bytes of ``key``; :class:`OSError` saying why when they cannot be read."""
        member = self._member(key)
        if member is None:
            path = Path(key)
            if not path.is_file():
                raise FileNotFoundError(f"file not found: {key}")
            self._too_big(path.stat().st_size)
            return path.read_bytes()
        archive, name = member
        handle = self._archives.get(archive)
        if handle is None:
            is_zip = archive.lower().endswith(".zip")
            handle = zipfile.ZipFile(archive) if is_zip else tarfile.open(archive)  # noqa: SIM115 - closed by close()
            self._archives[archive] = handle
        if isinstance(handle, zipfile.ZipFile):
            self._too_big(handle.getinfo(name).file_size)
            return handle.read(name)
        info = handle.getmember(name)
        self._too_big(info.size)
        extracted = handle.extractfile(info)
        if extracted is None:
            raise OSError(f"{name}: not a file in {archive}")
        return extracted.read()

    def close(self) -> None:
        """Close every open archive."""
        for handle in self._archives.values():
            handle.close()
        self._archives.clear()

    def __enter__(self) -> ImageReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
