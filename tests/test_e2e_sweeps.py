"""End to end: `taxonomist sweep` (the Hydra entry point) on a tiny image set: a grid, its rerun,
an Optuna search interrupted and resumed, parallel trials, and a bad sweep stopped before training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
from conftest import BIN, REPO, make_image_folder, run_cmd, tiny_overrides

pytestmark = pytest.mark.e2e

TINY = ["trainer.max_epochs=2"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with this repo's conf/ and dvc.yaml and a tiny image set; no git, no DVC."""
    root = tmp_path_factory.mktemp("sweeps")
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    make_image_folder(root / "shapes", per_class=14)
    return root


def sweep_args(project: Path, *overrides: str) -> list[str]:
    return [str(BIN / "taxonomist"), "sweep", *tiny_overrides(project / "shapes"), *TINY, *overrides]


def client(project: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def sweep_runs(project: Path, name: str) -> tuple:
    """(parent run, child runs) of sweep ``name``."""
    c = client(project)
    experiment = c.get_experiment_by_name("taxonomist")
    (parent,) = c.search_runs([experiment.experiment_id], f"tags.`taxonomist.role` = 'sweep' AND tags.sweep = '{name}'")
    children = c.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


@pytest.fixture(scope="module")
def grid(project: Path) -> subprocess.CompletedProcess:
    return run_cmd(sweep_args(project, "optimizer.lr=1e-3,3e-3", "sweep.name=lr-grid"), project)


def test_grid_makes_one_parent_run_with_a_child_per_trial(project: Path, grid) -> None:
    parent, children = sweep_runs(project, "lr-grid")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "lr-grid"
    assert sorted(r.info.run_name for r in children) == [
        "lr-grid-000: optimizer.lr=0.001",
        "lr-grid-001: optimizer.lr=0.003",
    ]
    assert {r.data.params["optimizer.lr"] for r in children} == {"0.001", "0.003"}
    objectives = {r.data.params["optimizer.lr"]: r.data.metrics["sweep/objective"] for r in children}
    best_lr = max(objectives, key=objectives.get)
    # the parent holds the definition, the best trial's params and metric, and the summary
    assert parent.data.params["sweep.objective"] == "val/f1_macro"
    assert "optimizer.lr=1e-3,3e-3" in parent.data.params["sweep.overrides"]
    assert parent.data.params["best.optimizer.lr"] == best_lr
    assert parent.data.metrics["best/val/f1_macro"] == pytest.approx(objectives[best_lr])
    best_run = next(r for r in children if r.data.params["optimizer.lr"] == best_lr)
    assert parent.data.tags["best_run_id"] == best_run.info.run_id
    assert parent.data.metrics["best/test/f1_macro"] == pytest.approx(best_run.data.metrics["test/f1_macro"])
    artifacts = {a.path for a in client(project).list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/definition.yaml", "sweep/summary.csv", "sweep/summary.md", "sweep/summary.png"}
    table = (project / "sweeps/lr-grid/summary.csv").read_text().splitlines()
    assert table[0].startswith("trial,run,optimizer.lr,val/f1_macro,test/f1_macro") and len(table) == 3


def test_trial_runs_have_epoch_curves_test_metrics_and_descriptions(project: Path, grid) -> None:
    _, children = sweep_runs(project, "lr-grid")
    c = client(project)
    for run in children:
        assert run.info.status == "FINISHED"
        for name in ("train/loss", "train/acc", "train/lr", "val/loss", "val/f1_macro"):
            assert [m.step for m in c.get_metric_history(run.info.run_id, name)] == [1, 2], name
        assert {"test/acc", "test/f1_macro", "test/precision_macro"} <= set(run.data.metrics)
        # the objective (val/f1_macro, also the checkpoint monitor) is the value of the kept epoch: the best
        best_val = max(m.value for m in c.get_metric_history(run.info.run_id, "val/f1_macro"))
        assert run.data.metrics["sweep/objective"] == pytest.approx(best_val)
        assert not any(k.startswith("lr-") or k == "epoch" for k in run.data.metrics)
        assert "taxonomist sweep" in run.data.tags["mlflow.note.content"]
        assert run.data.tags["sweep"] == "lr-grid"
        folder = project / "sweeps/lr-grid" / run.data.tags["sweep.trial"]
        assert json.loads((folder / "models/run.json").read_text())["run_id"] == run.info.run_id
        assert (folder / "models/best.ckpt").is_file() and (folder / "reports/metrics.json").is_file()
    assert len(list((project / "sweeps/.data").glob("*/processed/report.json"))) == 1  # prepared once


def test_rerunning_a_finished_sweep_trains_nothing(project: Path, grid) -> None:
    ckpts = sorted((project / "sweeps/lr-grid").glob("*/models/best.ckpt"))
    before = [p.stat().st_mtime_ns for p in ckpts]
    out = run_cmd(sweep_args(project, "optimizer.lr=1e-3,3e-3", "sweep.name=lr-grid"), project)
    assert (out.stdout + out.stderr).count("already finished") == 2
    assert [p.stat().st_mtime_ns for p in ckpts] == before
    _, children = sweep_runs(project, "lr-grid")
    assert len(children) == 2


def test_interrupted_optuna_search_resumes(project: Path) -> None:
    import optuna

    args = sweep_args(project, "hparams_search=optuna", "hydra.sweeper.n_trials=3", "sweep.name=search")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        args, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    finished: list = []
    storage = f"sqlite:///{project / 'optuna.db'}"

    def completed() -> int:
        """Trials Optuna has recorded as complete (it records one after its MLflow run finished)."""
        try:
            study = optuna.load_study(study_name="search", storage=storage)
        except (KeyError, ValueError):  # no study yet
            return 0
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    while time.monotonic() < deadline and proc.poll() is None:
        if (project / "mlflow.db").exists() and (project / "sweeps/search/sweep.json").exists():
            try:
                finished = [r for r in sweep_runs(project, "search")[1] if r.info.status == "FINISHED"]
            except ValueError:  # the parent run is not there yet
                finished = []
            if finished and (project / "optuna.db").exists() and completed():
                break
        time.sleep(0.5)
    assert proc.poll() is None and finished, "the search ended or made no trial before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # a crash: nothing gets to clean up
    proc.wait(timeout=30)

    interrupted = optuna.load_study(study_name="search", storage=storage)
    done_before = [t for t in interrupted.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 1 <= len(done_before) < 3

    out = run_cmd(args, project)
    assert f"{len(done_before)} of 3 trials finished" in out.stdout
    study = optuna.load_study(study_name="search", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert [t.params for t in complete[: len(done_before)]] == [t.params for t in done_before]
    parent, children = sweep_runs(project, "search")
    done = [r for r in children if r.info.status == "FINISHED"]
    assert len(done) == 3 and parent.info.status == "FINISHED"
    assert len({r.data.tags["sweep.trial"] for r in done}) == 3  # each trial in a folder of its own
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert parent.data.metrics["best/val/f1_macro"] == pytest.approx(max(t.value for t in complete))


def test_parallel_trials_keep_their_own_outputs_and_runs(project: Path) -> None:
    run_cmd(
        sweep_args(
            project, "optimizer.lr=2e-3,4e-3", "sweep.name=parallel", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
        ),
        project,
    )
    _, children = sweep_runs(project, "parallel")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    cores = os.cpu_count() or 1
    assert {r.data.params["fit.num_threads"] for r in children} == {str(max(1, cores // min(2, cores)))}
    for run in children:
        folder = project / "sweeps/parallel" / run.data.tags["sweep.trial"]
        assert json.loads((folder / "models/run.json").read_text())["run_id"] == run.info.run_id
        assert json.loads((folder / "reports/metrics.json").read_text())["test"]["f1_macro"] == pytest.approx(
            run.data.metrics["test/f1_macro"]
        )


def test_a_bad_sweep_value_stops_before_any_training(project: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        sweep_args(project, "optimizer.lr=1e-3,3e-3", "model.name=test_resnet,resnet_nope", "sweep.name=bad"),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "model.name=resnet_nope" in proc.stderr
    assert not (project / "sweeps/bad").exists()
