"""Data at scale: ingest and preprocess on folders of 1024x768 JPEG photos at 224 px RGB.

1. **Decode speed**: today's preprocess stage against the one before parallel draft-mode
   decoding (``--baseline``, a git revision run from a worktree) on the same 2,000 photos:
   the stage's time, the images per second of its work per image (the difference from a run
   on 200 photos, which leaves out the fixed start-up), and how far the draft-mode pixels are
   from the full decode.
2. **Flat memory, linear time**: ``taxonomist ingest`` and ``taxonomist preprocess`` at each of
   ``--sizes`` images: seconds per image and the peak memory of the stage's whole process tree
   (the sum of its processes' PSS, sampled every 0.2 s: shared pages counted once). Beside
   them, each stage's CPU seconds per image (user + system of its process tree: the code's work,
   which waiting on the disk does not inflate), and what the disk does with the same bytes:
   ``cat`` copying the photos into one file, then ``fsync``; and, where ``/dev/shm`` has room,
   ingest writing its archive to memory (its time apart from the disk's writes).
3. **Incremental data**: 1,000 images added to the data set of the second size: ingest and
   preprocess again (only the new images are decoded).
4. **DVC**: at the largest size, the outputs are committed (``cache.type hardlink``, as the
   README advises for large data) and a no-op ``dvc repro preprocess`` and ``dvc status`` timed.
5. **Training from a cache larger than memory**: the training split's file read in a process
   whose memory (page cache included) is capped by a cgroup at ``--cap-gib``, after the file is
   dropped from the page cache: block-shuffled reads (:class:`BlockRows`) against random rows
   of the memory map.

The photos (``benchmarks/photos.py``) are made once in ``--workdir`` and kept for later runs.
Usage: ``make bench-scale`` or ``python benchmarks/scale.py [--sizes 10000,30000,100000]``.
Writes ``reports/benchmark_scale.md`` and README.md's ``benchmark-scale`` block.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import photos
import psutil
from common import ROOT, Row, publish

REPORT = ROOT / "reports" / "benchmark_scale.md"
MARKERS = ("<!-- benchmark-scale:start -->", "<!-- benchmark-scale:end -->")
GB = 1e9
SPEED_IMAGES = 2000
SMALL_IMAGES = 200  # the speed comparison's second run: the fixed cost of a stage
ADDED = 1000
CGROUP = Path("/sys/fs/cgroup/memory/taxonomist-bench")
NOTE = (
    "Photos: 1024x768 JPEGs (quality 90, ~130 KB) made by `benchmarks/photos.py` from scikit-image's colour "
    "sample photos, 4 classes; `preprocess.image_size=224`, 3 channels. Peak memory is the summed PSS of the "
    "stage's process tree (workers included). Stage times include the stage's start-up (imports, ~5-10 s); "
    "the page cache is dropped before each stage when the benchmark runs as root (so every size reads from disk)."
)
OVERRIDES = ["data=folder", "preprocess.image_size=224", "preprocess.channels=3", "preprocess.resize_mode=squash"]


class TreeMemory(threading.Thread):
    """The peak over time of the summed PSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak = pid, every, 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            total = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    total += proc.memory_full_info().pss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.done.wait(self.every)


class Ran(NamedTuple):
    """What a command took: wall seconds, the peak memory of its process tree (bytes) and the
    CPU seconds (user + system) of the tree: the code's work, apart from its waits on the disk."""

    seconds: float
    peak: int
    cpu: float


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children and their descendants."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> Ran:
    """Run ``cmd``; return its wall seconds, the peak memory and CPU seconds of its process tree."""
    cpu = children_cpu()
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeMemory(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed with exit code {code}; see {log}")
    return Ran(seconds, sampler.peak, children_cpu() - cpu)


def drop_page_cache() -> bool:
    """Write back and drop the kernel's page cache (root only), so every stage reads its input
    from disk whatever the data set's size: at 10k images the photos would otherwise still be
    in memory, at 100k not. False when not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def stage(project: Path, name: str, src: Path | None = None) -> Ran:
    """Run one pipeline stage in ``project`` (with the code of ``src``, default this checkout),
    from a cold page cache when allowed."""
    drop_page_cache()
    env = dict(os.environ, PYTHONPATH=str(src)) if src else None
    code = "import sys; from taxonomist.cli import main; sys.exit(main(sys.argv[1:]))"
    return run([sys.executable, "-c", code, name, "--params", "params.yaml"], project, project / f"{name}.log", env)


def copy_seconds(source: Path, target: Path) -> float:
    """What the disk does with ingest's bytes: the seconds to read every image of ``source`` (in
    path order, from a cold page cache when allowed) and write them one after another into ``target``, then
    ``fsync`` it (``cat`` does the copy). The file is removed afterwards."""
    files = sorted(str(path) for path in source.rglob("*.jpg"))
    drop_page_cache()
    start = time.perf_counter()
    with open(target, "wb") as out:
        for at in range(0, len(files), 1000):  # (a command line of 1,000 paths at a time)
            subprocess.run(["cat", *files[at : at + 1000]], stdout=out, check=True)
        os.fsync(out.fileno())
    seconds = time.perf_counter() - start
    target.unlink()
    return seconds


def memory_folder(source: Path) -> Path | None:
    """A folder in memory (``/dev/shm``, a tmpfs) with room for an archive of ``source`` and
    half as much again left free (the photos' page cache gives way), or None: the ingest rows
    that measure the code apart from the disk are then left out."""
    shm = Path("/dev/shm")
    needed = sum(path.stat().st_size for path in source.rglob("*.jpg"))
    if not shm.is_dir() or shutil.disk_usage(shm).free < 1.5 * needed:
        return None
    if psutil.virtual_memory().available < 1.5 * needed:
        return None
    return shm / "taxonomist-bench"


def make_project(folder: Path, source: Path, src: Path | None = None) -> Path:
    """A project folder: params.yaml for ``source`` (composed by the code of ``src``), the
    project's dvc.yaml and a copy of its code (what the stages' DVC deps name)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    overrides = [*OVERRIDES, f"data.source={source}"]
    code = (
        "import sys; from taxonomist.config import compose, write_params; "
        "write_params(compose(sys.argv[2:], conf_dir=sys.argv[1]), 'params.yaml')"
    )
    conf = (src.parent if src else ROOT) / "conf"
    env = dict(os.environ, PYTHONPATH=str(src)) if src else None
    subprocess.run([sys.executable, "-c", code, str(conf), *overrides], cwd=folder, check=True, env=env)
    shutil.copyfile(ROOT / "dvc.yaml", folder / "dvc.yaml")
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def baseline_src(work: Path, revision: str) -> Path:
    """The ``src`` folder of ``revision``, checked out in a worktree under ``work``."""
    tree = work / f"baseline-{revision}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True)
    return tree / "src"


def aligned_pixels(processed: Path, split: str) -> pd.Series:
    """Row index of each path in a split's image file."""
    frame = pd.read_csv(processed / "splits.csv", dtype=str, keep_default_na=False)
    part = frame[frame["split"] == split].reset_index(drop=True)
    return pd.Series(part.index, index=part["path"])


def pixel_difference(old: Path, new: Path) -> tuple[float, int, float]:
    """Mean and max absolute difference (grey levels) and the share of identical pixels
    between two preprocess outputs of the same images, matched by path."""
    diffs, identical, total, worst = [], 0, 0, 0
    for split in ("train", "val", "test"):
        a, b = aligned_pixels(old, split), aligned_pixels(new, split)
        common = a.index.intersection(b.index)
        old_images = np.load(old / f"{split}_images.npy", mmap_mode="r")
        new_images = np.load(new / f"{split}_images.npy", mmap_mode="r")
        for path in common:
            d = np.abs(old_images[a[path]].astype(np.int16) - new_images[b[path]].astype(np.int16))
            diffs.append(float(d.mean()))
            identical += int((d == 0).sum())
            total += d.size
            worst = max(worst, int(d.max()))
    return statistics.fmean(diffs), worst, identical / max(total, 1)


def preprocess_both(pool: Path, work: Path, count: int, old_src: Path) -> tuple[float, float, Path, Path]:
    """Seconds of the old and the new preprocess stage on the same ``count`` ingested photos,
    and their projects."""
    source = photos.view(pool, work / f"photos-{count}", count)
    old_project = make_project(work / f"speed-old-{count}", source, src=old_src)
    new_project = make_project(work / f"speed-new-{count}", source)
    stage(old_project, "ingest", src=old_src)
    shutil.copytree(old_project / "data" / "raw", new_project / "data" / "raw")  # the same ingested bytes
    old_seconds = stage(old_project, "preprocess", src=old_src).seconds
    new_seconds = stage(new_project, "preprocess").seconds
    return old_seconds, new_seconds, old_project, new_project


def speed_rows(pool: Path, work: Path, revision: str) -> list[Row]:
    """The preprocess stage now and at ``revision`` on the same photos. Each stage also pays a
    fixed cost (start-up, the health report); the work per image is the difference between
    a run on SPEED_IMAGES photos and one on SMALL_IMAGES, per extra image."""
    old_src = baseline_src(work, revision)
    old_small, new_small, *projects = preprocess_both(pool, work, SMALL_IMAGES, old_src)
    old_seconds, new_seconds, old_project, new_project = preprocess_both(pool, work, SPEED_IMAGES, old_src)
    mean, worst, same = pixel_difference(old_project / "data" / "processed", new_project / "data" / "processed")
    for project in (*projects, old_project, new_project):
        shutil.rmtree(project)
    extra = SPEED_IMAGES - SMALL_IMAGES
    old_rate, new_rate = extra / (old_seconds - old_small), extra / (new_seconds - new_small)
    return [
        Row(f"preprocess {SPEED_IMAGES:,} photos, before ({revision}: serial, full decode)", old_seconds, "s"),
        Row(
            f"preprocess {SPEED_IMAGES:,} photos, now (parallel, draft mode)",
            new_seconds,
            "s",
            anchor=old_seconds,
            label="before",
            higher_is_better=False,
        ),
        Row(
            "  work per image, before: images/s",
            old_rate,
            "img/s",
            label=f"runs of {SMALL_IMAGES} and {SPEED_IMAGES:,}",
        ),
        Row("  work per image, now: images/s", new_rate, "img/s", target=3 * old_rate, label="3x before"),
        Row(
            "  pixels now vs full decode: mean |difference|",
            mean,
            "grey levels",
            label=f"max {worst}, {same:.0%} identical",
            digits=2,
            target=1.0,
            higher_is_better=False,
        ),
    ]


def dvc(project: Path, *args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=project, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed: {result.stdout}{result.stderr}")
    if args[0] == "repro" and "Running stage" in result.stdout:
        raise SystemExit(f"the no-op dvc repro ran a stage:\n{result.stdout}")
    return seconds


def dvc_rows(project: Path, size: int) -> list[Row]:
    dvc(project, "init", "--no-scm", "-q")
    dvc(project, "config", "cache.type", "hardlink,symlink")
    started = time.perf_counter()
    dvc(project, "commit", "-f", "ingest", "preprocess")
    committed = time.perf_counter() - started
    status = statistics.median(dvc(project, "status", "--with-deps", "preprocess") for _ in range(3))
    noop = statistics.median(dvc(project, "repro", "preprocess") for _ in range(3))
    return [
        Row(f"`dvc commit` of ingest + preprocess outputs at {size:,} (hash, hardlink)", committed, "s"),
        Row(f"no-op `dvc status --with-deps preprocess` at {size:,}", status, "s", target=3.0, higher_is_better=False),
        Row(f"no-op `dvc repro preprocess` at {size:,}", noop, "s", target=3.0, higher_is_better=False),
    ]


READER = """
import os, sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
from taxonomist.data.dataset import BlockRows, BlockShuffleSampler
path, mode, limit, seconds = sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
images = np.load(path, mmap_mode="r")
block = max(2048, -(-256 * 2**20 // (images[0].nbytes)))
if mode == "blocks":
    rows = BlockRows(path, block)
    order = BlockShuffleSampler(len(images), block, seed=0)
    get = lambda i: rows[i]
else:
    order = np.random.default_rng(0).permutation(len(images)).tolist()
    get = lambda i: np.array(images[i])
start, n = time.perf_counter(), 0
for i in order:
    get(i).sum(dtype=np.uint64) if n % 64 == 0 else get(i)
    n += 1
    if n >= limit or time.perf_counter() - start > seconds:
        break
print(n / (time.perf_counter() - start))
"""


def capped_read(path: Path, mode: str, cap: int, limit: int, seconds: float) -> tuple[float, str]:
    """Images/s reading ``path`` in ``mode``, in a cgroup capped at ``cap`` bytes when possible."""
    args = [sys.executable, "-c", READER, str(ROOT / "src"), str(path), mode, str(limit), str(seconds)]
    how = "page cache dropped first"
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(cap))
        args = ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh", *args]
        how = f"memory capped at {cap / 2**30:.0f} GiB (cgroup), page cache dropped first"
    except OSError:
        pass
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1]), how


def loader_rows(project: Path, cap_gib: float) -> list[Row]:
    path = project / "data" / "processed" / "train_images.npy"
    size = path.stat().st_size
    cap = int(cap_gib * 2**30)
    limit, seconds = 20_000, 60.0
    blocks, how = capped_read(path, "blocks", cap, limit, seconds)
    random, _ = capped_read(path, "random", cap, limit, seconds)
    if CGROUP.exists():
        CGROUP.rmdir()
    return [
        Row(
            f"read the {size / GB:.1f} GB training split, block-shuffled ({how})",
            blocks,
            "img/s",
            anchor=random,
            label="random rows of the memory map",
        )
    ]


def size_rows(pool: Path, work: Path, sizes: list[int], cap_gib: float) -> list[Row]:
    rows: list[Row] = []
    per_image: dict[str, dict[int, float]] = {
        name: {} for name in ("copy", "ingest", "preprocess", "memory", "ingest cpu", "preprocess cpu")
    }
    peaks: dict[int, int] = {}
    for n, size in enumerate(sizes):
        source = photos.view(pool, work / f"photos-{size}", size)
        project = make_project(work / f"project-{size}", source)
        copy = copy_seconds(source, work / "copy.bin")
        per_image["copy"][size] = copy / size
        rows.append(Row(f"copy {size:,} photos into one file (`cat`, fsync)", copy, "s",
                        label=f"{1000 * copy / size:.2f} ms/img"))  # fmt: skip
        in_memory = memory_folder(source)
        if (
            in_memory is not None
        ):  # the same ingest writing its archive to memory: the code's time apart from the disk's
            try:
                seconds = stage(make_project(in_memory, source), "ingest").seconds
            finally:
                shutil.rmtree(in_memory, ignore_errors=True)
            per_image["memory"][size] = seconds / size
            rows.append(Row(f"ingest {size:,} photos into memory (tmpfs)", seconds, "s",
                            label=f"{1000 * seconds / size:.2f} ms/img"))  # fmt: skip
        for name in ("ingest", "preprocess"):
            seconds, peak, cpu = stage(project, name)
            per_image[name][size] = seconds / size
            per_image[f"{name} cpu"][size] = cpu / size
            rows.append(Row(f"{name} {size:,} photos", seconds, "s", label=f"{1000 * seconds / size:.2f} ms/img"))
            if name == "preprocess":
                peaks[size] = peak
                rows.append(Row(f"  peak memory of preprocess at {size:,}", peak / GB, "GB", target=2.0,
                                higher_is_better=False, digits=2))  # fmt: skip
        if n == 1 or len(sizes) == 1:  # incremental: add images to the second data set
            photos.view(pool, source, size + ADDED)
            ingest_s = stage(project, "ingest").seconds
            pre_s = stage(project, "preprocess").seconds
            report = json.loads((project / "data" / "processed" / "report.json").read_text())
            rows.append(Row(f"add {ADDED:,} photos to {size:,}: ingest", ingest_s, "s"))
            rows.append(Row(f"add {ADDED:,} photos to {size:,}: preprocess", pre_s, "s",
                            anchor=per_image["preprocess"][size] * size, label="the full preprocess"))  # fmt: skip
            assert report["images_in"] == size + ADDED
        if size == sizes[-1]:
            rows += dvc_rows(project, size)
            rows += loader_rows(project, cap_gib)
        shutil.rmtree(project)
        shutil.rmtree(source)
    first, last = sizes[0], sizes[-1]
    if last != first:
        for name in ("ingest", "preprocess"):
            ratio = per_image[name][last] / per_image[name][first]
            rows.append(Row(f"{name} time per image, {last:,} / {first:,}", ratio, "", target=1.1,
                            higher_is_better=False, digits=2))  # fmt: skip
            cpu = per_image[f"{name} cpu"][last] / per_image[f"{name} cpu"][first]
            rows.append(Row(f"  {name} CPU time per image, {last:,} / {first:,} (the code, apart from the disk)", cpu,
                            "", digits=2))  # fmt: skip
        copy_ratio = per_image["copy"][last] / per_image["copy"][first]
        rows.append(Row(f"  `cat` copy per image, {last:,} / {first:,} (the disk)", copy_ratio, "", digits=2))
        memory = per_image["memory"]
        if first in memory and last in memory:
            ratio = memory[last] / memory[first]
            rows.append(Row(f"  ingest into memory per image, {last:,} / {first:,} (the code)", ratio, "", digits=2))
        spread = max(peaks.values()) / min(peaks.values())
        rows.append(Row("preprocess peak memory, largest / smallest", spread, "", target=1.1, higher_is_better=False,
                        digits=2))  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,30000,100000", help="data set sizes (images), comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/taxonomist-scale"), help="photos and projects")
    parser.add_argument("--baseline", default="863f3ef", help="git revision of the preprocess to compare with")
    parser.add_argument("--cap-gib", type=float, default=2.0, help="memory cap of the loader measurement")
    parser.add_argument("--skip-speed", action="store_true", help="leave out the comparison with --baseline")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    work = args.workdir.resolve()
    grown = (sizes[1] if len(sizes) > 1 else sizes[0]) + ADDED  # the data set images are added to
    pool = photos.make(work / "pool", max(sizes[-1], grown, SPEED_IMAGES))  # once: kept for later runs
    started = time.perf_counter()  # the minutes reported leave out making the photos
    rows = [] if args.skip_speed else speed_rows(pool, work, args.baseline)
    rows += size_rows(pool, work, sizes, args.cap_gib)
    return publish(rows, REPORT, "Benchmark: data at scale", MARKERS, "make bench-scale", started, note=NOTE)


if __name__ == "__main__":
    sys.exit(main())
