"""The champion gate (taxonomist.export.gate) and its registry flow (taxonomist.export.registry)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from conftest import REPO, tiny_overrides, tracking_variable_kept
from omegaconf import OmegaConf
from onnx import TensorProto, helper
from PIL import Image

import taxonomist
from taxonomist.config import compose
from taxonomist.export import gate, registry
from taxonomist.export.model_card import render_model_card
from taxonomist.export.serving import ImageClassifierModel
from taxonomist.stages.package import gate_images, gate_metrics, gate_summary
from taxonomist.tasks import Decision, load_task

SETTINGS = gate.GateSettings(alpha=0.05, bootstrap=500, class_tolerance=0.02, seed=0)
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def multiclass(classes) -> object:
    return load_task({"task": "multiclass", "classes": list(classes), "nodes": []})


def one_hot_probs(pred: np.ndarray, k: int, confidence: float = 0.9) -> np.ndarray:
    """Probabilities whose argmax is ``pred``."""
    probs = np.full((len(pred), k), (1 - confidence) / (k - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def answers_right(target: np.ndarray, share: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Answers right on a share of each class's images (``share[c]``), else another class."""
    rng = np.random.default_rng(seed)
    wrong = rng.random(len(target)) >= share[target]
    return np.where(wrong, (target + rng.integers(1, k, len(target))) % k, target)


def scored(task, pred: np.ndarray, target: np.ndarray) -> gate.Scored:
    return gate.score(task, one_hot_probs(pred, len(task.classes)), target, Decision())


@pytest.fixture(scope="module")
def four_classes():
    task = multiclass(["a", "b", "c", "d"])
    target = np.repeat(np.arange(4), 150)
    return task, target


# --------------------------------------------------------------------------- gate.py


def test_a_clearly_better_candidate_is_promoted(four_classes):
    task, target = four_classes
    candidate = scored(task, answers_right(target, np.full(4, 0.95), 4, 1), target)
    champion = scored(task, answers_right(target, np.full(4, 0.75), 4, 2), target)
    result = gate.compare(task, target, candidate, champion, "2", "1", "test/f1_macro", SETTINGS)
    assert result["promoted"] is True and result["decision"] == "promoted"
    assert result["interval"][0] > 0 and result["interval"][0] <= result["difference"] <= result["interval"][1]
    assert result["candidate_score"] == pytest.approx(candidate.evaluation.metrics["f1_macro"])
    assert result["reason"].startswith("v2 beats champion v1: test/f1_macro")
    assert "on the same 600 test images" in result["reason"] and "\n" not in result["reason"]
    assert result["bootstrap"]["method"] == "vectorised"
    assert result["mcnemar"]["p"] < 1e-6
    assert result["mcnemar"]["candidate_only_correct"] > result["mcnemar"]["champion_only_correct"]
    json.dumps(result)  # gate.json


def test_equal_models_are_refused(four_classes):
    task, target = four_classes
    same = scored(task, answers_right(target, np.full(4, 0.9), 4, 3), target)
    result = gate.compare(task, target, same, same, "2", "1", "test/f1_macro", SETTINGS)
    assert result["promoted"] is False and result["decision"] == "refused"
    assert result["interval"] == [0.0, 0.0] and result["mcnemar"]["p"] == 1.0
    assert "does not lie above 0" in result["reason"]
    assert result["reason"].startswith("v2 does not replace champion v1")


def test_better_on_average_but_worse_on_one_class_is_refused(four_classes):
    task, target = four_classes
    rank = np.tile(np.arange(150), 4)  # an image's position within its class
    # The candidate is right on every image of a, b and c, and on 85% of d (the rest: a) ...
    candidate = scored(task, np.where((target == 3) & (rank < 22), 0, target), target)
    # ... the champion on 70% of a, b and c (the rest: the next of the three) and 97% of d.
    champion_pred = np.where((target < 3) & (rank < 45), (target + 1) % 3, target)
    champion = scored(task, np.where((target == 3) & (rank < 5), 0, champion_pred), target)
    result = gate.compare(task, target, candidate, champion, "2", "1", "test/f1_macro", SETTINGS)
    assert result["interval"][0] > 0  # better on average ...
    assert result["classes_below_tolerance"] == ["d"]  # ... but class d drops beyond the tolerance
    assert result["promoted"] is False
    worst = result["per_class"][0]
    assert worst["class"] == "d" and worst["delta"] < -0.02
    assert [row["delta"] for row in result["per_class"]] == sorted(row["delta"] for row in result["per_class"])
    assert "class d F1" in result["reason"] and "tolerance 0.02" in result["reason"]
    # A tolerance wider than the drop lets it through.
    wide = gate.GateSettings(class_tolerance=0.5, bootstrap=200)
    assert gate.compare(task, target, candidate, champion, "2", "1", "test/f1_macro", wide)["promoted"] is True


def test_a_different_label_space_is_refused_naming_both():
    shapes = multiclass(["circle", "square", "triangle"])
    target = np.array([0, 1, 2, 0])
    candidate = scored(shapes, target, target)
    result = gate.other_label_space(shapes, candidate, "4", multiclass(FASHION), "3", "test/f1_macro")
    assert result["promoted"] is False and result["decision"] == "refused"
    assert result["reason"] == (
        "champion v3 has another label space (multiclass, 10 classes: T-shirt/top, Trouser, Pullover, ...; "
        "candidate: multiclass, 3 classes: circle, square, triangle)"
    )
    assert result["label_space"] != result["champion_label_space"]
    assert result["candidate_score"] == 1.0


def test_first_version_is_promoted():
    task = multiclass(["x", "y"])
    target = np.array([0, 1, 1])
    result = gate.first_version(task, scored(task, target, target), "1", "test/f1_macro")
    assert result["promoted"] is True and result["reason"] == "first version" and result["images"] == 3


def test_label_space_is_the_sha256_of_canonical_json():
    task = multiclass(["b", "a"])
    digest = gate.label_space(task.to_dict())
    assert digest == gate.label_space({"nodes": [], "classes": ["b", "a"], "task": "multiclass"})  # key order
    assert len(digest) == 64 and digest != gate.label_space(multiclass(["a", "b"]).to_dict())  # class order counts


def test_bootstrap_is_deterministic_for_a_seed(four_classes):
    task, target = four_classes
    candidate = scored(task, answers_right(target, np.full(4, 0.9), 4, 6), target)
    champion = scored(task, answers_right(target, np.full(4, 0.85), 4, 7), target)
    first, method = gate.bootstrap(task, target, candidate, champion, "f1_macro", 300, seed=11)
    again, _ = gate.bootstrap(task, target, candidate, champion, "f1_macro", 300, seed=11)
    other, _ = gate.bootstrap(task, target, candidate, champion, "f1_macro", 300, seed=12)
    assert method == "vectorised" and first.shape == (300,)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


CASES = {  # task dict, logits maker, decision, vectorised metrics
    "multiclass": ({"task": "multiclass", "classes": list("abcdef"), "nodes": []}, 6, Decision()),
    "binary": ({"task": "binary", "classes": ["no", "yes"], "nodes": []}, 1, Decision([0.45])),
    "ordinal": ({"task": "ordinal", "classes": ["1", "2", "3", "4"], "nodes": []}, 3, Decision()),
    "multilabel": ({"task": "multilabel", "classes": list("wxyz"), "nodes": []}, 4, Decision([0.5, 0.6, 0.4, 0.5])),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vectorised_metrics_match_task_evaluate(name):
    """On small resamples, where classes go missing, every vectorised metric equals the task's own."""
    labels, outputs, decision = CASES[name]
    task = load_task(labels)
    rng = np.random.default_rng(0)
    n = 14
    logits = rng.normal(size=(n, outputs)) * 2
    probs = task.probabilities(logits)
    target = task.decide(task.probabilities(logits + rng.normal(size=(n, outputs)) * 2), decision).astype(np.int64)
    model = gate.score(task, probs, target, decision)
    form = gate.answer_form(model.pred, target)
    assert form == ("sets" if name == "multilabel" else "single")
    metrics = [m for (f, m) in gate.FAST_METRICS if f == form and m in model.evaluation.metrics]
    assert metrics
    (idx,) = gate.resamples(n, 30, seed=1)
    counts = (gate.label_set_counts if form == "sets" else gate.single_label_counts)(model.pred, target, idx)
    slow = [task.evaluate(probs[i], target[i], decision).metrics for i in idx]
    for metric in metrics:
        fast = gate.FAST_METRICS[(form, metric)](counts)
        np.testing.assert_allclose(fast, [m[metric] for m in slow], atol=1e-6, err_msg=f"{name} {metric}")


def test_other_metrics_fall_back_to_task_evaluate(four_classes):
    task, target = four_classes
    candidate = scored(task, answers_right(target, np.full(4, 0.9), 4, 8), target)
    champion = scored(task, answers_right(target, np.full(4, 0.8), 4, 9), target)
    diffs, method = gate.bootstrap(task, target, candidate, champion, "nll", 5, seed=0)
    assert method == "Task.evaluate" and diffs.shape == (5,)
    (idx,) = gate.resamples(len(target), 5, seed=0)
    expected = [
        task.evaluate(candidate.probs[i], target[i], Decision()).metrics["nll"]
        - task.evaluate(champion.probs[i], target[i], Decision()).metrics["nll"]
        for i in idx
    ]
    np.testing.assert_allclose(diffs, expected)


def test_bootstrap_of_10000_images_takes_seconds():
    task = multiclass(FASHION)
    target = np.repeat(np.arange(10), 1000)
    candidate = scored(task, answers_right(target, np.full(10, 0.91), 10, 1), target)
    champion = scored(task, answers_right(target, np.full(10, 0.9), 10, 2), target)
    result = gate.compare(task, target, candidate, champion, "2", "1", "test/f1_macro", gate.GateSettings())
    assert result["bootstrap"]["method"] == "vectorised" and result["bootstrap"]["resamples"] == 1000
    assert result["bootstrap"]["seconds"] < 15  # about 1 s on 2 cores; generous for a loaded machine


def test_mcnemar_exact_p():
    right = np.array([True] * 10 + [False] * 5)
    result = gate.mcnemar(right, np.zeros(15, dtype=bool))
    assert result == {"candidate_only_correct": 10, "champion_only_correct": 0, "p": pytest.approx(2 * 0.5**10)}
    assert gate.mcnemar(right, right)["p"] == 1.0


def test_correct_compares_whole_rows():
    assert gate.correct(np.array([1, 2, 0]), np.array([1, 0, 0])).tolist() == [True, False, True]
    sets = np.array([[1, 0, 1], [1, 1, 0]], dtype=bool)
    assert gate.correct(sets, np.array([[1, 0, 1], [1, 0, 0]], dtype=np.uint8)).tolist() == [True, False]
    # a negative target entry (an attribute the image does not answer) is not compared
    assert gate.correct(np.array([[2, 1], [2, 0]]), np.array([[-1, 1], [1, 0]])).tolist() == [True, False]


@pytest.mark.parametrize("name", sorted(CASES))
def test_probability_matrix_inverts_the_served_answer(name):
    labels, outputs, decision = CASES[name]
    task = load_task(labels)
    probs = task.probabilities(np.random.default_rng(2).normal(size=(5, outputs)))
    np.testing.assert_allclose(gate.probability_matrix(task, task.answer(probs, decision)), probs)


# --------------------------------------------------------------------------- model name, package helpers, card


def test_model_name_defaults_to_data_set_and_task(tmp_path):
    conf = REPO / "conf"
    assert registry.model_name(compose([], conf_dir=conf)) == "taxonomist-fashion-mnist-multiclass"
    assert registry.model_name(compose(["data=folder", "data.source=/x/shapes"], conf_dir=conf)) == (
        "taxonomist-shapes-multiclass"
    )
    odd = compose(["data=folder", "data.source=/x/My Data_Set.v2/"], conf_dir=conf)
    assert registry.model_name(odd) == "taxonomist-my-data-set-v2-multiclass"
    explicit = compose([*tiny_overrides(tmp_path), "package.model_name=Mine"], conf_dir=conf)
    assert registry.model_name(explicit) == "Mine"


def test_gate_images_reads_the_raw_test_images(staged):
    images, labels = gate_images(staged["processed"], staged["raw"])
    splits = pd.read_csv(staged["processed"] / "splits.csv")
    test = splits[splits["split"] == "test"]
    assert labels == test["labels"].tolist() and len(images) == len(test) == staged["report"]["per_split"]["test"]
    assert all(Image.open(io.BytesIO(b)).size[0] > 0 for b in images)


DATA_REPORT = {
    "classes": ["a", "b", "c", "d"],
    "images_in": 600,
    "quarantined": 0,
    "duplicates_dropped": 0,
    "conflicting_dropped": 0,
    "per_split": {"test": 600},
}


def test_model_card_has_the_champion_gate(four_classes):
    task, target = four_classes
    candidate = scored(task, answers_right(target, np.full(4, 0.95), 4, 1), target)
    champion = scored(task, answers_right(target, np.full(4, 0.75), 4, 2), target)
    result = gate.compare(task, target, candidate, champion, "2", "1", "test/f1_macro", SETTINGS)
    card = render_model_card(
        name="m",
        version="2",
        cfg=OmegaConf.to_container(compose([], conf_dir=REPO / "conf"), resolve=True),  # type: ignore[arg-type]
        data_report=DATA_REPORT,
        metrics=candidate.evaluation.metrics,
        per_class=candidate.evaluation.per_class,
        task=task,
        decision={},
        verification={"max_abs_diff": 0.0},
        run_id="r",
        git_commit="c",
        gate=result,
    )
    section = card.split("## Champion gate", 1)[1].split("## Provenance", 1)[0]
    assert "**promoted**" in section and result["reason"] in section
    assert "on the same 600 test images" in section and "McNemar exact p" in section
    shown = [line.split(" | ")[0].removeprefix("| ") for line in section.splitlines() if line.startswith("| ")]
    assert shown[:2] == ["class", "---"] and shown[2:] == [row["class"] for row in result["per_class"]]  # worst first
    summary = gate_summary(result)
    assert gate_metrics(summary) == {
        "gate/candidate_score": result["candidate_score"],
        "gate/champion_score": result["champion_score"],
        "gate/diff_low": result["interval"][0],
        "gate/diff_high": result["interval"][1],
        "gate/mcnemar_p": result["mcnemar"]["p"],
    }
    assert set(gate_metrics(gate_summary(gate.first_version(task, candidate, "1", "test/f1_macro")))) == {
        "gate/candidate_score"
    }


# --------------------------------------------------------------------------- registry flow (real MLflow store)

COLOURS = ["blue", "green", "red"]  # sorted, as preprocess orders them
CHANNEL = {"red": 0, "green": 1, "blue": 2}


def colour_model(path: Path, classes: list[str], bias: list[float]) -> Path:
    """An ONNX model scoring each class by its colour channel's mean (plus ``bias``)."""
    weights = np.zeros((3, len(classes)), dtype=np.float32)
    for j, name in enumerate(classes):
        weights[CHANNEL[name], j] = 10.0
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.ravel().tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [len(classes)], bias)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input", "axes"], ["means"], keepdims=0),
            helper.make_node("MatMul", ["means", "w"], ["scores"]),
            helper.make_node("Add", ["scores", "b"], ["logits"]),
        ],
        "colour",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes)])],
        initializer=[axes, w, b],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def colour_images(classes: list[str], per_class: int, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """PNGs of one dominant colour channel (random strength) over weak noise."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name in classes:
        for _ in range(per_class):
            pixels = rng.integers(0, 60, (8, 8, 3))
            pixels[..., CHANNEL[name]] = rng.integers(100, 256)
            buf = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append(name)
    return images, labels


def register(folder: Path, name: str, classes: list[str], bias: list[float], code: bool = False):
    """Log a serving model like the package stage does, register it; return (version, local model)."""
    import mlflow

    folder.mkdir()
    settings = folder / "serving.json"
    labels = {"task": "multiclass", "classes": classes, "nodes": []}
    spec = {"image_size": 8, "channels": 3, "resize_mode": "squash", "mean": [0.0] * 3, "std": [1.0] * 3}
    settings.write_text(json.dumps({**spec, "labels": labels, "decision": {"task": "multiclass", "thresholds": []}}))
    artifacts = {"onnx": str(colour_model(folder / "model.onnx", classes, bias)), "settings": str(settings)}
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageClassifierModel(),
            artifacts=artifacts,
            code_paths=[str(Path(taxonomist.__file__).parent)] if code else None,
            pip_requirements=["onnxruntime"],
        )
    version = mlflow.register_model(info.model_uri, name).version
    return str(version), registry.served_model(artifacts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MlflowClient on a fresh SQLite store (and the experiment its runs go to)."""
    import mlflow

    folder = tmp_path_factory.mktemp("registry")
    previous = mlflow.get_tracking_uri()
    with tracking_variable_kept():  # set_tracking_uri exports MLFLOW_TRACKING_URI: later stages would read it
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("gate", (folder / "artifacts").as_uri()))
        yield mlflow.MlflowClient()
        mlflow.set_tracking_uri(previous)


def test_registry_flow(store, tmp_path):
    client, name = store, "taxonomist-colours-multiclass"
    images, labels = colour_images(COLOURS, per_class=40)
    metric = "test/f1_macro"

    def gate_and_promote(version, model, imgs=images, lbls=labels):
        result = registry.run_gate(client, name, version, model, imgs, lbls, metric, SETTINGS)
        return result, registry.promote(client, name, version, result["promoted"])

    # v1 favours blue: a weak first champion (logged with its code, as the package stage does).
    v1, weak = register(tmp_path / "v1", name, COLOURS, [6.0, 0.0, 0.0], code=True)
    result, promotion = gate_and_promote(v1, weak)
    assert result["reason"] == "first version" and promotion["aliases"] == ["candidate", "champion"]
    assert result["candidate_score"] < 0.9

    # v2 is unbiased: clearly better on the same images, so it is promoted; the champion was
    # downloaded and run without its copy of the taxonomist package reaching sys.path.
    path_before, module_before = list(sys.path), sys.modules["taxonomist"]
    v2, strong = register(tmp_path / "v2", name, COLOURS, [0.0, 0.0, 0.0])
    result, promotion = gate_and_promote(v2, strong)
    assert sys.path == path_before and sys.modules["taxonomist"] is module_before
    assert result["promoted"] is True, result["reason"]
    assert result["candidate_score"] == 1.0 and result["champion_score"] < 0.9
    assert result["champion_version"] == v1 and result["images"] == 120 and result["interval"][0] > 0
    assert promotion == {
        "name": name,
        "version": v2,
        "aliases": ["candidate", "champion"],
        "champion_version": v2,
        "promoted": True,
    }

    # v3 answers exactly like v2: not better, so the champion stays.
    v3, same = register(tmp_path / "v3", name, COLOURS, [0.0, 0.0, 0.0])
    result, promotion = gate_and_promote(v3, same)
    assert result["promoted"] is False and result["difference"] == 0.0
    assert promotion["aliases"] == ["candidate"] and promotion["champion_version"] == v2

    # v4 has another label space (two colours): refused, naming both.
    two = ["blue", "red"]
    v4, other = register(tmp_path / "v4", name, two, [0.0, 0.0])
    result, promotion = gate_and_promote(v4, other, *colour_images(two, per_class=10))
    assert result["promoted"] is False
    assert result["reason"] == (
        f"champion v{v2} has another label space (multiclass, 3 classes: blue, green, red; "
        "candidate: multiclass, 2 classes: blue, red)"
    )
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"candidate": v4, "champion": v2}


def test_download_model_names_a_model_without_the_artifacts(store, tmp_path):
    import mlflow

    from taxonomist.errors import RegistryError

    class Plain(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=Plain(), pip_requirements=["pandas"])
    version = mlflow.register_model(info.model_uri, "plain").version
    with pytest.raises(RegistryError, match="has no onnx or settings artifact"):
        registry.download_model("plain", str(version), tmp_path / "dl")
