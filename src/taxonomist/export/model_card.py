"""The model card: what the model is, what it was trained on, how well it does."""

from __future__ import annotations

from typing import Any

import pandas as pd

from taxonomist.tasks import Decision, Task


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
) -> str:
    """Markdown text of the model card."""
    pre = cfg["preprocess"]
    classes = data_report["classes"]
    lines = [
        f"# Model card: {name}" + (f" (version {version})" if version else ""),
        "",
        "## Model",
        f"- Task: {task.name} image classification, {task.size_text()}",
        f"- Architecture: timm `{cfg['model']['name']}` (pretrained: {cfg['model']['pretrained']}, "
        f"initial weights: {cfg['model']['checkpoint'] or 'none'})",
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
        f"- Source: `{cfg['data']['source']}`",
        f"- Images: {data_report['images_in']} ingested, {data_report['quarantined']} quarantined, "
        f"{data_report['duplicates_dropped']} exact duplicates and {data_report['conflicting_dropped']} "
        "conflicting copies dropped",
        "- Splits: " + ", ".join(f"{k} {v}" for k, v in data_report["per_split"].items()),
        f"- Labels: {', '.join(classes)}",
        "",
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
        "## Provenance",
        f"- MLflow run: `{run_id}`",
        f"- Git commit: `{git_commit}`",
        "",
        "## Limitations",
        "- Measured only on the test split above; images unlike the training data (other "
        "domains, sizes, colours) may be classified with high confidence and still be wrong.",
        "",
    ]
    return "\n".join(lines)
