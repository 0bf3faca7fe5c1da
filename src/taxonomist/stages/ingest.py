"""Ingest: materialise ``data.source`` as ``data/raw``: ``manifest.csv``, ``images.zip``, ``ingest.json``.

Labels are checked against the task as they are read (its ``check_records``): a single-label
task refuses images with several labels (naming ``task=multilabel``) and labels that are paths
of a tree (naming ``task=hierarchical``). When ``data.group_by`` names a column of the source,
the manifest's ``group`` column holds it and ``ingest.json`` counts the groups.
The source is first staged as links to the user's image files (nothing is read yet); the
images the label check keeps are then read once each, hashed and packed into one stored
(uncompressed), deterministic ``images.zip``, and the staged links removed, so DVC tracks a
few files instead of one per image (see :mod:`taxonomist.data.manifest`).

The new folder is built beside the old one and swapped in only on success, so a failed
ingest leaves what was already ingested untouched.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from taxonomist.data.manifest import IMAGES_DIR, pack_images, write_manifest
from taxonomist.data.sources import materialise
from taxonomist.files import atomic_directory, atomic_write_json
from taxonomist.stages.paths import RAW_DIR
from taxonomist.tasks import task_of
from taxonomist.tracking.redact import redact

log = logging.getLogger(__name__)


def run(cfg: DictConfig, out_dir: Path = RAW_DIR) -> dict:
    """Ingest the configured source; return a summary (also written to ``ingest.json``)."""
    with atomic_directory(out_dir) as tmp:
        read = materialise(cfg, tmp)
        records = task_of(cfg).check_records(read, cfg)
        started = time.perf_counter()
        hashes = pack_images(tmp, [r.path for r in records])  # the images the label check dropped are left out
        records = [replace(r, sha256=hashes[r.path]) for r in records]
        write_manifest(records, tmp)
        if (tmp / IMAGES_DIR).exists():  # every source writes its images under images/
            shutil.rmtree(tmp / IMAGES_DIR)
        log.info("packed %d images into images.zip in %.1f s", len(records), time.perf_counter() - started)
        per_class = Counter(label for r in records for label in r.labels)
        per_split = Counter(r.split or "unassigned" for r in records)
        summary = {
            "source": redact(cfg.data.source),  # ingest.json may be pushed to a shared DVC remote
            "task": str(cfg.task.name),
            "images": len(records),
            "classes": len(per_class),
            "per_class": dict(sorted(per_class.items())),
            "per_split": dict(sorted(per_split.items())),
        }
        groups = {r.group for r in records if r.group}
        if groups:  # data.group_by names a column of the source (a regex is applied in preprocess)
            summary["groups"] = len(groups)
        atomic_write_json(tmp / "ingest.json", summary)
    log.info("ingested %d images in %d classes from %s", len(records), len(per_class), redact(cfg.data.source))
    return summary
