"""The MLflow model served from the registry: raw image bytes in, answers + probabilities out.

Preprocessing (decode, mode conversion, resize, normalisation) runs inside the model, with
the same code the pipeline's preprocess stage uses; the network runs on ONNX Runtime, and
the task turns logits into probabilities and answers (:meth:`Task.answer`) with the same
NumPy code evaluation uses. This module and the tasks import no torch, so the served model
needs only onnxruntime, Pillow, NumPy and pandas.

The answer's columns are the task's: e.g. ``label`` + ``score`` (binary, multiclass),
``labels`` (a list: multilabel), ``label`` + ``path`` + ``score`` (hierarchical); plus one
``prob_<name>`` column per output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from taxonomist.data.images import ImageSpec, decode
from taxonomist.tasks import Decision, Task, load_task

IMAGE_COLUMN = "image"


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: a DataFrame with an ``image`` column of encoded image bytes (PNG/JPEG/...)
    -> a DataFrame with the task's answer columns and one ``prob_<name>`` column per output."""

    def load_context(self, context: Any) -> None:
        import onnxruntime as ort

        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.task = load_task(settings["labels"])
        self.decision = Decision.from_dict(settings["decision"])
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
        if isinstance(model_input, pd.DataFrame):
            if IMAGE_COLUMN not in model_input.columns:
                raise ValueError(f"input needs a column {IMAGE_COLUMN!r} of encoded image bytes")
            values = list(model_input[IMAGE_COLUMN])
        else:
            values = list(model_input)
        out = []
        for v in values:
            if isinstance(v, str) and Path(v).is_file():
                v = Path(v).read_bytes()
            if not isinstance(v, bytes | bytearray):
                raise ValueError(f"expected encoded image bytes, got {type(v).__name__}")
            out.append(bytes(v))
        return out

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = self._images(model_input)
        if not images:
            return pd.DataFrame(columns=self.columns())
        batch = np.stack([decode(b, self.spec) for b in images]).astype(np.float32) / 255.0
        batch = (batch.transpose(0, 3, 1, 2) - self.mean) / self.std
        logits = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return answer_frame(logits, self.task, self.decision)

    def columns(self) -> list[str]:
        """The output columns of this model's task."""
        return list(answer_frame(np.zeros((0, self.task.num_outputs)), self.task, self.decision).columns)


def answer_frame(logits: np.ndarray, task: Task, decision: Decision) -> pd.DataFrame:
    """The served answer of each row of logits (see the module docstring)."""
    return task.answer(task.probabilities(logits), decision)
