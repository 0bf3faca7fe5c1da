"""The MLflow model served from the registry: raw image bytes in, labels + probabilities out.

Preprocessing (decode, mode conversion, resize, normalisation) runs inside the model, with
the same code the pipeline's preprocess stage uses, and the network runs on ONNX Runtime.
This module imports no torch, so the served model needs only onnxruntime, Pillow, NumPy and
pandas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from taxonomist.data.images import ImageSpec, decode

IMAGE_COLUMN = "image"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def prob_column(label: str) -> str:
    """Output column holding the probability of ``label``."""
    return f"prob_{label}"


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: a DataFrame with an ``image`` column of encoded image bytes (PNG/JPEG/...)
    -> a DataFrame with ``label``, ``score`` and one ``prob_<class>`` column per class."""

    def load_context(self, context: Any) -> None:
        import onnxruntime as ort

        settings = json.loads(Path(context.artifacts["preprocess"]).read_text())
        self.classes: list[str] = list(settings["classes"])
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
            return pd.DataFrame(columns=["label", "score", *map(prob_column, self.classes)])
        batch = np.stack([decode(b, self.spec) for b in images]).astype(np.float32) / 255.0
        batch = (batch.transpose(0, 3, 1, 2) - self.mean) / self.std
        logits = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        probs = softmax(logits.astype(np.float64))
        best = probs.argmax(axis=1)
        frame = pd.DataFrame({"label": [self.classes[i] for i in best], "score": probs[np.arange(len(best)), best]})
        for j, name in enumerate(self.classes):
            frame[prob_column(name)] = probs[:, j]
        return frame
