"""The train stage for ``model=embeddings``: features once, a scikit-learn classifier, a checkpoint.

Instead of Lightning's epochs: the train and val splits' features come from ``data/features/``
(built when missing or stale), the classifier is fitted on the training features, written into
the model's torch head, and scored on both splits with the task's own loss and metrics. The
checkpoint has the layout the network's has (``state_dict`` under ``model.`` and the
``hyper_parameters`` :func:`taxonomist.models.inference.load_classifier` reads), so evaluate and
package take it unchanged. ``reports/train_history.csv`` gets one row (epoch 1) and the MLflow
run the same metrics, plus ``fit/seconds`` and ``fit/feature_seconds``.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from taxonomist.data.cache import read_labels, read_split
from taxonomist.errors import ConfigError
from taxonomist.files import atomic_write_json, atomic_write_text, read_json
from taxonomist.models.embeddings import EmbeddingModel, create_embedding_model
from taxonomist.models.embeddings.cache import FEATURES_DIR, split_features
from taxonomist.models.embeddings.heads import fit_classifier, to_torch
from taxonomist.models.embeddings.semi import read_pool, self_train

log = logging.getLogger(__name__)
SUPPORTED_TASKS = ("multiclass", "binary")


def check_task(cfg: DictConfig) -> None:
    """The family fits single-label classifiers: multiclass and binary tasks."""
    if str(cfg.task.name) not in SUPPORTED_TASKS:
        raise ConfigError(
            f"model=embeddings fits single-label classifiers (task={' or task='.join(SUPPORTED_TASKS)}); "
            f"task={cfg.task.name} needs a network (model=auto)"
        )


@torch.inference_mode()
def score(model: EmbeddingModel, task: Any, features: np.ndarray, targets: np.ndarray, prefix: str) -> dict[str, float]:
    """The task's loss and metrics of the fitted head on ``features``."""
    chunks = np.array_split(features, 1 + len(features) // 4096)
    logits = torch.cat([model.head(torch.from_numpy(chunk)) for chunk in chunks])
    y = torch.from_numpy(np.asarray(targets))
    metrics = task.metrics().clone(prefix=f"{prefix}/")
    metrics.update(*task.metric_inputs(logits, y))
    values = {k: float(v) for k, v in metrics.compute().items()}
    values[f"{prefix}/loss"] = float(task.loss()(logits, y))
    return values


def unlabelled_features(
    cfg: DictConfig, model: EmbeddingModel, processed_dir: Path, batch: int
) -> tuple[np.ndarray | None, dict[str, int]]:
    """Features of the ``fit.unlabelled`` pool (None when unset), decoded as the cache was made."""
    from taxonomist.data.images import ImageSpec
    from taxonomist.models.embeddings.cache import embed

    patterns = OmegaConf.select(cfg, "fit.unlabelled")
    if not patterns:
        return None, {}
    patterns = [str(patterns)] if isinstance(patterns, str) else [str(p) for p in patterns]
    pre = cfg.preprocess  # resolved: the size, channels and resize mode preprocess chose
    spec = ImageSpec(int(pre.image_size), int(pre.channels), str(pre.resize_mode))
    images, counts = read_pool(patterns, processed_dir, spec)
    return embed(model.features, images, batch, desc="features unlabelled"), counts


def write_checkpoint(path: Path, model: EmbeddingModel, cfg: DictConfig, task: Any, in_chans: int) -> None:
    """A checkpoint :func:`~taxonomist.models.inference.load_classifier` reads (temp file, rename)."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {
        "state_dict": state,
        "hyper_parameters": {
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "space": task.to_dict(),
            "in_chans": in_chans,
            "class_weights": None,
        },
        "epoch": 0,
        "global_step": 0,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)


def write_history(path: Path, row: dict[str, float]) -> None:
    """``reports/train_history.csv`` with its one row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row), lineterminator="\n")
    writer.writeheader()
    writer.writerow(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


def fit(
    cfg: DictConfig,
    processed_dir: Path,
    models_dir: Path,
    history_file: Path,
    run_id: str | None,
    features_dir: Path = FEATURES_DIR,
) -> dict[str, Any]:
    """Fit the embeddings model on the processed splits; write ``models/`` and the history."""
    from taxonomist.tracking import runs

    check_task(cfg)
    task = read_labels(processed_dir)
    report = read_json(processed_dir / "report.json")
    in_chans = int(report["image_shape"][2])
    outputs = task.num_backbone_outputs
    model = create_embedding_model(cfg.model, len(task.classes), outputs, in_chans)
    model.set_normalisation(list(cfg.preprocess.mean), list(cfg.preprocess.std))
    spec = OmegaConf.to_container(cfg.model.features, resolve=True)
    batch = int(cfg.evaluate.batch_size)

    started = time.perf_counter()
    train_x = split_features(model.features, spec, processed_dir, "train", features_dir, batch)  # type: ignore[arg-type]
    val_x = split_features(model.features, spec, processed_dir, "val", features_dir, batch)  # type: ignore[arg-type]
    feature_seconds = time.perf_counter() - started
    train_y = np.asarray(read_split(processed_dir, "train").labels)
    val_y = np.asarray(read_split(processed_dir, "val").labels)
    if len(np.unique(train_y)) < 2:
        raise ConfigError("model=embeddings: the training split holds one class; a classifier needs two or more")

    classifier = OmegaConf.to_container(cfg.model.classifier, resolve=True)
    log.info(
        "fitting %s on %d x %d features (%s)",
        classifier["name"],
        *train_x.shape,
        cfg.model.features.name,  # type: ignore[index]
    )
    pool_x, pool_counts = unlabelled_features(cfg, model, processed_dir, batch)
    started = time.perf_counter()
    semi = None
    if pool_x is None:
        pipeline = fit_classifier(classifier, train_x, train_y, int(cfg.seed))  # type: ignore[arg-type]
    else:
        st = cfg.fit.self_training
        pipeline, semi = self_train(
            lambda x, y: fit_classifier(classifier, x, y, int(cfg.seed)),  # type: ignore[arg-type]
            train_x,
            train_y,
            pool_x,
            float(st.threshold),
            int(st.max_iter),
        )
    fit_seconds = time.perf_counter() - started
    model.head = to_torch(pipeline, classifier, len(task.classes), outputs)  # type: ignore[arg-type]

    row: dict[str, float] = {"epoch": 1}
    row.update(score(model, task, train_x, train_y, "train"))
    row.update(score(model, task, val_x, val_y, "val"))
    row = {"epoch": 1, **dict(sorted((k, v) for k, v in row.items() if k != "epoch"))}
    if semi is not None:
        row["fit/pseudo_labels"] = semi.added
        row["fit/unlabelled_images"] = int(pool_counts.get("images", 0))
        row["fit/unlabelled_in_data_set"] = int(pool_counts.get("in_data_set", 0))
    row["fit/seconds"] = round(fit_seconds, 3)
    row["fit/feature_seconds"] = round(feature_seconds, 3)
    write_history(history_file, row)
    if run_id is not None:
        runs.epoch_logger(run_id)(row)

    models_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(models_dir / "best.ckpt", model, cfg, task, in_chans)
    atomic_write_json(models_dir / "labels.json", task.to_dict())
    monitor = task.val_metric(str(cfg.fit.monitor))
    log.info(
        "train: %s = %.4f (%s fitted in %.1f s on %d images; features %.1f s)",
        monitor,
        row.get(monitor, float("nan")),
        classifier["name"],  # type: ignore[index]
        fit_seconds,
        len(train_y),
        feature_seconds,
    )
    return {
        "run_id": run_id,
        "monitor": monitor,
        "best": row.get(monitor, float("nan")),
        "best_epoch": 1,
        "best_epoch_metrics": {k: v for k, v in row.items() if k != "epoch"},
        "epochs": 1,
    }
