"""Benchmark: using the model. Batch prediction and the served model under load.

Needs the default pipeline's outputs (``dvc repro``: ``data/``, ``dist/`` and the registered
champion in the project's MLflow store).

1. **Batch prediction**: the test split's images (Fashion-MNIST: its 10,000 official test
   PNGs), written as files into a folder, classified by ``taxonomist predict FOLDER --model
   dist -o predictions.csv``: images per second (from the run's record; the model load is
   left out) and the wall time of the whole command; then the accuracy of the written labels,
   as a check that the file says what evaluate measured, and the share of answers flagged
   ``abstain`` (the conformal set is not one label).
2. **Out of distribution**: scikit-learn's 1,797 handwritten digits (8 x 8, scaled up to
   PNGs of the training images' size) classified the same way: the share flagged ``abstain``.
   A Fashion-MNIST model has never seen a digit; every answer it gives is wrong.
3. **Load test** of ``taxonomist serve`` on loopback: ``--clients`` concurrent clients each
   send ``--requests`` requests of ``--images`` test PNGs, while one more client sends the
   decompression-bomb request (four PNGs that each decode to 12,000 x 12,000 pixels, 0.6 MB in
   all) every second. Reported: p50/p95 latency of the normal requests, their errors, the
   answer to the bomb request (each image refused on its own row) and the server's peak
   memory (the process tree's summed PSS). Bounded: every request has a 60 s timeout and the
   test stops after ``--max-seconds``.

Usage: ``make bench-serving`` (``make bench`` runs it after the pipeline benchmark), or inside
the environment ``python benchmarks/serving.py``. Writes ``reports/benchmark_serving.md`` and
README's ``benchmark-serving`` block.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
from common import ROOT, Row, publish
from PIL import Image
from scale import TreeMemory

from taxonomist.data.manifest import RawImages

REPORT = ROOT / "reports" / "benchmark_serving.md"
MARKERS = ("<!-- benchmark-serving:start -->", "<!-- benchmark-serving:end -->")
NOTE = (
    "Batch prediction runs the packaged model (`dist/`) as `mlflow models serve` runs it: decoding, "
    "preprocessing and ONNX Runtime in one process. The server's memory stays bounded because every "
    "image's pixel count is read from its header before decoding (`package.serving.max_pixels`) and "
    "`taxonomist serve` reads at most `--concurrency` requests at once."
)


def test_images(folder: Path) -> tuple[Path, dict[str, str]]:
    """The test split's raw images as files ``folder/<n>.<ext>``; their manifest labels by path."""
    splits = pd.read_csv(ROOT / "data/processed/splits.csv", dtype=str, keep_default_na=False)
    test = splits[splits["split"] == "test"]
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    with RawImages(ROOT / "data/raw") as raw:
        for n, (path, label) in enumerate(zip(test["path"], test["labels"], strict=True)):
            target = folder / f"{n:05d}{Path(path).suffix}"
            if not target.is_file():
                target.write_bytes(raw.read(path))
            labels[str(target)] = label
    return folder, labels


def batch_rows(work: Path) -> list[Row]:
    folder, labels = test_images(work / "test-images")
    out = work / "predictions.csv"
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "taxonomist.cli", "predict", str(folder), "--model", str(ROOT / "dist")]
    subprocess.run([*cmd, "-o", str(out), "--overwrite"], check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    record = json.loads((work / "predictions.csv.run.json").read_text())
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    accuracy = float((rows["label"] == rows["path"].map(labels)).mean())
    return [
        Row(f"batch prediction: {len(rows):,} test images ({folder.name}/), to CSV",
            record["images_per_second"], "img/s"),
        Row("  the whole `taxonomist predict` command (model load included)", wall, "s"),
        Row(f"  accuracy of the written labels ({shipped_accuracy()})", accuracy, digits=4),
        Row("  rows with an error", int((rows["error"] != "").sum()), digits=0),
        *abstain_rows(rows, "  answers flagged `abstain` (test images)"),
        *ood_rows(work),
    ]  # fmt: skip


def shipped_accuracy() -> str:
    """What the package stage measured for the model that ships (fp32, or the INT8 copy)."""
    precision = json.loads((ROOT / "dist/serving.json").read_text()).get("precision", "fp32")
    report = ROOT / "dist/quantization.json"
    if report.is_file():
        acc = json.loads(report.read_text()).get(precision, {}).get("metrics", {}).get("acc")
        if acc is not None:
            return f"the {precision} model that ships; package measured {acc:.4f}"
    return f"the {precision} model that ships"


def abstain_rows(rows: pd.DataFrame, text: str) -> list[Row]:
    """The share of answered rows flagged ``abstain`` (none when the model has no conformal sets)."""
    if "abstain" not in rows:
        return []
    answered = rows[rows["error"] == ""]
    return [Row(text, float((answered["abstain"].str.lower() == "true").mean()), digits=4)]


def ood_rows(work: Path) -> list[Row]:
    """Classify scikit-learn's digits (never seen by the model) and report the share flagged ``abstain``."""
    from sklearn.datasets import load_digits

    settings = json.loads((ROOT / "dist/serving.json").read_text())
    size, mode = int(settings["image_size"]), "L" if int(settings["channels"]) == 1 else "RGB"
    folder = work / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    for n, image in enumerate(load_digits().images):
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        pixels.convert(mode).save(folder / f"{n:04d}.png")
    out = work / "digits.csv"
    cmd = [sys.executable, "-m", "taxonomist.cli", "predict", str(folder), "--model", str(ROOT / "dist")]
    subprocess.run([*cmd, "-o", str(out), "--overwrite"], check=True, cwd=ROOT)
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    return abstain_rows(rows, f"out of distribution: {len(rows):,} handwritten digits flagged `abstain`")


def bomb_request() -> bytes:
    """Four PNGs, each 12,000 x 12,000 gray pixels of zeros (a few hundred KB each, 144 MB decoded)."""
    buf = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(buf, format="PNG", optimize=False)
    data = base64.b64encode(buf.getvalue()).decode()
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[data]] * 4}}).encode()


def images_request(images: list[bytes]) -> bytes:
    rows = [[base64.b64encode(b).decode()] for b in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {}
    except OSError:
        return 0, {}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_rows(work: Path, clients: int, requests: int, images: int, max_seconds: float) -> list[Row]:
    files = sorted((work / "test-images").iterdir())
    rng = np.random.default_rng(0)
    port = free_port()
    cmd = [sys.executable, "-m", "taxonomist.cli", "serve", "--port", str(port)]
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"taxonomist serve exited; see {work / 'serve.log'}") from None
                time.sleep(0.5)
        idle = TreeMemory(server.pid)
        idle.start()
        time.sleep(2)
        idle.done.set()
        idle.join()
        memory = TreeMemory(server.pid, every=0.2)
        memory.start()
        latencies: list[float] = []
        failures: list[int] = []
        bombs: list[tuple[int, dict]] = []
        stop_at = time.monotonic() + max_seconds
        done = threading.Event()
        bodies = [
            images_request([files[i].read_bytes() for i in rng.choice(len(files), images)]) for _ in range(requests)
        ]

        def client() -> None:
            for body in bodies:
                if time.monotonic() > stop_at:
                    return
                started = time.perf_counter()
                status, _ = post(port, body)
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures.append(status)

        def bomber() -> None:
            body = bomb_request()
            while not done.is_set() and time.monotonic() < stop_at:
                bombs.append(post(port, body))
                done.wait(1.0)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        attacker = threading.Thread(target=bomber)
        started = time.perf_counter()
        attacker.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        done.set()
        attacker.join()
        memory.done.set()
        memory.join()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    refused = [
        all(row.get("error", "").startswith("too large") for row in answer.get("predictions", []))
        and len(answer.get("predictions", [])) == 4
        for status, answer in bombs
        if status == 200
    ]
    ms = sorted(1000 * s for s in latencies)
    return [
        Row(f"load test: {clients} clients x {requests} requests of {images} images, + 1 bomb request/s",
            len(latencies) * images / seconds, "img/s"),
        Row("  latency p50", statistics.median(ms), "ms", digits=0),
        Row("  latency p95", float(np.percentile(ms, 95)), "ms", digits=0),
        Row("  failed requests (of the normal ones)", len(failures), digits=0,
            passed=not failures),
        Row(f"  bomb requests answered with every image refused on its row ({len(bombs)} sent)", sum(refused),
            digits=0, passed=bool(bombs) and all(refused) and len(refused) == len(bombs)),
        Row("  server memory, idle (PSS of its process tree)", idle.peak / 2**20, "MiB", digits=0),
        Row("  server memory, peak under load", memory.peak / 2**20, "MiB", digits=0,
            passed=memory.peak < 2 * 2**30),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/taxonomist-serving"), help="test images, outputs")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=150, help="requests per client")
    parser.add_argument("--images", type=int, default=16, help="images per request")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="the load test stops after this")
    args = parser.parse_args()
    for needed in ("dist/model.onnx", "data/processed/splits.csv", "data/raw/manifest.csv"):
        if not (ROOT / needed).is_file():
            raise SystemExit(f"{needed} not found: run the default pipeline first (`dvc repro`)")
    os.chdir(ROOT)
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = batch_rows(args.workdir)
    rows += load_rows(args.workdir, args.clients, args.requests, args.images, args.max_seconds)
    command = "make bench-serving"
    return publish(rows, REPORT, "Benchmark: using the model", MARKERS, command, started, note=NOTE)


if __name__ == "__main__":
    sys.exit(main())
