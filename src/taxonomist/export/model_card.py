"""The model card: what the model is, what it was trained on, how well it does."""

from __future__ import annotations

from typing import Any

import pandas as pd

OUTPUTS = {
    "binary": "`label` (one of the two classes), `score`, and `prob_<class>` for both classes",
    "multiclass": "`label`, `score` and one `prob_<class>` column per class",
    "multilabel": "`labels` (the list of labels whose probability reaches their threshold) and one "
    "`prob_<label>` column per label",
    "hierarchical": "`label` (the deepest predicted node), `path` (e.g. `A > B > C`), `score`, and "
    "one `prob_<node>` column per node of the tree",
}


def _task_size(space: dict[str, Any]) -> str:
    if space["task"] == "hierarchical":
        return f"{len(space['nodes'])} nodes in the label tree, {len(space['classes'])} leaves"
    noun = "labels" if space["task"] == "multilabel" else "classes"
    return f"{len(space['classes'])} {noun}"


def _decision_text(task: str, space: dict[str, Any], decision: dict[str, Any]) -> str:
    thresholds = decision.get("thresholds", [])
    if task == "binary":
        return f"`{space['classes'][1]}` when its probability >= {thresholds[0]:.4f} (tuned on the validation split)"
    if task == "multilabel":
        return f"per-label thresholds tuned on the validation split ({min(thresholds):.3f} to {max(thresholds):.3f})"
    if task == "hierarchical":
        return (
            "the path descends to the most probable child while its probability >= "
            f"{thresholds[0] if thresholds else 0.0:g}; a node's probability is the sum over its leaves"
        )
    return "the most probable class"


def render_model_card(
    *,
    name: str,
    version: str | None,
    cfg: dict[str, Any],
    data_report: dict[str, Any],
    metrics: dict[str, float],
    per_class: pd.DataFrame,
    space: dict[str, Any],
    decision: dict[str, Any],
    verification: dict[str, Any],
    run_id: str,
    git_commit: str,
) -> str:
    """Markdown text of the model card."""
    pre = cfg["preprocess"]
    classes = data_report["classes"]
    task = space["task"]
    lines = [
        f"# Model card: {name}" + (f" (version {version})" if version else ""),
        "",
        "## Model",
        f"- Task: {task} image classification, {_task_size(space)}",
        f"- Architecture: timm `{cfg['model']['name']}` (pretrained: {cfg['model']['pretrained']}, "
        f"initial weights: {cfg['model']['checkpoint'] or 'none'})",
        f"- Input: encoded image bytes; resized ({pre['resize_mode']}) to {pre['image_size']}x{pre['image_size']}, "
        f"{'grayscale' if pre['channels'] == 1 else 'RGB'}, normalised with mean {pre['mean']} and std {pre['std']}",
        f"- Output: {OUTPUTS[task]}",
        *(
            ["- Test-time augmentation: logits averaged over the image and its mirror image (in the ONNX graph)"]
            if cfg.get("augment", {}).get("tta") == "hflip"
            else []
        ),
        f"- Decision: {_decision_text(task, space, decision)}",
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
        f"- Epochs (max): {cfg['trainer']['max_epochs']}, batch size {cfg['train']['batch_size']}, "
        f"precision {cfg['trainer']['precision']}, label smoothing {cfg['train']['label_smoothing']}, "
        f"seed {cfg['seed']}",
        "",
        "## Test metrics",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4f} |" for k, v in metrics.items()],
        "",
        "## Per node (test)"
        if task == "hierarchical"
        else "## Per label (test)"
        if task == "multilabel"
        else "## Per class (test)",
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
