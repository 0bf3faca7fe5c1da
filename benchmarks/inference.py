"""Inference figures: the packaged ONNX model on ONNX Runtime against PyTorch eager.

Both run the same trained weights on the same standardised test images, on the CPU with every
core: the eager side is ``models/best.ckpt`` rebuilt by ``load_classifier`` (float32, eval
mode, channels-last as trained), the ONNX side is ``dist/model.onnx`` in an
``onnxruntime.InferenceSession``, as the packaged MLflow model serves it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from taxonomist.config import load_params
from taxonomist.data import auto
from taxonomist.data.cache import read_split
from taxonomist.data.transforms import normalise
from taxonomist.export.onnx import INPUT_NAME
from taxonomist.models.inference import load_classifier


def _latencies(fn: Callable[[np.ndarray], object], inputs: list[np.ndarray], warmup: int) -> list[float]:
    for x in inputs[:warmup]:
        fn(x)
    out = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - start)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def compare(root: Path, single: int = 300, batches: int = 10, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """Batch-1 latency (p50, p95, ms) and batch-``batch_size`` throughput (images/s) of both."""
    import onnxruntime as ort

    cfg = auto.resolve(load_params(root / "params.yaml"), root / "data/processed")  # numbers, not auto
    test = read_split(root / "data/processed", "test")
    x = normalise(test.images[: max(single, batch_size)], cfg.preprocess.mean, cfg.preprocess.std)
    ones = [x[i : i + 1] for i in range(single)]
    big = [x[:batch_size]] * batches

    module = load_classifier(root / "models/best.ckpt")

    def eager(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).float().numpy()

    session = ort.InferenceSession(str(root / "dist/model.onnx"), providers=["CPUExecutionProvider"])

    def onnx(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {INPUT_NAME: batch})[0]

    results = {}
    for name, fn in (("eager", eager), ("onnx", onnx)):
        lat = _latencies(fn, ones, warmup=20)
        runs = _latencies(fn, big, warmup=2)
        results[name] = {
            "p50_ms": percentile(lat, 50) * 1e3,
            "p95_ms": percentile(lat, 95) * 1e3,
            "throughput": batch_size / statistics.median(runs),
        }
    return results
