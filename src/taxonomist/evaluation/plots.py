"""Plots people would rather look at than read: confusion matrix, per-class F1, mistakes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, columns: list[str] | None = None) -> Path:
    """Row-normalised confusion matrix with counts, saved as PNG (``columns``: predicted
    names when they differ from the true ones, e.g. with an extra "(none)")."""
    columns = columns or classes
    n, m = len(classes), len(columns)
    size = max(5.0, 0.6 * max(n, m) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(m), columns, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if max(n, m) <= 30:
        for i in range(n):
            for j in range(m):
                ax.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title("Confusion matrix (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class(table: pd.DataFrame, path: Path) -> Path:
    """Horizontal bars of per-class precision, recall and F1."""
    n = len(table)
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.35 * n + 1)))
    y = np.arange(n)
    for offset, col in zip((-0.27, 0.0, 0.27), ("precision", "recall", "f1"), strict=True):
        ax.barh(y + offset, table[col], height=0.27, label=col)
    ax.set_yticks(y, table["class"])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("Per-class metrics (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_misclassified(
    images: np.ndarray, true: list[str], pred: list[str], conf: list[float | None], path: Path
) -> Path:
    """A grid of misclassified test images titled with true, predicted and confidence."""
    scores = [f" ({c:.0%})" if c is not None else "" for c in conf]
    titles = [f"true: {t}\npred: {p}{score}" for t, p, score in zip(true, pred, scores, strict=False)]
    return plot_image_grid(images, titles, path, "Misclassified test images (most confident first)", "no mistakes")


def _short(text: str, width: int = 28) -> str:
    """Keep plot titles readable: long label sets and paths are cut with an ellipsis."""
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_curves(pr: pd.DataFrame, roc: pd.DataFrame, path: Path) -> Path:
    """Precision-recall and ROC curves of a binary classifier, side by side."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax1.plot(pr["recall"], pr["precision"])
    ax1.set_xlabel("recall")
    ax1.set_ylabel("precision")
    ax1.set_title("Precision-recall (test)")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1.02)
    ax2.plot(roc["fpr"], roc["tpr"])
    ax2.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8)
    ax2.set_xlabel("false positive rate")
    ax2.set_ylabel("true positive rate")
    ax2.set_title("ROC (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(history: pd.DataFrame, path: Path) -> Path:
    """Training curves: loss and accuracy / macro-F1 per epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for col in ("train/loss", "val/loss"):
        if col in history:
            ax1.plot(history["epoch"], history[col], marker="o", label=col)
    for col in [c for c in history.columns if c.startswith(("train/", "val/")) and not c.endswith("loss")][:6]:
        if col in history:
            ax2.plot(history["epoch"], history[col], marker="o", label=col)
    ax1.set_xlabel("epoch")
    ax1.set_title("loss")
    ax1.legend()
    ax2.set_xlabel("epoch")
    ax2.set_title("metrics")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_image_grid(images: np.ndarray, titles: list[str], path: Path, title: str, empty: str = "no images") -> Path:
    """A grid of images (N, H, W, C) uint8, each with its (multi-line) title, saved as PNG."""
    n = len(images)
    cols = min(6, max(n, 1))
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
        ax.set_title("\n".join(_short(line) for line in text.split("\n")), fontsize=7)
    if n == 0:
        axes.flat[0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_image_rows(rows: list[tuple[str, np.ndarray, list[str]]], path: Path, title: str, columns: int = 8) -> Path:
    """One row of images per group (``(heading, images, captions)``): the heading on the left,
    then up to ``columns`` images with their captions (e.g. the clusters of ``taxonomist cluster``)."""
    n = max(1, len(rows))
    cols = 1 + max(1, min(columns, max((len(images) for _, images, _ in rows), default=1)))
    fig, axes = plt.subplots(n, cols, figsize=(1.5 * cols + 0.6, 1.6 * n + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (heading, images, captions) in enumerate(rows):
        axes[r, 0].text(0.95, 0.5, heading, ha="right", va="center", fontsize=8, transform=axes[r, 0].transAxes)
        for c, img in enumerate(images[: cols - 1]):
            ax = axes[r, c + 1]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            if c < len(captions) and captions[c]:
                ax.set_title(_short(captions[c], 18), fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
