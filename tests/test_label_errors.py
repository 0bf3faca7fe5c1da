"""Label errors (``taxonomist label-errors``): cleanlab's ranking, and planted flips found end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import make_image_folder
from test_cv import EMBEDDINGS, mlflow_runs, prepared

from taxonomist.crossval.label_errors import find_label_errors
from taxonomist.errors import DataError, StageOrderError


def confident_probs(given: np.ndarray, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Probabilities that put 0.8-0.95 on each image's given class."""
    probs = rng.uniform(0.0, 1.0, (len(given), classes))
    probs[np.arange(len(given)), given] = 0.0
    probs /= probs.sum(1, keepdims=True)
    top = rng.uniform(0.8, 0.95, len(given))
    probs *= (1 - top)[:, None]
    probs[np.arange(len(given)), given] = top
    return probs


def test_planted_errors_are_found_and_ranked_first():
    rng = np.random.default_rng(0)
    given = np.repeat([0, 1, 2], 60)
    probs = confident_probs(given, 3, rng)
    planted = np.asarray([5, 70, 130, 150])
    # the model is surer of another class than of most images' own (above the class's mean confidence, about 0.875)
    for i, confidence in zip(planted, (0.99, 0.98, 0.97, 0.96), strict=True):
        other = (given[i] + 1) % 3
        probs[i] = (1 - confidence) / 2
        probs[i, other] = confidence
    ranked, quality = find_label_errors(given, probs)
    assert set(ranked) == set(planted)
    assert list(ranked) == list(planted)  # lowest self-confidence (probability of the given label) first
    assert quality.shape == (len(given),)
    assert quality[planted].max() < np.delete(quality, planted).min()


def test_clean_labels_give_no_errors():
    rng = np.random.default_rng(1)
    given = np.repeat([0, 1], 50)
    ranked, _ = find_label_errors(given, confident_probs(given, 2, rng))
    assert len(ranked) == 0


def test_one_class_is_refused():
    with pytest.raises(DataError, match="at least 2 classes"):
        find_label_errors(np.zeros(10, dtype=int), np.tile([0.9, 0.1], (10, 1)))


def test_without_cv_outputs_it_names_the_stage_to_run(tmp_path):
    from test_cv import REPO

    from taxonomist.config import compose
    from taxonomist.crossval import label_errors

    cfg = compose([], conf_dir=REPO / "conf")
    with pytest.raises(StageOrderError, match="run the cv stage first"):
        label_errors.run(cfg, cv_dir=tmp_path / "cv", processed_dir=tmp_path, out_dir=tmp_path / "le")


def test_label_errors_find_planted_flips_end_to_end(tmp_path, monkeypatch):
    """Images moved into the wrong class folder (given the wrong label) are flagged and ranked on top."""
    from taxonomist.crossval import label_errors
    from taxonomist.crossval import run as cv

    monkeypatch.chdir(tmp_path)
    source = make_image_folder(tmp_path / "shapes", per_class=40, seed=5)
    flipped = {}
    for n, (label, wrong) in enumerate([("circle", "square"), ("square", "triangle"), ("triangle", "circle")] * 2):
        name = f"{label}_{n + 10:03d}.png"
        if not (source / label / name).is_file():
            name = name.replace(".png", ".jpg")
        shutil.move(source / label / name, source / wrong / f"flipped_{name}")
        flipped[f"{wrong}/flipped_{name}"] = label
    cfg, processed = prepared(tmp_path, source, [*EMBEDDINGS, "cv.folds=5", "label_errors.examples=8"])
    cv.run(cfg, processed_dir=processed, out_dir=tmp_path / "reports" / "cv")
    summary = label_errors.run(
        cfg, cv_dir=tmp_path / "reports" / "cv", processed_dir=processed, out_dir=tmp_path / "reports" / "le"
    )
    out = tmp_path / "reports" / "le"
    table = pd.read_csv(out / "label_errors.csv", dtype={"given": str, "suggested": str})
    oof = np.load(tmp_path / "reports" / "cv" / "oof.npz")
    in_pool = [s for s in flipped if s in set(oof["source_id"])]
    assert len(in_pool) >= 3  # most flips are in the training pool (the rest went to test)
    found = set(table["source_id"]) & set(in_pool)
    assert len(found) >= len(in_pool) - 1  # recall: at most one planted flip missed
    assert len(table) <= len(in_pool) + 6  # precision: few clean images flagged
    top = table.head(len(in_pool))
    assert top["source_id"].isin(in_pool).mean() >= 0.6  # the flips rank near the top
    for row in table[table["source_id"].isin(in_pool)].itertuples():
        assert row.suggested == flipped[row.source_id]  # the suggested label is the true one
        assert row.self_confidence < 0.5
    assert list(table["rank"]) == list(range(1, len(table) + 1))
    assert (out / "label_errors.png").stat().st_size > 1000
    assert summary["flagged"] == len(table)

    _, found_runs = mlflow_runs(tmp_path)
    parent = next(r for r in found_runs if r.data.tags.get("taxonomist.role") == "cv")
    assert parent.data.metrics["label_errors/count"] == len(table)
