"""k-fold cross-validation (``taxonomist cv``): the folds, the statistics, and real runs on tiny images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, make_image_folder, ready_pipeline_project, run_cmd, tiny_overrides

from taxonomist.config import compose
from taxonomist.crossval.folds import assign_folds, effective_folds, fold_statistics
from taxonomist.errors import ConfigError, DataError, StageOrderError
from taxonomist.stages import ingest, preprocess

EMBEDDINGS = ["model=embeddings", "model/classifier=logistic"]


# --- the folds ----------------------------------------------------------------------------


def test_folds_are_stratified_and_hold_out_every_image_once():
    targets = np.repeat([0, 1, 2], [50, 25, 10])
    fold_of = assign_folds(targets, folds=5, seed=3)
    assert sorted(np.unique(fold_of)) == [0, 1, 2, 3, 4]
    assert len(fold_of) == len(targets)  # one fold per image: held out exactly once
    for k in range(5):
        counts = np.bincount(targets[fold_of == k], minlength=3)
        assert counts.tolist() == [10, 5, 2]  # each fold keeps the class mix
    assert not np.array_equal(fold_of, assign_folds(targets, folds=5, seed=4))  # seeded draw
    assert np.array_equal(fold_of, assign_folds(targets, folds=5, seed=3))


def test_grouped_folds_keep_each_group_in_one_fold():
    rng = np.random.default_rng(0)
    groups = np.repeat([f"g{i}" for i in range(30)], 4)
    targets = np.repeat(rng.integers(0, 3, 30), 4)
    fold_of = assign_folds(targets, folds=5, seed=0, groups=groups)
    per_group = pd.DataFrame({"g": groups, "f": fold_of}).groupby("g")["f"].nunique()
    assert (per_group == 1).all()
    assert len(np.unique(fold_of)) == 5


def test_fewer_folds_than_asked_when_a_class_is_small(caplog):
    targets = np.repeat([0, 1], [20, 3])
    with caplog.at_level(logging.WARNING, logger="taxonomist"):
        assert effective_folds(5, targets, None, stratified=True) == 3
    assert "3 folds instead of cv.folds=5: the smallest class has 3 image(s)" in caplog.text
    assert effective_folds(5, targets, None, stratified=False) == 5
    groups = np.asarray([f"g{i % 4}" for i in range(len(targets))])
    assert effective_folds(5, targets, groups, stratified=True) == 3
    assert effective_folds(5, np.repeat([0, 1], [20, 10]), groups, stratified=True) == 4


def test_one_class_or_a_single_image_class_cannot_be_cross_validated():
    with pytest.raises(DataError, match="at least 2 classes"):
        effective_folds(5, np.zeros(30, dtype=int), None, stratified=True)
    with pytest.raises(DataError, match="the smallest class has 1 image"):
        effective_folds(5, np.repeat([0, 1], [20, 1]), None, stratified=True)


def test_mean_and_sample_std_of_every_shared_metric():
    stats = fold_statistics([{"val/acc": 0.8, "val/loss": 1.0}, {"val/acc": 0.9, "val/loss": 2.0}, {"val/acc": 1.0}])
    assert stats["val/acc_mean"] == pytest.approx(0.9)
    assert stats["val/acc_std"] == pytest.approx(0.1)  # ddof=1
    assert "val/loss_mean" not in stats  # not in every fold
    assert fold_statistics([{"val/acc": 0.5}])["val/acc_std"] == 0.0


def test_config_checks_the_cv_section():
    with pytest.raises(ConfigError, match=r"cv\.folds must be >= 2"):
        compose(["cv.folds=1"], conf_dir=REPO / "conf")
    with pytest.raises(ConfigError, match=r"cv\.groups="):
        compose(["cv.groups=maybe"], conf_dir=REPO / "conf")
    with pytest.raises(ConfigError, match=r"label_errors\.filter_by="):
        compose(["label_errors.filter_by=vibes"], conf_dir=REPO / "conf")


# --- real runs on tiny images ----------------------------------------------------------------


def cv_config(tmp_path: Path, source: Path, overrides: list[str]):
    """The tiny pipeline's config (its model replaced by ``overrides``' model, if any), logging
    to an MLflow store in ``tmp_path``."""
    base = tiny_overrides(source)
    if any(o.startswith("model=") for o in overrides):
        base = [o for o in base if not o.startswith("model")]
    return compose(
        [
            *base,
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'mlartifacts'}",
            f"cv.work_dir={tmp_path / 'cv-work'}",
            *overrides,
        ],
        conf_dir=REPO / "conf",
    )


def prepared(tmp_path: Path, source: Path, overrides: list[str]):
    """Ingest and preprocess ``source`` into ``tmp_path/data``; the config and processed folder."""
    cfg = cv_config(tmp_path, source, overrides)
    raw, processed = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    ingest.run(cfg, out_dir=raw)
    preprocess.run(cfg, raw_dir=raw, out_dir=processed)
    return cfg, processed


def pool_paths(processed: Path) -> list[str]:
    frame = pd.read_csv(processed / "splits.csv", dtype=str, keep_default_na=False)
    return sorted(frame.loc[frame["split"].isin(["train", "val"]), "path"])


def mlflow_runs(tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("taxonomist")
    return client, client.search_runs([experiment.experiment_id])


def check_outputs(tmp_path: Path, processed: Path, out: Path, summary: dict, folds: int) -> None:
    """What every cv run must leave: OOF covering the pool once, folds.csv, the MLflow runs."""
    oof = np.load(out / "oof.npz")
    assert sorted(oof["path"]) == pool_paths(processed)  # every training-pool image, once, no test image
    assert len(set(oof["path"])) == len(oof["path"])
    assert oof["probs"].shape == (len(oof["path"]), 3)
    np.testing.assert_allclose(oof["probs"].sum(1), 1.0, atol=1e-5)
    assert sorted(np.unique(oof["fold"])) == list(range(1, folds + 1))
    assert [str(c) for c in oof["classes"][oof["given"]]] == [str(x) for x in oof["label"]]
    assert all(s.split("/")[-2] == label for s, label in zip(oof["source_id"], oof["label"], strict=True))

    table = pd.read_csv(out / "folds.csv")
    assert len(table) == folds
    assert table["held_out_images"].sum() == len(oof["path"])
    assert summary["metrics"]["acc_mean"] == pytest.approx(table["val/acc"].mean())
    assert summary["metrics"]["acc_std"] == pytest.approx(table["val/acc"].std(ddof=1))
    assert "| acc |" in (out / "summary.md").read_text()

    client, found = mlflow_runs(tmp_path)
    parent = next(r for r in found if r.info.run_id == summary["parent_run_id"])
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == folds
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
    assert parent.data.metrics["cv/acc_mean"] == pytest.approx(summary["metrics"]["acc_mean"])
    for key in ("cv/acc_std", "cv/f1_macro_mean", "cv/loss_mean", "cv/oof_acc"):
        assert key in parent.data.metrics
    child_acc = sorted(r.data.metrics["cv/val/acc"] for r in children)
    assert child_acc == pytest.approx(sorted(table["val/acc"]))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert {"cv/oof.npz", "cv/folds.csv", "cv/summary.md"} <= artifacts
    assert not Path("models/run.json").exists()  # cv does not take over the pipeline's run


def test_cv_with_embeddings_end_to_end(tmp_path, monkeypatch):
    from taxonomist.crossval import run as cv

    monkeypatch.chdir(tmp_path)
    source = make_image_folder(tmp_path / "shapes", per_class=25)
    cfg, processed = prepared(tmp_path, source, [*EMBEDDINGS, "cv.folds=4"])
    summary = cv.run(cfg, processed_dir=processed, out_dir=tmp_path / "reports" / "cv")
    check_outputs(tmp_path, processed, tmp_path / "reports" / "cv", summary, folds=4)
    assert summary["metrics"]["oof_acc"] > 0.7  # HOG + logistic separates the shapes (chance: 0.33)
    assert (tmp_path / "cv-work" / "features" / "key.json").is_file()  # the features cache, not data/features
    assert not (tmp_path / "data" / "features").exists()


def test_cv_with_groups_holds_each_group_out_once(tmp_path, monkeypatch):
    from taxonomist.crossval import run as cv

    monkeypatch.chdir(tmp_path)
    source = make_image_folder(tmp_path / "shapes", per_class=24)
    # groups of ten file numbers per class: circle_000..circle_009 is one group
    cfg, processed = prepared(tmp_path, source, [*EMBEDDINGS, "cv.folds=3", r"data.group_by='(\w+_\d\d)'"])
    summary = cv.run(cfg, processed_dir=processed, out_dir=tmp_path / "cv")
    oof = np.load(tmp_path / "cv" / "oof.npz")
    assert (oof["group"] != "").all()
    per_group = pd.DataFrame({"g": oof["group"], "f": oof["fold"]}).groupby("g")["f"].nunique()
    assert (per_group == 1).all()
    assert "grouped" in summary["how"]


def test_cv_with_a_network_two_folds_one_epoch(tmp_path, monkeypatch):
    from taxonomist.crossval import run as cv

    monkeypatch.chdir(tmp_path)
    source = make_image_folder(tmp_path / "shapes", per_class=12)
    cfg, processed = prepared(tmp_path, source, ["cv.folds=2", "trainer.max_epochs=1"])
    summary = cv.run(cfg, processed_dir=processed, out_dir=tmp_path / "reports" / "cv")
    check_outputs(tmp_path, processed, tmp_path / "reports" / "cv", summary, folds=2)
    assert not list((tmp_path / "cv-work").glob("fold-*"))  # per-fold copies deleted (cv.keep_work=false)
    _, found = mlflow_runs(tmp_path)
    children = [r for r in found if r.data.tags.get("taxonomist.role") == "cv-fold"]
    assert all("train/loss" in r.data.metrics for r in children)  # the train stage's own history


def test_cv_without_processed_data_names_the_stage_to_run(tmp_path):
    from taxonomist.crossval import run as cv

    cfg = cv_config(tmp_path, tmp_path, EMBEDDINGS)
    with pytest.raises(StageOrderError, match="run the preprocess stage first"):
        cv.run(cfg, processed_dir=tmp_path / "nothing", out_dir=tmp_path / "cv")


# --- cv and label errors as DVC stages of a ready pipeline ----------------------------------


def test_ready_pipelines_get_the_optional_stages_they_ask_for():
    from taxonomist.pipelines import compose_pipeline, render_dvc

    plain = yaml.safe_load(render_dvc("binary", compose_pipeline("binary", REPO / "conf"), REPO / "dvc.yaml"))
    assert "cv" not in plain["stages"] and "label_errors" not in plain["stages"]
    spec = yaml.safe_load(render_dvc("digits", compose_pipeline("digits", REPO / "conf"), REPO / "dvc.yaml"))
    names = list(spec["stages"])
    assert names == ["ingest", "preprocess", "train", "evaluate", "package", "cv", "label_errors"]
    assert "../../src/taxonomist/crossval" in spec["stages"]["cv"]["deps"]
    assert spec["stages"]["label_errors"]["deps"][:2] == ["data/processed", "reports/cv"]
    with pytest.raises(ConfigError, match=r"label_errors\.stage=true .* set cv\.stage=true too"):
        compose(["label_errors.stage=true"], conf_dir=REPO / "conf")


@pytest.mark.e2e
def test_dvc_repro_of_the_digits_pipeline_cross_validates_and_ranks_label_errors(tmp_path):
    """pipelines/digits (HOG + SVM on scikit-learn's digits): `dvc repro` runs the five stages,
    then cv and label_errors; a second repro reruns nothing; the cv runs are in MLflow."""
    folder = ready_pipeline_project(tmp_path / "project", "digits")
    dvc = str(BIN / "dvc")
    run_cmd([dvc, "repro"], folder)
    oof = np.load(folder / "reports/cv/oof.npz")
    splits = pd.read_csv(folder / "data/processed/splits.csv")
    assert len(oof["path"]) == int(splits["split"].isin(["train", "val"]).sum())  # every pool image, once
    summary = json.loads((folder / "reports/cv/cv.json").read_text())
    assert summary["folds"] == 5 and summary["metrics"]["acc_mean"] > 0.9  # digits: HOG + SVM is strong
    table = pd.read_csv(folder / "reports/label_errors/label_errors.csv")
    assert list(table["rank"]) == list(range(1, len(table) + 1)) and len(table) < 0.05 * len(oof["path"])
    again = run_cmd([dvc, "repro"], folder).stdout
    assert "Running stage" not in again, again
    _, found = mlflow_runs(tmp_path / "project")
    roles = [r.data.tags.get("taxonomist.role") for r in found]
    assert roles.count("cv") == 1 and roles.count("cv-fold") == 5
