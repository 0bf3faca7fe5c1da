"""Built-in sets: scikit-learn digits, scikit-image faces and the npm emoji sets (taxonomist.data.sources)."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from omegaconf import OmegaConf
from PIL import Image

from taxonomist.config import compose
from taxonomist.data.manifest import LABEL_SEP, PATH_SEP, Record
from taxonomist.data.sources import builtin, emoji, materialise
from taxonomist.errors import DataError
from taxonomist.files import sha256_file

NODE_MODULES = REPO / "node_modules"


def check_files(records: list[Record], out_dir: Path) -> None:
    """Every record's file exists under ``out_dir`` with the recorded hash; paths and ids are unique."""
    for rec in records:
        assert sha256_file(out_dir / rec.path) == rec.sha256, rec.path
        assert rec.split == ""
        assert all(label and LABEL_SEP not in label for label in rec.labels), rec
    assert len({r.path for r in records}) == len(records)
    assert len({r.source_id for r in records}) == len(records)


def image_of(out_dir: Path, rec: Record) -> Image.Image:
    with Image.open(out_dir / rec.path) as img:
        img.load()
        return img


# --------------------------------------------------------------------------- digits and faces


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return materialise(compose(["data=digits"], conf_dir=REPO / "conf"), out), out


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    out = tmp_path_factory.mktemp("faces")
    return materialise(compose(["data=faces"], conf_dir=REPO / "conf"), out), out


def test_digits(digits):
    from sklearn.datasets import load_digits

    records, out = digits
    assert len(records) == 1797
    counts = Counter(r.labels for r in records)
    assert set(counts) == {(str(d),) for d in range(10)}
    assert min(counts.values()) >= 170
    check_files(records, out)
    first = image_of(out, records[0])
    assert (first.size, first.mode) == ((8, 8), "L")
    expected = np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(first), expected)
    assert records[0].source_id == "digits:0" and records[0].labels == ("0",)
    assert {image_of(out, r).size for r in records[::50]} == {(8, 8)}


def test_faces(faces):
    records, out = faces
    assert len(records) == 200
    assert [r.labels for r in records] == [("face",)] * 100 + [("non-face",)] * 100
    check_files(records, out)
    modes = {(image_of(out, r).size, image_of(out, r).mode) for r in records}
    assert modes == {((25, 25), "L")}
    pixels = np.stack([np.asarray(image_of(out, r)) for r in records])
    assert pixels.max() == 255 and pixels.std() > 20  # scaled from 0..1 floats, not left near black


def test_to_uint8_scales_and_clips():
    out = builtin.to_uint8(np.array([0.0, 8.0, 16.0, 17.0, -1.0]), 16.0)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 128, 255, 255, 0]


def test_png_bytes_rejects_float_arrays():
    with pytest.raises(TypeError, match="uint8"):
        builtin.png_bytes(np.zeros((4, 4)))


# --------------------------------------------------------------------------- emoji: a fake node_modules


def emoji_entry(unified: str, category: str, subcategory: str, **extra) -> dict:
    """One emoji.json entry with the fields the reader uses (plus a few it ignores)."""
    entry = {
        "name": f"EMOJI {unified}",
        "unified": unified,
        "image": f"{unified.lower()}.png",
        "short_name": unified.lower(),
        "category": category,
        "subcategory": subcategory,
        "sort_order": 1,
        "has_img_google": True,
        "has_img_apple": True,
    }
    entry.update(extra)
    return entry


FAKE_EMOJI = [
    emoji_entry("1F600", "Smileys & Emotion", "face-smiling"),
    emoji_entry("2764-FE0F", "Smileys & Emotion", "heart"),  # openmoji spells it 2764
    emoji_entry("1F44D", "People & Body", "hand-fingers-closed"),  # openmoji spells it lower-case
    emoji_entry(
        "1F44B",
        "People & Body",
        "hand-fingers-open",
        skin_variations={"1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png", "has_img_google": True}},
    ),
    emoji_entry("1F3FB", "Component", "skin-tone"),  # a colour swatch: skipped
    emoji_entry("1F9A4", "Animals & Nature", "animal-bird", has_img_google=False),  # no Google image: skipped
    emoji_entry("1F9A5", "Animals & Nature", "animal-mammal"),  # has_img_google but no PNG file: skipped
    emoji_entry("1FAE8", "Smileys & Emotion", "face-neutral/skeptical"),  # no openmoji row; "/" in a level
    emoji_entry("1F4A9", "Smileys & Emotion", "face-costume"),  # an openmoji row without tags
]
FAKE_OPENMOJI = [
    ("1F600", "smileys-emotion", "Face, grin, smile, , face ", "happy"),
    ("2764", "smileys-emotion", "emotion, love", ""),
    ("1f44d", "people-body", "+1, hand, thumbs|up", ""),
    ("1F44B", "people-body", "hand, wave, waving", ""),
    ("1F44B-1F3FB", "people-body", "", ""),  # skin-tone variant rows carry no tags in openmoji
    ("1F3FB", "component", "light, skin, tone", ""),
    ("1F9A4", "animals-nature", "bird, dodo", ""),
    ("1F9A5", "animals-nature", "sloth, lazy", ""),
    ("1F4A9", "smileys-emotion", "", "poo"),
]


def make_node_modules(root: Path) -> Path:
    """A tiny stand-in for the two npm packages: emoji.json, 64x64 PNGs and openmoji.csv."""
    images = root / emoji.IMAGE_DIR
    images.mkdir(parents=True)
    for i, entry in enumerate(FAKE_EMOJI):
        if entry["unified"] == "1F9A5":
            continue  # listed with an image, but the file is missing
        for name in [entry["image"], *(v["image"] for v in entry.get("skin_variations", {}).values())]:
            Image.new("RGBA", (64, 64), (10 * i, 255 - 10 * i, len(name), 200)).save(images / name)
    (root / emoji.EMOJI_JSON).write_text(json.dumps(FAKE_EMOJI), encoding="utf-8")
    (root / emoji.OPENMOJI_CSV).parent.mkdir(parents=True)
    with (root / emoji.OPENMOJI_CSV).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["emoji", "hexcode", "group", "subgroups", "annotation", "tags", "openmoji_tags"])
        for hexcode, group, tags, om_tags in FAKE_OPENMOJI:
            writer.writerow(["?", hexcode, group, "sub", "annotation", tags, om_tags])
    return root


@pytest.fixture
def fake_modules(tmp_path) -> Path:
    return make_node_modules(tmp_path / "node_modules")


def emoji_cfg(builtin_dir: Path, source: str = "builtin:emoji-tags"):
    return OmegaConf.create({"data": {"source": source, "builtin_dir": str(builtin_dir)}})


def by_id(records: list[Record]) -> dict[str, tuple[str, ...]]:
    return {r.source_id: r.labels for r in records}


def test_normalise_hexcode():
    assert emoji.normalise_hexcode("2764-fe0f") == "2764"
    assert emoji.normalise_hexcode("1f44d") == "1F44D"
    assert emoji.normalise_hexcode("0023-FE0F-20E3") == "0023-20E3"
    assert emoji.normalise_hexcode("263A-FE0E") == "263A"
    assert emoji.normalise_hexcode("1F44B-1F3FB") == "1F44B-1F3FB"  # skin tones are not variation selectors


def test_parse_tags():
    assert emoji.parse_tags(" Face, grin,, face ,SMILE ") == ("face", "grin", "smile")
    assert emoji.parse_tags("a/b, c|d") == ("a-b", "c-d")
    assert emoji.parse_tags("") == ()


def test_emoji_tags_join_and_skips(fake_modules, tmp_path, caplog):
    out = tmp_path / "raw"
    with caplog.at_level(logging.INFO, logger=emoji.__name__):
        records = materialise(emoji_cfg(fake_modules), out)
    assert by_id(records) == {
        "emoji:1f600": ("face", "grin", "smile"),  # openmoji_tags ("happy") are not used
        "emoji:2764-fe0f": ("emotion", "love"),  # joined without FE0F
        "emoji:1f44d": ("+1", "hand", "thumbs-up"),  # joined case-insensitively; "|" replaced
        "emoji:1f44b": ("hand", "wave", "waving"),  # the base emoji only, not its skin variation
    }
    assert "skipped 1 without an openmoji row" in caplog.text and "1 with no tags" in caplog.text
    check_files(records, out)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(r.path.split("/")[-1] for r in records)
    source = fake_modules / emoji.IMAGE_DIR / "2764-fe0f.png"
    assert records[1].sha256 == sha256_file(source)  # the PNG is copied as it is
    assert image_of(out, records[0]).mode == "RGBA"


def test_emoji_categories(fake_modules, tmp_path):
    out = tmp_path / "raw"
    records = materialise(emoji_cfg(fake_modules, "builtin:emoji-categories"), out)
    assert by_id(records) == {
        "emoji:1f600": ("Smileys & Emotion/face-smiling",),
        "emoji:2764-fe0f": ("Smileys & Emotion/heart",),
        "emoji:1f44d": ("People & Body/hand-fingers-closed",),
        "emoji:1f44b": ("People & Body/hand-fingers-open",),
        "emoji:1fae8": ("Smileys & Emotion/face-neutral-skeptical",),  # no tags needed; "/" in a level replaced
        "emoji:1f4a9": ("Smileys & Emotion/face-costume",),
    }
    assert all(r.labels[0].count(PATH_SEP) == 1 for r in records)
    check_files(records, out)


def test_emoji_missing_node_modules(tmp_path):
    missing = tmp_path / "node_modules"
    for source in ("builtin:emoji-tags", "builtin:emoji-categories"):
        with pytest.raises(DataError, match=rf"{missing} .*is not a folder.*bash scripts/setup\.sh"):
            materialise(emoji_cfg(missing, source), tmp_path / "raw")


@pytest.mark.parametrize(
    ("removed", "source"),
    [
        (emoji.EMOJI_JSON, "builtin:emoji-categories"),
        (emoji.EMOJI_JSON, "builtin:emoji-tags"),
        (emoji.OPENMOJI_CSV, "builtin:emoji-tags"),
    ],
)
def test_emoji_missing_package_file(fake_modules, tmp_path, removed, source):
    (fake_modules / removed).unlink()
    with pytest.raises(DataError, match=rf"{fake_modules / removed} not found.*bash scripts/setup\.sh"):
        materialise(emoji_cfg(fake_modules, source), tmp_path / "raw")


def test_emoji_categories_do_not_need_openmoji(fake_modules, tmp_path):
    (fake_modules / emoji.OPENMOJI_CSV).unlink()
    assert len(materialise(emoji_cfg(fake_modules, "builtin:emoji-categories"), tmp_path / "raw")) == 6


def test_emoji_bad_files_are_named(fake_modules, tmp_path):
    (fake_modules / emoji.EMOJI_JSON).write_text('{"not": "a list"', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{fake_modules / emoji.EMOJI_JSON}: not an emoji-datasource"):
        materialise(emoji_cfg(fake_modules, "builtin:emoji-categories"), tmp_path / "raw")
    make_node_modules(tmp_path / "other")
    (tmp_path / "other" / emoji.OPENMOJI_CSV).write_text("emoji,code,labels\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"openmoji\.csv: missing column\(s\) \['hexcode', 'tags'\]"):
        materialise(emoji_cfg(tmp_path / "other"), tmp_path / "raw")


# --------------------------------------------------------------------------- emoji: the real npm packages


def test_emoji_real_packages(tmp_path, monkeypatch):
    """The pinned npm packages as scripts/setup.sh installs them, through conf/data/emoji_*.yaml."""
    if not (NODE_MODULES / emoji.EMOJI_JSON).is_file() or not (NODE_MODULES / emoji.OPENMOJI_CSV).is_file():
        pytest.fail(f"{NODE_MODULES} lacks the emoji npm packages: run `bash scripts/setup.sh` (it runs `npm ci`)")
    pins = json.loads((REPO / "package.json").read_text())["dependencies"]
    for package, version in pins.items():
        installed = json.loads((NODE_MODULES / package / "package.json").read_text())["version"]
        assert installed == version, f"{package} {installed} installed, {version} pinned: run `npm ci`"
    monkeypatch.chdir(REPO)  # builtin_dir "node_modules" is relative to the project root
    tags = materialise(compose(["data=emoji_tags"]), tmp_path / "tags")
    categories = materialise(compose(["data=emoji_categories"]), tmp_path / "categories")

    assert len(categories) == 1906 and len(tags) == 1906  # every base emoji matches an openmoji row
    check_files(tags[::25], tmp_path / "tags")
    tag_counts = Counter(tag for rec in tags for tag in rec.labels)
    assert len(tag_counts) == 3587
    assert tag_counts.most_common(3) == [("flag", 274), ("face", 162), ("animal", 122)]
    assert {"grin", "smile", "face"} <= set(by_id(tags)["emoji:1f600"])
    assert by_id(tags)["emoji:2764-fe0f"]  # joined without FE0F

    paths = Counter(rec.labels[0] for rec in categories)
    assert len(paths) == 98
    assert len({p.split(PATH_SEP)[0] for p in paths}) == 9
    assert not any(p.startswith("Component/") for p in paths)
    assert by_id(categories)["emoji:1f600"] == ("Smileys & Emotion/face-smiling",)
    assert {image_of(tmp_path / "categories", r).size for r in categories[::25]} == {(64, 64)}
