"""A shared tracking server on a real database: PostgreSQL (started by the test on loopback) is
the backend store of ``mlflow server``, which also serves the artifacts. Against it: one
pipeline (``dvc repro``), a two-trial sweep, then two pipelines of two other projects at once,
all registering the same model. Every run, metric, artifact and registered version must be
there (through the REST API, and as rows in PostgreSQL itself), and ``@champion`` must be the
end of one unbroken chain of champion-gate decisions (no two stages promoted against the same
champion).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    BIN,
    MlflowServer,
    make_dvc_project,
    make_image_folder,
    run_cmd,
    running_mlflow_server,
    running_postgres,
)

pytestmark = pytest.mark.e2e

MODEL = "taxonomist-postgres-test"
SWEEP = "postgres-search"
EPOCHS = 2


@dataclass(frozen=True)
class Shared:
    """The server, its database URL, and what was run against it."""

    server: MlflowServer
    database: str
    experiment_id: str
    pipeline_runs: tuple[str, ...]  # the first project's, then the two concurrent ones
    projects: tuple[Path, ...]

    def run(self, run_id: str) -> dict:
        return self.server.api("runs/get", run_id=run_id)["run"]


def flat(run: dict, part: str) -> dict:
    return {item["key"]: item["value"] for item in run["data"].get(part, [])}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """PostgreSQL, ``mlflow server`` on it, and the runs: ``dvc repro`` in project A, a sweep
    in A, then ``dvc repro`` in B and C at the same time (other learning rates, the same model name)."""
    root = tmp_path_factory.mktemp("postgres-tracking")
    images = make_image_folder(root / "images", per_class=20)
    with (
        running_postgres() as database,
        running_mlflow_server(root / "mlflow", backend_store_uri=database) as server,
    ):
        env = {"MLFLOW_TRACKING_URI": server.url}
        dvc = str(BIN / "dvc")
        common = [f"trainer.max_epochs={EPOCHS}", f"package.model_name={MODEL}"]
        projects = tuple(
            make_dvc_project(root / name, images, [*common, *extra])
            for name, extra in (("a", []), ("b", ["optimizer.lr=0.005"]), ("c", ["optimizer.lr=0.002"]))
        )
        run_cmd([dvc, "repro"], projects[0], env=env)
        sweep = [
            str(BIN / "taxonomist"), "sweep", "--config-name", "tiny", f"trainer.max_epochs={EPOCHS}",
            "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"sweep.name={SWEEP}",
        ]  # fmt: skip
        run_cmd(sweep, projects[0], env=env)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda project: run_cmd([dvc, "repro"], project, env=env), projects[1:]))
        records = [json.loads((p / "models/run.json").read_text()) for p in projects]
        assert {r["tracking_uri"] for r in records} == {server.url}
        assert len({r["experiment_id"] for r in records}) == 1
        yield Shared(server, database, records[0]["experiment_id"], tuple(r["run_id"] for r in records), projects)


def test_pipeline_runs_have_their_metrics_and_artifacts(shared: Shared) -> None:
    server = shared.server
    for run_id, project in zip(shared.pipeline_runs, shared.projects, strict=True):
        run = shared.run(run_id)
        assert run["info"]["status"] == "FINISHED"
        tags, metrics = flat(run, "tags"), flat(run, "metrics")
        assert tags["registered_model"] == MODEL and tags["gate_decision"] in ("promoted", "refused")
        reported = json.loads((project / "reports/metrics.json").read_text())
        for key in ("test/acc", "test/f1_macro"):
            assert metrics[key] == pytest.approx(reported["test"][key.removeprefix("test/")])
        for name in ("train/loss", "val/f1_macro"):
            history = server.api("metrics/get-history", run_id=run_id, metric_key=name)["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, EPOCHS + 1)), (name, history)
        top = {f["path"] for f in server.api("artifacts/list", run_id=run_id)["files"]}
        assert {"evaluation", "onnx", "model_card.md", "gate.json"} <= top, top
        uri = run["info"]["artifact_uri"]
        assert uri.startswith("mlflow-artifacts:")  # the server keeps them, not the project
        assert server.artifact(uri, "onnx/model.onnx") == (project / "dist/model.onnx").read_bytes()


def test_sweep_parent_and_trials(shared: Shared) -> None:
    found = shared.server.api(
        "runs/search",
        {"experiment_ids": [shared.experiment_id], "filter": f"tags.sweep = '{SWEEP}'", "max_results": 100},
    )["runs"]
    (parent,) = [r for r in found if flat(r, "tags").get("taxonomist.role") == "sweep"]
    children = [r for r in found if flat(r, "tags").get("mlflow.parentRunId") == parent["info"]["run_id"]]
    assert parent["info"]["status"] == "FINISHED" and len(children) == 2
    for child in children:
        assert child["info"]["status"] == "FINISHED"
        assert 0.0 <= flat(child, "metrics")["test/f1_macro"] <= 1.0
    best = max(children, key=lambda r: flat(r, "metrics")["sweep/objective"])
    assert flat(parent, "tags")["best_run_id"] == best["info"]["run_id"]


def test_registry_versions_and_an_unbroken_champion_chain(shared: Shared) -> None:
    server = shared.server
    versions = server.api("model-versions/search", filter=f"name='{MODEL}'")["model_versions"]
    by_run = {v["run_id"]: v for v in versions}
    assert set(by_run) == set(shared.pipeline_runs)  # one version per pipeline, none from the sweep
    assert all(v["status"] == "READY" for v in versions)
    gates = {}
    for run_id, version in by_run.items():
        record = json.loads(server.artifact(shared.run(run_id)["info"]["artifact_uri"], "gate.json"))
        assert record["candidate_version"] == version["version"]
        gates[version["version"]] = record

    # Replay the decisions in the order the lock let them through: each gate compared against
    # the champion of its moment; at most one promotion per champion (else two stages raced).
    champion, left = None, dict(gates)
    while left:
        now = [v for v, g in left.items() if g["champion_version"] == champion]
        assert now, f"no gate compared against v{champion}: {left}"
        promoted = [v for v in now if left[v]["promoted"]]
        assert len(promoted) <= 1, f"v{promoted} were all promoted over v{champion}"
        for v in now:
            del left[v]
        champion = promoted[0] if promoted else champion
    aliases = server.api("registered-models/get", name=MODEL)["registered_model"]["aliases"]
    alias = {a["alias"]: a["version"] for a in aliases}
    assert alias["champion"] == champion
    assert alias["candidate"] == max(by_run.values(), key=lambda v: int(v["version"]))["version"]


def test_everything_is_in_postgresql(shared: Shared) -> None:
    """The server kept it all in the database, not in a file beside it."""
    import psycopg

    with psycopg.connect(shared.database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (int(shared.experiment_id),))
        rows = dict(cursor.fetchall())
        cursor.execute("SELECT count(*) FROM model_versions WHERE name = %s", (MODEL,))
        (registered,) = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM latest_metrics WHERE run_uuid = %s", (shared.pipeline_runs[0],))
        (metric_count,) = cursor.fetchone()
    found = shared.server.api("runs/search", {"experiment_ids": [shared.experiment_id], "max_results": 1000})["runs"]
    assert set(rows) == {r["info"]["run_id"] for r in found}
    assert set(shared.pipeline_runs) <= set(rows) and len(rows) >= 3 + 3  # 3 pipelines, sweep parent + 2 trials
    assert set(rows.values()) == {"FINISHED"}
    assert registered == 3
    assert metric_count == len(shared.run(shared.pipeline_runs[0])["data"]["metrics"])
    assert not list((shared.server.log.parent).glob("*.db"))
