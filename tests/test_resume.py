"""Interrupted training resumes: a real training process is stopped (SIGTERM, then SIGKILL) and
``dvc repro`` finishes it with the weights of an uninterrupted run, in the same MLflow run."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, REPO, group_members, make_dvc_project, make_image_folder, run_cmd

from taxonomist.data.auto import fill_size
from taxonomist.data.transforms import build_augment
from taxonomist.models.resume import (
    RandomStates,
    ResumeFolder,
    augment_generators,
    capture_random_states,
    restore_random_states,
)
from taxonomist.stages import train
from taxonomist.stages.paths import HISTORY_FILE, RESUME_DIR

pytestmark = pytest.mark.e2e

EPOCHS = 10
# The code under test (this checkout, whichever the environment's editable install names).
ENV = {"PYTHONPATH": str(REPO / "src")}


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``args`` in its own process group (DVC runs the stage as its child), output to ``log``."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "NO_ALBUMENTATIONS_UPDATE": "1", **ENV}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def epochs_saved(project: Path) -> int:
    """Completed epochs in the resume checkpoint (0: none yet)."""
    try:
        return int(json.loads((project / RESUME_DIR / "state.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return 0


def stop_after(proc: subprocess.Popen, project: Path, epochs: int, sig: signal.Signals) -> int:
    """Send ``sig`` to the process group once the resume checkpoint holds ``epochs`` epochs;
    wait until every process of the group is gone; return the epochs saved then."""
    deadline = time.monotonic() + 300
    while epochs_saved(project) < epochs:
        assert proc.poll() is None, f"training ended before {epochs} epochs were saved"
        assert time.monotonic() < deadline, "no resume checkpoint in time"
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    deadline = time.monotonic() + 120
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_members(proc.pid), "the training process did not stop"
    proc.wait(timeout=30)
    assert proc.returncode != 0
    return ResumeFolder.epochs_in(project / RESUME_DIR / "last.ckpt")


def outputs(project: Path) -> dict:
    """What an uninterrupted and a resumed run must share, and the run id."""
    ckpt = torch.load(project / "models/best.ckpt", map_location="cpu", weights_only=True)
    return {
        "run_id": json.loads((project / "models/run.json").read_text())["run_id"],
        "weights": ckpt["state_dict"],
        "current": ckpt["current_model_state"],  # the trained (non-EMA) weights of the best epoch
        "epoch": ckpt["epoch"],
        "history": (project / HISTORY_FILE).read_text(),
    }


def metric_histories(project: Path, run_id: str) -> dict[str, list[tuple[int, float]]]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    keys = [k for k in client.get_run(run_id).data.metrics if k.startswith(("train/", "val/"))]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    source = make_image_folder(root.parent / f"{root.name}-images", per_class=30)
    make_dvc_project(root, source, overrides=[f"trainer.max_epochs={EPOCHS}"])
    run_cmd([str(BIN / "dvc"), "repro", "preprocess"], root, env=ENV)
    return root


def test_a_killed_training_resumes_bit_identically_in_the_same_run(project: Path) -> None:
    # The uninterrupted run.
    run_cmd([str(BIN / "taxonomist"), "train"], project, env=ENV)
    reference = outputs(project)
    assert not (project / ".taxonomist").exists()  # a finished stage leaves no resume state
    shutil.rmtree(project / "models")
    (project / HISTORY_FILE).unlink()

    # The same training under `dvc repro`: SIGTERM after 2 epochs, resumed, SIGKILL 2 epochs later.
    repro = [str(BIN / "dvc"), "repro", "train"]
    log = project.parent / f"{project.name}-sigterm.log"
    termed = stop_after(start(repro, project, log), project, 2, signal.SIGTERM)
    assert f"error: training stopped by SIGTERM after {termed} completed epoch(s)" in log.read_text()
    state = json.loads((project / RESUME_DIR / "state.json").read_text())
    assert termed >= 2 and (project / RESUME_DIR / "checkpoints/best.ckpt").is_file()
    killed = stop_after(
        start(repro, project, project.parent / f"{project.name}-sigkill.log"), project, termed + 2, signal.SIGKILL
    )
    assert killed < EPOCHS, "nothing left to resume"
    assert json.loads((project / RESUME_DIR / "state.json").read_text())["run_id"] == state["run_id"]

    run_cmd([str(BIN / "dvc"), "repro", "train"], project, env=ENV)
    log = (project / "logs/taxonomist.log").read_text()
    assert f"resuming from epoch {termed} of run {state['run_id']}" in log
    assert f"resuming from epoch {killed} of run {state['run_id']}" in log
    assert not (project / ".taxonomist").exists()

    resumed = outputs(project)
    assert resumed["run_id"] == state["run_id"] != reference["run_id"]
    assert resumed["history"] == reference["history"]  # every epoch, the same numbers to the last digit
    assert len(resumed["history"].splitlines()) == EPOCHS + 1
    assert resumed["epoch"] == reference["epoch"]
    for part in ("weights", "current"):
        assert resumed[part].keys() == reference[part].keys()
        for key, tensor in reference[part].items():
            assert torch.equal(resumed[part][key], tensor), f"{part}: {key}"

    # One MLflow run for the interrupted training, each epoch's metrics in it exactly once.
    ours, theirs = metric_histories(project, resumed["run_id"]), metric_histories(project, reference["run_id"])
    assert ours.keys() == theirs.keys() and "val/loss" in ours
    for key, points in theirs.items():
        assert [step for step, _ in points] == list(range(1, EPOCHS + 1)), key
        assert ours[key] == points, key
    import mlflow

    runs = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").search_runs(
        [json.loads((project / "models/run.json").read_text())["experiment_id"]]
    )
    assert sorted(r.info.run_id for r in runs) == sorted([reference["run_id"], resumed["run_id"]])


def test_resume_state_of_another_config_is_discarded(staged, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = staged["cfg"].copy()
    cfg.trainer.max_epochs = 1
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.artifact_location = str(tmp_path / "mlartifacts")
    stale = tmp_path / RESUME_DIR
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"run_id": "0" * 32, "fingerprint": "another", "epochs": 3}))
    (stale / "last.ckpt").write_bytes(b"not a checkpoint of this config")
    with caplog.at_level(logging.INFO, logger="taxonomist"):
        summary = train.run(cfg, processed_dir=staged["processed"], models_dir=tmp_path / "models")
    assert "resume: discarding the state of run 00000000" in caplog.text
    assert "resuming" not in caplog.text
    assert summary["run_id"] != "0" * 32 and summary["epochs"] == 1
    assert not (tmp_path / ".taxonomist").exists()


def test_random_states_come_back_including_each_augmentation_transforms() -> None:
    import random

    import numpy as np
    from omegaconf import OmegaConf

    entries = fill_size(OmegaConf.to_container(OmegaConf.load(REPO / "conf/augment/default.yaml").train), 32)
    augment = build_augment(entries, seed=7)
    assert len(augment_generators(augment)) == 5  # the Compose's and each transform's own
    image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)

    def draws() -> list:
        return [torch.rand(3), np.random.rand(3), random.random(), [augment(image=image)["image"] for _ in range(8)]]

    saved = capture_random_states(augment)
    first = draws()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    restore_random_states(torch.load(buffer, weights_only=True), augment)  # a checkpoint's round trip
    second = draws()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
    assert all(np.array_equal(a, b) for a, b in zip(first[3], second[3], strict=True))
    assert isinstance(RandomStates().state_dict(), dict)
