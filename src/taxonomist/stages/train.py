"""Train: fit the classifier on the cached train split, pick the best epoch on val.

Outputs: ``models/best.ckpt`` (best checkpoint by ``train.monitor``), ``models/labels.json``,
``models/run.json`` (the MLflow run this pipeline execution logs to) and
``reports/train_history.csv`` (per-epoch metrics for ``dvc plots``).

Interrupted training resumes. At the end of every epoch the stage writes Lightning's full
checkpoint (weights, EMA, optimizer, LR scheduler, loop progress, best-checkpoint and
early-stopping state, the history rows, the RNG states: :mod:`taxonomist.models.resume`) to
``.taxonomist/resume/train/last.ckpt`` (temp file, then rename), beside the best checkpoint so
far (``checkpoints/best.ckpt``) and ``state.json`` (the MLflow run id, a fingerprint of the
resolved config, the data hash, the torch and Lightning versions and Taxonomist's source, the
epochs done).
The folder is outside ``models/`` and ``reports/``, which DVC deletes before it reruns the
stage. When the stage starts and finds that state with the same fingerprint and its MLflow run
still there, it logs "resuming from epoch N of run X", continues the same run (no new run, no
second dataset record; ``models/run.json`` names it again; epochs already in the run are not
logged twice), restores the history rows and calls ``trainer.fit(ckpt_path=last.ckpt)``. Any
other state is deleted with a log line and training starts afresh. The resumed run ends with
the same weights, bit for bit, as an uninterrupted one on the same machine: each epoch's data
order comes from ``(seed, epoch)``, and the RNGs (torch, numpy, random, the augmentation's)
are set back to their state at the end of the saved epoch (exact with ``fit.num_workers: 0``;
loader workers keep their own augmentation generators, which are not saved).

SIGKILL leaves the last completed epoch's checkpoint. On SIGTERM Lightning's handler stops
training after the current batch (never while a checkpoint is written); the last completed
epoch's checkpoint is on disk, and the stage fails with one line saying to run it again. A stage
that finishes deletes the resume folder.

Several processes (``trainer=ddp``): every process runs this stage; only the first (global rank
0) creates the MLflow run and writes ``models/``, the history and the resume state, and it hands
the run id and the checkpoint to resume from to the processes Lightning starts
(:mod:`taxonomist.models.distributed`). ``trainer.devices`` beyond what the machine has fails
in one line before anything runs.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from taxonomist.data import auto
from taxonomist.data.datamodule import ImageDataModule
from taxonomist.errors import ConfigError, Interrupted, StageOrderError
from taxonomist.files import atomic_write_json, read_json, sha256_file
from taxonomist.models import distributed
from taxonomist.models.callbacks import EpochHistory, build_callbacks, build_trainer
from taxonomist.models.embeddings import is_embeddings
from taxonomist.models.module import ClassifierModule
from taxonomist.models.resume import EpochEndCheckpoint, RandomStates, ResumeFolder, fingerprint
from taxonomist.stages.paths import HISTORY_FILE, MODELS_DIR, PROCESSED_DIR, RESUME_DIR, health_dir_for
from taxonomist.tasks import Task, task_of
from taxonomist.tracking import runs

log = logging.getLogger(__name__)


def configure_torch(cfg: DictConfig) -> None:
    """Seed everything and set the CPU thread count (``fit.num_threads: 0`` under DDP on CPU:
    the cores shared among this machine's training processes)."""
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    threads = distributed.threads_per_process(cfg)
    if threads > 0:
        if threads != int(cfg.fit.num_threads):
            log.info("fit.num_threads: %d per training process", threads)
        torch.set_num_threads(threads)


def build_module(cfg: DictConfig, datamodule: ImageDataModule, in_chans: int) -> ClassifierModule:
    """The LightningModule for ``cfg`` over the datamodule's label space (and class weights)."""
    task = datamodule.task
    weights = task.class_weights(datamodule.train_targets()) if cfg.task.class_weights == "balanced" else None
    return ClassifierModule(OmegaConf.to_container(cfg, resolve=True), task.to_dict(), in_chans, weights)


def data_hash(processed_dir: Path) -> str:
    """Content hash of the processed split assignment (identifies the exact training data)."""
    return sha256_file(processed_dir / "splits.csv")


def fit_embeddings(
    cfg: DictConfig,
    processed_dir: Path,
    models_dir: Path,
    spec: runs.RunSpec | None,
    health_dir: Path | None,
    history_file: Path,
) -> dict:
    """The train stage of ``model=embeddings`` (:mod:`taxonomist.models.embeddings.fit`)."""
    from taxonomist.models.embeddings.fit import check_task, fit

    check_task(cfg)
    digest = data_hash(processed_dir)
    report = read_json(processed_dir / "report.json")
    run_id = runs.start_pipeline_run(cfg, tags={"data_hash": digest, "stage": "train"}, spec=spec)
    runs.log_dataset(run_id, cfg, processed_dir, digest, report, health_dir or health_dir_for(processed_dir))
    features_dir = processed_dir.parent / "features"
    return fit(cfg, processed_dir, models_dir, history_file, run_id, features_dir)


def run(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    models_dir: Path = MODELS_DIR,
    spec: runs.RunSpec | None = None,
    health_dir: Path | None = None,
    history_file: Path = HISTORY_FILE,
    resume_dir: Path = RESUME_DIR,
) -> dict:
    """Train and write the best checkpoint; return the run id, the monitored metric, its best
    value, the epoch that reached it and that epoch's train/ and val/ metrics. ``spec`` names
    and places the MLflow run (sweeps). ``resume_dir`` keeps the resume state (module docstring)."""
    distributed.check_devices(cfg)  # before any side effect
    primary = distributed.is_primary()
    batch_auto = auto.is_auto(cfg.fit.batch_size)
    precision_auto = auto.is_auto(cfg.trainer.precision)
    cfg = auto.resolve(cfg, processed_dir)  # the numbers preprocess chose for every `auto`
    if batch_auto:
        log.info("auto: fit.batch_size = %s", cfg.fit.batch_size)
    if distributed.requested_devices(cfg.trainer.devices) not in (None, 1) or int(cfg.trainer.num_nodes) > 1:
        processes = (distributed.requested_devices(cfg.trainer.devices) or 1) * int(cfg.trainer.num_nodes)
        log.info(
            "fit.batch_size = %s per process: global batch %d over %d processes",
            cfg.fit.batch_size,
            int(cfg.fit.batch_size) * processes,
            processes,
        )
    if precision_auto:
        log.info("auto: trainer.precision = %s (%s)", *auto.choose_precision(str(cfg.trainer.accelerator)))
    configure_torch(cfg)
    (processed_dir.parent / "features").mkdir(parents=True, exist_ok=True)  # a DVC output of every train stage
    if is_embeddings(cfg.model):  # features + a scikit-learn classifier: no epochs, no resume
        return fit_embeddings(cfg, processed_dir, models_dir, spec, health_dir, history_file)
    datamodule = ImageDataModule(cfg, processed_dir)
    report = read_json(processed_dir / "report.json")
    in_chans = int(report["image_shape"][2])
    task = datamodule.task
    if type(task) is not task_of(cfg):
        raise StageOrderError(
            f"data/processed holds {task.name} labels but task.name={cfg.task.name}: run the preprocess stage again"
        )
    module = build_module(cfg, datamodule, in_chans)

    models_dir.mkdir(parents=True, exist_ok=True)
    digest = data_hash(processed_dir)
    resume = ResumeFolder(resume_dir)
    same = fingerprint(OmegaConf.to_container(cfg, resolve=True), digest)
    if not primary:  # another DDP process: the primary decided (its environment), or the saved state says
        return _follow(cfg, module, datamodule, task, resume, same, models_dir, history_file)
    state = resume.matching(same)
    if state is not None and not runs.reopen_pipeline_run(cfg, state["run_id"]):
        log.info("resume: run %s is no longer in the tracking store: starting afresh", state["run_id"])
        state = None
    if state is None:
        run_id = runs.start_pipeline_run(cfg, tags={"data_hash": digest, "stage": "train"}, spec=spec)
        runs.log_dataset(run_id, cfg, processed_dir, digest, report, health_dir or health_dir_for(processed_dir))
        resume.start(run_id, same)
        ckpt_path, logged = None, 0
    else:
        run_id = str(state["run_id"])
        ckpt_path = resume.last if resume.last.is_file() else None
        logged = runs.last_logged_epoch(run_id)
        epochs = resume.epochs_in(ckpt_path) if ckpt_path else 0
        log.info("resuming from epoch %d of run %s", epochs, run_id)
    monitor = task.val_metric(str(cfg.fit.monitor))
    configured = build_callbacks(cfg, monitor, checkpoint={"dirpath": str(resume.checkpoints)})
    checkpoint = configured.get("checkpoint")
    if not isinstance(checkpoint, ModelCheckpoint):
        raise ConfigError("callbacks.checkpoint must be a ModelCheckpoint: the train stage keeps its best epoch")
    # Epoch-level train/ and val/ metrics (and train/lr) go to MLflow with the epoch as the step.
    history = EpochHistory(history_file, on_row=runs.epoch_logger(run_id, after=logged))
    last = EpochEndCheckpoint(resume.last, history=history, on_saved=resume.record_epochs)
    trainer = build_trainer(cfg, [RandomStates(), *configured.values(), history, last], default_root_dir=models_dir)
    # The processes DDP starts on this machine inherit the environment: the run and the checkpoint.
    os.environ[distributed.RUN_ID_VARIABLE] = run_id
    os.environ[distributed.RESUME_VARIABLE] = str(ckpt_path or "")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        done = int(read_json(resume.state_file).get("epochs", 0))
        raise Interrupted(
            f"training stopped by SIGTERM after {done} completed epoch(s); run the stage again "
            f"(dvc repro) to resume run {run_id} from {resume.last}"
        ) from None
    finally:
        os.environ.pop(distributed.RUN_ID_VARIABLE, None)
        os.environ.pop(distributed.RESUME_VARIABLE, None)
    if not checkpoint.best_model_path:
        raise ConfigError(f"training produced no checkpoint: train.monitor={monitor!r} was never logged")
    shutil.copyfile(checkpoint.best_model_path, models_dir / "best.ckpt")
    atomic_write_json(models_dir / "labels.json", task.to_dict())
    best = float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else float("nan")
    # The epoch the checkpoint comes from: the first that reached the best score.
    best_row = next((r for r in history.rows if r.get(monitor) == best), {})
    best_epoch = int(best_row["epoch"]) if best_row else None
    summary = {
        "run_id": run_id,
        "monitor": monitor,
        "best": best,
        "best_epoch": best_epoch,
        "best_epoch_metrics": {k: v for k, v in best_row.items() if k != "epoch"},
        "epochs": trainer.current_epoch,
    }
    resume.clear()  # finished: nothing to resume
    log.info("train: best %s = %.4f at epoch %s (run %s)", monitor, best, best_epoch, run_id)
    return summary


def _follow(
    cfg: DictConfig,
    module: ClassifierModule,
    datamodule: ImageDataModule,
    task: Task,
    resume: ResumeFolder,
    same: str,
    models_dir: Path,
    history_file: Path,
) -> dict:
    """A DDP process other than the first: train with it, write nothing (no MLflow run, no
    ``models/``, no history file, no resume state). The run and the checkpoint to resume from
    come from the first process's environment (:data:`distributed.RESUME_VARIABLE`); a process
    of another machine, without it, reads the saved resume state (the project on a shared file
    system) and resumes from it when its fingerprint matches."""
    run_id = os.environ.get(distributed.RUN_ID_VARIABLE, "")
    if distributed.RESUME_VARIABLE in os.environ:
        ckpt_path: Path | str | None = os.environ[distributed.RESUME_VARIABLE] or None
    else:
        state = read_json(resume.state_file) if resume.state_file.is_file() else {}
        matches = state.get("fingerprint") == same and resume.last.is_file()
        ckpt_path = resume.last if matches else None
        run_id = str(state.get("run_id", "")) if matches else run_id
    monitor = task.val_metric(str(cfg.fit.monitor))
    configured = build_callbacks(cfg, monitor, checkpoint={"dirpath": str(resume.checkpoints)})
    history = EpochHistory(history_file)  # rows kept (checkpoint state), never written here
    last = EpochEndCheckpoint(resume.last, history=history)
    trainer = build_trainer(cfg, [RandomStates(), *configured.values(), history, last], default_root_dir=models_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return {"run_id": run_id, "monitor": monitor, "rank": trainer.global_rank, "epochs": trainer.current_epoch}
