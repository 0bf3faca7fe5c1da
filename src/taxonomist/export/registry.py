"""MLflow model registry: the model's name, the champion gate's I/O, and the aliases.

The registered model is ``package.model_name``; ``auto`` names it after the data and the task
(:func:`model_name`), so data sets with other label spaces do not compete for one champion.
``candidate`` always points at the newest version; ``champion`` moves to it only when the
champion gate (:mod:`taxonomist.export.gate`) says so: the champion's MLflow model is downloaded
(not loaded with ``mlflow.pyfunc.load_model``, which would put its copy of the taxonomist package
on ``sys.path``) and both models classify the candidate's raw test images (:func:`run_gate`).

**Promotion is atomic.** MLflow's registry has no compare-and-set on aliases, so two package
stages running at once (``dvc queue start -j 2``, parallel sweeps) could both compare against
the old champion and the later (possibly worse) one would win. :func:`gate_and_promote` holds
an exclusive lock for the whole read-compare-move (the gate reads the champion, compares, and
the aliases move before anyone else reads): the second stage compares against the first's
result. The lock is a file lock (``filelock``) keyed by the tracking URI and the model name in
the machine's temporary folder, so it covers every process on one machine, DVC's queued
experiments included (they run in other folders). Processes on several machines that share
one tracking server are not covered: run their package stages one at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from taxonomist.errors import RegistryError
from taxonomist.export import gate
from taxonomist.export.serving import IMAGE_COLUMN, ImageClassifierModel
from taxonomist.tracking.runs import dataset_name

log = logging.getLogger(__name__)
CANDIDATE = "candidate"
CHAMPION = "champion"
ARTIFACTS = ("onnx", "settings")  # the pyfunc model's artifacts: model.onnx and serving.json
# The ONNX file of each precision in dist/; serving.json's "precision" names the one that ships.
ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
BATCH = 256  # images decoded and classified at once by the gate


def model_name(cfg: DictConfig) -> str:
    """The registered model's name: ``package.model_name``, or for ``auto``
    ``taxonomist-<data set>-<task>`` (e.g. ``taxonomist-fashion-mnist-multiclass``), the data set
    name lowercased with every run of characters other than ``a-z0-9`` made one ``-``."""
    configured = str(cfg.package.model_name)
    if configured != "auto":
        return configured
    data = re.sub(r"[^a-z0-9]+", "-", dataset_name(cfg).lower()).strip("-") or "data"
    return f"taxonomist-{data}-{cfg.task.name}"


def tag_name(metric: str) -> str:
    """Version tag that stores a metric (``test/f1_macro`` -> ``test_f1_macro``)."""
    return metric.replace("/", "_")


def current_champion(client: MlflowClient, name: str):
    """The version behind ``@champion``, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def served_model(artifacts: dict[str, str]) -> ImageClassifierModel:
    """The serving model built from local ``onnx`` and ``settings`` files (as MLflow would,
    without loading a logged model)."""
    model = ImageClassifierModel()
    model.load_context(SimpleNamespace(artifacts=artifacts))
    return model


def download_model(name: str, version: str, dst: Path) -> dict[str, str]:
    """Download the ``onnx`` and ``settings`` artifacts of version ``version`` of model ``name``
    (found through its ``MLmodel`` file; not the rest, such as its copy of the code) from the
    registry in force into ``dst``; return their local paths. :class:`RegistryError` when the
    version lacks them or cannot be downloaded."""
    import mlflow
    from mlflow.models import Model

    uri = f"models:/{name}/{version}"
    try:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=str(dst))
        logged = Model.load(mlmodel).flavors.get("python_function", {}).get("artifacts", {})
        missing = [key for key in ARTIFACTS if key not in logged]
        if missing:
            raise RegistryError(f"{uri} has no {' or '.join(missing)} artifact: it is not a Taxonomist model")
        return {
            key: mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri}/{logged[key]['path']}", dst_path=str(dst / key)
            )
            for key in ARTIFACTS
        }
    except (MlflowException, OSError) as err:
        raise RegistryError(f"cannot download {uri}: {err}") from err


MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


def resolve_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    """The registered model name and version a ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` URI names; :class:`RegistryError` naming what exists when
    the model, alias or version does not."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise RegistryError(f"{uri}: not a model URI; use models:/<name>@<alias> or models:/<name>/<version>")
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RegistryError(
            f"{uri}: no registered model {name!r} (registered: {', '.join(known) or 'none'}); "
            "run the package stage first"
        ) from None
    aliases = dict(registered.aliases or {})
    if alias is not None:
        if alias not in aliases:
            have = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"{uri}: {name} has no alias @{alias}; its aliases: {have}")
        return name, str(aliases[alias])
    try:
        client.get_model_version(name, version)
    except MlflowException:
        latest = max((int(v.version) for v in client.search_model_versions(f"name='{name}'")), default=0)
        raise RegistryError(f"{uri}: {name} has no version {version} (the latest is {latest or 'none'})") from None
    return name, str(version)


def local_artifacts(folder: Path) -> dict[str, str]:
    """The ``onnx`` and ``settings`` files of a local packaged model: a ``dist/`` folder
    (``model.onnx`` + ``serving.json``; the ONNX file of the precision serving.json ships, see
    :data:`ONNX_FILES`) or a saved MLflow model (an ``MLmodel`` file)."""
    settings = folder / "serving.json"
    if (folder / ONNX_FILES["fp32"]).is_file() and settings.is_file():
        precision = str(json.loads(settings.read_text()).get("precision", "fp32"))
        onnx = folder / ONNX_FILES.get(precision, ONNX_FILES["fp32"])
        if not onnx.is_file():
            raise RegistryError(f"{folder}: serving.json ships the {precision} model but {onnx.name} is missing")
        return {"onnx": str(onnx), "settings": str(settings)}
    if (folder / "MLmodel").is_file():
        from mlflow.models import Model

        logged = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {}).get("artifacts", {})
        if all(key in logged for key in ARTIFACTS):
            return {key: str(folder / logged[key]["path"]) for key in ARTIFACTS}
    raise RegistryError(
        f"{folder}: not a packaged Taxonomist model (no model.onnx + serving.json, no MLmodel with them)"
    )


def load_model(uri: str, dst: Path) -> tuple[ImageClassifierModel, dict[str, str]]:
    """The served model behind ``uri`` (a ``models:/`` URI of the registry in force, or a local
    ``dist/`` or MLflow model folder; registry artifacts are downloaded into ``dst``) and what
    identifies it: ``model`` (the URI with the alias resolved to a version, or the folder) and
    ``onnx_sha256``."""
    from taxonomist.files import sha256_file

    if uri.startswith("models:/"):
        name, version = resolve_version(MlflowClient(), uri)
        artifacts = download_model(name, version, dst)
        where = f"models:/{name}/{version}"
    else:
        folder = Path(uri).expanduser()
        if not folder.is_dir():
            raise RegistryError(
                f"--model {uri}: no such folder; give models:/<name>@<alias>, models:/<name>/<version> "
                "or a packaged model's folder (dist/)"
            )
        artifacts = local_artifacts(folder)
        where = str(folder.resolve())
    return served_model(artifacts), {"model": where, "onnx_sha256": sha256_file(artifacts["onnx"])}


def classify(model: ImageClassifierModel, images: Sequence[bytes]) -> np.ndarray:
    """The model's probabilities (its task's layout) of encoded images, in batches."""
    frames = [
        model.predict(None, pd.DataFrame({IMAGE_COLUMN: list(images[start : start + BATCH])}))
        for start in range(0, len(images), BATCH)
    ]
    return gate.probability_matrix(model.task, pd.concat(frames, ignore_index=True))


def run_gate(
    client: MlflowClient,
    name: str,
    version: str,
    candidate: ImageClassifierModel,
    images: Sequence[bytes],
    labels: Sequence[str],
    metric: str,
    settings: gate.GateSettings,
) -> dict[str, Any]:
    """The champion gate's record (see :mod:`taxonomist.export.gate`) for ``version``, the
    ``candidate`` model: both it and the current champion classify the same encoded test
    ``images`` (manifest ``labels`` cells), each with its own preprocessing and decision."""
    task = candidate.task
    target = task.encode(labels)
    scored = gate.score(task, classify(candidate, images), target, candidate.decision)
    champion = current_champion(client, name)
    if champion is None:
        return gate.first_version(task, scored, version, metric)
    with tempfile.TemporaryDirectory(prefix="taxonomist-champion-") as tmp:
        model = served_model(download_model(name, champion.version, Path(tmp)))
        if gate.label_space(model.task.to_dict()) != gate.label_space(task.to_dict()):
            return gate.other_label_space(task, scored, version, model.task, champion.version, metric)
        rival = gate.score(task, classify(model, images), target, model.decision)
    return gate.compare(task, target, scored, rival, version, champion.version, metric, settings)


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        raise RegistryError(f"the model registry refused alias @{alias} on {name} v{version}: {err}") from err


def promote(client: MlflowClient, name: str, version: str, promoted: bool) -> dict[str, object]:
    """Set ``candidate`` on ``version``, and ``champion`` too when the gate ``promoted`` it.

    A registry that refuses an alias raises :class:`~taxonomist.errors.RegistryError`."""
    _set_alias(client, name, CANDIDATE, version)
    if promoted:
        _set_alias(client, name, CHAMPION, version)
    champion = current_champion(client, name)
    return {
        "name": name,
        "version": str(version),
        "aliases": [CANDIDATE, CHAMPION] if promoted else [CANDIDATE],
        "champion_version": None if champion is None else str(champion.version),
        "promoted": promoted,
    }


def promotion_lock(name: str, tracking_uri: str) -> FileLock:
    """The machine-wide lock of ``name``'s aliases in the registry at ``tracking_uri``."""
    import mlflow

    uri = tracking_uri or mlflow.get_tracking_uri()
    key = hashlib.sha256(f"{uri}\0{name}".encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "taxonomist-locks"
    folder.mkdir(exist_ok=True)
    return FileLock(folder / f"promote-{key}.lock")


def gate_and_promote(
    client: MlflowClient, name: str, version: str, decide: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, object]]:
    """Run the champion gate (``decide``: it reads the current champion and compares) and move
    the aliases by its decision, under :func:`promotion_lock` (see the module docstring)."""
    with promotion_lock(name, client.tracking_uri):
        decided = decide()
        return decided, promote(client, name, version, bool(decided["promoted"]))
