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
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from taxonomist.data import auto, health
from taxonomist.data.cache import write_labels, write_split
from taxonomist.data.images import PHASH_SIZE, ImageSpec, InvalidImage, decode, image_facts, phashes
from taxonomist.data.manifest import COLUMNS, SPLITS, RawImages, read_manifest, split_labels
from taxonomist.data.split import assign_splits, group_keys
from taxonomist.errors import DataError
from taxonomist.files import atomic_directory, atomic_write_json, atomic_write_text
from taxonomist.stages.paths import PROCESSED_DIR, RAW_DIR, health_dir_for
from taxonomist.tasks import task_of

log = logging.getLogger(__name__)
# What :func:`inspect` learns about each image (besides its perceptual hash), with its dtype.
FACTS = {"width": "int64", "height": "int64", "mode": "str", "gray": "bool", "blank": "bool"}


def deduplicate(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop exact duplicates by content hash; return (kept, dropped-with-reason).

    Copies with one label keep a single row (a test copy wins, so the test split is not
    shrunk); copies with conflicting labels are all dropped, since neither label can be trusted.
    """
    order = frame.assign(_rank=(frame["split"] != "test").astype(int)).sort_values(["sha256", "_rank"], kind="stable")
    labels_per_hash = order.groupby("sha256")["label"].nunique()
    conflicting = set(labels_per_hash[labels_per_hash > 1].index)
    is_conflict = order["sha256"].isin(conflicting)
    is_repeat = order.duplicated("sha256", keep="first") & ~is_conflict
    first_of = order.drop_duplicates("sha256").set_index("sha256")["path"]
    dropped = order[is_conflict | is_repeat].copy()
    dropped["reason"] = np.where(
        dropped["sha256"].isin(conflicting), "conflicting labels for identical images", "duplicate"
    )
    dropped["duplicate_of"] = dropped["sha256"].map(first_of)
    dropped.loc[dropped["reason"] != "duplicate", "duplicate_of"] = ""
    kept = order[~(is_conflict | is_repeat)].drop(columns="_rank").sort_index()
    return kept, dropped.drop(columns="_rank")


def inspect(manifest: pd.DataFrame, raw_dir: Path) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Look at every image once: the valid rows with their facts (size, mode, gray, blank,
    perceptual hash) and the quarantined ones (with the reason)."""
    facts: list[dict[str, object] | None] = []
    thumbnails: list[np.ndarray] = []
    problems: list[dict[str, str]] = []
    with RawImages(raw_dir) as images:
        rows = tqdm(manifest.itertuples(), total=len(manifest), desc="inspect", unit="img", mininterval=1)
        for row in rows:
            try:  # a missing image is quarantined too (the reason names it)
                row_facts, thumbnail = image_facts(images.read(row.path))
            except (InvalidImage, OSError) as err:
                facts.append(None)
                problems.append(
                    {"path": row.path, "labels": row.labels, "source_id": row.source_id, "reason": str(err)}
                )
                log.warning("quarantined %s: %s", row.path, err)
                continue
            facts.append(row_facts)
            thumbnails.append(thumbnail)
    ok = np.array([f is not None for f in facts], dtype=bool)
    valid = manifest[ok].copy()
    table = pd.DataFrame([f for f in facts if f is not None], index=valid.index, columns=list(FACTS))
    valid = valid.join(table.astype(FACTS))
    valid["phash"] = phashes(np.stack(thumbnails)) if thumbnails else []
    # pHash scales an image to 32x32: below that it compares outlines (a sneaker and a boot
    # alike), so small images are left out of the near-duplicate search.
    small = np.minimum(valid["width"], valid["height"]) < PHASH_SIZE
    valid.loc[small, "phash"] = ""
    return valid, problems


def decode_all(frame: pd.DataFrame, raw_dir: Path, spec: ImageSpec) -> np.ndarray:
    """The rows' images at ``spec``, as one (N, size, size, channels) uint8 array."""
    out = np.zeros((len(frame), spec.size, spec.size, spec.channels), np.uint8)
    with RawImages(raw_dir) as images:
        rows = tqdm(frame["path"], total=len(frame), desc=f"decode {spec.size}px", unit="img", mininterval=1)
        for i, path in enumerate(rows):
            out[i] = decode(images.read(path), spec)
    return out


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
    health_dir = health_dir or health_dir_for(out_dir)
    pre = cfg.preprocess
    task = task_of(cfg)
    manifest = read_manifest(raw_dir)
    check_class_names(manifest["labels"])
    manifest["label"] = manifest["labels"]  # the key for duplicate checks: the whole label set
    valid, problems = inspect(manifest, raw_dir)

    kept, dropped = deduplicate(valid)
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
    space = task.from_labels(split_frame["labels"], cfg.task)
    quarantined = pd.DataFrame(problems, columns=["path", "labels", "source_id", "reason"])
    report_health = health.analyse(
        split_frame, dropped, quarantined, int(pre.near_duplicate_distance), str(pre.near_duplicates)
    )
    if report_health.drop:
        split_frame = split_frame[~split_frame["path"].isin(report_health.drop)]

    choice = auto.choose(cfg, split_frame[split_frame["split"] == "train"])
    chosen = choice.preprocess
    spec = ImageSpec(size=chosen["image_size"], channels=chosen["channels"], resize_mode=chosen["resize_mode"])
    pixels = decode_all(split_frame, raw_dir, spec)
    in_split = {split: (split_frame["split"] == split).to_numpy() for split in SPLITS}
    auto.add_normalisation(choice, cfg, pixels[in_split["train"]])
    for line in auto.describe(choice.to_dict()):
        log.info("auto: %s", line)

    with atomic_directory(out_dir) as tmp:
        counts: dict[str, dict[str, int]] = {}
        sizes: dict[str, int] = {}
        for split in SPLITS:
            part = split_frame[in_split[split]]
            write_split(tmp, split, pixels[in_split[split]], space.encode(part["labels"]))
            sizes[split] = len(part)
            per_label = part["labels"].map(split_labels).explode().dropna()
            counts[split] = {c: int(n) for c, n in per_label.value_counts().sort_index().items()}
        write_labels(tmp, space)
        atomic_write_text(tmp / "splits.csv", split_frame[list(COLUMNS)].to_csv(index=False))
        atomic_write_text(tmp / "duplicates.csv", dropped[[*COLUMNS, "reason", "duplicate_of"]].to_csv(index=False))
        atomic_write_text(
            tmp / "quarantine.csv",
            pd.DataFrame(problems, columns=["path", "labels", "source_id", "reason"]).to_csv(index=False),
        )
        report = {
            "images_in": len(manifest),
            "quarantined": len(problems),
            "duplicates_dropped": int((dropped["reason"] == "duplicate").sum()),
            "conflicting_dropped": int((dropped["reason"] != "duplicate").sum()),
            "images_out": len(split_frame),
            "task": task.name,
            "classes": space.classes,
            "image_shape": [spec.size, spec.size, spec.channels],
            "settings": choice.to_dict(),
            "health": report_health.summary,
            "per_split": sizes,  # images; per_split_per_class counts labels (several per multi-label image)
            "per_split_per_class": counts,
        }
        atomic_write_json(tmp / "report.json", report)
    row_of = {path: i for i, path in enumerate(split_frame["path"])}
    report_health.write(health_dir, thumbnail=lambda path: pixels[row_of[path]] if path in row_of else None)
    log.info("data health report: %s (%d warning(s))", health_dir / "health.md", len(report_health.warnings))
    log.info(
        "preprocess: %d in, %d quarantined, %d duplicates dropped, %s",
        len(manifest),
        len(problems),
        len(dropped),
        report["per_split"],
    )
    return report
