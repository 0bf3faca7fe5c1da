"""Lightning callbacks of the train stage: our own, and how the configured ones are built.

``conf/callbacks/`` lists the callbacks as ``_target_`` blocks; :func:`build_callbacks` builds
them with ``hydra.utils.instantiate`` (``monitor``/``mode`` from ``fit.monitor``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig, OmegaConf

from taxonomist.errors import ConfigError
from taxonomist.files import atomic_write_text

# The ``_target_`` values conf/callbacks and conf/trainer may name.
CALLBACK_TARGETS = (
    "lightning.pytorch.callbacks.*",
    "lightning.pytorch.strategies.*",  # trainer.strategy as a _target_ block (e.g. DDPStrategy's arguments)
    "lightning.Trainer",
    "taxonomist.models.callbacks.*",
)
MONITORING = ("monitor", "mode")  # arguments the train stage fills from fit.monitor


def build_callbacks(cfg: DictConfig, monitor: str | None = None, **per_name: dict) -> dict[str, L.Callback]:
    """The configured callbacks (``cfg.callbacks``; null entries are off), by name.

    Callbacks that take a ``monitor`` (checkpoint, early stopping) get ``monitor`` and its
    ``mode`` ("min" for a loss, else "max") unless their config sets them; ``per_name`` adds
    arguments to one callback (e.g. ``checkpoint={"dirpath": ...}``). Without ``monitor`` the
    monitoring callbacks are left out (the benchmark's training loop).
    """
    out: dict[str, L.Callback] = {}
    for name, block in cfg.callbacks.items():
        if block is None:
            continue
        extra = dict(per_name.get(name, {}))
        takes_monitor = _takes_monitor(str(block["_target_"]))
        if takes_monitor and monitor is None:
            continue
        if takes_monitor:
            extra.setdefault("monitor", block.get("monitor", monitor))
            extra.setdefault("mode", block.get("mode", "min" if extra["monitor"].endswith("loss") else "max"))
        try:
            out[name] = instantiate(block, _execution_whitelist_=list(CALLBACK_TARGETS), **extra)
        except Exception as err:  # a misspelt argument, a class that is not a callback ...
            raise ConfigError(f"callbacks.{name}: {err}") from None
    return out


def _takes_monitor(target: str) -> bool:
    return target.rsplit(".", 1)[-1] in ("ModelCheckpoint", "EarlyStopping")


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], default_root_dir: Path, **overrides) -> L.Trainer:
    """The Trainer of the ``trainer`` config section with ``callbacks``; ``overrides`` replace any argument.

    ``use_distributed_sampler`` is off: :class:`taxonomist.data.datamodule.ImageDataModule`
    shards the training order itself, and keeps the whole val split in every process (Lightning's
    replacement would pad the val split with duplicates, :mod:`taxonomist.models.distributed`)."""
    block = OmegaConf.to_container(cfg.trainer, resolve=True)
    overrides.setdefault("use_distributed_sampler", False)
    try:
        return instantiate(
            block,
            _execution_whitelist_=list(CALLBACK_TARGETS),
            callbacks=callbacks,
            default_root_dir=str(default_root_dir),
            **overrides,
        )
    except TypeError as err:  # an argument the Trainer does not take
        raise ConfigError(f"trainer: {err}") from None


class EMAWeightAveraging(WeightAveraging):
    """An EMA of the weights (and BatchNorm statistics), updated every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so short runs
    and small datasets average recent weights rather than the random initial ones. Validation
    runs on the averaged weights, so the monitored metric and the saved checkpoint
    (``state_dict`` = the average) are those of the EMA model.
    """

    def __init__(self, decay: float = 0.998):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=ema_update(decay), use_buffers=True)
        self.decay = decay


def ema_update(decay: float):
    """``AveragedModel`` multi-tensor update: EMA with :class:`EMAWeightAveraging`'s warm-up."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # counters (BatchNorm's num_batches_tracked)
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


class EpochHistory(L.Callback):
    """Write one CSV row per epoch with the epoch-level train/ and val/ metrics and ``train/lr``.

    The file feeds ``dvc plots`` (training curves) and is rewritten atomically each epoch.
    ``on_row`` (e.g. logging to MLflow with the epoch as the step) gets each new row. The rows
    are the callback's checkpoint state: a resumed run restores them (and rewrites the file).
    Under DDP only the first process (global rank 0) writes the file and calls ``on_row``.
    """

    def __init__(self, path: str | Path, on_row: Callable[[dict[str, float]], None] | None = None):
        self.path = Path(path)
        self.on_row = on_row
        self.rows: list[dict[str, float]] = []

    # Lightning computes a module's epoch-level train metrics after the callbacks'
    # on_train_epoch_end, so an epoch's row is recorded by the epoch-end checkpoint
    # (:class:`taxonomist.models.resume.EpochEndCheckpoint`, which runs after the module) through
    # :meth:`record_epoch_end`; without one, when the next epoch starts and, for the last epoch,
    # when training ends.
    def record_epoch_end(self, trainer: L.Trainer) -> None:
        """Record the epoch that is ending (call it after the module's ``on_train_epoch_end``)."""
        self._record_once(trainer, epoch=trainer.current_epoch + 1)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record_once(trainer, epoch=trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # current_epoch counts completed epochs here, after max_epochs and after early stopping.
        self._record_once(trainer, epoch=trainer.current_epoch)

    def state_dict(self) -> dict:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:
        from lightning.pytorch.utilities import rank_zero_only

        self.rows = [dict(row) for row in state_dict.get("rows", [])]
        if self.rows and rank_zero_only.rank == 0:
            self._write()  # DVC deleted the file before the stage ran again

    def _record_once(self, trainer: L.Trainer, epoch: int) -> None:
        if epoch > 0 and (not self.rows or self.rows[-1]["epoch"] < epoch):
            self._record(trainer, epoch=epoch)

    def _record(self, trainer: L.Trainer, epoch: int) -> None:
        metrics = {
            k.removesuffix("_epoch"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/")) and not k.endswith("_step")
        }
        row = {"epoch": epoch, **dict(sorted(metrics.items()))}
        row["train/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append(row)  # in every process (the rows are checkpoint state), written by the first
        if not trainer.is_global_zero:
            return
        self._write()
        if self.on_row is not None:
            self.on_row(row)

    def _write(self) -> None:
        fields: list[str] = []
        for row in self.rows:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
