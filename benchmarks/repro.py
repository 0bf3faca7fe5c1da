"""Pipeline figures, measured through DVC the way a user runs it.

- ``dvc repro --force``: every stage, as on a fresh clone; the wall time of the whole run,
  each stage's time (from DVC's "Running stage" lines) and each stage's peak RSS (its process
  tree sampled every 0.2 s), plus the exact peak RSS of the largest stage process
  (``getrusage``).
- a no-op ``dvc repro`` (median of several);
- an evaluate-only param change: which stages rerun (train must not), then the change undone.
"""

from __future__ import annotations

import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
STAGE_CMD = re.compile(r"taxonomist (\w+)")


def dvc_command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "dvc"), *args]


@dataclass
class ReproRun:
    """What one ``dvc repro`` did and cost."""

    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for stages that ran
    peak_rss: dict[str, int] = field(default_factory=dict)  # stage -> bytes (sampled)


class RssSampler(threading.Thread):
    """Samples the RSS of every ``taxonomist <stage>`` process under ``pid`` (the peak per stage)."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every = pid, every
        self.peak: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.root)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for proc in children:
                try:
                    match = STAGE_CMD.search(" ".join(proc.cmdline()))
                    if match:
                        rss = proc.memory_info().rss
                        self.peak[match.group(1)] = max(self.peak.get(match.group(1), 0), rss)
                except psutil.Error:
                    continue
            self.done.wait(self.every)


def repro(root: Path, *args: str, echo: bool = True) -> ReproRun:
    """Run ``dvc repro <args>`` in ``root``; time it and each stage that ran."""
    cmd = dvc_command("repro", *args)
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        sampler = RssSampler(proc.pid)
        sampler.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
            match = STAGE_LINE.search(line)
            if match:
                marks.append((match.group(1), time.perf_counter()))
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    end = time.perf_counter()
    if code != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {code}")
    stages = {name: (marks[i + 1][1] if i + 1 < len(marks) else end) - t for i, (name, t) in enumerate(marks)}
    return ReproRun(end - start, stages, sampler.peak)


def largest_child_rss() -> int:
    """Peak RSS (bytes) of the largest process this one has waited for, grandchildren included."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def noop(root: Path, runs: int = 3) -> tuple[float, ReproRun]:
    """Median seconds of ``runs`` no-op ``dvc repro`` runs, and the last run."""
    results = [repro(root, echo=False) for _ in range(runs)]
    if any(r.stages for r in results):
        ran = sorted({s for r in results for s in r.stages})
        raise SystemExit(f"the no-op dvc repro ran stages {ran}: the pipeline was not up to date")
    return statistics.median(r.seconds for r in results), results[-1]


def evaluate_only_change(root: Path, key: str = "misclassified_examples") -> ReproRun:
    """Change ``evaluate.<key>`` by one in params.yaml, ``dvc repro``, then put it back and
    ``dvc repro`` again; return the first run (the stages the change reran)."""
    params = root / "params.yaml"
    original = params.read_text()
    data = yaml.safe_load(original)
    data["evaluate"][key] = int(data["evaluate"][key]) + 1
    try:
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        changed = repro(root, echo=False)
    finally:
        params.write_text(original)
    repro(root, echo=False)  # back to the committed params
    return changed
