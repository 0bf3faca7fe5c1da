"""One MLflow run per pipeline execution, shared by the train, evaluate and package stages.

Train opens the run and records its id in ``models/run.json``; evaluate and package reopen
it from there. The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else ``tracking.uri``
(default: an SQLite file at the project root); artifacts go to ``tracking.artifact_location``.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from taxonomist.config import flatten
from taxonomist.errors import RegistryError, missing_input
from taxonomist.files import atomic_write_json, read_json
from taxonomist.stages.paths import MODELS_DIR
from taxonomist.tracking.redact import redact, redact_all

log = logging.getLogger(__name__)

RUN_FILE = MODELS_DIR / "run.json"
MAX_PARAM_LENGTH = 6000
# MLflow 3 opens an experiment whose kind is unset on its GenAI overview; ours hold training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DIGEST_LENGTH = 16  # MLflow keeps at most 36 characters of a dataset digest


def store_base_dir(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The folder relative tracking paths (``sqlite:///mlflow.db``, ``mlartifacts``) resolve against.

    It is the current directory (``cwd``), except in a DVC experiment's temporary workspace.
    ``dvc exp run --queue`` (then ``dvc queue start``) and ``dvc exp run --temp`` run the stages
    in a throw-away clone of the project, ``<project>/.dvc/tmp/exps/tmpXXXX/`` (``--temp``:
    ``.../exps/standalone/tmpXXXX/``), with ``DVC_ROOT`` set to the real project root (measured
    with DVC 3.67; a workspace ``dvc repro`` / ``dvc exp run`` sets ``DVC_ROOT`` to the project
    root it runs in). A store resolved there would be deleted with the clone, so the cwd is
    mapped to the same folder of the real project: the clone's root is the nearest folder above
    the cwd that holds ``.dvc/``, and ``<clone>/pipelines/binary`` becomes
    ``$DVC_ROOT/pipelines/binary``, where a ready pipeline's ``sqlite:///../../mlflow.db`` still
    names the project's store. Only a clone inside ``$DVC_ROOT/.dvc/tmp/`` is mapped, so a stray
    ``DVC_ROOT`` (another project's) changes nothing.
    """
    here = (cwd or Path.cwd()).resolve()
    dvc_root = (os.environ if environ is None else environ).get("DVC_ROOT")
    if not dvc_root:
        return here
    project = Path(dvc_root).resolve()
    clone = next((folder for folder in (here, *here.parents) if (folder / ".dvc").is_dir()), None)
    if clone is None or clone == project or (project / ".dvc" / "tmp") not in clone.parents:
        return here
    return project / here.relative_to(clone)


def create_sqlite_store(db: Path, cfg: DictConfig) -> None:
    """Create a new MLflow SQLite store at ``db``, holding the config's experiment, atomically.

    Two stages opening a missing store at once (``dvc queue start -j 2`` on a fresh clone) both
    run MLflow's schema migrations on it and fail (measured with MLflow 3.17: "Online migration
    expected to match one row ..."). So the store is built aside and hard-linked into place: the
    file only ever appears complete, the first process wins, the others use its store.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    aside = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        store = SqlAlchemyStore(f"sqlite:///{aside}", artifact_location(cfg))
        store.create_experiment(str(cfg.tracking.experiment), artifact_location=artifact_location(cfg))
        store.engine.dispose()
        os.link(aside, db)
    except FileExistsError:
        pass  # another process created it meanwhile
    except OSError:
        pass  # no hard links on this file system: MLflow creates the store on first use, as before
    finally:
        aside.unlink(missing_ok=True)


def tracking_uri(cfg: DictConfig) -> str:
    """The tracking URI in force: the environment's, else the config's. A relative SQLite path
    is made absolute against :func:`store_base_dir` (the project, also from a DVC temp workspace)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or str(cfg.tracking.uri)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((store_base_dir() / uri[len(prefix) :]).resolve())
    return uri


def artifact_location(cfg: DictConfig) -> str:
    """Where new experiments keep artifacts: a URI, or a local path made absolute against
    :func:`store_base_dir` (the project, also from a DVC temp workspace)."""
    loc = str(cfg.tracking.artifact_location)
    if "://" in loc:
        return loc
    return (store_base_dir() / loc).resolve().as_uri()


def use_store(uri: str) -> None:
    """``mlflow.set_tracking_uri(uri)``, leaving ``MLFLOW_TRACKING_URI`` as the user set it.

    MLflow exports the URI it is given as ``MLFLOW_TRACKING_URI``, which :func:`tracking_uri`
    reads as the user's choice: a later store in this process (another project's) would then
    be ignored for this one."""
    import mlflow

    users = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if users is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users


PROBE_TIMEOUT = 5.0  # seconds: a tracking server that does not answer by then is unreachable


def check_server(uri: str, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail fast, in one line naming the URI, when an ``http(s)`` tracking server is down or
    refuses the credentials (``MLFLOW_TRACKING_TOKEN``, or ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``), before any work starts; MLflow's own client would retry for
    minutes. Other URIs (local stores) are not probed."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    shown = redact(uri)
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    parts = urllib.parse.urlsplit(uri)
    if parts.username is not None and "Authorization" not in headers:  # credentials in the URI itself
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    netloc = parts.netloc.rpartition("@")[2]
    query = urllib.parse.urlencode({"max_results": 1})
    probe = urllib.parse.urlunsplit(
        (parts.scheme, netloc, f"{parts.path.rstrip('/')}/api/2.0/mlflow/experiments/search", query, "")
    )
    try:
        with urllib.request.urlopen(urllib.request.Request(probe, headers=headers), timeout=timeout):
            return
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise RegistryError(
                f"the MLflow tracking server {shown} refused the credentials (HTTP {err.code}): check "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
            ) from None
        if err.code >= 500 or err.code == 404:
            raise RegistryError(
                f"the MLflow tracking server {shown} answered HTTP {err.code}: is it an MLflow server? "
                "(tracking.uri or MLFLOW_TRACKING_URI)"
            ) from None
    except (urllib.error.URLError, OSError) as err:
        why = getattr(err, "reason", err)
        raise RegistryError(
            f"the MLflow tracking server {shown} is unreachable ({why}): start it, or point tracking.uri "
            "(or MLFLOW_TRACKING_URI) at a running one"
        ) from None


def setup(cfg: DictConfig) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id. A local
    SQLite store that does not exist yet is created first (:func:`create_sqlite_store`), so
    parallel stages never race to create it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(cfg)
    prefix = "sqlite:///"
    if uri.startswith(prefix) and "?" not in uri:
        db = Path(uri[len(prefix) :])
        if not db.exists() and db.parent.is_dir():
            create_sqlite_store(db, cfg)
    check_server(uri)
    use_store(uri)
    name = str(cfg.tracking.experiment)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A tracking server decides where artifacts go (it proxies them); a local store uses ours.
        remote = uri.startswith(("http://", "https://"))
        try:
            return client.create_experiment(
                name,
                artifact_location=None if remote else artifact_location(cfg),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:  # a parallel run created it since the look-up: use that one
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # an experiment made before, or by create_sqlite_store
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def git_commit() -> str:
    """The current git commit, or "unknown" outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_name(cfg: DictConfig) -> str:
    """A short name of the data source: ``fashion-mnist``, or a folder's or file's name."""
    return str(cfg.data.source).replace("builtin:", "").rstrip("/").split("/")[-1]


def run_name(cfg: DictConfig) -> str:
    """A readable run name: ``<dvc experiment>: model on data`` or ``model-data-time``."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    if exp_name:
        return f"{exp_name}: {cfg.model.name} on {dataset_name(cfg)}"
    return f"{cfg.model.name}-{dataset_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"


def describe(cfg: DictConfig, launched_by: str) -> str:
    """The run's description (Markdown, shown in the MLflow UI): what was trained, on what, how."""
    opt = cfg.optimizer
    lines = [
        f"**{cfg.task.name}** classifier `{cfg.model.name}`"
        + (" (pretrained)" if cfg.model.pretrained or cfg.model.checkpoint else "")
        + f" on `{cfg.data.source}`",
        f"- {cfg.preprocess.image_size} px, {cfg.preprocess.channels} channel(s); "
        f"{cfg.trainer.max_epochs} epochs max, batch {cfg.fit.batch_size}, "
        f"{str(opt.get('_target_', '?')).split('.')[-1]} lr {opt.get('lr', '?')}, "
        f"weight decay {opt.get('weight_decay', 0)}",
        f"- launched by {launched_by}; git commit `{git_commit()[:12]}`",
    ]
    return "\n".join(lines)


@dataclass
class RunSpec:
    """How a pipeline run is named and placed: a sweep trial gives its own name, parent and tags."""

    name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    launched_by: str = "dvc repro"
    record: bool = True  # write models/run.json (the pipeline's run); cross-validation folds do not


def start_pipeline_run(cfg: DictConfig, tags: dict[str, str], spec: RunSpec | None = None) -> str:
    """Create the run for this pipeline execution, log the config, write ``models/run.json``
    (unless ``spec.record`` is false)."""
    import mlflow
    from mlflow.entities import Param

    spec = spec or RunSpec()
    experiment_id = setup(cfg)
    client = mlflow.MlflowClient()
    launched_by = spec.launched_by
    exp_name = os.environ.get("DVC_EXP_NAME")
    all_tags = {
        "git_commit": git_commit(),
        "task": str(cfg.task.name),
        "model_name": str(cfg.model.name),
        "dataset": dataset_name(cfg),
        **tags,
        **spec.tags,
    }
    if exp_name:
        all_tags["dvc_experiment"] = exp_name
        launched_by = f"`dvc exp run` (experiment `{exp_name}`)"
    if spec.parent_run_id:
        all_tags["mlflow.parentRunId"] = spec.parent_run_id
    all_tags["mlflow.source.name"] = launched_by.replace("`", "")
    all_tags["mlflow.note.content"] = describe(cfg, launched_by)
    # Nothing from the config reaches the (shared) tracking store with its credentials.
    run = client.create_run(experiment_id, run_name=redact(spec.name or run_name(cfg)), tags=redact_all(all_tags))
    params = {k: v[:MAX_PARAM_LENGTH] for k, v in redact_all(flatten(cfg)).items()}
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    if spec.record:
        write_run_file(cfg, run.info.run_id, experiment_id)
    return run.info.run_id


def write_run_file(cfg: DictConfig, run_id: str, experiment_id: str) -> None:
    """Record the pipeline run in ``models/run.json`` (evaluate and package reopen it from there)."""
    atomic_write_json(RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": tracking_uri(cfg)})


def reopen_pipeline_run(cfg: DictConfig, run_id: str) -> bool:
    """Continue ``run_id`` (resumed training): if it is still in the configured store and not
    deleted, record it in ``models/run.json`` again and return True; False when it is gone."""
    import mlflow
    from mlflow.exceptions import MlflowException

    setup(cfg)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    if run.info.lifecycle_stage == "deleted":
        return False
    write_run_file(cfg, run_id, run.info.experiment_id)
    return True


# The store's words for a row another writer inserted first (SQLite, PostgreSQL, MySQL).
_DUPLICATE_ROW = re.compile(r"UNIQUE constraint failed|duplicate key value|Duplicate entry|IntegrityError")
LOG_INPUTS_ATTEMPTS = 3


def log_inputs(client: Any, run_id: str, datasets: list[Any], attempts: int = LOG_INPUTS_ATTEMPTS) -> None:
    """``client.log_inputs``, tried again when another run inserted the same data set first.

    MLflow's SQL store looks a data set (experiment, name, digest) up and inserts it when absent,
    in one transaction but without a lock: two runs of the same data starting together (``dvc
    queue start -j 2``, a sweep's parallel trials) can both miss it, and the second insert then
    fails on the unique key. The failed transaction was rolled back, so trying again is safe, and
    the second try finds the row the other run wrote and reuses it.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as error:
            if attempt == attempts or not _DUPLICATE_ROW.search(str(error)):
                raise
            log.debug("data set logged by a concurrent run first; trying again (%s)", error)
            time.sleep(0.05 * attempt)


def log_dataset(
    run_id: str, cfg: DictConfig, processed_dir: Path, digest: str, report: dict[str, Any], health_dir: Path | None
) -> None:
    """Record the run's data set with ``mlflow.log_input`` (the UI's Dataset column): its name,
    the data hash as digest, the source (``data.source``, or the ingested copy for a built-in
    source), the split table as its rows; plus the preprocess report, the chosen ``auto``
    settings (tag ``auto_settings``) and the data health report (``health_dir``) as artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from taxonomist.data.auto import describe
    from taxonomist.files import read_text_csv

    frame = read_text_csv(processed_dir / "splits.csv")
    name = dataset_name(cfg)
    try:
        source = redact(cfg.data.source)
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:DIGEST_LENGTH])
    except MlflowException:  # a built-in source has no URI MLflow knows: point at the ingested copy
        raw = str((processed_dir.parent / "raw").resolve())
        dataset = mlflow.data.from_pandas(frame, source=raw, name=name, digest=digest[:DIGEST_LENGTH])
    client = mlflow.MlflowClient()
    context = mlflow.entities.InputTag(key="mlflow.data.context", value="training")
    log_inputs(client, run_id, [mlflow.entities.DatasetInput(dataset._to_mlflow_entity(), tags=[context])])
    lines = describe(report.get("settings", {"preprocess": {}}))
    if lines:
        client.set_tag(run_id, "auto_settings", redact("; ".join(lines))[:MAX_PARAM_LENGTH])
    client.log_artifact(run_id, str(processed_dir / "report.json"), artifact_path="data")
    if health_dir is not None and health_dir.is_dir():
        client.log_artifacts(run_id, str(health_dir), artifact_path="data/health")


def last_logged_epoch(run_id: str, key: str = "train/lr") -> int:
    """The last epoch whose history row reached ``run_id`` (the highest step of ``key``, a
    metric every row has; 0 when none did)."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, metric_name(key))
    return max((int(m.step) for m in history), default=0)


def epoch_logger(run_id: str, after: int = 0):
    """A callback that logs one history row to ``run_id`` with the epoch as the step; rows of
    epochs up to ``after`` are already in the run (a resumed run) and are not logged again.

    A tracking server that stops answering mid-run does not stop training: the failure is one
    warning, the rows wait and go with the next epoch's (the history CSV has them all anyway)."""
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    pending: list[Metric] = []

    def log_row(row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        if epoch <= after:
            return
        now = int(time.time() * 1000)
        pending.extend(Metric(metric_name(k), float(v), now, epoch) for k, v in row.items() if k != "epoch")
        try:
            while pending:
                client.log_batch(run_id, metrics=pending[:1000])
                del pending[:1000]
        except Exception as err:  # connection errors, HTTP errors, MlflowException: training goes on
            log.warning(
                "epoch %d: MLflow did not take the metrics (%s); training goes on, they are retried next epoch "
                "and are in the history CSV",
                epoch,
                redact(str(err).splitlines()[0] if str(err) else type(err).__name__),
            )

    return log_row


def read_run_id(path: Path = RUN_FILE) -> str:
    """The run id train recorded."""
    if not path.is_file():
        raise missing_input(path, "train")
    return str(read_json(path)["run_id"])


@contextmanager
def resume_run(cfg: DictConfig, run_id: str | None = None) -> Iterator[Any]:
    """Reopen the pipeline run (from ``models/run.json`` by default) as the active run."""
    import mlflow

    setup(cfg)
    with mlflow.start_run(run_id=run_id or read_run_id()) as run:
        yield run


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . / :`` and spaces); others become ``_``."""
    return re.sub(r"[^\w\-./: ]", "_", name)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run (names may contain ``/``)."""
    import mlflow

    mlflow.log_metrics({metric_name(k): float(v) for k, v in metrics.items()}, step=step)


def log_run_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics to ``run_id`` (not the active run), in batches."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items()]
    client = mlflow.MlflowClient()
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000])
