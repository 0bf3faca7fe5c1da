"""``taxonomist cv``: k-fold cross-validation over the training pool, one MLflow child run per fold.

The folds (:mod:`.folds`) are drawn over the train + val splits of ``data/processed``; each
fold's model is fitted on the other folds and predicts the images it holds out:

- ``model=embeddings``: the pool's features are built once (cached in ``<cv.work_dir>/features``,
  keyed by extractor and data as the train stage's ``data/features`` is) and the scikit-learn
  classifier is fitted per fold on the features of the other folds (seconds per fold);
- a network: a processed copy of the fold (``<cv.work_dir>/fold-<k>/processed``: the other folds
  as its train split, the held-out fold as its val split, an empty test split) is trained by the
  ordinary train stage (Lightning, with the pipeline's callbacks: early stopping and the kept
  checkpoint watch the held-out fold, as the train stage watches val), then the kept checkpoint
  predicts the held-out fold. The folder is deleted after the fold unless ``cv.keep_work``.

Each fold is an MLflow child run (``cv/val/<metric>``: the task's val metrics of its held-out
images) under a parent run that gets ``cv/<metric>_mean`` and ``cv/<metric>_std`` (over the
folds, sample standard deviation) and ``cv/oof_<metric>`` (over every out-of-fold prediction
at once). Outputs in ``reports/cv/``: ``folds.csv`` (one row per fold), ``summary.md``,
``oof.npz`` (every pool image's path in ``data/raw``, sha256, source id (where it came from),
split, row, group, fold, given label and out-of-fold class probabilities: what
``taxonomist label-errors`` reads) and ``cv.json`` (the parent run, the folds, the summary),
logged to the parent run under ``cv/``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from taxonomist.crossval.folds import POOL_SPLITS, Pool, assign_folds, effective_folds, fold_statistics, read_pool
from taxonomist.data import auto
from taxonomist.data.cache import read_labels, read_split, write_split
from taxonomist.data.manifest import COLUMNS
from taxonomist.errors import ConfigError, missing_input
from taxonomist.files import atomic_directory, atomic_write_json, atomic_write_text, read_json, sha256_file
from taxonomist.models.embeddings import is_embeddings
from taxonomist.stages.paths import PROCESSED_DIR
from taxonomist.tasks import Task
from taxonomist.tracking import runs

log = logging.getLogger(__name__)
CV_DIR = Path("reports/cv")
OOF_FILE = "oof.npz"
STATE_FILE = "cv.json"
ROLE_TAG = "taxonomist.role"  # as the sweeps' parent runs: tells a cv parent run apart


@dataclass
class FoldResult:
    """One fold: the pool indices it held out, their logits, the task's metrics of them."""

    fold: int
    held_out: np.ndarray
    logits: np.ndarray
    metrics: dict[str, float]
    train_images: int
    seconds: float
    run_id: str | None


def class_probabilities(task: Task, logits: np.ndarray) -> np.ndarray:
    """(N, classes) probabilities of single-label ``logits`` (binary: [1 - p, p])."""
    probs = np.asarray(task.probabilities(logits), dtype=np.float64)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    return probs


@torch.inference_mode()
def heldout_metrics(task: Task, logits: np.ndarray, targets: np.ndarray, prefix: str = "val") -> dict[str, float]:
    """The task's metrics and loss (no label smoothing) of ``logits`` against ``targets``."""
    x = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    y = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    metrics = task.metrics().clone(prefix=f"{prefix}/")
    metrics.update(*task.metric_inputs(x, y))
    values = {k: float(v) for k, v in metrics.compute().items()}
    values[f"{prefix}/loss"] = float(task.loss()(x, y))
    return dict(sorted(values.items()))


def run(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    out_dir: Path = CV_DIR,
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Cross-validate ``cfg``'s model on the training pool of ``processed_dir``; write ``out_dir``."""
    processed_dir, out_dir = Path(processed_dir), Path(out_dir)
    if not (processed_dir / "splits.csv").is_file():
        raise missing_input(processed_dir / "splits.csv", "preprocess")
    work_dir = Path(work_dir or cfg.cv.work_dir)
    pool = read_pool(processed_dir)
    groups = None if cfg.cv.groups is False else pool.groups
    if cfg.cv.groups is True and groups is None:
        raise ConfigError("cv.groups=true but data/processed has no groups: set data.group_by, or cv.groups=auto")
    stratified = bool(cfg.cv.stratified)
    folds = effective_folds(int(cfg.cv.folds), pool.targets, groups, stratified)
    fold_of = assign_folds(pool.targets, folds, int(cfg.cv.seed), stratified, groups)
    resolved = auto.resolve(cfg, processed_dir)
    task = read_labels(processed_dir)
    model_name = (
        f"{resolved.model.name} ({resolved.model.features.name} + {resolved.model.classifier.name})"
        if is_embeddings(resolved.model)
        else str(resolved.model.name)
    )
    how = "grouped, " if groups is not None else ""
    how += "stratified" if stratified else "unstratified"
    log.info("cv: %d folds (%s) over %d training-pool images, %s", folds, how, len(pool), model_name)

    digest = sha256_file(processed_dir / "splits.csv")
    name = f"cv: {model_name} on {runs.dataset_name(cfg)}, {folds} folds"
    parent = runs.start_pipeline_run(
        resolved,
        tags={ROLE_TAG: "cv", "stage": "cv", "data_hash": digest, "cv.folds": str(folds)},
        spec=runs.RunSpec(name=name, launched_by="`taxonomist cv`", record=False),
    )

    def child(k: int) -> runs.RunSpec:
        return runs.RunSpec(
            name=f"{name}: fold {k + 1}",
            parent_run_id=parent,
            tags={ROLE_TAG: "cv-fold", "cv.fold": str(k + 1), "cv.parent": parent},
            launched_by=f"`taxonomist cv` (fold {k + 1} of {folds})",
            record=False,
        )

    import mlflow

    client = mlflow.MlflowClient()
    started = time.perf_counter()
    try:
        if is_embeddings(resolved.model):
            results = embeddings_folds(resolved, processed_dir, pool, fold_of, work_dir, child)
        else:
            results = network_folds(cfg, resolved, processed_dir, pool, fold_of, work_dir, child)
        summary = write_outputs(out_dir, task, pool, fold_of, results, parent, model_name, how)
        metrics = {f"cv/{k}": v for k, v in summary["metrics"].items()}
        metrics["cv/folds"] = folds
        metrics["cv/seconds"] = round(time.perf_counter() - started, 3)
        runs.log_run_metrics(parent, metrics)
        client.log_artifacts(parent, str(out_dir), artifact_path="cv")
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    client.set_terminated(parent, status="FINISHED")
    log.info(
        "cv: %s",
        ", ".join(
            f"{k} {summary['metrics'][f'{k}_mean']:.4f} ± {summary['metrics'][f'{k}_std']:.4f}"
            for k in summary["val_metrics"]
        ),
    )
    return summary


def embeddings_folds(
    cfg: DictConfig,
    processed_dir: Path,
    pool: Pool,
    fold_of: np.ndarray,
    work_dir: Path,
    child: Callable[[int], runs.RunSpec],
) -> list[FoldResult]:
    """``model=embeddings``: the pool's features once, the classifier fitted fold by fold."""
    from taxonomist.models.embeddings import create_embedding_model
    from taxonomist.models.embeddings.cache import split_features
    from taxonomist.models.embeddings.fit import check_task
    from taxonomist.models.embeddings.heads import fit_classifier, to_torch

    check_task(cfg)
    torch.manual_seed(int(cfg.seed))
    task = read_labels(processed_dir)
    in_chans = int(read_json(processed_dir / "report.json")["image_shape"][2])
    outputs = task.num_backbone_outputs
    model = create_embedding_model(cfg.model, len(task.classes), outputs, in_chans)
    spec: dict[str, Any] = OmegaConf.to_container(cfg.model.features, resolve=True)  # type: ignore[assignment]
    classifier: dict[str, Any] = OmegaConf.to_container(cfg.model.classifier, resolve=True)  # type: ignore[assignment]
    batch = int(cfg.evaluate.batch_size)
    started = time.perf_counter()
    features = np.concatenate(
        [split_features(model.features, spec, processed_dir, s, work_dir / "features", batch) for s in POOL_SPLITS]
    )
    log.info("cv: %d x %d features in %.1f s", *features.shape, time.perf_counter() - started)
    results = []
    for k in range(int(fold_of.max()) + 1):
        run_id = runs.start_pipeline_run(cfg, tags={"stage": "cv"}, spec=child(k))
        started = time.perf_counter()
        train, held = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        fitted = fit_classifier(classifier, features[train], pool.targets[train], int(cfg.seed))
        head = to_torch(fitted, classifier, len(task.classes), outputs)
        with torch.inference_mode():
            logits = head(torch.from_numpy(features[held])).float().numpy()
        seconds = time.perf_counter() - started
        result = FoldResult(
            k, held, logits, heldout_metrics(task, logits, pool.targets[held]), len(train), seconds, run_id
        )
        finish_fold(run_id, result)
        results.append(result)
    return results


def write_fold_view(processed_dir: Path, pool: Pool, fold_of: np.ndarray, k: int, out: Path, seed: int) -> None:
    """A processed folder of fold ``k``: the other folds as train (seeded random order), the
    held-out fold as val (pool order), an empty test split; labels.json, report.json (with the
    fold's split sizes) and splits.csv as preprocess writes them."""
    arrays = {split: read_split(processed_dir, split) for split in POOL_SPLITS}
    shape = arrays["train"].images.shape[1:]
    rows = pool.frame

    def gather(index: np.ndarray) -> np.ndarray:
        images = np.empty((len(index), *shape), dtype=np.uint8)
        part = rows.iloc[index]
        for split in POOL_SPLITS:
            mask = (part["split"] == split).to_numpy()
            if mask.any():
                wanted = part["row"].to_numpy()[mask]
                order = np.argsort(wanted)  # read the memory map front to back
                block = np.asarray(arrays[split].images[wanted[order]])
                images[np.flatnonzero(mask)[order]] = block
        return images

    train = np.random.default_rng(seed + k).permutation(np.flatnonzero(fold_of != k))
    held = np.flatnonzero(fold_of == k)
    with atomic_directory(out) as tmp:
        write_split(tmp, "train", gather(train), pool.targets[train])
        write_split(tmp, "val", gather(held), pool.targets[held])
        write_split(tmp, "test", np.zeros((0, *shape), np.uint8), pool.targets[:0])
        shutil.copyfile(processed_dir / "labels.json", tmp / "labels.json")
        report = read_json(processed_dir / "report.json")
        report["per_split"] = {"train": len(train), "val": len(held), "test": 0}
        report["cv_fold"] = {"fold": k + 1, "folds": int(fold_of.max()) + 1, "source": str(processed_dir)}
        atomic_write_json(tmp / "report.json", report)
        view = pd.concat([rows.iloc[train].assign(split="train"), rows.iloc[held].assign(split="val")])
        atomic_write_text(tmp / "splits.csv", view[[c for c in COLUMNS if c in view.columns]].to_csv(index=False))


def network_folds(
    cfg: DictConfig,
    resolved: DictConfig,
    processed_dir: Path,
    pool: Pool,
    fold_of: np.ndarray,
    work_dir: Path,
    child: Callable[[int], runs.RunSpec],
) -> list[FoldResult]:
    """A network: the train stage on a processed copy of each fold, then its kept checkpoint
    predicts the held-out fold."""
    from taxonomist.models.inference import load_classifier
    from taxonomist.stages import train as train_stage
    from taxonomist.stages.evaluate import predict_split

    task = read_labels(processed_dir)
    results = []
    for k in range(int(fold_of.max()) + 1):
        folder = work_dir / f"fold-{k + 1}"
        shutil.rmtree(folder, ignore_errors=True)  # a left-over fold (an interrupted run) starts afresh
        processed = folder / "processed"
        started = time.perf_counter()
        write_fold_view(processed_dir, pool, fold_of, k, processed, int(cfg.cv.seed))
        log.info(
            "cv: fold %d: training on %d images, %d held out",
            k + 1,
            int((fold_of != k).sum()),
            int((fold_of == k).sum()),
        )
        summary = train_stage.run(
            cfg,
            processed_dir=processed,
            models_dir=folder / "models",
            spec=child(k),
            health_dir=folder / "health",
            history_file=folder / "train_history.csv",
            resume_dir=folder / "resume",
        )
        model = load_classifier(folder / "models" / "best.ckpt")
        logits, targets = predict_split(
            model, processed, "val", int(cfg.evaluate.batch_size), resolved.preprocess.mean, resolved.preprocess.std
        )
        held = np.flatnonzero(fold_of == k)
        seconds = time.perf_counter() - started
        result = FoldResult(
            k,
            held,
            logits,
            heldout_metrics(task, logits, targets),
            int((fold_of != k).sum()),
            seconds,
            summary["run_id"],
        )
        finish_fold(summary["run_id"], result)
        results.append(result)
        if not cfg.cv.keep_work:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def finish_fold(run_id: str | None, result: FoldResult) -> None:
    """Log the fold's held-out metrics (``cv/val/...``) and sizes to its run and close it."""
    log.info(
        "cv: fold %d: %s (%d held out, %.1f s)",
        result.fold + 1,
        ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()),
        len(result.held_out),
        result.seconds,
    )
    if run_id is None:
        return
    import mlflow

    metrics = {f"cv/{k}": v for k, v in result.metrics.items()}
    metrics.update({"cv/held_out_images": len(result.held_out), "cv/train_images": result.train_images})
    metrics["cv/seconds"] = round(result.seconds, 3)
    runs.log_run_metrics(run_id, metrics)
    mlflow.MlflowClient().set_terminated(run_id, status="FINISHED")


def write_outputs(
    out_dir: Path,
    task: Task,
    pool: Pool,
    fold_of: np.ndarray,
    results: list[FoldResult],
    parent: str,
    model_name: str,
    how: str,
) -> dict[str, Any]:
    """``folds.csv``, ``summary.md``, ``oof.npz`` and ``cv.json`` in ``out_dir`` (swapped in whole)."""
    n, classes = len(pool), list(task.classes)
    logits = np.zeros((n, results[0].logits.shape[1] if results[0].logits.ndim == 2 else 1), np.float32)
    seen = np.zeros(n, dtype=np.int64)
    for r in results:
        logits[r.held_out] = r.logits.reshape(len(r.held_out), -1)
        seen[r.held_out] += 1
    if (seen != 1).any():  # every image exactly once: an invariant of the folds
        raise RuntimeError(f"out-of-fold predictions: {int((seen != 1).sum())} image(s) predicted {set(seen)} times")
    probs = class_probabilities(task, logits)
    oof_metrics = heldout_metrics(task, logits, pool.targets, prefix="oof")
    per_fold = [r.metrics for r in results]
    stats = {k.removeprefix("val/"): v for k, v in fold_statistics(per_fold).items()}
    val_metrics = [k.removeprefix("val/") for k in per_fold[0]]
    metrics = {**stats, **{k.replace("oof/", "oof_"): v for k, v in oof_metrics.items()}}

    table = pd.DataFrame(
        [
            {
                "fold": r.fold + 1,
                "held_out_images": len(r.held_out),
                "train_images": r.train_images,
                **r.metrics,
                "seconds": round(r.seconds, 3),
                "run_id": r.run_id or "",
            }
            for r in results
        ]
    )
    frame = pool.frame
    summary = {
        "parent_run_id": parent,
        "model": model_name,
        "folds": len(results),
        "how": how,
        "images": n,
        "classes": classes,
        "val_metrics": val_metrics,
        "metrics": metrics,
    }
    with atomic_directory(out_dir) as tmp:
        atomic_write_text(tmp / "folds.csv", table.to_csv(index=False))
        np.savez_compressed(
            tmp / OOF_FILE,
            path=frame["path"].to_numpy(dtype=str),
            sha256=frame["sha256"].to_numpy(dtype=str),
            source_id=frame["source_id"].to_numpy(dtype=str),
            split=frame["split"].to_numpy(dtype=str),
            row=frame["row"].to_numpy(dtype=np.int64),
            group=frame["group"].to_numpy(dtype=str) if "group" in frame else np.full(n, "", dtype=str),
            fold=fold_of + 1,
            label=np.asarray([classes[t] for t in pool.targets], dtype=str),
            given=pool.targets,
            probs=probs.astype(np.float32),
            classes=np.asarray(classes, dtype=str),
        )
        atomic_write_text(tmp / "summary.md", summary_markdown(summary, table, oof_metrics))
        atomic_write_json(tmp / STATE_FILE, summary)
    return summary


def summary_markdown(summary: dict[str, Any], table: pd.DataFrame, oof: dict[str, float]) -> str:
    """The parent run's summary (Markdown): mean ± std of each metric, the per-fold table."""
    metrics = summary["metrics"]
    lines = [
        f"# Cross-validation: {summary['model']}",
        "",
        f"{summary['folds']} folds ({summary['how']}) over the training pool: {summary['images']} images "
        f"(train + val splits), {len(summary['classes'])} classes. MLflow parent run `{summary['parent_run_id']}`.",
        "",
        "| metric | mean | std (over folds) | out-of-fold (all images) |",
        "|---|---|---|---|",
    ]
    for key in summary["val_metrics"]:
        whole = oof.get(f"oof/{key}", float("nan"))
        lines.append(f"| {key} | {metrics[f'{key}_mean']:.4f} | {metrics[f'{key}_std']:.4f} | {whole:.4f} |")
    lines += ["", "Per fold (held-out images):", "", table.to_markdown(index=False, floatfmt=".4f"), ""]
    return "\n".join(lines)
