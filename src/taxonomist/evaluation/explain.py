"""Explanations: where in an image the network looked for one of its outputs, as heatmaps.

The attributions come from captum, not from code of our own. Which method depends on what the
network computes:

* **Grad-CAM** (``captum.attr.LayerGradCam``) for CNNs: every model with a 4-D feature map
  (timm's ResNets, EfficientNets, ConvNeXts, ...). The layer is a stage of timm's
  ``feature_info`` (for another network: the last module holding a ``Conv2d`` with a 4-D
  output): the last stage, unless its map is under :data:`MIN_CAM_SIDE` pixels a side (the
  small-image models reach 2 x 2 at 28 px, where a heatmap says nothing), then the deepest one
  that is at least that large. The layer's map is upsampled to the image
  (``LayerAttribution.interpolate``, bilinear), kept positive (ReLU) and scaled to [0, 1].
  Grad-CAM is one backward pass per batch and class-discriminative: it shows the evidence for
  the class asked about, not the image's edges.
* **Integrated gradients** (``captum.attr.IntegratedGradients``) for networks without a 4-D
  feature map: vision transformers and other token models, whose blocks output (N, tokens,
  dims). Grad-CAM's spatial map would have to be rebuilt from tokens model by model;
  integrated gradients works on the input pixels of any differentiable network. The baseline
  is the all-zero normalised image (the data set's mean colour), with :data:`IG_STEPS` steps;
  the attribution's absolute value is summed over channels, lightly smoothed (Gaussian) and
  scaled to [0, 1]. It costs :data:`IG_STEPS` forward and backward passes per image.

Explanations are of the network itself: test-time augmentation (``augment.tta``) is unwrapped.
The model runs in eval mode on its own device; gradients are computed with
``torch.autograd.grad`` (nothing accumulates in the parameters' ``.grad``), also when called
inside ``torch.inference_mode``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from taxonomist.data.transforms import normalise
from taxonomist.tasks.base import sigmoid

if TYPE_CHECKING:
    from taxonomist.tasks import Task

GRAD_CAM = "grad-cam"
INTEGRATED_GRADIENTS = "integrated-gradients"
MIN_CAM_SIDE = 4  # Grad-CAM's layer: the deepest stage with a feature map at least this many pixels a side
IG_STEPS = 32  # integrated gradients: steps from the baseline to the image
IG_BATCH = 64  # integrated gradients: images (steps) per forward pass
CHUNK = 16  # images explained at once
PAIRS_PER_ROW = 3  # explanation_grid: (image, overlay) pairs per row


def network(model: torch.nn.Module) -> torch.nn.Module:
    """The network to explain: a :class:`~taxonomist.models.inference.Classifier`'s ``model``
    without test-time augmentation (a wrapper calling the network twice would give Grad-CAM
    two feature maps)."""
    from taxonomist.models.inference import Classifier
    from taxonomist.models.tta import HorizontalFlipAverage

    while isinstance(model, Classifier | HorizontalFlipAverage):
        model = model.model
    return model


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; each submodule's own mode comes back after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _probe(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every submodule with a tensor output, in the order they finish."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: torch.nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                seen.append((name, tuple(out.shape)))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad(), _eval_mode(model):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _feature_stages(model: torch.nn.Module) -> list[str] | None:
    """The names of timm's ``feature_info`` stages of the (possibly wrapped) timm model, or None."""
    for prefix, module in model.named_modules():
        info = getattr(module, "feature_info", None)
        if info is None:
            continue
        try:
            names = [str(stage["module"]) for stage in info]
        except (TypeError, KeyError):
            continue
        return [f"{prefix}.{n}" if prefix else n for n in names]
    return None


def cam_layer(model: torch.nn.Module, x: torch.Tensor) -> str | None:
    """The name of the layer Grad-CAM uses in ``model`` for inputs like ``x`` (see the module
    docstring), or None when the model has no 4-D feature map (then: integrated gradients)."""
    shapes = _probe(model, x[:1])
    first_shape = dict(shapes)
    stages = _feature_stages(model)
    if stages is not None:
        candidates = [s for s in stages if len(first_shape.get(s, ())) == 4]
    else:
        with_conv = {
            name
            for name, module in model.named_modules()
            if name and any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
        }
        order = [name for name, shape in shapes if len(shape) == 4 and name in with_conv]
        candidates = list(dict.fromkeys(order))
        if candidates:  # tokens after the last feature map (a patch embedding): a token model
            last = max(i for i, (name, _) in enumerate(shapes) if name == candidates[-1])
            if any(len(shape) == 3 for _, shape in shapes[last + 1 :]):
                return None
    if not candidates:
        return None
    sides = [min(first_shape[c][2:]) for c in candidates]
    wanted = min(MIN_CAM_SIDE, max(sides))
    return [c for c, side in zip(candidates, sides, strict=True) if side >= wanted][-1]


def heatmaps(
    model: torch.nn.Module, batch: torch.Tensor, targets: Sequence[int], chunk: int = CHUNK
) -> tuple[np.ndarray, str]:
    """Heatmaps (N, H, W) in [0, 1] of where ``model`` found the evidence for output unit
    ``targets[i]`` (an index into its logits) in normalised image ``batch[i]`` (N, C, H, W),
    and the method: ``"grad-cam"`` or ``"integrated-gradients"`` (see the module docstring)."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam

    net = network(model)
    if len(batch) != len(targets):
        raise ValueError(f"{len(batch)} images but {len(targets)} targets")
    height, width = int(batch.shape[-2]), int(batch.shape[-1])
    if len(batch) == 0:
        return np.zeros((0, height, width), np.float32), GRAD_CAM
    try:
        device = next(net.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out: list[np.ndarray] = []
    with _eval_mode(net), torch.inference_mode(False), torch.enable_grad():
        x_all = batch.detach().clone().to(device=device, dtype=torch.float32)
        layer_name = cam_layer(net, x_all)
        method = GRAD_CAM if layer_name is not None else INTEGRATED_GRADIENTS
        for start in range(0, len(x_all), chunk):
            x = x_all[start : start + chunk].clone().requires_grad_(True)
            target = [int(t) for t in targets[start : start + chunk]]
            if layer_name is not None:
                cam = LayerGradCam(net, net.get_submodule(layer_name))
                attr = cam.attribute(x, target=target, relu_attributions=True)
                attr = LayerAttribution.interpolate(attr, (height, width), interpolate_mode="bilinear")
                maps = attr.detach().float().cpu().numpy()[:, 0]
            else:
                ig = IntegratedGradients(net)
                attr = ig.attribute(
                    x, baselines=torch.zeros_like(x), target=target, n_steps=IG_STEPS, internal_batch_size=IG_BATCH
                )
                maps = attr.detach().float().abs().sum(dim=1).cpu().numpy()
                sigma = max(1.0, min(height, width) / 64)
                maps = np.stack([gaussian_filter(m, sigma) for m in maps])
            out.append(_unit_scale(np.maximum(maps, 0.0)))
    return np.concatenate(out).astype(np.float32), method


def _unit_scale(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its maximum (an all-zero or non-finite map becomes zeros)."""
    maps = np.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    top = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1) if len(maps) else np.zeros((0, 1, 1))
    return np.where(top > 0, maps / np.where(top > 0, top, 1.0), 0.0)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """The uint8 RGB (H, W, 3) blend of ``image`` (uint8 (H, W, C), C 1 or 3, or (H, W)) and
    ``heat`` ((H, W) in [0, 1]) coloured with matplotlib's ``cmap``."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[:2] != heat.shape:
        raise ValueError(f"image {img.shape[:2]} and heatmap {heat.shape} differ in size")
    rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[:, :, :3]
    colour = matplotlib.colormaps[cmap](np.clip(heat, 0.0, 1.0))[:, :, :3] * 255.0
    blend = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colour
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def explain_images(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    targets: Sequence[int],
) -> tuple[np.ndarray, str]:
    """:func:`heatmaps` of uint8 (N, H, W, C) ``images``, normalised with ``mean``/``std`` as
    the pipeline does (:func:`taxonomist.data.transforms.normalise`)."""
    batch = torch.from_numpy(normalise(np.asarray(images), mean, std))
    return heatmaps(model, batch, targets)


def explanation_grid(
    model: torch.nn.Module,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    targets: Sequence[int],
    titles: list[str],
    path: Path,
    heading: str = "Where the model looked for its answer",
) -> Path:
    """A PNG at ``path`` of each image (uint8 (N, H, W, C)) beside its heatmap overlay for
    output unit ``targets[i]``, titled ``titles[i]`` (e.g. "true Sandal / pred Sneaker 0.62"),
    under ``heading`` and the method's name."""
    maps, method = explain_images(model, images, mean, std, targets)
    n = len(images)
    rows = max(1, int(np.ceil(n / PAIRS_PER_ROW)))
    cols = 2 * min(PAIRS_PER_ROW, max(n, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k in range(n):
        row, col = divmod(k, PAIRS_PER_ROW)
        left, right = axes[row, 2 * col], axes[row, 2 * col + 1]
        img = np.asarray(images[k])
        left.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        left.set_title(_short(titles[k]) if k < len(titles) else "", fontsize=7, loc="left")
        right.imshow(overlay(img, maps[k]))
    if n == 0:
        axes.flat[0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle(f"{heading} ({method})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def pick_examples(pred: Sequence | np.ndarray, target: Sequence | np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of up to ``n`` examples, drawn with ``seed``: half of them (rounded up)
    misclassified (``pred`` differs from ``target``; rows of 2-D arrays differ anywhere) when
    there are that many, the rest correct; the mistakes first, each part in index order."""
    p, t = np.asarray(pred), np.asarray(target)
    if p.shape[:1] != t.shape[:1]:
        raise ValueError(f"{len(p)} predictions but {len(t)} targets")
    wrong_mask = (p != t).reshape(len(p), -1).any(axis=1) if len(p) else np.zeros(0, bool)
    wrong, right = np.flatnonzero(wrong_mask), np.flatnonzero(~wrong_mask)
    n = max(0, min(int(n), len(p)))
    n_wrong = min(len(wrong), (n + 1) // 2)
    n_right = min(len(right), n - n_wrong)
    n_wrong = min(len(wrong), n - n_right)  # few correct ones: more mistakes
    rng = np.random.default_rng(seed)
    picked_wrong = np.sort(rng.choice(wrong, n_wrong, replace=False)) if n_wrong else wrong[:0]
    picked_right = np.sort(rng.choice(right, n_right, replace=False)) if n_right else right[:0]
    return np.concatenate([picked_wrong, picked_right]).astype(np.int64)


def output_names(task: Task) -> list[str]:
    """The name of each of the network's logits (the units :func:`heatmaps` explains): the
    task's target names or classes when there is one logit each, the positive class for a
    single logit (binary), else ``output <k>``."""
    n = task.num_outputs
    for names in (task.target_names, task.classes):
        if len(names) == n:
            return list(names)
    if n == 1:
        return [task.classes[-1]]
    return [f"output {k}" for k in range(n)]


def output_scores(task: Task, logits: np.ndarray) -> np.ndarray:
    """(N, outputs) scores of the logits: the task's probabilities where there is one per logit
    (multiclass, multilabel, binary), else each logit's sigmoid."""
    logits = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    probs = np.asarray(task.probabilities(logits)).reshape(len(logits), -1)
    return probs if probs.shape == logits.shape else sigmoid(logits)


def side_by_side(image: np.ndarray, heat: np.ndarray, min_height: int = 256) -> np.ndarray:
    """uint8 RGB of ``image`` | its :func:`overlay`, enlarged (nearest pixel, an integer
    factor) to at least ``min_height`` pixels high so small images stay visible."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    rgb = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[:, :, :3]
    both = np.concatenate([rgb, overlay(img, heat)], axis=1)
    factor = max(1, int(np.ceil(min_height / max(1, both.shape[0]))))
    return np.repeat(np.repeat(both, factor, axis=0), factor, axis=1)
