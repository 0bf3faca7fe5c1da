"""The ``embeddings`` model family: a fixed feature extractor plus a scikit-learn classifier.

``model=embeddings`` (conf/model/embeddings.yaml) replaces the fine-tuned network: a frozen
extractor (:mod:`.features`: HOG, colour histograms, LBP, or a pretrained timm network) turns
each image into a vector once, cached in ``data/features/`` (:mod:`.cache`), and a classifier
from ``conf/model/classifier/`` (:mod:`.heads`) is fitted on those vectors by scikit-learn in
seconds (:mod:`.fit`, which the train stage runs instead of Lightning). The fitted classifier is
written into a torch head, so :class:`EmbeddingModel` is an ordinary ``nn.Module`` from
normalised pixels to logits: evaluate, calibration, ONNX export, INT8, the registry, predict
and serve take it as they take a timm network.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from taxonomist.models.embeddings.features import build_extractor
from taxonomist.models.embeddings.heads import build_head

NAME = "embeddings"  # model.name of the family


def is_embeddings(model_cfg: DictConfig | dict[str, Any]) -> bool:
    """Whether ``model`` names the embeddings family."""
    return str(model_cfg.get("name")) == NAME


class EmbeddingModel(nn.Module):
    """Normalised pixels -> [0, 1] pixels -> ``features`` -> ``head`` -> logits.

    The pipeline feeds every model ``(x - mean) / std`` (``preprocess.mean/std``); the
    extractors want the [0, 1] pixels back, so the model keeps the mean and std it was fitted
    with (buffers, saved in the checkpoint) and undoes the normalisation first.
    """

    def __init__(self, model_cfg: dict[str, Any], num_classes: int, outputs: int, in_chans: int) -> None:
        super().__init__()
        self.features = build_extractor(dict(model_cfg["features"]), in_chans)
        self.head = build_head(dict(model_cfg["classifier"]), num_classes, outputs)
        self.register_buffer("input_mean", torch.zeros(1, in_chans, 1, 1))
        self.register_buffer("input_std", torch.ones(1, in_chans, 1, 1))
        self.num_classes = outputs

    def set_normalisation(self, mean: list[float], std: list[float]) -> None:
        """The ``preprocess.mean`` / ``preprocess.std`` the pipeline normalises inputs with."""
        shape = self.input_mean.shape
        self.input_mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).expand(shape).clone()
        self.input_std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).expand(shape).clone()

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of [0, 1] pixels (N, C, H, W)."""
        return self.features(pixels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x.float() * self.input_std + self.input_mean))

    def get_classifier(self) -> nn.Module:
        """The fitted head (timm's name for a network's classifier)."""
        return self.head


def create_embedding_model(model_cfg: DictConfig, num_classes: int, outputs: int, in_chans: int) -> EmbeddingModel:
    """The (unfitted) :class:`EmbeddingModel` ``model_cfg`` describes."""
    return EmbeddingModel(OmegaConf.to_container(model_cfg, resolve=True), num_classes, outputs, in_chans)  # type: ignore[arg-type]
