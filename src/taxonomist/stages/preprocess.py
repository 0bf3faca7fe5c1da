"""Preprocess: validate, de-duplicate, split, and cache the ingested images.

The images are read from ``data/raw/images.zip`` (or, in a ``data/raw`` ingested before the
archive existed, from its loose files; see :class:`taxonomist.data.manifest.RawImages`).
Every image is decoded once: images that do not decode are quarantined (listed in
``quarantine.csv`` with the reason), exact duplicates (same content hash) are dropped and
listed in ``duplicates.csv``, the training pool is split (seeded, stratified) into train/val
(and test when the source has none), and each split is written as a uint8 array.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from tqdm import tqdm

from taxonomist.data.cache import write_labels, write_split
from taxonomist.data.images import ImageSpec, InvalidImage, decode
from taxonomist.data.manifest import SPLITS, RawImages, read_manifest, split_labels
from taxonomist.data.split import assign_splits
from taxonomist.files import atomic_directory, atomic_write_json, atomic_write_text
from taxonomist.stages.paths import PROCESSED_DIR, RAW_DIR
from taxonomist.tasks import task_of

log = logging.getLogger(__name__)


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


def run(cfg: DictConfig, raw_dir: Path = RAW_DIR, out_dir: Path = PROCESSED_DIR) -> dict:
    """Run the preprocess stage; return the report (also written to ``report.json``)."""
    pre = cfg.preprocess
    spec = ImageSpec(size=int(pre.image_size), channels=int(pre.channels), resize_mode=str(pre.resize_mode))
    task = task_of(cfg)
    manifest = read_manifest(raw_dir)
    manifest["label"] = manifest["labels"]  # the key for duplicate checks: the whole label set

    pixels: list[np.ndarray | None] = []
    problems: list[dict[str, str]] = []
    with RawImages(raw_dir) as images:
        rows = tqdm(manifest.itertuples(), total=len(manifest), desc="validate+decode", unit="img", mininterval=1)
        for row in rows:
            try:  # a missing image is quarantined too (the reason names it)
                pixels.append(decode(images.read(row.path), spec))
            except (InvalidImage, OSError) as err:
                pixels.append(None)
                problems.append(
                    {"path": row.path, "labels": row.labels, "source_id": row.source_id, "reason": str(err)}
                )
                log.warning("quarantined %s: %s", row.path, err)
    ok = np.array([p is not None for p in pixels])
    valid = manifest[ok].copy()
    valid["_pixel_index"] = np.flatnonzero(ok)

    kept, dropped = deduplicate(valid)
    kept["stratum"] = task.strata(kept["label"], int(pre.min_images_per_class))
    split_frame = assign_splits(
        kept,
        val_fraction=float(pre.val_fraction),
        test_fraction=float(pre.test_fraction),
        seed=int(cfg.seed),
        min_images_per_class=int(pre.min_images_per_class),
        by="stratum",
    )
    space = task.from_labels(split_frame["labels"], cfg.task)

    with atomic_directory(out_dir) as tmp:
        counts: dict[str, dict[str, int]] = {}
        sizes: dict[str, int] = {}
        for split in SPLITS:
            part = split_frame[split_frame["split"] == split]
            images = (
                np.stack([pixels[i] for i in part["_pixel_index"]])
                if len(part)
                else np.zeros((0, spec.size, spec.size, spec.channels), np.uint8)
            )
            write_split(tmp, split, images, space.encode(part["labels"]))
            sizes[split] = len(part)
            per_label = part["labels"].map(split_labels).explode().dropna()
            counts[split] = {c: int(n) for c, n in per_label.value_counts().sort_index().items()}
        write_labels(tmp, space)
        internal = ["_pixel_index", "label", "stratum"]
        atomic_write_text(tmp / "splits.csv", split_frame.drop(columns=internal).to_csv(index=False))
        atomic_write_text(tmp / "duplicates.csv", dropped.drop(columns=["_pixel_index", "label"]).to_csv(index=False))
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
            "per_split": sizes,  # images; per_split_per_class counts labels (several per multi-label image)
            "per_split_per_class": counts,
        }
        atomic_write_json(tmp / "report.json", report)
    log.info(
        "preprocess: %d in, %d quarantined, %d duplicates dropped, %s",
        len(manifest),
        len(problems),
        len(dropped),
        report["per_split"],
    )
    return report
