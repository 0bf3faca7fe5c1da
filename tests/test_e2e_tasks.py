"""End to end for the binary, multi-label, hierarchical, ordinal and multi-attribute tasks: all
five stages on tiny data the tests draw, read through different sources (zip archive, CSV
manifests, nested folders, a folder of graded sizes), and `dvc repro` inside a ready pipeline
folder under pipelines/."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, draw_shape, make_image_folder, ready_pipeline_project, run_cmd, tiny_overrides
from PIL import Image, ImageDraw

from taxonomist.config import compose
from taxonomist.stages import evaluate, ingest, package, preprocess, train

pytestmark = pytest.mark.e2e


def shapes_manifest(root: Path, n: int = 72) -> Path:
    """A CSV manifest of images holding a circle, a square or both side by side (multi-label)."""
    rng = random.Random(3)
    rows = []
    (root / "imgs").mkdir(parents=True)
    for i in range(n):
        labels = [["circle"], ["square"], ["circle", "square"]][i % 3]
        canvas = Image.new("RGB", (64, 32))
        for k, shape in enumerate(labels if len(labels) == 2 else [labels[0], None]):
            if shape is not None:
                canvas.paste(draw_shape(shape, 32, rng), (32 * k if rng.random() < 0.5 else 32 * (1 - k), 0))
        canvas.save(root / "imgs" / f"{i:03d}.png")
        rows.append({"image": f"imgs/{i:03d}.png", "labels": json.dumps(labels)})
    path = root / "labels.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def zipped_folder(root: Path) -> Path:
    """A zip archive of a two-class folder tree."""
    folder = make_image_folder(root / "shapes", per_class=24, classes=("circle", "square"))
    archive = root / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.*")):
            zf.write(path, f"shapes/{path.relative_to(folder)}")
    return archive


def nested_folder(root: Path) -> Path:
    """Nested folders: round/circle and angular/{square,triangle}."""
    make_image_folder(root / "tree" / "round", per_class=24, classes=("circle",))
    make_image_folder(root / "tree" / "angular", per_class=24, classes=("square", "triangle"), seed=1)
    return root / "tree"


def graded_sizes(root: Path, per_class: int = 24) -> Path:
    """Ordinal data: a folder per size grade (1-small, 2-medium, 3-large) of discs of that size."""
    rng = random.Random(5)
    for grade, radius in (("1-small", 4), ("2-medium", 8), ("3-large", 13)):
        (root / grade).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(np.random.default_rng(i).integers(0, 60, (32, 32, 3), dtype=np.uint8))
            r = radius + rng.uniform(-1, 1)
            cx, cy = rng.uniform(r, 32 - r), rng.uniform(r, 32 - r)
            ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 220, 220))
            img.save(root / grade / f"{i:03d}.png")
    return root


def attribute_manifest(root: Path, n: int = 96) -> Path:
    """Multi-attribute data: a CSV with one column per attribute: shape (circle/square/triangle),
    colour (red/blue) and marks (a set: dot, bar, or both, or none)."""
    rng = random.Random(7)
    (root / "imgs").mkdir(parents=True)
    rows = []
    for i in range(n):
        shape, colour = ("circle", "square", "triangle")[i % 3], ("red", "blue")[(i // 3) % 2]
        marks = [["dot"], ["bar"], ["dot", "bar"], []][(i // 6) % 4]
        img = draw_shape(shape, 32, rng)
        pixels = np.array(img)
        bright = pixels.max(axis=2) > 120  # the shape
        pixels[bright] = (230, 40, 40) if colour == "red" else (40, 40, 230)
        if "dot" in marks:
            pixels[1:4, 1:4] = 255
        if "bar" in marks:
            pixels[-3:, 4:28] = 255
        Image.fromarray(pixels).save(root / "imgs" / f"{i:03d}.png")
        rows.append({"path": f"imgs/{i:03d}.png", "shape": shape, "colour": colour, "marks": "|".join(marks)})
    path = root / "attributes.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


CASES = {
    "binary": (
        zipped_folder,
        ["task.positive_label=square", "task.threshold.mode=min_recall", "task.threshold.value=.8"],
    ),
    "multilabel": (shapes_manifest, ["task.class_weights=balanced"]),
    "hierarchical": (nested_folder, []),
    "ordinal": (graded_sizes, []),
    "multiattribute": (
        attribute_manifest,
        ["task.attributes={shape: auto, colour: binary, marks: multilabel}", "task.allow_empty=true"],
    ),
}


def serving_outputs(serving: dict) -> int:
    """The number of logits of the packaged model's task."""
    from taxonomist.tasks import load_task

    return load_task(serving["labels"]).num_outputs


@pytest.mark.parametrize("task", sorted(CASES))
def test_all_stages_for_task(task, tmp_path, monkeypatch):
    make_source, extra = CASES[task]
    source = make_source(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    overrides = [*tiny_overrides(source), "data=folder", f"data.source={source}", f"task={task}", *extra]
    cfg = compose([*overrides, "trainer.max_epochs=4"], conf_dir=REPO / "conf")
    assert ingest.run(cfg)["task"] == task
    report = preprocess.run(cfg)
    assert sum(report["per_split"].values()) == report["images_out"]  # images, not labels
    train.run(cfg)
    metrics = evaluate.run(cfg)
    summary = package.run(cfg)

    decision = json.loads(Path("reports/eval/decision.json").read_text())
    serving = json.loads(Path("dist/serving.json").read_text())
    assert serving["decision"] == decision and serving["labels"]["task"] == task
    import mlflow

    model = mlflow.pyfunc.load_model(summary["champion_uri"])
    images = sorted(source.parent.rglob("*.png"))[:3]
    answer = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    card = Path("dist/model_card.md").read_text()
    assert f"Task: {task}" in card
    # Calibrated on val, shipped, measured: every task has a scale per output and conformal sets.
    assert len(decision["scale"]) == len(decision["bias"]) == serving_outputs(serving) and decision["coverage"] == 0.9
    assert {"ece", "ece_uncalibrated", "conformal_coverage", "conformal_set_size", "abstain_rate"} <= set(metrics)
    assert answer["abstain"].isin([True, False]).all() and all(isinstance(v, list) for v in answer["plausible"])
    assert "## Calibration and prediction sets" in card and Path("reports/eval/reliability.png").is_file()
    assert Path("reports/eval/explanations.png").stat().st_size > 5_000  # the heatmap grid of test images
    # The INT8 copy: built, measured on the same test images by the task, shipped or not with a reason.
    quantized = json.loads(Path("dist/quantization.json").read_text())
    assert Path("dist/model.onnx").is_file() and Path("dist/model.int8.onnx").is_file()
    assert quantized["enabled"] and quantized["metric"] == summary["champion_metric"], quantized["reason"]
    assert serving["precision"] == quantized["precision"] == ("int8" if quantized["shipped"] else "fp32")
    assert {r["class"] for r in quantized["per_class"]} == set(pd.read_csv("reports/eval/per_class.csv")["class"])
    assert quantized["fp32"]["score"] == pytest.approx(
        metrics[summary["champion_metric"].removeprefix("test/")], abs=1e-4
    )
    assert "## INT8 export" in card and quantized["reason"] in card
    logged = mlflow.models.Model.load(summary["model_uri"]).flavors["python_function"]["artifacts"]
    assert Path(logged["onnx"]["path"]).name == {"int8": "model.int8.onnx", "fp32": "model.onnx"}[serving["precision"]]
    if task == "binary":
        assert {"acc", "precision", "recall", "f1", "roc_auc", "average_precision"} <= set(metrics)
        assert summary["champion_metric"] == "test/f1"
        assert decision["thresholds"][0] == pytest.approx(metrics["threshold"], abs=5e-7)  # metrics keep 6 decimals
        assert set(answer["label"]) <= {"circle", "square"} and {"prob_circle", "prob_square"} <= set(answer)
        assert Path("reports/eval/pr_curve.csv").is_file() and Path("reports/eval/pr_roc_curves.png").is_file()
    elif task == "multilabel":
        assert {"subset_acc", "hamming_loss", "f1_micro", "f1_macro", "precision_macro"} <= set(metrics)
        assert len(decision["thresholds"]) == 2
        assert all(isinstance(v, list | np.ndarray) and set(v) <= {"circle", "square"} for v in answer["labels"])
        table = pd.read_csv("reports/eval/per_class.csv")
        assert table["class"].tolist() == ["circle", "square"] and "threshold" in table
    elif task == "ordinal":
        assert {"acc", "mae", "qwk", "off_by_one", "f1_macro"} <= set(metrics)
        assert summary["champion_metric"] == "test/qwk"
        assert serving["labels"]["classes"] == ["1-small", "2-medium", "3-large"]  # the natural order
        assert set(answer["label"]) <= {"1-small", "2-medium", "3-large"}
        assert answer["rank"].tolist() == [["1-small", "2-medium", "3-large"].index(x) for x in answer["label"]]
        matrix = pd.read_csv("reports/eval/confusion_matrix.csv", index_col=0)
        assert matrix.shape == (3, 3)
        assert metrics["qwk"] > 0.5  # sizes this distinct are learnt even in a few epochs
    elif task == "multiattribute":
        assert {"f1_macro", "acc_mean", "exact_match", "shape/acc", "colour/f1", "marks/f1_macro"} <= set(metrics)
        assert summary["champion_metric"] == "test/f1_macro"
        assert set(answer["shape"]) <= {"circle", "square", "triangle"} and set(answer["colour"]) <= {"red", "blue"}
        assert all(set(v) <= {"dot", "bar"} for v in answer["marks"])
        assert {"prob_colour=blue", "prob_shape=circle", "prob_marks=dot"} <= set(answer)
        assert Path("reports/eval/confusion_shape.png").is_file()
        assert metrics["colour/f1"] > 0.8  # red against blue: learnt in a few epochs
    else:
        assert {"hprecision", "hrecall", "hf1", "acc_level1", "acc_level2"} <= set(metrics)
        assert summary["champion_metric"] == "test/hf1"
        for path, label in zip(answer["path"], answer["label"], strict=True):
            top, _, leaf = path.partition(" > ")
            assert leaf == label and {"round": {"circle"}, "angular": {"square", "triangle"}}[top] >= {label}
        assert Path("reports/eval/confusion_level2.png").is_file()
    for value in metrics.values():
        assert np.isfinite(value)
    if task == "ordinal":  # one task is enough: the stages' folders are swapped in whole, or not at all
        interrupted_stages_keep_their_outputs(cfg, monkeypatch)


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupted_stages_keep_their_outputs(cfg, monkeypatch) -> None:
    """Ctrl-C in package and a full disk in evaluate, after each has written part of its new
    outputs: the previous dist/ and reports/eval/ stay exactly as they were, no temp folder left."""
    import errno

    dist, eval_dir = folder_state(Path("dist")), folder_state(Path("reports/eval"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(package, "build_int8", interrupt)  # after the new model.onnx is written
    with pytest.raises(KeyboardInterrupt):
        package.run(cfg)
    monkeypatch.setattr(evaluate, "explain_examples", disk_full)  # after the new reports are written
    with pytest.raises(OSError, match="No space left"):
        evaluate.run(cfg)
    assert folder_state(Path("dist")) == dist and folder_state(Path("reports/eval")) == eval_dir
    assert not list(Path(".").glob(".dist.*.tmp")) and not list(Path("reports").glob(".eval.*.tmp"))


def test_dvc_repro_inside_a_ready_pipeline(tmp_path):
    """pipelines/binary runs with `dvc repro` in its folder, logs to the project's MLflow store
    and registers its own model name."""
    root = tmp_path / "project"
    folder = ready_pipeline_project(root, "binary")
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["trainer"]["max_epochs"] = 3
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_cmd([str(BIN / "dvc"), "repro"], folder)

    metrics = json.loads((folder / "reports/metrics.json").read_text())["test"]
    assert {"f1", "roc_auc", "threshold"} <= set(metrics)
    assert not (root / "data").exists() and not (root / "models").exists()  # nothing leaks to the root
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("taxonomist-faces", "champion")
    assert version.tags["test_f1"] == str(metrics["f1"])
    assert (root / "mlartifacts").is_dir() and not (folder / "mlflow.db").exists()
