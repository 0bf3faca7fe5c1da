"""Shared fixtures: tiny image sets the tests make themselves (no network, no downloads)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from taxonomist.config import compose
from taxonomist.stages import ingest, preprocess

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, size: int, rng: random.Random, mode: str = "RGB") -> Image.Image:
    """A filled shape on a noisy background: an easy, learnable image of class ``shape``."""
    noise = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 60, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(rng.randrange(150, 256) for _ in range(3))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    if mode == "RGBA":
        img = img.convert("RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def make_image_folder(root: Path, per_class: int = 30, seed: int = 0, classes=SHAPES) -> Path:
    """A folder-per-class tree of PNG and JPEG images in several sizes and modes."""
    rng = random.Random(seed)
    modes = ("RGB", "L", "RGBA", "P")
    for label in classes:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = rng.choice((24, 32, 40, 57))
            mode = modes[i % len(modes)]
            img = draw_shape(label, size, rng, mode)
            if i % 5 == 0 and mode in ("RGB", "L"):
                img.save(folder / f"{label}_{i:03d}.jpg", quality=90)
            else:
                img.save(folder / f"{label}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A tiny 3-class image folder (30 images per class)."""
    return make_image_folder(tmp_path / "shapes")


def tiny_overrides(source: Path) -> list[str]:
    """Overrides that make the default pipeline run in seconds on a tiny folder."""
    return [
        f"data.source={source}",
        "data=folder",
        "model.name=test_resnet",
        "preprocess.image_size=32",
        "preprocess.channels=3",
        "preprocess.mean=[0.5,0.5,0.5]",
        "preprocess.std=[0.25,0.25,0.25]",
        "preprocess.val_fraction=0.2",
        "preprocess.test_fraction=0.2",
        "train.batch_size=16",
        "trainer.max_epochs=8",
        "trainer.precision=32-true",
        "evaluate.batch_size=64",
        "package.model_name=taxonomist-test",
    ]


def write_tiny_conf(conf_dir: Path, source: Path, name: str = "tiny") -> Path:
    """Write ``conf/<name>.yaml``: the default config with :func:`tiny_overrides` applied, as a
    primary config DVC's Hydra composition can use (``dvc config hydra.config_name <name>``)."""
    defaults: list = ["config"]
    values: dict = {}
    for override in tiny_overrides(source):
        key, value = override.split("=", 1)
        if "." not in key:  # a config group choice
            defaults.append({f"override {key}": value})
            continue
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    defaults.append("_self_")
    path = conf_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, **values}, sort_keys=False))
    return path


@pytest.fixture
def staged(tmp_path):
    """An image folder with one truncated PNG and one exact duplicate, ingested and preprocessed."""
    source = make_image_folder(tmp_path / "shapes", per_class=12)
    good = (source / "circle" / "circle_001.png").read_bytes()
    (source / "circle" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    shutil.copyfile(source / "square" / "square_002.png", source / "square" / "zz_duplicate.png")
    cfg = compose(tiny_overrides(source), conf_dir=REPO / "conf")
    raw, processed = tmp_path / "data" / "raw", tmp_path / "data" / "processed"
    summary = ingest.run(cfg, out_dir=raw)
    report = preprocess.run(cfg, raw_dir=raw, out_dir=processed)
    return {"source": source, "cfg": cfg, "raw": raw, "processed": processed, "summary": summary, "report": report}


def run_cmd(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with the environment's ``bin`` on PATH (as DVC stages need); fail with
    its output when it fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
