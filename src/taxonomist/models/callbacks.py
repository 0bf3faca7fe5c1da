"""Lightning callbacks of the train stage."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import lightning as L

from taxonomist.files import atomic_write_text


class EpochHistory(L.Callback):
    """Write one CSV row per epoch with the epoch-level train/ and val/ metrics and ``train/lr``.

    The file feeds ``dvc plots`` (training curves) and is rewritten atomically each epoch.
    ``on_row`` (e.g. logging to MLflow with the epoch as the step) gets each new row.
    """

    def __init__(self, path: str | Path, on_row: Callable[[dict[str, float]], None] | None = None):
        self.path = Path(path)
        self.on_row = on_row
        self.rows: list[dict[str, float]] = []

    # Lightning computes a module's epoch-level train metrics after the callbacks'
    # on_train_epoch_end, so an epoch's row is written when the next epoch starts and, for
    # the last epoch, when training ends.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            self._record(trainer, epoch=trainer.current_epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # current_epoch counts completed epochs here, after max_epochs and after early stopping.
        if not self.rows or self.rows[-1]["epoch"] < trainer.current_epoch:
            self._record(trainer, epoch=trainer.current_epoch)

    def _record(self, trainer: L.Trainer, epoch: int) -> None:
        metrics = {
            k.removesuffix("_epoch"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/")) and not k.endswith("_step")
        }
        row = {"epoch": epoch, **dict(sorted(metrics.items()))}
        row["train/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        self.rows.append(row)
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
