"""End to end: the real `dvc repro` in a temporary git repo on a tiny image set the test makes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, git_commit_all, make_dvc_project, make_image_folder, run_cmd

pytestmark = pytest.mark.e2e


# Planted secrets: a password and a token in a config URI, and a secret environment variable's
# value in the same URI's path. None may reach MLflow or the pipeline's outputs.
URI_PASSWORD, QUERY_TOKEN, ENV_SECRET = "pw-4f9c1e77ab", "tok-83d2aa19c0", "env-5b7e0c33d1"
SECRET_URL = f"https://reader:{URI_PASSWORD}@mirror.example.com/{ENV_SECRET}/fmnist?token={QUERY_TOKEN}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    source = make_image_folder(root.parent / f"{root.name}-images", per_class=30)
    make_dvc_project(root, source, overrides=[f"data.download_url='{SECRET_URL}'"])
    run_cmd([str(BIN / "dvc"), "repro"], root, env={"TAXONOMIST_MIRROR_TOKEN": ENV_SECRET})
    git_commit_all(root, "tiny pipeline")
    return root


def test_repro_writes_real_metrics(project: Path) -> None:
    metrics = json.loads((project / "reports/metrics.json").read_text())["test"]
    for key in ("acc", "precision_macro", "recall_macro", "f1_macro"):
        assert 0.0 <= metrics[key] <= 1.0
    # 3 easy classes: a trained model beats chance (1/3) clearly.
    assert metrics["acc"] > 0.45, metrics
    per_class = (project / "reports/eval/per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("class,precision,recall,f1,support") and len(per_class) == 4
    for png in ("confusion_matrix.png", "misclassified.png", "per_class.png", "training_curves.png"):
        assert (project / "reports/eval" / png).stat().st_size > 1000
    onnx = json.loads((project / "dist/package.json").read_text())
    assert onnx["onnx_verification"]["max_abs_diff"] < 1e-4


def test_no_secret_reaches_mlflow_or_the_outputs(project: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(json.loads((project / "models/run.json").read_text())["run_id"])
    assert run.data.params["data.download_url"] == "https://reader:***@mirror.example.com/***/fmnist?token=***"
    scanned = [project / "mlflow.db", project / "data/raw/ingest.json", project / "models/run.json"]
    for folder in ("mlartifacts", "dist", "reports", "data/processed"):
        scanned += [p for p in (project / folder).rglob("*") if p.is_file()]
    assert len(scanned) > 40 and any("model_card" in p.name for p in scanned)
    for path in scanned:
        data = path.read_bytes()
        for secret in (URI_PASSWORD, QUERY_TOKEN, ENV_SECRET):
            assert secret.encode() not in data, f"{secret} in {path}"


def test_mlflow_run_and_registry(project: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_id = json.loads((project / "models/run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    metrics = json.loads((project / "reports/metrics.json").read_text())["test"]
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["acc"])
    assert run.data.params["model.name"] == "test_resnet"
    assert run.data.tags["data_hash"] and run.data.tags["git_commit"] != ""
    history = client.get_metric_history(run_id, "val/f1_macro")
    assert len(history) == 8
    version = client.get_model_version_by_alias("taxonomist-test", "champion")
    assert version.run_id == run_id
    assert float(version.tags["test_f1_macro"]) == pytest.approx(metrics["f1_macro"])
    model = mlflow.pyfunc.load_model("models:/taxonomist-test@champion")
    import pandas as pd

    files = sorted((project.parent / f"{project.name}-images").rglob("*.png"))[:4]
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert len(out) == 4 and set(out["label"]) <= {"circle", "square", "triangle"}


def test_inspect_notebook_runs_on_the_pipeline_outputs(project: Path) -> None:
    """notebooks/inspect_champion.ipynb executes top to bottom against this run's outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks/inspect_champion.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project)}}).execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    assert "model taxonomist-test" in text and "candidate, champion" in text
    assert "classified right" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # the confusion matrix and the prediction grid


def test_noop_and_evaluate_only_change(project: Path) -> None:
    status = run_cmd([str(BIN / "dvc"), "repro"], project)
    assert "Running stage" not in status.stdout
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["misclassified_examples"] = 12
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ckpt_mtime = (project / "models/best.ckpt").stat().st_mtime
    out = run_cmd([str(BIN / "dvc"), "repro"], project).stdout
    assert "Running stage 'evaluate'" in out
    assert "Running stage 'train'" not in out
    assert (project / "models/best.ckpt").stat().st_mtime == ckpt_mtime


def test_dvc_exp_run_with_hydra_override(project: Path) -> None:
    run_cmd([str(BIN / "dvc"), "exp", "run", "-n", "effnet", "-S", "model.name=test_efficientnet"], project)
    shown = json.loads(run_cmd([str(BIN / "dvc"), "exp", "show", "--json"], project).stdout)
    experiments = [exp for commit in shown for exp in commit.get("experiments") or []]
    (effnet,) = [e for e in experiments if e.get("name") == "effnet"]
    data = effnet["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["model"]["name"] == "test_efficientnet"
    test_metrics = data["metrics"]["reports/metrics.json"]["data"]["test"]
    assert 0.0 <= test_metrics["f1_macro"] <= 1.0

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    found = mlflow.search_runs(filter_string="tags.dvc_experiment = 'effnet'", search_all_experiments=True)
    assert len(found) == 1, found
    assert found.iloc[0]["params.model.name"] == "test_efficientnet"
    assert found.iloc[0]["metrics.test/f1_macro"] == pytest.approx(test_metrics["f1_macro"])


def test_dvc_exp_run_rejects_unknown_key(project: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [str(BIN / "dvc"), "exp", "run", "-S", "model.nmae=resnet18"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "model.nmae" in proc.stdout + proc.stderr
