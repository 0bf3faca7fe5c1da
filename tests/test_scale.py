"""Data at scale: draft decoding, parallel workers, row-wise cache files, incremental
preprocessing, block-shuffled loading, and a disk that fills or a worker that dies."""

from __future__ import annotations

import errno
import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides
from PIL import Image

from taxonomist.config import compose
from taxonomist.data import parallel
from taxonomist.data.cache import NpyRows, read_split
from taxonomist.data.datamodule import choose_loading
from taxonomist.data.dataset import BlockRows, BlockShuffleSampler
from taxonomist.data.images import ImageSpec, InvalidImage, decode, image_facts, open_image
from taxonomist.data.manifest import RawImages, read_manifest
from taxonomist.errors import DataError, StageOrderError
from taxonomist.stages import ingest, preprocess

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")


def photo(seed: int, size: tuple[int, int] = (320, 240), exif_orientation: int | None = None) -> bytes:
    """A photo-like JPEG: a smooth colour gradient tinted by class, with texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 160
    base[..., seed % 3] += 80
    pixels = base + rng.normal(0, 12, (h, w, 1)) + 20 * np.sin(xx / (3 + seed % 7))[..., None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def photo_folder(root: Path, count: int, start: int = 0) -> Path:
    for i in range(start, start + count):
        folder = root / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.jpg").write_bytes(photo(i))
    return root


# --------------------------------------------------------------------------- decoding


def test_draft_mode_decodes_less_and_stays_within_a_grey_level_of_the_full_decode():
    data = photo(1, size=(800, 600))
    with open_image(data, draft=(64, 64)) as img:
        assert img.size == (100, 75)  # the 1/8 DCT scale still covers 64 px
        assert img.info["full_size"] == (800, 600)
    spec = ImageSpec(64, 3, "squash")
    draft, full = decode(data, spec), decode(data, spec, draft=False)
    diff = np.abs(draft.astype(int) - full.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 24  # the tolerance the README states
    assert not np.array_equal(draft, full)  # draft mode did change the decode


def test_a_truncated_jpeg_fails_in_draft_mode_as_in_a_full_decode():
    data = photo(2, size=(800, 600))
    for cut in (len(data) // 2, len(data) - 64):
        with pytest.raises(InvalidImage, match="truncated"):
            decode(data[:cut], ImageSpec(32, 3))
        with pytest.raises(InvalidImage, match="truncated"):
            image_facts(data[:cut])


def test_facts_give_the_full_upright_size_of_a_draft_decoded_photo():
    facts, thumbnail = image_facts(photo(3, size=(800, 600), exif_orientation=6))  # rotated 90 degrees
    assert (facts["width"], facts["height"]) == (600, 800)
    assert not facts["gray"] and thumbnail.shape == (32, 32)


# --------------------------------------------------------------------------- files and loading


def test_rows_written_in_place_read_back_as_an_ordinary_npy(tmp_path):
    rows = NpyRows.create(tmp_path / "a.npy", (6, 2, 2, 3))
    rows.write(4, np.full((2, 2, 2, 3), 9, np.uint8))
    rows.write(0, np.full((1, 2, 2, 3), 1, np.uint8))
    with pytest.raises(ValueError, match="cannot write"):
        rows.write(5, np.zeros((2, 2, 2, 3), np.uint8))
    rows.close()
    array = np.load(tmp_path / "a.npy")
    assert array.shape == (6, 2, 2, 3) and array[:, 0, 0, 0].tolist() == [1, 0, 0, 0, 9, 9]
    with NpyRows(tmp_path / "a.npy") as again:
        np.testing.assert_array_equal(again.read(3, 10), array[3:])


def test_block_rows_and_the_block_sampler_read_each_block_once_an_epoch(tmp_path):
    images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1).repeat(2, axis=1)
    np.save(tmp_path / "train_images.npy", images)
    blocks = BlockRows(tmp_path / "train_images.npy", block=5)
    np.testing.assert_array_equal(blocks[np.array([22, 3, 7])], images[[22, 3, 7]])
    sampler = BlockShuffleSampler(23, block=5, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(23)) and sorted(second) == list(range(23))
    assert first != second  # a new order each epoch ...
    sampler.set_epoch(0)
    assert list(sampler) == first  # ... from the seed and the epoch
    block_of = [i // 5 for i in first]
    runs = [b for k, b in enumerate(block_of) if k == 0 or b != block_of[k - 1]]
    assert sorted(runs) == list(range(5))  # every block visited in one stretch


def test_loading_auto_reads_into_memory_only_what_fits_in_half_the_ram():
    gib = 2**30
    assert choose_loading("auto", 3 * gib, total_memory=24 * gib)[0] == "memory"
    assert choose_loading("auto", 13 * gib, total_memory=24 * gib)[0] == "blocks"
    assert choose_loading("blocks", 1, total_memory=24 * gib)[0] == "blocks"
    with pytest.raises(ValueError, match=r"fit\.loading"):
        choose_loading("mmap", 1)


# --------------------------------------------------------------------------- the process pool


def double(items):
    return [2 * i for i in items]


def die_on_13(items):
    if 13 in items:
        os._exit(3)  # as a crashing decoder would: no exception, the process is gone
    return list(items)


def test_map_chunks_gives_every_result_once_on_several_workers():
    out = {}
    for start, results in parallel.map_chunks(double, list(range(100)), workers=2, desc="t", chunk=7):
        for k, value in enumerate(results):
            out[start + k] = value
    assert out == {i: 2 * i for i in range(100)}


def test_rows_give_plain_tuples_from_columns():
    rows = parallel.Rows(np.array(["a", "b", "c"], dtype=object), np.arange(3), np.array([[1, 2], [3, 4], [-1, 0]]))
    assert len(rows) == 3
    assert rows[1:] == [("b", 1, (3, 4)), ("c", 2, (-1, 0))]
    assert rows[-1] == ("c", 2, (-1, 0)) and type(rows[0][1]) is int
    with pytest.raises(IndexError):
        rows[3]
    with pytest.raises(ValueError, match="different lengths"):
        parallel.Rows([1, 2], [1])


def test_a_workers_pool_starts_its_processes_at_once_and_serves_every_map():
    """A stage makes its pool before loading its tables (so forked workers copy none of them):
    the processes exist when the pool does, and later maps run on those same processes."""
    with parallel.Workers(2) as pool:
        started = {p.pid for p in pool.executor._processes.values()}
        assert len(started) == 2
        for _ in range(2):
            used = {
                value
                for _, results in parallel.map_chunks(pids_of, list(range(40)), workers=pool, desc="t", chunk=2)
                for value in results
            }
            assert used <= started
    assert pool.executor is None


def pids_of(items: list[int]) -> list[int]:
    return [os.getpid() for _ in items]


def test_a_worker_that_dies_fails_the_map_naming_the_item():
    with pytest.raises(parallel.WorkerDied, match="image 13: the process decoding this image died"):
        list(parallel.map_chunks(die_on_13, list(range(64)), workers=2, desc="t", name=lambda i: f"image {i}", chunk=4))


# --------------------------------------------------------------------------- the preprocess stage


@pytest.fixture
def photos(tmp_path):
    source = photo_folder(tmp_path / "photos", 45)
    cfg = compose([*tiny_overrides(source), "preprocess.workers=1"], conf_dir=REPO / "conf")
    raw, processed = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    ingest.run(cfg, out_dir=raw)
    preprocess.run(cfg, raw_dir=raw, out_dir=processed)
    return {"source": source, "cfg": cfg, "raw": raw, "processed": processed, "tmp": tmp_path}


def same_output(a: Path, b: Path) -> None:
    for name in ("splits.csv", "facts.csv", "report.json"):
        assert (a / name).read_text() == (b / name).read_text(), name
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(read_split(a, split).images, read_split(b, split).images)
        np.testing.assert_array_equal(read_split(a, split).labels, read_split(b, split).labels)


def counting(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(preprocess, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(preprocess, name, counted)
    return calls


def test_workers_read_images_by_span_exactly_as_by_name(photos, tmp_path):
    """Workers read the archive at each member's span (no zip directory in memory): the same
    bytes as a read by name; a compressed or missing member is read by name."""
    manifest = read_manifest(photos["raw"])
    paths = manifest["path"].tolist()
    with RawImages(photos["raw"]) as raw:
        spans = raw.spans(paths)
        assert all(offset >= 0 for offset, _ in spans)
        assert all(raw.read_span(path, span) == raw.read(path) for path, span in zip(paths, spans, strict=True))
    deflated = tmp_path / "raw"
    deflated.mkdir()
    with RawImages(photos["raw"]) as raw, zipfile.ZipFile(deflated / "images.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for path in paths[1:]:
            zf.writestr(path, raw.read(path))
    with RawImages(deflated) as raw:
        assert raw.spans(paths[:2]).tolist() == [[-1, 0], [-1, 0]]
        with RawImages(photos["raw"]) as packed:
            assert raw.read_span(paths[1], (-1, 0)) == packed.read(paths[1])
        with pytest.raises(FileNotFoundError, match=r"not in .*images\.zip"):
            raw.read_span(paths[0], (-1, 0))


def zipfile_spans(archive: Path, paths: list[str]) -> list[list[int]]:
    """The spans :meth:`RawImages.spans` should give, from :mod:`zipfile`'s directory."""
    with zipfile.ZipFile(archive) as zf:
        where = {i.filename: [i.header_offset, i.compress_size] for i in zf.infolist() if i.compress_type == 0}
    return [where.get(path, [-1, 0]) for path in paths]


@pytest.mark.parametrize("prefix", [b"", b"#!/bin/sh\nexit 0\n"], ids=["plain", "prepended bytes"])
def test_spans_read_the_zip_directory_as_zipfile_does(tmp_path, prefix):
    """:meth:`RawImages.spans` reads the central directory itself (arrays, not a ZipInfo per
    member): the same spans as zipfile's for stored, deflated, repeated, UTF-8 and zip64 members,
    an archive comment, and bytes prepended to the archive (a self-extracting zip)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("images/a.jpg", b"a" * 5)
        zf.writestr("images/b.jpg", b"b" * 500, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("images/é ü.jpg", b"e" * 7)
        zf.writestr("images/c.jpg", b"c1")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("images/c.jpg", b"c2-longer")
        with zf.open("images/big.jpg", "w", force_zip64=True) as member:
            member.write(b"x" * 10)
        zf.comment = b"an archive comment"
    (tmp_path / "images.zip").write_bytes(prefix + buffer.getvalue())
    paths = ["images/c.jpg", "images/a.jpg", "images/b.jpg", "images/é ü.jpg", "images/big.jpg", "images/gone.jpg"]
    with RawImages(tmp_path) as raw:
        spans = raw.spans(paths)
        assert spans.tolist() == zipfile_spans(tmp_path / "images.zip", paths)
        assert [raw.read_span(p, s) for p, s in zip(paths[:5], spans[:5], strict=True)] == [
            raw.read(p) for p in paths[:5]
        ]
    (tmp_path / "images.zip").write_bytes(b"not a zip")
    with RawImages(tmp_path) as raw, pytest.raises(StageOrderError, match="run the ingest stage again"):
        raw.spans(paths)


def test_two_workers_write_what_one_writes(photos):
    cfg = compose([*tiny_overrides(photos["source"]), "preprocess.workers=2"], conf_dir=REPO / "conf")
    preprocess.run(cfg, raw_dir=photos["raw"], out_dir=photos["tmp"] / "two")
    same_output(photos["processed"], photos["tmp"] / "two")


def test_the_training_split_is_stored_in_a_seeded_random_order(photos):
    splits = pd.read_csv(photos["processed"] / "splits.csv", keep_default_na=False)
    train = splits[splits["split"] == "train"]["source_id"].tolist()
    assert train != sorted(train)
    labels = [s.split("/")[0] for s in train[:9]]
    assert len(set(labels)) > 1  # not one class after another


def test_added_images_are_the_only_ones_decoded_and_the_result_is_a_fresh_run(photos, monkeypatch):
    photo_folder(photos["source"], 6, start=45)
    ingest.run(photos["cfg"], out_dir=photos["raw"])
    inspected, decoded = counting(monkeypatch, "image_facts"), counting(monkeypatch, "decode")
    preprocess.run(photos["cfg"], raw_dir=photos["raw"], out_dir=photos["processed"])
    assert (len(inspected), len(decoded)) == (6, 6)
    monkeypatch.undo()
    preprocess.run(photos["cfg"], raw_dir=photos["raw"], out_dir=photos["tmp"] / "fresh")
    same_output(photos["processed"], photos["tmp"] / "fresh")


def test_a_changed_decode_setting_decodes_everything_again(photos, monkeypatch):
    overrides = [*tiny_overrides(photos["source"]), "preprocess.image_size=24", "preprocess.workers=1"]
    cfg = compose(overrides, conf_dir=REPO / "conf")
    inspected, decoded = counting(monkeypatch, "image_facts"), counting(monkeypatch, "decode")
    report = preprocess.run(cfg, raw_dir=photos["raw"], out_dir=photos["processed"])
    assert len(inspected) == 0  # the facts do not depend on the settings
    assert len(decoded) == report["images_out"] == 45
    assert read_split(photos["processed"], "train").images.shape[1:] == (24, 24, 3)


def test_a_disk_without_room_fails_before_writing_in_one_line(photos, monkeypatch):
    before = (photos["processed"] / "train_images.npy").read_bytes()
    usage = shutil.disk_usage(photos["processed"])
    monkeypatch.setattr(preprocess.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(DataError) as err:
        preprocess.run(photos["cfg"], raw_dir=photos["raw"], out_dir=photos["processed"])
    message = str(err.value)
    assert "\n" not in message
    assert f"not enough disk space for {photos['processed']}" in message
    assert "MB free" in message and f"the previous {photos['processed']} is unchanged" in message
    assert (photos["processed"] / "train_images.npy").read_bytes() == before


def test_a_disk_that_fills_while_writing_keeps_the_previous_cache(photos, monkeypatch):
    before = {p.name: p.read_bytes() for p in photos["processed"].iterdir()}

    def full(self, start, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NpyRows, "write", full)
    cfg = compose([*tiny_overrides(photos["source"]), "preprocess.image_size=24"], conf_dir=REPO / "conf")
    with pytest.raises(DataError, match=r"not enough disk space for .*processed: the decoded images need"):
        preprocess.run(cfg, raw_dir=photos["raw"], out_dir=photos["processed"])
    assert {p.name: p.read_bytes() for p in photos["processed"].iterdir()} == before
    assert not [p for p in photos["processed"].parent.iterdir() if p.name.startswith(".processed")]


def test_a_decoder_that_kills_its_worker_fails_the_stage_naming_the_file(photos, monkeypatch):
    victim = photos["source"] / "green" / "0010.jpg"
    poison = victim.read_bytes()
    original = preprocess.decode

    def crashing(data, spec, draft=True):
        if data == poison:
            os._exit(11)
        return original(data, spec, draft)

    monkeypatch.setattr(preprocess, "decode", crashing)
    cfg = compose(
        [*tiny_overrides(photos["source"]), "preprocess.workers=2", "preprocess.image_size=24"], conf_dir=REPO / "conf"
    )
    with pytest.raises(parallel.WorkerDied, match=r"green/0010\.jpg: the process decoding this image died"):
        preprocess.run(cfg, raw_dir=photos["raw"], out_dir=photos["processed"])


def test_an_image_that_inspects_but_does_not_decode_fails_the_stage_by_its_source_name(photos, monkeypatch):
    """Decoding holds only the archive paths; the message still names the user's file (read back
    from the splits table written before decoding), and the previous cache stays."""
    before = (photos["processed"] / "train_images.npy").read_bytes()
    victim = (photos["source"] / "blue" / "0011.jpg").read_bytes()
    original = preprocess.decode

    def failing(data, spec, draft=True):
        if data == victim:
            raise InvalidImage("truncated at row 7")
        return original(data, spec, draft)

    monkeypatch.setattr(preprocess, "decode", failing)
    cfg = compose(
        [*tiny_overrides(photos["source"]), "preprocess.workers=2", "preprocess.image_size=24"], conf_dir=REPO / "conf"
    )
    with pytest.raises(
        DataError,
        match=r"1 image\(s\) passed inspection but did not decode at 24px: "
        r"blue/0011\.jpg \(truncated at row 7\); run the ingest stage again",
    ):
        preprocess.run(cfg, raw_dir=photos["raw"], out_dir=photos["processed"])
    assert (photos["processed"] / "train_images.npy").read_bytes() == before
