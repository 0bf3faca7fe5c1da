"""Training in two processes (Lightning DDP on CPU, gloo) against one process with the same
global batch; the samplers' shards; too many devices fails before anything runs.

Comparing the runs: with ``augment=none``, dropout 0, fp32 and a network whose normalisation is
per image (GroupNorm with one group; BatchNorm normalises with each process's half batch on CPU,
where torch has no SyncBatchNorm, so a BatchNorm network is not the same computation), the two
runs compute the same thing: each step the same images (:class:`RankShard` takes every second
image of the one-process order), the mean of the two processes' mean gradients equals the one
process's mean gradient, the same optimizer, schedule and EMA. They differ only in the order of
floating-point sums (half batches, then gloo's all-reduce), about 1e-7 relative per step.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_image_folder, stop_process_group, tiny_overrides

from taxonomist.config import compose, write_params
from taxonomist.data.dataset import BlockShuffleSampler
from taxonomist.errors import ConfigError
from taxonomist.models import distributed
from taxonomist.models.distributed import RankShard
from taxonomist.stages import ingest, preprocess

EPOCHS = 3
BATCH = 4  # per process in the DDP run; the one-process run takes 2 x BATCH
# The largest |difference| of any weight between the runs after EPOCHS epochs (measured: 1.5e-6 on
# a 2-core Xeon, while training moved the weights by up to ~6e-3 at lr 1e-3), and of the history's
# metrics. A real difference (another image order, a shard seen twice, a loss of one process only)
# changes the weights on the scale of an update, ~lr per step.
WEIGHT_TOLERANCE = 1e-4
METRIC_TOLERANCE = 1e-4
COMMON = [
    "augment=none",
    "+model.kwargs.norm_layer=groupnorm1",  # no BatchNorm: see the module docstring
    "model.channels_last=false",
    f"trainer.max_epochs={EPOCHS}",
    "trainer.accelerator=cpu",
    "fit.num_threads=1",
    "fit.label_smoothing=0.0",
    "callbacks.early_stopping=null",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny shapes set ingested and preprocessed once: an even training split (no padded
    duplicate in the DDP run) and an odd val split (half of it per process would differ)."""
    root = tmp_path_factory.mktemp("ddp")
    source = make_image_folder(root / "shapes", per_class=16)
    cfg = compose([*tiny_overrides(source), *COMMON], conf_dir=REPO / "conf")
    processed = root / "data" / "processed"
    ingest.run(cfg, out_dir=root / "data" / "raw")
    report = preprocess.run(cfg, raw_dir=root / "data" / "raw", out_dir=processed)
    return {"root": root, "source": source, "processed": processed, "report": report}


def train_in(project: Path, prepared: dict, overrides: list[str], timeout: float = 300) -> str:
    """Run the train stage (``python -m taxonomist.cli train``, this checkout's code) in
    ``project`` with ``overrides``; return its output, fail with it when it fails or hangs."""
    project.mkdir(parents=True, exist_ok=True)
    shutil.copytree(prepared["processed"], project / "data" / "processed")
    cfg = compose([*tiny_overrides(prepared["source"]), *COMMON, *overrides], conf_dir=REPO / "conf")
    write_params(cfg, project / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = project / "train.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taxonomist.cli", "train"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc.pid, grace=5)
        pytest.fail(f"training did not finish in {timeout} s (a DDP hang?):\n{log.read_text()[-4000:]}")
    assert stop_process_group(proc.pid, grace=5) == [], "a training process outlived the stage"
    assert code == 0, log.read_text()[-4000:]
    return log.read_text()


def history(project: Path) -> list[dict[str, float]]:
    with (project / "reports" / "train_history.csv").open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def weights(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "models" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def runs(prepared: dict) -> dict[str, Path]:
    root = prepared["root"]
    one = root / "one"
    ddp = root / "ddp"
    train_in(one, prepared, [f"fit.batch_size={2 * BATCH}"])
    output = train_in(ddp, prepared, ["trainer=ddp", "trainer.devices=2", f"fit.batch_size={BATCH}"])
    assert "global batch 8 over 2 processes" in output
    return {"one": one, "ddp": ddp}


def test_the_split_sizes_exercise_the_shards(prepared: dict) -> None:
    counts = prepared["report"]["per_split"]
    assert counts["train"] % 2 == 0 and counts["val"] % 2 == 1, counts


def test_two_processes_write_one_run_one_history_one_checkpoint(runs: dict[str, Path]) -> None:
    import mlflow

    project = runs["ddp"]
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(found) == 1, [r.info.run_id for r in found]
    run_id = json.loads((project / "models" / "run.json").read_text())["run_id"]
    assert found[0].info.run_id == run_id
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val/acc"))
    assert steps == list(range(1, EPOCHS + 1))
    assert [int(r["epoch"]) for r in history(project)] == list(range(1, EPOCHS + 1))
    assert sorted(p.name for p in (project / "models").iterdir()) == ["best.ckpt", "labels.json", "run.json"]
    assert not (project / ".taxonomist").exists(), "the resume state of a finished run is left"
    checkpoints = [p for p in project.rglob("*.ckpt") if "data" not in p.parts]
    assert checkpoints == [project / "models" / "best.ckpt"]


def test_two_processes_match_one_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    one, ddp = weights(runs["one"]), weights(runs["ddp"])
    assert one.keys() == ddp.keys()
    tensors = [k for k in one if one[k].is_floating_point() and one[k].numel()]
    diff = max(float((one[k] - ddp[k]).abs().max()) for k in tensors)
    moved = max(float((one[k] - weights_at_start(runs["one"])[k]).abs().max()) for k in tensors)
    print(f"largest weight difference one process vs two: {diff:.2e} (training moved weights by up to {moved:.2e})")
    assert diff < WEIGHT_TOLERANCE, f"weights differ by up to {diff:.2e}"
    assert moved > 10 * WEIGHT_TOLERANCE, "training did not move the weights: the comparison proves nothing"
    for row_one, row_ddp in zip(history(runs["one"]), history(runs["ddp"]), strict=True):
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro", "train/lr"):
            assert row_ddp[key] == pytest.approx(row_one[key], abs=METRIC_TOLERANCE), (key, row_one, row_ddp)


def weights_at_start(project: Path) -> dict[str, torch.Tensor]:
    """The network before training: the same seed builds the same initial weights."""
    from taxonomist.config import load_params
    from taxonomist.models.module import ClassifierModule

    cfg = load_params(project / "params.yaml")
    torch.manual_seed(int(cfg.seed))
    hparams = torch.load(project / "models" / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    return ClassifierModule(hparams["cfg"], hparams["space"], int(hparams["in_chans"])).state_dict()


def test_val_metrics_cover_the_whole_val_split(runs: dict[str, Path], prepared: dict) -> None:
    """The history's val/acc of the best epoch is the checkpoint's accuracy over every val image."""
    from taxonomist.config import load_params
    from taxonomist.data.datamodule import ImageDataModule
    from taxonomist.models.inference import load_classifier

    project = runs["ddp"]
    cfg = load_params(project / "params.yaml")
    data = ImageDataModule(cfg, project / "data" / "processed")
    data.setup("validate")
    model = load_classifier(project / "models" / "best.ckpt")
    right = total = 0
    with torch.no_grad():
        for x, y in data.val_dataloader():
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert total == prepared["report"]["per_split"]["val"]
    best = int(torch.load(project / "models" / "best.ckpt", map_location="cpu", weights_only=True)["epoch"]) + 1
    row = next(r for r in history(project) if int(r["epoch"]) == best)
    assert row["val/acc"] == pytest.approx(right / total, abs=1e-6)


# --- the samplers' shards, and bad input (no training) ---------------------------------------


@pytest.mark.parametrize("length", [11, 12])
def test_rank_shards_are_disjoint_equal_and_agree_on_the_order(length: int) -> None:
    order = list(BlockShuffleSampler(length, 4, seed=3))
    shards = []
    for rank in range(2):
        sampler = RankShard(BlockShuffleSampler(length, 4, seed=3), 2, rank)
        sampler.set_epoch(0)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == -(-length // 2)  # equal steps in both processes
    assert set(shards[0]) | set(shards[1]) == set(range(length))  # every image
    overlap = set(shards[0]) & set(shards[1])
    assert len(overlap) == length % 2  # disjoint; an odd split repeats one image (padding)
    # Step k of the two processes is step k of one process with twice the batch.
    assert sorted(shards[0][:2] + shards[1][:2]) == sorted(order[:4])
    again = RankShard(BlockShuffleSampler(length, 4, seed=3), 2, 0)
    again.set_epoch(1)
    assert list(again) != shards[0]  # another epoch, another order


def test_too_many_devices_fail_in_one_line_before_training(prepared: dict, monkeypatch) -> None:
    source = prepared["source"]
    cpu = compose(
        [*tiny_overrides(source), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=64"],
        conf_dir=REPO / "conf",
    )
    with pytest.raises(ConfigError, match=r"trainer.devices=64 asks for 64 training processes on CPU.*may use \d+ CPU"):
        distributed.check_devices(cpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    gpu = compose([*tiny_overrides(source), "trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"trainer.devices=2 but this machine has 1 CUDA GPU\(s\)"):
        distributed.check_devices(gpu)
    sync = compose([*tiny_overrides(source), "trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true"])
    with pytest.raises(ConfigError, match="sync_batchnorm=true needs GPUs"):
        distributed.check_devices(sync)


def test_the_train_stage_checks_devices_before_any_side_effect(prepared: dict, tmp_path: Path, monkeypatch) -> None:
    from taxonomist.stages import train

    monkeypatch.chdir(tmp_path)
    cfg = compose(
        [*tiny_overrides(prepared["source"]), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=64"],
        conf_dir=REPO / "conf",
    )
    with pytest.raises(ConfigError, match=r"trainer\.devices=64"):
        train.run(cfg, processed_dir=prepared["processed"], models_dir=tmp_path / "models")
    assert list(tmp_path.iterdir()) == [], "files were written before the device check"


def test_only_the_first_process_is_primary() -> None:
    assert distributed.is_primary({})
    assert distributed.is_primary({"LOCAL_RANK": "0", "NODE_RANK": "0"})
    assert not distributed.is_primary({"LOCAL_RANK": "1"})
    assert not distributed.is_primary({"NODE_RANK": "1", "LOCAL_RANK": "0"})
    assert not distributed.is_primary({"SLURM_PROCID": "3"})
    assert [distributed.requested_devices(d) for d in (2, "2", [0, 1], "0,1", "auto", -1)] == [2, 2, 2, 2, None, None]
