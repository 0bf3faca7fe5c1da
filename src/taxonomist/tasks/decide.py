"""From logits to probabilities and decisions, and the tuning of decision thresholds.

NumPy only (no torch), so the served model uses exactly the code evaluation uses.

- binary: ``p = sigmoid(logit)`` is the probability of the positive class; positive when
  ``p >= threshold``.
- multiclass: softmax; the most probable class.
- multilabel: a sigmoid per label; label ``j`` is on when ``p_j >= thresholds[j]``.
- hierarchical: softmax over the leaves; a node's probability is the sum over its leaves.
  The predicted path starts at the most probable top-level node and descends to the most
  probable child while that child's probability is at least ``threshold`` (0 = always down
  to a leaf), so a child always comes with its ancestors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from taxonomist.tasks.labels import LabelSpace


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def probabilities(logits: np.ndarray, space: LabelSpace) -> np.ndarray:
    """Probabilities from logits: (N,) positive-class for binary, (N, nodes) for hierarchical,
    else (N, classes)."""
    logits = np.asarray(logits, dtype=np.float64)
    if space.task == "binary":
        return sigmoid(logits[:, 0] if logits.ndim == 2 else logits)
    if space.task == "multilabel":
        return sigmoid(logits)
    probs = softmax(logits)
    if space.task == "hierarchical":
        return probs @ space.membership().T.astype(np.float64)
    return probs


@dataclass
class Decision:
    """How probabilities become answers: thresholds (binary: one; multilabel: per label;
    hierarchical: the descend threshold) and how to show a path."""

    thresholds: list[float] = field(default_factory=list)
    path_separator: str = " > "

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        """Rebuild from :meth:`to_dict` output."""
        return cls([float(t) for t in data.get("thresholds", [])], str(data.get("path_separator", " > ")))


def decide(probs: np.ndarray, space: LabelSpace, decision: Decision) -> np.ndarray:
    """Decisions: class index (binary, multiclass), bool matrix (multilabel), or the index of
    the deepest predicted node, -1 for none (hierarchical)."""
    if space.task == "binary":
        return (probs >= decision.thresholds[0]).astype(np.int64)
    if space.task == "multilabel":
        return probs >= np.asarray(decision.thresholds, dtype=np.float64)[None, :]
    if space.task == "hierarchical":
        return descend(probs, space, decision.thresholds[0] if decision.thresholds else 0.0)
    return probs.argmax(axis=1)


def descend(node_probs: np.ndarray, space: LabelSpace, threshold: float) -> np.ndarray:
    """Greedy top-down path per row; the index of its deepest node (-1: not even a top level)."""
    parents = space.node_parents()
    # children[k] lists the children of node k; the last row holds the top-level nodes.
    groups: list[list[int]] = [[] for _ in range(len(space.nodes) + 1)]
    for i, p in enumerate(parents):
        groups[p if p >= 0 else len(space.nodes)].append(i)
    width = max(len(g) for g in groups)
    children = np.full((len(groups), max(width, 1)), -1, dtype=np.int64)
    for k, g in enumerate(groups):
        children[k, : len(g)] = g
    n = len(node_probs)
    padded = np.concatenate([node_probs, np.full((n, 1), -np.inf)], axis=1)  # column -1 = no child
    current = np.full(n, len(space.nodes), dtype=np.int64)  # the virtual root
    result = np.full(n, -1, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for _ in range(int(space.node_depths().max())):
        cand = children[current]  # (n, width)
        p = np.take_along_axis(padded, np.where(cand >= 0, cand, len(space.nodes)), axis=1)
        best = p.argmax(axis=1)
        best_node = cand[np.arange(n), best]
        best_p = p[np.arange(n), best]
        move = active & (best_node >= 0) & (best_p >= threshold)
        result[move] = best_node[move]
        current = np.where(move, best_node, current)
        active = move
    return result


def path_text(space: LabelSpace, node: int, separator: str) -> str:
    """The display path of a node index (``Apparel > Footwear > Sneaker``); "" for -1."""
    return "" if node < 0 else space.nodes[node].replace("/", separator)


# ---------------------------------------------------------------------- threshold tuning


def tune_threshold(probs: np.ndarray, target: np.ndarray, mode: str, value: float) -> float:
    """The decision threshold of one positive class from validation probabilities.

    ``max_f1``: the threshold of the highest F1. ``min_precision``: the lowest threshold whose
    precision is at least ``value`` (the highest recall at that precision). ``min_recall``: the
    highest threshold whose recall is at least ``value``. ``fixed``: ``value`` itself. With no
    positive in ``target`` the threshold stays 0.5. Thresholds sit midway between neighbouring
    scores, so they generalise instead of sitting on a validation score.
    """
    if mode == "fixed":
        return float(value)
    probs = np.asarray(probs, dtype=np.float64)
    target = np.asarray(target).astype(bool)
    positives = int(target.sum())
    if positives == 0 or positives == len(target):
        return 0.5
    order = np.argsort(-probs, kind="stable")
    p_sorted, t_sorted = probs[order], target[order]
    distinct = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]  # last index of each score
    tp = np.cumsum(t_sorted)[distinct]
    predicted = distinct + 1
    precision = tp / predicted
    recall = tp / positives
    below = np.r_[p_sorted[distinct[1:]], 0.0]  # the next lower score (0 after the last)
    cut = (p_sorted[distinct] + below) / 2.0  # threshold that keeps exactly these predicted
    if mode == "max_f1":
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        k = int(np.argmax(f1))
    elif mode == "min_precision":
        ok = np.flatnonzero(precision >= value)
        k = int(ok[np.argmax(recall[ok])]) if len(ok) else int(np.argmax(precision))
    elif mode == "min_recall":
        ok = np.flatnonzero(recall >= value)
        k = int(ok[0]) if len(ok) else len(distinct) - 1
    else:
        raise ValueError(f"unknown threshold mode {mode!r}")
    return float(np.clip(cut[k], 1e-6, 1 - 1e-6))


def tune(probs: np.ndarray, target: np.ndarray, space: LabelSpace, mode: str, value: float, separator: str) -> Decision:
    """The :class:`Decision` of a task, tuned on validation probabilities where it has thresholds."""
    if space.task == "binary":
        return Decision([tune_threshold(probs, target, mode, value)], separator)
    if space.task == "multilabel":
        return Decision(
            [tune_threshold(probs[:, j], target[:, j], mode, value) for j in range(probs.shape[1])], separator
        )
    if space.task == "hierarchical":
        return Decision([float(value)], separator)
    return Decision([], separator)
