"""Classify many images with a packaged model, in batches, into a file a rerun resumes.

Each batch is read (:class:`~taxonomist.predict.inputs.ImageReader`), split into requests
that keep within the model's own limits (:class:`~taxonomist.export.serving.Limits`) and
classified by the served model itself, so a file gets the same answer here as from
``mlflow models serve``. A file that cannot be read or decoded gets a row with an ``error``
and no answer; the run goes on.

Rows: ``path`` (the input's key), the task's answer columns (e.g. ``label`` and ``score``),
``top1_label``, ``top1_prob`` ... up to ``top_k``, the ``prob_<name>`` columns when asked
for, and ``error`` (empty when the image was classified).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from taxonomist.export.serving import ERROR_COLUMN, IMAGE_COLUMN, ImageClassifierModel
from taxonomist.predict.inputs import ImageReader
from taxonomist.predict.outputs import KEY, ResultWriter

log = logging.getLogger(__name__)
PROB_PREFIX = "prob_"


def requests(
    positions: Sequence[int], datas: Sequence[bytes], max_images: int, max_bytes: float
) -> Iterator[tuple[list[int], list[bytes]]]:
    """Consecutive groups of ``datas`` (with their ``positions``) of at most ``max_images``
    images and ``max_bytes`` bytes (a single larger image is a group of its own)."""
    group: list[int] = []
    size = 0
    for k, data in enumerate(datas):
        if group and (len(group) >= max_images or size + len(data) > max_bytes):
            yield [positions[i] for i in group], [datas[i] for i in group]
            group, size = [], 0
        group.append(k)
        size += len(data)
    if group:
        yield [positions[i] for i in group], [datas[i] for i in group]


def add_top_k(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """``top<i>_label`` and ``top<i>_prob`` (i = 1..k) from the ``prob_<name>`` columns;
    empty in rows without probabilities (an error)."""
    probs = [c for c in frame.columns if c.startswith(PROB_PREFIX)]
    k = min(k, len(probs))
    if k <= 0:
        return frame
    names = np.array([c[len(PROB_PREFIX) :] for c in probs], dtype=object)
    values = frame[probs].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    answered = ~np.isnan(values).all(axis=1)
    order = np.argsort(-np.nan_to_num(values, nan=-1.0), axis=1, kind="stable")[:, :k]
    top = {}
    for i in range(k):
        labels = names[order[:, i]]
        chosen = np.take_along_axis(values, order[:, i : i + 1], axis=1)[:, 0]
        top[f"top{i + 1}_label"] = np.where(answered, labels, None)
        top[f"top{i + 1}_prob"] = np.where(answered, np.round(chosen, 6), np.nan)
    return pd.concat([frame, pd.DataFrame(top, index=frame.index)], axis=1)


def classify_batch(
    model: ImageClassifierModel, reader: ImageReader, keys: Sequence[str], top_k: int = 3, probs: bool = False
) -> pd.DataFrame:
    """The result rows of ``keys`` (see the module docstring), in order."""
    positions: list[int] = []
    datas: list[bytes] = []
    unread: dict[int, str] = {}
    for k, key in enumerate(keys):
        try:
            datas.append(reader.read(key))
            positions.append(k)
        except (OSError, KeyError) as err:  # KeyError: an archive member that is not there
            unread[k] = f"cannot read: {err}"
    limits = model.limits
    parts = [
        model.predict(None, pd.DataFrame({IMAGE_COLUMN: group})).set_axis(where)
        for where, group in requests(positions, datas, limits.max_images, limits.max_request_mb * 1e6)
    ]
    if unread:
        parts.append(pd.DataFrame({ERROR_COLUMN: list(unread.values())}, index=list(unread)))
    frame = pd.concat([p for p in parts if len(p)]).sort_index() if any(len(p) for p in parts) else pd.DataFrame()
    frame = frame.reindex(columns=model.columns())
    frame[ERROR_COLUMN] = frame[ERROR_COLUMN].fillna("")
    frame.insert(0, KEY, list(keys))
    frame = add_top_k(frame, top_k)
    columns = [c for c in frame.columns if c != ERROR_COLUMN and (probs or not c.startswith(PROB_PREFIX))]
    return frame[[*columns, ERROR_COLUMN]].reset_index(drop=True)


def batches(keys: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    """``keys`` in consecutive slices of ``size``."""
    for start in range(0, len(keys), size):
        yield keys[start : start + size]


def predict_to_file(
    model: ImageClassifierModel,
    identity: dict[str, str],
    keys: Sequence[str],
    output: Path,
    fmt: str,
    batch_size: int = 64,
    top_k: int = 3,
    probs: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Classify ``keys`` into ``output`` (resuming it when it holds some already); return the
    run's summary (also in ``<output>.run.json``)."""
    writer = ResultWriter(output, fmt, identity, overwrite=overwrite)
    todo = [key for key in keys if key not in writer.done]
    if writer.done:
        log.info("%s: %d of %d image(s) already classified; resuming", output, len(keys) - len(todo), len(keys))
    started = time.perf_counter()
    errors = 0
    with (
        ImageReader(max_bytes=int(model.limits.max_request_mb * 1e6)) as reader,
        tqdm(total=len(keys), initial=len(keys) - len(todo), desc="predict", unit="img", mininterval=1) as bar,
    ):
        for batch in batches(todo, max(1, batch_size)):
            rows = classify_batch(model, reader, batch, top_k, probs)
            writer.write(rows)
            errors += int((rows[ERROR_COLUMN] != "").sum())
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    summary = {
        "images": len(keys),
        "classified_now": len(todo),
        "resumed_from": len(keys) - len(todo),
        "errors_now": errors,
        "seconds": round(seconds, 2),
        "images_per_second": round(len(todo) / seconds, 1) if todo and seconds > 0 else None,
    }
    writer.finish(summary)
    return summary
