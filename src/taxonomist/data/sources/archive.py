"""A zip or tar archive (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) of a folder tree, a manifest or an export.

Safety first: every member is inspected before anything is written, and one unsafe member
refuses the whole archive (one error names every unsafe member): an absolute path, a drive letter, a ``..``
component, a symbolic or hard link, or anything that is neither a regular file nor a folder
(devices, fifos). Archives that would expand beyond :data:`MAX_EXTRACTED_BYTES` are refused
too (declared sizes are checked first, and the bytes actually written are counted). Members
are extracted one by one by this module (not by ``extractall``) into a temporary folder
inside ``out_dir`` that is removed afterwards.

The content root is the extracted folder, descended while it holds a single folder and no
files (``__MACOSX`` and dot-files are ignored). Then, by what the content root holds:

* one ``.csv``/``.parquet``/``.pq`` file: a manifest (:mod:`~taxonomist.data.sources.table`);
* one ``.json`` file: a Label Studio export (:mod:`~taxonomist.data.sources.label_studio`);
* none of these: a folder-per-class tree (:mod:`~taxonomist.data.sources.folder`).

Manifest and export image paths must point inside the archive (``data.image_root`` is not
used for archives). Source ids are prefixed with the archive's name (``shapes.zip:circle/a.png``,
``data.zip:labels.csv row 3``), and error messages name ``<archive name>/<member path>``
instead of the temporary folder.
"""

from __future__ import annotations

import lzma
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig

from taxonomist.data.manifest import Record
from taxonomist.data.sources.common import is_hidden
from taxonomist.data.sources.folder import materialise_folder
from taxonomist.data.sources.label_studio import materialise_label_studio
from taxonomist.data.sources.table import materialise_table
from taxonomist.errors import DataError, Problems

# Bounds checked from the archive's directory before anything is extracted (zip bombs, tar
# bombs, millions of tiny members); the bytes written are counted too, in case a header lies.
# A real data set past them: extract it yourself and point data.source at the folder.
MAX_EXTRACTED_BYTES = 20 * 1024**3  # 20 GiB in all
MAX_MEMBERS = 2_000_000
MAX_RATIO = 100  # extracted size / archive size, in all and per zip member (images barely compress)
RATIO_FLOOR = 16 * 1024**2  # members and archives that expand to less than this are not ratio-checked
CHUNK = 1 << 20
READERS_BY_SUFFIX = {
    ".csv": materialise_table,
    ".parquet": materialise_table,
    ".pq": materialise_table,
    ".json": materialise_label_studio,
}
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError)
_DRIVE = re.compile(r"[A-Za-z]:")


@dataclass(frozen=True)
class Member:
    """One inspected archive member: its name as stored, its safe relative path parts and size."""

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    info: Any  # the ZipInfo or TarInfo, to read the member


UNSAFE_MEMBERS = "unsafe member(s)"


def _unsafe(name: str, why: str) -> DataError:
    return DataError(f"member {name!r}: {why}")


def _refuse_unsafe(archive: Path, problems: Problems) -> None:
    """Refuse the whole archive, naming every unsafe member, when ``problems`` holds any."""
    if problems:
        raise DataError(f"{archive}: refusing the archive; nothing was extracted. {problems.message()}")


def member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The relative path parts of member ``name``; refuse absolute, drive-letter and ``..`` paths.

    Backslashes count as separators (zip files made on Windows may use them).
    """
    unified = name.replace("\\", "/")
    if "\x00" in unified:
        raise _unsafe(name, "a NUL character in its name")
    if unified.startswith("/"):
        raise _unsafe(name, "an absolute path")
    if _DRIVE.match(unified):
        raise _unsafe(name, "a drive letter")
    parts = tuple(part for part in unified.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _unsafe(name, "a '..' path component")
    return parts


def _member(archive: Path, name: str, is_dir: bool, size: int, info: Any) -> Member:
    parts = member_parts(archive, name)
    if not parts and not is_dir:
        raise _unsafe(name, "an empty file name")
    return Member(name, parts, is_dir, size, info)


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[Member]:
    members, problems = [], Problems()
    for info in zf.infolist():
        with problems.collect(UNSAFE_MEMBERS):
            kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type, 0 when the zip does not record one
            if kind == stat.S_IFLNK:
                raise _unsafe(info.filename, "a symbolic link")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _unsafe(info.filename, "not a regular file or folder")
            if info.flag_bits & 0x1:
                raise _unsafe(info.filename, "encrypted")
            is_dir = info.is_dir() or kind == stat.S_IFDIR
            members.append(_member(archive, info.filename, is_dir, info.file_size, info))
    _refuse_unsafe(archive, problems)
    return members


def _tar_members(archive: Path, tf: tarfile.TarFile) -> list[Member]:
    members, problems = [], Problems()
    for info in tf.getmembers():
        with problems.collect(UNSAFE_MEMBERS):
            if info.issym():
                raise _unsafe(info.name, "a symbolic link")
            if info.islnk():
                raise _unsafe(info.name, "a hard link")
            if not (info.isfile() or info.isdir()):
                raise _unsafe(info.name, "not a regular file or folder (a device or fifo)")
            size = info.size if info.isfile() else 0
            members.append(_member(archive, info.name, info.isdir(), size, info))
    _refuse_unsafe(archive, problems)
    return members


def _write_members(members: list[Member], open_member: Callable[[Member], IO[bytes]], dest: Path) -> None:
    written = 0
    for member in members:
        target = dest.joinpath(*member.parts)
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member(member) as src, target.open("wb") as out:
            while block := src.read(CHUNK):
                written += len(block)
                if written > MAX_EXTRACTED_BYTES:
                    raise DataError(f"archive expands beyond {MAX_EXTRACTED_BYTES} bytes; refusing it")
                out.write(block)


def extract_archive(archive: Path, make_dest: Callable[[], Path]) -> Path:
    """Inspect every member of ``archive``, then extract them into ``make_dest()`` and return it.

    ``make_dest`` is called only once all members passed inspection, so nothing is written
    when a member is refused.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _zip_members(archive, zf)
                return _extract(archive, members, zf.open, make_dest)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                members = _tar_members(archive, tf)
                return _extract(archive, members, tf.extractfile, make_dest)  # type: ignore[arg-type]
    except ARCHIVE_ERRORS as err:
        raise DataError(f"{archive}: cannot read the archive ({err})") from None
    raise DataError(f"{archive}: not a zip or tar archive")


def check_bounds(archive: Path, members: list[Member]) -> None:
    """Refuse, before extracting, an archive past :data:`MAX_MEMBERS`, :data:`MAX_EXTRACTED_BYTES`
    or :data:`MAX_RATIO` (in all, or for one zip member), in one line naming the bound."""
    declared = sum(m.size for m in members)
    packed = max(archive.stat().st_size, 1)
    why = ""
    if len(members) > MAX_MEMBERS:
        why = f"it has {len(members):,} members, more than the {MAX_MEMBERS:,} allowed"
    elif declared > MAX_EXTRACTED_BYTES:
        why = (
            f"it expands to {declared / 1024**3:.1f} GiB, more than the {MAX_EXTRACTED_BYTES / 1024**3:.0f} GiB allowed"
        )
    elif declared > RATIO_FLOOR and declared / packed > MAX_RATIO:
        why = f"it expands {declared / packed:,.0f} times ({packed:,} bytes to {declared:,}), more than {MAX_RATIO}x"
    else:
        for m in members:
            compressed = getattr(m.info, "compress_size", None)
            if compressed is not None and m.size > RATIO_FLOOR and m.size / max(compressed, 1) > MAX_RATIO:
                why = f"member {m.name!r} expands {m.size / max(compressed, 1):,.0f} times, more than {MAX_RATIO}x"
                break
    if why:
        raise DataError(
            f"{archive}: refusing the archive, nothing was extracted: {why} (a data set this large: extract it "
            "yourself and set data.source to the folder)"
        )


def _extract(
    archive: Path, members: list[Member], open_info: Callable[[Any], IO[bytes]], make_dest: Callable[[], Path]
) -> Path:
    check_bounds(archive, members)
    dest = make_dest()
    try:
        _write_members(members, lambda m: open_info(m.info), dest)
    except DataError as err:
        raise DataError(f"{archive}: {err}") from None
    return dest


def content_root(folder: Path) -> Path:
    """Descend from ``folder`` while it holds a single folder and no files (hidden names ignored)."""
    while True:
        entries = [p for p in folder.iterdir() if not is_hidden(p.name)]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


def _read_content(cfg: DictConfig, root: Path, inside: Path, out_dir: Path, archive_name: str) -> list[Record]:
    entries = [p for p in root.iterdir() if not is_hidden(p.name)]
    if not entries:
        raise DataError(f"{archive_name}: the archive holds no files")
    candidates = sorted(p for p in entries if p.is_file() and p.suffix.lower() in READERS_BY_SUFFIX)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(
            f"{archive_name}: cannot tell which file is the manifest or export ({names}); keep only one of them "
            "at the top of the archive"
        )
    if candidates:
        return READERS_BY_SUFFIX[candidates[0].suffix.lower()](cfg, candidates[0], out_dir, inside=inside)
    return materialise_folder(cfg, root, out_dir)


def materialise_archive(cfg: DictConfig, path: Path, out_dir: Path) -> list[Record]:
    """Safely extract a zip or tar archive and read the folder tree, manifest or export inside it."""
    extracted: list[Path] = []

    def make_dest() -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        extracted.append(Path(tempfile.mkdtemp(dir=out_dir, prefix=".extract-")))
        return extracted[0]

    try:
        tmp = extract_archive(path, make_dest)
        try:
            records = _read_content(cfg, content_root(tmp), tmp, out_dir, path.name)
        except DataError as err:
            message = str(err)
            for prefix in {str(tmp.resolve()), str(tmp)}:
                message = message.replace(prefix, path.name)
            raise DataError(message) from None
    finally:
        for folder in extracted:
            shutil.rmtree(folder, ignore_errors=True)
    return [replace(r, source_id=f"{path.name}:{r.source_id}") for r in records]
