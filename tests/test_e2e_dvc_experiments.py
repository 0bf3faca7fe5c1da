"""End to end: a queued DVC experiment grid on the tiny project, run two at a time.

Queued experiments run in temporary clones under ``.dvc/tmp/exps/``; each must still log its
one MLflow run (tagged with the experiment's name) to the project's own ``mlflow.db``, show
its params and test metrics in ``dvc exp show``, and its training curves in ``dvc plots diff``.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import BIN, git_commit_all, make_dvc_project, make_image_folder, run_cmd

pytestmark = pytest.mark.e2e

DVC = str(BIN / "dvc")
# Not the tiny config's lr (3e-3): an experiment equal to a run DVC has seen is restored from its
# run cache (no training, so no MLflow run of its own).
GRID = {"1e-3": 1e-3, "6e-3": 6e-3}
QUEUE_TIMEOUT = 600.0
# `dvc exp show` options of the README: in the project root the columns are prefixed with their
# file (params.yaml:..., reports/metrics.json:...) because pipelines/* have the same names.
SHOW_KEY_COLUMNS = [
    "--drop", ".*",
    "--keep", r"Experiment|State|(params\.yaml:)?(model\.name|optimizer\.lr|trainer\.max_epochs)$"
    r"|(reports/metrics\.json:)?test\.(acc|f1_macro)$",
    "--sort-by", "reports/metrics.json:test.f1_macro", "--sort-order", "desc",
]  # fmt: skip


def wait_for_queue(project: Path, names: list[str]) -> dict[str, str]:
    """Wait until none of ``names`` is queued or running; their ``dvc queue status``.

    A finished experiment gets a git ref ``refs/exps/.../<name>``: that cheap check runs every
    2 s, ``dvc queue status`` (1-2 s of CPU) only every 20 s, to notice failures."""
    deadline = time.monotonic() + QUEUE_TIMEOUT
    last_status = 0.0
    while True:
        refs = run_cmd(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
        finished = {ref.rsplit("/", 1)[-1] for ref in refs} >= set(names)
        if finished or time.monotonic() - last_status > 20:
            last_status = time.monotonic()
            out = run_cmd([DVC, "queue", "status"], project).stdout
            statuses = {f[1]: f[-1] for f in map(str.split, out.splitlines()) if len(f) >= 3 and f[1] in names}
            if all(statuses.get(name) not in (None, "Queued", "Running") for name in names):
                return statuses
        assert time.monotonic() < deadline, f"experiments not done after {QUEUE_TIMEOUT} s:\n{out}"
        time.sleep(2)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with its data ingested and preprocessed, committed: the experiments'
    baseline. Nothing has trained yet, so there is no ``mlflow.db``: the parallel experiments
    create the project's store (as on a fresh clone)."""
    root = tmp_path_factory.mktemp("exp-project")
    source = make_image_folder(root.parent / f"{root.name}-images", per_class=30)
    make_dvc_project(root, source, overrides=["trainer.max_epochs=5"])
    run_cmd([DVC, "repro", "preprocess"], root)
    git_commit_all(root, "tiny pipeline, data prepared")
    assert not (root / "mlflow.db").exists()
    return root


@pytest.fixture(scope="module")
def grid(project: Path) -> dict[str, float]:
    """Queue a 2-point lr grid, run it with ``dvc queue start -j 2``; ``{experiment name: lr}``."""
    # Up to evaluate: package (ONNX export, registry) adds ~40 s per experiment and nothing here.
    queued = run_cmd([DVC, "exp", "run", "--queue", "-S", f"optimizer.lr={','.join(GRID)}", "evaluate"], project)
    text = queued.stdout + queued.stderr
    # "Queueing with overrides '{'params.yaml': ['optimizer.lr=0.001']}'." then "Queued experiment 'x' ..."
    pairs = re.findall(r"optimizer\.lr=([^'\]]+)'\]\}'\.\s+Queued experiment '([^']+)'", text)
    names = {name: float(value) for value, name in pairs}  # DVC writes 1e-3 as 0.001
    assert sorted(names.values()) == pytest.approx(sorted(GRID.values())), text
    try:
        # The workers outlive `queue start`; one whose idle monitor died (a race in the celery
        # filesystem broker, seen under load) never exits: the finally below stops them all.
        run_cmd([DVC, "queue", "start", "-j", "2"], project, log=project.parent / "queue-start.log")
        statuses = wait_for_queue(project, list(names))
        failed = [name for name, status in statuses.items() if status != "Success"]
        logs = "\n".join(
            subprocess.run([DVC, "queue", "logs", name], cwd=project, capture_output=True, text=True).stdout[-4000:]
            for name in failed
        )
        assert not failed, f"experiments {failed} ended {statuses}:\n{logs}"
    finally:  # no queue worker outlives the test, even a failed one
        subprocess.run([DVC, "queue", "stop", "--kill"], cwd=project, capture_output=True, timeout=120)
    return names


def shown_experiments(project: Path) -> dict[str, dict]:
    """``dvc exp show --json``: each named experiment's data (params, metrics)."""
    shown = json.loads(run_cmd([DVC, "exp", "show", "--json"], project).stdout)
    return {
        exp["name"]: exp["revs"][0]["data"]
        for commit in shown
        for exp in commit.get("experiments") or []
        if exp.get("name")
    }


def test_exp_show_lists_each_experiments_lr_and_test_metrics(project: Path, grid: dict[str, float]) -> None:
    shown = shown_experiments(project)
    metrics = {}
    for name, lr in grid.items():
        data = shown[name]
        assert data["params"]["params.yaml"]["data"]["optimizer"]["lr"] == pytest.approx(lr)
        metrics[name] = data["metrics"]["reports/metrics.json"]["data"]["test"]
        for key in ("acc", "f1_macro"):
            assert 0.0 <= metrics[name][key] <= 1.0, metrics
    # The README's table command: key params and test metrics, best first.
    table = run_cmd([DVC, "exp", "show", "--md", *SHOW_KEY_COLUMNS], project).stdout
    header, _, *lines = table.splitlines()
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns == [
        "Experiment", "State", "test.acc", "test.f1_macro", "model.name", "optimizer.lr", "trainer.max_epochs"
    ], table  # fmt: skip
    rows = {name: n for n, line in enumerate(lines) for name in grid if f"[{name}]" in line}
    assert set(rows) == set(grid), table
    for name, n in rows.items():
        cells = [cell.strip() for cell in lines[n].strip("|").split("|")]
        assert cells[1] == "Success" and float(cells[5]) == pytest.approx(grid[name]), table
        assert float(cells[3]) == pytest.approx(metrics[name]["f1_macro"], abs=1e-5), table
    first, second = sorted(grid, key=lambda name: rows[name])  # --sort-by test.f1_macro, best first
    assert metrics[first]["f1_macro"] >= metrics[second]["f1_macro"], table


def test_each_experiment_has_one_mlflow_run_in_the_projects_store(project: Path, grid: dict[str, float]) -> None:
    import mlflow

    shown = shown_experiments(project)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    for name, lr in grid.items():
        runs = client.search_runs(experiments, filter_string=f"tags.dvc_experiment = '{name}'")
        assert len(runs) == 1, [run.info.run_id for run in runs]
        run = runs[0]
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(lr)
        test_metrics = shown[name]["metrics"]["reports/metrics.json"]["data"]["test"]
        assert run.data.metrics["test/f1_macro"] == pytest.approx(test_metrics["f1_macro"])
        assert run.data.metrics["test/acc"] == pytest.approx(test_metrics["acc"])
        # Its artifacts are in the project's mlartifacts/, not in the deleted temporary workspace.
        artifacts = Path(urlparse(run.info.artifact_uri).path)
        assert artifacts.is_relative_to(project / "mlartifacts") and any(artifacts.rglob("*.png")), artifacts


def test_plots_diff_overlays_both_experiments_training_curves(
    project: Path, grid: dict[str, float], tmp_path: Path
) -> None:
    names = list(grid)
    # The README's command: the root dvc.yaml's plots (not the ready pipelines'), as HTML.
    run_cmd([DVC, "plots", "diff", *names, "--targets", "dvc.yaml", "-o", str(tmp_path / "html")], project)
    html = (tmp_path / "html" / "index.html").read_text()
    assert "Training curves (loss)" in html
    for name in names:
        assert f'"rev": "{name}"' in html, name
    # The curves are each experiment's own reports/train_history.csv (committed in its git ref).
    diff = [DVC, "plots", "diff", *names, "--targets", "dvc.yaml", "--json", "-o", str(tmp_path / "json")]
    (plot,) = json.loads(run_cmd(diff, project).stdout)["data"]["Training curves (loss)"]
    assert plot["revisions"] == names
    refs = run_cmd(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    for name in names:
        (ref,) = [ref for ref in refs if ref.endswith(f"/{name}")]
        history = run_cmd(["git", "show", f"{ref}:reports/train_history.csv"], project).stdout
        expected = [float(row["val/loss"]) for row in csv.DictReader(io.StringIO(history))]
        points = plot["content"]["data"]["values"]
        drawn = [float(p["dvc_inferred_y_value"]) for p in points if p["rev"] == name and p["field"] == "val/loss"]
        assert len(expected) == 5 and drawn == pytest.approx(expected), (name, drawn, expected)
