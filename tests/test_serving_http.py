"""The served model over real HTTP on loopback: ``taxonomist serve`` (MLflow's server behind
the guard) and stock ``mlflow models serve``, with good, bad and hostile requests."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import free_port
from mlflow.models import infer_signature
from test_predict import CLASSES, bomb_png, dist, png  # noqa: F401 - dist is a fixture

import taxonomist
from taxonomist.export import registry
from taxonomist.export.server import one_line
from taxonomist.export.serving import ImageClassifierModel


@pytest.fixture(scope="module")
def mlflow_model(dist, tmp_path_factory) -> Path:  # noqa: F811 - the fixture imported above
    """The dist/ model saved as an MLflow model, as the package stage logs it."""
    artifacts = {"onnx": str(dist / "model.onnx"), "settings": str(dist / "serving.json")}
    examples = pd.DataFrame({"image": [png(0), png(1)]})
    signature = infer_signature(examples, registry.served_model(artifacts).predict(None, examples))
    folder = tmp_path_factory.mktemp("mlflow-model") / "model"
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=ImageClassifierModel(),
        artifacts=artifacts,
        code_paths=[str(Path(taxonomist.__file__).parent)],
        signature=signature,
    )
    return folder


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Start a server on loopback and wait (at most a minute) until it answers /ping."""
    with open(log, "w") as out:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # mlflow runs `uvicorn`
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": path}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"the server did not answer within a minute: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"message": text.decode()}


def images_request(images: list[bytes], column: str = "image") -> bytes:
    rows = [[base64.b64encode(b).decode()] for b in images]
    return json.dumps({"dataframe_split": {"columns": [column], "data": rows}}).encode()


@pytest.fixture(scope="module")
def guarded(mlflow_model, tmp_path_factory) -> Iterator[int]:
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "taxonomist.cli", "serve", "--model", str(mlflow_model), "--port", str(port)]
    proc = start([*cmd, "--max-body-mb", "1.5", "--concurrency", "2"], port, log)
    yield port
    stop(proc)


def assert_one_clean_line(answer: dict) -> None:
    text = json.dumps(answer)
    assert set(answer) == {"error_code", "message"}
    assert "\n" not in answer["message"] and "Traceback" not in text and "stack_trace" not in text
    assert str(Path(taxonomist.__file__).parent) not in text and "site-packages" not in text


def test_taxonomist_serve_answers_and_gives_a_bad_image_its_own_error(guarded):
    status, answer = post(guarded, images_request([png(0), bomb_png(12_000, 12_000), b"not an image", png(1)]))
    assert status == 200
    rows = answer["predictions"]
    assert [r["error"] == "" for r in rows] == [True, False, False, True]
    assert rows[0]["label"] in CLASSES and rows[3]["label"] in CLASSES
    assert rows[1]["error"] == "too large: 12000 x 12000 pixels is over the limit of 1,000,000 pixels"
    assert rows[2]["label"] is None and rows[2]["error"] == "cannot decode: not an image file (no known image format)"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (images_request([png(0)], column="img"), 400, "missing inputs ['image']"),
        (images_request([png(0)] * 9), 400, "9 images in one request; the limit is 8 (package.serving.max_images)"),
        (b'{"dataframe_split": ', 400, ""),
        (images_request([b"x" * 1_200_000]), 413, "the request body is over the limit of 1.5 MB"),
    ],
    ids=["wrong column", "too many images", "not JSON", "body too large"],
)
def test_taxonomist_serve_refuses_a_bad_request_in_one_clean_line(guarded, body, status, words):
    got, answer = post(guarded, body)
    assert got == status
    assert_one_clean_line(answer)
    assert words in answer["message"] and answer["message"]


def test_one_line_keeps_what_follows_mlflows_last_error():
    said = "Failed to predict data '   image\n0  b'...'. \nError: 9 images in one request; the limit is 8\nmore"
    assert one_line(said) == "9 images in one request; the limit is 8"
    assert one_line("Invalid input. The input must be JSON.") == "Invalid input. The input must be JSON."


def test_stock_mlflow_models_serve_keeps_the_models_limits(mlflow_model, tmp_path):
    """Under ``mlflow models serve`` (no guard) the model's own limits hold: per-row errors, a
    400 for too many images, and no stack trace in the answer."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "models", "serve", "-m", str(mlflow_model), "--env-manager", "local"]
    proc = start([*cmd, "-h", "127.0.0.1", "-p", str(port)], port, tmp_path / "mlflow-serve.log")
    try:
        status, answer = post(port, images_request([png(0), bomb_png(12_000, 12_000)]))
        assert status == 200
        assert [r["error"] for r in answer["predictions"]][1].startswith("too large: 12000 x 12000 pixels")
        status, answer = post(port, images_request([png(0)] * 9))
        assert status == 400 and "9 images in one request; the limit is 8" in answer["message"]
        assert "stack_trace" not in answer
    finally:
        stop(proc)
