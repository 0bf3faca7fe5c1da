"""ONNX export, the MLflow serving model and the registry aliases (taxonomist.export)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import timm
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from taxonomist.data.images import ImageSpec, decode
from taxonomist.data.transforms import normalise
from taxonomist.export import registry
from taxonomist.export.onnx import INPUT_NAME, OUTPUT_NAME, export_onnx, verify_onnx
from taxonomist.export.serving import ImageClassifierModel
from taxonomist.models.tta import with_tta
from taxonomist.tasks.base import prob_column, softmax

CLASSES = ["circle", "square", "triangle"]
SETTINGS = {"image_size": 32, "channels": 3, "resize_mode": "squash", "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random test_resnet (in channels-last, as training uses it) exported to ONNX."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(CLASSES), in_chans=3).eval()
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("dist")
    example = torch.randn(2, 3, 32, 32)
    path = export_onnx(model, example, folder / "model.onnx")
    return model, path


def test_export_writes_one_self_contained_file(exported):
    _, path = exported
    assert path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temp or external data
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # a symbolic batch axis


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_matches_pytorch_at_any_batch(exported, batch):
    model, path = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (batch, len(CLASSES))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_verify_onnx(exported):
    model, path = exported
    x = torch.randn(5, 3, 32, 32)
    result = verify_onnx(model, path, x, batch_sizes=(1, 5))
    assert result["batch_sizes"] == [1, 5]
    assert 0.0 <= result["max_abs_diff"] < 1e-4
    with torch.no_grad():
        assert result["max_abs_logit"] == pytest.approx(float(model(x).abs().max()), rel=1e-5)


def test_verify_onnx_detects_a_different_model(exported):
    _, path = exported
    other = timm.create_model("test_resnet", num_classes=len(CLASSES), in_chans=3).eval()
    result = verify_onnx(other, path, torch.randn(3, 3, 32, 32), batch_sizes=(1,))
    assert result["max_abs_diff"] > 1e-3


def test_verify_onnx_detects_a_shape_mismatch(exported):
    _, path = exported
    four_classes = timm.create_model("test_resnet", num_classes=4, in_chans=3).eval()
    with pytest.raises(RuntimeError, match="ONNX output shape"):
        verify_onnx(four_classes, path, torch.randn(2, 3, 32, 32), batch_sizes=(1,))


# --------------------------------------------------------------------------- serving


def png_bytes(seed: int, size=(40, 30), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    _, path = exported
    pre = tmp_path_factory.mktemp("pre") / "serving.json"
    labels = {"task": "multiclass", "classes": CLASSES, "nodes": []}
    pre.write_text(json.dumps({**SETTINGS, "labels": labels, "decision": {"thresholds": []}}))
    context = SimpleNamespace(artifacts={"onnx": str(path), "settings": str(pre)})
    model = ImageClassifierModel()
    model.load_context(context)
    return model, context


def test_serving_predicts_labels_and_probabilities(served, exported):
    model, context = served
    images = [png_bytes(i, mode=mode) for i, mode in enumerate(["RGB", "L", "RGBA", "P"])]
    out = model.predict(context, pd.DataFrame({"image": images}))
    prob_cols = [prob_column(c) for c in CLASSES]
    assert out.columns.tolist() == ["label", "score", *prob_cols, "error"]
    assert len(out) == 4 and (out["error"] == "").all()
    probs = out[prob_cols].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert out["label"].tolist() == [CLASSES[i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(out["score"], probs.max(axis=1))

    # The same preprocessing as the pipeline (decode + normalise) and the PyTorch model agree.
    torch_model, _ = exported
    spec = ImageSpec(SETTINGS["image_size"], SETTINGS["channels"], SETTINGS["resize_mode"])
    pixels = np.stack([decode(b, spec) for b in images])
    x = torch.from_numpy(normalise(pixels, SETTINGS["mean"], SETTINGS["std"]))
    with torch.no_grad():
        expected = torch.softmax(torch_model(x).double(), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_serving_accepts_a_list_of_bytes_but_never_reads_a_server_path(served, tmp_path):
    model, context = served
    data = png_bytes(7)
    path = tmp_path / "img.png"
    path.write_bytes(data)
    from_bytes = model.predict(context, [data, bytearray(data)])
    from_frame = model.predict(context, pd.DataFrame({"image": [data]}))
    pd.testing.assert_frame_equal(from_bytes.iloc[[0]], from_frame)
    pd.testing.assert_frame_equal(from_bytes.iloc[[1]].reset_index(drop=True), from_frame)
    with pytest.raises(MlflowException, match="must hold encoded image bytes"):  # a client cannot make it read files
        model.predict(context, pd.DataFrame({"image": [str(path)]}))


def test_serving_empty_input(served):
    model, context = served
    out = model.predict(context, pd.DataFrame({"image": []}))
    assert out.empty
    assert out.columns.tolist() == ["label", "score", *map(prob_column, CLASSES), "error"]


def test_serving_rejects_bad_input(served):
    model, context = served
    with pytest.raises(MlflowException, match="column 'image'"):
        model.predict(context, pd.DataFrame({"img": [png_bytes(0)]}))
    with pytest.raises(MlflowException, match=r"must hold encoded image bytes .*, not int"):
        model.predict(context, pd.DataFrame({"image": [3]}))


def test_softmax_is_stable():
    logits = np.array([[1000.0, 1000.0, -1000.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(softmax(logits), [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])


# --------------------------------------------------------------------------- registry


@pytest.fixture(scope="module")
def mlflow_client(tmp_path_factory):
    """An MlflowClient on a fresh SQLite store, with a run that holds a (stand-in) model artifact."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("test", artifact_location=(folder / "artifacts").as_uri())
    run = client.create_run(experiment)
    model_dir = folder / "model"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"stand-in")
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    client.set_terminated(run.info.run_id)
    yield client, run.info.run_id
    mlflow.set_tracking_uri(previous)


def new_version(client, name: str, run_id: str, score: float | None, metric: str = "test/f1_macro") -> str:
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version
    if score is not None:
        client.set_model_version_tag(name, version, registry.tag_name(metric), str(score))
    return version


def aliases(client, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def test_tag_name():
    assert registry.tag_name("test/f1_macro") == "test_f1_macro"


def test_promote_moves_champion_only_when_the_gate_promotes(mlflow_client):
    client, run_id = mlflow_client
    name = "promote-test"
    client.create_registered_model(name)
    assert registry.current_champion(client, name) is None

    steps = [  # (the gate promoted it, champion version afterwards)
        (True, "1"),  # the first version
        (False, "1"),  # refused: stays candidate
        (True, "3"),
        (False, "3"),
    ]
    for i, (promoted, champion) in enumerate(steps, start=1):
        version = new_version(client, name, run_id, 0.5)
        assert str(version) == str(i)
        result = registry.promote(client, name, version, promoted)
        assert aliases(client, name) == {"candidate": str(i), "champion": champion}
        assert result == {
            "name": name,
            "version": str(i),
            "aliases": ["candidate", "champion"] if promoted else ["candidate"],
            "champion_version": champion,
            "promoted": promoted,
        }
        assert str(registry.current_champion(client, name).version) == champion


def test_promote_without_a_champion_leaves_none(mlflow_client):
    client, run_id = mlflow_client
    name = "refused-first"
    client.create_registered_model(name)
    version = new_version(client, name, run_id, score=None)
    result = registry.promote(client, name, version, promoted=False)
    assert result["champion_version"] is None and aliases(client, name) == {"candidate": str(version)}


def test_model_versions_point_at_the_logged_artifact(mlflow_client):
    client, run_id = mlflow_client
    files = [f.path for f in client.list_artifacts(run_id, "model")]
    assert files == ["model/model.onnx"]
    assert Path(client.download_artifacts(run_id, "model/model.onnx")).read_bytes() == b"stand-in"


def test_hflip_tta_averages_the_mirror_image_and_exports(exported, tmp_path):
    model, _ = exported
    tta = with_tta(model, "hflip").eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
        torch.testing.assert_close(tta(x), expected)
        torch.testing.assert_close(tta(x.flip(-1)), tta(x), rtol=1e-4, atol=1e-5)  # mirror-invariant answers
        assert not torch.allclose(expected, model(x), atol=1e-3)  # and not the plain model's
    path = export_onnx(tta, x[:2], tmp_path / "tta.onnx")
    result = verify_onnx(tta, path, x)
    assert result["max_abs_diff"] < 1e-4
    assert with_tta(model, "none") is model
    with pytest.raises(ValueError, match="unknown test-time augmentation"):
        with_tta(model, "vflip")
