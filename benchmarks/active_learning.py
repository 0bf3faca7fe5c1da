"""What to label next, measured: a simulated labelling loop on Fashion-MNIST.

The 60,000 training images are the unlabelled pool (their labels are the "annotator"), the
10,000 test images the test set. Features: HOG (``conf/model/features/hog.yaml``, the torch
extractor of ``model=embeddings``), once; classifier: logistic regression
(``conf/model/classifier/logistic.yaml``, :func:`taxonomist.models.embeddings.heads.fit_classifier`).
Each run starts from 200 random labels and adds 200 per round for five rounds, chosen by

* ``random``: uniformly from the rest of the pool;
* ``margin``: the smallest margin between the two most probable classes
  (``suggest.uncertainty: margin``, ``suggest.diversity: none``);
* ``margin + k-means (10x, centre)``: weighted k-means (Zhdanov 2019, "Diverse mini-batch
  Active Learning") with k = 200 on the (L2-normalised) features of the ``10 x 200`` smallest
  margins, weighted by the margin uncertainty, and from each cluster the image closest to its
  centre (``suggest.diversity: kmeans``, ``suggest.kmeans_pick: centre``,
  :func:`taxonomist.explore.suggest.select`);
* ``margin + k-means (10x, uncertain)``: the same, and from each cluster its most uncertain image
  (``suggest.kmeans_pick: uncertain``);
* ``margin + k-center (3x)``: greedy k-center on the (L2-normalised) features among the
  ``3 x 200`` smallest margins (``suggest.diversity: kcenter``). (An earlier run also had
  ``entropy + k-center (10x)``, the first default of ``taxonomist suggest``: -1.88 points against
  random at 1,200 labels; left out to keep the run short.)

and the test accuracy is recorded after every round, for several seeds (the seed draws the
first 200 labels and the random picks). Writes ``reports/benchmark_active_learning.md``, the plot
``reports/benchmark_active_learning.png`` and the README block between the
``active-learning:start`` / ``active-learning:end`` markers.

Usage: ``.venv/bin/python benchmarks/active_learning.py [--seeds 3] [--rounds 5] [--step 200]``
(or ``make bench-active-learning``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import yaml
from common import ROOT, machine, show_in_readme

REPORT = ROOT / "reports" / "benchmark_active_learning.md"
PLOT = ROOT / "reports" / "benchmark_active_learning.png"
MARKERS = ("<!-- active-learning:start -->", "<!-- active-learning:end -->")
# name -> (suggest.uncertainty, suggest.candidates_factor, suggest.diversity, suggest.kmeans_pick); None = random
STRATEGIES: dict[str, tuple[str, float, str, str] | None] = {
    "random": None,
    "margin": ("margin", 1.0, "none", "centre"),
    "margin + k-means (10x, centre)": ("margin", 10.0, "kmeans", "centre"),
    "margin + k-means (10x, uncertain)": ("margin", 10.0, "kmeans", "uncertain"),
    "margin + k-center (3x)": ("margin", 3.0, "kcenter", "centre"),
}


def load(builtin_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's dataset-fashion-mnist files (as the built-in source reads them)."""
    from taxonomist.data.sources.fashion_mnist import SPLIT_FILES, read_idx

    out = []
    for split in ("train", "test"):
        images, labels = read_idx(*(builtin_dir / name for name in SPLIT_FILES[split]))
        out += [images[..., None], labels]
    return out[0], out[1], out[2], out[3]


def hog_features(images: np.ndarray) -> np.ndarray:
    """HOG features as ``model=embeddings`` with ``model/features=hog`` computes them."""
    from taxonomist.models.embeddings.cache import embed
    from taxonomist.models.embeddings.features import build_extractor

    spec = yaml.safe_load((ROOT / "conf/model/features/hog.yaml").read_text())["features"]
    return embed(build_extractor(spec, 1), images, batch_size=1024, desc="hog")


def run_loop(
    x_pool: np.ndarray,
    y_pool: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    strategy: tuple[str, float, str, str] | None,
    seed: int,
    start: int,
    step: int,
    rounds: int,
    classifier: dict,
) -> list[float]:
    """Test accuracy after the first ``start`` labels and after each of ``rounds`` rounds of ``step``."""
    from taxonomist.explore.suggest import select, uncertainty
    from taxonomist.models.embeddings.heads import fit_classifier

    rng = np.random.default_rng(seed)
    labelled = rng.choice(len(x_pool), start, replace=False)
    accuracy = []
    for r in range(rounds + 1):
        model = fit_classifier(classifier, x_pool[labelled], y_pool[labelled], seed)
        accuracy.append(float((model.predict(x_test) == y_test).mean()))
        if r == rounds:
            break
        rest = np.setdiff1d(np.arange(len(x_pool)), labelled)
        if strategy is None:
            new = rng.choice(rest, step, replace=False)
        else:
            kind, factor, diversity, pick = strategy
            probs = np.zeros((len(rest), 10))
            probs[:, model.classes_] = model.predict_proba(x_pool[rest])
            unc = uncertainty(probs, kind)
            chosen, _, _ = select(unc, x_pool[rest], step, factor, diversity=diversity, pick=pick, seed=seed)
            new = rest[chosen]
        labelled = np.concatenate([labelled, new])
    return accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--start", type=int, default=200)
    parser.add_argument("--step", type=int, default=200)
    parser.add_argument("--builtin-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--no-readme", action="store_true", help="do not update README's block")
    args = parser.parse_args()
    started = time.perf_counter()
    x_img, y_pool, t_img, y_test = load(args.builtin_dir)
    t0 = time.perf_counter()
    x_pool, x_test = hog_features(x_img), hog_features(t_img)
    feature_seconds = time.perf_counter() - t0
    clf = yaml.safe_load((ROOT / "conf/model/classifier/logistic.yaml").read_text())
    results: dict[str, list[list[float]]] = {name: [] for name in STRATEGIES}
    for seed in range(args.seeds):
        for name, strategy in STRATEGIES.items():
            t0 = time.perf_counter()
            acc = run_loop(x_pool, y_pool, x_test, y_test, strategy, seed, args.start, args.step, args.rounds, clf)
            results[name].append(acc)
            print(
                f"seed {seed} {name:>34}: "
                + " ".join(f"{a:.4f}" for a in acc)
                + f"  ({time.perf_counter() - t0:.0f} s)"
            )
    labels = [args.start + r * args.step for r in range(args.rounds + 1)]
    body = report(results, labels, args, feature_seconds, started, x_pool.shape[1])
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(f"# Active learning: what to label next, simulated on Fashion-MNIST\n\n{body}")
    plot(results, labels, args.seeds)
    if not args.no_readme:
        show_in_readme(body.strip().replace(f"]({PLOT.name})", f"](reports/{PLOT.name})"), MARKERS)
    print("\n" + body)
    return 0


def report(
    results: dict[str, list[list[float]]], labels: list[int], args: argparse.Namespace, feature_seconds: float,
    started: float, dims: int,
) -> str:  # fmt: skip
    """The Markdown table (mean and spread over seeds per round) with how it was measured."""
    names = list(results)
    lines = ["| labels | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for r, n in enumerate(labels):
        cells = []
        for name in names:
            values = np.array([run[r] for run in results[name]])
            cells.append(f"{values.mean():.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values[0]:.4f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    gain = {
        name: np.mean([run[-1] - rnd[-1] for run, rnd in zip(results[name], results["random"], strict=True)])
        for name in names
        if name != "random"
    }
    minutes = (time.perf_counter() - started) / 60
    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"Test accuracy (10,000 Fashion-MNIST test images) of logistic regression on HOG features ({dims} numbers, "
        f"{feature_seconds:.0f} s for the 70,000 images), starting from {labels[0]} random labels and adding "
        f"{args.step} per round from the 60,000-image pool; mean ± standard deviation over {args.seeds} seed(s).\n\n"
        + "\n".join(lines)
        + "\n\nAt "
        + f"{labels[-1]} labels, against random selection: "
        + "; ".join(f"{name} {gain[name] * 100:+.2f} points" for name in gain)
        + ".\n\n![active learning](benchmark_active_learning.png)\n\n"
        + f"Generated by `.venv/bin/python benchmarks/active_learning.py --seeds {args.seeds}` on {stamp} in "
        + f"{minutes:.0f} min. Machine: {machine()}.\n"
    )


def plot(results: dict[str, list[list[float]]], labels: list[int], seeds: int) -> None:
    """Accuracy against labels, one line per strategy (mean, band = min..max over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        values = np.array(runs)
        ax.plot(labels, values.mean(0), marker="o", label=name)
        if len(values) > 1:
            ax.fill_between(labels, values.min(0), values.max(0), alpha=0.2)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST, HOG + logistic regression ({seeds} seed(s))")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
