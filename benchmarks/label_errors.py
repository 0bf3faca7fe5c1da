"""Label errors: how well ``taxonomist cv`` + ``taxonomist label-errors`` find flipped labels.

For each data set (offline: scikit-learn digits, all 1,797 images; a seeded 10,000-image sample
of Fashion-MNIST's training set from Debian's dataset-fashion-mnist), 5% of the images (seeded)
get another class's label (uniformly among the others) in a copy written as a folder of PNG
files, one folder per (given) class. That folder runs through the pipeline's own code in a
scratch directory: ingest, preprocess (the test split it draws is left out of the pool, as
always), ``taxonomist cv`` with the embeddings family (HOG + logistic regression, 5 folds) and
``taxonomist label-errors`` at its default cut (cleanlab ``prune_by_noise_rate``). Against the
flipped images that landed in the training pool:

* precision: the share of flagged images that were flipped;
* recall: the share of flipped pool images that were flagged.

Writes ``reports/benchmark_label_errors.md`` and the README block between the
``benchmark-label-errors:start`` / ``:end`` markers.

Usage: ``make bench-label-errors``, or inside the environment
``python benchmarks/label_errors.py [--only digits] [--fashion-images 10000] [--flip 0.05]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from common import ROOT, Row, publish

REPORT = ROOT / "reports" / "benchmark_label_errors.md"
MARKERS = ("<!-- benchmark-label-errors:start -->", "<!-- benchmark-label-errors:end -->")
MODEL = ["model=embeddings", "model/features=hog", "model/classifier=logistic"]


def digits() -> tuple[np.ndarray, list[str]]:
    """scikit-learn's digits as uint8 8x8 images and their labels."""
    from sklearn.datasets import load_digits

    from taxonomist.data.sources.builtin import to_uint8

    data = load_digits()
    return to_uint8(data.images, 16.0), [str(int(t)) for t in data.target]


def fashion(images: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """A seeded sample of ``images`` Fashion-MNIST training images (Debian's package, offline)."""
    from taxonomist.data.sources.fashion_mnist import CLASSES, SPLIT_FILES, read_idx

    folder = Path("/usr/share/datasets/fashion-mnist")
    pixels, labels = read_idx(*(folder / name for name in SPLIT_FILES["train"]))
    pick = np.sort(np.random.default_rng(seed).choice(len(pixels), images, replace=False))
    return pixels[pick], [CLASSES[t] for t in labels[pick]]


def flip(labels: list[str], share: float, seed: int) -> tuple[list[str], set[int]]:
    """``labels`` with ``round(share * n)`` of them (seeded) set to another class, and which."""
    rng = np.random.default_rng(seed)
    classes = sorted(set(labels))
    chosen = rng.choice(len(labels), round(share * len(labels)), replace=False)
    out = list(labels)
    for i in chosen:
        others = [c for c in classes if c != labels[i]]
        out[i] = others[rng.integers(len(others))]
    return out, {int(i) for i in chosen}


def write_folder(root: Path, images: np.ndarray, labels: list[str]) -> dict[str, int]:
    """A folder per given class of PNG files; the source id (``<label>/<index>.png``) of each index."""
    from taxonomist.data.sources.builtin import png_bytes

    ids = {}
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"{i:05d}.png").write_bytes(png_bytes(image))
        ids[f"{label}/{i:05d}.png"] = i
    return ids


@contextmanager
def scratch():
    """A temporary project folder as the working directory."""
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="taxonomist-label-errors-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(here)


def measure(name: str, images: np.ndarray, labels: list[str], share: float, folds: int, seed: int) -> dict:
    """Flip, then ingest -> preprocess -> cv -> label-errors in a scratch folder; the figures."""
    import pandas as pd

    from taxonomist.config import compose
    from taxonomist.crossval import label_errors
    from taxonomist.crossval import run as cv
    from taxonomist.stages import ingest, preprocess

    given, flipped = flip(labels, share, seed)
    with scratch() as tmp:
        ids = write_folder(tmp / "source", images, given)
        cfg = compose(
            [
                "data=folder",
                f"data.source={tmp / 'source'}",
                *MODEL,
                f"cv.folds={folds}",
                f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
                f"tracking.artifact_location={tmp / 'mlartifacts'}",
            ],
            conf_dir=ROOT / "conf",
        )
        started = time.perf_counter()
        ingest.run(cfg)
        preprocess.run(cfg)
        prepared = time.perf_counter()
        summary = cv.run(cfg)
        cv_done = time.perf_counter()
        found = label_errors.run(cfg)
        finished = time.perf_counter()
        table = pd.read_csv(Path("reports/label_errors/label_errors.csv"), dtype=str, keep_default_na=False)
        oof = np.load("reports/cv/oof.npz")
        pool = {ids[s] for s in oof["source_id"]}
    flagged = {ids[s] for s in table["source_id"]}
    flipped_pool = flipped & pool
    hits = flagged & flipped_pool
    return {
        "name": name,
        "images": len(images),
        "pool": len(pool),
        "flipped_pool": len(flipped_pool),
        "flagged": len(flagged),
        "precision": len(hits) / max(len(flagged), 1),
        "recall": len(hits) / max(len(flipped_pool), 1),
        "oof_acc": summary["metrics"]["oof_acc"],
        "acc_mean": summary["metrics"]["acc_mean"],
        "acc_std": summary["metrics"]["acc_std"],
        "prepare_s": prepared - started,
        "cv_s": cv_done - prepared,
        "finder_s": finished - cv_done,
        "summary": found,
    }


def rows_of(result: dict) -> list[Row]:
    n = result["name"]
    pool = f"{result['flipped_pool']} flipped of {result['pool']} in the pool"
    spread = f"std {result['acc_std']:.4f}; out-of-fold {result['oof_acc']:.4f}"
    return [
        Row(f"{n}: precision of the finder (default cut)", result["precision"], digits=3),
        Row(f"{n}: recall of the finder (default cut)", result["recall"], digits=3),
        Row(f"  {n}: images flagged", result["flagged"], label=pool, digits=0),
        Row(
            f"  {n}: 5-fold CV accuracy on the noisy labels (mean over folds)",
            result["acc_mean"],
            label=spread,
            digits=4,
        ),
        Row(f"  {n}: time of `taxonomist cv` (features + 5 fits)", result["cv_s"], "s"),
        Row(f"  {n}: time of `taxonomist label-errors`", result["finder_s"], "s"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("digits", "fashion-mnist"), default=None)
    parser.add_argument("--fashion-images", type=int, default=10_000)
    parser.add_argument("--flip", type=float, default=0.05, help="share of labels flipped (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    rows: list[Row] = []
    if args.only in (None, "digits"):
        rows += rows_of(measure("digits", *digits(), args.flip, args.folds, args.seed))
    if args.only in (None, "fashion-mnist"):
        sample = fashion(args.fashion_images, args.seed)
        rows += rows_of(
            measure(f"Fashion-MNIST {args.fashion_images // 1000}k", *sample, args.flip, args.folds, args.seed)
        )
    note = (
        f"{args.flip:.0%} of the labels flipped (seeded, to a uniformly chosen other class) in a copy of each set; "
        f"`taxonomist cv` ({args.folds} folds, {' '.join(MODEL)}) then `taxonomist label-errors` with its defaults "
        "(cleanlab `find_label_issues`, `filter_by=prune_by_noise_rate`). Precision and recall are measured "
        "against the flipped images in the training pool (train + val; the test split preprocess draws is not "
        "cross-validated). No target: the figures are measured, not judged."
    )
    command = "python benchmarks/label_errors.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    return publish(rows, REPORT, "Label-error benchmark", MARKERS, command, started, note)


if __name__ == "__main__":
    sys.exit(main())
