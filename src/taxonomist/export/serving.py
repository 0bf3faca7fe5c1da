"""The MLflow model served from the registry: raw image bytes in, answers + probabilities out.

Preprocessing (decode, mode conversion, resize, normalisation) runs inside the model, with
the same code the pipeline's preprocess stage uses; the network runs on ONNX Runtime, and
the decision (tuned thresholds, the label tree) uses :mod:`taxonomist.tasks.decide`, as
evaluation does. This module imports no torch, so the served model needs only onnxruntime,
Pillow, NumPy and pandas.

The answer depends on the task: ``label`` + ``score`` (binary, multiclass), ``labels`` (a
list: multilabel), or ``label`` + ``path`` + ``score`` (hierarchical, the deepest predicted
node and its whole path); plus one ``prob_<class>`` column per class, label or node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from taxonomist.data.images import ImageSpec, decode
from taxonomist.tasks.decide import Decision, decide, path_text, probabilities
from taxonomist.tasks.labels import LabelSpace

IMAGE_COLUMN = "image"


def prob_column(label: str) -> str:
    """Output column holding the probability of ``label``."""
    return f"prob_{label}"


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc model: a DataFrame with an ``image`` column of encoded image bytes (PNG/JPEG/...)
    -> a DataFrame with the task's answer columns and one ``prob_<name>`` column per output."""

    def load_context(self, context: Any) -> None:
        import onnxruntime as ort

        settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.space = LabelSpace.from_dict(settings["labels"])
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
        return answer_frame(logits, self.space, self.decision)

    def columns(self) -> list[str]:
        """The output columns of this model's task."""
        return list(answer_frame(np.zeros((0, self.space.num_outputs)), self.space, self.decision).columns)


def answer_frame(logits: np.ndarray, space: LabelSpace, decision: Decision) -> pd.DataFrame:
    """The served answer of each row of logits (see the module docstring)."""
    probs = probabilities(logits, space)
    picked = decide(probs, space, decision)
    rows = np.arange(len(probs))
    if space.task == "binary":
        two = np.stack([1.0 - probs, probs], axis=1)
        frame = pd.DataFrame({"label": [space.classes[i] for i in picked], "score": two[rows, picked]})
        names, columns = space.classes, two
    elif space.task == "multilabel":
        labels = np.asarray(space.classes, dtype=object)
        frame = pd.DataFrame({"labels": [list(labels[row]) for row in picked]})
        names, columns = space.classes, probs
    elif space.task == "hierarchical":
        sep = decision.path_separator
        frame = pd.DataFrame(
            {
                "label": [space.nodes[i].rpartition("/")[2] if i >= 0 else "" for i in picked],
                "path": [path_text(space, i, sep) for i in picked],
                "score": np.where(picked >= 0, probs[rows, np.maximum(picked, 0)], 0.0) if len(rows) else [],
            }
        )
        names, columns = space.nodes, probs
    else:
        frame = pd.DataFrame({"label": [space.classes[i] for i in picked], "score": probs[rows, picked]})
        names, columns = space.classes, probs
    for j, name in enumerate(names):
        frame[prob_column(name)] = columns[:, j] if len(rows) else []
    return frame
