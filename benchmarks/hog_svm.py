"""The published HOG + SVM check on Fashion-MNIST: the project's HOG and its exact RBF SVM head.

The features are a ``conf/model/features`` extractor (``--features``; ``hog``: 9 orientations,
4 px cells, 2x2 blocks, L2-Hys, as ``skimage.feature.hog``; ``hog_multiscale``: the same after
square-root compression, at 4 and 7 px cells), the classifier ``model/classifier=svc``
(standardised features, ``SVC(C, gamma="scale")``) fitted on the first ``N`` of the 60,000
training images, and the test accuracy that of the torch head the packaged model holds
(:class:`~taxonomist.models.embeddings.heads.KernelSVM`), on the 10,000 test images. Prints
test accuracy, fit and prediction seconds and support vectors.

On 2 cores: under a minute of features, then the fit (10,000 images: ~30 s; 60,000: ~20 min)
and the head's prediction (a minute at 25,000 support vectors).

The check passes when the published 92.6 % lies inside the 95 % confidence interval of the
measured accuracy (normal approximation of the binomial: a 10,000-image test set measures an
accuracy near 92 % to about +-0.5 points, the published figure included).

Usage: ``.venv/bin/python benchmarks/hog_svm.py [N] [C] [--features hog_multiscale]``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from taxonomist.config import compose
from taxonomist.data.sources.fashion_mnist import read_idx
from taxonomist.models.embeddings.cache import embed
from taxonomist.models.embeddings.features import build_extractor
from taxonomist.models.embeddings.heads import fit_classifier, to_torch

DATA = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = 0.926  # the Fashion-MNIST benchmark table's HOG + SVM row


def interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % confidence interval of an accuracy measured on ``n`` images (normal approximation)."""
    half = z * math.sqrt(accuracy * (1 - accuracy) / n)
    return accuracy - half, accuracy + half


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("n", type=int, nargs="?", default=60000, help="training images used (the first n)")
    parser.add_argument("C", type=float, nargs="?", default=10.0)
    parser.add_argument("--features", default="hog", help="a conf/model/features config (hog, hog_multiscale, ...)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the features (libsvm uses one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # two runs side by side on 2 cores do not wait on each other's threads
    cfg = compose(
        [
            "model=embeddings",
            f"model/features={args.features}",
            "model/classifier=svc",
            f"model.classifier.params.C={args.C}",
        ],
        conf_dir=ROOT / "conf",
    )
    extractor = build_extractor(cfg.model.features, 1)
    train_images, y_train = read_idx(DATA / "train-images-idx3-ubyte.gz", DATA / "train-labels-idx1-ubyte.gz")
    test_images, y_test = read_idx(DATA / "t10k-images-idx3-ubyte.gz", DATA / "t10k-labels-idx1-ubyte.gz")
    started = time.perf_counter()
    train = embed(extractor, train_images[: args.n, :, :, None])
    test = embed(extractor, test_images[:, :, :, None])
    seconds = time.perf_counter() - started
    print(f"{args.features} of {len(train) + len(test):,} images: {seconds:.0f} s, {train.shape[1]} numbers")
    spec = dict(cfg.model.classifier)
    started = time.perf_counter()
    pipeline = fit_classifier(spec, train, y_train[: args.n], seed=0)
    fit_seconds = time.perf_counter() - started
    head = to_torch(pipeline, spec, 10, 10).eval()
    started = time.perf_counter()
    with torch.no_grad():
        logits = torch.cat([head(torch.from_numpy(test[k : k + 1000])) for k in range(0, len(test), 1000)])
    accuracy = float((logits.argmax(1).numpy() == y_test).mean())
    support = int(pipeline.named_steps["classify"].n_support_.sum())
    print(
        f"{args.features}, n={args.n} C={args.C}: test acc {accuracy:.4f}, fit {fit_seconds:.0f} s, "
        f"predict {time.perf_counter() - started:.0f} s, support vectors {support:,}"
    )
    low, high = interval(accuracy, len(y_test))
    verdict = "inside" if low <= PUBLISHED <= high else "outside"
    print(f"95 % interval of the test accuracy: {low:.4f}-{high:.4f}; the published {PUBLISHED} is {verdict} it")
    return 0 if verdict == "inside" else 1


if __name__ == "__main__":
    raise SystemExit(main())
