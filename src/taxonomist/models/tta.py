"""Test-time augmentation: a model wrapper that evaluate, package and the ONNX export share.

``augment.tta: hflip`` averages the logits of each image and its mirror image. It belongs with
the training augmentation: use it only where mirroring keeps the class (the default
Fashion-MNIST config flips in training too; digits and arrows do not). The wrapper is part of
the exported ONNX graph, so the packaged model answers exactly as evaluate measured it.
"""

from __future__ import annotations

import torch

TTA_MODES = ("none", "hflip")


class HorizontalFlipAverage(torch.nn.Module):
    """Logits of ``model`` averaged over the image and its left-right mirror image."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(torch.flip(x, dims=(-1,)))) / 2


def with_tta(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` wrapped for test-time augmentation ``mode`` (one of :data:`TTA_MODES`)."""
    if mode == "none":
        return model
    if mode == "hflip":
        return HorizontalFlipAverage(model)
    raise ValueError(f"unknown test-time augmentation {mode!r}; use one of {TTA_MODES}")
