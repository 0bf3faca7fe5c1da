"""``taxonomist cluster <images...>``: group images without labels, and a report a person reads.

1. The images (folders, globs, manifests, archives, list files, as ``taxonomist predict`` takes
   them) are decoded at ``cluster.image_size`` and embedded by the extractor ``cluster.features``
   names (a ``conf/model/features/`` config: HOG, LBP, colour histograms, EfficientNet-Lite0), or
   with ``cluster.features: model`` by the trained model's own features (``models/best.ckpt``).
2. The features are standardised and reduced to ``cluster.pca`` principal components, then
   grouped by scikit-learn's :class:`~sklearn.cluster.KMeans` or
   :class:`~sklearn.mixture.GaussianMixture` (``cluster.method``). ``cluster.k: auto`` fits every
   k of ``cluster.k_range`` and keeps the best silhouette (k-means) or the lowest BIC (mixture);
   the curve is plotted. Clusters are numbered by size, ``cluster_0`` the largest.
3. ``reports/clusters/`` (or ``--out``): ``clusters.md`` (the summary to read), ``grid.png`` (a row
   per cluster: the images nearest its centre), ``sizes.csv``/``sizes.png``,
   ``k_choice.csv``/``k_choice.png`` (auto), ``assignments.csv`` (every image: cluster, distance to
   the centre, label if any), ``metrics.json``, and ``clusters.csv``: a manifest (``path``,
   ``label = cluster_<i>``) to correct and feed back to ingest
   (``taxonomist compose data=folder data.source=reports/clusters/clusters.csv``).
   When the images carry labels (a folder per class, a manifest with ``label``), purity, NMI and
   ARI of the clusters against them.
4. With tracking configured, an MLflow run in the experiment ``<tracking.experiment>-explore``:
   the settings as params, the metrics, the report as artifacts.

``cluster.k`` above the number of images is an error (it cannot be met, and quietly fitting fewer
clusters would change the question); ``k: auto`` caps ``k_range`` at images - 1 with a log line.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from taxonomist.config import AUTO
from taxonomist.data.images import ImageSpec
from taxonomist.errors import DataError
from taxonomist.explore import track
from taxonomist.explore.pool import (
    MODEL_FEATURES,
    Pool,
    key_labels,
    model_outputs,
    model_spec,
    named_extractor,
    read_pool,
)
from taxonomist.explore.track import try_log
from taxonomist.files import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
OUT_DIR = Path("reports/clusters")
SILHOUETTE_SAMPLE = 5000  # images the silhouette is computed on (it is quadratic in the images)


@dataclass
class Clustering:
    """The fitted grouping: ``labels[i]`` is image i's cluster (0 = largest), ``distance[i]`` its
    distance to that cluster's centre (in the reduced space), and how k was chosen."""

    labels: np.ndarray
    distance: np.ndarray
    k: int
    curve: pd.DataFrame | None  # k, score (auto only)
    criterion: str  # silhouette | bic
    score: float  # the criterion at the chosen k


def reduce(features: np.ndarray, components: int | None, seed: int) -> np.ndarray:
    """Standardised ``features``, projected on their first ``components`` principal components
    (at most images - 1 and features; None: standardised only)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(features.astype(np.float64))
    x = np.nan_to_num(x)
    if components is None:
        return x
    keep = min(int(components), x.shape[1], max(1, x.shape[0] - 1))
    return PCA(n_components=keep, random_state=seed).fit_transform(x)


def _fit(x: np.ndarray, method: str, k: int, seed: int, covariance: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Cluster labels, centres and the fitted estimator."""
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        gmm = GaussianMixture(k, covariance_type=covariance, random_state=seed, reg_covar=1e-4, n_init=2)
        return gmm.fit_predict(x), gmm.means_, gmm
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    return km.fit_predict(x), km.cluster_centers_, km


def _criterion(x: np.ndarray, labels: np.ndarray, estimator: Any, method: str, seed: int) -> float:
    """Silhouette (k-means; higher is better) or BIC (mixture; lower is better)."""
    if method == "gmm":
        return float(estimator.bic(x))
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2 or len(np.unique(labels)) >= len(x):
        return float("nan")
    sample = min(len(x), SILHOUETTE_SAMPLE)
    return float(silhouette_score(x, labels, sample_size=sample, random_state=seed))


def k_candidates(k: Any, k_range: list[int], n: int) -> list[int]:
    """The k values to try: ``[k]``, or ``k_range`` capped at ``n - 1`` for auto. A
    :class:`DataError` when k exceeds the images, or when auto has fewer than 3 images."""
    if k != AUTO:
        if int(k) > n:
            raise DataError(
                f"cluster.k={k} but only {n} image(s) were read: k can be at most the number of images "
                "(set a smaller cluster.k, or cluster.k=auto)"
            )
        return [int(k)]
    lo, hi = int(k_range[0]), int(k_range[1])
    if n < 3:
        raise DataError(f"cluster.k=auto needs at least 3 images to compare groupings, got {n}")
    if hi > n - 1:
        log.info("cluster: k_range [%d, %d] capped at %d (%d images)", lo, hi, n - 1, n)
        hi = n - 1
    return list(range(min(lo, hi), hi + 1))


def cluster(x: np.ndarray, method: str, k: Any, k_range: list[int], seed: int, covariance: str = "diag") -> Clustering:
    """Group the rows of ``x`` (see the module docstring); k from ``k`` or chosen in ``k_range``."""
    criterion = "bic" if method == "gmm" else "silhouette"
    tried = k_candidates(k, k_range, len(x))
    fits = {}
    rows = []
    for kk in tried:
        labels, centres, estimator = _fit(x, method, kk, seed, covariance)
        score = _criterion(x, labels, estimator, method, seed)
        fits[kk] = (labels, centres)
        rows.append({"k": kk, criterion: score})
    curve = pd.DataFrame(rows)
    if len(tried) == 1:
        best = tried[0]
    else:
        values = curve[criterion].to_numpy(dtype=float)
        values = np.where(np.isnan(values), np.inf if method == "gmm" else -np.inf, values)
        best = int(curve["k"].iloc[int(np.argmin(values) if method == "gmm" else np.argmax(values))])
    labels, centres = fits[best]
    labels, centres = by_size(labels, centres)
    distance = np.linalg.norm(x - centres[labels], axis=1)
    score = float(curve.loc[curve["k"] == best, criterion].iloc[0])
    return Clustering(labels, distance, best, curve if k == AUTO else None, criterion, score)


def by_size(labels: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by size, largest first (ties: the old number); empty clusters dropped."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    mapping = np.full(len(centres), -1)
    mapping[order] = np.arange(len(order))
    return mapping[labels], centres[order]


def agreement(truth: list[str], labels: np.ndarray) -> dict[str, float]:
    """Purity (the share of images whose cluster's most common label is theirs), normalised
    mutual information and adjusted Rand index of ``labels`` against the true labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    table = pd.crosstab(pd.Series(labels, name="cluster"), pd.Series(truth, name="label"))
    return {
        "purity": float(table.max(axis=1).sum() / len(labels)),
        "nmi": float(normalized_mutual_info_score(truth, labels)),
        "ari": float(adjusted_rand_score(truth, labels)),
    }


def cluster_name(i: int) -> str:
    """The label a cluster gets in ``clusters.csv``."""
    return f"cluster_{i}"


@dataclass
class Embedded:
    """The images and their features, and what made the features."""

    pool: Pool
    features: np.ndarray
    source: str  # a sentence: which extractor, at what size


def embed_images(args: list[str], settings: DictConfig, conf_dir: str | Path, checkpoint: Path) -> Embedded:
    """Read the images ``args`` name and embed them with ``settings.features``."""
    from taxonomist.models.embeddings.cache import embed

    name = str(settings.features)
    batch = int(settings.batch_size)
    if name == MODEL_FEATURES:
        from taxonomist.models.inference import load_classifier

        classifier = load_classifier(checkpoint)
        spec = model_spec(classifier)
        pool = read_pool(args, spec)
        features, _ = model_outputs(classifier, pool.images, batch)
        what = f"the trained model's features ({checkpoint}: `{classifier.cfg.model.name}`)"
    else:
        extractor, params = named_extractor(name, conf_dir, in_chans=3)
        spec = ImageSpec(int(settings.image_size), 3, str(settings.resize_mode))
        pool = read_pool(args, spec)
        features = embed(extractor, pool.images, batch, desc="features")
        what = f"`{name}` features" + (f" ({params['name']})" if params["name"] != name else "")
    return Embedded(
        pool, features, f"{what} of {spec.size} px images ({spec.resize_mode}), {features.shape[1]} numbers each"
    )


def run(
    args: list[str],
    cfg: DictConfig,
    out: Path = OUT_DIR,
    checkpoint: Path = Path("models/best.ckpt"),
    conf_dir: str | Path = "conf",
    track: bool = True,
) -> dict[str, Any]:
    """``taxonomist cluster``: embed, group, write the report to ``out``, log it to MLflow."""
    settings = cfg.cluster
    started = time.perf_counter()
    data = embed_images(args, settings, conf_dir, checkpoint)
    pool = data.pool
    seed = int(settings.seed)
    x = reduce(data.features, None if settings.pca is None else int(settings.pca), seed)
    result = cluster(x, str(settings.method), settings.k, list(settings.k_range), seed, str(settings.covariance))
    labels = key_labels(args, pool.keys)
    truth = labels if all(lab is not None for lab in labels) and len(set(labels)) >= 2 else None
    metrics: dict[str, float] = {"images": float(len(pool)), "k": float(result.k), result.criterion: result.score}
    if truth is not None:
        metrics.update(agreement(truth, result.labels))  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    metrics["seconds"] = round(seconds, 2)
    out.mkdir(parents=True, exist_ok=True)
    files = write_report(out, args, cfg, data, result, truth, metrics)
    summary: dict[str, Any] = {"out": str(out), "k": result.k, "images": len(pool), "unreadable": len(pool.failed)}
    summary.update({k: round(v, 4) for k, v in metrics.items() if k in ("purity", "nmi", "ari", result.criterion)})
    if track:
        run_id = try_log("cluster", out, lambda: log_run(cfg, out, metrics, files, args))
        if run_id is not None:
            summary["mlflow_run_id"] = run_id
    return summary


def write_report(
    out: Path,
    args: list[str],
    cfg: DictConfig,
    data: Embedded,
    result: Clustering,
    truth: list[str] | None,
    metrics: dict[str, float],
) -> list[Path]:
    """Every file of the report (module docstring); returns them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from taxonomist.evaluation.plots import plot_image_rows

    settings = cfg.cluster
    pool, k = data.pool, result.k
    names = [cluster_name(i) for i in result.labels]
    paths = [str(Path(key).resolve()) if Path(key).is_file() else key for key in pool.keys]  # archive keys stay
    files: list[Path] = []

    manifest = pd.DataFrame({"path": paths, "label": names})
    files.append(atomic_write_text(out / "clusters.csv", manifest.to_csv(index=False)))
    assignments = pd.DataFrame({"path": paths, "cluster": names, "distance": np.round(result.distance, 4)})
    if truth is not None:
        assignments["true_label"] = truth
    files.append(atomic_write_text(out / "assignments.csv", assignments.to_csv(index=False)))

    counts = np.bincount(result.labels, minlength=k)
    sizes = pd.DataFrame({"cluster": [cluster_name(i) for i in range(k)], "images": counts})
    sizes["share"] = (sizes["images"] / len(pool)).round(4)
    majority: list[str] = []
    if truth is not None:
        table = pd.crosstab(pd.Series(names, name="cluster"), pd.Series(truth, name="label"))
        for i in range(k):
            row = table.loc[cluster_name(i)]
            majority.append(f"{row.idxmax()} ({row.max() / row.sum():.0%})")
        sizes["most_common_label"] = majority
        files.append(atomic_write_text(out / "labels_by_cluster.csv", table.to_csv()))
    files.append(atomic_write_text(out / "sizes.csv", sizes.to_csv(index=False)))

    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * k + 2), 3.2))
    ax.bar(range(k), counts, color="tab:blue")
    ax.set_xticks(range(k), [str(i) for i in range(k)])
    ax.set_xlabel("cluster")
    ax.set_ylabel("images")
    ax.set_title(f"Cluster sizes ({len(pool)} images)")
    fig.tight_layout()
    fig.savefig(out / "sizes.png", dpi=110)
    plt.close(fig)
    files.append(out / "sizes.png")

    if result.curve is not None:
        files.append(atomic_write_text(out / "k_choice.csv", result.curve.to_csv(index=False)))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(result.curve["k"], result.curve[result.criterion], marker="o")
        ax.axvline(k, color="tab:red", linestyle="--", label=f"chosen k = {k}")
        better = "lower" if result.criterion == "bic" else "higher"
        ax.set_xlabel("k")
        ax.set_ylabel(f"{result.criterion} ({better} is better)")
        ax.legend()
        ax.set_title(f"Choosing k: {settings.method}")
        fig.tight_layout()
        fig.savefig(out / "k_choice.png", dpi=110)
        plt.close(fig)
        files.append(out / "k_choice.png")

    per = int(settings.examples_per_cluster)
    rows = []
    for i in range(k):
        members = np.flatnonzero(result.labels == i)
        nearest = members[np.argsort(result.distance[members], kind="stable")][:per]
        heading = f"{cluster_name(i)}\n{counts[i]} images" + (f"\n{majority[i]}" if truth is not None else "")
        captions = [truth[j] for j in nearest] if truth is not None else [Path(pool.keys[j]).name for j in nearest]
        rows.append((heading, pool.images[nearest], captions))
    plot_image_rows(rows, out / "grid.png", f"{k} clusters: the images nearest each centre", columns=per)
    files.append(out / "grid.png")

    record = {
        "inputs": list(args),
        "features": str(settings.features),
        "method": str(settings.method),
        "k_setting": settings.k if settings.k == AUTO else int(settings.k),
        "settings": OmegaConf.to_container(settings, resolve=True),
        "unreadable": pool.failed,
        **metrics,
    }
    files.append(atomic_write_json(out / "metrics.json", record))
    files.append(atomic_write_text(out / "clusters.md", markdown(args, cfg, data, result, sizes, metrics, out)))
    return files


def markdown(
    args: list[str],
    cfg: DictConfig,
    data: Embedded,
    result: Clustering,
    sizes: pd.DataFrame,
    metrics: dict[str, float],
    out: Path,
) -> str:
    """``clusters.md``: what was grouped, how, the clusters, the agreement with labels, next steps."""
    s = cfg.cluster
    pool, k = data.pool, result.k
    method = "k-means" if s.method == "kmeans" else f"a Gaussian mixture ({s.covariance} covariances)"
    if s.k == AUTO:
        best = "best silhouette" if result.criterion == "silhouette" else "lowest BIC"
        tried = result.curve["k"] if result.curve is not None else pd.Series([k])
        how_k = f"k = {k}, the {best} for k in {int(tried.min())}..{int(tried.max())} (`k_choice.png`)"
    else:
        how_k = f"k = {k} (`cluster.k`)"
    reduced = f"standardised and reduced to {s.pca} principal components" if s.pca is not None else "standardised"
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        f"# {k} clusters of {len(pool)} images",
        "",
        f"`taxonomist cluster {' '.join(args)}` on {stamp}: {data.source}, {reduced}, grouped by {method} "
        f"with {how_k}; {result.criterion} {result.score:.4g}.",
    ]
    if pool.failed:
        lines += ["", f"{len(pool.failed)} file(s) could not be read and were left out (`metrics.json` lists them)."]
    lines += [
        "",
        "![clusters](grid.png)",
        "",
        "| cluster | images | share |" + (" most common label |" if "purity" in metrics else ""),
    ]
    lines.append("|---|---:|---:|" + ("---|" if "purity" in metrics else ""))
    for _, row in sizes.iterrows():
        extra = f" {row['most_common_label']} |" if "purity" in metrics else ""
        lines.append(f"| {row['cluster']} | {row['images']} | {row['share']:.1%} |{extra}")
    lines += ["", "![sizes](sizes.png)"]
    if "purity" in metrics:
        lines += [
            "",
            "## Against the labels the images carry",
            "",
            f"purity {metrics['purity']:.3f}, NMI {metrics['nmi']:.3f}, ARI {metrics['ari']:.3f} "
            "(1 = the clusters are the labels; purity is the share of images whose cluster's most common "
            "label is theirs; ARI 0 = chance). `labels_by_cluster.csv` counts each label per cluster.",
        ]
    lines += [
        "",
        "## Correct the clusters and train on them",
        "",
        "`clusters.csv` is a manifest: `path`, `label` (`cluster_<i>`). Rename a cluster's label to a class "
        "name, move rows between clusters, delete the rows that fit nowhere, then ingest it:",
        "",
        "```bash",
        f"taxonomist compose data=folder data.source={out / 'clusters.csv'}",
        "dvc repro",
        "```",
        "",
        "`assignments.csv` has every image's distance to its cluster's centre (the largest are the least "
        "typical); `metrics.json` the settings and numbers.",
    ]
    return "\n".join(lines) + "\n"


def log_run(cfg: DictConfig, out: Path, metrics: dict[str, float], files: list[Path], args: list[str]) -> str:
    """The run in ``<tracking.experiment>-explore``: ``cluster.*`` params, metrics, the report."""
    from taxonomist.config import flatten

    params = flatten(cfg.cluster, prefix="cluster.")
    params["images"] = int(metrics["images"])
    name = f"cluster-{cfg.cluster.method}-k{int(metrics['k'])}"
    return track.log_run(cfg, "cluster", name, params, metrics, files, args, artifact_path="clusters")
