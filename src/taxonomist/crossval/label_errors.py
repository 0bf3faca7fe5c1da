"""``taxonomist label-errors``: likely mislabelled training images, by confident learning.

Reads the out-of-fold probabilities ``taxonomist cv`` kept (``reports/cv/oof.npz``: every
training-pool image was predicted by a model that never saw it) and runs cleanlab's
``find_label_issues`` (``label_errors.filter_by``, default ``prune_by_noise_rate``: per-class
confidence thresholds estimate the joint distribution of given and true labels, and the
images that estimate says are most likely wrong are flagged) ranked by
``label_errors.rank_by`` (default the self-confidence: the out-of-fold probability of the
given label, lowest first).

Outputs in ``reports/label_errors/``: ``label_errors.csv`` (rank, path in ``data/raw``, sha256, source id, split, fold,
given label, suggested label = the most probable class, self-confidence, the suggested
label's probability, cleanlab's label quality score), ``label_errors.png`` (the top
``label_errors.examples`` images, given vs suggested label) and ``summary.json``; all logged to
the cross-validation's parent MLflow run under ``label_errors/``, with the metrics
``label_errors/count`` and ``label_errors/share``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from taxonomist.crossval.run import CV_DIR, OOF_FILE, STATE_FILE
from taxonomist.errors import DataError, missing_input, stale_input
from taxonomist.files import atomic_directory, atomic_write_json, atomic_write_text, read_json, read_text_csv
from taxonomist.stages.paths import PROCESSED_DIR

log = logging.getLogger(__name__)
LABEL_ERRORS_DIR = Path("reports/label_errors")
TABLE_FILE = "label_errors.csv"
GRID_FILE = "label_errors.png"


def read_oof(path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``oof.npz``, checked: probabilities (N, K) whose rows sum to 1, given labels in range."""
    if not path.is_file():
        raise missing_input(path, "cv")
    with np.load(path, allow_pickle=False) as data:
        oof = {k: data[k] for k in data.files}
    probs, given = oof["probs"], oof["given"]
    if probs.ndim != 2 or len(probs) != len(given) or len(given) == 0:
        raise stale_input(f"{path}: probabilities {probs.shape} do not match {len(given)} given labels", "cv")
    if given.min() < 0 or given.max() >= probs.shape[1] or not np.allclose(probs.sum(1), 1.0, atol=1e-3):
        raise stale_input(f"{path}: labels out of range or probability rows that do not sum to 1", "cv")
    return oof


def find_label_errors(
    given: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate", rank_by: str = "self_confidence"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the likely label errors, most likely first, and every image's label quality
    score (cleanlab ``find_label_issues`` and ``get_label_quality_scores``)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    given = np.asarray(given, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    present = np.unique(given)
    if len(present) < 2:
        raise DataError(f"label errors need at least 2 classes among the given labels; there is {len(present)}")
    ranked = find_label_issues(
        labels=given, pred_probs=probs, filter_by=filter_by, return_indices_ranked_by=rank_by, n_jobs=1
    )
    quality = get_label_quality_scores(given, probs, method=rank_by)
    return np.asarray(ranked, dtype=np.int64), np.asarray(quality, dtype=np.float64)


def ranking_table(oof: dict[str, np.ndarray], ranked: np.ndarray, quality: np.ndarray) -> pd.DataFrame:
    """One row per flagged image, in rank order."""
    classes = [str(c) for c in oof["classes"]]
    probs, given = oof["probs"], oof["given"]
    suggested = probs.argmax(1)
    idx = np.asarray(ranked, dtype=np.int64)
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(idx) + 1),
            "path": oof["path"][idx],
            "sha256": oof["sha256"][idx],
            "source_id": oof["source_id"][idx],
            "split": oof["split"][idx],
            "fold": oof["fold"][idx],
            "given": [classes[g] for g in given[idx]],
            "suggested": [classes[s] for s in suggested[idx]],
            "self_confidence": probs[idx, given[idx]].round(6),
            "suggested_confidence": probs[idx, suggested[idx]].round(6),
            "quality": quality[idx].round(6),
            "pool_index": idx,
        }
    )


def grid_images(processed_dir: Path, table: pd.DataFrame, oof: dict[str, np.ndarray]) -> np.ndarray | None:
    """The flagged images from ``processed_dir`` (by split and row), or None (with a warning)
    when the processed data is not the one cross-validated."""
    from taxonomist.data.cache import read_split

    splits_file = processed_dir / "splits.csv"
    if not splits_file.is_file():
        log.warning("label errors: %s not found: no image grid", splits_file)
        return None
    frame = read_text_csv(splits_file)
    paths = {s: frame.loc[frame["split"] == s, "path"].to_numpy() for s in ("train", "val")}
    idx = table["pool_index"].to_numpy()
    images = []
    arrays: dict[str, Any] = {}
    for i in idx:
        split, row = str(oof["split"][i]), int(oof["row"][i])
        if row >= len(paths.get(split, [])) or paths[split][row] != oof["path"][i]:
            log.warning("label errors: %s changed since `taxonomist cv` ran: no image grid", processed_dir)
            return None
        if split not in arrays:
            arrays[split] = read_split(processed_dir, split).images
        images.append(np.asarray(arrays[split][row]))
    return np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)


def run(
    cfg: DictConfig,
    cv_dir: Path = CV_DIR,
    processed_dir: Path = PROCESSED_DIR,
    out_dir: Path = LABEL_ERRORS_DIR,
) -> dict[str, Any]:
    """Rank the likely label errors of the training pool; write ``out_dir``; log to the cv parent run."""
    from taxonomist.evaluation.plots import plot_image_grid

    cv_dir, processed_dir, out_dir = Path(cv_dir), Path(processed_dir), Path(out_dir)
    oof = read_oof(cv_dir / OOF_FILE)
    settings = cfg.label_errors
    ranked, quality = find_label_errors(oof["given"], oof["probs"], str(settings.filter_by), str(settings.rank_by))
    table = ranking_table(oof, ranked, quality)
    n = len(oof["given"])
    summary: dict[str, Any] = {
        "images": n,
        "flagged": len(table),
        "share": round(len(table) / n, 6),
        "filter_by": str(settings.filter_by),
        "rank_by": str(settings.rank_by),
        "per_given_class": {str(k): int(v) for k, v in table["given"].value_counts().sort_index().items()},
    }
    examples = int(settings.examples)
    with atomic_directory(out_dir) as tmp:
        atomic_write_text(tmp / TABLE_FILE, table.drop(columns=["pool_index"]).to_csv(index=False))
        if examples > 0:
            top = table.head(examples)
            images = grid_images(processed_dir, top, oof)
            if images is not None:
                titles = [
                    f"#{r.rank} given: {r.given}\nsuggested: {r.suggested} ({r.suggested_confidence:.0%})"
                    for r in top.itertuples()
                ]
                plot_image_grid(
                    images,
                    titles,
                    tmp / GRID_FILE,
                    f"Likely label errors ({len(table)} of {n} training images; top {len(top)})",
                    empty="no label errors found",
                )
        atomic_write_json(tmp / "summary.json", summary)
    log.info(
        "label errors: %d of %d training-pool images flagged (%.1f%%): %s",
        len(table),
        n,
        100 * summary["share"],
        out_dir / TABLE_FILE,
    )
    log_to_cv_run(cfg, cv_dir, out_dir, summary)
    return summary


def log_to_cv_run(cfg: DictConfig, cv_dir: Path, out_dir: Path, summary: dict[str, Any]) -> None:
    """The metrics and files, to the cross-validation's parent run (a warning when it is gone)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from taxonomist.tracking import runs

    state_file = cv_dir / STATE_FILE
    if not state_file.is_file():
        log.warning("label errors: %s not found: not logged to MLflow", state_file)
        return
    run_id = str(read_json(state_file)["parent_run_id"])
    runs.setup(cfg)
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
    except MlflowException:
        log.warning("label errors: the cv run %s is not in the tracking store: not logged to MLflow", run_id)
        return
    runs.log_run_metrics(run_id, {"label_errors/count": summary["flagged"], "label_errors/share": summary["share"]})
    client.log_artifacts(run_id, str(out_dir), artifact_path="label_errors")
