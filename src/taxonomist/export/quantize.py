"""INT8 ONNX: quantize the fp32 export with ONNX Runtime, measure what it costs, decide if it ships.

:func:`quantize_onnx` writes an INT8 copy of the verified fp32 model with
``onnxruntime.quantization``: ``static`` (the default) is QDQ with uint8 activations and
per-channel int8 weights (U8S8), its activation ranges calibrated (min/max) on a sample of
training images; ``dynamic`` quantizes the weights only and computes the activations' ranges per
batch at run time (no calibration data; a fallback). On the default Fashion-MNIST model (Intel
Xeon with VNNI, one thread) U8S8 ran at 0.24 ms per image against fp32's 0.75; int8 activations
(S8S8) took 1.4 ms and dynamic 3.3 ms, both slower than fp32. The model's interface is
unchanged: float32 ``input`` (normalised N, C, H, W) in, float32 ``logits`` out, so the served
model runs either file.

:func:`compare` runs both files on the same test images, scores each with the task
(:meth:`Task.calibrated_probabilities`, :meth:`Task.decide`, :meth:`Task.evaluate`, through
:func:`taxonomist.export.gate.score`) and reports the headline metric of both, the per-unit F1
differences (:func:`taxonomist.export.gate.class_deltas`), how often the two answer alike, the
latency (median ms per image at batch 1, images/s at batch 32, single-threaded by default) and
the file sizes. :func:`decide` ships the INT8 file only when the headline metric drops by at
most ``tolerance`` and no unit's F1 by more than ``class_tolerance`` (every primary test metric
is higher-is-better, as the champion gate assumes).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taxonomist.config import INT8_METHODS
from taxonomist.data.transforms import normalise
from taxonomist.export.gate import Scored, class_deltas, score
from taxonomist.export.onnx import INPUT_NAME
from taxonomist.tasks.base import Decision, Task

log = logging.getLogger(__name__)
REPORT_FILE = "quantization.json"
FP32, INT8 = "fp32", "int8"
CALIBRATION_BATCH = 32  # images per calibration batch
EVAL_BATCH = 256  # images per batch when scoring the test split
THROUGHPUT_BATCH = 32  # the batch size of the images/s figure


@dataclass(frozen=True)
class Int8Settings:
    """``package.int8``: how to quantize, how to measure and how much may be lost."""

    enabled: bool = True
    method: str = "static"
    calibration_images: int = 256
    tolerance: float = 0.01
    class_tolerance: float = 0.03
    latency_runs: int = 50
    threads: int = 1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Int8Settings:
        """The settings of a ``package.int8`` mapping (every key required, as conf/ has them)."""
        return cls(
            enabled=bool(values["enabled"]),
            method=str(values["method"]),
            calibration_images=int(values["calibration_images"]),
            tolerance=float(values["tolerance"]),
            class_tolerance=float(values["class_tolerance"]),
            latency_runs=int(values["latency_runs"]),
            threads=int(values["threads"]),
        )


def _calibration_reader(calibration: np.ndarray, batch: int = CALIBRATION_BATCH) -> Any:
    """A ``CalibrationDataReader`` over ``calibration`` (normalised N, C, H, W) in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = (
                {INPUT_NAME: np.ascontiguousarray(calibration[i : i + batch], dtype=np.float32)}
                for i in range(0, len(calibration), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Reader()


def _preprocessed(fp32_path: Path, out_path: Path) -> Path:
    """The fp32 model after ``quant_pre_process`` (shape inference, graph optimisation), the
    quantizer's recommended input; the model itself when that step fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre))
        return pre
    except Exception as err:  # an op symbolic shape inference does not know: quantize the model as exported
        log.info("quant_pre_process failed (%s: %s); quantizing the model as exported", type(err).__name__, err)
        pre.unlink(missing_ok=True)
        return fp32_path


def quantize_onnx(fp32_path: Path, out_path: Path, calibration: np.ndarray | None, method: str = "static") -> Path:
    """Write an INT8 copy of the fp32 ONNX model ``fp32_path`` to ``out_path`` (one file).

    ``static``: QDQ, uint8 activations and per-channel int8 weights, activation ranges from
    ``calibration`` (normalised float32 N, C, H, W images; a few hundred are plenty);
    ``dynamic``: per-channel int8 weights, activation ranges at run time (``calibration`` unused).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method not in INT8_METHODS:
        raise ValueError(f"quantization method {method!r}; use one of {INT8_METHODS}")
    if method == "static" and (calibration is None or len(calibration) == 0):
        raise ValueError("static quantization needs calibration images")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    source = _preprocessed(fp32_path, out_path)
    tmp = out_path.with_suffix(".tmp.onnx")
    try:
        if method == "static":
            quantize_static(
                str(source),
                str(tmp),
                _calibration_reader(calibration),  # type: ignore[arg-type]
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        else:
            quantize_dynamic(str(source), str(tmp), per_channel=True, weight_type=QuantType.QInt8)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
        if source != fp32_path:
            source.unlink(missing_ok=True)
    return out_path


def calibration_sample(images: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of ``count`` images (all when fewer) drawn without replacement, seeded, sorted
    (the memory-mapped cache reads them in order)."""
    n = len(images)
    if count >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


# ---------------------------------------------------------------------- measuring


def session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session; ``threads`` > 0 fixes the intra-op threads (0: ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def logits_of(sess: Any, images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Logits of uint8 (N, H, W, C) ``images``, normalised batch by batch as the package stage does."""
    out = [
        sess.run(None, {INPUT_NAME: normalise(images[i : i + EVAL_BATCH], mean, std)})[0]
        for i in range(0, len(images), EVAL_BATCH)
    ]
    return np.concatenate(out) if out else np.zeros((0, sess.get_outputs()[0].shape[-1]), np.float32)


def latency(path: Path, images: np.ndarray, threads: int, runs: int) -> dict[str, float]:
    """Median ms per image at batch 1 (``runs`` runs over the first images, after a warm-up run)
    and images/s at batch :data:`THROUGHPUT_BATCH` (median of ``max(3, runs // 10)`` runs) of
    ``images`` (normalised N, C, H, W), with ``threads`` intra-op threads."""
    sess = session(path, threads)
    one = [np.ascontiguousarray(images[i % len(images)][None]) for i in range(max(1, runs))]
    sess.run(None, {INPUT_NAME: one[0]})
    times = []
    for x in one:
        start = time.perf_counter()
        sess.run(None, {INPUT_NAME: x})
        times.append(time.perf_counter() - start)
    batch = np.ascontiguousarray(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])))
    sess.run(None, {INPUT_NAME: batch})
    batch_times = []
    for _ in range(max(3, runs // 10)):
        start = time.perf_counter()
        sess.run(None, {INPUT_NAME: batch})
        batch_times.append(time.perf_counter() - start)
    return {
        "ms_per_image_batch1": 1000 * statistics.median(times),
        f"images_per_s_batch{THROUGHPUT_BATCH}": THROUGHPUT_BATCH / statistics.median(batch_times),
    }


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The share of images whose decided answers (:meth:`Task.decide`) are the same (every column)."""
    a, b = np.asarray(a), np.asarray(b)
    if not len(a):
        return 1.0
    same = a == b
    return float(same.reshape(len(a), -1).all(axis=1).mean())


def compare(
    fp32_path: Path,
    int8_path: Path,
    images: np.ndarray,
    target: np.ndarray,
    task: Task,
    decision: Decision,
    metric: str,
    mean: Sequence[float],
    std: Sequence[float],
    threads: int = 1,
    runs: int = 50,
) -> dict[str, Any]:
    """Both models on the same test images (uint8 N, H, W, C with their ``target``): the task's
    metrics of each, ``metric`` (a test metric, e.g. ``test/f1_macro``) of both and its
    difference (int8 - fp32), the per-unit F1 differences (worst first), the agreement of the
    decided answers, the latency of each (``threads`` intra-op threads, ``runs`` runs) and the
    file sizes."""
    short = metric.removeprefix("test/")
    scored: dict[str, Scored] = {}
    for name, path in ((FP32, fp32_path), (INT8, int8_path)):
        logits = logits_of(session(path), images, mean, std)
        scored[name] = score(task, task.calibrated_probabilities(logits, decision), target, decision)
    fp32, int8 = scored[FP32], scored[INT8]
    if short not in fp32.evaluation.metrics:
        raise ValueError(f"{metric} is not a test metric of task {task.name}: {sorted(fp32.evaluation.metrics)}")
    deltas = class_deltas(int8.evaluation, fp32.evaluation).rename(
        columns={"candidate_f1": "int8_f1", "champion_f1": "fp32_f1"}
    )
    probe = normalise(images[: max(THROUGHPUT_BATCH, min(runs, len(images)))], mean, std)
    worst = deltas.iloc[0].to_dict() if len(deltas) else None
    return {
        "metric": metric,
        "images": len(target),
        "unit": task.unit,
        FP32: {
            "score": float(fp32.evaluation.metrics[short]),
            "metrics": fp32.evaluation.metrics,
            "size_bytes": fp32_path.stat().st_size,
            **latency(fp32_path, probe, threads, runs),
        },
        INT8: {
            "score": float(int8.evaluation.metrics[short]),
            "metrics": int8.evaluation.metrics,
            "size_bytes": int8_path.stat().st_size,
            **latency(int8_path, probe, threads, runs),
        },
        "delta": float(int8.evaluation.metrics[short]) - float(fp32.evaluation.metrics[short]),
        "worst_class": worst,
        "agreement": agreement(fp32.pred, int8.pred),
        "latency": {"threads": threads, "runs": runs, "throughput_batch": THROUGHPUT_BATCH},
        "per_class": deltas.to_dict(orient="records"),
    }


def decide(comparison: dict[str, Any], tolerance: float, class_tolerance: float) -> tuple[bool, str]:
    """Ship the INT8 model when ``metric`` drops by at most ``tolerance`` and no unit's F1 by
    more than ``class_tolerance``; the decision and why, in words."""
    metric, unit = comparison["metric"], comparison["unit"]
    fp32, int8 = comparison[FP32]["score"], comparison[INT8]["score"]
    scores = f"{metric} {int8:.4f} (int8) vs {fp32:.4f} (fp32), {comparison['delta']:+.4f}"
    failures = []
    if comparison["delta"] < -tolerance:
        failures.append(f"{scores}: a drop beyond the tolerance {tolerance:g}")
    drops = [r for r in comparison["per_class"] if r["delta"] < -class_tolerance]
    if drops:
        worst = drops[0]
        more = f" (and {len(drops) - 1} more)" if len(drops) > 1 else ""
        failures.append(
            f"{unit} {worst['class']} F1 {worst['int8_f1']:.4f} vs {worst['fp32_f1']:.4f} "
            f"({worst['delta']:+.4f}, class tolerance {class_tolerance:g}){more}"
        )
    if failures:
        return False, "fp32 ships: " + "; ".join(failures)
    return True, (
        f"int8 ships: {scores} (tolerance {tolerance:g}); no {unit} F1 lower by more than {class_tolerance:g}"
    )


def record(comparison: dict[str, Any], settings: Int8Settings, calibration: dict[str, Any]) -> dict[str, Any]:
    """``quantization.json``: the settings, the calibration, the comparison and the decision."""
    shipped, reason = decide(comparison, settings.tolerance, settings.class_tolerance)
    return {
        "enabled": True,
        "shipped": shipped,
        "precision": INT8 if shipped else FP32,
        "reason": reason,
        "settings": asdict(settings),
        "calibration": calibration,
        **comparison,
    }


def not_built(settings: Int8Settings, reason: str) -> dict[str, Any]:
    """``quantization.json`` when no INT8 model was built or measured (disabled, or it failed)."""
    return {
        "enabled": settings.enabled,
        "shipped": False,
        "precision": FP32,
        "reason": reason,
        "settings": asdict(settings),
    }


def mlflow_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``package/int8_*`` metrics of a ``quantization.json`` record (none when nothing was measured)."""
    if FP32 not in report:
        return {"package/int8_shipped": 0.0}
    fp32, int8 = report[FP32], report[INT8]
    tput = f"images_per_s_batch{THROUGHPUT_BATCH}"
    worst = report.get("worst_class") or {}
    values = {
        "package/int8_shipped": float(report["shipped"]),
        "package/int8_score": int8["score"],
        "package/int8_fp32_score": fp32["score"],
        "package/int8_delta": report["delta"],
        "package/int8_worst_class_delta": worst.get("delta"),
        "package/int8_agreement": report["agreement"],
        "package/int8_ms_per_image": int8["ms_per_image_batch1"],
        "package/int8_fp32_ms_per_image": fp32["ms_per_image_batch1"],
        "package/int8_images_per_s": int8[tput],
        "package/int8_fp32_images_per_s": fp32[tput],
        "package/int8_size_mb": int8["size_bytes"] / 1e6,
        "package/int8_fp32_size_mb": fp32["size_bytes"] / 1e6,
    }
    return {k: float(v) for k, v in values.items() if v is not None}
