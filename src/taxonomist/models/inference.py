"""A trained classifier for inference, rebuilt from a training checkpoint without Lightning.

Evaluate, package and the benchmarks only run the network forward: they load
``models/best.ckpt`` here, with torch and timm alone, without the Lightning import chain
(README, benchmark: "Start-up").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from taxonomist.errors import ModelError, missing_input
from taxonomist.models.backbone import create_backbone
from taxonomist.models.tta import with_tta
from taxonomist.tasks import load_task

MODEL_PREFIX = "model."  # the network's keys in the training module's state_dict


class Classifier(torch.nn.Module):
    """The trained network (``model``: the task's wrapping of the timm backbone;
    :func:`load_classifier` adds test-time augmentation) with the pipeline config (``cfg``)
    and the task (``task``) it was trained with. ``forward`` returns logits."""

    def __init__(self, cfg: dict[str, Any], space: dict[str, Any], in_chans: int):
        super().__init__()
        self.cfg = OmegaConf.create(cfg)
        self.cfg.model.pretrained = False  # the checkpoint holds the trained weights:
        self.cfg.model.checkpoint = None  # the config's weight sources are not read again
        self.task = load_task(space)
        backbone = create_backbone(self.cfg.model, num_classes=self.task.num_backbone_outputs, in_chans=in_chans)
        self.model = self.task.wrap_model(backbone)
        self.channels_last = bool(self.cfg.model.channels_last)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def classes(self) -> list[str]:
        """The model's output units."""
        return self.task.classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def load_classifier(path: str | Path, map_location: str = "cpu", tta: str = "none") -> Classifier:
    """Rebuild the network the train stage saved in ``path`` (a Lightning checkpoint of
    :class:`~taxonomist.models.module.ClassifierModule`), in eval mode, for inference.

    ``tta`` wraps it for test-time augmentation (:mod:`taxonomist.models.tta`). The file is
    read with ``weights_only=True``: tensors and plain data only, no code is run.
    """
    if not Path(path).is_file():
        raise missing_input(path, "train")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        hparams = checkpoint["hyper_parameters"]
        state = checkpoint["state_dict"]
    except Exception as err:  # truncated, corrupted, another program's file: one line, no traceback
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelError(
            f"{path} is not a readable Taxonomist training checkpoint ({type(err).__name__}: {first}); "
            "run the train stage again"
        ) from None
    classifier = Classifier(hparams["cfg"], hparams["space"], int(hparams["in_chans"]))
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    classifier.model.load_state_dict(weights)
    classifier.model = with_tta(classifier.model, tta)
    return classifier.eval()
