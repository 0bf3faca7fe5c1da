"""De-duplication, split assignment, the cache, and the ingest + preprocess stages."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image_folder, tiny_overrides

from taxonomist.config import compose
from taxonomist.data.cache import read_labels, read_split, write_labels, write_split
from taxonomist.data.images import ImageSpec, decode
from taxonomist.data.manifest import RawImages, pack_images, read_manifest
from taxonomist.data.split import assign_splits
from taxonomist.errors import DataError, StageOrderError
from taxonomist.files import sha256_bytes
from taxonomist.stages import ingest, preprocess
from taxonomist.stages.preprocess import deduplicate
from taxonomist.tasks import get_task

REPO = Path(__file__).resolve().parents[1]


def frame(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """A manifest-like frame from (path, label, split, sha256) tuples."""
    out = pd.DataFrame(rows, columns=["path", "label", "split", "sha256"])
    out["source_id"] = out["path"]
    return out


# --------------------------------------------------------------------------- deduplicate


def test_deduplicate_keeps_one_copy_per_hash():
    rows = [("a1", "cat", "", "h1"), ("a2", "cat", "", "h1"), ("b", "dog", "", "h2"), ("a3", "cat", "", "h1")]
    kept, dropped = deduplicate(frame(rows))
    assert kept["path"].tolist() == ["a1", "b"]
    assert sorted(dropped["path"]) == ["a2", "a3"]
    assert set(dropped["reason"]) == {"duplicate"}
    assert set(dropped["duplicate_of"]) == {"a1"}
    assert "_rank" not in kept.columns and "_rank" not in dropped.columns


def test_deduplicate_test_copy_wins():
    rows = [("train_copy", "cat", "train", "h1"), ("test_copy", "cat", "test", "h1"), ("x", "dog", "test", "h2")]
    kept, dropped = deduplicate(frame(rows))
    assert kept["path"].tolist() == ["test_copy", "x"]
    assert kept.loc[kept["path"] == "test_copy", "split"].item() == "test"
    assert dropped["path"].tolist() == ["train_copy"]
    assert dropped["duplicate_of"].tolist() == ["test_copy"]


def test_deduplicate_conflicting_labels_drops_all_copies():
    rows = [("c", "cat", "", "h1"), ("d", "dog", "", "h1"), ("c2", "cat", "", "h1"), ("e", "dog", "", "h2")]
    kept, dropped = deduplicate(frame(rows))
    assert kept["path"].tolist() == ["e"]
    assert sorted(dropped["path"]) == ["c", "c2", "d"]
    assert set(dropped["reason"]) == {"conflicting labels for identical images"}
    assert set(dropped["duplicate_of"]) == {""}


def test_deduplicate_without_duplicates_is_identity():
    rows = [("a", "cat", "", "h1"), ("b", "dog", "", "h2")]
    original = frame(rows)
    kept, dropped = deduplicate(original)
    pd.testing.assert_frame_equal(kept, original)
    assert dropped.empty


# --------------------------------------------------------------------------- assign_splits


def pool(counts: dict[str, int], split: str = "") -> pd.DataFrame:
    rows = [(f"{label}_{i}", label, split, f"{label}{i}") for label, n in counts.items() for i in range(n)]
    return frame(rows)


def test_assign_splits_is_stratified_and_complete():
    data = pool({"a": 40, "b": 20, "c": 20})
    out = assign_splits(data, val_fraction=0.25, test_fraction=0.25, seed=1)
    assert set(out["split"]) == {"train", "val", "test"}
    assert len(out) == len(data)
    table = out.groupby(["label", "split"]).size().unstack()
    # 25% of each class is test (10/5/5); then 25% of each class's remaining 30/15/15, rounded, is val.
    assert table["test"].to_dict() == {"a": 10, "b": 5, "c": 5}
    assert table["val"].to_dict() == {"a": 8, "b": 4, "c": 4}
    # Every row is in exactly one split and the input is not modified.
    assert (data["split"] == "").all()
    assert out["path"].is_unique


def test_assign_splits_is_seeded():
    data = pool({"a": 30, "b": 30})
    first = assign_splits(data, 0.2, 0.2, seed=5)
    again = assign_splits(data, 0.2, 0.2, seed=5)
    other = assign_splits(data, 0.2, 0.2, seed=6)
    pd.testing.assert_frame_equal(first, again)
    assert not first["split"].equals(other["split"])


def test_assign_splits_keeps_existing_test_rows():
    train = pool({"a": 10, "b": 10}, split="train")
    test = pool({"a": 3, "b": 3}, split="test")
    test["path"] = "t_" + test["path"]
    data = pd.concat([train, test], ignore_index=True)
    out = assign_splits(data, val_fraction=0.2, test_fraction=0.5, seed=0)
    assert sorted(out.loc[out["split"] == "test", "path"]) == sorted(test["path"])  # no new test rows
    assert (out.loc[out["path"].isin(train["path"]), "split"] != "test").all()
    assert (out["split"] == "val").sum() == 4


def test_assign_splits_names_too_small_class():
    data = pool({"big": 20, "tiny": 1})
    with pytest.raises(DataError, match=r"'tiny' \(1\)"):
        assign_splits(data, 0.2, 0.2, seed=0, min_images_per_class=2)


def test_assign_splits_names_class_too_small_to_stratify():
    data = pool({"big": 30, "lonely": 1})
    with pytest.raises(DataError, match="class 'lonely' has 1 image"):
        assign_splits(data, 0.2, 0.2, seed=0, min_images_per_class=1)


@pytest.mark.parametrize("small", [2, 3])
def test_assign_splits_every_class_in_every_split_or_error(small):
    data = pool({"big": 30, "small": small})
    try:
        out = assign_splits(data, 0.2, 0.2, seed=0, min_images_per_class=2)
    except DataError as err:
        assert "'small'" in str(err)
        return
    per_split = out.groupby("split")["label"].agg(set)
    assert all(labels == {"big", "small"} for labels in per_split), per_split.to_dict()


def test_assign_splits_keeps_a_sources_own_val_split():
    rows = [(f"{c}{i}", c, "val" if i < 2 else "", f"{c}{i}") for c in "ab" for i in range(10)]
    out = assign_splits(frame(rows), val_fraction=0.3, test_fraction=0.2, seed=0)
    assert sorted(out.loc[out["split"] == "val", "path"]) == ["a0", "a1", "b0", "b1"]  # not re-drawn
    assert set(out["split"]) == {"train", "val", "test"}


def strata(rows, task: str, min_images_per_class: int):
    """The split strata the task gives the rows (the preprocess stage asks the task)."""
    return get_task(task).strata(rows["label"], min_images_per_class)


def test_multilabel_strata_use_the_rarest_label_and_name_too_rare_labels():
    cells = ["a|b", "a", "a|c", "b", "a|b|c", "c", ""] * 3
    rows = frame([(f"r{i}", cell, "", f"h{i}") for i, cell in enumerate(cells)])
    out = strata(rows, "multilabel", min_images_per_class=2)
    # label frequencies: a 12, b 9, c 9 -> each row's rarest label (ties by name)
    assert out.tolist()[:7] == ["b", "a", "c", "b", "b", "c", "(no label)"]
    with pytest.raises(DataError, match=r"min_images_per_class=10 images: 'b' \(9\), 'c' \(9\)"):
        strata(rows, "multilabel", min_images_per_class=10)
    # a stratum too small to split (here: the one image whose rarest label is "a") joins the largest
    lone = strata(frame([*[(f"x{i}", "b|c", "", f"x{i}") for i in range(4)], ("y", "a|b", "", "y")]), "multilabel", 1)
    assert lone.tolist() == ["c"] * 5  # rarest of b|c is c (4 vs 5); the lone "a" row joins "c"
    assert strata(rows, "multiclass", 2).equals(rows["label"])


# --------------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    write_split(tmp_path, "val", images, np.array([2, 0, 1, 2]))
    write_labels(tmp_path, get_task("multiclass")(["x", "y", "z"]))
    arrays = read_split(tmp_path, "val")
    assert isinstance(arrays.images, np.memmap)
    np.testing.assert_array_equal(arrays.images, images)
    assert arrays.labels.dtype == np.int64 and arrays.labels.tolist() == [2, 0, 1, 2]
    assert len(arrays) == 4
    assert not isinstance(read_split(tmp_path, "val", mmap=False).images, np.memmap)
    assert read_labels(tmp_path) == get_task("multiclass")(["x", "y", "z"])
    with pytest.raises(StageOrderError, match=r"train_images\.npy not found: run the preprocess stage first"):
        read_split(tmp_path, "train")


# --------------------------------------------------------------------------- ingest + preprocess stages


def test_ingest_summary(staged):
    summary = staged["summary"]
    assert summary["images"] == 38
    assert summary["per_class"] == {"circle": 13, "square": 13, "triangle": 12}
    assert summary["per_split"] == {"unassigned": 38}
    assert json.loads((staged["raw"] / "ingest.json").read_text()) == summary
    assert sorted(p.name for p in staged["raw"].iterdir()) == ["images.zip", "ingest.json", "manifest.csv"]
    with zipfile.ZipFile(staged["raw"] / "images.zip") as zf:
        assert len(zf.namelist()) == 38
        manifest = read_manifest(staged["raw"])
        assert all(sha256_bytes(zf.read(row.path)) == row.sha256 for row in manifest.itertuples())


def test_preprocess_quarantines_the_truncated_file(staged):
    quarantine = pd.read_csv(staged["processed"] / "quarantine.csv")
    assert quarantine["source_id"].tolist() == ["circle/zz_truncated.png"]
    assert quarantine["labels"].tolist() == ["circle"]
    assert "cannot decode" in quarantine["reason"].item()
    assert staged["report"]["quarantined"] == 1


def test_preprocess_lists_the_duplicate(staged):
    duplicates = pd.read_csv(staged["processed"] / "duplicates.csv", keep_default_na=False)
    manifest = pd.read_csv(staged["raw"] / "manifest.csv", keep_default_na=False)
    assert len(duplicates) == 1
    row = duplicates.iloc[0]
    assert row["reason"] == "duplicate"
    pair = {"square/square_002.png", "square/zz_duplicate.png"}
    assert row["source_id"] in pair
    other = manifest.loc[manifest["path"] == row["duplicate_of"], "source_id"].item()
    assert {row["source_id"], other} == pair
    assert staged["report"]["duplicates_dropped"] == 1
    assert staged["report"]["conflicting_dropped"] == 0


def test_preprocess_arrays_match_report(staged):
    report, processed = staged["report"], staged["processed"]
    assert json.loads((processed / "report.json").read_text()) == report
    assert report["images_in"] == 38
    assert report["images_out"] == 38 - 1 - 1
    assert report["classes"] == ["circle", "square", "triangle"] == read_labels(processed).classes
    assert report["image_shape"] == [32, 32, 3]
    total = 0
    for split in ("train", "val", "test"):
        arrays = read_split(processed, split)
        n = report["per_split"][split]
        assert n > 0
        assert arrays.images.shape == (n, 32, 32, 3)
        assert arrays.images.dtype == np.uint8
        assert arrays.labels.shape == (n,)
        per_class = dict(zip(*np.unique(arrays.labels, return_counts=True), strict=True))
        expected = {report["classes"].index(c): k for c, k in report["per_split_per_class"][split].items()}
        assert {int(k): int(v) for k, v in per_class.items()} == expected
        total += n
    assert total == report["images_out"]


def test_preprocess_pixels_and_labels_line_up_with_splits_csv(staged):
    processed, raw = staged["processed"], staged["raw"]
    splits = pd.read_csv(processed / "splits.csv", keep_default_na=False)
    classes = read_labels(processed).classes
    spec = ImageSpec(32, 3, "squash")
    with RawImages(raw) as images:
        for split in ("train", "test"):
            part = splits[splits["split"] == split]
            arrays = read_split(processed, split)
            for i, row in enumerate(part.itertuples()):
                assert classes[arrays.labels[i]] == row.labels
                np.testing.assert_array_equal(arrays.images[i], decode(images.read(row.path), spec))


def test_preprocess_is_deterministic(staged, tmp_path):
    again = tmp_path / "again"
    preprocess.run(staged["cfg"], raw_dir=staged["raw"], out_dir=again)
    assert (again / "splits.csv").read_text() == (staged["processed"] / "splits.csv").read_text()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(read_split(again, split).images, read_split(staged["processed"], split).images)


def test_failed_ingest_keeps_previous_raw_data(staged):
    raw = staged["raw"]
    before = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    shutil.rmtree(staged["source"])
    with pytest.raises(DataError, match="does not exist"):
        ingest.run(staged["cfg"], out_dir=raw)
    after = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["health", "processed", "raw"]  # no temp folders left


def test_preprocess_fails_on_a_class_that_is_too_small(tmp_path):
    source = make_image_folder(tmp_path / "src", per_class=6, classes=("a", "b"))
    for extra in sorted((source / "b").iterdir())[1:]:
        extra.unlink()
    cfg = compose(tiny_overrides(source), conf_dir=REPO / "conf")
    raw, processed = tmp_path / "raw", tmp_path / "processed"
    ingest.run(cfg, out_dir=raw)
    with pytest.raises(DataError, match=r"'b' \(1\)"):
        preprocess.run(cfg, raw_dir=raw, out_dir=processed)
    assert not processed.exists()


# --------------------------------------------------------------------------- data/raw/images.zip


def test_images_zip_is_stored_sorted_and_named_by_the_manifest(staged):
    manifest = read_manifest(staged["raw"])
    with zipfile.ZipFile(staged["raw"] / "images.zip") as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == sorted(manifest["path"])
        assert all(i.filename.startswith("images/") for i in infos)
        assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert zf.testzip() is None
        source = staged["source"]
        row = manifest[manifest["source_id"] == "circle/circle_001.png"].iloc[0]
        assert zf.read(row["path"]) == (source / "circle" / "circle_001.png").read_bytes()


def test_ingesting_the_same_source_twice_gives_a_byte_identical_zip(staged, tmp_path):
    again = tmp_path / "again"
    ingest.run(staged["cfg"], out_dir=again)
    assert (again / "images.zip").read_bytes() == (staged["raw"] / "images.zip").read_bytes()
    assert (again / "manifest.csv").read_bytes() == (staged["raw"] / "manifest.csv").read_bytes()


def test_pack_images_does_not_depend_on_order_or_file_times(tmp_path):
    for name, order, mtime in (
        ("a", ["images/x.png", "images/y/z.png"], 1e9),
        ("b", ["images/y/z.png", "images/x.png"], 2e9),
    ):
        folder = tmp_path / name
        for rel, data in (("images/x.png", b"x" * 10), ("images/y/z.png", b"z" * 20)):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            os.utime(folder / rel, (mtime, mtime))
        pack_images(folder, order)
    assert (tmp_path / "a" / "images.zip").read_bytes() == (tmp_path / "b" / "images.zip").read_bytes()


def test_pack_images_reads_ahead_in_threads_but_packs_and_hashes_in_order(tmp_path):
    """Many more files than are read ahead: every member holds its own file's bytes, under its
    name, in path order, with its own SHA-256; a file that cannot be read fails the packing."""
    files = {f"images/{i:03d}.bin": os.urandom(int(n)) for i, n in enumerate(np.linspace(1, 50_000, 60))}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    hashes = pack_images(tmp_path, reversed(list(files)))
    assert hashes == {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    with zipfile.ZipFile(tmp_path / "images.zip") as zf:
        assert zf.namelist() == sorted(files)
        assert all(zf.read(rel) == data for rel, data in files.items())
    (tmp_path / "images/030.bin").unlink()
    (tmp_path / "images/030.bin").symlink_to(tmp_path / "gone.bin")
    with pytest.raises(FileNotFoundError, match=r"030\.bin"):
        pack_images(tmp_path, list(files))


def test_preprocess_reads_an_old_raw_folder_of_loose_files(staged, tmp_path):
    old = tmp_path / "old-raw"
    shutil.copytree(staged["raw"], old)
    with zipfile.ZipFile(old / "images.zip") as zf:
        zf.extractall(old)
    (old / "images.zip").unlink()
    with RawImages(old) as loose, RawImages(staged["raw"]) as packed:
        assert not loose.packed and packed.packed
    out = tmp_path / "from-loose"
    report = preprocess.run(staged["cfg"], raw_dir=old, out_dir=out)
    assert report == staged["report"]
    assert (out / "splits.csv").read_text() == (staged["processed"] / "splits.csv").read_text()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(read_split(out, split).images, read_split(staged["processed"], split).images)


def test_a_missing_zip_member_is_named(staged, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(staged["raw"], raw)
    manifest = read_manifest(raw)
    gone = manifest[manifest["source_id"] == "triangle/triangle_003.png"]["path"].item()
    with zipfile.ZipFile(staged["raw"] / "images.zip") as src, zipfile.ZipFile(raw / "images.zip", "w") as dst:
        for info in src.infolist():
            if info.filename != gone:
                dst.writestr(info, src.read(info))
    with RawImages(raw) as images, pytest.raises(FileNotFoundError, match=rf"{re.escape(gone)}: not in .*images\.zip"):
        images.read(gone)
    report = preprocess.run(staged["cfg"], raw_dir=raw, out_dir=tmp_path / "processed")
    quarantine = pd.read_csv(tmp_path / "processed" / "quarantine.csv")
    assert report["quarantined"] == 2
    reason = quarantine.set_index("path").loc[gone, "reason"]
    assert reason.startswith(f"{gone}: not in ") and "run the ingest stage again" in reason


def test_a_raw_folder_without_images_or_with_a_broken_zip_is_an_error(staged, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(staged["raw"], raw)
    (raw / "images.zip").unlink()
    with pytest.raises(StageOrderError, match=r"neither images\.zip nor images/ found"):
        preprocess.run(staged["cfg"], raw_dir=raw, out_dir=tmp_path / "processed")
    (raw / "images.zip").write_bytes(b"not a zip")
    with pytest.raises(StageOrderError, match=r"images\.zip: .*run the ingest stage again"):
        preprocess.run(staged["cfg"], raw_dir=raw, out_dir=tmp_path / "processed")
    assert not (tmp_path / "processed").exists()


# --------------------------------------------------------------------------- your own images: bad input


def test_class_names_that_differ_only_by_case_or_spaces_are_refused(tmp_path):
    source = make_image_folder(tmp_path / "src", per_class=4, classes=("circle", "square"))
    shutil.copytree(source / "circle", source / "Circle")
    cfg = compose(tiny_overrides(source), conf_dir=REPO / "conf")
    ingest.run(cfg, out_dir=tmp_path / "raw")
    with pytest.raises(DataError, match=r"differ only by case or spaces: 'Circle' / 'circle'; rename them"):
        preprocess.run(cfg, raw_dir=tmp_path / "raw", out_dir=tmp_path / "processed")
    assert not (tmp_path / "processed").exists()


def test_a_mixed_folder_gets_settings_from_its_images_and_a_health_report(tmp_path):
    """Gray, RGBA, CMYK and 16-bit files, 10x10 to 600x400 px, in one folder: nothing is lost,
    every `auto` is chosen from the training images, and the page says what it saw."""
    from PIL import Image

    rng = np.random.default_rng(0)
    source = tmp_path / "mixed"
    sizes = [(10, 10), (600, 400), (64, 48), (80, 60), (64, 48), (72, 54)]
    modes = ["L", "RGBA", "CMYK", "I;16", "RGB", "P"]
    for label, tint in (("red", 0), ("blue", 2)):
        (source / label).mkdir(parents=True)
        for i in range(12):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
            arr[..., tint] += 180
            img = Image.fromarray(arr)
            mode = modes[i % len(modes)]
            if mode == "I;16":
                img = Image.fromarray(arr[..., tint].astype(np.uint16) * 200)
            elif mode == "P":
                img = img.quantize(16)
            else:
                img = img.convert(mode)
            img.save(source / label / f"{label}_{i:02d}.{'jpg' if mode == 'CMYK' else 'png'}")
    hand_set = ("preprocess.image_size", "preprocess.channels", "preprocess.mean", "preprocess.std")
    overrides = [o for o in tiny_overrides(source) if not o.startswith(hand_set)]
    cfg = compose(overrides, conf_dir=REPO / "conf")
    ingest.run(cfg, out_dir=tmp_path / "raw")
    report = preprocess.run(cfg, raw_dir=tmp_path / "raw", out_dir=tmp_path / "processed")
    assert report["images_out"] == 24 and report["quarantined"] == 0  # nothing lost
    settings = report["settings"]
    assert settings["preprocess"]["channels"] == 3  # colour images among gray ones
    assert settings["preprocess"]["resize_mode"] == "center_crop"  # mostly 4:3
    assert settings["preprocess"]["image_size"] == 56  # median short side 48-54 px, raised to the model's minimum
    assert len(settings["preprocess"]["mean"]) == 3 and set(settings["auto"]) >= {"preprocess.mean"}
    assert read_split(tmp_path / "processed", "train").images.shape[1:] == (56, 56, 3)
    page = (tmp_path / "health" / "health.md").read_text()
    assert "| CMYK" in page and "| I;16" in page
    assert "4 tiny images (much smaller than the rest)" in report["health"]["warnings"]  # the 10x10 ones


def test_quarantine_log_names_the_users_file_and_a_worded_reason(caplog, staged):
    lines = [r.getMessage() for r in caplog.get_records("setup") if r.getMessage().startswith("quarantined ")]
    assert len(lines) == 1, lines
    assert lines[0].startswith("quarantined ") and "circle/zz_truncated.png: " in lines[0], lines[0]
    assert "images/" not in lines[0] and "BytesIO" not in lines[0], lines[0]


def test_locate_finds_the_split_and_row_of_only_the_images_asked_for():
    paths = pd.Series(["t0", "t1", "t2", "v0", "s0", "s1"], dtype="string[pyarrow]")
    slices = {"train": slice(0, 3), "val": slice(3, 4), "test": slice(4, 6)}
    found = preprocess.locate(paths, slices, ["s1", "t2", "gone", "s1", "v0"])
    assert found == {"s1": ("test", 1), "t2": ("train", 2), "v0": ("val", 0)}
    assert preprocess.locate(paths, slices, []) == {}


@pytest.mark.parametrize(("setting", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_importing_the_package_puts_arrow_on_the_system_allocator(setting, expected):
    """Arrow's compute kernels (hashing a text column: ``isin``, ``factorize``) allocate from
    Arrow's default pool, which only the environment chooses, before Arrow loads: importing
    the package sets it to the system allocator (whose freed memory ``malloc_trim`` returns)
    unless the user chose one."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if setting is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = setting
    code = (
        "import taxonomist, pandas as pd, pyarrow as pa; "
        "s = pd.Series([f'images/{i:06d}.jpg' for i in range(20000)]); s.isin(['images/000001.jpg']); "
        "print(pa.default_memory_pool().backend_name)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected]


def test_order_by_split_moves_every_column_into_split_file_order():
    """Train first in a seeded shuffle, then val and test in frame order; every column (text,
    masked numbers, plain numbers) and the index follow their rows, and the input is emptied."""
    n = 40
    split = np.array(["train", "val", "test", "train"] * (n // 4))
    frame = pd.DataFrame(
        {
            "path": pd.array([f"images/{k}.png" for k in range(n)], dtype="str"),
            "split": pd.array(split, dtype="str"),
            "width": pd.array([k if k % 7 else None for k in range(n)], dtype="Int64"),
            "span_offset": np.arange(n, dtype=np.int64) * 10,
        },
        index=pd.Index(np.arange(n) + 100),
    )
    expected = frame.copy()
    ordered, slices = preprocess.order_by_split(frame, seed=3)
    assert frame.columns.empty
    assert [slices[name].stop - slices[name].start for name in ("train", "val", "test")] == [20, 10, 10]
    train = ordered.iloc[slices["train"]]
    assert set(train.index) == set(expected.index[split == "train"])
    assert list(train.index) != sorted(train.index)  # shuffled ...
    again, _ = preprocess.order_by_split(expected.copy(), seed=3)
    assert list(again.index) == list(ordered.index)  # ... by the seed
    assert list(ordered.iloc[slices["val"]].index) == list(expected.index[split == "val"])
    pd.testing.assert_frame_equal(ordered, expected.loc[ordered.index])


def test_the_health_grid_shows_the_written_pixels_of_each_pair(tmp_path):
    """The stage hands the report the decoded rows of exactly the images its grid shows."""
    from PIL import Image

    from taxonomist.data import health

    source = make_image_folder(tmp_path / "images", per_class=12)
    for label in ("circle", "square"):
        for original in sorted((source / label).glob("*.png"))[:3]:  # near duplicates: the same picture re-encoded
            Image.open(original).convert("RGB").save(original.with_name(f"again_{original.stem}.jpg"), quality=95)
    cfg = compose(tiny_overrides(source), conf_dir=Path(__file__).resolve().parents[1] / "conf")
    ingest.run(cfg, out_dir=tmp_path / "raw")
    asked: list[tuple[str, tuple[int, ...] | None]] = []
    real_write = health.Health.write

    def write(self, out_dir, thumbnail=None):
        def recorded(path):
            pixels = thumbnail(path)
            asked.append((path, None if pixels is None else pixels.shape))
            return pixels

        return real_write(self, out_dir, recorded)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(health.Health, "write", write)
        preprocess.run(cfg, raw_dir=tmp_path / "raw", out_dir=tmp_path / "processed")
    pairs = pd.read_csv(tmp_path / "health" / "near_duplicates.csv", keep_default_na=False)
    assert len(pairs)
    assert {path for path, _ in asked} == {*pairs["path_a"].head(8), *pairs["path_b"].head(8)}
    assert all(shape is not None for _, shape in asked)
