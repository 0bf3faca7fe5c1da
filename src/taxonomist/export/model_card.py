"""The model card: what the model is, what it was trained on, how well it does."""

from __future__ import annotations

from typing import Any

import pandas as pd

from taxonomist.tasks import Decision, Task
from taxonomist.tracking.redact import redact

GATE_ROWS = 20  # per-class rows of the champion gate's table (worst first)


def render_model_card(
    *,
    name: str,
    version: str | None,
    cfg: dict[str, Any],
    data_report: dict[str, Any],
    metrics: dict[str, float],
    per_class: pd.DataFrame,
    task: Task,
    decision: dict[str, Any],
    verification: dict[str, Any],
    run_id: str,
    git_commit: str,
    gate: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
) -> str:
    """Markdown text of the model card; ``gate`` (the champion gate's record, see
    :mod:`taxonomist.export.gate`) adds a "Champion gate" section, ``quantization`` (the INT8
    record, see :mod:`taxonomist.export.quantize`) an "INT8 export" section."""
    pre = cfg["preprocess"]
    classes = data_report["classes"]
    lines = [
        f"# Model card: {name}" + (f" (version {version})" if version else ""),
        "",
        "## Model",
        f"- Task: {task.name} image classification, {task.size_text()}",
        f"- Architecture: timm `{cfg['model']['name']}` (pretrained: {cfg['model']['pretrained']}, "
        f"initial weights: {redact(cfg['model']['checkpoint'] or 'none')})",
        f"- Input: encoded image bytes; resized ({pre['resize_mode']}) to {pre['image_size']}x{pre['image_size']}, "
        f"{'grayscale' if pre['channels'] == 1 else 'RGB'}, normalised with mean {pre['mean']} and std {pre['std']}",
        f"- Output: {task.output_text}",
        *(
            ["- Test-time augmentation: logits averaged over the image and its mirror image (in the ONNX graph)"]
            if cfg.get("augment", {}).get("tta") == "hflip"
            else []
        ),
        f"- Decision: {task.decision_text(Decision.from_dict(decision))}",
        f"- Formats: ONNX (dynamic batch; max |ONNX - PyTorch| = {verification['max_abs_diff']:.2e}), MLflow pyfunc",
        "",
        "## Data",
        f"- Source: `{redact(cfg['data']['source'])}`",
        f"- Images: {data_report['images_in']} ingested, {data_report['quarantined']} quarantined, "
        f"{data_report['duplicates_dropped']} exact duplicates and {data_report['conflicting_dropped']} "
        "conflicting copies dropped",
        "- Splits: " + ", ".join(f"{k} {v}" for k, v in data_report["per_split"].items()),
        f"- Labels: {', '.join(classes)}",
        *_health_lines(data_report),
        "",
        *_auto_lines(data_report),
        "## Training",
        f"- Optimizer: `{cfg['optimizer'].get('_target_')}` lr {cfg['optimizer'].get('lr')}, "
        f"scheduler `{cfg['scheduler'].get('_target_')}`",
        f"- Epochs (max): {cfg['trainer']['max_epochs']}, batch size {cfg['fit']['batch_size']}, "
        f"precision {cfg['trainer']['precision']}, label smoothing {cfg['fit']['label_smoothing']}, "
        f"seed {cfg['seed']}",
        "",
        "## Test metrics",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()],
        "",
        f"## Per {task.unit} (test)",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {int(r['support'])} |"
            for _, r in per_class.iterrows()
        ],
        "",
        *uncertainty_section(task, Decision.from_dict(decision), metrics),
        *(gate_section(gate, task.unit) if gate else []),
        *(int8_section(quantization) if quantization else []),
        "## Provenance",
        f"- MLflow run: `{run_id}`",
        f"- Git commit: `{git_commit}`",
        "",
        "## Limitations",
        "- Measured only on the test split above; images unlike the training data (other "
        "domains, sizes, colours) may be classified with high confidence and still be wrong"
        + (" (`abstain` flags many of them, not all)." if Decision.from_dict(decision).qhat else "."),
        "",
    ]
    return "\n".join(lines)


def uncertainty_section(task: Task, decision: Decision, metrics: dict[str, float]) -> list[str]:
    """The "Calibration and prediction sets" section's lines (none for a decision without either)."""
    lines: list[str] = []
    if decision.scale:
        kinds = sorted({kind for _, kind in task.calibration_groups()})
        how = " and ".join("temperature scaling" if k == "temperature" else "Platt scaling" for k in kinds)
        temperatures = sorted(
            {round(1.0 / decision.scale[g.start], 3) for g, k in task.calibration_groups() if k == "temperature"}
        )
        shown = f" (temperature {', '.join(str(t) for t in temperatures[:6])})" if temperatures else ""
        lines.append(
            f"- Scores are calibrated with {how}{shown}, fitted on the validation split; the served "
            "probabilities are the calibrated ones"
        )
    if "ece_uncalibrated" in metrics:
        lines.append(
            f"- Expected calibration error (test, 15 bins, top answer): {metrics['ece_uncalibrated']:.4f} "
            f"uncalibrated, {metrics['ece']:.4f} served"
        )
    if decision.qhat and "conformal_coverage" in metrics:
        answered = f", {metrics['answered_acc']:.4f} accuracy on the others" if "answered_acc" in metrics else ""
        lines += [
            f"- Prediction sets (split-conformal, fitted on validation at {decision.coverage:.0%} coverage): "
            f"the served `plausible` column held the true answer for {metrics['conformal_coverage']:.2%} of the "
            f"test answers, with {metrics['conformal_set_size']:.2f} options on average",
            f"- `abstain` (a set that is not exactly one option) was set for {metrics['abstain_rate']:.2%} of the "
            f"test images{answered}",
        ]
    return ["## Calibration and prediction sets", *lines, ""] if lines else []


def gate_section(gate: dict[str, Any], unit: str) -> list[str]:
    """The "Champion gate" section's lines: decision, reason, both scores on the same images,
    the bootstrap interval, McNemar's p and the per-class F1 differences (worst first)."""
    metric, n = gate["metric"], gate["images"]
    lines = ["## Champion gate", f"- Decision: **{gate['decision']}**: {gate['reason']}"]
    if gate.get("champion_score") is None:  # no champion, or one of another label space
        return [*lines, f"- Candidate {metric} on {n} raw test images: {gate['candidate_score']:.4f}", ""]
    low, high = gate["interval"]
    mcnemar = gate["mcnemar"]
    level = f"{100 * (1 - gate['alpha']):g}%"
    rows = gate["per_class"][:GATE_ROWS]
    hidden = len(gate["per_class"]) - len(rows)
    return [
        *lines,
        f"- {metric} on the same {n} test images (each model with its own preprocessing): candidate "
        f"v{gate['candidate_version']} {gate['candidate_score']:.4f}, champion v{gate['champion_version']} "
        f"{gate['champion_score']:.4f}",
        f"- Difference {gate['difference']:+.4f}; {level} paired bootstrap interval [{low:+.4f}, {high:+.4f}] "
        f"({gate['bootstrap']['resamples']} resamples of the test images)",
        f"- McNemar exact p = {mcnemar['p']:.4g} ({mcnemar['candidate_only_correct']} images right only for the "
        f"candidate, {mcnemar['champion_only_correct']} only for the champion)",
        f"- No {unit}'s F1 may be lower than the champion's by more than {gate['class_tolerance']:g}",
        "",
        f"| {unit} | candidate F1 | champion F1 | delta | support |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {r['class']} | {r['candidate_f1']:.4f} | {r['champion_f1']:.4f} | {r['delta']:+.4f} | {r['support']} |"
            for r in rows
        ],
        *(["", f"({hidden} more rows, with smaller drops or gains)"] if hidden else []),
        "",
    ]


def int8_section(report: dict[str, Any]) -> list[str]:
    """The "INT8 export" section's lines (``quantization.json``): which precision ships and why,
    and the fp32 and INT8 models side by side on the same test images."""
    lines = ["## INT8 export", f"- Shipped: **{report['precision']}**: {report['reason']}"]
    if "fp32" not in report:  # disabled, or nothing measured
        return [*lines, ""]
    fp32, int8, worst = report["fp32"], report["int8"], report.get("worst_class")
    settings, unit, timing = report["settings"], report["unit"], report["latency"]
    how = f"{settings['method']} quantization (onnxruntime.quantization)"
    if settings["method"] == "static":
        how += f", calibrated on {report['calibration']['images']} {report['calibration']['split']} images"
    tput = f"images_per_s_batch{timing['throughput_batch']}"
    worst_text = f"{worst['delta']:+.4f} ({worst['class']})" if worst else "-"
    ms = "ms_per_image_batch1"
    threads = {0: "default threads", 1: "1 thread"}.get(timing["threads"], f"{timing['threads']} threads")
    return [
        *lines,
        f"- {how}; both models on the same {report['images']} test images; int8 ships when {report['metric']} "
        f"drops by at most {settings['tolerance']:g} and no {unit}'s F1 by more than {settings['class_tolerance']:g}",
        "",
        "| | fp32 | int8 | int8 vs fp32 |",
        "| --- | --- | --- | --- |",
        f"| {report['metric']} | {fp32['score']:.4f} | {int8['score']:.4f} | {report['delta']:+.4f} |",
        f"| worst {unit} F1 difference | | | {worst_text} |",
        f"| answers alike | | | {report['agreement']:.2%} |",
        f"| ms per image (batch 1, {threads}, median of {timing['runs']} runs) "
        f"| {fp32[ms]:.3f} | {int8[ms]:.3f} | {int8[ms] / fp32[ms]:.2f}x |",
        f"| images/s (batch {timing['throughput_batch']}) | {fp32[tput]:,.0f} | {int8[tput]:,.0f} "
        f"| {int8[tput] / fp32[tput]:.2f}x |",
        f"| file size (MB) | {fp32['size_bytes'] / 1e6:.2f} | {int8['size_bytes'] / 1e6:.2f} "
        f"| {int8['size_bytes'] / fp32['size_bytes']:.2f}x |",
        "",
    ]


def _auto_lines(data_report: dict[str, Any]) -> list[str]:
    """The "Settings chosen from the data" section: each ``auto`` value preprocess resolved, and why."""
    from taxonomist.data.auto import describe

    settings = data_report.get("settings")
    lines = describe(settings) if settings else []
    if not lines:
        return []
    return ["## Settings chosen from the data (`auto`)", *[f"- {line}" for line in lines], ""]


def _health_lines(data_report: dict[str, Any]) -> list[str]:
    """The data health report's warnings (``reports/data/health.md`` has the whole page)."""
    warnings = (data_report.get("health") or {}).get("warnings") or []
    return [f"- Data health warning: {w}" for w in warnings]
