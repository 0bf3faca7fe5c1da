"""The label space of a dataset and the encoding of labels into training targets.

======================  ===========================  =================================
task                    output units (``classes``)   target of one image
======================  ===========================  =================================
binary                  ``[negative, positive]``     0 or 1 (one logit is trained)
multiclass              the classes                  class index
multilabel              the labels                   multi-hot row over the labels
hierarchical            the leaves of the tree       index into ``nodes`` (any node)
======================  ===========================  =================================

For hierarchical data ``nodes`` lists every node of the tree (paths ``a/b/c``, parents
before children); the model has one output per leaf and a node's probability is the sum of
its leaves' probabilities, so an image labelled with an inner node trains every leaf below it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from taxonomist.data.manifest import split_labels
from taxonomist.tasks.taxonomy import ancestors, depth, parent


class LabelError(ValueError):
    """Labels that do not fit the task; the message names the label or the class."""


@dataclass
class LabelSpace:
    """What a model predicts: the task, its output units and (hierarchical) the label tree."""

    task: str
    classes: list[str]
    nodes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_labels(cls, task: str, label_cells: Iterable[str], positive_label: str | None = None) -> LabelSpace:
        """Build the space from manifest ``labels`` cells (``|``-joined label lists)."""
        seen = sorted({label for cell in label_cells for label in split_labels(cell)})
        if task == "hierarchical":
            nodes = sorted({a for label in seen for a in ancestors(label)}, key=lambda p: (depth(p), p))
            has_child = {parent(n) for n in nodes}
            leaves = [n for n in sorted(nodes) if n not in has_child]
            if len(leaves) < 2:
                raise LabelError(f"the label tree has {len(leaves)} leaf label(s); classification needs at least two")
            return cls(task, leaves, nodes)
        if task == "binary":
            if len(seen) != 2:
                raise LabelError(f"task binary needs exactly 2 classes, the data has {len(seen)}: {seen}")
            positive = positive_label if positive_label is not None else seen[-1]
            if positive not in seen:
                raise LabelError(f"task.positive_label={positive!r} is not one of the classes {seen}")
            return cls(task, [c for c in seen if c != positive] + [positive])
        if len(seen) < 2:
            raise LabelError(f"task {task} needs at least 2 labels, the data has {len(seen)}: {seen}")
        return cls(task, seen)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelSpace:
        """Rebuild from :meth:`to_dict` output."""
        return cls(str(data["task"]), list(data["classes"]), list(data.get("nodes") or []))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)

    # ------------------------------------------------------------------ shape
    @property
    def num_outputs(self) -> int:
        """Number of model outputs (logits)."""
        return 1 if self.task == "binary" else len(self.classes)

    @property
    def positive(self) -> str:
        """The positive class of a binary task."""
        return self.classes[1]

    @property
    def target_names(self) -> list[str]:
        """What a target index refers to: nodes for hierarchical data, else the classes."""
        return self.nodes if self.task == "hierarchical" else self.classes

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

    # ------------------------------------------------------------------ encoding
    def encode(self, label_cells: Iterable[str]) -> np.ndarray:
        """Targets of manifest ``labels`` cells: int64 indices, or a uint8 multi-hot matrix."""
        cells = list(label_cells)
        if self.task == "multilabel":
            index = {c: i for i, c in enumerate(self.classes)}
            out = np.zeros((len(cells), len(self.classes)), dtype=np.uint8)
            for row, cell in enumerate(cells):
                for label in split_labels(cell):
                    if label not in index:
                        raise LabelError(f"label {label!r} is not one of the model's labels")
                    out[row, index[label]] = 1
            return out
        index = {c: i for i, c in enumerate(self.target_names)}
        try:
            return np.array([index[cell] for cell in cells], dtype=np.int64)
        except KeyError as err:
            raise LabelError(f"label {err.args[0]!r} is not one of the model's labels") from None

    def empty_targets(self) -> np.ndarray:
        """A zero-length target array of the right shape and dtype."""
        return self.encode([])
