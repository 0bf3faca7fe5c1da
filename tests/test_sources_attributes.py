"""Sources of multi-attribute and ordinal data: manifests with one column per attribute, Label
Studio exports with several Choices controls, and the emoji skin-tone / attribute built-ins.

Multi-attribute labels are ``attribute=value`` strings, sorted. Until the multiattribute task
is registered, the readers are told the task's label form through the ``attributes_form``
fixture (it replaces ``label_form``, which asks ``taxonomist.tasks.task_of``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image

from taxonomist.config import compose
from taxonomist.data.manifest import LABEL_SEP, Record
from taxonomist.data.sources import emoji, label_studio, materialise, table
from taxonomist.errors import ConfigError, DataError

NODE_MODULES = REPO / "node_modules"
FORMS = {"multiattribute": "attributes", "multilabel": "set", "hierarchical": "path"}


@pytest.fixture
def attributes_form(monkeypatch):
    """The label form of a task by its name (multiattribute: ``attributes``), for both readers."""

    def form(cfg) -> str:
        return FORMS.get(str(cfg.task.name), "one")

    monkeypatch.setattr(table, "label_form", form)
    monkeypatch.setattr(label_studio, "label_form", form)


def source_cfg(source: Path, task: str = "multiattribute", attributes: dict | None = None):
    """A config with only the keys the readers use."""
    data = {"source": str(source), "format": "auto", "image_root": None}
    return OmegaConf.create({"data": data, "task": {"name": task, "attributes": attributes or {}}})


def write_png(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, 0, 0)).save(path)
    return path


def labels_by_source(records: list[Record]) -> dict[str, tuple[str, ...]]:
    return {r.source_id: r.labels for r in records}


def well_formed(labels: tuple[str, ...]) -> bool:
    """Sorted, unique ``attribute=value`` labels with a valid attribute name and value."""
    pairs = [label.split("=", 1) for label in labels]
    return (
        list(labels) == sorted(set(labels))
        and all(len(p) == 2 and p[0] and p[1] and not re.search(r"[=|/]", p[0]) for p in pairs)
        and not any(LABEL_SEP in label for label in labels)
    )


# --------------------------------------------------------------------------- the label encoding


def test_attribute_labels_are_sorted_attribute_value_pairs():
    values = {"weather": ["sunny"], "tags": ["grass", "dog", " dog "], "quality": []}
    assert table.attribute_labels(values, "here") == ("tags=dog", "tags=grass", "weather=sunny")
    assert table.attribute_labels({"grade": ["a=b"]}, "here") == ("grade=a=b",)  # split at the first "="


@pytest.mark.parametrize("name", ["", "a=b", "a|b", "a/b"])
def test_bad_attribute_names_are_refused(name):
    with pytest.raises(DataError, match="here: "):
        table.attribute_labels({name: ["x"]}, "here")


def test_task_attributes_mapping():
    cfg = OmegaConf.create({"task": {"attributes": {"weather": "multiclass", "tags": "multilabel"}}})
    assert table.task_attributes(cfg) == {"weather": "multiclass", "tags": "multilabel"}
    assert table.task_attributes(OmegaConf.create({"task": {"name": "binary"}})) == {}
    with pytest.raises(ConfigError, match=r"task\.attributes: attribute name 'a/b'"):
        table.task_attributes(OmegaConf.create({"task": {"attributes": {"a/b": "auto"}}}))


# --------------------------------------------------------------------------- manifests


@pytest.fixture
def images(tmp_path) -> Path:
    for i, name in enumerate("abcd"):
        write_png(tmp_path / f"{name}.png", i)
    return tmp_path


CSV = (
    "path,Weather,quality,tags,split\n"
    'a.png,sunny,good,"[""dog"", ""grass""]",train\n'
    "b.png,night,,dog|cat,\n"
    "c.png,overcast,blurred,,test\n"
)


def test_manifest_with_one_column_per_attribute(images, attributes_form):
    (images / "m.csv").write_text(CSV)
    records = materialise(source_cfg(images / "m.csv"), images / "raw")
    assert labels_by_source(records) == {
        "m.csv row 1": ("quality=good", "tags=dog", "tags=grass", "weather=sunny"),
        "m.csv row 2": ("tags=cat", "tags=dog", "weather=night"),  # empty quality: no value
        "m.csv row 3": ("quality=blurred", "weather=overcast"),  # empty tags: none
    }
    assert [r.split for r in records] == ["train", "", "test"]


def test_task_attributes_choose_the_columns(images, attributes_form):
    (images / "m.csv").write_text(CSV)
    cfg = source_cfg(images / "m.csv", attributes={"Weather": "multiclass", "tags": "multilabel"})
    records = materialise(cfg, images / "raw")
    # Columns match case-insensitively; the attribute keeps its configured spelling; quality is not read.
    assert [r.labels for r in records] == [
        ("Weather=sunny", "tags=dog", "tags=grass"),
        ("Weather=night", "tags=cat", "tags=dog"),
        ("Weather=overcast",),
    ]


def test_missing_attribute_column_lists_the_columns(images, attributes_form):
    (images / "m.csv").write_text(CSV)
    cfg = source_cfg(images / "m.csv", attributes={"weather": "auto", "mood": "auto"})
    with pytest.raises(DataError, match=r"m\.csv: no column for attribute\(s\) 'mood' of task\.attributes") as info:
        materialise(cfg, images / "raw")
    assert "(found: path, weather, quality, tags, split)" in str(info.value)


def test_bad_attribute_cell_names_the_row_and_column(images, attributes_form):
    (images / "m.csv").write_text('path,weather,tags\na.png,sunny,dog\nb.png,night,"[""dog"","\n')
    with pytest.raises(DataError, match=r"m\.csv row 2, column 'tags': attribute cell .* is not a valid JSON list"):
        materialise(source_cfg(images / "m.csv"), images / "raw")
    (images / "m.csv").write_text("path,weather\na.png,sun|ny|\n")  # two values: fine (the task judges)
    assert materialise(source_cfg(images / "m.csv"), images / "raw")[0].labels == ("weather=ny", "weather=sun")


def test_manifest_without_attribute_columns(images, attributes_form):
    (images / "m.csv").write_text("path,label,split\na.png,cat,train\n")
    with pytest.raises(DataError, match=r"m\.csv: no attribute columns \(found: path, label, split\)"):
        materialise(source_cfg(images / "m.csv"), images / "raw")
    (images / "m.csv").write_text("path,a=b\na.png,x\n")
    with pytest.raises(DataError, match=r"m\.csv: column 'a=b': attribute name 'a=b' contains '='"):
        materialise(source_cfg(images / "m.csv"), images / "raw")


def test_parquet_attribute_columns(images, attributes_form):
    frame = pd.DataFrame(
        {
            "image": ["a.png", "b.png", "c.png"],
            "grade": [3, None, 5],  # an integer column with a null reads as float
            "tags": [["dog", "grass"], [], ["cat"]],
        }
    )
    frame.to_parquet(images / "m.parquet")
    records = materialise(source_cfg(images / "m.parquet"), images / "raw")
    assert [r.labels for r in records] == [("grade=3", "tags=dog", "tags=grass"), (), ("grade=5", "tags=cat")]


def test_other_tasks_still_read_label_columns(images, attributes_form):
    (images / "m.csv").write_text("path,label,weather\na.png,cat,sunny\n")
    assert materialise(source_cfg(images / "m.csv", task="multiclass"), images / "raw")[0].labels == ("cat",)


# --------------------------------------------------------------------------- Label Studio


def region(control: str, *names: str) -> dict:
    return {"type": "choices", "from_name": control, "to_name": "image", "value": {"choices": list(names)}}


def full_export(path: Path) -> Path:
    """A Label Studio JSON export of three images answered in up to three Choices controls."""
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/local-files/?d=a.png"},
            "annotations": [
                {"result": [region("weather", "sunny"), region("tags", "dog", "grass"), region("quality", "good")]}
            ],
        },
        {
            "id": 2,
            "data": {"image": "/data/local-files/?d=b.png"},
            "annotations": [{"result": [region("weather", "night")]}],
        },
        {
            "id": 3,
            "data": {"image": "/data/local-files/?d=c.png"},
            "annotations": [
                {"result": [region("weather", "sunny")], "updated_at": "2024-01-01T00:00:00Z"},
                {"result": [region("weather", "overcast"), region("quality", "blurred")], "updated_at": "2024-02-01"},
            ],
        },
    ]
    path.write_text(json.dumps(tasks))
    return path


def test_label_studio_choices_controls_are_attributes(images, attributes_form):
    export = full_export(images / "export.json")
    assert labels_by_source(materialise(source_cfg(export), images / "raw")) == {
        "export.json task 1": ("quality=good", "tags=dog", "tags=grass", "weather=sunny"),
        "export.json task 2": ("weather=night",),
        "export.json task 3": ("quality=blurred", "weather=overcast"),  # the latest annotation
    }
    cfg = source_cfg(export, attributes={"weather": "multiclass", "tags": "multilabel"})
    assert [r.labels for r in materialise(cfg, images / "raw2")] == [
        ("tags=dog", "tags=grass", "weather=sunny"),
        ("weather=night",),
        ("weather=overcast",),
    ]


def test_label_studio_json_min_controls_are_attributes(images, attributes_form):
    meta = {"annotator": 1, "annotation_id": 3, "created_at": "2024-01-01", "lead_time": 1.5}
    export = images / "min.json"
    records = [
        # Label Studio writes one chosen value as text and several as {"choices": [...]}.
        {
            "image": "/data/local-files/?d=a.png",
            "id": 1,
            "weather": "sunny",
            "tags": {"choices": ["dog", "grass"]},
            **meta,
        },
        {"image": "/data/local-files/?d=b.png", "id": 2, "weather": "night", "quality": "blurred", **meta},
    ]
    export.write_text(json.dumps(records))
    assert [r.labels for r in materialise(source_cfg(export), images / "raw")] == [
        ("tags=dog", "tags=grass", "weather=sunny"),
        ("quality=blurred", "weather=night"),
    ]
    cfg = source_cfg(export, attributes={"quality": "binary"})
    assert [r.labels for r in materialise(cfg, images / "raw2")] == [(), ("quality=blurred",)]


def test_label_studio_json_min_other_data_needs_task_attributes(images, attributes_form):
    export = images / "min.json"
    export.write_text(json.dumps([{"image": "/data/local-files/?d=a.png", "id": 1, "weather": "sunny", "width": 640}]))
    with pytest.raises(DataError, match=r"min\.json task 1: key 'width' holds 640.*task\.attributes"):
        materialise(source_cfg(export), images / "raw")
    cfg = source_cfg(export, attributes={"weather": "multiclass"})
    assert [r.labels for r in materialise(cfg, images / "raw")] == [("weather=sunny",)]


def test_single_label_task_with_several_controls_points_to_multiattribute(images, attributes_form):
    export = full_export(images / "export.json")
    with pytest.raises(
        DataError,
        match=r"export\.json task 1: .*several controls \(weather, tags, quality\).*"
        r"task=multiattribute",
    ):
        materialise(source_cfg(export, task="multiclass"), images / "raw")
    export.write_text(
        json.dumps([{"image": "/data/local-files/?d=a.png", "id": 1, "weather": "sunny", "quality": "good"}])
    )
    with pytest.raises(
        DataError, match=r"export\.json task 1: cannot tell which of the keys weather, quality.*task=multiattribute"
    ):
        materialise(source_cfg(export, task="binary"), images / "raw")


def test_multilabel_task_still_merges_the_controls(images, attributes_form):
    export = full_export(images / "export.json")
    records = materialise(source_cfg(export, task="multilabel"), images / "raw")
    assert [r.labels for r in records] == [("sunny", "dog", "grass", "good"), ("night",), ("overcast", "blurred")]


# --------------------------------------------------------------------------- emoji built-ins: a fake node_modules


def variation(unified: str) -> dict:
    return {"unified": unified, "image": f"{unified.lower()}.png", "has_img_google": True}


def tones(base: str, keys: list[str]) -> dict:
    return {key: variation(f"{base}-{key}") for key in keys}


def entry(unified: str, category: str, subcategory: str, keys: list[str] = ()) -> dict:
    """An emoji.json entry, with skin variations keyed by ``keys``."""
    item = {"unified": unified, "category": category, "subcategory": subcategory, **variation(unified)}
    return {**item, "skin_variations": tones(unified, keys)} if keys else item


SINGLE = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]
FAKE_EMOJI = [
    entry("1F600", "Smileys & Emotion", "face-smiling"),  # no skin tones
    entry("1F44B", "People & Body", "hand-fingers-open", SINGLE),
    entry("1F46B", "People & Body", "family", ["1F3FB-1F3FB", "1F3FB-1F3FC", "1F3FF-1F3FF"]),  # mixed pair: out
    entry("1F3C2", "People & Body", "person-sport", SINGLE),
]
IDENTICAL = "1F3C2"  # the snowboarder: every tone is the same picture
OPENMOJI = 'emoji,hexcode,tags,openmoji_tags\nx,1F44B,"hand, wave",\nx,1f46b,"couple, hand",\n'


def fake_node_modules(root: Path) -> Path:
    images = root / emoji.IMAGE_DIR
    shade = 0
    for item in FAKE_EMOJI:
        for picture in [item, *item.get("skin_variations", {}).values()]:
            shade += 1
            write_png(images / picture["image"], 0 if item["unified"] == IDENTICAL else shade)
    (root / emoji.EMOJI_JSON).write_text(json.dumps(FAKE_EMOJI))
    (root / emoji.OPENMOJI_CSV).parent.mkdir(parents=True)
    (root / emoji.OPENMOJI_CSV).write_text(OPENMOJI)
    return root


def builtin_cfg(name: str, root: Path):
    return OmegaConf.create({"data": {"source": f"builtin:{name}", "builtin_dir": str(root)}})


def test_emoji_skin_tones_fake(tmp_path):
    root = fake_node_modules(tmp_path / "node_modules")
    records = materialise(builtin_cfg("emoji-skin-tones", root), tmp_path / "raw")
    assert labels_by_source(records) == {
        "emoji:1f44b-1f3fb": ("1-light",),
        "emoji:1f44b-1f3fc": ("2-medium-light",),
        "emoji:1f44b-1f3fd": ("3-medium",),
        "emoji:1f44b-1f3fe": ("4-medium-dark",),
        "emoji:1f44b-1f3ff": ("5-dark",),
        "emoji:1f46b-1f3fb-1f3fb": ("1-light",),
        "emoji:1f46b-1f3ff-1f3ff": ("5-dark",),
    }
    assert all(r.split == "" for r in records)


def test_emoji_attributes_fake(tmp_path, monkeypatch):
    monkeypatch.setattr(emoji, "ATTRIBUTE_TAGS", 1)  # only "hand" (on both emoji) is kept
    root = fake_node_modules(tmp_path / "node_modules")
    got = labels_by_source(materialise(builtin_cfg("emoji-attributes", root), tmp_path / "raw"))
    assert len(got) == 6 + 3
    assert got["emoji:1f44b"] == ("hand=yes", "tags=hand", "tone=default")
    assert got["emoji:1f44b-1f3fe"] == ("hand=yes", "tags=hand", "tone=4-medium-dark")
    assert got["emoji:1f46b-1f3ff-1f3ff"] == ("hand=no", "tags=hand", "tone=5-dark")


def test_tone_names_sort_in_tone_order():
    assert sorted(emoji.SKIN_TONES.values()) == [emoji.SKIN_TONES[key] for key in sorted(emoji.SKIN_TONES)]
    assert emoji.variation_tone("1f3fd") == "3-medium"
    assert emoji.variation_tone("1F3FB-1F3FB") == "1-light"
    assert emoji.variation_tone("1F3FB-1F3FC") is None


# --------------------------------------------------------------------------- emoji built-ins: the real npm packages


def test_emoji_skin_tones_and_attributes_real(tmp_path, monkeypatch):
    """The pinned npm packages through conf/data/emoji_skin_tones.yaml and emoji_attributes.yaml."""
    if not (NODE_MODULES / emoji.EMOJI_JSON).is_file() or not (NODE_MODULES / emoji.OPENMOJI_CSV).is_file():
        pytest.fail(f"{NODE_MODULES} lacks the emoji npm packages: run `bash scripts/setup.sh` (it runs `npm ci`)")
    monkeypatch.chdir(REPO)  # builtin_dir "node_modules" is relative to the project root
    toned = materialise(compose(["data=emoji_skin_tones"]), tmp_path / "tones")
    assert Counter(r.labels for r in toned) == {(tone,): 322 for tone in emoji.SKIN_TONES.values()}
    assert len({r.sha256 for r in toned}) == len(toned)  # no picture twice (the snowboarder is out)

    attributed = materialise(compose(["data=emoji_attributes"]), tmp_path / "attributes")
    assert len(attributed) == 322 * 6
    assert all(well_formed(r.labels) for r in attributed)
    counts = Counter(label for r in attributed for label in r.labels)
    assert {label: n for label, n in counts.items() if label.startswith("tone=")} == {
        f"tone={tone}": 322 for tone in [emoji.DEFAULT_TONE, *emoji.SKIN_TONES.values()]
    }
    assert (counts["hand=yes"], counts["hand=no"]) == (258, 1674)
    tags = {label: n for label, n in counts.items() if label.startswith("tags=")}
    assert len(tags) == emoji.ATTRIBUTE_TAGS and tags["tags=man"] == 546
    by_id = labels_by_source(attributed)
    assert by_id["emoji:1f44b"] == ("hand=yes", "tags=hand", "tone=default")  # waving hand
    assert by_id["emoji:1f44b-1f3ff"] == ("hand=yes", "tags=hand", "tone=5-dark")
