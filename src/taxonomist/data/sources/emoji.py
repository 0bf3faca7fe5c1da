"""Colour emoji (Google's 64x64 PNGs) as a multi-label set (keyword tags) or a hierarchical one.

Both come from npm packages pinned in the repo's ``package.json`` and installed by
``scripts/setup.sh`` into ``node_modules`` (``data.builtin_dir``):

* ``emoji-datasource-google``: ``emoji.json`` (one entry per emoji: ``unified`` hexcode,
  ``image``, ``category``, ``subcategory``, ``has_img_google``, ...) and ``img/google/64/``.
* ``openmoji``: ``data/openmoji.csv`` (``hexcode``, ``tags``, ``openmoji_tags``, ...).

Which emoji are used: only the top-level entries of ``emoji.json`` (each entry's
``skin_variations`` are skipped: they are the same picture in another skin tone, so they
would be near-duplicates across splits), only those with ``has_img_google`` and an existing
PNG, and not the ``Component`` category: its five entries are the skin-tone modifiers, drawn
as plain colour swatches, not pictures of anything.

The join: both files spell an emoji as code points in hex joined by ``-``, but emoji.json
uses the fully-qualified sequence (``2764-FE0F``) where openmoji sometimes does not, and case
may differ. :func:`normalise_hexcode` upper-cases and drops the variation selectors FE0E/FE0F,
which only choose text or emoji presentation; every base emoji of emoji-datasource-google
16.0.0 then matches exactly one openmoji 17.0.0 row.

Tags: openmoji's ``tags`` column (the Unicode CLDR keywords) is used; ``openmoji_tags`` is
not: those are free-form phrases that only about 40% of the emoji have, so using them would
make a missing tag mean "not tagged by a contributor" rather than "does not apply".
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from taxonomist.data.manifest import LABEL_SEP, PATH_SEP, Record
from taxonomist.data.sources import SourceError
from taxonomist.data.sources.builtin import write_record

log = logging.getLogger(__name__)

EMOJI_JSON = Path("emoji-datasource-google", "emoji.json")
IMAGE_DIR = Path("emoji-datasource-google", "img", "google", "64")
OPENMOJI_CSV = Path("openmoji", "data", "openmoji.csv")
SKIPPED_CATEGORIES = frozenset({"Component"})
VARIATION_SELECTORS = frozenset({"FE0E", "FE0F"})
HOW_TO_GET = (
    "run `bash scripts/setup.sh`, which installs the npm packages pinned in package.json into node_modules "
    "(or run `npm ci` in the project root), and point data.builtin_dir at that node_modules folder"
)


@dataclass(frozen=True)
class Emoji:
    """One base emoji of emoji.json with a Google image."""

    unified: str  # the hexcode as emoji.json spells it, e.g. "1F600" or "2764-FE0F"
    category: str
    subcategory: str
    image: Path  # the PNG file


def normalise_hexcode(code: str) -> str:
    """The join key of a hexcode: upper case, without variation selectors (``2764-fe0f`` -> ``2764``)."""
    parts = [part.strip().upper() for part in code.split("-")]
    return "-".join(part for part in parts if part and part not in VARIATION_SELECTORS)


def clean_label(text: str) -> str:
    """``text`` stripped, usable as one label or one hierarchy level: "/" and "|" become "-"."""
    return text.strip().replace(PATH_SEP, "-").replace(LABEL_SEP, "-")


def parse_tags(text: str) -> tuple[str, ...]:
    """openmoji's comma-separated tags, stripped, lower-cased, without empties and duplicates (in order)."""
    tags = (clean_label(tag).lower() for tag in text.split(","))
    return tuple(dict.fromkeys(tag for tag in tags if tag))


def _require(path: Path) -> Path:
    if not path.is_file():
        raise SourceError(f"{path} not found: {HOW_TO_GET}")
    return path


def read_emoji(root: Path) -> list[Emoji]:
    """The base emoji of ``root/emoji-datasource-google`` that have a Google PNG (see the module notes)."""
    path = _require(root / EMOJI_JSON)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        emoji, no_image = [], 0
        for entry in entries:
            if entry["category"] in SKIPPED_CATEGORIES:
                continue
            image = root / IMAGE_DIR / entry["image"]
            if not entry.get("has_img_google") or not image.is_file():
                no_image += 1
                continue
            emoji.append(Emoji(entry["unified"], entry["category"], entry["subcategory"], image))
    except (ValueError, TypeError, KeyError) as err:
        raise SourceError(f"{path}: not an emoji-datasource emoji.json ({err!r}); {HOW_TO_GET}") from None
    if no_image:
        log.info("%s: skipped %d emoji without a Google image", path, no_image)
    if not emoji:
        raise SourceError(f"{path}: no emoji with an image in {root / IMAGE_DIR}; {HOW_TO_GET}")
    return emoji


def read_openmoji_tags(root: Path) -> dict[str, tuple[str, ...]]:
    """Normalised hexcode -> tags of ``root/openmoji/data/openmoji.csv`` (first row wins on a clash)."""
    path = _require(root / OPENMOJI_CSV)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"hexcode", "tags"} - set(reader.fieldnames or ())
        if missing:
            raise SourceError(f"{path}: missing column(s) {sorted(missing)}; {HOW_TO_GET}")
        tags: dict[str, tuple[str, ...]] = {}
        for row in reader:
            tags.setdefault(normalise_hexcode(row["hexcode"]), parse_tags(row["tags"] or ""))
    return tags


def write_emoji(emoji: list[Emoji], labels_of: Callable[[Emoji], tuple[str, ...]], out_dir: Path) -> list[Record]:
    """Copy each emoji's PNG to ``out_dir/images/<hexcode>.png``; source ids ``emoji:<hexcode>``."""
    records = []
    for item in tqdm(emoji, desc="emoji", unit="img", mininterval=1):
        code = item.unified.lower()
        data = item.image.read_bytes()
        records.append(write_record(out_dir, f"images/{code}.png", data, labels_of(item), f"emoji:{code}"))
    return records


def builtin_root(cfg: DictConfig) -> Path:
    """The ``node_modules`` folder named by ``data.builtin_dir``."""
    root = Path(str(cfg.data.builtin_dir)).expanduser()
    if not root.is_dir():
        raise SourceError(f"data.builtin_dir: {root} ({root.absolute()}) is not a folder: {HOW_TO_GET}")
    return root


def materialise_emoji_tags(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Multi-label: each emoji labelled with its openmoji keyword tags (e.g. ``face``, ``smile``).

    Emoji without an openmoji row, or whose row has no tags, are skipped (counted in the log):
    an untagged emoji is unlabelled, not a negative for every tag.
    """
    root = builtin_root(cfg)
    tags = read_openmoji_tags(root)
    emoji = read_emoji(root)
    matched = [item for item in emoji if normalise_hexcode(item.unified) in tags]
    tagged = [item for item in matched if tags[normalise_hexcode(item.unified)]]
    log.info(
        "emoji-tags: %d emoji tagged; skipped %d without an openmoji row in %s and %d with no tags",
        len(tagged),
        len(emoji) - len(matched),
        root / OPENMOJI_CSV,
        len(matched) - len(tagged),
    )
    if not tagged:
        raise SourceError(f"no emoji of {root / EMOJI_JSON} has tags in {root / OPENMOJI_CSV}; {HOW_TO_GET}")
    return write_emoji(tagged, lambda item: tags[normalise_hexcode(item.unified)], out_dir)


def materialise_emoji_categories(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Hierarchical: each emoji labelled ``<category>/<subcategory>``, e.g. ``Smileys & Emotion/face-smiling``."""
    emoji = read_emoji(builtin_root(cfg))
    return write_emoji(
        emoji, lambda item: (f"{clean_label(item.category)}{PATH_SEP}{clean_label(item.subcategory)}",), out_dir
    )
