"""The layout of ``data/raw``: the manifest (one row per image with path, labels, split,
content hash, source id and group) and the image archive.

Every source (built-in or the user's) is materialised the same way, so the rest of the
pipeline has a single code path. ``data/raw`` holds:

* ``manifest.csv``: the rows (:func:`write_manifest`, :func:`read_manifest`);
* ``images.zip`` (:data:`IMAGES_ARCHIVE`): every image, stored (not compressed: image formats
  are compressed already), under its manifest ``path`` (``images/<...>``);
* ``ingest.json``: the ingest stage's summary.

One archive instead of one file per image because DVC stats and hashes every file of a
tracked folder on every ``dvc status``/``dvc repro`` (and pushes/pulls small files one by
one): tens of thousands of loose images made a no-op ``dvc repro`` slow. The archive is
byte-identical for the same images (:func:`pack_images`), so its DVC hash is stable. Read the
images with :class:`RawImages`, which also reads folders ingested before the archive existed
(loose files under ``images/``). Not to be confused with :mod:`taxonomist.data.sources.archive`,
which reads the user's *input* archives.

The ``labels`` column holds a record's labels joined with ``|`` (:data:`LABEL_SEP`): one label
for binary and multi-class data, any number (or none) for multi-label data. A hierarchical
label is one path whose levels are joined with ``/`` (:data:`PATH_SEP`), e.g.
``Apparel/Footwear/Sneaker``.

The ``group`` column holds the image's group key when ``data.group_by`` names a column of the
source (a manifest column, a Label Studio task data field), else it is empty; preprocess keeps
every image of a group in one split (:func:`taxonomist.data.split.group_keys`). Manifests
written before the column existed read with empty groups.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
from tqdm import tqdm

from taxonomist.errors import StageOrderError, missing_input, stale_input
from taxonomist.files import WriteBack, atomic_write_text, read_text_csv, sha256_bytes

COLUMNS = ["path", "labels", "split", "sha256", "source_id", "group"]
OPTIONAL_COLUMNS = {"group": ""}  # added later: an older manifest without them reads with this value
SPLITS = ("train", "val", "test")
MANIFEST_FILE = "manifest.csv"
IMAGES_ARCHIVE = "images.zip"
IMAGES_DIR = "images"
# A fixed member timestamp (the earliest a zip can hold) so the same images give the same bytes.
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
LABEL_SEP = "|"
PATH_SEP = "/"


@dataclass(frozen=True)
class Record:
    """One ingested image.

    ``path`` is relative to the raw data folder; ``labels`` has one entry for single-label data
    and any number for multi-label data; ``split`` is "train", "val", "test" or "" (assigned
    in preprocess); ``source_id`` says where the image came from (a file, or a manifest row)
    and is what error messages name; ``group`` is the image's group key when ``data.group_by``
    names a column of the source ("" otherwise).
    """

    path: str
    labels: tuple[str, ...]
    split: str
    sha256: str
    source_id: str
    group: str = ""


def join_labels(labels: tuple[str, ...] | list[str]) -> str:
    """The manifest text of a label list."""
    return LABEL_SEP.join(labels)


def split_labels(text: str) -> list[str]:
    """The label list of a manifest ``labels`` cell (empty text: no labels)."""
    return [part for part in str(text).split(LABEL_SEP) if part]


def write_manifest(records: list[Record], folder: Path) -> Path:
    """Write the manifest CSV for ``records`` into ``folder``."""
    frame = pd.DataFrame(
        [(r.path, join_labels(r.labels), r.split, r.sha256, r.source_id, r.group) for r in records],
        columns=COLUMNS,
    )
    return atomic_write_text(folder / MANIFEST_FILE, frame.to_csv(index=False))


def read_manifest(folder: str | Path) -> pd.DataFrame:
    """Read a manifest written by :func:`write_manifest`.

    A manifest written before a column of :data:`OPTIONAL_COLUMNS` existed gets it with its
    default value (an empty ``group``); any other missing column asks for a new ingest.
    """
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise missing_input(path, "ingest")
    frame = read_text_csv(path)
    for column, default in OPTIONAL_COLUMNS.items():
        if column not in frame.columns:
            frame[column] = default
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise stale_input(f"{path}: missing column(s) {missing}", "ingest")
    return frame


READ_AHEAD = 16  # images read and hashed ahead of the one being packed (by READERS threads)
READERS = 4  # threads reading and hashing (file reads and SHA-256 run outside the GIL)


def _read_hashed(path: Path) -> tuple[bytes, str]:
    """The bytes of the file at ``path`` and their SHA-256."""
    data = path.read_bytes()
    return data, sha256_bytes(data)


def pack_images(folder: Path, paths: Iterable[str], desc: str = "pack") -> dict[str, str]:
    """Pack the files at ``paths`` (relative to ``folder``) into ``folder/images.zip``; return
    the sha256 of each, by path.

    Each file is read once, then written to the archive and hashed from memory (a staged file
    may be a link to the user's image: see :func:`~taxonomist.data.sources.common.stage_images`).
    :data:`READERS` threads read and hash the next :data:`READ_AHEAD` files while this one
    is written, so reading (several requests in flight), hashing and writing overlap; at most
    that many files are held in memory. The archive goes to the disk as it grows
    (:class:`~taxonomist.files.WriteBack`), not all at the final ``fsync``. Members are stored
    uncompressed under their ``path``, sorted by path, with a fixed date, permissions and host
    system, so the same images always give a byte-identical archive. The loose files are left
    in place (the caller removes them). Meant for a folder being built (ingest writes it inside
    :func:`~taxonomist.files.atomic_directory`), so the archive is not written atomically itself.
    """
    folder = Path(folder)
    target = folder / IMAGES_ARCHIVE
    hashes: dict[str, str] = {}
    ordered = sorted(set(paths))
    with (
        zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as zf,
        ThreadPoolExecutor(READERS, thread_name_prefix="pack") as readers,
    ):
        pending: deque[Future[tuple[bytes, str]]] = deque()
        ahead = iter(ordered)
        write_back = WriteBack(zf.fp.fileno())
        try:
            for path in tqdm(ordered, desc=desc, unit="img", mininterval=1, disable=not ordered):
                while len(pending) <= READ_AHEAD and (following := next(ahead, None)) is not None:
                    pending.append(readers.submit(_read_hashed, folder / following))
                data, digest = pending.popleft().result()  # a file that cannot be read fails here, in order
                info = zipfile.ZipInfo(path, date_time=ZIP_DATE_TIME)
                info.compress_type = zipfile.ZIP_STORED
                info.create_system = 3  # unix, whatever the platform (it is in the bytes)
                info.external_attr = 0o644 << 16
                zf.writestr(info, data)
                hashes[path] = digest
                write_back.written(zf.start_dir)  # (the end of the members written so far)
        finally:
            for future in pending:  # after an error: the files not yet read are not read
                future.cancel()
    with open(target, "rb") as fh:  # on disk before the stage swaps its folder in (and counted in its time)
        os.fsync(fh.fileno())
    return hashes


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: signature ... name and extra lengths
_LOCAL_SIGNATURE = b"PK\x03\x04"
# The records of a zip's central directory that :func:`stored_members` reads (APPNOTE 4.3.12-16).
_END = struct.Struct("<4s4H2LH")  # signature, disks, entries (disk, all), directory size and offset, comment length
_END_SIGNATURE = b"PK\x05\x06"
_END64_LOCATOR = struct.Struct("<4sLQL")  # signature, disk, offset of the zip64 end record, disks
_END64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_END64 = struct.Struct("<4sQ2H2L2Q2Q")  # signature, size, versions, disks, entries (disk, all), directory size, offset
_END64_SIGNATURE = b"PK\x06\x06"
# A member's entry: signature, versions, flags, method, time, date, crc, sizes (compressed, full), name, extra
# and comment lengths, disk, attributes, local header offset.
_ENTRY = struct.Struct("<4s4B4HL2L5H2L")
_ENTRY_SIGNATURE = b"PK\x01\x02"
_UTF8_NAME = 0x800  # flag bit: the name is UTF-8 (else cp437)
_ZIP64_EXTRA = 0x0001  # extra field holding the 64-bit sizes and offset that do not fit 32 bits
_FULL32 = 0xFFFFFFFF


@dataclass(frozen=True)
class StoredMembers:
    """The stored (uncompressed) members of a zip, column by column: ``names`` (UTF-8, a
    fixed-width bytes array), the ``offsets`` of their local headers and their ``sizes``."""

    names: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray


def _end_of_directory(fh: BinaryIO) -> tuple[int, int, int, int]:
    """Where a zip's central directory starts, its size in bytes, its number of entries and
    the shift of every offset it records (bytes prepended to the archive, as :mod:`zipfile`
    reads them), from the end record (or the zip64 one)."""
    end = fh.seek(0, os.SEEK_END)
    tail_start = max(0, end - _END.size - 0xFFFF)  # the end record, then a comment of up to 64 KiB
    fh.seek(tail_start)
    tail = fh.read()
    found = tail.rfind(_END_SIGNATURE)
    if found < 0 or len(tail) - found < _END.size:
        raise zipfile.BadZipFile("no end of central directory record")
    _, _, _, _, entries, size, offset, _ = _END.unpack_from(tail, found)
    location = tail_start + found
    locator_at = found - _END64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == _END64_LOCATOR_SIGNATURE:
        record = fh.seek(location - _END64_LOCATOR.size - _END64.size)
        data = fh.read(_END64.size)
        if len(data) == _END64.size and data[:4] == _END64_SIGNATURE:
            *_, entries, size, offset = _END64.unpack(data)
            location = record
    start = location - size  # the recorded offset, unless bytes were prepended to the archive
    if start < 0:
        raise zipfile.BadZipFile("bad offset for the central directory")
    return start, size, entries, start - offset


def _zip64_values(extra: bytes, fields: list[int]) -> list[int]:
    """``fields`` (file size, compressed size, header offset) with each one stored as
    0xFFFFFFFF replaced from the zip64 extra field, in that order."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == _ZIP64_EXTRA:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            try:
                return [next(values) if value == _FULL32 else value for value in fields]
            except StopIteration:
                raise zipfile.BadZipFile("corrupt zip64 extra field") from None
        at += 4 + length
    return fields


def _fixed_width(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The byte strings ``data[start : start + length]`` as one fixed-width bytes array."""
    width = max(1, int(lengths.max(initial=0)))
    chars = np.zeros((len(starts), width), dtype=np.uint8)
    for column in range(width):  # column by column: a few bytes per string at a time
        inside = lengths > column
        chars[inside, column] = data[starts[inside] + column]
    return chars.view(f"S{width}").reshape(-1)


def stored_members(archive: str | Path) -> StoredMembers:
    """The stored members of the zip ``archive`` (later entries of a repeated name last),
    read from its central directory into arrays: :class:`zipfile.ZipFile` makes a
    :class:`~zipfile.ZipInfo` per member instead, several hundred bytes each. Raises
    :class:`zipfile.BadZipFile` for a damaged directory."""
    with open(archive, "rb") as fh:
        start, size, entries, shift = _end_of_directory(fh)
        fh.seek(start)
        directory = fh.read(size)
    if len(directory) != size:
        raise zipfile.BadZipFile("truncated central directory")
    name_at = np.zeros(entries, dtype=np.int64)
    name_length = np.zeros(entries, dtype=np.int64)
    offsets = np.zeros(entries, dtype=np.int64)
    sizes = np.zeros(entries, dtype=np.int64)
    stored = np.zeros(entries, dtype=bool)
    recoded: dict[int, bytes] = {}  # non-UTF-8 names that are not ASCII, as UTF-8 (rare)
    at = 0
    for k in range(entries):
        fields = _ENTRY.unpack_from(directory, at) if at + _ENTRY.size <= size else None
        if fields is None or fields[0] != _ENTRY_SIGNATURE:
            raise zipfile.BadZipFile("bad central directory entry")
        flags, method, compressed, full, n_name, n_extra, n_comment, header = (*fields[5:7], *fields[10:15], fields[18])
        name_at[k], name_length[k] = at + _ENTRY.size, n_name
        extra_at = at + _ENTRY.size + n_name
        if _FULL32 in (compressed, full, header):
            full, compressed, header = _zip64_values(
                directory[extra_at : extra_at + n_extra], [full, compressed, header]
            )
        if not flags & _UTF8_NAME:
            name = directory[name_at[k] : extra_at]
            if not name.isascii():
                recoded[k] = name.decode("cp437").encode("utf-8")
        offsets[k], sizes[k], stored[k] = header, compressed, method == zipfile.ZIP_STORED
        at = extra_at + n_extra + n_comment
    offsets += shift
    names = _fixed_width(np.frombuffer(directory, dtype=np.uint8), name_at, name_length)
    for k, name in recoded.items():
        names = names.astype(f"S{max(names.dtype.itemsize, len(name))}", copy=False)
        names[k] = name
    return StoredMembers(names[stored], offsets[stored], sizes[stored])


class RawImages:
    """The encoded bytes of the images in a raw folder, by manifest ``path``.

    Reads ``images.zip`` when the folder has one, else the loose files of folders ingested
    before the archive existed. Use as a context manager::

        with RawImages(raw_dir) as images:
            data = images.read(row.path)

    :meth:`read` opens the archive's directory (a few hundred bytes of memory per member) on
    first use. Code that reads many images on many processes instead asks once for each
    image's :meth:`spans` and reads with :meth:`read_span`, which needs nothing but an open
    file, so every process holds only the spans of the images it is given.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.archive = self.folder / IMAGES_ARCHIVE
        self._zip: zipfile.ZipFile | None = None
        self._file: BinaryIO | None = None
        self.packed = self.archive.is_file()  # True when the images are read from ``images.zip``
        if not self.packed and not (self.folder / IMAGES_DIR).is_dir():
            raise StageOrderError(
                f"{self.folder}: neither {IMAGES_ARCHIVE} nor {IMAGES_DIR}/ found: run the ingest stage first"
            )

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.archive)
            except (zipfile.BadZipFile, OSError) as err:
                raise stale_input(f"{self.archive}: {err}", "ingest") from None
        return self._zip

    def _missing(self, path: str) -> FileNotFoundError:
        return FileNotFoundError(f"{path}: not in {self.archive} (the manifest lists it); run the ingest stage again")

    def read(self, path: str) -> bytes:
        """The bytes of the image at manifest ``path``; :class:`FileNotFoundError` naming the
        path (and the archive) when it is not there."""
        if not self.packed:
            return (self.folder / path).read_bytes()
        try:
            return self._archive().read(path)
        except KeyError:
            raise self._missing(path) from None

    def spans(self, paths: Sequence[str]) -> np.ndarray:
        """Where each of ``paths`` lies in the archive: an ``(n, 2)`` array of the offset of its
        member and its size, ``(-1, 0)`` for one that is not a stored member (missing,
        compressed, or loose files): :meth:`read_span` then reads it by path. The archive's
        directory is read for this and not kept."""
        spans = np.full((len(paths), 2), (-1, 0), dtype=np.int64)
        if not self.packed or not len(paths):
            return spans
        try:
            members = stored_members(self.archive)
        except (zipfile.BadZipFile, OSError, struct.error) as err:
            raise stale_input(f"{self.archive}: {err}", "ingest") from None
        wanted = np.array([str(path).encode("utf-8") for path in paths], dtype=bytes)
        order = np.argsort(members.names, kind="stable")
        names = members.names[order]
        # the last member of a name, as zipfile reads it
        at = np.maximum(np.searchsorted(names, wanted, side="right") - 1, 0)
        found = (names[at] == wanted) if len(names) else np.zeros(len(paths), dtype=bool)
        member = order[at[found]]
        spans[found, 0], spans[found, 1] = members.offsets[member], members.sizes[member]
        return spans

    def read_span(self, path: str, span: Sequence[int]) -> bytes:
        """The bytes of the image at ``path``, read at ``span`` (from :meth:`spans`) with two
        positioned reads; by path when the span is ``(-1, 0)``."""
        offset, size = span
        if offset < 0:
            return self.read(path)
        if self._file is None:
            self._file = open(self.archive, "rb")  # noqa: SIM115 - kept open for later reads, closed by close()
        fd = self._file.fileno()
        header = os.pread(fd, _LOCAL_HEADER.size, offset)
        if len(header) < _LOCAL_HEADER.size:
            raise self._missing(path)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != _LOCAL_SIGNATURE:
            raise stale_input(f"{self.archive}: no zip member at byte {offset} (for {path})", "ingest")
        start = offset + _LOCAL_HEADER.size + name_length + extra_length
        data = os.pread(fd, size, start)
        if len(data) != size:
            raise stale_input(f"{self.archive}: {path} is cut short", "ingest")
        return data

    def close(self) -> None:
        """Close the archive (if open); a later read opens it again."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RawImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
