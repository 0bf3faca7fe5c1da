"""Benchmark of the default pipeline: the whole `dvc repro` from scratch, per stage.

Runs ``dvc repro --force`` in the project (every stage, as on a fresh clone), times each
stage from DVC's own "Running stage" lines, then times a no-op ``dvc repro`` (median of 3)
and reads the test metrics the evaluate stage wrote. Prints a table of each figure with its
target and writes it, with the date and the machine, to ``reports/benchmark.md`` and into
README.md between the ``benchmark:start`` / ``benchmark:end`` markers.

Usage: ``bash scripts/bench.sh`` (sets up the environment first), or
``python benchmarks/pipeline.py [--skip-repro]`` inside the environment.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "benchmark.md"
README = ROOT / "README.md"
MARKERS = ("<!-- benchmark:start -->", "<!-- benchmark:end -->")
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


@dataclass
class Row:
    """One line of the benchmark table."""

    figure: str
    value: float
    unit: str
    target: float | None = None
    higher_is_better: bool = True

    def verdict(self) -> str:
        if self.target is None:
            return ""
        ok = self.value >= self.target if self.higher_is_better else self.value <= self.target
        return "met" if ok else "NOT met"

    def cells(self) -> list[str]:
        fmt = "{:.4f}" if self.unit == "" else "{:.1f}"
        target = "" if self.target is None else ("≥ " if self.higher_is_better else "≤ ") + fmt.format(self.target)
        ratio = "" if self.target is None else f"{self.value / self.target:.2f}"
        measured = fmt.format(self.value) + (f" {self.unit}" if self.unit else "")
        return [self.figure, measured, target, ratio, self.verdict()]


def dvc(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dvc"), *args]


def timed_repro(force: bool) -> tuple[float, dict[str, float]]:
    """Run ``dvc repro``; return the wall time and the seconds spent in each stage."""
    cmd = dvc("repro", *(["--force"] if force else []))
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            match = STAGE_LINE.search(line)
            if match:
                marks.append((match.group(1), time.perf_counter()))
        code = proc.wait()
    end = time.perf_counter()
    if code != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {code}")
    stages = {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - t for i, (name, t) in enumerate(marks)}
    return end - start, stages


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    mem = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kib = int(meminfo.read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    import torch

    return f"{cpu}, {os.cpu_count()} cores{mem}, Python {platform.python_version()}, torch {torch.__version__}"


def table(rows: list[Row]) -> str:
    header = ["figure", "measured", "target", "ratio", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def show_in_readme(body: str, markers: tuple[str, str] = MARKERS) -> None:
    """Replace the README's text between ``markers`` (the benchmark block) with ``body``."""
    text = README.read_text()
    start, end = markers
    if start not in text or end not in text:
        print(f"README.md has no {start} ... {end} block; not updated", file=sys.stderr)
        return
    head, rest = text.split(start, 1)
    README.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-repro", action="store_true", help="only time the no-op repro and read the metrics")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="target for the whole dvc repro")
    parser.add_argument("--min-accuracy", type=float, default=0.93, help="target test accuracy")
    args = parser.parse_args()

    rows: list[Row] = []
    if not args.skip_repro:
        total, stages = timed_repro(force=True)
        rows.append(Row("whole `dvc repro` (all stages)", total, "s", args.max_minutes * 60, higher_is_better=False))
        rows += [Row(f"  stage {name}", seconds, "s") for name, seconds in stages.items()]
    noop = statistics.median(timed_repro(force=False)[0] for _ in range(3))
    rows.append(Row("no-op `dvc repro` (median of 3)", noop, "s"))
    metrics = json.loads((ROOT / "reports" / "metrics.json").read_text())
    test = metrics.get("test", metrics)
    rows.append(Row("test accuracy", float(test["acc"]), "", args.min_accuracy))
    rows.append(Row("test macro-F1", float(test["f1_macro"]), ""))

    stamp = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    text = (
        f"# Benchmark: default pipeline\n\nGenerated by `bash scripts/bench.sh` on {stamp}.\n"
        f"Machine: {machine()}.\n\n{table(rows)}\n"
    )
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(text)
    show_in_readme(text.split("\n", 2)[2].strip())
    print("\n" + text)
    return 0 if all(row.verdict() != "NOT met" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
