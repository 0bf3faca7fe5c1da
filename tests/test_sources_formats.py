"""The path sources beyond a flat folder: nested-folder hierarchies, CSV/Parquet manifests, zip/tar
archives (and their unsafe members) and Label Studio exports. All data is built here, tiny."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_image_folder
from PIL import Image
from test_sources import source_cfg

from taxonomist.data.manifest import Record
from taxonomist.data.sources import archive, materialise
from taxonomist.errors import ConfigError, DataError
from taxonomist.files import sha256_file
from taxonomist.stages import ingest


def write_png(path: Path, shade: int = 0) -> Path:
    """A 4x4 PNG whose content depends on ``shade``, so different shades hash differently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade % 256, (3 * shade) % 256, 90)).save(path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def by_source(records: list[Record]) -> dict[str, Record]:
    return {r.source_id: r for r in records}


def assert_copied(record: Record, out: Path, original: Path) -> None:
    """The staged image has the original's bytes (ingest hashes it when it packs it)."""
    assert (out / record.path).read_bytes() == original.read_bytes()
    assert record.sha256 == ""
    assert sha256_file(out / record.path) == sha256_file(original)
    assert record.path.startswith("images/") and Path(record.path).suffix == original.suffix.lower()


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- nested folders


@pytest.fixture
def nested_tree(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    for i in range(2):
        write_png(root / "Apparel" / "Footwear" / "Sneaker" / f"s{i}.png", i)
        write_png(root / "Apparel" / "Footwear" / "Sandal" / f"d{i}.PNG", 10 + i)
        write_png(root / "Bags" / f"b{i}.jpg", 20 + i)
    write_png(root / "Apparel" / "loose.png", 30)  # directly in a first-level folder
    write_png(root / "Apparel" / ".thumbs" / "hidden.png", 31)  # hidden: skipped
    write_png(root / "top-level.png", 32)  # directly in root: no label, skipped
    return root


def test_nested_folders_are_the_hierarchy(nested_tree, tmp_path):
    out = tmp_path / "raw"
    records = materialise(source_cfg(nested_tree, task="hierarchical"), out)
    assert Counter(r.labels for r in records) == {
        ("Apparel/Footwear/Sneaker",): 2,
        ("Apparel/Footwear/Sandal",): 2,
        ("Bags",): 2,
        ("Apparel",): 1,
    }
    got = by_source(records)
    assert got["Apparel/loose.png"].labels == ("Apparel",)
    assert got["Apparel/Footwear/Sandal/d1.PNG"].labels == ("Apparel/Footwear/Sandal",)
    for source_id, record in got.items():
        assert_copied(record, out, nested_tree / source_id)


def test_nested_folders_for_flat_tasks_use_the_first_level(nested_tree, tmp_path):
    records = materialise(source_cfg(nested_tree, task="multiclass"), tmp_path / "raw")
    assert Counter(r.labels for r in records) == {("Apparel",): 5, ("Bags",): 2}


def test_folder_name_with_label_separator_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=1, classes=("cat|dog", "bird"))
    with pytest.raises(DataError, match=r"folder .*cat\|dog: label 'cat\|dog' contains '\|'"):
        materialise(source_cfg(root), tmp_path / "raw")


# --------------------------------------------------------------------------- manifests


def test_csv_manifest_with_relative_and_absolute_paths(tmp_path):
    folder = tmp_path / "set"
    cat = write_png(folder / "imgs" / "cat.PNG", 1)
    dog = write_png(tmp_path / "elsewhere" / "dog.jpg", 2)
    manifest = write_csv(
        folder / "labels.csv",
        [{"path": "imgs/cat.PNG", "label": "cat"}, {"path": str(dog), "label": "dog"}],
    )
    out = tmp_path / "raw"
    records = materialise(source_cfg(manifest), out)
    got = by_source(records)
    assert list(got) == ["labels.csv row 1", "labels.csv row 2"]
    assert got["labels.csv row 1"].labels == ("cat",)
    assert got["labels.csv row 2"].labels == ("dog",)
    assert {r.split for r in records} == {""}
    assert_copied(got["labels.csv row 1"], out, cat)
    assert_copied(got["labels.csv row 2"], out, dog)


def test_csv_manifest_image_root_and_image_column(tmp_path):
    images = tmp_path / "images"
    write_png(images / "a" / "1.png", 1)
    write_png(images / "b" / "2.png", 2)
    manifest = write_csv(
        tmp_path / "meta" / "m.csv",
        [{"image": "a/1.png", "label": "Apparel/Tops"}, {"image": "b/2.png", "label": "Bags"}],
    )
    records = materialise(source_cfg(manifest, task="hierarchical", image_root=images), tmp_path / "raw")
    assert [r.labels for r in records] == [("Apparel/Tops",), ("Bags",)]
    # Without image_root the paths are looked up beside the manifest, and the error names the row.
    with pytest.raises(DataError, match=rf"m\.csv row 1: image file 'a/1\.png' not found \(looked in {tmp_path}"):
        materialise(source_cfg(manifest), tmp_path / "raw2")


def test_split_column_and_its_aliases(tmp_path):
    splits = ["train", "Training", "val", "valid", "Validation", "test", ""]
    rows = [{"path": write_png(tmp_path / f"{i}.png", i).name, "label": "x", "split": s} for i, s in enumerate(splits)]
    records = materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")
    assert [r.split for r in records] == ["train", "train", "val", "val", "val", "test", ""]


def test_bad_split_value_names_the_row(tmp_path):
    rows = [
        {"path": write_png(tmp_path / f"{i}.png", i).name, "label": "x", "split": s}
        for i, s in enumerate(["train", "holdout"])
    ]
    with pytest.raises(DataError, match=r"m\.csv row 2: split 'holdout' is not train, val, test or empty"):
        materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")


def test_csv_labels_column_json_and_pipe_lists(tmp_path):
    cells = ['["cat", "dog"]', "cat|dog", "dog", "", "[]", " bird | cat "]
    rows = [{"path": write_png(tmp_path / f"{i}.png", i).name, "labels": c} for i, c in enumerate(cells)]
    records = materialise(source_cfg(write_csv(tmp_path / "m.csv", rows), task="multilabel"), tmp_path / "raw")
    assert [r.labels for r in records] == [("cat", "dog"), ("cat", "dog"), ("dog",), (), (), ("bird", "cat")]


def test_parquet_manifest_with_list_labels(tmp_path):
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", i)
    frame = pd.DataFrame(
        {
            "path": [f"img/{i}.png" for i in range(3)],
            "labels": [["sky", "sea"], ["sea"], []],
            "split": ["train", None, "test"],
        }
    )
    manifest = tmp_path / "m.parquet"
    frame.to_parquet(manifest)
    records = materialise(source_cfg(manifest, task="multilabel"), tmp_path / "raw")
    assert [(r.labels, r.split, r.source_id) for r in records] == [
        (("sky", "sea"), "train", "m.parquet row 1"),
        (("sea",), "", "m.parquet row 2"),
        ((), "test", "m.parquet row 3"),
    ]


def test_label_and_labels_columns_both_filled_mix(tmp_path):
    rows = [{"path": write_png(tmp_path / "0.png").name, "label": "cat", "labels": ""}]
    rows.append({"path": "0.png", "label": "", "labels": "cat|dog"})
    with pytest.raises(DataError, match=r"m\.csv: both a 'label' and a 'labels' column .* mixes single and multi"):
        materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")


def test_an_empty_labels_column_beside_label_is_ignored(tmp_path):
    rows = [{"path": write_png(tmp_path / "0.png").name, "label": "cat", "labels": ""}]
    records = materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")
    assert [r.labels for r in records] == [("cat",)]


@pytest.mark.parametrize("cell", ["cat|dog", '["cat", "dog"]'])
def test_label_cell_holding_a_list_mixes(tmp_path, cell):
    write_png(tmp_path / "0.png")
    rows = [{"path": "0.png", "label": "cat"}, {"path": "0.png", "label": cell}]
    with pytest.raises(DataError, match=r"m\.csv row 2: label cell .* mixes single and multi labels"):
        materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")


def test_empty_label_cell_names_the_row(tmp_path):
    write_png(tmp_path / "0.png")
    rows = [{"path": "0.png", "label": "cat"}, {"path": "0.png", "label": "dog"}, {"path": "0.png", "label": ""}]
    with pytest.raises(DataError, match=r"m\.csv row 3: empty label"):
        materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")


def test_label_with_separator_in_a_labels_list_is_refused(tmp_path):
    rows = [{"path": write_png(tmp_path / "0.png").name, "labels": '["a|b", "c"]'}]
    with pytest.raises(DataError, match=r"m\.csv row 1: label 'a\|b' contains '\|'"):
        materialise(source_cfg(write_csv(tmp_path / "m.csv", rows), task="multilabel"), tmp_path / "raw")


def test_missing_files_are_reported_together(tmp_path):
    write_png(tmp_path / "ok.png")
    rows = [{"path": "ok.png", "label": "a"}] + [{"path": f"imgs/gone_{i}.png", "label": "b"} for i in range(25)]
    out = tmp_path / "raw"
    with pytest.raises(DataError) as info:
        materialise(source_cfg(write_csv(tmp_path / "labels.csv", rows)), out)
    message = str(info.value)
    assert message.startswith("25 row(s) of labels.csv name images that cannot be used")
    expected = (
        f"labels.csv row 2: image file 'imgs/gone_0.png' not found (looked in {tmp_path / 'imgs' / 'gone_0.png'})"
    )
    assert expected in message
    assert "labels.csv row 21:" in message and "labels.csv row 22:" not in message  # the first twenty
    assert "... and 5 more" in message
    assert not out.exists()  # nothing copied


def test_a_manifest_with_several_kinds_of_problems_reports_them_all_at_once(tmp_path):
    write_png(tmp_path / "ok.png")
    rows = [
        {"path": "ok.png", "label": "a", "split": "train"},
        {"path": "gone.png", "label": "b", "split": ""},
        {"path": "ok.png", "label": "c", "split": "holdout"},
        {"path": "ok.png", "label": "", "split": "test"},
    ]
    with pytest.raises(DataError) as info:
        materialise(source_cfg(write_csv(tmp_path / "m.csv", rows)), tmp_path / "raw")
    message = str(info.value)
    assert message.startswith("3 problems found:\n")
    assert "m.csv row 2: image file 'gone.png' not found" in message
    assert "m.csv row 3: split 'holdout' is not train, val, test or empty" in message
    assert "m.csv row 4: empty label" in message
    assert not (tmp_path / "raw").exists()


def test_manifest_without_a_path_column_lists_the_columns(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [{"file": "x.png", "label": "a"}])
    with pytest.raises(DataError, match=r"m\.csv: no 'path' or 'image' column \(found: file, label\)"):
        materialise(source_cfg(manifest), tmp_path / "raw")


# --------------------------------------------------------------------------- archives


def zip_folder(folder: Path, target: Path, prefix: str = "") -> Path:
    """Zip every file below ``folder`` as ``<prefix><relative path>``."""
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return target


def test_zip_of_a_folder_tree(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=2, classes=("circle", "square"))
    target = zip_folder(root, tmp_path / "shapes.zip", prefix="shapes/")  # one top folder: descended into
    with zipfile.ZipFile(target, "a") as zf:
        zf.writestr("__MACOSX/shapes/._circle_000.png", b"resource fork")
    out = tmp_path / "raw"
    records = materialise(source_cfg(target), out)
    got = by_source(records)
    assert sorted(got) == sorted(f"shapes.zip:{p.relative_to(root).as_posix()}" for p in root.rglob("*.*"))
    assert Counter(r.labels for r in records) == {("circle",): 2, ("square",): 2}
    for source_id, record in got.items():
        assert_copied(record, out, root / source_id.removeprefix("shapes.zip:"))
    assert snapshot(out) == ["images", *sorted(r.path for r in records)]  # the temporary extraction is gone


def test_tar_gz_of_a_manifest_with_images(tmp_path):
    content = tmp_path / "content"
    cat, dog = write_png(content / "imgs" / "cat.png", 1), write_png(content / "imgs" / "dog.png", 2)
    write_csv(
        content / "labels.csv",
        [{"path": "imgs/cat.png", "label": "cat", "split": "val"}, {"path": "imgs/dog.png", "label": "dog"}],
    )
    target = tmp_path / "data.tar.gz"
    with tarfile.open(target, "w:gz") as tf:
        tf.add(content, arcname="data")
    out = tmp_path / "raw"
    records = materialise(source_cfg(target), out)
    got = by_source(records)
    assert [(sid, r.labels, r.split) for sid, r in got.items()] == [
        ("data.tar.gz:labels.csv row 1", ("cat",), "val"),
        ("data.tar.gz:labels.csv row 2", ("dog",), ""),
    ]
    assert_copied(got["data.tar.gz:labels.csv row 1"], out, cat)
    assert_copied(got["data.tar.gz:labels.csv row 2"], out, dog)


def test_archive_manifest_cannot_reach_outside_the_archive(tmp_path):
    secret = write_png(tmp_path / "secret.png")
    content = tmp_path / "content"
    write_png(content / "a.png")
    write_csv(content / "m.csv", [{"path": "a.png", "label": "a"}, {"path": str(secret), "label": "b"}])
    target = zip_folder(content, tmp_path / "data.zip")
    with pytest.raises(
        DataError, match=rf"m\.csv row 2: image file '{re.escape(str(secret))}' lies outside the archive"
    ):
        materialise(source_cfg(target), tmp_path / "raw")


def test_archive_with_two_manifests_is_ambiguous(tmp_path):
    content = tmp_path / "content"
    write_png(content / "a.png")
    write_csv(content / "a.csv", [{"path": "a.png", "label": "a"}])
    write_csv(content / "b.csv", [{"path": "a.png", "label": "a"}])
    with pytest.raises(
        DataError, match=r"data\.zip: cannot tell which file is the manifest or export \(a\.csv, b\.csv\)"
    ):
        materialise(source_cfg(zip_folder(content, tmp_path / "data.zip")), tmp_path / "raw")


def unsafe_zip(target: Path, name: str, symlink: bool = False) -> None:
    with zipfile.ZipFile(target, "w") as zf:
        zf.writestr("shapes/circle/ok.png", b"fine")
        info = zipfile.ZipInfo(name)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, b"/etc/passwd" if symlink else b"evil")


def unsafe_tar(target: Path, name: str, kind: bytes = tarfile.REGTYPE) -> None:
    with tarfile.open(target, "w:gz") as tf:
        ok = tarfile.TarInfo("shapes/circle/ok.png")
        ok.size = 4
        tf.addfile(ok, io.BytesIO(b"fine"))
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.REGTYPE:
            info.size = 4
            tf.addfile(info, io.BytesIO(b"evil"))
        else:
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else "shapes/circle/ok.png"
            tf.addfile(info)


UNSAFE = [
    ("evil.zip", lambda t: unsafe_zip(t, "../evil.png"), "../evil.png", "a '..' path component"),
    ("evil.zip", lambda t: unsafe_zip(t, "/tmp/evil.png"), "/tmp/evil.png", "an absolute path"),
    ("evil.zip", lambda t: unsafe_zip(t, "C:/evil.png"), "C:/evil.png", "a drive letter"),
    ("evil.zip", lambda t: unsafe_zip(t, "shapes/link.png", symlink=True), "shapes/link.png", "a symbolic link"),
    ("evil.tar.gz", lambda t: unsafe_tar(t, "shapes/../../evil.png"), "shapes/../../evil.png", "a '..' path"),
    ("evil.tar.gz", lambda t: unsafe_tar(t, "/tmp/evil.png"), "/tmp/evil.png", "an absolute path"),
    ("evil.tar.gz", lambda t: unsafe_tar(t, "link.png", tarfile.SYMTYPE), "link.png", "a symbolic link"),
    ("evil.tar.gz", lambda t: unsafe_tar(t, "hard.png", tarfile.LNKTYPE), "hard.png", "a hard link"),
    ("evil.tar.gz", lambda t: unsafe_tar(t, "fifo", tarfile.FIFOTYPE), "fifo", "not a regular file or folder"),
]


@pytest.mark.parametrize(("archive_name", "build", "member", "why"), UNSAFE)
def test_unsafe_archive_members_are_refused_before_writing(tmp_path, archive_name, build, member, why):
    work = tmp_path / "work"
    work.mkdir()
    target = work / archive_name
    build(target)
    before = snapshot(tmp_path)
    out = work / "data" / "raw"
    with pytest.raises(DataError, match=rf"refusing the archive; nothing was extracted.*\n  member '{member}': {why}"):
        materialise(source_cfg(target), out)
    assert snapshot(tmp_path) == before  # nothing extracted, not even the output folder
    assert not Path("/tmp/evil.png").exists() or Path("/tmp/evil.png").read_bytes() != b"evil"


def test_every_unsafe_archive_member_is_named_in_one_error(tmp_path):
    target = tmp_path / "evil.zip"
    with zipfile.ZipFile(target, "w") as zf:
        zf.writestr("shapes/circle/ok.png", b"fine")
        for name in ("../up.png", "/abs.png", "C:/drive.png"):
            zf.writestr(name, b"evil")
    with pytest.raises(DataError) as info:
        materialise(source_cfg(target), tmp_path / "raw")
    message = str(info.value)
    assert message.startswith(f"{target}: refusing the archive; nothing was extracted. 3 unsafe member(s):\n")
    for line in (
        "member '../up.png': a '..' path component",
        "member '/abs.png': an absolute path",
        "member 'C:/drive.png': a drive letter",
    ):
        assert f"\n  {line}" in message
    assert not (tmp_path / "raw").exists()


def test_archive_size_cap(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "shapes", per_class=2, classes=("circle", "square"))
    target = zip_folder(root, tmp_path / "shapes.zip")
    monkeypatch.setattr(archive, "MAX_EXTRACTED_BYTES", 100)
    with pytest.raises(DataError, match=r"shapes\.zip: refusing the archive, nothing was extracted: it expands to "):
        materialise(source_cfg(target), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()
    monkeypatch.setattr(archive, "MAX_EXTRACTED_BYTES", 1 << 30)
    monkeypatch.setattr(archive, "MAX_MEMBERS", 3)
    with pytest.raises(DataError, match=r"it has \d+ members, more than the 3 allowed.*set data\.source to the folder"):
        materialise(source_cfg(target), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_compression_bombs_are_refused_before_extraction(tmp_path, monkeypatch, kind):
    """A member of zeros that deflates a thousandfold: refused from the headers, nothing written."""
    monkeypatch.setattr(archive, "RATIO_FLOOR", 1 << 20)
    root = make_image_folder(tmp_path / "shapes", per_class=2, classes=("circle", "square"))
    (root / "circle" / "notes.txt").write_bytes(bytes(8 << 20))  # 8 MiB of zeros
    target = tmp_path / f"shapes.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(root.rglob("*")):
                zf.write(path, path.relative_to(root).as_posix())
    else:
        with tarfile.open(target, "w:gz") as tf:
            tf.add(root, arcname="shapes")
    assert target.stat().st_size < 100_000
    with pytest.raises(DataError, match=r"refusing the archive, nothing was extracted: .*expands [\d,]+ times"):
        materialise(source_cfg(target), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_not_an_archive(tmp_path):
    target = tmp_path / "fake.zip"
    target.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"fake\.zip: not a zip or tar archive"):
        materialise(source_cfg(target), tmp_path / "raw")


# --------------------------------------------------------------------------- Label Studio


def ls_task(task_id: int, image: str, *annotations: dict) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": list(annotations), "predictions": []}


def choices(*names: str, cancelled: bool = False, updated: str = "2024-01-01T00:00:00Z") -> dict:
    result = [{"type": "choices", "from_name": "choice", "to_name": "image", "value": {"choices": list(names)}}]
    return {"result": result, "was_cancelled": cancelled, "created_at": updated, "updated_at": updated}


def taxonomy(*paths: list[str]) -> dict:
    result = [{"type": "taxonomy", "from_name": "tax", "to_name": "image", "value": {"taxonomy": list(paths)}}]
    return {"result": result, "was_cancelled": False}


def write_export(path: Path, items: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(items))
    return path


def test_label_studio_choices_uploads_local_files_and_cancelled(tmp_path, caplog):
    project = tmp_path / "project"
    cat = write_png(project / "media" / "upload" / "3" / "1a2b3c4d-cat.png", 1)
    cat2 = write_png(project / "downloaded" / "cat2.png", 2)  # stored without the upload prefix
    dog = write_png(project / "local" / "dogs" / "dog.png", 3)
    export = write_export(
        project / "export.json",
        [
            ls_task(1, "/data/upload/3/1a2b3c4d-cat.png", choices("Cat")),
            ls_task(2, "/data/upload/3/0f0f0f0f-cat2.png", choices("Cat")),
            ls_task(
                3,
                "/data/local-files/?d=local/dogs/dog.png",
                choices("Dog", updated="2024-01-02T00:00:00Z"),
                choices("Cat", cancelled=True, updated="2024-02-01T00:00:00Z"),  # newer but cancelled
                choices("Bird", updated="2024-01-01T00:00:00Z"),  # older
            ),
            ls_task(4, "/data/upload/3/1a2b3c4d-cat.png"),  # not annotated: skipped
            ls_task(5, "/data/upload/3/1a2b3c4d-cat.png", choices("Cat", cancelled=True)),  # only cancelled
        ],
    )
    out = tmp_path / "raw"
    with caplog.at_level(logging.WARNING):
        records = materialise(source_cfg(export), out)
    got = by_source(records)
    assert {sid: r.labels for sid, r in got.items()} == {
        "export.json task 1": ("Cat",),
        "export.json task 2": ("Cat",),
        "export.json task 3": ("Dog",),
    }
    assert "skipped 2 task(s) without a (non-cancelled) annotation" in caplog.text
    assert_copied(got["export.json task 1"], out, cat)
    assert_copied(got["export.json task 2"], out, cat2)
    assert_copied(got["export.json task 3"], out, dog)


def test_label_studio_multi_choices_and_taxonomy(tmp_path):
    write_png(tmp_path / "a.png", 1)
    write_png(tmp_path / "b.png", 2)
    export = write_export(
        tmp_path / "export.json",
        [
            ls_task(1, "/data/local-files/?d=a.png", choices("sky", "sea", "sky")),
            ls_task(2, "/data/local-files/?d=b.png", taxonomy(["Apparel", "Footwear", "Sneaker"], ["Apparel", "Tops"])),
        ],
    )
    records = materialise(source_cfg(export, task="multilabel"), tmp_path / "raw")
    assert [r.labels for r in records] == [("sky", "sea"), ("Apparel/Footwear/Sneaker", "Apparel/Tops")]


def test_label_studio_local_files_resolve_against_image_root(tmp_path):
    write_png(tmp_path / "store" / "pets" / "cat.png")
    export = write_export(
        tmp_path / "exports" / "export.json", [ls_task(9, "/data/local-files/?d=pets%2Fcat.png", choices("Cat"))]
    )
    records = materialise(source_cfg(export, image_root=tmp_path / "store"), tmp_path / "raw")
    assert [(r.source_id, r.labels) for r in records] == [("export.json task 9", ("Cat",))]


def test_label_studio_missing_image_names_the_task(tmp_path):
    write_png(tmp_path / "a.png")
    export = write_export(
        tmp_path / "export.json",
        [
            ls_task(1, "/data/local-files/?d=a.png", choices("Cat")),
            ls_task(7, "/data/upload/1/deadbeef-gone.png", choices("Dog")),
        ],
    )
    with pytest.raises(
        DataError,
        match=r"export\.json task 7: image '/data/upload/1/deadbeef-gone\.png': no file named 'deadbeef-gone",
    ):
        materialise(source_cfg(export), tmp_path / "raw")


def test_label_studio_remote_urls_need_a_download_and_image_root(tmp_path):
    export = write_export(
        tmp_path / "export.json", [ls_task(3, "https://example.com/pics/cat.png?sig=1", choices("Cat"))]
    )
    with pytest.raises(DataError, match=r"export\.json task 3: 'https://example\.com/pics/cat\.png\?sig=1'") as info:
        materialise(source_cfg(export), tmp_path / "raw")
    assert "download the images into a folder and set data.image_root" in str(info.value)
    # Once downloaded into data.image_root, the file is found by its name.
    cat = write_png(tmp_path / "downloads" / "cat.png")
    records = materialise(source_cfg(export, image_root=tmp_path / "downloads"), tmp_path / "raw")
    assert [r.labels for r in records] == [("Cat",)]
    assert_copied(records[0], tmp_path / "raw", cat)


def test_label_studio_json_min(tmp_path):
    write_png(tmp_path / "a.png", 1)
    write_png(tmp_path / "b.png", 2)
    meta = {"annotator": 1, "annotation_id": 5, "lead_time": 2.5}
    export = write_export(
        tmp_path / "min.json",
        [
            {"image": "/data/local-files/?d=a.png", "id": 1, "choice": "Cat", **meta, "updated_at": "2024-01-01"},
            {"image": "/data/local-files/?d=a.png", "id": 1, "choice": "Dog", **meta, "updated_at": "2024-03-01"},
            {"image": "/data/local-files/?d=b.png", "id": 2, "choice": {"choices": ["Cat", "Dog"]}, **meta},
        ],
    )
    records = materialise(source_cfg(export, task="multilabel"), tmp_path / "raw")
    assert [(r.source_id, r.labels) for r in records] == [
        ("min.json task 1", ("Dog",)),
        ("min.json task 2", ("Cat", "Dog")),
    ]


def test_label_studio_without_annotations(tmp_path):
    export = write_export(tmp_path / "export.json", [ls_task(1, "/data/upload/1/deadbeef-a.png")])
    with pytest.raises(DataError, match=r"export\.json: no task has a non-cancelled annotation"):
        materialise(source_cfg(export), tmp_path / "raw")


def test_zip_of_a_label_studio_export(tmp_path):
    content = tmp_path / "content"
    write_png(content / "upload" / "1" / "1a2b3c4d-cat.png", 1)
    write_png(content / "upload" / "1" / "2b3c4d5e-dog.png", 2)
    write_export(
        content / "project-1.json",
        [
            ls_task(1, "/data/upload/1/1a2b3c4d-cat.png", choices("Cat")),
            ls_task(2, "/data/upload/1/2b3c4d5e-dog.png", choices("Dog")),
        ],
    )
    out = tmp_path / "raw"
    records = materialise(source_cfg(zip_folder(content, tmp_path / "ls.zip")), out)
    assert [(r.source_id, r.labels) for r in records] == [
        ("ls.zip:project-1.json task 1", ("Cat",)),
        ("ls.zip:project-1.json task 2", ("Dog",)),
    ]
    assert not [p for p in os.listdir(out) if p.startswith(".extract")]


def test_label_studio_missing_uploads_say_where_label_studio_keeps_them(tmp_path, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_BASE_DATA_DIR", raising=False)
    write_png(tmp_path / "a.png")
    items = [ls_task(1, "/data/local-files/?d=a.png", choices("Cat"))]
    items += [ls_task(10 + i, f"/data/upload/4/0badc0d{i}-gone{i}.png", choices("Dog")) for i in range(25)]
    export = write_export(tmp_path / "export.json", items)
    with pytest.raises(DataError) as info:
        materialise(source_cfg(export), tmp_path / "raw")
    message = str(info.value)
    header, *rows = message.splitlines()
    assert header.startswith(
        "25 task(s) of export.json name uploaded images (/data/upload/<project>/<file>) not found below the "
        f"export's folder {tmp_path} (data.image_root is not set); Label Studio keeps uploads in "
        "<Label Studio data dir>/media/upload/<project id>/"
    )
    assert "~/.local/share/label-studio/ on Linux" in header
    assert header.endswith("set data.image_root=~/.local/share/label-studio/media/upload/4:")
    # the path tried, per image; the first ones only
    assert rows[0] == (
        f"  export.json task 10: image '/data/upload/4/0badc0d0-gone0.png': no file named '0badc0d0-gone0.png' "
        f"or 'gone0.png' below {tmp_path}"
    )
    assert len(rows) == 21 and rows[-1] == "  ... and 5 more"
    assert not (tmp_path / "raw").exists()


def test_label_studio_missing_uploads_follow_the_data_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_BASE_DATA_DIR", "/srv/ls-data")
    export = write_export(tmp_path / "export.json", [ls_task(1, "/data/upload/7/deadbeef-gone.png", choices("Cat"))])
    store = tmp_path / "store"
    store.mkdir()
    with pytest.raises(DataError, match=rf"not found below data\.image_root={store};") as info:
        materialise(source_cfg(export, image_root=store), tmp_path / "raw")
    assert str(info.value).splitlines()[0].endswith("set data.image_root=/srv/ls-data/media/upload/7:")


def test_label_studio_missing_local_files_name_the_document_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", raising=False)
    store = tmp_path / "store"
    write_png(store / "pets" / "cat.png")
    export = write_export(
        tmp_path / "export.json",
        [
            ls_task(1, "/data/local-files/?d=pets/cat.png", choices("Cat")),
            ls_task(2, "/data/local-files/?d=pets/dog.png", choices("Dog")),
            ls_task(3, "photos/bird.png", choices("Bird")),  # a plain path: its own kind
        ],
    )
    with pytest.raises(DataError) as info:
        materialise(source_cfg(export, image_root=store), tmp_path / "raw")
    message = str(info.value)
    assert message.startswith("2 problems found:\n")
    assert (
        f"1 task(s) of export.json name local-storage images (/data/local-files/?d=<path>) not found below "
        f"data.image_root={store}; the d= path is relative to the Label Studio server's LOCAL_FILES_DOCUMENT_ROOT "
        "(its environment variable LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT): set "
        "data.image_root=<the server's LOCAL_FILES_DOCUMENT_ROOT>:\n"
        f"  export.json task 2: image '/data/local-files/?d=pets/dog.png': image file 'pets/dog.png' not found "
        f"(looked in {store / 'pets' / 'dog.png'})"
    ) in message
    assert f"1 task(s) of export.json name image files not found below data.image_root={store}" in message
    assert "export.json task 3: image 'photos/bird.png': image file 'photos/bird.png' not found" in message
    # With the server's setting in the environment, that folder is the one to set.
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "/srv/photos")
    with pytest.raises(DataError, match=r"set data\.image_root=/srv/photos:"):
        materialise(source_cfg(export, image_root=store), tmp_path / "raw")


# --------------------------------------------------------------------------- data.group_by in the sources


def group_cfg(source: Path, group_by: str, task: str = "multiclass", image_root: Path | None = None):
    cfg = source_cfg(source, task=task, image_root=image_root)
    cfg.data.group_by = group_by
    return cfg


def test_manifest_group_column_is_the_records_group(tmp_path):
    rows = [
        {"path": write_png(tmp_path / f"{i}.png", i).name, "label": "ab"[i % 2], "Patient": f"p{i // 2}"}
        for i in range(4)
    ]
    manifest = write_csv(tmp_path / "labels.csv", rows)
    records = materialise(group_cfg(manifest, "patient"), tmp_path / "raw")  # columns match case-insensitively
    assert [(r.source_id, r.group) for r in records] == [
        ("labels.csv row 1", "p0"),
        ("labels.csv row 2", "p0"),
        ("labels.csv row 3", "p1"),
        ("labels.csv row 4", "p1"),
    ]
    # a value that is not a column is a regex, applied later (preprocess): no group here
    assert {r.group for r in materialise(group_cfg(manifest, r"row (\d)"), tmp_path / "raw2")} == {""}
    with pytest.raises(ConfigError, match=r"data\.group_by='Label' names labels\.csv's 'label' column"):
        materialise(group_cfg(manifest, "Label"), tmp_path / "raw3")


def test_manifest_group_column_with_missing_values_names_the_rows(tmp_path):
    rows = [
        {
            "path": write_png(tmp_path / f"{i}.png", i).name,
            "label": "ab"[i % 2],
            "patient": "" if i in (1, 3, 4) else "p",
        }
        for i in range(6)
    ]
    manifest = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(DataError) as info:
        materialise(group_cfg(manifest, "patient"), tmp_path / "raw")
    assert str(info.value) == (
        "3 image(s) of labels.csv have no value in column 'patient', which data.group_by='patient' names; every "
        "image needs a group (fill it in, or set data.group_by=null):\n"
        "  labels.csv row 2\n  labels.csv row 4\n  labels.csv row 5"
    )
    assert not (tmp_path / "raw").exists()  # nothing silently dropped, nothing copied


def test_parquet_group_column_of_integers_with_nulls(tmp_path):
    frame = pd.DataFrame(
        {"path": [write_png(tmp_path / f"{i}.png", i).name for i in range(3)], "label": ["a", "b", "a"]}
    )
    frame["site"] = pd.array([7, None, 7], dtype="Int64")
    frame.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(
        DataError, match=r"1 image\(s\) of m\.parquet have no value in column 'site'.*\n  m\.parquet row 2$"
    ):
        materialise(group_cfg(tmp_path / "m.parquet", "site"), tmp_path / "raw")
    frame["site"] = pd.array([7, 8, 7], dtype="Int64")
    frame.to_parquet(tmp_path / "m.parquet")
    assert [r.group for r in materialise(group_cfg(tmp_path / "m.parquet", "site"), tmp_path / "raw")] == [
        "7",
        "8",
        "7",
    ]


def test_label_studio_data_field_is_the_group(tmp_path):
    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png", ord(name))

    def task(task_id: int, image: str, label: str, **fields) -> dict:
        item = ls_task(task_id, f"/data/local-files/?d={image}", choices(label))
        item["data"].update(fields)
        return item

    export = write_export(
        tmp_path / "export.json",
        [
            task(1, "a.png", "Cat", patient="p1"),
            task(2, "b.png", "Dog", patient=2),
            task(3, "c.png", "Cat", patient="p1"),
        ],
    )
    records = materialise(group_cfg(export, "patient"), tmp_path / "raw")
    assert [r.group for r in records] == ["p1", "2", "p1"]
    broken = write_export(
        tmp_path / "broken.json",
        [task(1, "a.png", "Cat", patient="p1"), task(2, "b.png", "Dog"), task(3, "c.png", "Cat", patient=" ")],
    )
    with pytest.raises(DataError, match=r"2 image\(s\) of broken\.json have no value in data field 'patient'.*\n"):
        materialise(group_cfg(broken, "patient"), tmp_path / "raw2")
    # JSON_MIN: the field is a key of the record, and not read as a control
    meta = {"annotator": 1, "annotation_id": 5}
    minimal = write_export(
        tmp_path / "min.json",
        [
            {"image": "/data/local-files/?d=a.png", "id": 1, "choice": "Cat", "patient": "p1", **meta},
            {"image": "/data/local-files/?d=b.png", "id": 2, "choice": "Dog", "patient": "p2", **meta},
        ],
    )
    records = materialise(group_cfg(minimal, "patient"), tmp_path / "raw3")
    assert [(r.labels, r.group) for r in records] == [(("Cat",), "p1"), (("Dog",), "p2")]


# --------------------------------------------------------------------------- the task the data needs


def test_label_studio_taxonomy_under_a_single_label_task_is_refused(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", i)
    export = write_export(
        tmp_path / "export.json",
        [
            ls_task(1, "/data/local-files/?d=0.png", taxonomy(["Digits", "Round", "zero"])),
            ls_task(2, "/data/local-files/?d=1.png", taxonomy(["Digits", "Round", "six"])),
            ls_task(3, "/data/local-files/?d=2.png", taxonomy(["Digits", "Round", "zero"])),
        ],
    )
    with pytest.raises(DataError) as info:
        ingest.run(source_cfg(export), out_dir=tmp_path / "raw")
    assert str(info.value) == (
        "task multiclass: labels are paths (e.g. 'Digits/Round/zero', 3 images): use task=hierarchical "
        "(or flatten the labels)"
    )
    assert not (tmp_path / "raw").exists()
    hierarchical = source_cfg(export, task="hierarchical")
    hierarchical.task.taxonomy = None
    summary = ingest.run(hierarchical, out_dir=tmp_path / "raw")
    assert summary["per_class"] == {"Digits/Round/six": 1, "Digits/Round/zero": 2}


def test_several_labels_under_a_single_label_task_name_multilabel(tmp_path):
    for i in range(3):
        write_png(tmp_path / f"{i}.png", i)
    export = write_export(
        tmp_path / "export.json",
        [
            ls_task(1, "/data/local-files/?d=0.png", choices("cat", "dog")),
            ls_task(2, "/data/local-files/?d=1.png", choices("cat")),
            ls_task(3, "/data/local-files/?d=2.png", choices("dog")),
        ],
    )
    with pytest.raises(DataError) as info:
        ingest.run(source_cfg(export), out_dir=tmp_path / "raw")
    assert str(info.value).startswith(
        "task multiclass: images carry several labels (e.g. export.json task 1: cat, dog; 1 image): use task=multilabel"
    )


def test_nested_folders_under_a_flat_task_warn_naming_hierarchical(nested_tree, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        records = materialise(source_cfg(nested_tree, task="multiclass"), tmp_path / "raw")
    assert Counter(r.labels for r in records) == {("Apparel",): 5, ("Bags",): 2}  # still the first level
    assert (
        f"data.source {nested_tree}: 4 image(s) lie in sub-folders of their class folder "
        "(e.g. Apparel/Footwear/Sandal/d0.PNG), labelled by the first-level folder ('Apparel'); if the nested "
        "folders are a label tree, use task=hierarchical"
    ) in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        materialise(source_cfg(nested_tree, task="hierarchical"), tmp_path / "raw2")
    assert "sub-folders" not in caplog.text
