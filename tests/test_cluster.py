"""``taxonomist cluster``: choosing k, agreement with labels, reading images, bad input, and one
real CLI run whose clusters.csv ingest reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_image_folder

from taxonomist import cli
from taxonomist.config import compose, write_params
from taxonomist.data.images import ImageSpec
from taxonomist.errors import DataError
from taxonomist.explore.cluster import agreement, by_size, cluster, k_candidates, reduce
from taxonomist.explore.pool import key_labels, read_pool


def blobs(seed: int = 0, per: int = 30, centres: int = 3, dims: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    middles = rng.normal(0, 10, (centres, dims))
    truth = np.repeat(np.arange(centres), per)
    return middles[truth] + rng.normal(0, 0.5, (len(truth), dims)), truth


@pytest.mark.parametrize("method", ["kmeans", "gmm"])
def test_auto_k_finds_the_number_of_blobs(method):
    x, truth = blobs(centres=4)
    result = cluster(x, method, "auto", [2, 7], seed=0)
    assert result.k == 4
    assert list(result.curve["k"]) == [2, 3, 4, 5, 6, 7]
    criterion = "bic" if method == "gmm" else "silhouette"
    assert result.criterion == criterion
    best = result.curve[criterion].idxmin() if method == "gmm" else result.curve[criterion].idxmax()
    assert result.curve["k"][best] == 4
    assert agreement([str(t) for t in truth], result.labels) == pytest.approx({"purity": 1.0, "nmi": 1.0, "ari": 1.0})


def test_a_given_k_is_used_and_clusters_are_numbered_by_size():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 0.3, (40, 2)), rng.normal(8, 0.3, (10, 2)), rng.normal(-8, 0.3, (25, 2))])
    result = cluster(x, "kmeans", 3, [2, 12], seed=0)
    assert result.k == 3 and result.curve is None
    assert list(np.bincount(result.labels)) == [40, 25, 10]
    assert result.distance.shape == (75,) and result.distance.max() < 2.0


def test_by_size_drops_empty_clusters():
    labels, centres = by_size(np.array([2, 2, 0, 2, 0, 3]), np.arange(8).reshape(4, 2))
    assert list(labels) == [0, 0, 1, 0, 1, 2]
    assert centres.tolist() == [[4, 5], [0, 1], [6, 7]]


def test_purity_nmi_ari_by_hand():
    truth = ["a", "a", "b", "b"]
    got = agreement(truth, np.array([0, 0, 0, 1]))
    assert got["purity"] == pytest.approx(0.75)
    # purity is per cluster (its most common label), not per label: more clusters never lower it
    assert agreement(["a", "a", "a", "b"], np.array([0, 1, 2, 2]))["purity"] == pytest.approx(0.75)
    assert agreement(truth, np.array([1, 1, 0, 0]))["ari"] == pytest.approx(1.0)
    assert agreement(truth, np.array([0, 1, 0, 1]))["nmi"] == pytest.approx(0.0, abs=1e-12)


def test_k_larger_than_the_images_is_an_error_and_auto_is_capped():
    with pytest.raises(DataError, match=r"cluster.k=9 but only 5 image\(s\)"):
        k_candidates(9, [2, 12], 5)
    assert k_candidates(5, [2, 12], 5) == [5]
    assert k_candidates("auto", [2, 12], 5) == [2, 3, 4]
    with pytest.raises(DataError, match="at least 3 images"):
        k_candidates("auto", [2, 12], 2)


def test_reduce_keeps_at_most_images_minus_one_components():
    x = np.random.default_rng(0).normal(size=(10, 40))
    assert reduce(x, 50, 0).shape == (10, 9)
    assert reduce(x, None, 0).shape == (10, 40)


def test_labels_come_from_class_folders_and_manifests(tmp_path):
    root = make_image_folder(tmp_path / "shapes", per_class=2)
    pool = read_pool([str(root)], ImageSpec(16, 3))
    assert pool.images.shape == (6, 16, 16, 3) and len(pool.sha256) == 6
    assert key_labels([str(root)], pool.keys) == ["circle"] * 2 + ["square"] * 2 + ["triangle"] * 2
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((root / "circle" / "circle_001.png").read_bytes())
    assert key_labels([str(flat)], [str(flat / "a.png")]) == [None]
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["shapes/circle/circle_001.png"], "label": ["round"]}).to_csv(manifest, index=False)
    keys = read_pool([str(manifest)], ImageSpec(16, 3)).keys
    assert key_labels([str(manifest)], keys) == ["round"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = ["cluster.features=color_hist", "cluster.k_range=[2,4]", "cluster.pca=8", "cluster.image_size=32"]
    write_params(compose(overrides, conf_dir=REPO / "conf"), tmp_path / "params.yaml")
    return tmp_path


def test_a_folder_without_images_is_one_error_line(project, capsys):
    (project / "empty").mkdir()
    (project / "empty" / "notes.txt").write_text("no images here")
    assert cli.main(["cluster", "empty", "--conf", str(REPO / "conf"), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: empty: no images found") and len(err.splitlines()) == 1


def test_k_over_the_images_from_the_command_line(project, capsys):
    make_image_folder(project / "few", per_class=1)
    assert cli.main(["cluster", "few", "-k", "5", "--conf", str(REPO / "conf"), "--no-tracking"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cluster.k=5 but only 3 image(s)" in err and len(err.splitlines()) == 1


def test_cluster_cli_end_to_end_report_mlflow_and_ingest(project, capsys):
    import mlflow

    from taxonomist.stages import ingest
    from taxonomist.tracking.runs import tracking_uri, use_store

    make_image_folder(project / "shapes", per_class=8)
    assert cli.main(["cluster", "shapes", "--conf", str(REPO / "conf"), "--method", "kmeans"]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = project / "reports" / "clusters"
    for name in ("clusters.md", "clusters.csv", "assignments.csv", "sizes.csv", "sizes.png", "grid.png",
                 "k_choice.csv", "k_choice.png", "metrics.json", "labels_by_cluster.csv"):  # fmt: skip
        assert (out / name).is_file(), name
    k = summary["k"]
    assert 2 <= k <= 4
    manifest = pd.read_csv(out / "clusters.csv")
    assert list(manifest.columns) == ["path", "label"] and len(manifest) == 24
    assert set(manifest["label"]) == {f"cluster_{i}" for i in range(k)}
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in manifest["path"])
    sizes = pd.read_csv(out / "sizes.csv")
    assert sizes["images"].sum() == 24 and sizes["images"].is_monotonic_decreasing
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1 / 3 <= metrics["purity"] <= 1 and -1 <= metrics["ari"] <= 1 and 0 <= metrics["nmi"] <= 1
    text = (out / "clusters.md").read_text()
    assert f"# {k} clusters of 24 images" in text and "purity" in text
    assert f"data=folder data.source={Path('reports/clusters/clusters.csv')}" in text

    cfg = compose(["cluster.features=color_hist"], conf_dir=REPO / "conf")
    use_store(tracking_uri(cfg))
    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.metrics["cluster/k"] == k and run.data.params["cluster.features"] == "color_hist"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "clusters")}
    assert {"clusters/clusters.md", "clusters/grid.png", "clusters/clusters.csv"} <= artifacts

    # the user renames a cluster, and ingest reads the manifest through the CSV table source
    manifest.loc[manifest["label"] == "cluster_0", "label"] = "corrected"
    manifest.to_csv(out / "clusters.csv", index=False)
    cfg = compose(["data=folder", "data.source=reports/clusters/clusters.csv"], conf_dir=REPO / "conf")
    ingested = ingest.run(cfg, out_dir=project / "data" / "raw")
    assert ingested["images"] == 24
    raw = pd.read_csv(project / "data" / "raw" / "manifest.csv", dtype=str)
    assert set(raw["labels"]) == {"corrected", *(f"cluster_{i}" for i in range(1, k))}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.method=dbscan", "cluster.method='dbscan'"),
        ("cluster.k=1", "cluster.k must be an integer >= 2 or auto"),
        ("cluster.k_range=[5,3]", "cluster.k_range"),
        ("suggest.uncertainty=variance", "suggest.uncertainty='variance'"),
        ("suggest.candidates_factor=0.5", "suggest.candidates_factor >= 1"),
        ("suggest.diversity=coreset", "suggest.diversity='coreset'"),
        ("suggest.kmeans_pick=medoid", "suggest.kmeans_pick='medoid'"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    from taxonomist.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        compose([override], conf_dir=REPO / "conf")


def test_model_features_of_a_timm_network_are_its_pre_logits():
    """``features: model`` / suggest on a network: pooled pre-logits features and the same logits as forward()."""
    from types import SimpleNamespace

    import timm
    import torch
    from omegaconf import OmegaConf

    from taxonomist.explore.pool import model_outputs

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", num_classes=3, pretrained=False).eval()
    pre = {"image_size": 32, "channels": 3, "resize_mode": "squash", "mean": [0.5] * 3, "std": [0.25] * 3}
    classifier = SimpleNamespace(cfg=OmegaConf.create({"preprocess": pre}), model=net, channels_last=False)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    features, logits = model_outputs(classifier, images, batch_size=2)
    assert features.shape == (5, net.num_features) and logits.shape == (5, 3)
    x = torch.from_numpy(((images / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        assert np.allclose(logits, net(x).numpy(), atol=1e-4)
        assert np.allclose(
            logits, features @ net.get_classifier().weight.numpy().T + net.get_classifier().bias.numpy(), atol=1e-4
        )
