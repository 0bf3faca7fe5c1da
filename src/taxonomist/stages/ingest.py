"""Ingest: materialise ``data.source`` as image files + manifest under ``data/raw``.

Labels are checked against the task as they are read (see :mod:`taxonomist.data.labels`).

The new folder is built beside the old one and swapped in only on success, so a failed
ingest leaves what was already ingested untouched.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from taxonomist.data.labels import check_records
from taxonomist.data.manifest import write_manifest
from taxonomist.data.sources import materialise
from taxonomist.files import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)
RAW_DIR = Path("data/raw")


def run(cfg: DictConfig, out_dir: Path = RAW_DIR) -> dict:
    """Ingest the configured source; return a summary (also written to ``ingest.json``)."""
    with atomic_directory(out_dir) as tmp:
        read = materialise(cfg, tmp)
        records = check_records(read, cfg)
        kept = {r.path for r in records}
        for r in read:  # images the label check dropped do not stay in data/raw
            if r.path not in kept:
                (tmp / r.path).unlink(missing_ok=True)
        write_manifest(records, tmp)
        per_class = Counter(label for r in records for label in r.labels)
        per_split = Counter(r.split or "unassigned" for r in records)
        summary = {
            "source": str(cfg.data.source),
            "task": str(cfg.task.name),
            "images": len(records),
            "classes": len(per_class),
            "per_class": dict(sorted(per_class.items())),
            "per_split": dict(sorted(per_split.items())),
        }
        atomic_write_json(tmp / "ingest.json", summary)
    log.info("ingested %d images in %d classes from %s", len(records), len(per_class), cfg.data.source)
    return summary
