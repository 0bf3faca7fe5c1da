"""``taxonomist suggest <pool...>``: which unlabelled images to label next.

The trained model (``models/best.ckpt``, :func:`~taxonomist.models.inference.load_classifier`)
scores every pool image, read as ``taxonomist predict`` reads images and decoded at the size and
resize mode the model was trained on. Selection (:func:`select`) combines:

* **uncertainty** (``suggest.uncertainty``): ``entropy`` of the predicted class probabilities
  divided by ``log K`` (0 = sure, 1 = uniform), or ``margin``: ``1 - (p1 - p2)`` of the two most
  probable classes. Both in [0, 1].
* **diversity** (``suggest.diversity``) among the ``suggest.candidates_factor x budget`` most
  uncertain images, on the model's embeddings (L2-normalised), so the suggestions do not all
  show the same confusing thing: ``kmeans`` (Zhdanov 2019, "Diverse mini-batch Active
  Learning"): k-means with ``k = budget`` weighted by the uncertainty, and from each cluster the
  image closest to its centre (``suggest.kmeans_pick: centre``) or its most uncertain one
  (``uncertain``); ``kcenter``: greedy k-center, the most uncertain first, then each time the
  candidate farthest from every image picked so far (it tends to pick outliers); ``none``: the
  ``budget`` most uncertain. The defaults follow ``benchmarks/active_learning.py`` (README).
  Embeddings: a ``model=embeddings`` model's own extractor, a timm network's pooled pre-logits
  features (:func:`taxonomist.explore.pool.model_outputs`).

Pool images already in the data (the SHA-256 of their bytes equals a row's of
``data/processed/splits.csv``, any split) are reported in ``overlap.csv`` and left out; an image
that appears twice in the pool counts once. Output in ``reports/suggest/`` (or ``--out``):

* ``suggestions.csv``: ``rank, path, uncertainty, predicted, score`` (the model's probability of
  its predicted label) and ``distance`` (k-means: to its cluster's centre; k-center: to the
  nearest earlier suggestion; empty without diversity);
* ``suggestions.json``: Label Studio tasks to import, ``{"data": {"image": <url>}, "predictions":
  [...]}`` with the model's answer as a pre-annotation of a ``<Choices>`` control
  (``suggest.label_studio``), and ``label_config.xml``, the labelling config they fit. Image URLs
  are Label Studio's local files, ``/data/local-files/?d=<path>`` relative to
  ``suggest.label_studio.document_root`` (default: the pool's common folder): start Label Studio
  with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<that folder>``; its JSON export reads back with
  ``data.format=label_studio data.image_root=<that folder>``;
* ``pool.csv``: every pool image with its uncertainty, prediction and status (``suggested``,
  ``candidate``, ``in the data``, ``duplicate in the pool``, ``unreadable``).

Single-label models (multiclass, binary) only; an empty pool is one error line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from taxonomist.config import DIVERSITIES, KMEANS_PICKS
from taxonomist.errors import DataError, ModelError
from taxonomist.explore.pool import model_outputs, model_spec, read_pool
from taxonomist.files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
OUT_DIR = Path("reports/suggest")
SUPPORTED_TASKS = ("multiclass", "binary")
LOCAL_FILES = "/data/local-files/?d="


def class_probabilities(task: Any, logits: np.ndarray) -> np.ndarray:
    """(N, K) class probabilities of a single-label task's logits (binary: ``[1 - p, p]``)."""
    probs = np.asarray(task.probabilities(np.asarray(logits, dtype=np.float64)), dtype=np.float64)
    if probs.ndim == 1 or probs.shape[1] == 1:
        p = probs.reshape(-1)
        probs = np.stack([1.0 - p, p], axis=1)
    return probs


def uncertainty(probs: np.ndarray, kind: str = "entropy") -> np.ndarray:
    """Per row of class probabilities, in [0, 1]: normalised ``entropy``, or ``margin``
    ``1 - (p1 - p2)`` (see the module docstring)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    k = p.shape[1]
    if kind == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        return np.clip(h / np.log(k), 0.0, 1.0) if k > 1 else np.zeros(len(p))
    if kind == "margin":
        top = np.sort(p, axis=1)[:, ::-1]
        second = top[:, 1] if k > 1 else np.zeros(len(p))
        return np.clip(1.0 - (top[:, 0] - second), 0.0, 1.0)
    raise ValueError(f"unknown uncertainty {kind!r}; use entropy or margin")


def k_center(features: np.ndarray, budget: int, first: int = 0) -> tuple[list[int], np.ndarray]:
    """Greedy k-center: start at row ``first``, then repeatedly take the row farthest from every
    row taken; returns the ``budget`` rows in the order taken, and each one's distance to the
    nearest row taken before it (NaN for the first)."""
    x = np.asarray(features, dtype=np.float64)
    budget = min(int(budget), len(x))
    chosen = [int(first)]
    gaps = [np.nan]
    nearest = np.linalg.norm(x - x[first], axis=1)
    nearest[first] = -1.0
    while len(chosen) < budget:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        gaps.append(float(nearest[pick]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[pick], axis=1))
        nearest[chosen] = -1.0
    return chosen, np.asarray(gaps)


def normalise_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (distances then compare directions, as embeddings are compared)."""
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_kmeans(
    features: np.ndarray, weights: np.ndarray, budget: int, pick: str = "centre", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Zhdanov 2019 ("Diverse mini-batch Active Learning"): k-means with ``k = budget`` on
    ``features`` weighted by ``weights`` (the uncertainty), then one row per cluster: the one
    closest to its centre (``pick="centre"``) or the one of highest weight (``"uncertain"``).
    Returns the rows, most weighted first, and each one's distance to its cluster centre. A
    cluster left empty (identical rows) is made up by the heaviest rows not taken."""
    from sklearn.cluster import KMeans

    if pick not in KMEANS_PICKS:
        raise ValueError(f"unknown k-means pick {pick!r}; use one of {KMEANS_PICKS}")
    x = np.asarray(features, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    budget = min(int(budget), len(x))
    if budget == len(x):
        order = np.argsort(-w, kind="stable")
        return order, np.zeros(len(order))
    # a small floor keeps every row in play when the uncertainties are all (nearly) zero
    sample_weight = np.maximum(w, 0.0) + 1e-6
    km = KMeans(n_clusters=budget, n_init=1, random_state=seed).fit(x, sample_weight=sample_weight)
    dist = np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1)
    chosen: list[int] = []
    for c in range(budget):
        members = np.flatnonzero(km.labels_ == c)
        if len(members) == 0:
            continue
        if pick == "centre":
            best = members[np.lexsort((-w[members], dist[members]))[0]]
        else:
            best = members[np.lexsort((dist[members], -w[members]))[0]]
        chosen.append(int(best))
    if len(chosen) < budget:  # empty clusters: fill with the heaviest rows left
        taken = set(chosen)
        rest = [int(i) for i in np.argsort(-w, kind="stable") if int(i) not in taken]
        chosen += rest[: budget - len(chosen)]
    rows = np.asarray(chosen)
    rows = rows[np.argsort(-w[rows], kind="stable")]
    return rows, dist[rows]


def select(
    unc: np.ndarray,
    features: np.ndarray,
    budget: int,
    candidates_factor: float = 10.0,
    diversity: str = "kmeans",
    pick: str = "centre",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``budget`` rows to label among the ``candidates_factor x budget`` rows of highest ``unc``:
    ``diversity="kmeans"`` (:func:`weighted_kmeans` on the L2-normalised ``features``, weighted by
    ``unc``), ``"kcenter"`` (:func:`k_center`, starting at the most uncertain) or ``"none"`` (the
    ``budget`` most uncertain). Returns the chosen rows in order, their distances (k-means: to the
    cluster centre; k-center: to the nearest earlier pick; none: NaN), and the candidate rows."""
    if diversity not in DIVERSITIES:
        raise ValueError(f"unknown diversity {diversity!r}; use one of {DIVERSITIES}")
    unc = np.asarray(unc, dtype=np.float64)
    budget = min(int(budget), len(unc))
    size = min(len(unc), max(budget, int(np.ceil(candidates_factor * budget))))
    if diversity == "none":
        size = budget
    order = np.argsort(-unc, kind="stable")
    candidates = order[:size]
    if size == budget:
        return candidates, np.full(budget, np.nan), candidates
    x = normalise_rows(features[candidates])
    if diversity == "kcenter":
        picked, gaps = k_center(x, budget, first=0)
        return candidates[picked], gaps, candidates
    picked, gaps = weighted_kmeans(x, unc[candidates], budget, pick=pick, seed=seed)
    return candidates[picked], gaps, candidates


def known_hashes(processed_dir: Path) -> pd.DataFrame:
    """``sha256 -> split, path`` of the data set's images (``splits.csv``); empty when there is none."""
    table = processed_dir / "splits.csv"
    if not table.is_file():
        log.warning("suggest: %s not found: pool images are not checked against the training data", table)
        return pd.DataFrame(columns=["split", "path"], index=pd.Index([], name="sha256"))
    frame = pd.read_csv(table, dtype=str, keep_default_na=False)
    if "source_id" in frame.columns:  # the user's own name of the image (the ingested copy's path otherwise)
        frame["path"] = frame["source_id"].where(frame["source_id"] != "", frame["path"])
    return frame.drop_duplicates("sha256").set_index("sha256")[["split", "path"]]


def overlap(keys: Sequence[str], hashes: Sequence[str], known: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Which pool images to keep (a boolean per key): not in ``known`` (the data set), and the
    first of each run of identical images. Plus a table of those left out and why."""
    keep = np.ones(len(keys), dtype=bool)
    rows = []
    seen: dict[str, str] = {}
    for i, (key, sha) in enumerate(zip(keys, hashes, strict=True)):
        if sha in known.index:
            keep[i] = False
            hit = known.loc[sha]
            rows.append({"path": key, "reason": "in the data", "split": hit["split"], "same_as": hit["path"]})
        elif sha in seen:
            keep[i] = False
            rows.append({"path": key, "reason": "duplicate in the pool", "split": "", "same_as": seen[sha]})
        else:
            seen[sha] = key
    return keep, pd.DataFrame(rows, columns=["path", "reason", "split", "same_as"])


def image_url(key: str, root: Path | None) -> str:
    """Label Studio's local-files URL of ``key``, relative to ``root``."""
    path = Path(key).resolve()
    if root is not None and path.is_relative_to(root):
        rel = path.relative_to(root).as_posix()
    else:
        rel = path.as_posix().lstrip("/")
    return f"{LOCAL_FILES}{rel}"


def document_root(keys: Sequence[str], configured: str | None) -> Path | None:
    """The folder image URLs are relative to: ``configured``, else the keys' common folder."""
    if configured:
        return Path(configured).expanduser().resolve()
    files = [str(Path(k).resolve().parent) for k in keys if Path(k).is_file()]
    return Path(os.path.commonpath(files)) if files else None


def label_studio_tasks(
    suggestions: pd.DataFrame, root: Path | None, from_name: str, to_name: str, model_version: str
) -> list[dict[str, Any]]:
    """Label Studio import tasks: the image URL, and the model's answer as a pre-annotation."""
    tasks = []
    for row in suggestions.itertuples(index=False):
        result = {
            "from_name": from_name,
            "to_name": to_name,
            "type": "choices",
            "value": {"choices": [str(row.predicted)]},
        }
        prediction = {"model_version": model_version, "score": round(float(row.score), 4), "result": [result]}
        tasks.append({"data": {"image": image_url(str(row.path), root)}, "predictions": [prediction]})
    return tasks


def label_config(classes: Sequence[str], from_name: str, to_name: str) -> str:
    """A Label Studio labelling config: the image and one ``<Choices>`` of the model's classes."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return (
        f'<View>\n  <Image name={quoteattr(to_name)} value="$image"/>\n'
        f'  <Choices name={quoteattr(from_name)} toName={quoteattr(to_name)} choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def run(
    args: list[str],
    cfg: DictConfig,
    checkpoint: Path = Path("models/best.ckpt"),
    budget: int | None = None,
    out: Path = OUT_DIR,
    processed_dir: Path = Path("data/processed"),
    track: bool = True,
) -> dict[str, Any]:
    """``taxonomist suggest``: score the pool, leave out what the data holds, pick, write, and
    log the run (settings, numbers, files) to MLflow's ``<experiment>-explore`` experiment."""
    from taxonomist.models.inference import load_classifier

    settings = cfg.suggest
    budget = int(settings.budget if budget is None else budget)
    classifier = load_classifier(checkpoint)
    task = classifier.task
    if task.name not in SUPPORTED_TASKS:
        raise ModelError(
            f"taxonomist suggest ranks single-label models ({', '.join(SUPPORTED_TASKS)}); {checkpoint} is {task.name}"
        )
    pool = read_pool(args, model_spec(classifier), what="pool")
    keep, dropped = overlap(pool.keys, pool.sha256, known_hashes(processed_dir))
    in_data = int((dropped["reason"] == "in the data").sum())
    if not keep.any():
        raise DataError(f"{' '.join(args)}: every pool image is already in the data ({processed_dir}/splits.csv)")
    if in_data:
        log.warning(
            "suggest: %d pool image(s) are already in the data (%s): left out, see overlap.csv", in_data, processed_dir
        )
    kept = pool.subset(np.flatnonzero(keep))
    features, logits = model_outputs(classifier, kept.images, int(settings.batch_size))
    probs = class_probabilities(task, logits)
    unc = uncertainty(probs, str(settings.uncertainty))
    if budget > len(kept):
        log.info("suggest: budget %d is more than the %d new pool images: all are suggested", budget, len(kept))
    chosen, gaps, candidates = select(
        unc,
        features,
        budget,
        float(settings.candidates_factor),
        diversity=str(settings.diversity),
        pick=str(settings.kmeans_pick),
        seed=int(cfg.seed),
    )
    classes = list(task.classes)
    top = probs.argmax(1)
    predicted = [classes[i] for i in top]
    score = probs[np.arange(len(probs)), top]

    out.mkdir(parents=True, exist_ok=True)
    suggestions = pd.DataFrame(
        {
            "rank": np.arange(1, len(chosen) + 1),
            "path": [kept.keys[i] for i in chosen],
            "uncertainty": np.round(unc[chosen], 4),
            "predicted": [predicted[i] for i in chosen],
            "score": np.round(score[chosen], 4),
            "distance": np.round(gaps, 4),
        }
    )
    atomic_write_text(out / "suggestions.csv", suggestions.to_csv(index=False))
    ls = settings.label_studio
    root = document_root(list(suggestions["path"]), ls.document_root)
    tasks = label_studio_tasks(suggestions, root, str(ls.from_name), str(ls.to_name), f"taxonomist:{checkpoint.name}")
    atomic_write_json(out / "suggestions.json", tasks)
    atomic_write_text(out / "label_config.xml", label_config(classes, str(ls.from_name), str(ls.to_name)))
    if len(dropped):
        atomic_write_text(out / "overlap.csv", dropped.to_csv(index=False))
    elif (out / "overlap.csv").exists():
        (out / "overlap.csv").unlink()

    status = np.full(len(kept), "", dtype=object)
    status[candidates] = "candidate"
    status[chosen] = "suggested"
    table = pd.DataFrame(
        {
            "path": kept.keys,
            "uncertainty": np.round(unc, 4),
            "predicted": predicted,
            "score": np.round(score, 4),
            "status": status,
        }
    ).sort_values("uncertainty", ascending=False, kind="stable")
    rest = pd.DataFrame(
        [{"path": r.path, "status": r.reason} for r in dropped.itertuples(index=False)]
        + [{"path": k, "status": "unreadable"} for k in pool.failed]
    )
    atomic_write_text(out / "pool.csv", pd.concat([table, rest], ignore_index=True).to_csv(index=False))
    log.info(
        "suggest: %d of %d new pool image(s) suggested (%s, diversity %s among the %d most uncertain) into %s",
        len(chosen),
        len(kept),
        settings.uncertainty,
        settings.diversity,
        len(candidates),
        out,
    )
    summary = {
        "out": str(out),
        "suggested": len(chosen),
        "pool": len(pool) + len(pool.failed),
        "new": len(kept),
        "in_data": in_data,
        "duplicates": int((dropped["reason"] == "duplicate in the pool").sum()),
        "unreadable": len(pool.failed),
        "mean_uncertainty_suggested": round(float(unc[chosen].mean()), 4),
        "mean_uncertainty_pool": round(float(unc.mean()), 4),
        "label_studio_root": str(root) if root is not None else None,
    }
    if track:
        from taxonomist.config import flatten
        from taxonomist.explore.track import log_run, try_log

        params = {**flatten(settings, prefix="suggest."), "suggest.budget": budget, "checkpoint": str(checkpoint)}
        numbers = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        written = ("suggestions.csv", "suggestions.json", "label_config.xml", "pool.csv", "overlap.csv")
        files = [out / n for n in written if (out / n).is_file()]
        name = f"suggest-{settings.uncertainty}-{settings.diversity}-{len(chosen)}"
        run_id = try_log("suggest", out, lambda: log_run(cfg, "suggest", name, params, numbers, files, args))
        if run_id is not None:
            summary["mlflow_run_id"] = run_id
    return summary
