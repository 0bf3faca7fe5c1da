"""A real MLflow tracking server: the tiny pipeline logs to it over HTTP (``dvc repro``, then
``dvc exp run -S optimizer.lr=...``); its REST API, its UI's run comparison (in headless
Chromium) and ``notebooks/compare_runs.ipynb`` must all show the two runs.

The server (``mlflow_server`` in conftest) is fresh for this module; another test module that
uses the fixture gets its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    BIN,
    REPO,
    MlflowServer,
    git_commit_all,
    group_members,
    make_dvc_project,
    make_image_folder,
    run_cmd,
)

pytestmark = pytest.mark.e2e

MODEL = "taxonomist-server-test"
EPOCHS = 3
LEARNING_RATES = ("0.003", "0.01")  # the default, then the `dvc exp run -S` one
EXPERIMENT_NAME = "lr-high"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium; scripts/setup.sh installs it
# Headless, and no background connections (the machine has no network).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class ServerPipeline:
    """The tiny project after its two pipeline runs against the server."""

    server: MlflowServer
    project: Path
    images: Path
    experiment_id: str
    run_ids: tuple[str, str]  # dvc repro's, then dvc exp run's

    def run(self, run_id: str) -> dict:
        """``runs/get`` of one run."""
        return self.server.api("runs/get", run_id=run_id)["run"]


@pytest.fixture(scope="module")
def pipeline(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> ServerPipeline:
    """Two runs of the tiny pipeline logged to the server, with different learning rates."""
    root = tmp_path_factory.mktemp("server-project")
    images = make_image_folder(root.parent / f"{root.name}-images", per_class=20)
    make_dvc_project(root, images, [f"trainer.max_epochs={EPOCHS}", f"package.model_name={MODEL}"])
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url}
    dvc = str(BIN / "dvc")
    run_cmd([dvc, "repro"], root, env=env)
    first = json.loads((root / "models/run.json").read_text())
    git_commit_all(root, "tiny pipeline")
    run_cmd([dvc, "exp", "run", "-n", EXPERIMENT_NAME, "-S", f"optimizer.lr={LEARNING_RATES[1]}"], root, env=env)
    second = json.loads((root / "models/run.json").read_text())
    assert first["tracking_uri"] == second["tracking_uri"] == mlflow_server.url
    assert first["experiment_id"] == second["experiment_id"]
    return ServerPipeline(mlflow_server, root, images, first["experiment_id"], (first["run_id"], second["run_id"]))


def test_server_runs_in_its_own_process_group(mlflow_server: MlflowServer) -> None:
    """What the fixture's teardown relies on: the server and its workers share a group of their own."""
    members = group_members(mlflow_server.pgid)
    assert mlflow_server.pgid in members and len(members) > 1, members
    assert os.getpgrp() != mlflow_server.pgid
    assert mlflow_server.api("experiments/search", {"max_results": 10})["experiments"]


def test_runs_have_names_tags_params_and_metrics(pipeline: ServerPipeline) -> None:
    server = pipeline.server
    experiment = server.api("experiments/get-by-name", experiment_name="taxonomist")["experiment"]
    assert experiment["experiment_id"] == pipeline.experiment_id
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # the server chose it, not the project
    found = server.api("runs/search", {"experiment_ids": [pipeline.experiment_id], "max_results": 100})["runs"]
    assert set(pipeline.run_ids) <= {r["info"]["run_id"] for r in found}

    runs = [pipeline.run(run_id) for run_id in pipeline.run_ids]
    for run, lr in zip(runs, LEARNING_RATES, strict=True):
        info = run["info"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert info["status"] == "FINISHED"
        assert "test_resnet" in info["run_name"] and tags["mlflow.runName"] == info["run_name"]
        assert tags["model_name"] == "test_resnet" and tags["task"] == "multiclass"
        assert re.fullmatch(r"[0-9a-f]{64}", tags["data_hash"]) and re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
        assert tags["registered_model"] == MODEL
        assert params["optimizer.lr"] == lr and params["model.name"] == "test_resnet"
        assert float(params["trainer.max_epochs"]) == EPOCHS

        # Per-epoch training curves: one point per epoch, at increasing steps.
        for prefix in ("train/", "val/"):
            names = [k for k in metrics if k.startswith(prefix)]
            assert names, f"no {prefix} metric in {sorted(metrics)}"
        for name in ("train/loss", "val/loss", "val/f1_macro"):
            history = server.api("metrics/get-history", run_id=info["run_id"], metric_key=name)["metrics"]
            steps = [m["step"] for m in history]
            assert len(history) == EPOCHS and steps == sorted(set(steps)), (name, history)
        for name in ("test/acc", "test/f1_macro", "test/precision_macro", "test/recall_macro"):
            assert 0.0 <= metrics[name] <= 1.0
        assert {"test/f1/circle", "test/f1/square", "test/f1/triangle"} <= set(metrics)

    first_tags, second_tags = ({t["key"]: t["value"] for t in run["data"]["tags"]} for run in runs)
    assert first_tags["mlflow.source.name"] == "dvc repro" and "dvc_experiment" not in first_tags
    assert second_tags["dvc_experiment"] == EXPERIMENT_NAME
    assert first_tags["data_hash"] == second_tags["data_hash"]  # same data, another learning rate
    assert first_tags["git_commit"] != second_tags["git_commit"]  # dvc exp run commits its experiment
    # The workspace holds the last run's outputs: the server has the same test metrics.
    local = json.loads((pipeline.project / "reports/metrics.json").read_text())["test"]
    second_metrics = {m["key"]: m["value"] for m in runs[1]["data"]["metrics"]}
    assert second_metrics["test/f1_macro"] == pytest.approx(local["f1_macro"])


def test_registry_has_both_versions_and_the_champion(pipeline: ServerPipeline) -> None:
    server = pipeline.server
    model = server.api("registered-models/get", name=MODEL)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model["aliases"]}
    assert set(aliases) == {"candidate", "champion"}
    versions = server.api("model-versions/search", filter=f"name='{MODEL}'")["model_versions"]
    by_run = {v["run_id"]: v for v in versions}
    assert set(by_run) == set(pipeline.run_ids)
    first, second = (by_run[run_id] for run_id in pipeline.run_ids)
    # candidate = the newest version; champion moved to it only if the champion gate (run on the
    # second run's test images, the first version's artifacts fetched through the server) promoted it.
    candidate = server.api("registered-models/alias", name=MODEL, alias="candidate")["model_version"]
    champion = server.api("registered-models/alias", name=MODEL, alias="champion")["model_version"]
    assert candidate["version"] == second["version"] == aliases["candidate"]
    gate = {t["key"]: t["value"] for t in pipeline.run(pipeline.run_ids[1])["data"]["tags"]}
    assert gate["gate_decision"] in ("promoted", "refused") and gate["gate_reason"]
    assert {t["key"]: t["value"] for t in first["tags"]}["label_space"] == {
        t["key"]: t["value"] for t in second["tags"]
    }["label_space"]
    expected = second["version"] if gate["gate_decision"] == "promoted" else first["version"]
    assert champion["version"] == expected == aliases["champion"]
    assert "champion" in champion["aliases"] and champion["status"] == "READY"

    # The champion loads through the server (its artifacts are proxied) and classifies image files.
    import mlflow
    import pandas as pd

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    finally:
        mlflow.set_tracking_uri(previous)
    files = sorted(pipeline.images.rglob("*.png"))[:3]
    out = served.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert len(out) == 3 and set(out["label"]) <= {"circle", "square", "triangle"}


def test_artifacts_are_served_by_the_server(pipeline: ServerPipeline) -> None:
    server, project = pipeline.server, pipeline.project
    run = pipeline.run(pipeline.run_ids[1])
    listed = server.api("artifacts/list", run_id=run["info"]["run_id"], path="evaluation")["files"]
    names = {Path(f["path"]).name for f in listed}
    assert {"confusion_matrix.png", "confusion_matrix.csv", "per_class.csv", "metrics.json"} <= names, names
    top = {f["path"] for f in server.api("artifacts/list", run_id=run["info"]["run_id"])["files"]}
    assert {"evaluation", "onnx", "model_card.md"} <= top, top

    uri = run["info"]["artifact_uri"]
    assert server.artifact(uri, "evaluation/confusion_matrix.png").startswith(b"\x89PNG\r\n\x1a\n")
    metrics = json.loads(server.artifact(uri, "evaluation/metrics.json"))
    assert metrics == json.loads((project / "reports/metrics.json").read_text())
    assert server.artifact(uri, "onnx/model.onnx") == (project / "dist/model.onnx").read_bytes()

    # The registered MLflow model is a logged model whose files the server serves too.
    version = server.api("model-versions/search", filter=f"name='{MODEL}'")["model_versions"]
    source = next(v["source"] for v in version if v["run_id"] == run["info"]["run_id"])
    logged = server.api(f"logged-models/{source.removeprefix('models:/')}")["model"]["info"]
    assert logged["source_run_id"] == run["info"]["run_id"]
    mlmodel = server.artifact(logged["artifact_uri"], "MLmodel").decode()
    assert "python_function" in mlmodel and "signature" in mlmodel

    # Nothing went to a local store in the project: the server keeps the artifacts.
    assert not (project / "mlartifacts").exists() and not (project / "mlruns").exists()


def test_ui_compares_the_runs(pipeline: ServerPipeline, tmp_path: Path) -> None:
    """The MLflow UI's compare-runs page, in headless Chromium, shows both runs."""
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: run scripts/setup.sh as root (apt-get install chromium)"
    runs = [pipeline.run(run_id)["info"] for run_id in pipeline.run_ids]
    # The route the UI's own "Compare" button opens (mlflow 3.17: Routes.getCompareRunPageRoute).
    url = (
        f"{pipeline.server.url}/#/compare-runs?runs={json.dumps(list(pipeline.run_ids))}"
        f"&experiments={json.dumps([pipeline.experiment_id])}"
    )
    shot = tmp_path / "mlflow_compare.png"
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            expect(page.get_by_text(f"Comparing {len(runs)} Runs from 1 Experiment")).to_be_visible(timeout=60_000)
            for info in runs:
                expect(page.get_by_text(info["run_id"], exact=True).first).to_be_visible()
                expect(page.get_by_text(info["run_name"], exact=True).first).to_be_visible()
            expect(page.locator(".js-plotly-plot").first).to_be_visible()  # the parallel-coordinates plot
            # Only the parameters that differ: the learning rate of each run, in the runs' order.
            page.get_by_role("switch", name="Parameters - Show diff only").click()
            lr_row = page.locator("tr", has_text="optimizer.lr")
            expect(lr_row).to_have_text(re.compile(r"optimizer\.lr\s*" + r"\s*".join(map(re.escape, LEARNING_RATES))))
            lr_row.scroll_into_view_if_needed()
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert not errors, errors
    assert shot.stat().st_size > 20_000
    if os.environ.get("TAXONOMIST_SCREENSHOT_DIR"):
        target = Path(os.environ["TAXONOMIST_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target / shot.name)


def run_compare_notebook(pipeline: ServerPipeline, monkeypatch: pytest.MonkeyPatch, **settings: str):
    """Execute notebooks/compare_runs.ipynb against the server with the given ``TAXONOMIST_*``
    settings (the others unset); return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.server.url)
    for name in ("TAXONOMIST_EXPERIMENT", "TAXONOMIST_PARENT_RUN", "TAXONOMIST_PARAM", "TAXONOMIST_METRIC"):
        if name in settings:
            monkeypatch.setenv(name, settings[name])
        else:
            monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(REPO / "notebooks/compare_runs.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(pipeline.project)}}
    ).execute()
    return nb


def test_compare_notebook_on_the_server_runs(pipeline: ServerPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """notebooks/compare_runs.ipynb picks the swept parameter, tables the runs and shows the
    best run's confusion matrix. The two runs are made children of a parent run first, as a
    sweep's trials are, so ``TAXONOMIST_PARENT_RUN`` is exercised (the parent itself must not
    appear)."""
    server = pipeline.server
    now = int(time.time() * 1000)
    parent = server.api(
        "runs/create", {"experiment_id": pipeline.experiment_id, "run_name": "lr-sweep-parent", "start_time": now}
    )["run"]["info"]["run_id"]
    server.api("runs/update", {"run_id": parent, "status": "FINISHED", "end_time": now})
    for run_id in pipeline.run_ids:
        server.api("runs/set-tag", {"run_id": run_id, "key": "mlflow.parentRunId", "value": parent})
    nb = run_compare_notebook(pipeline, monkeypatch, TAXONOMIST_PARENT_RUN=parent)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)

    runs = [pipeline.run(run_id) for run_id in pipeline.run_ids]
    names = [run["info"]["run_name"] for run in runs]
    f1 = [next(m["value"] for m in run["data"]["metrics"] if m["key"] == "test/f1_macro") for run in runs]
    assert f"children of run {parent}" in text
    assert "2 runs with test/f1_macro" in text
    assert "compared parameter: optimizer.lr" in text
    table = next(out["text"] for cell in nb.cells if "table.to_string" in cell.source for out in cell.outputs)
    for name, run_id in zip(names, pipeline.run_ids, strict=True):
        assert name in table and run_id in table
    assert "lr-sweep-parent" not in text
    best = names[0] if f1[0] >= f1[1] else names[1]
    assert f"evaluation/confusion_matrix.png of the best run {best}" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 2  # the metric-by-parameter plot and the confusion matrix


# --- a 2-trial Optuna sweep against the same server ------------------------------------------

SWEEP = "server-search"


@pytest.fixture(scope="module")
def sweep(pipeline: ServerPipeline) -> dict:
    """`taxonomist sweep` with a 2-trial Optuna search, logging to the server; returns the
    parent run and the child runs as the REST API gives them."""
    server = pipeline.server
    run_cmd(
        [
            str(BIN / "taxonomist"),
            "sweep",
            "--config-name",
            "tiny",
            "trainer.max_epochs=2",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            f"sweep.name={SWEEP}",
        ],
        pipeline.project,
        env={"MLFLOW_TRACKING_URI": server.url},
    )
    found = server.api(
        "runs/search",
        {"experiment_ids": [pipeline.experiment_id], "filter": f"tags.sweep = '{SWEEP}'", "max_results": 100},
    )["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"]["tags"]} for run in found]
    (parent,) = [run for run, t in zip(found, tags, strict=True) if t.get("taxonomist.role") == "sweep"]
    children = [run for run, t in zip(found, tags, strict=True) if t.get("mlflow.parentRunId")]
    return {"parent": parent, "children": children}


def _flat(run: dict, part: str) -> dict:
    return {item["key"]: item["value"] for item in run["data"].get(part, [])}


def test_sweep_parent_and_trials_through_the_rest_api(pipeline: ServerPipeline, sweep: dict) -> None:
    server, parent, children = pipeline.server, sweep["parent"], sweep["children"]
    parent_id = parent["info"]["run_id"]
    assert parent["info"]["status"] == "FINISHED" and parent["info"]["run_name"] == SWEEP
    assert len(children) == 2
    objectives = {}
    for child in children:
        tags, params, metrics = _flat(child, "tags"), _flat(child, "params"), _flat(child, "metrics")
        assert tags["mlflow.parentRunId"] == parent_id and child["info"]["status"] == "FINISHED"
        assert child["info"]["run_name"].startswith(f"{SWEEP}-00") and "optimizer.lr=" in child["info"]["run_name"]
        assert {"optimizer.lr", "optimizer.weight_decay", "fit.label_smoothing", "model.drop_rate"} <= set(params)
        for name in ("train/loss", "val/f1_macro"):
            history = server.api("metrics/get-history", run_id=child["info"]["run_id"], metric_key=name)["metrics"]
            assert sorted(m["step"] for m in history) == [1, 2], (name, history)
        assert 0.0 <= metrics["test/f1_macro"] <= 1.0
        objectives[child["info"]["run_id"]] = (metrics["sweep/objective"], float(params["optimizer.lr"]))
    best_id = max(objectives, key=lambda run_id: objectives[run_id][0])
    p_tags, p_params, p_metrics = _flat(parent, "tags"), _flat(parent, "params"), _flat(parent, "metrics")
    assert p_tags["best_run_id"] == best_id
    assert p_metrics["best/val/f1_macro"] == pytest.approx(objectives[best_id][0])
    assert float(p_params["best.optimizer.lr"]) == pytest.approx(objectives[best_id][1])
    assert "hparams_search=optuna" in p_params["sweep.overrides"]
    listed = server.api("artifacts/list", run_id=parent_id, path="sweep")["files"]
    assert {f["path"] for f in listed} == {
        f"sweep/{n}" for n in ("definition.yaml", "summary.csv", "summary.md", "summary.png")
    }
    definition = server.artifact(parent["info"]["artifact_uri"], "sweep/definition.yaml").decode()
    assert "optimizer.lr: tag(log, interval(3e-4, 1e-2))" in definition.replace("'", "")
    # the Optuna study is beside the project, as the store is remote
    assert (pipeline.project / "optuna.db").is_file()


def test_compare_notebook_on_the_sweep(pipeline: ServerPipeline, sweep: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook over the sweep's trials: the metric against optimizer.lr, the best trial's confusion matrix."""
    parent_id = sweep["parent"]["info"]["run_id"]
    nb = run_compare_notebook(pipeline, monkeypatch, TAXONOMIST_PARENT_RUN=parent_id, TAXONOMIST_PARAM="optimizer.lr")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    assert f"children of run {parent_id}" in text and "2 runs with test/f1_macro" in text
    for child in sweep["children"]:
        assert child["info"]["run_name"] in text
    assert len([out for out in outputs if "image/png" in out.get("data", {})]) == 2
