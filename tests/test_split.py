"""Group-aware splits (``data.group_by``): group keys from a source column or a regex on the
source id, whole groups per split, the source's own splits, and the ungrouped path unchanged."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_image_folder, tiny_overrides

from taxonomist.config import compose
from taxonomist.data.manifest import Record, read_manifest, write_manifest
from taxonomist.data.split import assign_splits, group_keys
from taxonomist.errors import DataError
from taxonomist.stages import ingest, preprocess

REPO = Path(__file__).resolve().parents[1]


def grouped_frame(groups_per_class: dict[str, int], per_group: int = 4, split: str = "") -> pd.DataFrame:
    """A manifest-like frame: ``per_group`` images for each group of each class; the groups are
    the source ids' folders (``<class>/<subject>/<n>.png``), and fill the ``group`` column."""
    rows = []
    for label, n_groups in groups_per_class.items():
        for g in range(n_groups):
            for i in range(per_group):
                source_id = f"{label}/{label}{g:02d}/{i}.png"
                rows.append((source_id, label, split, source_id, source_id, f"{label}{g:02d}"))
    return pd.DataFrame(rows, columns=["path", "label", "split", "sha256", "source_id", "group"])


def splits_of_groups(out: pd.DataFrame) -> pd.Series:
    return out.groupby("group")["split"].agg(lambda s: tuple(sorted(set(s))))


# --------------------------------------------------------------------------- group_keys


def test_group_keys_off_when_group_by_is_null():
    frame = grouped_frame({"a": 2})
    assert group_keys(frame, None) is None
    assert group_keys(frame, "") is None


def test_group_keys_use_the_column_the_source_filled():
    frame = grouped_frame({"a": 2, "b": 2})
    assert group_keys(frame, "patient").tolist() == frame["group"].tolist()
    frame.loc[[1, 5], "group"] = ""
    with pytest.raises(DataError, match=r"data\.group_by='patient': 2 of 16 images have no group .*'a/a00/1\.png'"):
        group_keys(frame, "patient")


def test_group_keys_from_a_regex_on_the_source_id():
    frame = grouped_frame({"a": 2, "b": 1}).assign(group="")  # e.g. a folder source: no column
    assert group_keys(frame, r"/(\w+)/").tolist() == ["a00"] * 4 + ["a01"] * 4 + ["b00"] * 4  # the first group
    assert group_keys(frame, r"[ab]\d\d").tolist() == ["a00"] * 4 + ["a01"] * 4 + ["b00"] * 4  # the whole match
    old = frame.drop(columns="group")  # a manifest from before the column existed
    assert group_keys(old, r"/(\w+)/").tolist() == group_keys(frame, r"/(\w+)/").tolist()


def test_group_keys_regex_errors_name_the_key_with_counts_and_examples():
    frame = grouped_frame({"a": 2, "b": 1}).assign(group="")
    with pytest.raises(DataError, match=r"data\.group_by='\(unclosed' is not a column of the source and not a valid"):
        group_keys(frame, "(unclosed")
    with pytest.raises(DataError, match=r"matches none of the 12 images' source ids \(e\.g\. 'a/a00/0\.png', "):
        group_keys(frame, "patient")
    with pytest.raises(
        DataError, match=r"gives no group for 4 of 12 images \(e\.g\. 'b/b00/0\.png', .*widen the regex"
    ):
        group_keys(frame, r"/(a\d+)/")
    with pytest.raises(DataError, match=r"gives no group for 4 of 12"):  # an empty first group is no group
        group_keys(frame, r"/(a\d+)?/?b?")


def test_an_old_manifest_without_a_group_column_reads_with_empty_groups(tmp_path):
    write_manifest([Record("images/0.png", ("a",), "", "h0", "a/0.png", "p1")], tmp_path)
    assert read_manifest(tmp_path)["group"].tolist() == ["p1"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.csv").write_text("path,labels,split,sha256,source_id\nimages/0.png,a,,h0,a/0.png\n")
    frame = read_manifest(old)
    assert frame["group"].tolist() == [""]
    assert list(frame.columns)[-1] == "group"


# --------------------------------------------------------------------------- assign_splits with groups


def test_grouped_split_keeps_every_group_in_one_split_and_is_stratified():
    frame = grouped_frame({"a": 20, "b": 10, "c": 10})
    out = assign_splits(frame, val_fraction=0.25, test_fraction=0.2, seed=3, group="group")
    assert (splits_of_groups(out).map(len) == 1).all()
    sizes = out["split"].value_counts()
    assert sizes["test"] == pytest.approx(0.2 * len(frame), abs=8)  # one fold of five, whole groups of 4
    assert sizes["val"] == pytest.approx(0.25 * 0.8 * len(frame), abs=8)  # one fold of four of the rest
    per_class = out.groupby(["label", "split"]).size().unstack(fill_value=0)
    assert (per_class > 0).all().all()  # every class on every side
    assert (frame["split"] == "").all()  # the input is not modified


def test_grouped_split_is_deterministic_and_seeded():
    frame = grouped_frame({"a": 12, "b": 12})
    first = assign_splits(frame, 0.2, 0.2, seed=5, group="group")
    again = assign_splits(frame, 0.2, 0.2, seed=5, group="group")
    pd.testing.assert_frame_equal(first, again)
    others = [assign_splits(frame, 0.2, 0.2, seed=s, group="group")["split"] for s in range(6, 10)]
    assert any(not first["split"].equals(other) for other in others)


def test_grouped_split_with_regex_groups():
    frame = grouped_frame({"a": 10, "b": 10}).assign(group="")
    frame["group"] = group_keys(frame, r"^\w/(\w+)/")
    out = assign_splits(frame, 0.2, 0.2, seed=0, group="group")
    assert (splits_of_groups(out).map(len) == 1).all()
    assert set(out["split"]) == {"train", "val", "test"}


def test_ungrouped_split_is_unchanged():
    """The exact splits of the seeded per-class draw (as before data.group_by existed)."""
    frame = pd.DataFrame(
        {
            "path": [f"{c}{i}" for c in "ab" for i in range(6)],
            "label": [c for c in "ab" for _ in range(6)],
            "split": "",
            "sha256": "",
            "source_id": "",
        }
    )
    out = assign_splits(frame, 0.25, 0.25, seed=3)
    assert out["split"].tolist() == [
        "train", "train", "test", "train", "val", "test",
        "train", "val", "train", "test", "train", "test",
    ]  # fmt: skip
    with_groups_column = frame.assign(group=[f"g{i}" for i in range(12)])
    pd.testing.assert_frame_equal(
        assign_splits(with_groups_column, 0.25, 0.25, seed=3).drop(columns="group"), out
    )  # a group column alone changes nothing: only group= does


def test_sources_splits_are_kept_and_unmarked_images_follow_their_group(caplog):
    frame = grouped_frame({"a": 8, "b": 8})
    frame.loc[frame["group"] == "a00", "split"] = "test"
    frame.loc[(frame["group"] == "b00") & (frame.index % 4 < 2), "split"] = "test"  # half of b00: the rest follows
    frame.loc[frame["group"] == "b01", "split"] = "val"
    with caplog.at_level(logging.WARNING):
        out = assign_splits(frame, 0.25, 0.2, seed=0, group="group")
    assert caplog.text == ""
    assert set(out.loc[out["group"].isin(["a00", "b00"]), "split"]) == {"test"}
    assert set(out.loc[out["group"] == "b01", "split"]) == {"val"}
    assert set(out.loc[~out["group"].isin(["a00", "b00", "b01"]), "split"]) == {"train"}  # test and val are fixed


def test_a_group_the_source_put_in_several_splits_is_kept_and_named(caplog):
    frame = grouped_frame({"a": 6, "b": 6})
    frame.loc[frame["group"] == "a00", "split"] = ["train", "train", "test", "test"]
    frame.loc[frame["group"].isin(["b00"]), "split"] = "test"
    with caplog.at_level(logging.WARNING):
        out = assign_splits(frame, 0.25, 0.2, seed=0, group="group")
    assert (
        "the source put 1 group(s) in several splits, kept as the source has them: 'a00' (test, train)" in caplog.text
    )
    assert out.loc[frame["group"] == "a00", "split"].tolist()[2:] == ["test", "test"]


def test_a_class_in_few_groups_is_warned_about(caplog):
    frame = grouped_frame({"a": 12, "b": 1}, per_group=6)
    with caplog.at_level(logging.WARNING):
        out = assign_splits(frame, 0.2, 0.2, seed=0, group="group")
    assert set(out.loc[out["label"] == "b", "split"]) in ({"train"}, {"val"}, {"test"})
    assert "class(es) have no image in the" in caplog.text
    assert "'b' (1 group(s))" in caplog.text


def test_too_few_groups_is_an_error():
    frame = grouped_frame({"a": 1, "b": 0}, per_group=6)
    frame.loc[3:, "label"] = "b"
    with pytest.raises(DataError, match=r"cannot draw a test split with data\.group_by: .* in 1 group"):
        assign_splits(frame, 0.2, 0.2, seed=0, group="group")


# --------------------------------------------------------------------------- the preprocess stage


def test_preprocess_keeps_regex_groups_in_one_split(tmp_path, caplog):
    source = make_image_folder(tmp_path / "shapes", per_class=30)  # circle/circle_007.png ...
    cfg = compose(tiny_overrides(source), conf_dir=REPO / "conf")
    cfg.data.group_by = r"/(\w+_\d\d)\d\."  # circle_00x, circle_01x, circle_02x: 3 groups of 10 per class
    raw = tmp_path / "raw"
    ingest.run(cfg, out_dir=raw)
    assert set(read_manifest(raw)["group"]) == {""}  # a regex: nothing for the source to fill
    with caplog.at_level(logging.WARNING):
        preprocess.run(cfg, raw_dir=raw, out_dir=tmp_path / "processed")
    splits = pd.read_csv(tmp_path / "processed" / "splits.csv", keep_default_na=False)
    assert splits["group"].nunique() == 9
    assert (splits.groupby("group")["split"].nunique() == 1).all()
    assert set(splits["split"]) == {"train", "val", "test"}
    preprocess.run(cfg, raw_dir=raw, out_dir=tmp_path / "again")
    assert (tmp_path / "again" / "splits.csv").read_text() == (tmp_path / "processed" / "splits.csv").read_text()
