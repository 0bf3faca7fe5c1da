"""The benchmark: every performance figure of the default pipeline, side by side, in one run.

1. ``dvc repro --force``: the whole default pipeline from scratch (time per stage, peak RSS,
   test accuracy against Fashion-MNIST's published anchors);
2. a no-op ``dvc repro`` and an evaluate-only param change;
3. the packaged ONNX model against PyTorch eager (batch-1 latency, batch-256 throughput);
4. the training loop against a minimal raw PyTorch loop, the data loader against what a step
   consumes, and time per epoch at 10k / 30k / 60k images;
5. stage start-up: the import time of the evaluate and package stages;
6. the spread of test accuracy over training seeds (``--seeds``; the first is the repro's).

Prints a table (each figure, its target or anchor, the ratio) and writes it, with the date and
the machine, to ``reports/benchmark.md`` and into README.md's ``benchmark`` block.

Usage: ``make bench`` (sets up the environment first), or inside the environment
``python benchmarks/run.py [--skip-repro] [--steps N] [--seeds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import inference
import repro
import training
from common import ROOT, Row, publish

REPORT = ROOT / "reports" / "benchmark.md"
MARKERS = ("<!-- benchmark:start -->", "<!-- benchmark:end -->")
GIB = 2**30
# Fashion-MNIST's own benchmark table (README of the dataset): test accuracy.
AUTOML, RESNET18 = 0.939, 0.949
REPRODUCIBLE = (
    "Reproducible: on the same machine, the same commit and `dvc repro` give bit-identical "
    "weights and metrics (seeded, deterministic algorithms, fp32 on CPUs without bfloat16 "
    "instructions). On another CPU, kernels differ in the last bits and training diverges from the "
    "first epoch: expect the seed spread above, not the same digits."
)


def pipeline_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    if not args.skip_repro:
        run = repro.repro(ROOT, "--force")
        largest = repro.largest_child_rss()
        rows.append(
            Row(
                "whole `dvc repro` from scratch", run.seconds, "s", target=args.max_minutes * 60, higher_is_better=False
            )
        )
        rows += [Row(f"  stage {name}", seconds, "s") for name, seconds in run.stages.items()]
        metrics = json.loads((ROOT / "reports/metrics.json").read_text())["test"]
        acc = float(metrics["acc"])
        rows += [
            Row("test accuracy (official 10k test set)", acc, target=args.min_accuracy, digits=4),
            Row("  against Google AutoML Vision (24 compute h)", acc, anchor=AUTOML, label="93.9 %", digits=4),
            Row("  against ResNet18", acc, anchor=RESNET18, label="94.9 %", digits=4),
            Row("test macro-F1", float(metrics["f1_macro"]), digits=4),
        ]
        startup = sum(run.stages.get(name, 0.0) for name in ("evaluate", "package"))
        rows.append(Row("stages evaluate + package", startup, "s", target=15.0, higher_is_better=False))
        if "train" in run.peak_rss:
            rows.append(
                Row(
                    "peak RSS of the train stage (sampled)",
                    run.peak_rss["train"] / GIB,
                    "GiB",
                    target=4.0,
                    higher_is_better=False,
                    digits=2,
                )
            )
        rows.append(
            Row(
                "peak RSS of the largest stage process (exact)",
                largest / GIB,
                "GiB",
                digits=2,
                label=max(run.peak_rss, key=run.peak_rss.get) if run.peak_rss else "",
            )
        )
    else:
        repro.repro(ROOT)  # bring the pipeline up to date, so the no-op below is one
    median, _ = repro.noop(ROOT)
    rows.append(Row("no-op `dvc repro` (median of 3)", median, "s", target=3.0, higher_is_better=False, digits=2))
    changed = repro.evaluate_only_change(ROOT)
    ran = ", ".join(changed.stages) or "nothing"
    rows.append(
        Row(
            "evaluate-only param change: `dvc repro`",
            changed.seconds,
            "s",
            label=f"reran: {ran}",
            passed="train" not in changed.stages and "evaluate" in changed.stages,
        )
    )
    return rows


def inference_rows() -> list[Row]:
    res = inference.compare(ROOT)
    eager, onnx = res["eager"], res["onnx"]
    latency = [
        Row(f"ONNX Runtime batch-1 latency {q}", onnx[f"{q}_ms"], "ms", target=eager[f"{q}_ms"],
            label="PyTorch eager", higher_is_better=False, digits=2)
        for q in ("p50", "p95")
    ]  # fmt: skip
    return [
        *latency,
        Row("ONNX Runtime batch-256 throughput", onnx["throughput"], "img/s", target=eager["throughput"],
            label="PyTorch eager", digits=0),
    ]  # fmt: skip


def training_rows(args: argparse.Namespace) -> list[Row]:
    cfg = training.default_config(ROOT)
    processed = ROOT / training.PROCESSED
    # Interleaved rounds, then the median of each: the machine's speed drifts by several per
    # cent over minutes, which one back-to-back pair would read as loop overhead.
    raws, fits = [], []
    for _ in range(args.rounds):
        raws.append(training.raw_loop(cfg, processed, steps=args.steps, warmup=5))
        fits.append(training.pipeline_fit(cfg, processed, warmup=5, steps=args.steps).throughput)
    raw, fit = statistics.median(raws), statistics.median(fits)
    load = training.loader(cfg, processed, batches=args.steps)
    compiled_cfg = cfg.copy()
    compiled_cfg.model.compile = not bool(cfg.model.compile)
    compiled = training.pipeline_fit(compiled_cfg, processed, warmup=5, steps=args.steps).throughput
    rows = [
        Row("raw PyTorch loop (in-memory data)", raw, "img/s", digits=0),
        Row(
            "pipeline training loop (Lightning, augmentation, metrics)",
            fit,
            "img/s",
            anchor=raw,
            label="raw loop",
            digits=0,
        ),
        Row("  pipeline ÷ raw loop", fit / raw, "×", target=0.95, digits=2),
        Row(
            f"  with model.compile={compiled_cfg.model.compile} (compile time excluded)",
            compiled,
            "img/s",
            anchor=fit,
            label="as configured",
            digits=0,
        ),
        Row("loader, default augmentation", load, "img/s", anchor=raw, label="a step's demand", digits=0),
        Row("  loader ÷ a training step's demand", load / raw, "×", target=2.0, digits=2),
    ]
    sizes = (10_000, 30_000, 60_000)
    seconds = training.scaling(cfg, processed, sizes)
    base = seconds[sizes[0]] / sizes[0]
    for n in sizes:
        rows.append(Row(f"one training epoch at {n // 1000}k images", seconds[n], "s"))
    for n in sizes[1:]:
        rows.append(
            Row(
                f"  time per image at {n // 1000}k ÷ at {sizes[0] // 1000}k",
                seconds[n] / n / base,
                "×",
                target=1.10,
                higher_is_better=False,
                digits=2,
            )
        )
    return rows


def import_seconds(module: str, runs: int = 3) -> float:
    """Median wall time of a fresh ``python -c 'import <module>'`` (interpreter start included)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def startup_rows() -> list[Row]:
    rows = [Row("start-up: `import torch` alone", import_seconds("torch"), "s", digits=2)]
    for stage in ("train", "evaluate", "package"):
        rows.append(
            Row(f"start-up: import of the {stage} stage", import_seconds(f"taxonomist.stages.{stage}"), "s", digits=2)
        )
    return rows


def seed_rows(args: argparse.Namespace) -> list[Row]:
    """Test accuracy over ``args.seeds`` training seeds: the repro's, then 1, 2, ..."""
    if args.seeds < 2 or args.skip_repro:
        return []
    first = float(json.loads((ROOT / "reports/metrics.json").read_text())["test"]["acc"])
    accs = [first] + [training.seed_accuracy(ROOT, seed) for seed in range(1, args.seeds)]
    mean, spread = statistics.mean(accs), max(accs) - min(accs)
    listed = ", ".join(f"{a:.4f}" for a in accs)
    return [
        Row(f"test accuracy over {len(accs)} seeds: mean", mean, target=args.min_accuracy, digits=4, label=listed),
        Row("  spread (max - min) over those seeds", spread, digits=4),
        Row("  standard deviation", statistics.stdev(accs), digits=4),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-repro", action="store_true", help="use the current pipeline outputs (no --force run)")
    parser.add_argument("--steps", type=int, default=100, help="training steps timed per loop")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved raw/pipeline rounds (medians)")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="target for the whole dvc repro")
    parser.add_argument("--min-accuracy", type=float, default=0.95, help="target test accuracy")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds for the accuracy spread (1: none)")
    args = parser.parse_args()
    os.chdir(ROOT)

    started = time.perf_counter()
    rows = pipeline_rows(args) + seed_rows(args) + startup_rows() + inference_rows() + training_rows(args)
    return publish(rows, REPORT, "Benchmark: default pipeline", MARKERS, "make bench", started, note=REPRODUCIBLE)


if __name__ == "__main__":
    sys.exit(main())
