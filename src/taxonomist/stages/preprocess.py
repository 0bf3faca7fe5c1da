"""Preprocess: validate, de-duplicate, split, and cache the ingested images.

The images are read from ``data/raw/images.zip`` (or, in a ``data/raw`` ingested before the
archive existed, from its loose files; see :class:`taxonomist.data.manifest.RawImages`).
Every image is first inspected (:func:`inspect`: size, mode, gray or colour, blank, perceptual
hash): images that do not decode are quarantined (listed in ``quarantine.csv`` with the reason),
exact duplicates (same content hash) are dropped and listed in ``duplicates.csv``, and the
training pool is split (seeded, stratified) into train/val (and test when the source has none).
Then the ``auto`` settings are chosen from the training split (:mod:`taxonomist.data.auto`),
every image is decoded at those settings, and each split is written as a uint8 array.
``report.json`` records the settings and why each ``auto`` one was chosen.

At scale (README, "Large data sets"):

* Inspection and decoding run on every core (:func:`taxonomist.data.parallel.map_chunks`),
  JPEGs in draft mode (decoded at a reduced DCT scale that still covers the target).
* The decoders write their rows straight into the split files (:class:`~taxonomist.data.cache.NpyRows`),
  so memory does not grow with the number of images; the normalisation is summed as they go.
* The training split is stored in a seeded random order, so any contiguous block of it is a
  random sample (the loader reads blocks when the split does not fit in memory).
* Incremental: what the previous run left in ``data/processed`` (kept by DVC: ``persist``)
  is reused by content hash: the facts of every image it inspected (``facts.csv``) and the
  pixels of every image it decoded at the same settings and decoder version. Adding images
  decodes only the new ones; changing a decode setting decodes everything.
* Before writing, the free disk space is checked; a disk that fills anyway fails with one
  line naming the folder and the space needed, and the previous ``data/processed`` stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import gc
import logging
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from omegaconf import DictConfig
from tqdm import tqdm

from taxonomist.data import auto, health
from taxonomist.data.cache import NpyRows, images_path, write_labels
from taxonomist.data.images import DECODE_VERSION, PHASH_SIZE, ImageSpec, InvalidImage, decode, image_facts, phashes
from taxonomist.data.manifest import COLUMNS, SPLITS, RawImages, read_manifest, split_labels
from taxonomist.data.parallel import Rows, Workers, local, map_chunks, resolve_workers
from taxonomist.data.split import assign_splits, group_keys
from taxonomist.errors import DataError
from taxonomist.files import atomic_directory, atomic_write_csv, atomic_write_json, read_json, read_text_csv
from taxonomist.stages.paths import PROCESSED_DIR, RAW_DIR, health_dir_for
from taxonomist.tasks import Task, task_of

log = logging.getLogger(__name__)
# What :func:`inspect` learns about each image (besides its perceptual hash), with its dtype.
FACTS = {"width": "int64", "height": "int64", "mode": "str", "gray": "bool", "blank": "bool"}
FACTS_FILE = "facts.csv"  # every inspected image's facts (or why it was quarantined), by content hash
FACT_COLUMNS = ["sha256", *FACTS, "phash", "reason"]
AUTO_FACTS = ["width", "height", "gray"]  # the facts auto.choose looks at
SPAN = ["span_offset", "span_size"]  # where an image lies in images.zip (RawImages.spans), carried by the frames
GB = 1e9
PHASH_TEXT = "S16"  # a perceptual hash (images.phashes: 16 hex digits) as fixed-width bytes; b"": none


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop exact duplicates by content hash; return (kept, dropped-with-reason).

    Copies with one label keep a single row (a test copy wins, so the test split is not
    shrunk); copies with conflicting labels are all dropped, since neither label can be trusted.
    The hashes and labels are matched as integer codes (``pd.factorize``) and the decisions
    made on arrays of them: sorting and grouping the frame's text costs far more memory.
    """
    key = pd.factorize(frame["sha256"])[0]
    label = pd.factorize(frame["label"])[0]
    rank = (frame["split"] != "test").to_numpy(dtype=np.int8)
    order = np.lexsort((rank, key))  # stable: by hash, a test copy first, then in frame order
    pairs = np.unique(np.c_[key, label][label >= 0], axis=0)  # (hash, label) pairs present
    conflicting = np.bincount(pairs[:, 0], minlength=key.max(initial=-1) + 1) > 1
    sorted_key = key[order]
    first = np.ones(len(key), dtype=bool)  # the copy that is kept (the first of its hash), in sorted order
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    is_conflict = conflicting[sorted_key]
    gone = is_conflict | ~first  # every copy of a hash with conflicting labels, and the repeats of the others
    dropped = frame.take(order[gone])
    dropped["reason"] = np.where(is_conflict[gone], "conflicting labels for identical images", "duplicate")
    kept_row = np.empty(len(conflicting), dtype=np.int64)  # the row kept of each hash
    kept_row[sorted_key[first]] = order[first]
    kept_path = frame["path"].take(kept_row[sorted_key[gone]]).fillna("").astype(str).to_numpy()
    dropped["duplicate_of"] = np.where(dropped["reason"] == "duplicate", kept_path, "")
    is_gone = np.zeros(len(frame), dtype=bool)
    is_gone[order[gone]] = True
    kept = frame[~is_gone] if is_gone.any() else frame.copy(deep=False)  # (a filter copies every row)
    return (kept if kept.index.is_monotonic_increasing else kept.sort_index()), dropped


def source_namer(frame: pd.DataFrame | Path) -> Callable[[str], str]:
    """The user's name (``source_id``) of an archive path of ``frame`` (a table, or a CSV file
    of one), for messages. The lookup table is built on the first call only: a dict of every
    image would cost a few hundred bytes per image for the rare failure that needs a name."""
    table: dict[str, str] = {}

    def name(path: str) -> str:
        if not table:
            names = read_text_csv(frame, usecols=["path", "source_id"]) if isinstance(frame, Path) else frame
            table.update(zip(names["path"], names["source_id"], strict=True))
        return table.get(path, path)

    return name


def memory_returned() -> None:
    """Hand the memory freed since the last call back to the system (glibc ``malloc_trim``),
    so the process's footprint follows what it holds, not what it once held: after the
    per-image phases the heap is full of freed holes the allocator would otherwise keep.
    A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # bytes: glibc's default starting threshold


def large_blocks_mapped() -> None:
    """Keep every block of at least :data:`MMAP_THRESHOLD` in its own memory mapping, which
    ``free`` unmaps at once (glibc ``mallopt``). By default glibc raises that threshold each
    time a mapped block is freed, so the column arrays made and dropped one phase after the
    other land in the heap instead, where the small objects left between them keep the pages
    (measured: 15-20 MB more at the peak with 100k images). Set before the workers are forked,
    so they inherit it. A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def arrow_on_malloc() -> None:
    """Make pandas' string columns (Arrow) allocate with malloc, which :func:`memory_returned`
    can trim, instead of Arrow's own pool, which keeps what it freed. Importing the package sets
    ``ARROW_DEFAULT_MEMORY_POOL=system``, which covers Arrow's compute kernels too; this covers
    the allocations made from Python when pyarrow was loaded before the package (a notebook)."""
    import pyarrow

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())


def _raw_images(raw_dir: str) -> RawImages:
    """The raw images, opened once per process (and kept open for its other chunks)."""
    return local(("raw", raw_dir), lambda: RawImages(raw_dir))


def _rows_file(path: str) -> NpyRows:
    """An image array being written, opened once per process."""
    return local(("rows", path), lambda: NpyRows(path, writable=True))


def _inspect_chunk(raw_dir: str, items: Sequence[tuple[str, tuple[int, int]]]) -> dict[str, np.ndarray]:
    """:func:`~taxonomist.data.images.image_facts` of each ``(path, span)`` image (with its
    perceptual hash), or its quarantine ``reason``, as one NumPy array per fact
    (:data:`FACT_COLUMNS` after ``sha256``; :func:`_FoundFacts.put` says how). Runs in a worker process."""
    images = _raw_images(raw_dir)
    n = len(items)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    gray, blank = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    mode, reason = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    phash = np.zeros(n, dtype=PHASH_TEXT)
    thumbnails: list[np.ndarray] = []
    for k, (path, span) in enumerate(items):
        try:  # a missing image is quarantined too (the reason names it)
            facts, thumbnail = image_facts(images.read_span(path, span))
        except (InvalidImage, OSError) as err:
            reason[k] = str(err)
            continue
        width[k], height[k], mode[k] = facts["width"], facts["height"], facts["mode"]
        gray[k], blank[k] = facts["gray"], facts["blank"]
        thumbnails.append(thumbnail)
    decoded = np.flatnonzero(reason == "")
    if len(decoded):
        # pHash scales an image to 32x32: below that it compares outlines (a sneaker and a
        # boot alike), so small images are left out of the near-duplicate search.
        hashes = np.array(phashes(np.stack(thumbnails)), dtype=phash.dtype)
        large = np.minimum(width[decoded], height[decoded]) >= PHASH_SIZE
        phash[decoded[large]] = hashes[large]
    facts = {"width": width, "height": height, "mode": mode, "gray": gray, "blank": blank}
    return {**facts, "phash": phash, "reason": reason}


class _FoundFacts:
    """The facts of ``n`` images as :func:`_inspect_chunk` returns them, chunk by chunk, in
    NumPy arrays: a few dozen bytes per image, where a Python object per fact cost hundreds."""

    def __init__(self, n: int) -> None:
        self.width, self.height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        self.gray, self.blank = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        self.phash = np.zeros(n, dtype=PHASH_TEXT)
        self.mode = np.full(n, "", dtype=object)  # a few distinct modes, shared (sys.intern)
        self.reason = np.full(n, "", dtype=object)

    def put(self, start: int, chunk: dict[str, np.ndarray]) -> None:
        """Store a chunk's facts from row ``start``."""
        rows = slice(start, start + len(chunk["reason"]))
        for column in ("width", "height", "gray", "blank", "phash", "reason"):
            getattr(self, column)[rows] = chunk[column]
        self.mode[rows] = [sys.intern(str(mode)) for mode in chunk["mode"]]

    def frame(self, index: pd.Index) -> pd.DataFrame:
        """The facts as a table (:func:`typed_facts`) with ``index``: a quarantined image (a
        ``reason``) has missing numbers and flags, and no mode or hash."""
        bad = self.reason != ""
        text = pa.array(self.phash).cast(pa.string())  # to pandas' (Arrow) text without a Python string each
        table = pd.DataFrame(
            {
                "width": pd.arrays.IntegerArray(self.width, bad),
                "height": pd.arrays.IntegerArray(self.height, bad),
                "mode": self.mode,
                "gray": pd.arrays.BooleanArray(self.gray, bad),
                "blank": pd.arrays.BooleanArray(self.blank, bad),
                "phash": pd.array(text, dtype="str"),
                "reason": self.reason,
            },
            index=index,
        )
        return typed_facts(table)


def positions(keys: pd.Series, values: pd.Series | pd.Index) -> np.ndarray:
    """The position in ``values`` of each of ``keys`` (the first, when repeated; -1: absent).

    The text is matched as integer codes (``pd.factorize``): an index of text or ``isin``
    would make a Python string of every value (about 150 bytes per content hash)."""
    codes, uniques = pd.factorize(pd.concat([pd.Series(values, copy=False), keys], ignore_index=True))
    n = len(values)
    first = np.full(len(uniques) + 1, -1, dtype=np.int64)  # the last entry stays -1 for missing keys (code -1)
    held = np.flatnonzero(codes[:n] >= 0)[::-1]  # backwards, so the first of repeated values is written last
    first[codes[held]] = held
    return first[codes[n:]]


def inspect(
    manifest: pd.DataFrame, raw_dir: Path, workers: int | Workers = 1, known: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, list[dict[str, str]], pd.DataFrame]:
    """Look at every image once: the valid rows with their facts (size, mode, gray, blank,
    perceptual hash), the quarantined ones (with the reason), and the facts table of every
    image by content hash (:data:`FACT_COLUMNS`, written as ``facts.csv``).

    Images whose content hash is in ``known`` (an earlier run's facts table) are not read again.
    """
    table = pd.DataFrame(columns=FACT_COLUMNS) if known is None else known
    table = table.drop_duplicates("sha256").set_index("sha256")
    hashes = manifest["sha256"]
    # the first image of each content hash not known yet (filtered only when some are known or
    # repeated: a filter copies)
    unseen = (positions(hashes, table.index) < 0) & (positions(hashes, hashes) == np.arange(len(manifest)))
    todo = manifest[["path", "sha256", "source_id", *SPAN]]
    todo = todo if unseen.all() else todo[unseen]
    if len(table):
        log.info("inspect: %d image(s) known from the previous run, %d new", len(manifest) - len(todo), len(todo))
    found = _FoundFacts(len(todo))
    items = Rows(todo["path"].array, todo[SPAN].to_numpy())
    source_name = source_namer(todo)
    for start, results in map_chunks(
        functools.partial(_inspect_chunk, str(raw_dir)),
        items,
        workers=workers,
        desc="inspect",
        name=lambda item: source_name(item[0]),
    ):
        found.put(start, results)
    new = found.frame(pd.Index(todo["sha256"], name="sha256"))
    del found, items
    table = pd.concat([table[FACT_COLUMNS[1:]], new]) if len(table) else new
    present = positions(pd.Series(table.index), manifest["sha256"]) >= 0
    if not present.all():  # only what this data set has (filtered only then: a copy of every image's facts)
        table = table[present]
    rows = positions(manifest["sha256"], table.index)
    in_order = np.array_equal(rows, np.arange(len(table)))  # (a first run without duplicates: no copy needed)
    facts = (table if in_order else table.iloc[rows]).set_axis(manifest.index)
    bad = facts["reason"] != ""
    problems = [
        {"path": row.path, "labels": row.labels, "source_id": row.source_id, "reason": reason}
        for row, reason in zip(manifest[bad].itertuples(), facts.loc[bad, "reason"], strict=True)
    ]
    for problem in problems[:20]:
        log.warning("quarantined %s: %s", problem["source_id"] or problem["path"], problem["reason"])
    if len(problems) > 20:
        log.warning("... and %d more quarantined (data/processed/quarantine.csv lists them)", len(problems) - 20)
    looked = facts[[*FACTS, "phash"]]
    if bad.any():  # (a boolean filter copies every row)
        manifest, looked = manifest[~bad], looked[~bad]
    valid = manifest.join(looked.astype(FACTS))
    out = table.reset_index()[FACT_COLUMNS].sort_values("sha256", kind="stable")
    return valid, problems, out


def typed_facts(table: pd.DataFrame) -> pd.DataFrame:
    """A facts table (new, or read from ``facts.csv``) with text where text is missing and
    ``gray``/``blank`` as booleans; the numbers of quarantined rows stay missing."""
    table = table.copy()
    for column in ("mode", "phash", "reason"):
        table[column] = table[column].fillna("").astype(str)
    for column in ("gray", "blank"):
        table[column] = table[column].map({True: True, False: False, "True": True, "False": False})
    for column in ("width", "height"):
        table[column] = pd.to_numeric(table[column]).astype("Int64")
    return table


@dataclass
class Previous:
    """What the previous run left in ``data/processed`` that this one can reuse."""

    folder: Path
    facts: pd.DataFrame | None  # the facts table (None: none, or from another decoder version)
    rows: pd.DataFrame | None  # sha256 -> split, row of its decoded pixels
    decode: dict | None = None  # the decode key those pixels were made with (:func:`decode_key`)


def decode_key(spec: ImageSpec) -> dict[str, object]:
    """What decides the pixels of a decoded image besides its content."""
    return {
        "image_shape": [spec.size, spec.size, spec.channels],
        "resize_mode": spec.resize_mode,
        "decoder": DECODE_VERSION,
    }


def previous_run(out_dir: Path) -> Previous:
    """What an earlier preprocess left in ``out_dir`` (nothing when it is missing or unreadable)."""
    try:
        report = read_json(out_dir / "report.json")
        if report.get("decode", {}).get("decoder") != DECODE_VERSION:
            return Previous(out_dir, None, None)
        facts = pd.read_csv(out_dir / FACTS_FILE, dtype={"sha256": str, "mode": str, "phash": str, "reason": str})
        facts = typed_facts(facts)
        facts = facts[facts["reason"] == ""]  # quarantined images are looked at again (a missing file may be back)
        splits = read_text_csv(out_dir / "splits.csv")
    except (OSError, ValueError, KeyError) as err:
        if out_dir.exists():
            log.info("nothing reused from %s: %s", out_dir, err)
        return Previous(out_dir, None, None)
    splits["row"] = splits.groupby("split").cumcount()
    rows = splits.drop_duplicates("sha256").set_index("sha256")[["split", "row"]]
    return Previous(out_dir, facts[FACT_COLUMNS], rows, report["decode"])


def _decode_chunk(
    raw_dir: str, out_dir: str, spec: ImageSpec, jobs: Sequence[tuple[str, int, str, tuple[int, int]]]
) -> tuple[auto.PixelStats, list[tuple[int, str]]]:
    """Decode ``(split, row, path, span)`` jobs into the split files (a run of consecutive rows in
    one write); return the pixel sums of the training images among them and, for each job
    that did not decode, its index in ``jobs`` and the reason. Runs in a worker process."""
    images = _raw_images(raw_dir)
    stats = auto.PixelStats(spec.channels)
    failed: list[tuple[int, str]] = []
    run: list[np.ndarray] = []  # decoded rows waiting to be written, from row `first` of `split`
    split, first = "", 0

    def flush() -> None:
        if run:
            _rows_file(str(images_path(out_dir, split))).write(first, np.stack(run))
            if split == "train":
                stats.add(np.stack(run))
            run.clear()

    for k, (job_split, row, path, span) in enumerate(jobs):
        try:
            pixels = decode(images.read_span(path, span), spec)
        except (InvalidImage, FileNotFoundError) as err:
            failed.append((k, str(err)))
            continue
        if not run or job_split != split or row != first + len(run):
            flush()
            split, first = job_split, row
        run.append(pixels)
    flush()
    return stats, failed


def write_images(
    frame: pd.DataFrame,
    raw_dir: Path,
    out_dir: Path,
    spec: ImageSpec,
    workers: int | Workers,
    previous: Previous,
    names: Path | None = None,
) -> tuple[auto.PixelStats, int]:
    """Write each split's images (``<split>_images.npy``, rows in ``frame`` order) into
    ``out_dir``: copied from ``previous`` when it decoded the same content at ``spec``, else
    decoded on ``workers`` processes. Returns the training images' pixel sums and how many
    images were decoded (not reused).

    ``frame`` needs ``path``, ``split`` and the spans, plus ``sha256`` when ``previous`` has
    rows to reuse. Messages name an image by its ``source_id``: from ``frame``, or from the CSV
    ``names`` (read only when a message needs it, so the stage can drop the column first)."""
    stats = auto.PixelStats(spec.channels)
    source_name = source_namer(frame if names is None else names)  # what messages name
    split_names: list[np.ndarray] = []  # per split, of what is decoded: the split, its row, the frame position
    split_rows: list[np.ndarray] = []
    at: list[np.ndarray] = []
    reuse: list[tuple[str, int, str, int]] = []  # (split, row, old split, old row)
    files = {}
    # where each image is in the previous run's table of decoded images (-1: not decoded there)
    before = positions(frame["sha256"], previous.rows.index) if previous.rows is not None else None
    for split in SPLITS:
        where = np.flatnonzero((frame["split"] == split).to_numpy(dtype=bool))  # frame positions, in order
        files[split] = NpyRows.create(images_path(out_dir, split), (len(where), spec.size, spec.size, spec.channels))
        found = before[where] >= 0 if before is not None else np.zeros(len(where), dtype=bool)
        for row in np.flatnonzero(found):
            old = before[where[row]]
            reuse.append((split, int(row), previous.rows["split"].iat[old], int(previous.rows["row"].iat[old])))
        rows = np.flatnonzero(~found)
        split_names.append(np.full(len(rows), split, dtype=object))
        split_rows.append(rows)
        at.append(where[rows])
    decoded = np.concatenate(at)
    # The paths stay pandas text (a Python string each only for the chunk being sent).
    jobs = Rows(
        np.concatenate(split_names),
        np.concatenate(split_rows),
        frame["path"].array.take(decoded),
        frame[SPAN].to_numpy()[decoded],
    )
    try:
        if reuse:
            old = {split: NpyRows(images_path(previous.folder, split)) for split in SPLITS}
            try:
                for split, row, old_split, old_row in tqdm(reuse, desc="reuse", unit="img", mininterval=1):
                    pixels = old[old_split].read(old_row)
                    files[split].write(row, pixels)
                    if split == "train":
                        stats.add(pixels)
            finally:
                for rows in old.values():
                    rows.close()
        failed: list[str] = []
        decode_chunk = functools.partial(_decode_chunk, str(raw_dir), str(out_dir), spec)
        for start, (chunk_stats, chunk_failed) in map_chunks(
            decode_chunk, jobs, workers=workers, desc=f"decode {spec.size}px", name=lambda job: source_name(job[2])
        ):
            stats = stats + chunk_stats
            failed += [f"{source_name(jobs[start + k][2])} ({reason})" for k, reason in chunk_failed]
        if failed:  # inspection decoded them: a file that changed since, or a decoder quirk
            raise DataError(
                f"{len(failed)} image(s) passed inspection but did not decode at {spec.size}px: "
                f"{'; '.join(failed[:5])}; run the ingest stage again"
            )
        for written in files.values():  # on disk before the stage swaps its folder in (and counted in its time)
            written.sync()
    finally:
        for rows in files.values():
            rows.close()
    log.info("images: %d decoded, %d reused from the previous run", len(jobs), len(reuse))
    return stats, len(jobs)


def check_space(out_dir: Path, needed: int) -> None:
    """Refuse to start writing ``needed`` bytes when the disk under ``out_dir`` has less free."""
    free = shutil.disk_usage(out_dir.parent if not out_dir.exists() else out_dir).free
    if needed > free:
        raise DataError(no_space(out_dir, needed, free))


def no_space(out_dir: Path, needed: int, free: int | None = None) -> str:
    """The one line for a disk too full to write the cache."""
    if free is None:
        free = shutil.disk_usage(out_dir.parent).free
    return (
        f"not enough disk space for {out_dir}: the decoded images need {_size(needed)}, {_size(free)} free "
        f"there; free some space and run again (the previous {out_dir} is unchanged)"
    )


def _size(nbytes: int) -> str:
    """Bytes for people: MB below a gigabyte, GB with two decimals above."""
    return f"{nbytes / 1e6:.1f} MB" if nbytes < GB else f"{nbytes / GB:.2f} GB"


def thumbnail(out_dir: Path, where: tuple[str, int] | None) -> np.ndarray | None:
    """The cached pixels of one image (``(split, row)``; None: not cached)."""
    if where is None:
        return None
    with NpyRows(images_path(out_dir, where[0])) as rows:
        return rows.read(where[1])[0]


def check_class_names(labels: pd.Series) -> None:
    """Refuse class names that differ only by case or spaces ("Dog" and "dog "): they would be
    trained as different classes."""
    names = sorted({name for cell in labels.unique() for name in split_labels(cell)})
    similar = health.similar_class_names(names)
    if similar:
        shown = "; ".join(" / ".join(repr(n) for n in group) for group in similar[:5])
        raise DataError(
            f"{len(similar)} group(s) of class names differ only by case or spaces: {shown}"
            f"{' ...' if len(similar) > 5 else ''}; rename them to one spelling (e.g. merge the folders)"
        )


def run(
    cfg: DictConfig, raw_dir: Path = RAW_DIR, out_dir: Path = PROCESSED_DIR, health_dir: Path | None = None
) -> dict:
    """Run the preprocess stage; return the report (also written to ``report.json``) and write the
    data set health report (``health.md`` with plots and CSVs) into ``health_dir`` (default:
    :func:`~taxonomist.stages.paths.health_dir_for` ``out_dir``)."""
    # The worker processes start before any table is loaded, so they do not copy it.
    arrow_on_malloc()
    large_blocks_mapped()
    with Workers(resolve_workers(cfg.preprocess.get("workers", "auto"))) as workers:
        return _run(cfg, raw_dir, out_dir, health_dir or health_dir_for(out_dir), workers)


def order_by_split(frame: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, dict[str, slice]]:
    """``frame`` in the order the split files store it, with the rows of each split: the
    training split first, in a seeded random order (any block of it is a random sample), then
    val and test in manifest order.

    ``frame`` is emptied: its columns are moved into the new table one at a time, so only one
    column is ever held twice (a ``take`` of the whole table would hold two copies of every
    image's text at once: the largest table of the stage)."""
    split = frame["split"].to_numpy()
    rows = {name: np.flatnonzero(split == name) for name in SPLITS}
    del split
    rows["train"] = pd.Series(rows["train"]).sample(frac=1.0, random_state=seed).to_numpy()
    bounds = np.cumsum([0, *(len(rows[name]) for name in SPLITS)])
    slices = {name: slice(int(bounds[k]), int(bounds[k + 1])) for k, name in enumerate(SPLITS)}
    order = np.concatenate([rows[name] for name in SPLITS])
    ordered = pd.DataFrame(index=frame.index.take(order))
    for column in list(frame.columns):
        ordered[column] = frame.pop(column).array.take(order)
    return ordered, slices


def locate(paths: pd.Series, slices: dict[str, slice], wanted: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Where each of the ``wanted`` images lies once written, ``(split, row)`` by path; ``paths``
    are every image's, in split-file order (``slices``: the rows of each split). Only the few
    the health report shows are looked up: a table of every image would outlive the stage's
    per-image tables."""
    wanted = list(dict.fromkeys(wanted))
    found: dict[str, tuple[str, int]] = {}
    if not wanted:
        return found
    hits = np.flatnonzero(paths.isin(wanted).to_numpy(dtype=bool))
    for at in hits:
        path = str(paths.iat[at])
        split = next(name for name, rows in slices.items() if rows.start <= at < rows.stop)
        found.setdefault(path, (split, int(at) - slices[split].start))
    return found


def write_tables(
    out_dir: Path,
    frame: pd.DataFrame,
    slices: dict[str, slice],
    space: Task,
    dropped: pd.DataFrame,
    quarantined: pd.DataFrame,
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Write the stage's tables into ``out_dir``: each split's encoded labels
    (``<split>_labels.npy``), the label space, ``splits.csv`` (``frame``, in split-file order,
    ``slices`` its rows per split), ``duplicates.csv`` and ``quarantine.csv``. Returns the labels
    per split and class (several per multi-label image) and the images per split."""
    counts: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for split in SPLITS:
        # Each distinct label cell is encoded and split once (a few per data set), then spread
        # to its images: a Python string or list per image would outlive the stage as heap holes.
        codes, cells = pd.factorize(frame["labels"].iloc[slices[split]])
        np.save(out_dir / f"{split}_labels.npy", np.asarray(space.encode(list(cells)))[codes])
        sizes[split] = len(codes)
        per_cell = np.bincount(codes, minlength=len(cells))
        per_label: dict[str, int] = {}
        for cell, n in zip(cells, per_cell, strict=True):
            for label in split_labels(str(cell)):
                per_label[label] = per_label.get(label, 0) + int(n)
        counts[split] = dict(sorted(per_label.items()))
    write_labels(out_dir, space)
    atomic_write_csv(out_dir / "splits.csv", frame)
    atomic_write_csv(out_dir / "duplicates.csv", dropped[[*COLUMNS, "reason", "duplicate_of"]])
    atomic_write_csv(out_dir / "quarantine.csv", quarantined)
    return counts, sizes


def released() -> None:
    """Collect the garbage of a per-image phase and hand the freed memory back (:func:`memory_returned`)."""
    gc.collect()
    memory_returned()


def _run(cfg: DictConfig, raw_dir: Path, out_dir: Path, health_dir: Path, workers: Workers) -> dict:
    """The stage. Its outputs are written into a temporary folder that replaces ``out_dir``
    when everything succeeded; each per-image table is written there as soon as it is final
    and dropped, so what the stage holds at the end does not grow with the data set."""
    needed = 0  # bytes of decoded images, once known (for a full disk's message)
    try:
        with atomic_directory(out_dir) as tmp:
            pre = cfg.preprocess
            task = task_of(cfg)
            manifest = read_manifest(raw_dir)
            check_class_names(manifest["labels"])
            manifest["label"] = manifest["labels"]  # the key for duplicate checks: the whole label set
            with RawImages(raw_dir) as raw:  # where each image lies in the archive, read once: workers need no index
                manifest[SPAN] = raw.spans(manifest["path"].to_numpy())
            previous = previous_run(out_dir)
            valid, problems, facts_table = inspect(manifest, raw_dir, workers, previous.facts)
            images_in = len(manifest)
            del manifest  # the frames below are what is left of it
            atomic_write_csv(tmp / FACTS_FILE, facts_table)
            del facts_table
            released()

            kept, dropped = deduplicate(valid)
            del valid
            released()
            kept["stratum"] = task.strata(kept["label"], int(pre.min_images_per_class))
            groups = group_keys(kept, cfg.data.get("group_by"))  # data.group_by: a source column or a regex
            if groups is not None:
                kept["group"] = groups
            split_frame = assign_splits(
                kept,
                val_fraction=float(pre.val_fraction),
                test_fraction=float(pre.test_fraction),
                seed=int(cfg.seed),
                min_images_per_class=int(pre.min_images_per_class),
                by="stratum",
                group=None if groups is None else "group",
            )
            del kept, groups
            split_frame = split_frame.drop(columns=["label", "stratum"])  # drawn: the split is all that counts now
            space = task.from_labels(split_frame["labels"], cfg.task)
            quarantined = pd.DataFrame(problems, columns=["path", "labels", "source_id", "reason"])
            report_health = health.analyse(
                split_frame, dropped, quarantined, int(pre.near_duplicate_distance), str(pre.near_duplicates)
            )
            if report_health.drop:
                split_frame = split_frame[~split_frame["path"].isin(report_health.drop)]
            # what is left to use: the facts auto.choose looks at, and what write_images and the CSVs need
            split_frame = split_frame[[*COLUMNS, *SPAN, *AUTO_FACTS]]
            split_frame, slices = order_by_split(split_frame, int(cfg.seed))
            released()
            parts = {split: split_frame.iloc[rows] for split, rows in slices.items()}

            choice = auto.choose(cfg, parts["train"])
            chosen = choice.preprocess
            spec = ImageSpec(size=chosen["image_size"], channels=chosen["channels"], resize_mode=chosen["resize_mode"])
            needed = len(split_frame) * spec.size * spec.size * spec.channels
            check_space(out_dir, needed)
            if previous.decode != decode_key(spec):
                previous.rows = None  # decoded at other settings (or nothing to reuse): everything is decoded

            # The tables are final: write them now, so decoding holds no more text than it needs.
            images_out = len(split_frame)
            counts, sizes = write_tables(tmp, split_frame[list(COLUMNS)], slices, space, dropped, quarantined)
            shown = locate(split_frame["path"], slices, report_health.shown_paths())  # the report's example images
            decoding = ["path", "split", *SPAN] + (["sha256"] if previous.rows is not None else [])
            split_frame = split_frame[decoding]
            del parts
            released()
            stats, _ = write_images(split_frame, raw_dir, tmp, spec, workers, previous, names=tmp / "splits.csv")
            del previous, split_frame
            released()
            auto.add_normalisation(choice, cfg, stats, images=sizes["train"])
            for line in auto.describe(choice.to_dict()):
                log.info("auto: %s", line)
            report = {
                "images_in": images_in,
                "quarantined": len(problems),
                "duplicates_dropped": int((dropped["reason"] == "duplicate").sum()),
                "conflicting_dropped": int((dropped["reason"] != "duplicate").sum()),
                "images_out": images_out,
                "task": task.name,
                "classes": space.classes,
                "image_shape": [spec.size, spec.size, spec.channels],
                "decode": decode_key(spec),
                "settings": choice.to_dict(),
                "health": report_health.summary,
                "per_split": sizes,  # images; per_split_per_class counts labels (several per multi-label image)
                "per_split_per_class": counts,
            }
            atomic_write_json(tmp / "report.json", report)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DataError(no_space(out_dir, needed)) from None
        raise
    report_health.write(health_dir, thumbnail=lambda path: thumbnail(out_dir, shown.get(path)))
    log.info("data health report: %s (%d warning(s))", health_dir / "health.md", len(report_health.warnings))
    log.info(
        "preprocess: %d in, %d quarantined, %d duplicates dropped, %s",
        images_in,
        len(problems),
        len(dropped),
        report["per_split"],
    )
    return report
