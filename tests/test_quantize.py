"""The INT8 ONNX copy (taxonomist.export.quantize): quantize, compare on test images, decide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

from taxonomist.data.transforms import normalise
from taxonomist.errors import RegistryError
from taxonomist.export import quantize, registry
from taxonomist.export.model_card import int8_section
from taxonomist.export.onnx import INPUT_NAME, export_onnx
from taxonomist.tasks import load_task
from taxonomist.tasks.base import Decision

CLASSES = ["circle", "square", "triangle"]
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
SIZE = 32


def cnn(seed: int, fit_head: bool = True) -> torch.nn.Module:
    """A timm CNN (no pretrained weights): random convolutions with non-trivial BatchNorm
    statistics and a head fitted (ridge regression on the pooled features) to tell the three
    kinds of :func:`images` apart, so that its answers have margins like a trained model's
    (``fit_head=False``: the random head, a worse model)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASSES), in_chans=3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        if not fit_head:
            return model
        x = torch.from_numpy(normalise(images(96, seed=100 + seed), MEAN, STD))
        features = model.forward_head(model.forward_features(x), pre_logits=True).double()
        features = torch.cat([features, torch.ones(len(x), 1, dtype=torch.double)], 1)
        target = 4.0 * (torch.nn.functional.one_hot(torch.arange(len(x)) % 3, 3).double() - 0.5)
        ridge = features.T @ features + 1e-2 * torch.eye(features.shape[1], dtype=torch.double)
        fitted = torch.linalg.solve(ridge, features.T @ target)
        head = model.get_classifier()
        head.weight.copy_(fitted[:-1].T)
        head.bias.copy_(fitted[-1])
    return model


def images(n: int, seed: int) -> np.ndarray:
    """uint8 (N, H, W, C) images of three kinds (vertical, horizontal and diagonal stripes, each
    in its own colour) with random phase, brightness and noise: a random network tells the kinds
    apart by a margin, as a trained one tells classes apart."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.empty((n, SIZE, SIZE, 3), np.float32)
    for i in range(n):
        kind = i % 3
        coord = (xx, yy, xx + yy)[kind]
        stripes = np.sin(coord * rng.uniform(0.4, 0.8) + rng.uniform(0, 2 * np.pi))
        colour = np.full(3, 0.2, np.float32)
        colour[kind] = 1.0
        out[i] = stripes[..., None] * colour * rng.uniform(0.6, 1.0) + rng.normal(0, 0.1, (SIZE, SIZE, 3))
    return np.clip(127 + 100 * out, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The fp32 export, its static and dynamic INT8 copies and another (worse) fp32 model."""
    folder = tmp_path_factory.mktemp("dist")
    example = torch.randn(2, 3, SIZE, SIZE)
    fp32 = export_onnx(cnn(0), example, folder / "model.onnx")
    other = export_onnx(cnn(1, fit_head=False), example, folder / "other.onnx")
    calibration = normalise(images(64, seed=1), MEAN, STD)
    return {
        "fp32": fp32,
        "other": other,
        "static": quantize.quantize_onnx(fp32, folder / "model.int8.onnx", calibration, "static"),
        "dynamic": quantize.quantize_onnx(fp32, folder / "model.dynamic.onnx", None, "dynamic"),
    }


@pytest.fixture(scope="module")
def test_split(models) -> tuple[np.ndarray, np.ndarray]:
    """Test images whose targets are the fp32 model's own answers (here: their kinds): fp32
    scores 1.0 on them, so any model that answers otherwise scores lower."""
    x = images(150, seed=2)
    logits = quantize.logits_of(quantize.session(models["fp32"]), x, MEAN, STD)
    target = logits.argmax(1)
    assert np.bincount(target, minlength=3).min() > 0, "the model answers too few classes: pick other seeds"
    return x, target


TASK = load_task({"task": "multiclass", "classes": CLASSES, "nodes": []})


def compared(models, test_split, int8: str) -> dict:
    x, target = test_split
    return quantize.compare(
        models["fp32"], models[int8], x, target, TASK, Decision(), "test/f1_macro", MEAN, STD, threads=1, runs=5
    )


@pytest.mark.parametrize("method", ["static", "dynamic"])
def test_quantized_model_is_smaller_and_runs(models, method):
    path = models[method]
    assert path.is_file() and sorted(p.name for p in path.parent.glob("*.tmp.onnx")) == []
    assert not list(path.parent.glob("*.pre.onnx"))  # the pre-processed copy is removed
    assert path.stat().st_size < 0.5 * models["fp32"].stat().st_size
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert (
        ("QuantizeLinear" in ops and "DequantizeLinear" in ops)
        if method == "static"
        else "DynamicQuantizeLinear" in ops
    )
    x = normalise(images(5, seed=3), MEAN, STD)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    ref = ort.InferenceSession(str(models["fp32"]), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: x})[0]
    assert got.shape == ref.shape == (5, len(CLASSES)) and got.dtype == np.float32
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9  # INT8 rounding, not another model


def test_quantize_rejects_bad_arguments(models, tmp_path):
    with pytest.raises(ValueError, match="method 'fp16'"):
        quantize.quantize_onnx(models["fp32"], tmp_path / "x.onnx", None, "fp16")
    with pytest.raises(ValueError, match="needs calibration images"):
        quantize.quantize_onnx(models["fp32"], tmp_path / "x.onnx", np.zeros((0, 3, SIZE, SIZE), np.float32))
    assert not list(tmp_path.iterdir())


def test_compare_reports_both_models_per_class_and_latency(models, test_split):
    result = compared(models, test_split, "static")
    assert result["images"] == 150 and result["metric"] == "test/f1_macro" and result["unit"] == "class"
    assert result["fp32"]["score"] == pytest.approx(1.0)
    assert result["int8"]["score"] == pytest.approx(result["int8"]["metrics"]["f1_macro"])
    assert result["delta"] == pytest.approx(result["int8"]["score"] - 1.0)
    rows = result["per_class"]
    assert sorted(r["class"] for r in rows) == CLASSES
    assert [r["delta"] for r in rows] == sorted(r["delta"] for r in rows)  # worst first
    for r in rows:
        assert r["delta"] == pytest.approx(r["int8_f1"] - r["fp32_f1"], abs=1e-6)
    assert result["worst_class"] == rows[0]
    assert 0.9 <= result["agreement"] <= 1.0  # INT8 rounding changes few answers
    for name in ("fp32", "int8"):
        assert result[name]["ms_per_image_batch1"] > 0 and result[name]["images_per_s_batch32"] > 0
    assert result["int8"]["size_bytes"] < result["fp32"]["size_bytes"]


def test_a_worse_model_does_not_ship_at_zero_tolerance_and_ships_at_a_generous_one(models, test_split):
    """The "INT8" model here is another network, with a random head: it answers otherwise on
    many test images."""
    result = compared(models, test_split, "other")
    assert result["delta"] < -0.2 and result["agreement"] < 0.8
    shipped, reason = quantize.decide(result, tolerance=0.0, class_tolerance=0.0)
    assert not shipped
    assert reason.startswith("fp32 ships: test/f1_macro") and "beyond the tolerance 0" in reason
    assert f"class {result['worst_class']['class']} F1" in reason
    shipped, reason = quantize.decide(result, tolerance=1.0, class_tolerance=1.0)
    assert shipped and reason.startswith("int8 ships")
    # Only the per-class tolerance is exceeded: still not shipped, and the reason says which.
    shipped, reason = quantize.decide(result, tolerance=1.0, class_tolerance=0.0)
    assert not shipped and "beyond the tolerance" not in reason and "class tolerance 0" in reason


def test_the_real_int8_model_ships_within_the_default_tolerances(models, test_split):
    result = compared(models, test_split, "static")
    report = quantize.record(result, quantize.Int8Settings(), {"split": "train", "images": 64})
    assert report["shipped"] == (result["delta"] >= -0.01 and result["worst_class"]["delta"] >= -0.03)
    assert report["shipped"], report["reason"]
    assert report["precision"] == "int8" and report["settings"]["method"] == "static"
    metrics = quantize.mlflow_metrics(report)
    assert metrics["package/int8_shipped"] == 1.0 and metrics["package/int8_fp32_score"] == pytest.approx(1.0)
    assert all(k.startswith("package/int8_") for k in metrics)
    section = "\n".join(int8_section(report))
    assert "## INT8 export" in section and "- Shipped: **int8**: int8 ships" in section
    worst = result["worst_class"]
    assert f"| worst class F1 difference | | | {worst['delta']:+.4f} ({worst['class']}) |" in section
    assert "| file size (MB) | " in section and "| images/s (batch 32) | " in section


def test_not_built_record_and_card():
    report = quantize.not_built(quantize.Int8Settings(enabled=False), "package.int8.enabled is false")
    assert report["precision"] == "fp32" and not report["shipped"]
    assert quantize.mlflow_metrics(report) == {"package/int8_shipped": 0.0}
    section = "\n".join(int8_section(report))
    assert "## INT8 export" in section and "package.int8.enabled is false" in section


def test_agreement_and_calibration_sample():
    assert quantize.agreement(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75
    assert quantize.agreement(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [1, 0]])) == 0.5
    x = np.zeros((10, 4, 4, 3), np.uint8)
    assert quantize.calibration_sample(x, 20, seed=0).tolist() == list(range(10))
    picked = quantize.calibration_sample(x, 4, seed=0)
    assert len(set(picked.tolist())) == 4 and picked.tolist() == sorted(picked.tolist())
    assert picked.tolist() == quantize.calibration_sample(x, 4, seed=0).tolist()


def test_a_dist_folder_serves_the_precision_serving_json_names(models, tmp_path):
    folder = tmp_path / "dist"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(models["fp32"].read_bytes())
    (folder / "serving.json").write_text('{"precision": "int8"}')
    with pytest.raises(RegistryError, match=r"ships the int8 model but model\.int8\.onnx is missing"):
        registry.local_artifacts(folder)
    (folder / "model.int8.onnx").write_bytes(models["static"].read_bytes())
    assert registry.local_artifacts(folder)["onnx"] == str(folder / "model.int8.onnx")
    (folder / "serving.json").write_text('{"precision": "fp32"}')
    assert registry.local_artifacts(folder)["onnx"] == str(folder / "model.onnx")
    (folder / "serving.json").write_text("{}")  # packaged before the INT8 export existed
    assert registry.local_artifacts(folder)["onnx"] == str(folder / "model.onnx")
