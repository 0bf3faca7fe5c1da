"""Colour emoji (Google's 64x64 PNGs) as a multi-label set (keyword tags), a hierarchical one
(category/subcategory), an ordinal one (skin tone) or a multi-attribute one (tone, hand, tags).

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

Skin tones (``emoji-skin-tones``, ``emoji-attributes``): the entries with ``skin_variations``
(people and hands, 323 in emoji-datasource-google 16.0.0). A variation keyed by one Fitzpatrick
modifier (``1F3FB`` .. ``1F3FF``) is one image in that tone; so is a key repeating one modifier
(``1F3FB-1F3FB``: a couple both in that tone, the only variations the seven couple emoji have);
mixed keys (``1F3FB-1F3FC``) are two tones in one picture and are left out. The tone names
(:data:`SKIN_TONES`, ``1-light`` .. ``5-dark``) sort in tone order. An emoji two of whose
pictures are byte-identical (the snowboarder: no skin shows) is left out, since its tone
cannot be seen. No split is assigned, as for the other sets (the five tones of one emoji can
land in different splits: harmless for the tone, optimistic for per-emoji attributes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from taxonomist.data.manifest import LABEL_SEP, PATH_SEP, Record
from taxonomist.data.sources.builtin import write_record
from taxonomist.data.sources.table import attribute_labels
from taxonomist.errors import DataError

log = logging.getLogger(__name__)

EMOJI_JSON = Path("emoji-datasource-google", "emoji.json")
IMAGE_DIR = Path("emoji-datasource-google", "img", "google", "64")
OPENMOJI_CSV = Path("openmoji", "data", "openmoji.csv")
SKIPPED_CATEGORIES = frozenset({"Component"})
VARIATION_SELECTORS = frozenset({"FE0E", "FE0F"})
# Fitzpatrick modifier -> tone name; the names sort in tone order (types 1-2, 3, 4, 5, 6).
SKIN_TONES = {
    "1F3FB": "1-light",
    "1F3FC": "2-medium-light",
    "1F3FD": "3-medium",
    "1F3FE": "4-medium-dark",
    "1F3FF": "5-dark",
}
DEFAULT_TONE = "default"  # emoji-attributes: the base (yellow) picture
HAND_PREFIX = "hand"  # emoji-attributes: hand=yes for subcategories hand-*, hands
ATTRIBUTE_TAGS = 8  # emoji-attributes: keep the 8 most frequent openmoji tags of the set
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


@dataclass(frozen=True)
class ToneImage:
    """One picture of an emoji with skin variations: a skin tone, or the default (yellow) base."""

    base: Emoji  # the emoji.json entry it belongs to
    unified: str  # this picture's hexcode, e.g. "1F44B-1F3FB" (the base's for the default)
    tone: str  # a SKIN_TONES name or DEFAULT_TONE
    image: Path


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
        raise DataError(f"{path} not found: {HOW_TO_GET}")
    return path


def _read_entries(root: Path) -> tuple[Path, list[dict[str, Any]]]:
    path = _require(root / EMOJI_JSON)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: not an emoji-datasource emoji.json ({err!r}); {HOW_TO_GET}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: not an emoji-datasource emoji.json (not a list); {HOW_TO_GET}")
    return path, entries


def read_emoji(root: Path) -> list[Emoji]:
    """The base emoji of ``root/emoji-datasource-google`` that have a Google PNG (see the module notes)."""
    path, entries = _read_entries(root)
    try:
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
        raise DataError(f"{path}: not an emoji-datasource emoji.json ({err!r}); {HOW_TO_GET}") from None
    if no_image:
        log.info("%s: skipped %d emoji without a Google image", path, no_image)
    if not emoji:
        raise DataError(f"{path}: no emoji with an image in {root / IMAGE_DIR}; {HOW_TO_GET}")
    return emoji


def read_openmoji_tags(root: Path) -> dict[str, tuple[str, ...]]:
    """Normalised hexcode -> tags of ``root/openmoji/data/openmoji.csv`` (first row wins on a clash)."""
    path = _require(root / OPENMOJI_CSV)
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"hexcode", "tags"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; {HOW_TO_GET}")
        tags: dict[str, tuple[str, ...]] = {}
        for row in reader:
            tags.setdefault(normalise_hexcode(row["hexcode"]), parse_tags(row["tags"] or ""))
    return tags


def variation_tone(key: str) -> str | None:
    """The tone of a ``skin_variations`` key: ``1F3FB`` .. ``1F3FF``, or one of them repeated
    (``1F3FB-1F3FB``); None for a mixed key (``1F3FB-1F3FC``) or anything else."""
    parts = {part.strip().upper() for part in key.split("-")}
    return SKIN_TONES.get(parts.pop()) if len(parts) == 1 else None


def _has_google_image(entry: dict[str, Any], root: Path) -> Path | None:
    image = root / IMAGE_DIR / entry["image"]
    return image if entry.get("has_img_google") and image.is_file() else None


def read_skin_tones(root: Path, with_default: bool = False) -> list[ToneImage]:
    """One :class:`ToneImage` per single-tone picture of each emoji with skin variations.

    With ``with_default`` each emoji's base (yellow) picture is included too, as tone
    :data:`DEFAULT_TONE`. Pictures without a Google PNG are skipped; so is every picture of an
    emoji two of whose pictures are byte-identical (its tone does not show). See the module notes.
    """
    path, entries = _read_entries(root)
    images: list[ToneImage] = []
    no_image, invisible = 0, []
    try:
        for entry in entries:
            variations = entry.get("skin_variations") or {}
            if not variations or entry["category"] in SKIPPED_CATEGORIES:
                continue
            base = Emoji(entry["unified"], entry["category"], entry["subcategory"], root / IMAGE_DIR / entry["image"])
            pictures = [(entry, DEFAULT_TONE)] if with_default else []
            pictures += [(v, tone) for key, v in variations.items() if (tone := variation_tone(key)) is not None]
            found = []
            for picture, tone in pictures:
                image = _has_google_image(picture, root)
                if image is None:
                    no_image += 1
                else:
                    found.append(ToneImage(base, picture["unified"], tone, image))
            digests = {hashlib.sha256(item.image.read_bytes()).digest() for item in found}
            if len(digests) < len(found):
                invisible.append(entry.get("short_name") or entry["unified"])
                continue
            images.extend(found)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise DataError(f"{path}: not an emoji-datasource emoji.json ({err!r}); {HOW_TO_GET}") from None
    if no_image:
        log.info("%s: skipped %d skin-tone picture(s) without a Google image", path, no_image)
    if invisible:
        log.info("%s: left out %d emoji whose skin tone does not show: %s", path, len(invisible), ", ".join(invisible))
    if not images:
        raise DataError(f"{path}: no emoji with skin-tone pictures in {root / IMAGE_DIR}; {HOW_TO_GET}")
    return images


def write_emoji(
    emoji: Sequence[Emoji | ToneImage], labels_of: Callable[[Any], tuple[str, ...]], out_dir: Path
) -> list[Record]:
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
        raise DataError(f"data.builtin_dir: {root} ({root.absolute()}) is not a folder: {HOW_TO_GET}")
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
        raise DataError(f"no emoji of {root / EMOJI_JSON} has tags in {root / OPENMOJI_CSV}; {HOW_TO_GET}")
    return write_emoji(tagged, lambda item: tags[normalise_hexcode(item.unified)], out_dir)


def materialise_emoji_categories(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Hierarchical: each emoji labelled ``<category>/<subcategory>``, e.g. ``Smileys & Emotion/face-smiling``."""
    emoji = read_emoji(builtin_root(cfg))
    return write_emoji(
        emoji, lambda item: (f"{clean_label(item.category)}{PATH_SEP}{clean_label(item.subcategory)}",), out_dir
    )


def materialise_emoji_skin_tones(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Ordinal: each skin-tone picture of a people/hand emoji labelled with its tone, ``1-light`` .. ``5-dark``."""
    images = read_skin_tones(builtin_root(cfg))
    counts = Counter(item.tone for item in images)
    log.info(
        "emoji-skin-tones: %d pictures (%s)", len(images), ", ".join(f"{t} {n}" for t, n in sorted(counts.items()))
    )
    return write_emoji(images, lambda item: (item.tone,), out_dir)


def is_hand(subcategory: str) -> bool:
    """True for the hand subcategories of emoji.json (``hand-fingers-open``, ..., ``hand-prop``, ``hands``)."""
    return subcategory.startswith(HAND_PREFIX)


def materialise_emoji_attributes(cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Multi-attribute: the people/hand emoji in every skin tone plus their default yellow picture.

    Attributes: ``tone`` (``default`` or a :data:`SKIN_TONES` name), ``hand`` (``yes`` for the
    ``hand*`` subcategories, else ``no``) and ``tags`` (the base emoji's openmoji tags, only the
    :data:`ATTRIBUTE_TAGS` most frequent in this set; a picture may have none of them).
    """
    root = builtin_root(cfg)
    tags = read_openmoji_tags(root)
    images = read_skin_tones(root, with_default=True)
    tags_of = {item.base.unified: tags.get(normalise_hexcode(item.base.unified), ()) for item in images}
    freq = Counter(tag for item in images for tag in tags_of[item.base.unified])
    kept = {tag for tag, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:ATTRIBUTE_TAGS]}
    log.info(
        "emoji-attributes: %d pictures of %d emoji; kept tags %s",
        len(images),
        len(tags_of),
        ", ".join(f"{tag} {freq[tag]}" for tag in sorted(kept, key=lambda t: (-freq[t], t))),
    )

    def labels_of(item: ToneImage) -> tuple[str, ...]:
        values = {
            "tone": [item.tone],
            "hand": ["yes" if is_hand(item.base.subcategory) else "no"],
            "tags": [tag for tag in tags_of[item.base.unified] if tag in kept],
        }
        return attribute_labels(values, f"emoji:{item.unified.lower()}")

    # The six pictures of one emoji share its hand and tags answers: split by emoji, so the test
    # split holds emoji the model never saw in any tone (no leakage through the shape).
    split_of = {item.unified.lower(): emoji_split(item.base.unified) for item in images}
    records = write_emoji(images, labels_of, out_dir)
    return [replace(r, split=split_of[r.source_id.removeprefix("emoji:")]) for r in records]


def emoji_split(unified: str, test: float = 0.2, val: float = 0.15) -> str:
    """A fixed split of an emoji from a hash of its code point: ``test`` and ``val`` fractions."""
    share = int(hashlib.sha256(unified.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if share < test else "val" if share < test + val else "train"
