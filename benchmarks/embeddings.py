"""Classical classifiers on embeddings against the fine-tuned network, and self-training.

1. For each data set (all offline: Fashion-MNIST, scikit-learn digits, scikit-image faces, emoji
   skin tones), ingest -> preprocess -> train -> evaluate in a scratch folder with
   ``model=embeddings`` and several extractor + classifier pairs, and with the small network
   trained from scratch (``model=resnet10_narrow``, what ``model=auto`` picks for these sets;
   on Fashion-MNIST the default pipeline's committed ``reports/metrics.json`` stands in for
   it: a 25-minute run). Test metric and the train stage's time (features + fit).
2. **Self-training** on Fashion-MNIST: 100 labelled images per class from the training split,
   the rest of the split as the unlabelled pool; HOG + logistic regression with and without
   pseudo-labels (:func:`taxonomist.models.embeddings.semi.self_train`), test accuracy.

Writes ``reports/benchmark_embeddings.md`` and README.md's ``embeddings`` block.
Usage: ``.venv/bin/python benchmarks/embeddings.py [--only digits] [--model "HOG + logistic"] [--epochs 15]``
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, machine, show_in_readme
from transfer import COMMON, DATASETS, inside, measure

REPORT = ROOT / "reports" / "benchmark_embeddings.md"
MARKERS = ("<!-- embeddings:start -->", "<!-- embeddings:end -->")
SETS = {"fashion-mnist": ("Fashion-MNIST, 28x28 gray, 10 classes", ["data=fashion_mnist"], "f1_macro"), **DATASETS}
MODELS = {
    "HOG + RBF SVM": ["model=embeddings"],
    "HOG + exact RBF SVM (svc)": ["model=embeddings", "model/classifier=svc"],
    "HOG + logistic": ["model=embeddings", "model/classifier=logistic"],
    "HOG + colour hist. + logistic": ["model=embeddings", "model/features=hog_color", "model/classifier=logistic"],
    "EfficientNet-Lite0 features + logistic": [
        "model=embeddings",
        "model/features=efficientnet_lite0",
        "model/classifier=logistic",
    ],
    "fine-tuned network (resnet10_narrow)": ["model=resnet10_narrow"],
}
LABELS_PER_CLASS = 100


def self_training_rows(
    processed: Path, seed: int = 0, thresholds: tuple[float, ...] = (0.99, 0.95, 0.9), ceiling: bool = True
) -> list[str]:
    """Test accuracy of HOG + logistic on 100 labels per class, without and with self-training."""
    from taxonomist.models.embeddings.cache import embed
    from taxonomist.models.embeddings.features import build_extractor
    from taxonomist.models.embeddings.heads import fit_classifier
    from taxonomist.models.embeddings.semi import self_train

    extractor = build_extractor({"name": "hog"}, 1)
    x = embed(extractor, np.load(processed / "train_images.npy", mmap_mode="r"))
    y = np.load(processed / "train_labels.npy")
    test_x = embed(extractor, np.load(processed / "test_images.npy", mmap_mode="r"))
    test_y = np.load(processed / "test_labels.npy")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(y == c), LABELS_PER_CLASS, replace=False) for c in np.unique(y)]
    labelled = np.concatenate(picks)
    pool = np.setdiff1d(np.arange(len(y)), labelled)
    spec = {"name": "logistic", "scale": True, "params": {"C": 0.1, "max_iter": 2000}}

    def fit(a: np.ndarray, b: np.ndarray):
        return fit_classifier(spec, a, b, seed)

    rows = []
    started = time.perf_counter()
    base = fit(x[labelled], y[labelled])
    base_s = time.perf_counter() - started
    acc = float((base.predict(test_x) == test_y).mean())
    rows.append(f"| {len(labelled):,} labels, no pool | - | {acc:.4f} | {base_s:.1f} s |")
    print(rows[-1], flush=True)
    for threshold in thresholds:
        started = time.perf_counter()
        model, record = self_train(fit, x[labelled], y[labelled], x[pool], threshold=threshold, max_iter=5)
        seconds = time.perf_counter() - started
        acc_st = float((model.predict(test_x) == test_y).mean())
        rows.append(
            f"| {len(labelled):,} labels + {len(pool):,} unlabelled, threshold {threshold} | "
            f"{record.added:,} in {len(record.rounds)} rounds | {acc_st:.4f} | {seconds:.1f} s |"
        )
        print(rows[-1], flush=True)
    if not ceiling:
        return rows
    started = time.perf_counter()
    full = fit(x, y)
    rows.append(
        f"| all {len(y):,} labels (the ceiling) | - | {float((full.predict(test_x) == test_y).mean()):.4f} | "
        f"{time.perf_counter() - started:.1f} s |"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--only", choices=sorted(SETS), action="append", help="data set(s) to run")
    parser.add_argument("--model", choices=sorted(MODELS), action="append", help="model row(s) to run (default: all)")
    parser.add_argument("--no-self-training", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started_all = time.perf_counter()
    rows = [
        "| data set | images train/val/test | model | px, channels | test metric | train stage |",
        "|---|---|---|---|---|---|",
    ]
    semi_rows: list[str] = []
    for name in args.only or list(SETS):
        about, data, metric = SETS[name]
        for variant, model in MODELS.items():
            if args.model and variant not in args.model:
                continue
            if name == "fashion-mnist" and "network" in variant:
                committed = json.loads((ROOT / "reports" / "metrics.json").read_text())["test"]
                rows.append(
                    f"| {name}: {about} | 54000/6000/10000 | {variant.replace('resnet10_narrow', 'model=auto')}: "
                    f"the default pipeline | 28 px, 1 | {metric} {committed[metric]:.4f} "
                    f"(acc {committed['acc']:.4f}) | see the benchmark above |"
                )
                continue
            with tempfile.TemporaryDirectory(prefix=f"embeddings-{name}-") as tmp:
                extra = ["augment=none"] if "embeddings" in model[0] else []
                result = measure(data, [*model, *extra], args.epochs, Path(tmp))
                if name == "fashion-mnist" and variant == "HOG + logistic" and not args.no_self_training:
                    with inside(Path(tmp)):
                        semi_rows = self_training_rows(Path(tmp) / "data" / "processed")
            split = "/".join(str(result["split"][s]) for s in ("train", "val", "test"))
            shown = f"{metric} {result['metrics'][metric]:.4f} (acc {result['metrics']['acc']:.4f})"
            rows.append(
                f"| {name}: {about} | {split} | {variant} | {result['image_size']} px, {result['channels']} | "
                f"{shown} | {result['train_seconds']:.1f} s |"
            )
            print(rows[-1], flush=True)
    body = "\n".join(rows) + (
        "\n\nTrain stage time: for `model=embeddings` the feature extraction of the train and val splits plus the "
        f"scikit-learn fit; for the network, {args.epochs} epochs at most with early stopping. Common settings: "
        f"{', '.join(f'`{c}`' for c in COMMON)}."
    )
    if semi_rows:
        body += (
            f"\n\n**Self-training on Fashion-MNIST** ({LABELS_PER_CLASS} labels per class, HOG + logistic regression "
            "C=0.1, pseudo-labels above the threshold join the training set, 5 rounds at most):\n\n"
            "| labelled data | pseudo-labels | test acc | fit time |\n|---|---|---|---|\n" + "\n".join(semi_rows)
        )
    minutes = (time.perf_counter() - started_all) / 60
    body += f"\n\nMeasured with `.venv/bin/python benchmarks/embeddings.py` in {minutes:.0f} min on {machine()}."
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("# Embeddings and classical classifiers\n\n" + body + "\n")
    show_in_readme(body, MARKERS)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
