"""Check and normalise the labels of ingested records for the configured task.

Runs in ingest, right after a source is read, so a bad label is reported with the row or
file it came from (``Record.source_id``):

- binary / multiclass / hierarchical take exactly one label per image;
- multilabel rows may be empty only with ``task.allow_empty``; ``data.max_labels`` keeps the
  most frequent labels (rows left with none are dropped unless empty rows are allowed);
- hierarchical labels are paths ``a/b/c``; with ``task.taxonomy`` each must be in the tree
  (a unique leaf name is resolved to its path).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

from omegaconf import DictConfig

from taxonomist.data.manifest import PATH_SEP, Record
from taxonomist.data.sources import SourceError
from taxonomist.data.sources.common import report_problems
from taxonomist.tasks.taxonomy import LabelResolver, TaxonomyError, load_taxonomy

log = logging.getLogger(__name__)


def check_records(records: list[Record], cfg: DictConfig) -> list[Record]:
    """Return the records with labels checked (and resolved) for ``cfg.task``; raise
    :class:`SourceError` naming the offending rows."""
    task = str(cfg.task.name)
    if task == "multilabel":
        return _check_multilabel(records, cfg)
    counts = [f"{r.source_id}: {len(r.labels)} labels {list(r.labels)}" for r in records if len(r.labels) != 1]
    report_problems(f"images do not have exactly one label, as task {task} needs (use task=multilabel)", counts)
    if task == "hierarchical":
        records = _check_hierarchy(records, cfg)
    classes = {r.labels[0] for r in records}
    if task == "binary" and len(classes) != 2:
        raise SourceError(f"task binary needs exactly 2 classes, the data has {len(classes)}: {sorted(classes)[:10]}")
    if len(classes) < 2:
        raise SourceError(f"classification needs at least 2 classes, the data has {sorted(classes)}")
    if task == "binary" and cfg.task.positive_label is not None and str(cfg.task.positive_label) not in classes:
        raise SourceError(
            f"task.positive_label={cfg.task.positive_label!r} is not one of the classes {sorted(classes)}"
        )
    return records


def _check_multilabel(records: list[Record], cfg: DictConfig) -> list[Record]:
    allow_empty = bool(cfg.task.allow_empty)
    if not allow_empty:
        empty = [f"{r.source_id}: no labels" for r in records if not r.labels]
        report_problems("multi-label images have no labels (set task.allow_empty=true if they are negatives)", empty)
    records = [replace(r, labels=tuple(sorted(set(r.labels)))) for r in records]
    max_labels = int(cfg.data.max_labels)
    if max_labels > 0:
        freq = Counter(lbl for r in records for lbl in r.labels)
        keep = {lbl for lbl, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:max_labels]}
        filtered = [replace(r, labels=tuple(lbl for lbl in r.labels if lbl in keep)) for r in records]
        emptied = sum(1 for old, new in zip(records, filtered, strict=True) if old.labels and not new.labels)
        if not allow_empty:
            filtered = [r for r in filtered if r.labels]
        log.info(
            "data.max_labels=%d: kept %d of %d labels; %d images lost all their labels (%s)",
            max_labels,
            len(keep),
            len(freq),
            emptied,
            "kept as negatives" if allow_empty else "dropped",
        )
        records = filtered
    if len({lbl for r in records for lbl in r.labels}) < 2:
        raise SourceError("multi-label classification needs at least 2 labels in the data")
    return records


def _check_hierarchy(records: list[Record], cfg: DictConfig) -> list[Record]:
    bad = [
        f"{r.source_id}: label path {r.labels[0]!r} has an empty level"
        for r in records
        if any(not part.strip() for part in r.labels[0].split(PATH_SEP))
    ]
    report_problems("label paths have an empty level", bad)
    if cfg.task.taxonomy is None:
        return records
    try:
        nodes = load_taxonomy(str(cfg.task.taxonomy))
    except TaxonomyError as err:
        raise SourceError(str(err)) from None
    resolver = LabelResolver(nodes, str(cfg.task.taxonomy))
    out, problems = [], []
    for r in records:
        try:
            out.append(replace(r, labels=(resolver.resolve(r.labels[0], r.source_id),)))
        except TaxonomyError as err:
            problems.append(str(err))
    report_problems("labels are not in the taxonomy", problems)
    return out
