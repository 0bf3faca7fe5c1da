"""``taxonomist suggest``: uncertainty, k-center, the overlap with the data, the Label Studio
file, bad input, and one real CLI run with a trained ``model=embeddings`` model."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_image_folder

from taxonomist import cli
from taxonomist.explore.suggest import (
    class_probabilities,
    k_center,
    known_hashes,
    label_config,
    label_studio_tasks,
    overlap,
    select,
    uncertainty,
    weighted_kmeans,
)


def test_entropy_and_margin():
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.7, 0.2, 0.1]])
    entropy = uncertainty(probs, "entropy")
    assert entropy[0] == pytest.approx(0.0) and entropy[1] == pytest.approx(1.0)
    assert entropy[2] == pytest.approx(np.log(2) / np.log(3))
    assert uncertainty(probs, "margin") == pytest.approx([0.0, 1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="entropy or margin"):
        uncertainty(probs, "variance")


def test_binary_probabilities_become_two_columns():
    class Binary:
        def probabilities(self, logits):
            return 1 / (1 + np.exp(-logits[:, 0]))

    probs = class_probabilities(Binary(), np.array([[0.0], [10.0]]))
    assert probs.shape == (2, 2) and probs[0] == pytest.approx([0.5, 0.5]) and probs[1, 1] > 0.99
    assert uncertainty(probs, "entropy")[0] == pytest.approx(1.0)


def groups(per: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    corners = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    return np.concatenate([c + rng.normal(0, 0.01, (per, 3)) for c in corners])


def test_k_center_takes_one_point_per_group_first():
    x = groups()
    chosen, gaps = k_center(x, 3, first=4)
    assert chosen[0] == 4 and sorted(i // 10 for i in chosen) == [0, 1, 2]
    assert np.isnan(gaps[0]) and all(g > 1.0 for g in gaps[1:])
    assert len(set(k_center(x, 30)[0])) == 30  # every point once when the budget is all of them
    assert len(k_center(x, 50)[0]) == 30


def test_select_diversity_among_the_most_uncertain():
    x = groups()
    unc = np.linspace(0.0, 1.0, 30)[::-1].copy()  # the first group is the most uncertain
    alone, _, cands = select(unc, x, 3, candidates_factor=1, diversity="kcenter")
    assert list(alone) == [0, 1, 2] and list(cands) == [0, 1, 2]  # uncertainty only: all from group 0
    alone, gaps, cands = select(unc, x, 3, candidates_factor=10, diversity="none")
    assert list(alone) == [0, 1, 2] and list(cands) == [0, 1, 2] and np.isnan(gaps).all()
    diverse, _, cands = select(unc, x, 3, candidates_factor=10, diversity="kcenter")
    assert diverse[0] == 0 and sorted(i // 10 for i in diverse) == [0, 1, 2]
    unc[20:] = 0.0  # the third group is certain: with 2 x 3 candidates, k-center never reaches it
    diverse, _, cands = select(unc, x, 3, candidates_factor=2, diversity="kcenter")
    assert len(cands) == 6 and all(i < 20 for i in diverse)
    with pytest.raises(ValueError, match="unknown diversity"):
        select(unc, x, 3, diversity="coreset")


@pytest.mark.parametrize("pick", ["centre", "uncertain"])
def test_kmeans_takes_one_image_per_cluster_most_uncertain_first(pick):
    x = groups()
    rng = np.random.default_rng(1)
    unc = rng.uniform(0.2, 1.0, 30)
    chosen, dist, cands = select(unc, x, 3, candidates_factor=10, diversity="kmeans", pick=pick)
    assert len(cands) == 30 and sorted(i // 10 for i in chosen) == [0, 1, 2]  # one per group
    assert list(unc[chosen]) == sorted(unc[chosen], reverse=True)  # ranked by uncertainty
    assert (dist >= 0).all() and (dist < 0.1).all()  # each close to its own cluster's centre
    if pick == "uncertain":  # the most uncertain image of each group
        assert sorted(chosen) == sorted(int(g * 10 + np.argmax(unc[g * 10 : g * 10 + 10])) for g in range(3))


def test_kmeans_picks_only_among_the_candidates():
    x = groups()
    unc = np.concatenate([np.full(10, 0.9), np.full(10, 0.8), np.full(10, 0.1)])
    unc += np.linspace(0, 0.01, 30)
    # 20 candidates (groups 0 and 1): 3 clusters split them, group 2 (certain) is never picked
    chosen, _, cands = select(unc, x, 3, candidates_factor=20 / 3, diversity="kmeans")
    assert sorted(cands) == list(range(20)) and set(chosen) <= set(cands)
    assert {i // 10 for i in chosen} == {0, 1} and len(set(chosen)) == 3


def test_kmeans_centre_or_most_uncertain_of_a_cluster():
    # one cluster around the origin direction (1, 0): a point at its centre, two either side
    angles = np.array([0.0, 0.2, -0.2, 0.1, -0.1])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    unc = np.array([0.5, 0.5, 0.5, 0.51, 0.5])  # row 3 a little more uncertain
    assert list(weighted_kmeans(x, unc, 1, pick="centre")[0]) == [0]
    assert list(weighted_kmeans(x, unc, 1, pick="uncertain")[0]) == [3]
    with pytest.raises(ValueError, match="k-means pick"):
        weighted_kmeans(x, unc, 1, pick="medoid")


def test_kmeans_is_deterministic_with_the_seed_and_fills_empty_clusters():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    unc = rng.uniform(size=200)
    first = select(unc, x, 20, candidates_factor=5, diversity="kmeans", seed=0)[0]
    again = select(unc, x, 20, candidates_factor=5, diversity="kmeans", seed=0)[0]
    assert list(first) == list(again) and len(set(first)) == 20
    others = [list(select(unc, x, 20, candidates_factor=5, diversity="kmeans", seed=s)[0]) for s in range(1, 6)]
    assert any(o != list(first) for o in others)  # the seed reaches k-means
    # 4 identical rows and 2 others: 3 distinct points for 4 clusters, the 4th pick is the next most uncertain
    dup = np.array([[1.0, 0], [1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0], [-1.0, 0]])
    u = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    with pytest.warns(Warning):  # sklearn: fewer distinct clusters than asked
        chosen, _ = weighted_kmeans(dup, u, 4)
    assert len(set(chosen)) == 4 and {4, 5} <= set(chosen) and 0 in chosen


def test_overlap_with_the_data_and_duplicates_in_the_pool(tmp_path):
    pd.DataFrame(
        {
            "path": ["images/1.png", "images/2.png"],
            "labels": ["a", "b"],
            "split": ["train", "test"],
            "sha256": ["h1", "h2"],
            "source_id": ["cats/one.png", ""],
            "group": ["", ""],
        }
    ).to_csv(tmp_path / "splits.csv", index=False)
    known = known_hashes(tmp_path)
    keep, dropped = overlap(["p/x.png", "p/y.png", "p/z.png", "p/w.png"], ["h1", "h9", "h9", "h2"], known)
    assert keep.tolist() == [False, True, False, False]
    assert dropped.to_dict("records") == [
        {"path": "p/x.png", "reason": "in the data", "split": "train", "same_as": "cats/one.png"},
        {"path": "p/z.png", "reason": "duplicate in the pool", "split": "", "same_as": "p/y.png"},
        {"path": "p/w.png", "reason": "in the data", "split": "test", "same_as": "images/2.png"},
    ]
    assert known_hashes(tmp_path / "missing").empty  # no data yet: nothing to overlap with


def test_label_studio_tasks_and_config(tmp_path):
    rows = pd.DataFrame({"path": [str(tmp_path / "a" / "x.png")], "predicted": ["cat"], "score": [0.61234]})
    tasks = label_studio_tasks(rows, tmp_path, "choice", "image", "taxonomist:best.ckpt")
    assert tasks == [
        {
            "data": {"image": "/data/local-files/?d=a/x.png"},
            "predictions": [
                {
                    "model_version": "taxonomist:best.ckpt",
                    "score": 0.6123,
                    "result": [
                        {"from_name": "choice", "to_name": "image", "type": "choices", "value": {"choices": ["cat"]}}
                    ],
                }
            ],
        }
    ]
    xml = ET.fromstring(label_config(["cat", 'dog "big"'], "choice", "image"))
    choices = xml.find("Choices")
    assert xml.find("Image").get("name") == "image" and choices.get("toName") == "image"
    assert [c.get("value") for c in choices] == ["cat", 'dog "big"']


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ``model=embeddings`` model (colour histograms + logistic regression) trained by the
    stage functions on a tiny shapes folder, in a project folder of its own."""
    import os

    from taxonomist.config import compose, write_params
    from taxonomist.stages import ingest, preprocess, train

    root = tmp_path_factory.mktemp("suggest-project")
    source = make_image_folder(root / "shapes", per_class=10)
    overrides = [
        f"data.source={source}",
        "data=folder",
        "model=embeddings",
        "model/features=hog_color",
        "model/classifier=logistic",
        "preprocess.image_size=32",
        "preprocess.channels=3",
        "preprocess.mean=[0.5,0.5,0.5]",
        "preprocess.std=[0.25,0.25,0.25]",
        "preprocess.val_fraction=0.2",
        "preprocess.test_fraction=0.2",
        "suggest.budget=4",
        "suggest.diversity=kcenter",  # k-center among the 12 most uncertain (k-means: a run() below)
        "suggest.candidates_factor=3",
    ]
    before = Path.cwd()
    os.chdir(root)
    try:
        cfg = compose(overrides, conf_dir=REPO / "conf")
        write_params(cfg, "params.yaml")
        ingest.run(cfg, out_dir=Path("data/raw"))
        preprocess.run(cfg, raw_dir=Path("data/raw"), out_dir=Path("data/processed"))
        train.run(cfg, processed_dir=Path("data/processed"), models_dir=Path("models"), history_file=Path("h.csv"))
    finally:
        os.chdir(before)
    return root


def test_suggest_cli_end_to_end(trained, monkeypatch, capsys):
    from taxonomist.config import compose
    from taxonomist.stages import ingest

    monkeypatch.chdir(trained)
    pool = make_image_folder(trained / "pool", per_class=6, seed=5)
    shutil.copy(trained / "shapes" / "circle" / "circle_003.png", pool / "circle" / "seen_in_training.png")
    shutil.copy(pool / "square" / "square_001.png", pool / "square" / "a_copy.png")
    assert cli.main(["suggest", "pool"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pool"] == 20 and summary["new"] == 18 and summary["in_data"] == 1 and summary["duplicates"] == 1
    assert summary["suggested"] == 4  # suggest.budget
    out = trained / "reports" / "suggest"

    # the run is in MLflow's explore experiment: settings, numbers, the files
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{trained / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "taxonomist-explore"
    assert run.data.tags["command"] == "suggest" and run.data.tags["inputs"] == "pool"
    assert run.data.params["suggest.diversity"] == "kcenter" and run.data.params["suggest.budget"] == "4"
    assert run.data.metrics["suggest/suggested"] == 4 and run.data.metrics["suggest/in_data"] == 1
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "suggest")}
    assert {"suggest/suggestions.csv", "suggest/suggestions.json", "suggest/overlap.csv"} <= logged
    rows = pd.read_csv(out / "suggestions.csv")
    assert list(rows.columns) == ["rank", "path", "uncertainty", "predicted", "score", "distance"]
    assert rows["rank"].tolist() == [1, 2, 3, 4]
    assert rows["uncertainty"].between(0, 1).all() and rows["score"].between(0, 1).all()
    assert set(rows["predicted"]) <= {"circle", "square", "triangle"}
    assert rows["path"].str.startswith("pool/").all() and "seen_in_training" not in " ".join(rows["path"])
    table = pd.read_csv(out / "pool.csv", keep_default_na=False)
    assert rows["uncertainty"].iloc[0] == table["uncertainty"].replace("", np.nan).astype(float).max()
    assert (table["status"] == "suggested").sum() == 4 and len(table) == 20
    assert (table["status"] == "candidate").sum() == 8  # 3 x 4 most uncertain, 4 of them suggested
    assert np.isnan(rows["distance"][0]) and (rows["distance"][1:] > 0).all()
    dropped = pd.read_csv(out / "overlap.csv", keep_default_na=False)
    assert dropped[["reason", "split"]].values.tolist()[0][0] == "in the data"
    assert dropped.loc[dropped["reason"] == "in the data", "same_as"].tolist() == ["circle/circle_003.png"]

    tasks = json.loads((out / "suggestions.json").read_text())
    assert len(tasks) == 4
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [rows["predicted"][0]]
    # Label it in Label Studio (here: accept the pre-annotations) and feed the export back to ingest
    for n, task in enumerate(tasks, 1):
        task["id"] = n
        task["annotations"] = [{"result": task["predictions"][0]["result"], "was_cancelled": False}]
    (trained / "export.json").write_text(json.dumps(tasks))
    cfg = compose(
        ["data=folder", f"data.source={trained / 'export.json'}", f"data.image_root={summary['label_studio_root']}"],
        conf_dir=REPO / "conf",
    )
    assert ingest.run(cfg, out_dir=trained / "labelled")["images"] == 4

    from omegaconf import OmegaConf

    from taxonomist.explore.suggest import run

    params = OmegaConf.load("params.yaml")
    params.suggest.diversity = "kmeans"  # weighted k-means among the same 12 candidates
    assert run(["pool"], params, out=Path("kmeans"))["suggested"] == 4
    picked = pd.read_csv(trained / "kmeans" / "suggestions.csv")
    assert len(set(picked["path"])) == 4 and picked["uncertainty"].is_monotonic_decreasing
    assert (picked["distance"] >= 0).all()
    table = pd.read_csv(trained / "kmeans" / "pool.csv", keep_default_na=False)
    assert (table["status"] == "candidate").sum() == 8

    assert cli.main(["suggest", "pool", "--budget", "100", "--out", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["suggested"] == 18  # the budget is capped at the new images

    # cluster with the trained model's own features (its extractor), k given
    assert cli.main(["cluster", "pool", "--features", "model", "-k", "3", "--no-tracking", "--out", "groups"]) == 0
    assert json.loads(capsys.readouterr().out)["k"] == 3
    assert "`hog_color`" not in (trained / "groups" / "clusters.md").read_text()
    assert "the trained model's features" in (trained / "groups" / "clusters.md").read_text()
    assert len(pd.read_csv(trained / "groups" / "clusters.csv")) == 20


def test_empty_pool_and_a_pool_of_known_images_are_one_error_line(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    (trained / "nothing").mkdir(exist_ok=True)
    assert cli.main(["suggest", "nothing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: nothing: no images found") and len(err.splitlines()) == 1
    assert cli.main(["suggest", "shapes"]) == 2
    err = capsys.readouterr().err.strip()
    assert "every pool image is already in the data" in err and len(err.splitlines()) == 1
    assert cli.main(["suggest", "shapes", "--checkpoint", "nope.ckpt"]) == 2
    assert "nope.ckpt" in capsys.readouterr().err


def test_the_benchmark_loop_adds_labels_each_round():
    """benchmarks/active_learning.py's loop on synthetic blobs: one accuracy per round, every
    strategy runs, and choosing by margin does not fall below chance."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from active_learning import STRATEGIES, run_loop

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (10, 8))
    y = np.repeat(np.arange(10), 60)
    x = (centres[y] + rng.normal(0, 1.0, (len(y), 8))).astype(np.float32)
    spec = {"name": "logistic", "scale": True, "params": {"C": 1.0, "max_iter": 500}}
    for strategy in STRATEGIES.values():
        accuracy = run_loop(x[::2], y[::2], x[1::2], y[1::2], strategy, 0, 20, 20, 2, spec)
        assert len(accuracy) == 3 and all(0.3 < a <= 1.0 for a in accuracy)
