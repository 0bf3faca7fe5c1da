"""Resumable training: a checkpoint at the end of every epoch, and what a resumed run restores.

The train stage keeps its resume state in ``.taxonomist/resume/train/`` (:data:`RESUME_DIR`),
outside the stage's DVC outs (DVC deletes ``models/`` before it runs the stage again):

- ``last.ckpt``: Lightning's full checkpoint of the last completed epoch (weights, EMA,
  optimizer, LR scheduler, loop progress, the callbacks' states: best checkpoint, early
  stopping, the history rows, the RNG states), written to a temp file and renamed into place;
- ``checkpoints/best.ckpt``: the best epoch so far (``callbacks.checkpoint``'s folder);
- ``state.json``: the MLflow run, the fingerprint of what makes a run the same, the epochs done.

A run whose fingerprint matches resumes with ``trainer.fit(ckpt_path=last.ckpt)``; a finished
stage deletes the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint

from taxonomist.files import atomic_write_json, read_json

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STATE = "state.json"
CHECKPOINTS = "checkpoints"


def fingerprint(config: dict[str, Any], data_hash: str) -> str:
    """What makes a resumed run the same run: the resolved config, the data, and the code that
    trains: Lightning's and torch's versions and Taxonomist's own source (:func:`source_hash`)."""
    import lightning

    blob = {
        "config": config,
        "data_hash": data_hash,
        "versions": {"lightning": lightning.__version__, "torch": torch.__version__, "taxonomist": source_hash()},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def source_hash() -> str:
    """Hash of the Taxonomist package's Python files (an edited training step is another run)."""
    import taxonomist

    root = Path(taxonomist.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


class ResumeFolder:
    """The resume state of one stage in ``path``: read, started, cleared."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def last(self) -> Path:
        """The checkpoint of the last completed epoch."""
        return self.path / LAST

    @property
    def checkpoints(self) -> Path:
        """The best checkpoint's folder (``callbacks.checkpoint``)."""
        return self.path / CHECKPOINTS

    @property
    def state_file(self) -> Path:
        return self.path / STATE

    def matching(self, digest: str) -> dict[str, Any] | None:
        """The saved state when there is one and its fingerprint is ``digest``; a state of another
        config or data is deleted (one log line)."""
        if not self.state_file.is_file():
            if self.path.exists():
                log.info("resume: %s holds no state.json: starting afresh", self.path)
                self.clear()
            return None
        try:
            state = read_json(self.state_file)
            run_id, saved = str(state["run_id"]), str(state["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("resume: unreadable %s (%s): discarding the resume state", self.state_file, err)
            self.clear()
            return None
        if saved != digest:
            log.info(
                "resume: discarding the state of run %s in %s: the config, data or code versions changed",
                run_id,
                self.path,
            )
            self.clear()
            return None
        return state

    def start(self, run_id: str, digest: str) -> None:
        """Begin a new resume state for ``run_id`` (no epoch done yet)."""
        self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_file, {"run_id": run_id, "fingerprint": digest, "epochs": 0})

    @staticmethod
    def epochs_in(checkpoint: Path) -> int:
        """The completed epochs a ``last.ckpt`` holds (read without loading its tensors)."""
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        return int(saved["epoch"]) + 1  # saved at the end of that (0-based) epoch

    def record_epochs(self, epochs: int) -> None:
        """Note in ``state.json`` that ``last.ckpt`` now holds ``epochs`` completed epochs."""
        state = read_json(self.state_file)
        atomic_write_json(self.state_file, {**state, "epochs": int(epochs)})

    def clear(self) -> None:
        """Delete the resume state (and the ``.taxonomist/resume`` folders it leaves empty)."""
        shutil.rmtree(self.path, ignore_errors=True)
        for parent in self.path.parents[:2]:
            try:
                parent.rmdir()
            except OSError:
                break


class EpochEndCheckpoint(Checkpoint):
    """Save the full training state to ``path`` at the end of every training epoch, atomically.

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning calls its
    ``on_train_epoch_end`` after the module's (the epoch's train metrics are logged by then) and
    after the other callbacks' (the best checkpoint and early stopping have seen the epoch's
    validation). Before saving it asks ``history`` to record the epoch's row, so the row is in
    the checkpoint; ``on_saved`` gets the number of completed epochs once the file is in place.
    Lightning writes a checkpoint in place; it goes to a temp file here and is renamed, so a
    kill while writing leaves the previous epoch's checkpoint whole.

    Its own state keeps ``trainer.should_stop`` (early stopping decided at the saved epoch), which
    Lightning does not save.
    """

    def __init__(self, path: str | Path, history: Any | None = None, on_saved: Any | None = None) -> None:
        self.path = Path(path)
        self.history = history
        self.on_saved = on_saved
        self._trainer: L.Trainer | None = None

    @property
    def state_key(self) -> str:
        return f"EpochEndCheckpoint{{'path': '{self.path.name}'}}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.history is not None:
            self.history.record_epoch_end(trainer)
        # Every process takes part in save_checkpoint (a collective call under DDP); only the
        # first writes the file, so only it renames it and records the epoch.
        primary = trainer.is_global_zero
        if primary:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            trainer.save_checkpoint(tmp)
            if primary:
                os.replace(tmp, self.path)
        finally:
            if primary:
                tmp.unlink(missing_ok=True)
        if self.on_saved is not None and primary:
            self.on_saved(trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"should_stop": bool(self._trainer.should_stop) if self._trainer is not None else False}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._trainer is not None and state_dict.get("should_stop"):
            self._trainer.should_stop = True  # the saved epoch was the last one: no further epoch


class RandomStates(L.Callback):
    """Carry the random number generators across a resume, at epoch boundaries.

    A checkpoint holds the states of torch (CPU and CUDA), numpy, Python's ``random`` and the
    training augmentation's own generators (albumentations keeps its own) as they were when it
    was written, at the end of an epoch; nothing draws from them between that point and the
    start of the next epoch. A run resumed from it sets them back at the start of its first
    epoch, after Lightning's restore and any sanity check. The loaders' orders do not come
    from these generators (:meth:`ImageDataModule._loader`): they depend on the epoch alone.
    The states are plain tensors, lists and ints, so the checkpoint loads with
    ``weights_only=True``.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return capture_random_states(_augment_of(self._trainer))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            restore_random_states(self._pending, _augment_of(trainer))
            self._pending = None


def _augment_of(trainer: L.Trainer | None) -> Any | None:
    """The training dataset's augmentation (an albumentations ``Compose``), if any."""
    if trainer is None:
        return None
    try:
        loader = trainer.train_dataloader
    except (AttributeError, RuntimeError):
        return None
    return getattr(getattr(loader, "dataset", None), "augment", None)


def capture_random_states(augment: Any | None = None) -> dict[str, Any]:
    """The generators' states now (see :class:`RandomStates`)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.array(key, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if augment is not None:
        states["augment"] = [
            {"numpy": numpy_gen.bit_generator.state, "python": python_gen.getstate()}
            for numpy_gen, python_gen in augment_generators(augment)
        ]
    return states


def restore_random_states(states: dict[str, Any], augment: Any | None = None) -> None:
    """Set the generators to ``states`` (from :func:`capture_random_states`)."""
    torch.set_rng_state(states["torch"])
    kind, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    saved = states.get("augment")
    if saved is not None and augment is not None:
        # The same pipeline (the fingerprint covers the config): the same generators, in order.
        for (numpy_gen, python_gen), state in zip(augment_generators(augment), saved, strict=True):
            numpy_gen.bit_generator.state = state["numpy"]
            python_gen.setstate(_tuples(state["python"]))


def augment_generators(augment: Any) -> list[tuple[np.random.Generator, random.Random]]:
    """The numpy and Python generators of an albumentations pipeline: its own and each nested
    transform's (a seeded ``Compose`` gives every transform generators of its own), in order."""
    found: list[tuple[np.random.Generator, random.Random]] = []
    seen: set[int] = set()

    def walk(node: Any) -> None:
        numpy_gen, python_gen = getattr(node, "random_generator", None), getattr(node, "py_random", None)
        own = isinstance(numpy_gen, np.random.Generator) and isinstance(python_gen, random.Random)
        if own and id(numpy_gen) not in seen:
            seen.add(id(numpy_gen))
            found.append((numpy_gen, python_gen))
        for child in getattr(node, "transforms", None) or []:
            walk(child)

    walk(augment)
    return found


def _tuples(value: Any) -> Any:
    """``random.getstate()`` after a round trip: lists back to the tuples ``setstate`` takes."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value
