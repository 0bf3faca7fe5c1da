"""Hierarchical: labels are paths ``a/b/c`` in a tree; softmax over the leaves.

``nodes`` lists every node of the tree (parents before children); the model has one output
per leaf and a node's probability is the sum of its leaves' probabilities, so an image
labelled with an inner node trains every leaf below it (its target is the node's index).
The predicted path starts at the most probable top-level node and descends to the most
probable child while that child's probability is at least ``task.threshold.value`` (0 =
always down to a leaf), so a child always comes with its ancestors. With ``task.taxonomy``
every label must be in that tree (a unique leaf name is resolved to its path).

Test metrics: exact-node accuracy, hierarchical precision/recall/F1 (ancestor-augmented
sets), accuracy and macro-F1 per level; a per-node table; a confusion matrix per level.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from taxonomist.data.manifest import PATH_SEP, Record, split_labels
from taxonomist.errors import DataError, Problems
from taxonomist.evaluation.report import NONE, Evaluation, prf, rounded, worst_first
from taxonomist.tasks.base import (
    Decision,
    Task,
    add_one_label_problems,
    require_two_classes,
    separator,
    softmax,
    with_prob_columns,
)
from taxonomist.tasks.registry import register
from taxonomist.tasks.taxonomy import LabelResolver, TaxonomyError, ancestors, depth, load_taxonomy, parent

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torchmetrics import MetricCollection

    from taxonomist.tasks.uncertainty import Question

HF_COUNTS = ("overlap", "predicted", "true", "exact", "count")


@register
class HierarchicalTask(Task):
    """Softmax over the leaves of a label tree; answers are paths."""

    name = "hierarchical"
    label_form = "path"
    keys = ("class_weights", "balanced_sampling", "taxonomy", "path_separator")
    threshold_modes = ("fixed",)  # value = the probability a node needs for the path to go down to it
    primary_val = "val/hf1"
    primary_test = "test/hf1"
    curves = ("train/acc", "val/acc", "val/hf1")
    confusion_plot = "confusion_level1"
    unit: ClassVar[str] = "node"
    output_text = (
        "`label` (the deepest predicted node), `path` (e.g. `A > B > C`), `score`, and "
        "one `prob_<node>` column per node of the tree"
    )

    def __init__(self, classes: Sequence[str], nodes: Sequence[str]):
        super().__init__(classes)
        self.nodes = list(nodes)

    # ------------------------------------------------------------------ data
    @classmethod
    def check_records(cls, records: list[Record], cfg: DictConfig) -> list[Record]:
        """One label path per image, no empty level, and (with ``task.taxonomy``) in the tree."""
        problems = Problems()
        add_one_label_problems(problems, records, cls.name)
        single = [r for r in records if len(r.labels) == 1]
        problems.add(
            "label paths have an empty level",
            [
                f"{r.source_id}: label path {r.labels[0]!r} has an empty level"
                for r in single
                if any(not part.strip() for part in r.labels[0].split(PATH_SEP))
            ],
        )
        taxonomy = cfg.task.taxonomy
        if taxonomy is not None:
            try:
                resolver = LabelResolver(load_taxonomy(str(taxonomy)), str(taxonomy))
            except TaxonomyError as err:
                raise DataError(str(err)) from None
            out, missing = [], []
            for r in single:
                try:
                    out.append(replace(r, labels=(resolver.resolve(r.labels[0], r.source_id),)))
                except TaxonomyError as err:
                    missing.append(str(err))
            problems.add("labels are not in the taxonomy", missing)
            records = out
        problems.raise_if_any()
        require_two_classes(records)
        return records

    @classmethod
    def from_labels(cls, label_cells: Iterable[str], task_cfg: DictConfig | None = None) -> HierarchicalTask:
        """The tree of every label path and its ancestors; the leaves are the output units."""
        seen = sorted({label for cell in label_cells for label in split_labels(cell)})
        nodes = sorted({a for label in seen for a in ancestors(label)}, key=lambda p: (depth(p), p))
        has_child = {parent(n) for n in nodes}
        leaves = [n for n in sorted(nodes) if n not in has_child]
        if len(leaves) < 2:
            raise DataError(f"the label tree has {len(leaves)} leaf label(s); classification needs at least two")
        return cls(leaves, nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.name, "classes": self.classes, "nodes": self.nodes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HierarchicalTask:
        return cls(list(data["classes"]), list(data["nodes"]))

    @property
    def target_names(self) -> list[str]:
        return self.nodes

    def size_text(self) -> str:
        return f"{len(self.nodes)} nodes in the label tree, {len(self.classes)} leaves"

    # ------------------------------------------------------------------ the tree
    def membership(self) -> np.ndarray:
        """(nodes, leaves) bool matrix: ``[n, l]`` is true when leaf ``l`` is ``n`` or below it."""
        index = {n: i for i, n in enumerate(self.nodes)}
        out = np.zeros((len(self.nodes), len(self.classes)), dtype=bool)
        for j, leaf in enumerate(self.classes):
            for a in ancestors(leaf):
                out[index[a], j] = True
        return out

    def ancestor_matrix(self) -> np.ndarray:
        """(nodes, nodes) bool matrix: row ``n`` marks ``n`` and its ancestors."""
        parents = self.node_parents()
        out = np.eye(len(self.nodes), dtype=bool)
        for n in range(len(self.nodes)):
            p = parents[n]
            while p >= 0:
                out[n, p] = True
                p = parents[p]
        return out

    def node_depths(self) -> np.ndarray:
        """Depth (1 = top level) of each node."""
        return np.array([depth(n) for n in self.nodes], dtype=np.int64)

    def node_parents(self) -> np.ndarray:
        """Index of each node's parent, -1 for top-level nodes."""
        index = {n: i for i, n in enumerate(self.nodes)}
        return np.array([index.get(parent(n), -1) for n in self.nodes], dtype=np.int64)

    def path_text(self, node: int, sep: str) -> str:
        """The display path of a node index (``Apparel > Footwear > Sneaker``); "" for -1."""
        return "" if node < 0 else self.nodes[node].replace(PATH_SEP, sep)

    def descend(self, node_probs: np.ndarray, threshold: float) -> np.ndarray:
        """Greedy top-down path per row; the index of its deepest node (-1: not even a top level)."""
        parents = self.node_parents()
        # children[k] lists the children of node k; the last row holds the top-level nodes.
        groups: list[list[int]] = [[] for _ in range(len(self.nodes) + 1)]
        for i, p in enumerate(parents):
            groups[p if p >= 0 else len(self.nodes)].append(i)
        width = max(len(g) for g in groups)
        children = np.full((len(groups), max(width, 1)), -1, dtype=np.int64)
        for k, g in enumerate(groups):
            children[k, : len(g)] = g
        n = len(node_probs)
        padded = np.concatenate([node_probs, np.full((n, 1), -np.inf)], axis=1)  # column -1 = no child
        current = np.full(n, len(self.nodes), dtype=np.int64)  # the virtual root
        result = np.full(n, -1, dtype=np.int64)
        active = np.ones(n, dtype=bool)
        for _ in range(int(self.node_depths().max())):
            cand = children[current]  # (n, width)
            p = np.take_along_axis(padded, np.where(cand >= 0, cand, len(self.nodes)), axis=1)
            best = p.argmax(axis=1)
            best_node = cand[np.arange(n), best]
            best_p = p[np.arange(n), best]
            move = active & (best_node >= 0) & (best_p >= threshold)
            result[move] = best_node[move]
            current = np.where(move, best_node, current)
            active = move
        return result

    def path_sets(self, pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, true) node sets of each row, ancestors included (bool (N, nodes))."""
        anc = self.ancestor_matrix()
        return np.where(pred[:, None] >= 0, anc[np.maximum(pred, 0)], False), anc[target]

    def hf_counts(self, node_probs: np.ndarray, target: np.ndarray, pred: np.ndarray | None = None) -> dict[str, Any]:
        """The counts :func:`hierarchical_scores` takes, of decisions ``pred`` (default: full-depth paths)."""
        pred = self.descend(node_probs, 0.0) if pred is None else pred
        pred_sets, true_sets = self.path_sets(pred, target)
        return {
            "overlap": (pred_sets & true_sets).sum(),
            "predicted": pred_sets.sum(),
            "true": true_sets.sum(),
            "exact": (pred == target).sum(),
            "count": len(target),
        }

    # ------------------------------------------------------------------ training
    def loss(self, label_smoothing: float = 0.0, weights: list[float] | None = None) -> torch.nn.Module:
        from taxonomist.tasks.nn import NodeLikelihood

        return NodeLikelihood(self.membership(), weights)

    def metrics(self) -> MetricCollection:
        from torchmetrics import MetricCollection

        from taxonomist.tasks.nn import CountMetric

        return MetricCollection({"h": CountMetric(HF_COUNTS, self.hf_counts, hierarchical_scores)})

    def torch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        membership = torch.from_numpy(self.membership()).to(logits.device)
        return torch.softmax(logits.float(), dim=1) @ membership.T.float()

    def class_weights(self, targets: np.ndarray) -> list[float]:
        """Per leaf, from the images whose label is that leaf (inner-node labels do not count)."""
        leaf_of_node = {self.nodes.index(leaf): j for j, leaf in enumerate(self.classes)}
        counts = np.bincount([leaf_of_node[t] for t in targets if t in leaf_of_node], minlength=len(self.classes))
        counts = np.maximum(counts, 1).astype(np.float64)
        return (counts.sum() / (len(counts) * counts)).tolist()

    # ------------------------------------------------------------------ decisions
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, nodes): a node's probability is the sum over its leaves."""
        return softmax(logits) @ self.membership().T.astype(np.float64)

    def tune(self, probs: np.ndarray, target: np.ndarray, task_cfg: DictConfig) -> Decision:
        return Decision([float(task_cfg.threshold.value)], separator(task_cfg))

    def decide(self, probs: np.ndarray, decision: Decision) -> np.ndarray:
        """The index of the deepest predicted node, -1 for none."""
        return self.descend(probs, decision.thresholds[0] if decision.thresholds else 0.0)

    def questions(self, probs: np.ndarray) -> list[Question]:
        """One question over the leaves (their full paths)."""
        from taxonomist.tasks.uncertainty import Question

        leaves = [self.nodes.index(leaf) for leaf in self.classes]
        return [Question("", self.classes, np.asarray(probs, dtype=np.float64)[:, leaves])]

    def question_targets(self, target: np.ndarray) -> list[np.ndarray]:
        """The leaf of each image; -1 for an image labelled with an inner node."""
        leaf_of_node = {self.nodes.index(leaf): j for j, leaf in enumerate(self.classes)}
        return [np.array([leaf_of_node.get(int(t), -1) for t in target], dtype=np.int64)]

    def decision_text(self, decision: Decision) -> str:
        th = decision.thresholds[0] if decision.thresholds else 0.0
        return (
            f"the path descends to the most probable child while its probability >= {th:g}; "
            "a node's probability is the sum over its leaves"
        )

    # ------------------------------------------------------------------ evaluation and serving
    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Exact node, hP/hR/hF, and per level accuracy and macro-F1."""
        pred = self.decide(probs, decision)
        depths = self.node_depths()
        pred_sets, true_sets = self.path_sets(pred, target)
        metrics: dict[str, object] = dict(hierarchical_scores(self.hf_counts(probs, target, pred)))
        confusions: dict[str, tuple[np.ndarray, list[str]]] = {}
        for level in range(1, int(depths.max()) + 1):
            columns = np.flatnonzero(depths == level)
            names = [self.nodes[i] for i in columns]
            true_l, pred_l = _at_level(true_sets[:, columns]), _at_level(pred_sets[:, columns])
            has = true_l < len(names)  # images whose label reaches this level
            if not has.any():
                continue
            matrix = np.zeros((len(names), len(names) + 1), dtype=np.int64)
            np.add.at(matrix, (true_l[has], pred_l[has]), 1)
            tp = np.diag(matrix[:, : len(names)])
            _, _, f1 = prf(tp, matrix[:, : len(names)].sum(0), matrix.sum(1))
            support = matrix.sum(1) > 0
            metrics[f"acc_level{level}"] = (true_l[has] == pred_l[has]).mean()
            metrics[f"f1_macro_level{level}"] = f1[support].mean()
            labels = [nm.rpartition(PATH_SEP)[2] for nm in names]
            confusions[f"confusion_level{level}"] = (matrix, [*labels, NONE])
        tp = (pred_sets & true_sets).sum(0)
        precision, recall, f1 = prf(tp, pred_sets.sum(0), true_sets.sum(0))
        table = pd.DataFrame(
            {
                "class": self.nodes,
                "level": depths,
                "precision": precision.round(6),
                "recall": recall.round(6),
                "f1": f1.round(6),
                "support": true_sets.sum(0),
            }
        )
        conf = np.where(pred >= 0, probs[np.arange(len(pred)), np.maximum(pred, 0)], 0.0)
        sep = decision.path_separator
        predictions = pd.DataFrame(
            {
                "actual": [self.path_text(i, sep) for i in target],
                "predicted": [self.path_text(i, sep) or NONE for i in pred],
                "confidence": conf.round(5),
            }
        )
        wrong = np.flatnonzero(pred != target)
        return Evaluation(rounded(metrics), table, predictions, confusions, {}, worst_first(wrong, conf))

    def answer(self, probs: np.ndarray, decision: Decision) -> pd.DataFrame:
        """``label`` (the deepest predicted node), ``path``, ``score`` and ``prob_<node>`` columns."""
        picked = self.decide(probs, decision)
        rows = np.arange(len(probs))
        sep = decision.path_separator
        frame = pd.DataFrame(
            {
                "label": [self.nodes[i].rpartition(PATH_SEP)[2] if i >= 0 else "" for i in picked],
                "path": [self.path_text(i, sep) for i in picked],
                "score": np.where(picked >= 0, probs[rows, np.maximum(picked, 0)], 0.0) if len(rows) else [],
            }
        )
        return with_prob_columns(frame, self.nodes, probs)

    def answer_text(self, row: pd.Series) -> str:
        return f"{row['path'] or '(no confident answer)'}\t{row['score']:.4f}"


def hierarchical_scores(counts: dict[str, Any]) -> dict[str, Any]:
    """Exact-node accuracy and hierarchical precision/recall/F1 from :meth:`HierarchicalTask.hf_counts`."""
    hp = counts["overlap"] / max(counts["predicted"], 1)
    hr = counts["overlap"] / max(counts["true"], 1)
    return {
        "acc": counts["exact"] / max(counts["count"], 1),
        "hprecision": hp,
        "hrecall": hr,
        "hf1": 2 * hp * hr / max(hp + hr, 1e-12),
    }


def _at_level(level_sets: np.ndarray) -> np.ndarray:
    """Per row, the position of its node among one level's nodes (a path has at most one per
    level), or the number of those nodes when the path does not reach the level."""
    return np.where(level_sets.any(axis=1), level_sets.argmax(axis=1), level_sets.shape[1])
