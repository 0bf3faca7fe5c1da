"""Export a trained classifier to ONNX with a dynamic batch axis and verify it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class _Exportable(torch.nn.Module):
    """The bare backbone in float32 and contiguous layout (ONNX has no channels-last)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.float().to(memory_format=torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int = 18) -> Path:
    """Write ``model`` as ONNX with a dynamic batch axis; :func:`verify_onnx` checks it after.

    The TorchScript-based exporter goes first while PyTorch still has it: on the default model
    it took 0.35 s against ~11 s for the torch.export-based one (2 CPU cores), most of the
    package stage. Where it is gone or fails, the torch.export-based exporter takes over.
    """
    wrapped = _Exportable(model).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based ONNX export"
            warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export.*")
            torch.onnx.export(
                wrapped,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as err:
        log.info("TorchScript-based ONNX export unavailable (%s); using the torch.export-based exporter", err)
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
            verbose=False,
        )
        program.save(str(tmp))
    tmp.replace(path)
    # Keep a single self-contained file (the exporter may write weights beside it).
    stray = tmp.with_suffix(".onnx.data")
    if stray.exists():
        import onnx

        model_proto = onnx.load(str(path))
        onnx.save_model(model_proto, str(path), save_as_external_data=False)
        stray.unlink()
    return path


def verify_onnx(
    model: torch.nn.Module, path: Path, inputs: torch.Tensor, batch_sizes: tuple[int, ...] = (1, 2, 7)
) -> dict[str, float]:
    """Compare ONNX Runtime logits with PyTorch's on ``inputs`` at several batch sizes; return
    the largest difference and the largest logit (float32 errors grow with the logits' scale)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = _Exportable(model).eval()
    worst = 0.0
    scale = 0.0
    sizes = sorted({min(b, len(inputs)) for b in (*batch_sizes, len(inputs))})
    with torch.no_grad():
        for b in sizes:
            x = inputs[:b].float().contiguous()
            expected = model(x).numpy()
            got = session.run(None, {INPUT_NAME: x.numpy()})[0]
            if got.shape != expected.shape:
                raise RuntimeError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} at batch {b}")
            worst = max(worst, float(np.abs(got - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
    return {"max_abs_diff": worst, "max_abs_logit": scale, "batch_sizes": sizes}  # type: ignore[dict-item]
