"""Where relative MLflow stores resolve: the cwd, or the real project from a DVC temp workspace."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from taxonomist.tracking.runs import artifact_location, setup, store_base_dir, tracking_uri


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root (``.dvc/``) with a ready pipeline folder and two DVC experiment clones laid
    out as DVC 3.67 makes them: ``.dvc/tmp/exps/tmpXXXX`` (queue), ``.../standalone/tmpXXXX`` (--temp)."""
    root = tmp_path / "project"
    for folder in (
        root / ".dvc" / "tmp",
        root / "pipelines" / "binary",
        root / ".dvc/tmp/exps/tmpq1/.dvc",
        root / ".dvc/tmp/exps/tmpq1/pipelines/binary",
        root / ".dvc/tmp/exps/standalone/tmpt1/.dvc",
    ):
        folder.mkdir(parents=True)
    return root.resolve()


def cfg(uri: str = "sqlite:///mlflow.db", artifacts: str = "mlartifacts"):
    return OmegaConf.create({"tracking": {"uri": uri, "artifact_location": artifacts, "experiment": "x"}})


def test_base_is_the_cwd_outside_dvc_and_in_the_workspace(project: Path) -> None:
    sub = project / "pipelines/binary"
    assert store_base_dir(sub, environ={}) == sub
    # `dvc repro` / a workspace `dvc exp run`: DVC_ROOT is the project the stage runs in.
    assert store_base_dir(project, environ={"DVC_ROOT": str(project)}) == project
    assert store_base_dir(sub, environ={"DVC_ROOT": str(project)}) == sub


@pytest.mark.parametrize(
    ("clone_cwd", "expected"),
    [
        (".dvc/tmp/exps/tmpq1", "."),
        (".dvc/tmp/exps/tmpq1/pipelines/binary", "pipelines/binary"),
        (".dvc/tmp/exps/standalone/tmpt1", "."),
    ],
)
def test_a_dvc_temp_workspace_maps_to_the_project(project: Path, clone_cwd: str, expected: str) -> None:
    base = store_base_dir(project / clone_cwd, environ={"DVC_ROOT": str(project)})
    assert base == (project / expected).resolve()


def test_a_stray_dvc_root_changes_nothing(project: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / ".dvc").mkdir(parents=True)
    clone = project / ".dvc/tmp/exps/tmpq1"
    assert store_base_dir(clone, environ={"DVC_ROOT": str(other)}) == clone
    assert store_base_dir(other, environ={"DVC_ROOT": str(project)}) == other.resolve()


def test_uris_from_a_queued_experiment_name_the_projects_store(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(project))
    clone = project / ".dvc/tmp/exps/tmpq1"
    monkeypatch.chdir(clone)
    assert tracking_uri(cfg()) == f"sqlite:///{project / 'mlflow.db'}"
    assert artifact_location(cfg()) == (project / "mlartifacts").as_uri()
    setup(cfg())
    # The store was created in the project, with the experiment, not in the clone.
    assert (project / "mlflow.db").is_file() and not list(clone.rglob("*.db"))
    assert experiments(project / "mlflow.db") == {"Default", "x"}
    # A ready pipeline's paths are relative to its own folder.
    monkeypatch.chdir(clone / "pipelines/binary")
    pipeline = cfg("sqlite:///../../mlflow.db", "../../mlartifacts")
    assert tracking_uri(pipeline) == f"sqlite:///{project / 'mlflow.db'}"
    assert artifact_location(pipeline) == (project / "mlartifacts").as_uri()
    # The environment's URI wins and is resolved the same way; absolute and remote ones are kept.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///../../team.db")
    assert tracking_uri(pipeline) == f"sqlite:///{project / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(pipeline) == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    absolute = project.parent / "elsewhere.db"
    assert tracking_uri(cfg(f"sqlite:///{absolute}")) == f"sqlite:///{absolute}"
    assert artifact_location(cfg(artifacts="s3://bucket/mlflow")) == "s3://bucket/mlflow"
    assert artifact_location(cfg(artifacts="/srv/artifacts")) == Path("/srv/artifacts").as_uri()


def test_uris_outside_dvc_resolve_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert tracking_uri(cfg()) == f"sqlite:///{here / 'mlflow.db'}"
    assert artifact_location(cfg()) == (here / "mlartifacts").as_uri()


def experiments(db: Path) -> set[str]:
    import mlflow

    return {e.name for e in mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()}


def open_store_at(barrier: Any, cwd: Path, results: Any) -> None:
    """In a forked process: wait for the others, then open the store as a stage does."""
    os.chdir(cwd)
    barrier.wait(timeout=60)
    try:
        results.put(("ok", setup(cfg())))
    except Exception as err:  # reported to the test, which fails with it
        results.put(("failed", f"{type(err).__name__}: {err}"[:500]))


def test_parallel_stages_create_one_fresh_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three processes opening a missing store at the same moment (two queued experiments on a
    fresh clone): all succeed, on one store and one experiment."""
    import mlflow  # noqa: F401 (imported before forking, so the processes start together)

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    procs = [context.Process(target=open_store_at, args=(barrier, tmp_path, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert outcomes == [("ok", outcomes[0][1])] * 3, outcomes
    assert experiments(tmp_path / "mlflow.db") == {"Default", "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]  # no store left aside


def test_setup_leaves_the_tracking_variable_to_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow exports the URI it is set to; a second store in the same process must still be used."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    setup(cfg(f"sqlite:///{first}"))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    setup(cfg(f"sqlite:///{second}"))
    assert mlflow.get_tracking_uri() == f"sqlite:///{second}" and second.is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{first}")
    setup(cfg(f"sqlite:///{second}"))
    assert mlflow.get_tracking_uri() == f"sqlite:///{first}" == os.environ["MLFLOW_TRACKING_URI"]


def test_the_experiment_opens_on_training_runs_and_a_run_records_its_data_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow 3 opens an experiment of unset kind on its GenAI overview; the Dataset column shows
    what log_input recorded: the data set's name, digest (the data hash) and source."""
    import json

    import mlflow

    from taxonomist.tracking import runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    config = OmegaConf.merge(
        cfg(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "art")),
        {"data": {"source": "builtin:digits"}},
    )
    experiment_id = setup(config)
    client = mlflow.MlflowClient()
    assert client.get_experiment(experiment_id).tags[runs.EXPERIMENT_KIND_TAG] == "custom_model_development"
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    (processed / "splits.csv").write_text("path,labels,split\na.png,0,train\nb.png,1,test\n")
    why = {"preprocess.channels": "all 2 images are grayscale"}
    report = {"settings": {"preprocess": {"channels": 1}, "auto": why}}
    (processed / "report.json").write_text(json.dumps(report))
    run_id = client.create_run(experiment_id).info.run_id
    runs.log_dataset(run_id, config, processed, "ab" * 32, report, health_dir=None)
    run = client.get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits" and dataset_input.dataset.digest == "ab" * 8
    assert str(processed.parent / "raw") in dataset_input.dataset.source  # a built-in source: the ingested copy
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert run.data.tags["auto_settings"] == "preprocess.channels = 1 (all 2 images are grayscale)"


def test_an_experiment_created_by_a_parallel_run_since_the_look_up_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs opening a new experiment at once: the one whose create loses finds the other's."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = cfg(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "art"))
    experiment_id = setup(config)
    real_lookup, looked = mlflow.MlflowClient.get_experiment_by_name, []

    def first_look_misses(self, name):
        looked.append(name)
        return None if len(looked) == 1 else real_lookup(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", first_look_misses)
    assert setup(config) == experiment_id
    assert len(looked) == 2  # the create failed on the existing name, the second look found it


def test_two_runs_logging_the_same_data_set_at_once_share_it_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of two queued experiments: run A's store looks the data set up, finds none, and
    before A inserts it run B logs the same one. A's insert then fails on the unique key for
    real; log_inputs tries again and A reuses B's row. Any other store error is not retried."""
    import sqlite3

    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking import sqlalchemy_store

    from taxonomist.tracking import runs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id = setup(cfg(f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path / "art")))
    client = mlflow.MlflowClient()
    frame = pd.DataFrame({"path": ["a.png"], "labels": ["0"]})

    def inputs(digest: str) -> list:
        dataset = mlflow.data.from_pandas(frame, source=str(tmp_path), name="photos", digest=digest)
        return [mlflow.entities.DatasetInput(dataset._to_mlflow_entity())]

    real_uuid4, other = sqlalchemy_store.uuid.uuid4, []

    def uuid4_after_the_other_run_logged():  # called between A's look-up and A's insert
        if other:
            run_id, datasets = other.pop()
            mlflow.MlflowClient().log_inputs(run_id, datasets=datasets)
        return real_uuid4()

    monkeypatch.setattr(sqlalchemy_store.uuid, "uuid4", uuid4_after_the_other_run_logged)
    a, b = (client.create_run(experiment_id).info.run_id for _ in range(2))
    other.append((b, inputs("0000aaaa")))
    with pytest.raises(MlflowException, match="UNIQUE constraint failed"):  # the race, unhandled
        client.log_inputs(a, datasets=inputs("0000aaaa"))
    a, b = (client.create_run(experiment_id).info.run_id for _ in range(2))
    other.append((b, inputs("1111bbbb")))
    runs.log_inputs(client, a, inputs("1111bbbb"))  # the same race, handled
    assert not other  # the other run did log first
    for run_id in (a, b):
        assert client.get_run(run_id).inputs.dataset_inputs[0].dataset.digest == "1111bbbb"
    with sqlite3.connect(tmp_path / "m.db") as db:  # one row for the data set, both runs point at it
        assert db.execute("SELECT COUNT(*) FROM datasets WHERE digest = '1111bbbb'").fetchone() == (1,)
        linked = db.execute(
            "SELECT COUNT(*) FROM inputs JOIN datasets ON source_id = dataset_uuid WHERE digest = '1111bbbb'"
        ).fetchone()
        assert linked == (2,)

    calls = []

    class Refusing:
        def log_inputs(self, run_id, datasets):
            calls.append(run_id)
            raise MlflowException("RESOURCE_DOES_NOT_EXIST: no run")

    with pytest.raises(MlflowException, match="no run"):
        runs.log_inputs(Refusing(), "r", inputs)
    assert calls == ["r"]


def test_redact_masks_credentials_in_uris_queries_and_secret_environment_values(monkeypatch):
    from taxonomist.tracking.redact import redact, secret_values

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-planted")
    monkeypatch.setenv("HOME_DIRECTORY", "/home/someone")  # not a secret's name: kept
    monkeypatch.setenv("GITHUB_TOKEN", "abc")  # too short to mask safely
    assert "wJalrXUtnFEMI-planted" in secret_values() and "/home/someone" not in secret_values()
    cases = {
        "postgresql://mlflow:hunter22@db:5432/mlflow": "postgresql://mlflow:***@db:5432/mlflow",
        "https://ghp_0123456789@github.com/org/data.zip": "https://***@github.com/org/data.zip",
        "s3://bucket/x.zip?X-Amz-Signature=deadbeef&X-Amz-Date=2026": "s3://bucket/x.zip?X-Amz-Signature=***&X-Amz-Date=2026",
        "https://acct.blob.core.windows.net/c/d.zip?sv=2022&sig=Zm9vYmFy": "https://acct.blob.core.windows.net/c/d.zip?sv=2022&sig=***",
        "key wJalrXUtnFEMI-planted in text": "key *** in text",
        "/data/photos and builtin:fashion-mnist and http://host:8080/x": "/data/photos and builtin:fashion-mnist and http://host:8080/x",
    }
    for raw, expected in cases.items():
        assert redact(raw) == expected, raw


def test_an_unreachable_or_refusing_tracking_server_fails_fast_in_one_line(monkeypatch):
    import http.server
    import socket
    import threading

    from taxonomist.errors import RegistryError
    from taxonomist.tracking.runs import check_server

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(RegistryError, match=rf"server http://127\.0\.0\.1:{closed} is unreachable .*tracking\.uri"):
        check_server(f"http://127.0.0.1:{closed}")
    assert time.monotonic() - started < 5

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401 if "Authorization" not in self.headers else 403)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://user:hunter22@127.0.0.1:{server.server_port}"
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "user")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
        with pytest.raises(RegistryError, match=r"refused the credentials \(HTTP 403\)") as err:
            check_server(url)
        assert "hunter22" not in str(err.value) and "wrong-password" not in str(err.value)
    finally:
        server.shutdown()
    check_server("sqlite:////nonexistent/mlflow.db")  # local stores are not probed


def test_metrics_wait_while_the_tracking_server_is_down(tmp_path, monkeypatch):
    import mlflow

    from taxonomist.tracking.runs import epoch_logger

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("down")).info.run_id
    log_row = epoch_logger(run_id)
    log_row({"epoch": 1, "val/acc": 0.5})
    real = mlflow.MlflowClient.log_batch

    def down(self, *args, **kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", down)
    log_row({"epoch": 2, "val/acc": 0.6})  # no exception: training goes on
    log_row({"epoch": 3, "val/acc": 0.7})
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", real)
    log_row({"epoch": 4, "val/acc": 0.8})
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8)]
