"""The MLflow model served from the registry: raw image bytes in, answers + probabilities out.

Preprocessing (decode, mode conversion, resize, normalisation) runs inside the model, with
the same code the pipeline's preprocess stage uses; the network runs on ONNX Runtime, and
the task turns logits into probabilities and answers (:meth:`Task.answer`) with the same
NumPy code evaluation uses. This module and the tasks import no torch, so the served model
needs only onnxruntime, Pillow, NumPy and pandas.

The answer's columns are the task's: e.g. ``label`` + ``score`` (binary, multiclass),
``labels`` (a list: multilabel), ``label`` + ``path`` + ``score`` (hierarchical); plus one
``prob_<name>`` column per output, and ``error``: empty for an answered image, else why the
image has no answer (not an image, truncated, too many pixels...). One bad image never fails
the others.

The model holds its own limits (:class:`Limits`, from ``package.serving`` into
``serving.json``), so they apply under ``mlflow models serve``, ``mlflow models build-docker``
and ``taxonomist serve`` alike: pixels per image (read from the file's header, before
decoding), images per request and encoded bytes per request. A request over a limit, or
without an ``image`` column of encoded bytes, is refused as a whole with one line and
``BAD_REQUEST`` (HTTP 400), never with a stack trace.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from taxonomist.data.images import ImageSpec, InvalidImage, decode
from taxonomist.tasks import Decision, Task, load_task

IMAGE_COLUMN = "image"
ERROR_COLUMN = "error"


@dataclass(frozen=True)
class Limits:
    """What one request to the served model may hold (``package.serving``)."""

    max_pixels: int = 25_000_000  # per image (a 6000 x 4000 photo is 24 M): Pillow's own guard is 179 M
    max_images: int = 256  # per request
    max_request_mb: float = 64.0  # encoded image bytes per request

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Limits:
        """Limits from ``serving.json`` (a model packaged before limits existed gets the defaults)."""
        values = values or {}
        return cls(
            max_pixels=int(values.get("max_pixels", cls.max_pixels)),
            max_images=int(values.get("max_images", cls.max_images)),
            max_request_mb=float(values.get("max_request_mb", cls.max_request_mb)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The limits as ``serving.json`` stores them."""
        return asdict(self)


def bad_request(message: str) -> MlflowException:
    """A refused request: HTTP 400 from the scoring server, with ``message`` and no stack trace."""
    return MlflowException(message, error_code=BAD_REQUEST)


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: a DataFrame with an ``image`` column of encoded image bytes (PNG/JPEG/...)
    -> a DataFrame with the task's answer columns, one ``prob_<name>`` column per output and
    an ``error`` column (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        import onnxruntime as ort

        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.task = load_task(settings["labels"])
        self.decision = Decision.from_dict(settings["decision"])
        self.limits = Limits.from_dict(settings.get("limits"))
        self.spec = ImageSpec(
            size=int(settings["image_size"]),
            channels=int(settings["channels"]),
            resize_mode=str(settings["resize_mode"]),
        )
        self.mean = np.asarray(settings["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(settings["std"], dtype=np.float32).reshape(1, -1, 1, 1)
        self.session = ort.InferenceSession(context.artifacts["onnx"], providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _images(self, model_input: Any) -> list[bytes]:
        """The request's encoded images, checked against the limits (a :func:`bad_request` if not)."""
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                got = ", ".join(repr(str(c)) for c in model_input.columns[:5]) or "none"
                raise bad_request(f"the input needs a column {IMAGE_COLUMN!r} of encoded images; got columns {got}")
            values = list(model_input[IMAGE_COLUMN])
        elif isinstance(model_input, dict) and IMAGE_COLUMN in model_input:
            values = list(model_input[IMAGE_COLUMN])
        else:
            values = list(model_input)
        limits = self.limits
        if len(values) > limits.max_images:
            raise bad_request(
                f"{len(values)} images in one request; the limit is {limits.max_images} (package.serving.max_images)"
            )
        for k, value in enumerate(values):
            if not isinstance(value, bytes | bytearray):
                raise bad_request(
                    f"row {k}: {IMAGE_COLUMN!r} must hold encoded image bytes (base64 in JSON), "
                    f"not {type(value).__name__}"
                )
        total = sum(len(v) for v in values)
        if total > limits.max_request_mb * 1e6:
            raise bad_request(
                f"{total / 1e6:.1f} MB of images in one request; the limit is {limits.max_request_mb:g} MB "
                "(package.serving.max_request_mb)"
            )
        return [bytes(v) for v in values]

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = self._images(model_input)
        errors = [""] * len(images)
        decoded: list[np.ndarray] = []
        rows: list[int] = []
        for k, data in enumerate(images):
            try:
                decoded.append(decode(data, self.spec, max_pixels=self.limits.max_pixels))
                rows.append(k)
            except InvalidImage as err:
                errors[k] = str(err)
            except Exception as err:  # a decoder bug must not take the other images (or a stack trace) with it
                errors[k] = f"cannot decode: {type(err).__name__}"
        logits = np.zeros((0, self.task.num_outputs), dtype=np.float32)
        if decoded:
            batch = np.stack(decoded).astype(np.float32) / 255.0
            batch = (batch.transpose(0, 3, 1, 2) - self.mean) / self.std
            logits = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        answers = answer_frame(logits, self.task, self.decision)
        if len(rows) < len(images):  # rows without an answer: None in every answer column
            answers = answers.astype(object).set_axis(rows).reindex(range(len(images)))
            answers = answers.astype(object).where(answers.notna(), None)
        answers[ERROR_COLUMN] = errors
        return answers

    def columns(self) -> list[str]:
        """The output columns of this model's task."""
        return [*answer_frame(np.zeros((0, self.task.num_outputs)), self.task, self.decision).columns, ERROR_COLUMN]


def answer_frame(logits: np.ndarray, task: Task, decision: Decision) -> pd.DataFrame:
    """The served answer of each row of logits (see the module docstring)."""
    return task.served(logits, decision)
