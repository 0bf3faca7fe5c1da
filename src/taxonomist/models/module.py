"""The LightningModule: a timm backbone trained with cross-entropy and torchmetrics."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from timm.optim import param_groups_weight_decay
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from taxonomist.models.backbone import create_backbone

log = logging.getLogger(__name__)


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy plus macro precision, recall and F1 for a multi-class problem."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "precision_macro": MulticlassPrecision(num_classes=num_classes, average="macro"),
            "recall_macro": MulticlassRecall(num_classes=num_classes, average="macro"),
            "f1_macro": MulticlassF1Score(num_classes=num_classes, average="macro"),
        }
    )


class ClassifierModule(L.LightningModule):
    """Multi-class image classifier around ``timm.create_model``.

    ``cfg`` is the whole pipeline config (model, optimizer, scheduler, train sections); it is
    saved in the checkpoint so :meth:`load_from_checkpoint` rebuilds the same model.
    """

    def __init__(self, cfg: dict[str, Any], classes: list[str], in_chans: int):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the config is logged flattened, by us
        self.cfg = OmegaConf.create(cfg)
        self.classes = list(classes)
        self.model = create_backbone(self.cfg.model, num_classes=len(classes), in_chans=in_chans)
        if self.cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.label_smoothing = float(self.cfg.train.label_smoothing)
        self.train_metrics = classification_metrics(len(classes)).clone(prefix="train/")
        self.val_metrics = classification_metrics(len(classes)).clone(prefix="val/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_metrics.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_metrics.update(logits, y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=False, batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log("val/acc", values.pop("val/acc"), prog_bar=True)
        self.log_dict(values, prog_bar=False)
        self.val_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return torch.softmax(self(x).float(), dim=1)

    def configure_optimizers(self) -> Any:
        opt_cfg = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        weight_decay = float(opt_cfg.get("weight_decay", 0.0))  # type: ignore[union-attr]
        groups = param_groups_weight_decay(self.model, weight_decay=weight_decay)
        optimizer = instantiate(opt_cfg)(params=groups)
        sched_cfg = dict(OmegaConf.to_container(self.cfg.scheduler, resolve=True))  # type: ignore[arg-type]
        interval = sched_cfg.pop("interval", "step")
        if not sched_cfg.get("_target_"):
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if interval == "epoch":
            steps = int(self.trainer.max_epochs or 1)
        params = inspect.signature(get_class(sched_cfg["_target_"])).parameters
        if "total_steps" in params and "total_steps" not in sched_cfg:
            sched_cfg["total_steps"] = steps
        if "T_max" in params and "T_max" not in sched_cfg:
            sched_cfg["T_max"] = steps
        if "pct_start" in params:  # OneCycleLR: each phase needs at least two steps
            total = int(sched_cfg.get("total_steps") or steps)
            if total < 4:
                log.warning(
                    "%d scheduler steps are too few for %s: training at a constant lr", total, sched_cfg["_target_"]
                )
                return optimizer
            pct = float(sched_cfg.get("pct_start", params["pct_start"].default))
            sched_cfg["pct_start"] = min(max(pct, 2 / total), 1 - 2 / total)
        scheduler = instantiate(sched_cfg)(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def load_classifier(path: str | Path, map_location: str = "cpu") -> ClassifierModule:
    """Rebuild a trained :class:`ClassifierModule` from a checkpoint for inference.

    Weight sources of the original config (timm pretrained, ``model.checkpoint``) are not
    touched again: the checkpoint holds the trained weights.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    hparams = ckpt["hyper_parameters"]
    cfg = OmegaConf.create(hparams["cfg"])
    cfg.model.pretrained = False
    cfg.model.checkpoint = None
    module = ClassifierModule(OmegaConf.to_container(cfg), hparams["classes"], hparams["in_chans"])
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()
