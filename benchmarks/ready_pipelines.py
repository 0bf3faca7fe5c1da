"""The ready pipelines under pipelines/: run each with `dvc repro` and report its test metrics.

For every ``pipelines/<task>/`` folder: runs ``dvc repro`` there (unless ``--skip-repro``),
timing it, then reads the test metrics and the split sizes the pipeline wrote. Prints a table
and writes it to ``reports/pipelines.md`` and into README.md between the
``pipelines:start`` / ``pipelines:end`` markers.

Usage: ``bash scripts/setup.sh && PATH=$PWD/.venv/bin:$PATH .venv/bin/python benchmarks/ready_pipelines.py [--force]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine, show_in_readme

from taxonomist.tasks import load_task

REPORT = ROOT / "reports" / "pipelines.md"
MARKERS = ("<!-- pipelines:start -->", "<!-- pipelines:end -->")
# task -> (what the data is, the metrics shown)
SHOWN = {
    "binary": ("faces vs non-faces (scikit-image LFW subset)", ["f1", "precision", "recall", "roc_auc", "threshold"]),
    "multiclass": ("digits 0-9 (scikit-learn)", ["acc", "f1_macro"]),
    "multilabel": ("emoji keyword tags (npm emoji-datasource-google + openmoji)", ["f1_micro", "f1_macro", "subset_acc",
                                                                                    "hamming_loss", "ap_macro"]),
    "hierarchical": ("Fashion-MNIST under a clothing taxonomy", ["hf1", "acc_level1", "acc_level2"]),
    "ordinal": ("skin tones of people and hand emoji (npm emoji-datasource-google)", ["qwk", "mae", "acc",
                                                                                      "off_by_one"]),
    "multiattribute": ("people and hand emoji: tone, hand, tags (npm emoji-datasource-google + openmoji)",
                       ["f1_macro", "exact_match", "tone/acc", "hand/f1", "tags/f1_macro"]),
    "embeddings": ("Fashion-MNIST, HOG + RBF SVM, no network (model=embeddings)", ["acc", "f1_macro"]),
    "digits": ("digits 0-9 (scikit-learn), HOG + RBF SVM, no network (model=embeddings), plus the cv and "
               "label_errors stages", ["acc", "f1_macro"]),
}  # fmt: skip


def run(folder: Path, force: bool) -> float:
    """``dvc repro`` (``--force``: every stage) in ``folder``; seconds it took."""
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", *(["--force"] if force else [])], cwd=folder, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-repro", action="store_true", help="only report what the last runs wrote")
    parser.add_argument("--force", action="store_true", help="rerun every stage (time the whole pipeline)")
    args = parser.parse_args()
    rows = ["| pipeline | data | images train/val/test | test metrics | dvc repro |", "|---|---|---|---|---|"]
    for task, (data, keys) in SHOWN.items():
        folder = ROOT / "pipelines" / task
        seconds = None if args.skip_repro else run(folder, args.force)
        metrics = json.loads((folder / "reports/metrics.json").read_text())["test"]
        report = json.loads((folder / "data/processed/report.json").read_text())
        split = "/".join(str(report["per_split"][s]) for s in ("train", "val", "test"))
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)
        took = f"{seconds:.0f} s" if seconds is not None else "(not timed)"
        size = load_task(json.loads((folder / "data/processed/labels.json").read_text())).size_text()
        rows.append(f"| `pipelines/{task}` | {data}, {size} | {split} | {shown} | {took} |")
    body = "\n".join(rows) + f"\n\nMeasured {dt.date.today().isoformat()} on {machine()}."
    print(body)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(f"# Ready pipelines\n\n{body}\n")
    show_in_readme(body, MARKERS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
