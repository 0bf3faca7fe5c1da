"""The published HOG + SVM check on Fashion-MNIST: scikit-learn's exact RBF ``SVC`` on HOG vectors.

HOG as ``model/features=hog`` computes it (9 orientations, 4 px cells, 2x2 blocks, L2-Hys; here
by ``skimage.feature.hog``, which the tests pin the torch extractor to), standardised, then
``SVC(C, gamma="scale")`` fitted on the first ``N`` of the 60,000 training images and scored on
the 10,000 test images. Prints test accuracy, fit and prediction seconds and support vectors.
The HOG vectors are cached in ``--cache``. On 2 cores: ~80 s of HOG, then the fit (17 min at
60,000) and libsvm's prediction (37 min for 10,000 on one core at 25,000 support vectors).

Usage: ``.venv/bin/python benchmarks/hog_svm.py [N] [C]`` (default: 60000 10).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from skimage.feature import hog
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from taxonomist.data.sources.fashion_mnist import read_idx

DATA = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def hog_vectors(images: np.ndarray) -> np.ndarray:
    """One HOG vector per 28x28 image, with the settings of ``conf/model/features/hog.yaml``."""
    return np.stack(
        [hog(im, orientations=9, pixels_per_cell=(4, 4), cells_per_block=(2, 2), block_norm="L2-Hys") for im in images]
    ).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=60000, help="training images used (the first n)")
    parser.add_argument("C", type=float, nargs="?", default=10.0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/taxonomist-hog.npz"))
    args = parser.parse_args()
    if args.cache.exists():
        cached = np.load(args.cache)
        train, test = cached["train"], cached["test"]
    else:
        started = time.perf_counter()
        train = hog_vectors(read_idx(DATA / "train-images-idx3-ubyte.gz", DATA / "train-labels-idx1-ubyte.gz")[0])
        test = hog_vectors(read_idx(DATA / "t10k-images-idx3-ubyte.gz", DATA / "t10k-labels-idx1-ubyte.gz")[0])
        np.savez(args.cache, train=train, test=test)
        print(f"HOG of {len(train) + len(test):,} images: {time.perf_counter() - started:.0f} s {train.shape[1:]}")
    y_train = read_idx(DATA / "train-images-idx3-ubyte.gz", DATA / "train-labels-idx1-ubyte.gz")[1]
    y_test = read_idx(DATA / "t10k-images-idx3-ubyte.gz", DATA / "t10k-labels-idx1-ubyte.gz")[1]
    scaler = StandardScaler().fit(train[: args.n])
    started = time.perf_counter()
    svc = SVC(C=args.C, kernel="rbf", gamma="scale", cache_size=4000).fit(
        scaler.transform(train[: args.n]), y_train[: args.n]
    )
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    accuracy = float((svc.predict(scaler.transform(test)) == y_test).mean())
    print(
        f"n={args.n} C={args.C}: test acc {accuracy:.4f}, fit {fit_seconds:.0f} s, "
        f"predict {time.perf_counter() - started:.0f} s, support vectors {int(svc.n_support_.sum()):,}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
