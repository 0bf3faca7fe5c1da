"""Package: ONNX export (verified against PyTorch), model card, MLflow model, registry.

Outputs under ``dist/``: ``model.onnx`` (fp32, always), ``model.int8.onnx`` (an INT8 copy,
``package.int8``), ``quantization.json`` (both models on the test split and whether the INT8 one
ships, :mod:`taxonomist.export.quantize`), ``serving.json`` (preprocessing, label space, the tuned
decision and the precision that ships), ``model_card.md``, ``gate.json`` (the champion gate's
decision) and ``package.json`` (registry name, version, aliases, verification, the gate's
summary). The MLflow model runs the INT8 ONNX file when it is within the tolerances, else the
fp32 one; it takes raw encoded images (preprocessing inside), answers in the task's form (one
label, a set, or a path), carries a signature and an input example, and is registered as a new version
of :func:`~taxonomist.export.registry.model_name` (tagged with its task and label space) with
alias ``candidate``; ``champion`` moves to it only when the champion gate
(:mod:`taxonomist.export.gate`) promotes it: the same label space, and better than the champion
on the candidate's raw test images (``data/raw``) by ``package.champion_metric``.
"""

from __future__ import annotations

import importlib.metadata as md
import io
import logging
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import taxonomist
from taxonomist.data import auto
from taxonomist.data.cache import read_labels, read_split
from taxonomist.data.manifest import RawImages
from taxonomist.data.transforms import normalise, preprocess_settings
from taxonomist.errors import ConfigError, ModelError, StageOrderError, missing_input
from taxonomist.export import gate, quantize, registry
from taxonomist.export.model_card import render_model_card
from taxonomist.export.onnx import export_onnx, verify_onnx
from taxonomist.export.serving import IMAGE_COLUMN, ImageClassifierModel, Limits
from taxonomist.files import atomic_directory, atomic_write_json, atomic_write_text, read_json, read_text_csv
from taxonomist.models.inference import load_classifier
from taxonomist.stages.paths import (
    DECISION_FILE,
    DIST_DIR,
    METRICS_FILE,
    MODELS_DIR,
    PROCESSED_DIR,
    RAW_DIR,
    REPORTS_DIR,
)
from taxonomist.tasks import Decision, Task
from taxonomist.tracking import runs

log = logging.getLogger(__name__)
SERVING_REQUIREMENTS = ("mlflow", "onnxruntime", "pillow", "numpy", "pandas")


def example_images(processed_dir: Path, n: int = 2) -> list[bytes]:
    """PNG bytes of the first ``n`` test images: the MLflow input example (batch >= 2)."""
    images = read_split(processed_dir, "test").images[:n]
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def gate_images(processed_dir: Path, raw_dir: Path) -> tuple[list[bytes], list[str]]:
    """The encoded bytes (from the raw data) and manifest labels of the test split's images
    (``splits.csv``): what the champion gate runs both models on."""
    path = processed_dir / "splits.csv"
    if not path.is_file():
        raise missing_input(path, "preprocess")
    rows = read_text_csv(path)
    rows = rows[rows["split"] == "test"]
    with RawImages(raw_dir) as raw:
        return [raw.read(p) for p in rows["path"]], rows["labels"].tolist()


def gate_summary(decided: dict[str, Any]) -> dict[str, Any]:
    """The champion gate's decision in brief (``package.json``; ``gate.json`` has all of it)."""
    keys = ("decision", "reason", "images", "candidate_score", "champion_score", "interval")
    return {key: decided.get(key) for key in keys} | {"mcnemar_p": decided.get("mcnemar", {}).get("p")}


def gate_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The gate's numbers logged to the MLflow run (those the decision has) from :func:`gate_summary`."""
    low, high = summary["interval"] or (None, None)
    values = {
        "gate/candidate_score": summary["candidate_score"],
        "gate/champion_score": summary["champion_score"],
        "gate/diff_low": low,
        "gate/diff_high": high,
        "gate/mcnemar_p": summary["mcnemar_p"],
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def pinned_requirements() -> list[str]:
    """Serving requirements pinned to the versions installed here."""
    reqs = []
    for name in SERVING_REQUIREMENTS:
        try:
            reqs.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            reqs.append(name)
    return reqs


def build_int8(
    cfg: DictConfig,
    fp32_path: Path,
    processed_dir: Path,
    out_dir: Path,
    task: Task,
    decision: Decision,
    metric: str,
) -> dict[str, Any]:
    """``package.int8``: quantize the fp32 model into ``model.int8.onnx`` (static: calibrated on
    a seeded sample of training images), run both on the test split and decide whether the INT8
    one ships; write and return ``quantization.json``. A quantization that fails leaves fp32
    shipping, with the error as the reason (the fp32 model is verified and stays usable)."""
    settings = quantize.Int8Settings.from_dict(OmegaConf.to_container(cfg.package.int8))  # type: ignore[arg-type]
    int8_path = out_dir / registry.ONNX_FILES["int8"]
    int8_path.unlink(missing_ok=True)  # a copy from an earlier run is never measured or shipped
    if not settings.enabled:
        report = quantize.not_built(settings, "fp32 ships: package.int8.enabled is false")
    else:
        pre, seed = cfg.preprocess, int(cfg.seed)
        calibration, sampled = None, {"split": None, "images": 0}
        if settings.method == "static":
            train = read_split(processed_dir, "train")
            picked = quantize.calibration_sample(train.images, settings.calibration_images, seed)
            calibration = normalise(train.images[picked], pre.mean, pre.std)
            sampled = {"split": "train", "images": len(picked), "seed": seed}
        test = read_split(processed_dir, "test")
        try:
            quantize.quantize_onnx(fp32_path, int8_path, calibration, settings.method)
            comparison = quantize.compare(
                fp32_path,
                int8_path,
                test.images,
                np.asarray(test.labels),
                task,
                decision,
                metric,
                pre.mean,
                pre.std,
                threads=settings.threads,
                runs=settings.latency_runs,
            )
        except Exception as err:  # an op ONNX Runtime cannot quantize or run in INT8: fp32 ships
            log.warning("INT8 export failed, fp32 ships: %s: %s", type(err).__name__, err, exc_info=True)
            int8_path.unlink(missing_ok=True)
            report = quantize.not_built(settings, f"fp32 ships: INT8 quantization failed ({type(err).__name__}: {err})")
        else:
            report = quantize.record(comparison, settings, sampled)
    atomic_write_json(out_dir / quantize.REPORT_FILE, report)
    log.info("INT8 export: %s", report["reason"])
    return report


def run(
    cfg: DictConfig,
    processed_dir: Path = PROCESSED_DIR,
    models_dir: Path = MODELS_DIR,
    reports_dir: Path = REPORTS_DIR,
    metrics_file: Path = METRICS_FILE,
    out_dir: Path = DIST_DIR,
    raw_dir: Path = RAW_DIR,
) -> dict:
    """Export, verify, document, log and register the trained model; move ``@champion`` to it
    when the champion gate promotes it. ``out_dir`` is built beside the old one and swapped in
    at the end: an error, a full disk or Ctrl-C leaves the previous package as it was."""
    with atomic_directory(out_dir) as building:
        return _package(cfg, processed_dir, models_dir, reports_dir, metrics_file, building, raw_dir)


def _package(
    cfg: DictConfig,
    processed_dir: Path,
    models_dir: Path,
    reports_dir: Path,
    metrics_file: Path,
    out_dir: Path,
    raw_dir: Path,
) -> dict:
    """:func:`run`, writing into ``out_dir`` (the folder being built)."""
    cfg = auto.resolve(cfg, processed_dir)  # the settings preprocess chose (they go into serving.json)
    module = load_classifier(models_dir / "best.ckpt", tta=str(cfg.augment.tta))
    task = read_labels(processed_dir)
    for needed in (reports_dir / DECISION_FILE, metrics_file):
        if not needed.is_file():
            raise missing_input(needed, "evaluate")
    decision = read_json(reports_dir / DECISION_FILE)
    if decision.get("task") != task.name:
        raise StageOrderError(
            f"{reports_dir / DECISION_FILE} is not for task {task.name}: run the evaluate stage again"
        )
    settings = {
        **preprocess_settings(cfg),
        "tta": str(cfg.augment.tta),  # inside the ONNX graph; recorded for people reading the package
        "labels": task.to_dict(),
        "decision": decision,
        "limits": Limits.from_dict(OmegaConf.to_container(cfg.package.serving)).to_dict(),  # type: ignore[arg-type]
    }
    pre = cfg.preprocess
    test = read_split(processed_dir, "test")
    sample = torch.from_numpy(normalise(test.images[:64], pre.mean, pre.std))

    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(module.model, sample[:2], out_dir / "model.onnx", int(cfg.package.onnx_opset))
    verification = verify_onnx(module.model, onnx_path, sample)
    limit = float(cfg.package.verify_atol) + float(cfg.package.verify_rtol) * verification["max_abs_logit"]
    if verification["max_abs_diff"] > limit:
        raise ModelError(
            f"ONNX and PyTorch outputs differ by {verification['max_abs_diff']:.3g} > {limit:.3g} "
            f"(package.verify_atol={cfg.package.verify_atol} + package.verify_rtol={cfg.package.verify_rtol} "
            f"x largest logit {verification['max_abs_logit']:.3g})"
        )
    log.info(
        "ONNX verified: max |diff| %.2e at batch sizes %s", verification["max_abs_diff"], verification["batch_sizes"]
    )
    metrics = read_json(metrics_file)["test"]
    per_class = pd.read_csv(reports_dir / "per_class.csv")
    name = registry.model_name(cfg)
    metric_key = task.test_metric(str(cfg.package.champion_metric))
    short = metric_key.split("/", 1)[1] if metric_key.startswith("test/") else metric_key
    if short not in metrics:
        raise ConfigError(f"package.champion_metric={metric_key!r} is not a test metric; known: {sorted(metrics)}")
    score = float(metrics[short])

    quantization = build_int8(cfg, onnx_path, processed_dir, out_dir, task, Decision.from_dict(decision), metric_key)
    settings["precision"] = quantization["precision"]
    served_onnx = out_dir / registry.ONNX_FILES[quantization["precision"]]
    settings_path = atomic_write_json(out_dir / "serving.json", settings)
    images, labels = gate_images(processed_dir, raw_dir)
    gate_settings = gate.GateSettings(
        alpha=float(cfg.package.gate.alpha),
        bootstrap=int(cfg.package.gate.bootstrap),
        class_tolerance=float(cfg.package.gate.class_tolerance),
        seed=int(cfg.seed),
    )

    with runs.resume_run(cfg) as active:
        run_id = active.info.run_id
        examples = pd.DataFrame({IMAGE_COLUMN: example_images(processed_dir)})
        artifacts = {"onnx": str(served_onnx), "settings": str(settings_path)}
        # Run the real model on the example to infer the output schema (a loaded instance
        # holds an ONNX Runtime session, so a fresh one is logged); the gate runs it too.
        probe = registry.served_model(artifacts)
        signature = infer_signature(examples, probe.predict(None, examples))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageClassifierModel(),
            artifacts=artifacts,
            code_paths=[str(Path(taxonomist.__file__).parent)],
            signature=signature,
            input_example=examples,
            pip_requirements=pinned_requirements(),
        )
        client = mlflow.MlflowClient()
        version = mlflow.register_model(info.model_uri, name).version
        tags = {registry.tag_name(f"test/{k}"): str(v) for k, v in metrics.items()} | {
            "data_hash": active.data.tags.get("data_hash", ""),
            "git_commit": active.data.tags.get("git_commit", ""),
            "run_id": run_id,
            "task": task.name,
            "label_space": gate.label_space(task.to_dict()),
        }
        if active.data.tags.get("dvc_experiment"):
            tags["dvc_experiment"] = active.data.tags["dvc_experiment"]
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        decided, promotion = registry.gate_and_promote(
            client,
            name,
            version,
            lambda: registry.run_gate(client, name, version, probe, images, labels, metric_key, gate_settings),
        )
        if decided["promoted"]:
            log.info("%s v%s is the champion: %s", name, version, decided["reason"])
        else:
            log.warning("%s v%s stays candidate: %s", name, version, decided["reason"])
        atomic_write_json(out_dir / "gate.json", decided)
        mlflow.log_artifact(str(out_dir / "gate.json"))
        brief = gate_summary(decided)
        runs.log_metrics(gate_metrics(brief))
        mlflow.set_tags({"gate_decision": decided["decision"], "gate_reason": decided["reason"]})

        card = render_model_card(
            name=name,
            version=version,
            cfg=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
            data_report=read_json(processed_dir / "report.json"),
            metrics=metrics,
            per_class=per_class,
            task=task,
            decision=decision,
            verification=verification,
            run_id=run_id,
            git_commit=active.data.tags.get("git_commit", "unknown"),
            gate=decided,
            quantization=quantization,
        )
        atomic_write_text(out_dir / "model_card.md", card)
        mlflow.log_artifact(str(out_dir / "model_card.md"))
        mlflow.log_artifact(str(onnx_path), artifact_path="onnx")
        runs.log_metrics({"package/onnx_max_abs_diff": verification["max_abs_diff"]})
        if (out_dir / registry.ONNX_FILES["int8"]).is_file():
            mlflow.log_artifact(str(out_dir / registry.ONNX_FILES["int8"]), artifact_path="onnx")
        mlflow.log_artifact(str(out_dir / quantize.REPORT_FILE))
        runs.log_metrics(quantize.mlflow_metrics(quantization))
        mlflow.set_tags(
            {"registered_model": name, "registered_version": version, "precision": quantization["precision"]}
        )

    summary = {
        "model_uri": f"models:/{name}/{version}",
        "champion_uri": f"models:/{name}@{registry.CHAMPION}",
        "run_id": run_id,
        **promotion,
        "champion_metric": metric_key,
        "score": score,
        "gate": brief,
        "onnx_verification": verification,
        "precision": quantization["precision"],
        "int8": {key: quantization.get(key) for key in ("shipped", "reason", "delta", "agreement")},
    }
    atomic_write_json(out_dir / "package.json", summary)
    return summary
