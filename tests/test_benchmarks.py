"""The benchmark's own code (benchmarks/): the table rows and the training measurements."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common
import training


def test_rows_judge_targets_and_show_anchors():
    met = common.Row("no-op", 1.5, "s", target=3.0, higher_is_better=False, digits=2)
    assert met.cells() == ["no-op", "1.50 s", "≤ 3.00 s", "0.50", "met"]
    missed = common.Row("acc", 0.9419, target=0.95, digits=4)
    assert missed.verdict() == "NOT met" and missed.cells()[3] == "0.99"
    anchored = common.Row("acc", 0.9419, anchor=0.939, label="93.9 %", digits=4)
    assert anchored.cells() == ["acc", "0.9419", "0.9390 (93.9 %)", "1.00", ""]
    judged = common.Row("change", 47.0, "s", label="reran: evaluate", passed=False)
    assert judged.cells()[2:] == ["reran: evaluate", "", "NOT met"]
    assert "| figure | measured |" in common.table([met])


def test_show_in_readme_replaces_only_the_block(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- b:start -->\nold\n<!-- b:end -->\nrest\n")
    monkeypatch.setattr(common, "README", readme)
    common.show_in_readme("new table", ("<!-- b:start -->", "<!-- b:end -->"))
    assert readme.read_text() == "intro\n<!-- b:start -->\nnew table\n<!-- b:end -->\nrest\n"


@pytest.fixture
def tiny_cfg(staged):
    cfg = staged["cfg"].copy()
    cfg.callbacks.ema = {"_target_": "taxonomist.models.callbacks.EMAWeightAveraging", "decay": 0.998}
    cfg.fit.batch_size = 4  # several full batches from the tiny training split
    return cfg


def test_raw_and_pipeline_loops_measure_images_per_second(staged, tiny_cfg):
    processed = staged["processed"]
    assert training.raw_loop(tiny_cfg, processed, steps=3, warmup=1) > 0
    timer = training.pipeline_fit(tiny_cfg, processed, warmup=1, steps=2)
    batch = int(tiny_cfg.fit.batch_size)
    assert timer.images == 2 * batch and timer.throughput > 0  # the warm-up batch is not counted
    assert training.loader(tiny_cfg, processed, batches=1, warmup=0) > 0


def test_scaling_times_one_epoch_per_size(staged, tiny_cfg):
    seconds = training.scaling(tiny_cfg, staged["processed"], (8, 16))
    assert set(seconds) == {8, 16} and all(s > 0 for s in seconds.values())
    with pytest.raises(SystemExit, match="images asked for"):
        training.scaling(tiny_cfg, staged["processed"], (10**6,))


def test_benchmark_photos_are_distinct_photo_sized_jpegs_the_same_every_time(tmp_path):
    import hashlib
    import io

    import photos
    from PIL import Image

    made = [photos.photo(i) for i in range(8)]
    assert [label for label, _ in made] == list(photos.CLASSES) * 2
    assert len({hashlib.sha256(data).hexdigest() for _, data in made}) == 8
    assert photos.photo(5) == made[5]
    with Image.open(io.BytesIO(made[0][1])) as img:
        assert (img.format, img.size) == ("JPEG", photos.SIZE)
    pool = photos.make(tmp_path / "pool", 6, workers=1)
    view = photos.view(pool, tmp_path / "view", 4)
    assert sorted(p.name for p in view.rglob("*.jpg")) == [f"{i:07d}.jpg" for i in range(4)]
    assert photos.path_of(view, 3).read_bytes() == made[3][1]
