"""The LightningModule: a timm backbone trained with cross-entropy and torchmetrics."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from timm.data import Mixup
from timm.optim import param_groups_weight_decay
from torchmetrics import MeanMetric, Metric

from taxonomist.models.backbone import create_backbone
from taxonomist.tasks import load_task

log = logging.getLogger(__name__)
# Config-controlled ``_target_`` values the optimizer and scheduler blocks may name.
OPTIMIZER_TARGETS = ("torch.optim.*", "timm.optim.*")
SCHEDULER_TARGETS = ("torch.optim.lr_scheduler.*", "timm.scheduler.*")


class ClassifierModule(L.LightningModule):
    """Image classifier around ``timm.create_model`` for any registered task.

    ``cfg`` is the whole pipeline config (model, optimizer, scheduler, train sections) and
    ``space`` the task's label space (:meth:`Task.to_dict`); both are saved in the checkpoint so
    :func:`load_classifier` rebuilds the same model. The task supplies the loss, the metrics and
    the probabilities. ``class_weights`` are the loss weights of ``task.class_weights: balanced``
    (see :meth:`Task.class_weights`). ``initial_weights=False`` skips the config's weight sources
    (timm pretrained, ``model.checkpoint``). Inference rebuilds the network without Lightning:
    :func:`taxonomist.models.inference.load_classifier`.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        space: dict[str, Any],
        in_chans: int,
        class_weights: list[float] | None = None,
        initial_weights: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["initial_weights"])  # the config is logged flattened, by us
        self.cfg = OmegaConf.create(cfg)
        if not initial_weights:  # a checkpoint's weights follow: do not load the config's weight sources
            self.cfg.model.pretrained = False
            self.cfg.model.checkpoint = None
        self.task = load_task(space)
        backbone = create_backbone(self.cfg.model, num_classes=self.task.num_backbone_outputs, in_chans=in_chans)
        # Fine-tuning (fit.finetune) treats the pretrained body apart from the new head.
        self.pretrained = bool(self.cfg.model.pretrained or self.cfg.model.checkpoint)
        body = body_parameter_ids(backbone)
        self.model = self.task.wrap_model(backbone)
        self.body_names = frozenset(name for name, p in self.model.named_parameters() if id(p) in body)
        if self.cfg.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.criterion = self.task.loss(float(self.cfg.fit.label_smoothing), class_weights)
        self.eval_criterion = self.task.loss()
        self.mixup = build_mixup(self.cfg, self.task.num_outputs)
        self.train_metrics = self.task.metrics().clone(prefix="train/")
        self.train_loss = MeanMetric()  # the epoch's mean loss per image (over all DDP processes)
        self.val_metrics = self.task.metrics().clone(prefix="val/")

    @property
    def classes(self) -> list[str]:
        """The model's output units."""
        return self.task.classes

    def _update(self, metrics, logits: torch.Tensor, y: torch.Tensor) -> None:
        metrics.update(*self.task.metric_inputs(logits.detach(), y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def setup(self, stage: str) -> None:
        """Under DDP every process validates the whole val split (:mod:`taxonomist.models.distributed`):
        its metrics are computed where they are, not summed over processes (which would count
        every image once per process). Train metrics, over disjoint shards, are reduced."""
        if self.trainer.world_size > 1:
            for metric in self.val_metrics.modules():
                if isinstance(metric, Metric):
                    metric.sync_on_compute = False

    def on_fit_start(self) -> None:
        if OmegaConf.select(self.cfg, "model.compile", default=False):
            self.model.compile()  # in place: the state_dict keys stay those of the plain model

    def on_train_epoch_start(self) -> None:
        """Head-only warm-up: a pretrained body stays frozen for ``fit.finetune.head_warmup_epochs``."""
        warmup = int(OmegaConf.select(self.cfg, "fit.finetune.head_warmup_epochs", default=0))
        if not (self.pretrained and warmup):
            return
        train_body = self.current_epoch >= warmup
        if self.current_epoch in (0, warmup):
            log.info("epoch %d: %s", self.current_epoch, "whole network trains" if train_body else "head only")
        for name, param in self.model.named_parameters():
            if name in self.body_names:
                param.requires_grad_(train_body)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        target = y
        if self.mixup is not None and len(y) % 2 == 0:  # timm mixes pairs: an odd last batch goes unmixed
            x, target = self.mixup(x, y)
        logits = self(x)
        loss = self.criterion(logits, target)
        # Train metrics compare with the original labels (under mixup: of the mixed images' first source).
        self._update(self.train_metrics, logits, y)
        # The progress bar shows the batch loss; loggers and the history get the epoch mean.
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        # The epoch mean over all processes (DDP): logged, computed, in on_train_epoch_end.
        self.train_loss.update(loss.detach(), weight=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        # Reduced across DDP processes here, in every process alike; logged as plain values (a
        # synced log value would be reduced when the progress bar, in the first process only, reads it).
        self.log("train/loss", self.train_loss.compute())
        self.train_loss.reset()
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = self.eval_criterion(logits, y)
        self._update(self.val_metrics, logits, y)
        # Under DDP every process validates the whole split: the same value everywhere, not reduced.
        self.log("val/loss", loss, on_epoch=True, prog_bar=False, batch_size=len(y))

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log(self.task.headline, values.pop(self.task.headline), prog_bar=True)
        self.log_dict(values, prog_bar=False)
        self.val_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Raw logits (float32); the task turns them into probabilities and answers."""
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).float()

    def configure_optimizers(self) -> Any:
        opt_cfg = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        weight_decay = float(opt_cfg.get("weight_decay", 0.0))  # type: ignore[union-attr]
        groups = self.param_groups(weight_decay, float(opt_cfg.get("lr", 1e-3)))  # type: ignore[union-attr]
        optimizer = instantiate(opt_cfg, _execution_whitelist_=list(OPTIMIZER_TARGETS))(params=groups)
        sched_cfg = dict(OmegaConf.to_container(self.cfg.scheduler, resolve=True))  # type: ignore[arg-type]
        interval = sched_cfg.pop("interval", "step")
        if not sched_cfg.get("_target_"):
            return optimizer
        steps = int(self.trainer.estimated_stepping_batches)
        if interval == "epoch":
            steps = int(self.trainer.max_epochs or 1)
        # The argument that takes the schedule's length says `auto` in conf/scheduler/: the
        # Trainer's count of optimizer steps (or epochs, with interval: epoch) goes there.
        sched_cfg = {k: steps if v == "auto" else v for k, v in sched_cfg.items()}
        if isinstance(sched_cfg.get("max_lr"), int | float):  # OneCycleLR: keep each group's lr scale
            sched_cfg["max_lr"] = [float(sched_cfg["max_lr"]) * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
        if "pct_start" in sched_cfg:  # OneCycleLR: each phase needs at least two steps
            total = int(sched_cfg.get("total_steps") or steps)
            if total < 4:
                log.warning(
                    "%d scheduler steps are too few for %s: training at a constant lr", total, sched_cfg["_target_"]
                )
                return optimizer
            pct = float(sched_cfg["pct_start"])
            sched_cfg["pct_start"] = min(max(pct, 2 / total), 1 - 2 / total)
        scheduler = instantiate(sched_cfg, _convert_="all", _execution_whitelist_=list(SCHEDULER_TARGETS))(
            optimizer=optimizer
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def param_groups(self, weight_decay: float, lr: float) -> list[dict[str, Any]]:
        """timm's weight-decay groups; a pretrained body's groups get ``lr x fit.finetune.backbone_lr_scale``
        (recorded as ``lr_scale`` for the scheduler)."""
        groups = param_groups_weight_decay(self.model, weight_decay=weight_decay)
        scale = float(OmegaConf.select(self.cfg, "fit.finetune.backbone_lr_scale", default=1.0))
        if not self.pretrained or scale == 1.0:
            return groups
        body = {id(p) for name, p in self.model.named_parameters() if name in self.body_names}
        out = []
        for group in groups:
            head = [p for p in group["params"] if id(p) not in body]
            trunk = [p for p in group["params"] if id(p) in body]
            if head:
                out.append({**group, "params": head})
            if trunk:
                out.append({**group, "params": trunk, "lr": lr * scale, "lr_scale": scale})
        return out


def body_parameter_ids(backbone: torch.nn.Module) -> set[int]:
    """Ids of the backbone's parameters outside its classifier (timm's ``get_classifier``)."""
    head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    return {id(p) for p in backbone.parameters() if id(p) not in head_ids}


def build_mixup(cfg: Any, num_classes: int) -> Mixup | None:
    """timm's batch mixup/cutmix from ``fit.mixup``, or None when both alphas are 0.

    It also applies ``fit.label_smoothing`` to the mixed targets it returns.
    """
    mix = OmegaConf.select(cfg, "fit.mixup")
    if mix is None or not (float(mix.mixup_alpha) or float(mix.cutmix_alpha)):
        return None
    return Mixup(
        mixup_alpha=float(mix.mixup_alpha),
        cutmix_alpha=float(mix.cutmix_alpha),
        prob=float(mix.prob),
        switch_prob=float(mix.switch_prob),
        label_smoothing=float(cfg.fit.label_smoothing),
        num_classes=num_classes,
    )
