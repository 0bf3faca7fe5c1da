"""The interface every task implements, and the pieces most tasks share.

A task is one object: its label space (the output units and how labels become targets), its
loss and per-epoch metrics, its probabilities and decision (NumPy, shared by evaluation and
the served model), its test evaluation, its served answer and the words the model card uses.
Code outside :mod:`taxonomist.tasks` asks the task; it never branches on the task's name.

A task class is created from data (:meth:`Task.from_labels`, in preprocess) or rebuilt from
``labels.json`` (:meth:`Task.to_dict` / :func:`taxonomist.tasks.load_task`); the checks that
come before any label space exists (config keys, ingested records, split strata) are class
methods.

This module and the task modules import only NumPy and pandas at the top: the served model
runs without torch. The torch side (losses, torchmetrics) is imported inside the methods that
training and evaluation call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from taxonomist.data.manifest import PATH_SEP, Record, split_labels
from taxonomist.errors import ConfigError, DataError, Problems

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torchmetrics import MetricCollection

    from taxonomist.evaluation.report import Evaluation
    from taxonomist.tasks.uncertainty import Question

THRESHOLD_MODES = ("max_f1", "min_precision", "min_recall", "fixed")
# Keys of the ``task`` config section and the value that means "not used by this task". Every
# task section holds all of them (conf/config.yaml sets these), so DVC tracks the same keys
# whatever the task; a task names the ones it takes in ``Task.keys``.
UNSET: dict[str, Any] = {
    "positive_label": None,
    "class_weights": "none",
    "balanced_sampling": False,
    "allow_empty": False,
    "taxonomy": None,
    "path_separator": None,
    "order": None,
    "attributes": None,
}


@dataclass
class Decision:
    """How logits become answers, everything evaluate fits on the validation split and the
    package ships: thresholds (binary: one; multilabel: per label; hierarchical: the descend
    threshold; multiattribute: each attribute's, under its name), how to show a path, the
    calibration (``logits * scale + bias`` per output; empty: none) and the conformal
    thresholds (``qhat`` per question at ``coverage``; empty: no sets), see
    :mod:`taxonomist.tasks.uncertainty`."""

    thresholds: list[float] = field(default_factory=list)
    path_separator: str = " > "
    parts: dict[str, Decision] = field(default_factory=dict)
    scale: list[float] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)
    qhat: list[float] = field(default_factory=list)
    coverage: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the fields left at their defaults, other than the first two, are left out)."""
        out = asdict(self)
        for key in ("parts", "scale", "bias", "qhat", "coverage"):
            if not out[key]:
                out.pop(key)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        """Rebuild from :meth:`to_dict` output."""
        coverage = data.get("coverage")
        return cls(
            [float(t) for t in data.get("thresholds", [])],
            str(data.get("path_separator") or " > "),
            {k: cls.from_dict(v) for k, v in (data.get("parts") or {}).items()},
            [float(v) for v in data.get("scale", [])],
            [float(v) for v in data.get("bias", [])],
            [float(v) for v in data.get("qhat", [])],
            None if coverage is None else float(coverage),
        )


class Task:
    """One classification task over one label space. Subclasses set the class variables and
    override the methods whose behaviour differs; the defaults are those of a single-label task
    with one output per class."""

    name: ClassVar[str]
    label_form: ClassVar[str] = "one"  # how a source labels an image: one | set | path | attributes
    keys: ClassVar[tuple[str, ...]] = ()  # task-specific config keys it takes (see UNSET)
    threshold_modes: ClassVar[tuple[str, ...]] = THRESHOLD_MODES
    primary_val: ClassVar[str]  # picks the checkpoint (train.monitor: auto), the sweep objective
    primary_test: ClassVar[str]  # the champion metric (package.champion_metric: auto)
    headline: ClassVar[str] = "val/acc"  # the val metric on the progress bar
    curves: ClassVar[tuple[str, ...]]  # per-epoch metrics of the "Training curves (metrics)" plot
    confusion_plot: ClassVar[str | None] = "confusion_matrix"  # the PNG of reports/eval in dvc plots
    predictions_confusion: ClassVar[bool] = True  # dvc's confusion template over predictions.csv
    mixup: ClassVar[bool] = False  # mixed images get mixed targets (train.mixup)
    unit: ClassVar[str] = "class"  # what an output unit is called (per-class table, model card)
    calibration: ClassVar[str] = "temperature"  # temperature | platt (see calibration_groups)
    output_text: ClassVar[str]  # the served columns, for the model card

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    # ------------------------------------------------------------------ config and data checks
    @classmethod
    def check_config(cls, task_cfg: DictConfig, cfg: DictConfig, origin: str) -> None:
        """Raise :class:`ConfigError` for a key this task does not take, or a value it cannot use."""
        from taxonomist.tasks.registry import tasks_taking

        for key, unset in UNSET.items():
            value = task_cfg.get(key, unset)
            if key not in cls.keys and value != unset and not _empty(value, unset):
                takers = tasks_taking(key)
                raise ConfigError(
                    f"{origin}: task.{key} is a key of task {' and '.join(takers)}, not of {cls.name}; "
                    f"remove it or set task={takers[0]}"
                )
        th = task_cfg.threshold
        if th.mode not in cls.threshold_modes:
            raise ConfigError(f"{origin}: task.threshold.mode={th.mode!r}; task {cls.name} takes {cls.threshold_modes}")
        low = 0.0 if th.mode == "fixed" else 1e-9
        if not low <= float(th.value) < 1.0:
            raise ConfigError(f"{origin}: task.threshold.value must be in [{low:g}, 1), got {th.value}")
        if task_cfg.class_weights not in ("none", "balanced"):
            raise ConfigError(f"{origin}: task.class_weights={task_cfg.class_weights!r}; use none or balanced")

    @classmethod
    def val_metric(cls, value: str) -> str:
        """A val metric setting (``train.monitor``, ``sweep.objective``): ``auto`` is :attr:`primary_val`."""
        return cls.primary_val if value == "auto" else value

    @classmethod
    def test_metric(cls, value: str) -> str:
        """A test metric setting (``package.champion_metric``): ``auto`` is :attr:`primary_test`."""
        return cls.primary_test if value == "auto" else value

    @classmethod
    def check_records(cls, records: list[Record], cfg: DictConfig) -> list[Record]:
        """The ingested records with labels checked (and normalised) for this task.

        The default is a single-label task's: one label per image that is not a label path
        (:func:`check_single_labels`), and at least two classes.
        """
        check_single_labels(records, cls.name)
        require_two_classes(records)
        return records

    @classmethod
    def strata(cls, label_cells: pd.Series, min_images_per_class: int) -> pd.Series:
        """The stratum of each image for the split (a single-label image's stratum is its label)."""
        return label_cells

    @classmethod
    def from_labels(cls, label_cells: Iterable[str], task_cfg: DictConfig | None = None) -> Task:
        """The label space of manifest ``labels`` cells (``|``-joined label lists)."""
        seen = sorted({label for cell in label_cells for label in split_labels(cell)})
        if len(seen) < 2:
            raise DataError(f"task {cls.name} needs at least 2 labels, the data has {len(seen)}: {seen}")
        return cls(seen)

    # ------------------------------------------------------------------ label space
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``labels.json``); :func:`taxonomist.tasks.load_task` reads it back."""
        return {"task": self.name, "classes": self.classes, "nodes": []}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        """Rebuild from :meth:`to_dict` output."""
        return cls(list(data["classes"]))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    @property
    def num_outputs(self) -> int:
        """Number of model outputs (logits)."""
        return len(self.classes)

    @property
    def target_names(self) -> list[str]:
        """What a target index refers to."""
        return self.classes

    def size_text(self) -> str:
        """The size of the label space in words (model card)."""
        return f"{len(self.classes)} classes"

    def encode(self, label_cells: Iterable[str]) -> np.ndarray:
        """Targets of manifest ``labels`` cells: int64 class indices."""
        index = {c: i for i, c in enumerate(self.target_names)}
        try:
            return np.array([index[cell] for cell in label_cells], dtype=np.int64)
        except KeyError as err:
            raise DataError(f"label {err.args[0]!r} is not one of the model's labels") from None

    def empty_targets(self) -> np.ndarray:
        """A zero-length target array of the right shape and dtype."""
        return self.encode([])

    # ------------------------------------------------------------------ training (torch)
    def wrap_model(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """The network trained and exported: the backbone with ``num_backbone_outputs`` outputs,
        plus whatever the task adds on top (nothing by default)."""
        return backbone

    @property
    def num_backbone_outputs(self) -> int:
        """Outputs the timm backbone is created with."""
        return self.num_outputs

    def loss(self, label_smoothing: float = 0.0, weights: list[float] | None = None) -> torch.nn.Module:
        """The training loss (``weights``: :meth:`class_weights`)."""
        from taxonomist.tasks.nn import CrossEntropy

        return CrossEntropy(label_smoothing, weights)

    def metrics(self) -> MetricCollection:
        """The torchmetrics logged for train and val every epoch."""
        from taxonomist.tasks.nn import multiclass_metrics

        return multiclass_metrics(len(self.classes))

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`metrics` update with: (probabilities, targets)."""
        return self.torch_probabilities(logits), target

    def torch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Torch counterpart of :meth:`probabilities`."""
        import torch

        return torch.softmax(logits.float(), dim=1)

    def class_weights(self, targets: np.ndarray) -> list[float]:
        """Balanced loss weights from the training targets (``task.class_weights: balanced``):
        ``N / (C * n_c)`` per class."""
        counts = np.maximum(np.bincount(targets, minlength=len(self.classes)), 1).astype(np.float64)
        return (counts.sum() / (len(counts) * counts)).tolist()

    def sample_weights(self, targets: np.ndarray) -> np.ndarray:
        """Per-image draw weights of ``task.balanced_sampling``: inverse class frequency."""
        counts = np.bincount(targets)
        return 1.0 / counts[targets]

    # ------------------------------------------------------------------ decisions (NumPy)
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from logits, (N, classes) by default."""
        return softmax(logits)

    def tune(self, probs: np.ndarray, target: np.ndarray, task_cfg: DictConfig) -> Decision:
        """The decision, tuned on validation probabilities where the task has thresholds."""
        return Decision([], separator(task_cfg))

    def calibration_groups(self) -> list[tuple[slice, str]]:
        """Output columns calibrated together, and how: ``temperature`` (one scale shared by the
        columns, no bias: the order of the logits stays) or ``platt`` (a scale and a bias of
        one column). By :attr:`calibration`: one temperature over all outputs, or Platt per output."""
        if self.calibration == "platt":
            return [(slice(j, j + 1), "platt") for j in range(self.num_outputs)]
        return [(slice(0, self.num_outputs), "temperature")]

    def calibrated_probabilities(self, logits: np.ndarray, decision: Decision) -> np.ndarray:
        """:meth:`probabilities` of the logits calibrated by ``decision`` (its ``scale`` and ``bias``)."""
        from taxonomist.tasks.uncertainty import calibrate

        return self.probabilities(calibrate(logits, decision.scale, decision.bias))

    def questions(self, probs: np.ndarray) -> list[Question]:
        """The choices the answer makes (see :mod:`taxonomist.tasks.uncertainty`): one question
        over the classes by default."""
        from taxonomist.tasks.uncertainty import Question

        return [Question("", self.classes, probs)]

    def question_targets(self, target: np.ndarray) -> list[np.ndarray]:
        """The true option of each question per image (as :meth:`questions`; negative: unknown)."""
        return [np.asarray(target, dtype=np.int64)]

    def decide(self, probs: np.ndarray, decision: Decision) -> np.ndarray:
        """Decisions: the most probable class by default."""
        return probs.argmax(axis=1)

    def decision_text(self, decision: Decision) -> str:
        """The decision in words (model card)."""
        return "the most probable class"

    # ------------------------------------------------------------------ evaluation and serving
    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Test metrics, tables, predictions, confusion matrices and curves."""
        raise NotImplementedError

    def answer(self, probs: np.ndarray, decision: Decision) -> pd.DataFrame:
        """The served answer of each row of (calibrated) probabilities: ``label``, ``score`` and
        one ``prob_<class>`` column per class."""
        picked = self.decide(probs, decision)
        rows = np.arange(len(probs))
        frame = pd.DataFrame({"label": [self.classes[i] for i in picked], "score": probs[rows, picked]})
        return with_prob_columns(frame, self.classes, probs)

    def answer_text(self, row: pd.Series) -> str:
        """One line of ``taxonomist predict`` for a served answer row."""
        return f"{row['label']}\t{row['score']:.4f}"

    def served(self, logits: np.ndarray, decision: Decision) -> pd.DataFrame:
        """The served answer of each row of logits: :meth:`answer` of the calibrated
        probabilities, then, when the decision has conformal thresholds, ``plausible`` (the
        options of the prediction sets) and ``abstain`` (see :mod:`taxonomist.tasks.uncertainty`)."""
        from taxonomist.tasks.uncertainty import ABSTAIN_COLUMN, PLAUSIBLE_COLUMN, uncertainty_columns

        probs = self.calibrated_probabilities(logits, decision)
        frame = self.answer(probs, decision)
        if decision.qhat:
            plausible, abstain = uncertainty_columns(self.questions(probs), decision.qhat)
            frame[PLAUSIBLE_COLUMN] = plausible
            frame[ABSTAIN_COLUMN] = abstain
        return frame


# ---------------------------------------------------------------------- shared helpers


def add_one_label_problems(problems: Problems, records: list[Record], task: str) -> None:
    """Record the images that do not have exactly one label."""
    problems.add(
        f"images do not have exactly one label, as task {task} needs (use task=multilabel, or task=multiattribute "
        "for several questions per image)",
        [f"{r.source_id}: {len(r.labels)} labels {list(r.labels)}" for r in records if len(r.labels) != 1],
    )


def check_single_labels(records: list[Record], task: str) -> None:
    """Raise a one-line :class:`DataError` naming the task to use when the records do not fit
    a single-label task: images with several labels (task=multilabel), images without a label,
    or labels that are paths of a label tree (task=hierarchical; see :func:`tree_labels`).
    Each message gives the number of images and an example."""
    several = [r for r in records if len(r.labels) > 1]
    unlabelled = [r for r in records if not r.labels]
    if several:
        first = several[0]
        also = f"; {len(unlabelled)} more have no label" if unlabelled else ""
        raise DataError(
            f"task {task}: images carry several labels (e.g. {first.source_id}: {', '.join(first.labels)}; "
            f"{_images(len(several))}{also}): use task=multilabel (or task=multiattribute when each label answers "
            "a separate question)"
        )
    if unlabelled:
        raise DataError(
            f"task {task}: images have no label (e.g. {unlabelled[0].source_id}; {_images(len(unlabelled))}): label "
            "them or leave them out (task=multilabel with task.allow_empty=true takes images without labels)"
        )
    paths = tree_labels(r.labels[0] for r in records)
    if paths:
        hits = [r for r in records if r.labels[0] in paths]
        raise DataError(
            f"task {task}: labels are paths (e.g. {hits[0].labels[0]!r}, {_images(len(hits))}): use task=hierarchical "
            "(or flatten the labels)"
        )


def _images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def is_path_label(label: str) -> bool:
    """Whether ``label`` reads as a path of a label tree: two or more non-empty levels joined
    with ``/`` and no space around a ``/`` (``Digits/Round/zero``, not ``AC / DC`` or ``a//b``)."""
    levels = label.split(PATH_SEP)
    return len(levels) > 1 and all(level and level == level.strip() for level in levels)


def tree_labels(labels: Iterable[str]) -> set[str]:
    """The labels that are paths of a label tree (nested class folders, Label Studio taxonomy
    results), or none.

    Path-like labels (:func:`is_path_label`) count when they form a tree: every label is one,
    two of them share their first level, or an ancestor of one is a label too. A lone ``n/a``
    or ``AC/DC`` among plain labels is a name, not a tree.
    """
    classes = set(labels)
    paths = {label for label in classes if is_path_label(label)}
    if not paths:
        return set()
    roots = Counter(label.split(PATH_SEP)[0] for label in paths)
    has_ancestor = any(
        PATH_SEP.join(label.split(PATH_SEP)[:depth]) in classes
        for label in paths
        for depth in range(1, label.count(PATH_SEP) + 1)
    )
    if paths == classes or max(roots.values()) > 1 or has_ancestor:
        return paths
    return set()


def require_two_classes(records: list[Record]) -> None:
    """A :class:`DataError` unless the (single-label) records hold at least two classes."""
    classes = sorted({r.labels[0] for r in records})
    if len(classes) < 2:
        raise DataError(f"classification needs at least 2 classes, the data has {classes}")


def _empty(value: Any, unset: Any) -> bool:
    """An empty mapping or list where the unset value is null counts as unset too."""
    return unset is None and not isinstance(value, str | bool | int | float) and len(value) == 0


def separator(task_cfg: DictConfig | None) -> str:
    """``task.path_separator``, or the default `` > ``."""
    sep = task_cfg.get("path_separator") if task_cfg is not None else None
    return str(sep) if sep else " > "


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


def prob_column(label: str) -> str:
    """Served output column holding the probability of ``label``."""
    return f"prob_{label}"


def with_prob_columns(frame: pd.DataFrame, names: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """``frame`` with one ``prob_<name>`` column per name (columns of ``probs``)."""
    empty = len(probs) == 0
    for j, name in enumerate(names):
        frame[prob_column(name)] = [] if empty else probs[:, j]
    return frame


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
        raise ConfigError(f"unknown threshold mode {mode!r}; use one of {THRESHOLD_MODES}")
    return float(np.clip(cut[k], 1e-6, 1 - 1e-6))
