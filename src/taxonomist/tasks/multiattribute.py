"""Multi-attribute: several independent questions about one image, each with its own answers.

An image's labels are ``attribute=value`` strings (``tone=3-medium``, ``hand=no``,
``tags=smile``; the attribute is the part before the first ``=``). Each attribute is a
binary, multi-class or multi-label question (``task.attributes``: attribute -> kind, ``auto``
or an empty mapping = every attribute of the data with its kind guessed: several values on
some image -> multilabel, else 2 values -> binary with the last sorted value positive, more
-> multiclass). The task is a composition: one :class:`BinaryTask`, :class:`MulticlassTask`
or :class:`MultilabelTask` per attribute, each over its own slice of the logits (one head per
attribute) and of the targets; loss, metrics, probabilities, tuning, decisions, evaluation and
answers of an attribute are that sub-task's.

Layout. Outputs: a binary attribute has 1 (its positive value's logit), a multi-class one
one per value, a multi-label one one per label; :attr:`classes` names them ``attr=value``.
Targets are an int64 matrix: one column per single-answer (binary/multi-class) attribute
holding the value's index (-1: unanswered, with ``task.allow_empty``), one 0/1 column per
label of a multi-label attribute. Probabilities have the outputs' layout (a binary attribute:
its positive value's probability).

Choices:

- Loss: the MEAN of the attributes' losses (each the sub-task's own, e.g. cross-entropy with
  label smoothing for a multi-class attribute), so its scale does not grow with the number of
  attributes.
- ``task.allow_empty=true``: a single-answer attribute may be unanswered on an image; that
  image then counts for the attribute's loss, metrics, threshold and evaluation of no
  attribute it lacks. A multi-label attribute with no value on an image always means "none of
  its labels" (all negatives).
- ``task.class_weights: balanced``: each attribute's sub-task weights (multi-class: per class,
  binary: ``pos_weight``, multi-label: per-label ``pos_weight``), concatenated in output order.
- Checkpoints are picked by ``val/primary_mean``, the mean over the attributes of each
  sub-task's own primary val metric (multi-class macro F1, binary ROC-AUC, multi-label macro
  AP): binary and multi-label thresholds are tuned only after training, so F1 at 0.5 would
  pick checkpoints by an untuned threshold. ``val/f1_macro`` (mean over attributes of the
  binary F1 / macro F1 at 0.5) is the headline; ``test/f1_macro`` the same mean at the tuned
  thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from taxonomist.data.manifest import LABEL_SEP, PATH_SEP, Record, split_labels
from taxonomist.errors import ConfigError, DataError, Problems
from taxonomist.evaluation.report import Evaluation, rounded, worst_first
from taxonomist.tasks.base import Decision, Task, separator, with_prob_columns
from taxonomist.tasks.binary import BinaryTask
from taxonomist.tasks.multiclass import MulticlassTask
from taxonomist.tasks.multilabel import MultilabelTask
from taxonomist.tasks.registry import get_task, register

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torchmetrics import MetricCollection

    from taxonomist.tasks.uncertainty import Question

log = logging.getLogger(__name__)

ATTRIBUTE_SEP = "="  # "<attribute>=<value>", split at the first "="
AUTO = "auto"
KINDS = ("binary", "multiclass", "multilabel")
SINGLE = ("binary", "multiclass")  # one answer per image: a target column holding its index
MISSING = -1  # target of an unanswered single-answer attribute (task.allow_empty)
ACC_KEY = {"binary": "acc", "multiclass": "acc", "multilabel": "subset_acc"}  # per-attribute accuracy
SUB_TASKS: dict[str, type[Task]] = {"binary": BinaryTask, "multiclass": MulticlassTask, "multilabel": MultilabelTask}


def parse_label(label: str) -> tuple[str, str] | None:
    """``(attribute, value)`` of an ``attribute=value`` label, or None if it is not of that form."""
    attribute, sep, value = str(label).partition(ATTRIBUTE_SEP)
    if not sep or not attribute.strip() or not value:
        return None
    return attribute.strip(), value


def values_by_attribute(labels: Iterable[str]) -> dict[str, list[str]]:
    """An image's values per attribute (sorted, unique; labels not of the form are skipped)."""
    out: dict[str, set[str]] = {}
    for label in labels:
        parsed = parse_label(label)
        if parsed is not None:
            out.setdefault(parsed[0], set()).add(parsed[1])
    return {attribute: sorted(values) for attribute, values in out.items()}


def configured_attributes(task_cfg: Any) -> dict[str, str]:
    """``task.attributes`` (attribute -> kind) as a plain dict, in config order; empty when unset."""
    value = task_cfg.get("attributes") if task_cfg is not None else None
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"task.attributes must map attribute names to kinds {(*KINDS, AUTO)}, got {value!r}")
    return {str(name).strip(): str(kind) for name, kind in value.items()}


def guess_kind(per_image: Sequence[Sequence[str]]) -> str:
    """The ``auto`` kind of an attribute from its values on each image."""
    if any(len(values) > 1 for values in per_image):
        return "multilabel"
    return "binary" if len({v for values in per_image for v in values}) == 2 else "multiclass"


def resolve_kinds(images: Sequence[Mapping[str, Sequence[str]]], configured: Mapping[str, str]) -> dict[str, str]:
    """Attribute -> kind: the configured attributes in config order (``auto`` guessed), or, with
    none configured, every attribute of the data in sorted order, all guessed."""
    names = list(configured) or sorted({a for image in images for a in image})
    kinds = {}
    for name in names:
        kind = configured.get(name, AUTO)
        kinds[name] = guess_kind([image.get(name, ()) for image in images]) if kind == AUTO else kind
    return kinds


@register
class MultiattributeTask(Task):
    """One binary, multi-class or multi-label sub-task per attribute, side by side on one backbone."""

    name = "multiattribute"
    label_form = "attributes"
    keys = ("attributes", "class_weights", "allow_empty")
    primary_val = "val/primary_mean"  # threshold-free per attribute (see the module docstring)
    primary_test = "test/f1_macro"
    headline = "val/f1_macro"
    curves = ("train/acc_mean", "val/acc_mean", "val/f1_macro", "val/primary_mean")
    confusion_plot = None  # the matrices are per attribute (confusion_<attribute>.png): their names depend on the data
    predictions_confusion = False  # predictions are several answers per image
    unit: ClassVar[str] = "value"
    output_text = (
        "one column per attribute (the value of a binary or multi-class attribute, the list of labels "
        "of a multi-label one) and one `prob_<attribute>=<value>` column per value"
    )

    def __init__(self, parts: Sequence[tuple[str, Task]]):
        self.parts = [(str(attribute), sub) for attribute, sub in parts]
        names: list[str] = []
        self.output_slices: list[slice] = []
        self.target_slices: list[slice] = []
        width = 0
        for attribute, sub in self.parts:
            values = [sub.positive] if isinstance(sub, BinaryTask) else sub.classes
            self.output_slices.append(slice(len(names), len(names) + len(values)))
            names += [f"{attribute}{ATTRIBUTE_SEP}{v}" for v in values]
            columns = 1 if sub.name in SINGLE else len(sub.classes)
            self.target_slices.append(slice(width, width + columns))
            width += columns
        self.target_width = width
        super().__init__(names)

    @property
    def attributes(self) -> list[str]:
        """The attribute names, in output order."""
        return [attribute for attribute, _ in self.parts]

    @property
    def kinds(self) -> dict[str, str]:
        """Attribute -> kind (``binary``, ``multiclass`` or ``multilabel``)."""
        return {attribute: sub.name for attribute, sub in self.parts}

    # ------------------------------------------------------------------ config and data checks
    @classmethod
    def check_config(cls, task_cfg: DictConfig, cfg: DictConfig, origin: str) -> None:
        """The shared checks, then each ``task.attributes`` entry: a usable name and a known kind."""
        super().check_config(task_cfg, cfg, origin)
        try:
            attributes = configured_attributes(task_cfg)
        except ConfigError as err:
            raise ConfigError(f"{origin}: {err}") from None
        for attribute, kind in attributes.items():
            bad = [sep for sep in (ATTRIBUTE_SEP, LABEL_SEP, PATH_SEP) if sep in attribute]
            if not attribute or bad:
                raise ConfigError(
                    f"{origin}: task.attributes.{attribute}: attribute names must be non-empty, without = | or /"
                )
            if kind not in (*KINDS, AUTO):
                raise ConfigError(
                    f"{origin}: task.attributes.{attribute}={kind!r}; use one of {', '.join((*KINDS, AUTO))}"
                )

    @classmethod
    def check_records(cls, records: list[Record], cfg: DictConfig) -> list[Record]:
        """Every label ``attribute=value``; every configured attribute present; at least 2 values
        per attribute (a binary one exactly 2); one value per image for a single-answer attribute
        (none allowed with ``task.allow_empty``). Labels of attributes not in a non-empty
        ``task.attributes`` are dropped. One :class:`DataError` lists every problem."""
        problems = Problems()
        problems.add(
            "labels are not of the form attribute=value, as task multiattribute needs",
            [f"{r.source_id}: {label!r}" for r in records for label in r.labels if parse_label(label) is None],
        )
        configured = configured_attributes(cfg.task)
        images = [values_by_attribute(r.labels) for r in records]
        if configured:
            dropped = sorted({a for image in images for a in image} - set(configured))
            if dropped:
                log.info("task.attributes lists %s: dropping the labels of %s", list(configured), dropped)
            images = [{a: v for a, v in image.items() if a in configured} for image in images]
        present = {a for image in images for a in image}
        if not present and not problems:
            raise DataError("no image has an attribute=value label: task multiattribute has nothing to learn")
        problems.add(
            "attribute(s) of task.attributes do not occur in the data",
            [f"task.attributes.{a}" for a in configured if a not in present],
        )
        allow_empty = bool(cfg.task.get("allow_empty", False))
        for attribute, kind in resolve_kinds(images, configured).items():
            if attribute not in present:
                continue
            values = sorted({v for image in images for v in image.get(attribute, ())})
            if len(values) < 2:
                problems.add("attribute(s) have fewer than 2 values", f"{attribute}: {values}")
            if kind == "binary" and len(values) > 2:
                problems.add("binary attribute(s) have more than 2 values", f"{attribute}: {values[:10]}")
            if kind not in SINGLE:
                continue
            if not allow_empty:
                problems.add(
                    f"rows whose attribute `{attribute}` has no value (set task.allow_empty=true if it may be "
                    f"unanswered, or task.attributes.{attribute}=multilabel if an image may have none of its values)",
                    [r.source_id for r, image in zip(records, images, strict=True) if not image.get(attribute)],
                )
            problems.add(
                f"rows with several values for single-answer attribute `{attribute}` ({kind}; "
                f"task.attributes.{attribute}=multilabel takes several)",
                [
                    f"{r.source_id}: {image[attribute]}"
                    for r, image in zip(records, images, strict=True)
                    if len(image.get(attribute, ())) > 1
                ],
            )
        problems.raise_if_any()
        return [
            replace(r, labels=tuple(f"{a}{ATTRIBUTE_SEP}{v}" for a in sorted(image) for v in image[a]))
            for r, image in zip(records, images, strict=True)
        ]

    @classmethod
    def strata(cls, label_cells: pd.Series, min_images_per_class: int) -> pd.Series:
        """As multi-label data: each image's rarest ``attribute=value`` (every value needs
        ``min_images_per_class`` images)."""
        return MultilabelTask.strata(label_cells, min_images_per_class)

    @classmethod
    def from_labels(cls, label_cells: Iterable[str], task_cfg: DictConfig | None = None) -> MultiattributeTask:
        """One sub-task per attribute (``task.attributes``, or every attribute of the data), built
        from that attribute's values by the sub-task's own ``from_labels``."""
        images = [values_by_attribute(split_labels(cell)) for cell in label_cells]
        configured = configured_attributes(task_cfg)
        for attribute, kind in configured.items():
            if kind not in (*KINDS, AUTO):
                raise ConfigError(f"task.attributes.{attribute}={kind!r}; use one of {', '.join((*KINDS, AUTO))}")
        kinds = resolve_kinds(images, configured)
        if not kinds:
            raise DataError("no attribute=value labels: task multiattribute needs at least one attribute")
        parts = []
        for attribute, kind in kinds.items():
            values = sorted({v for image in images for v in image.get(attribute, ())})
            try:
                parts.append((attribute, SUB_TASKS[kind].from_labels(values, None)))
            except DataError as err:
                raise DataError(f"attribute {attribute!r} ({kind}): {err}") from None
        return cls(parts)

    # ------------------------------------------------------------------ label space
    def to_dict(self) -> dict[str, Any]:
        """``classes`` (the outputs), and each attribute's name, kind and sub-task space."""
        return {
            "task": self.name,
            "classes": self.classes,
            "nodes": [],
            "attributes": [{"name": a, "kind": sub.name, "space": sub.to_dict()} for a, sub in self.parts],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiattributeTask:
        """Rebuild from :meth:`to_dict` output (each sub-task from its own dict)."""
        return cls(
            [(str(part["name"]), get_task(str(part["kind"])).from_dict(part["space"])) for part in data["attributes"]]
        )

    def size_text(self) -> str:
        """``3 attributes (tone: 6 classes, hand: 2 classes, tags: 8 labels)``."""
        inner = ", ".join(f"{a}: {sub.size_text()}" for a, sub in self.parts)
        return f"{len(self.parts)} attributes ({inner})"

    def encode(self, label_cells: Iterable[str]) -> np.ndarray:
        """The int64 target matrix (see the module docstring)."""
        cells = list(label_cells)
        out = np.zeros((len(cells), self.target_width), dtype=np.int64)
        known = set(self.attributes)
        for row, cell in enumerate(cells):
            labels = split_labels(cell)
            bad = [lbl for lbl in labels if parse_label(lbl) is None]
            if bad:
                raise DataError(f"label {bad[0]!r} is not of the form attribute=value")
            image = values_by_attribute(labels)
            unknown = sorted(set(image) - known)
            if unknown:
                raise DataError(f"attribute {unknown[0]!r} is not one of the model's attributes {self.attributes}")
            for (attribute, sub), cols in zip(self.parts, self.target_slices, strict=True):
                values = image.get(attribute, [])
                index = {c: i for i, c in enumerate(sub.classes)}
                missing = [v for v in values if v not in index]
                if missing:
                    raise DataError(f"label {attribute}={missing[0]!r} is not one of the model's labels")
                if sub.name in SINGLE:
                    if len(values) > 1:
                        raise DataError(f"{len(values)} values {values} for single-answer attribute {attribute!r}")
                    out[row, cols.start] = index[values[0]] if values else MISSING
                else:
                    for v in values:
                        out[row, cols.start + index[v]] = 1
        return out

    # ------------------------------------------------------------------ slices
    def _sub_target(self, target: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Attribute ``i``'s targets in its sub-task's form, and the rows where it is answered."""
        t = np.asarray(target)[:, self.target_slices[i]].astype(np.int64)
        if self.parts[i][1].name in SINGLE:
            t = t[:, 0]
            return t, t >= 0
        return t, np.ones(len(t), dtype=bool)

    def _sub_probs(self, probs: np.ndarray, i: int) -> np.ndarray:
        """Attribute ``i``'s probabilities in its sub-task's form (binary: 1-D)."""
        p = np.asarray(probs)[:, self.output_slices[i]]
        return p[:, 0] if isinstance(self.parts[i][1], BinaryTask) else p

    def _part(self, decision: Decision, attribute: str) -> Decision:
        try:
            return decision.parts[attribute]
        except KeyError:
            raise DataError(f"the decision has no part for attribute {attribute!r}: evaluate again") from None

    # ------------------------------------------------------------------ training (torch)
    def loss(self, label_smoothing: float = 0.0, weights: list[float] | None = None) -> torch.nn.Module:
        """The mean of the attributes' sub-task losses (``weights`` split by output slice)."""
        from taxonomist.tasks.nn import PerAttributeLoss

        losses = {
            attribute: sub.loss(label_smoothing, weights[out] if weights else None)
            for (attribute, sub), out in zip(self.parts, self.output_slices, strict=True)
        }
        return PerAttributeLoss(losses, self._layout())

    def metrics(self) -> MetricCollection:
        """Each attribute's sub-task metrics as ``<attribute>/<metric>``, plus ``f1_macro``,
        ``acc_mean`` and ``primary_mean`` (means over the attributes)."""
        from torchmetrics import MetricCollection

        from taxonomist.tasks.nn import PerAttributeMetrics

        summaries = {
            "f1_macro": [sub.primary_test.removeprefix("test/") for _, sub in self.parts],
            "acc_mean": [ACC_KEY[sub.name] for _, sub in self.parts],
            "primary_mean": [sub.primary_val.removeprefix("val/") for _, sub in self.parts],
        }
        metric = PerAttributeMetrics(
            self._layout(),
            [sub.metric_inputs for _, sub in self.parts],
            [sub.metrics() for _, sub in self.parts],
            summaries,
        )
        return MetricCollection({"attributes": metric}, compute_groups=False)

    def metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and targets themselves: :class:`PerAttributeMetrics` slices them and asks
        each sub-task's ``metric_inputs``."""
        return logits, target

    def torch_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat(
            [
                sub.torch_probabilities(logits[:, out]).reshape(len(logits), -1)
                for (_, sub), out in zip(self.parts, self.output_slices, strict=True)
            ],
            dim=1,
        )

    def _layout(self) -> list[tuple[str, tuple[int, int], tuple[int, int], bool]]:
        """Per attribute: name, output columns, target columns, single-answer."""
        return [
            (a, (out.start, out.stop), (cols.start, cols.stop), sub.name in SINGLE)
            for (a, sub), out, cols in zip(self.parts, self.output_slices, self.target_slices, strict=True)
        ]

    def class_weights(self, targets: np.ndarray) -> list[float]:
        """Each attribute's sub-task weights from its answered rows, in output order."""
        out: list[float] = []
        for i, (_, sub) in enumerate(self.parts):
            t, keep = self._sub_target(targets, i)
            out += sub.class_weights(t[keep])
        return out

    def sample_weights(self, targets: np.ndarray) -> np.ndarray:
        raise DataError("task.balanced_sampling needs a single-label task, not multiattribute")

    # ------------------------------------------------------------------ decisions (NumPy)
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Each attribute's sub-task probabilities side by side (the outputs' layout)."""
        logits = np.asarray(logits, dtype=np.float64)
        return np.concatenate(
            [
                np.asarray(sub.probabilities(logits[:, out])).reshape(len(logits), -1)
                for (_, sub), out in zip(self.parts, self.output_slices, strict=True)
            ],
            axis=1,
        )

    def tune(self, probs: np.ndarray, target: np.ndarray, task_cfg: DictConfig) -> Decision:
        """Each attribute's sub-task decision, tuned on its answered validation rows."""
        parts = {}
        for i, (attribute, sub) in enumerate(self.parts):
            t, keep = self._sub_target(target, i)
            parts[attribute] = sub.tune(self._sub_probs(probs, i)[keep], t[keep], task_cfg)
        return Decision([], separator(task_cfg), parts)

    def decide(self, probs: np.ndarray, decision: Decision) -> np.ndarray:
        """Decisions in the target layout: a value index per single-answer attribute, 0/1 per label."""
        out = np.zeros((len(probs), self.target_width), dtype=np.int64)
        for i, (attribute, sub) in enumerate(self.parts):
            picked = sub.decide(self._sub_probs(probs, i), self._part(decision, attribute))
            cols = self.target_slices[i]
            if sub.name in SINGLE:
                out[:, cols.start] = picked
            else:
                out[:, cols] = picked
        return out

    def calibration_groups(self) -> list[tuple[slice, str]]:
        """Each attribute's sub-task groups, in its output columns."""
        return [
            (slice(out.start + group.start, out.start + group.stop), kind)
            for (_, sub), out in zip(self.parts, self.output_slices, strict=True)
            for group, kind in sub.calibration_groups()
        ]

    def questions(self, probs: np.ndarray) -> list[Question]:
        """Each attribute's sub-task questions, named ``<attribute>: ...``."""
        return [
            question.prefixed(attribute)
            for i, (attribute, sub) in enumerate(self.parts)
            for question in sub.questions(self._sub_probs(probs, i))
        ]

    def question_targets(self, target: np.ndarray) -> list[np.ndarray]:
        """Each attribute's sub-task targets; -1 where the image does not answer the attribute."""
        out = []
        for i, (_, sub) in enumerate(self.parts):
            t, keep = self._sub_target(target, i)
            out += [np.where(keep, q, -1) for q in sub.question_targets(t)]
        return out

    def decision_text(self, decision: Decision) -> str:
        return "; ".join(
            f"{attribute}: {sub.decision_text(self._part(decision, attribute))}" for attribute, sub in self.parts
        )

    # ------------------------------------------------------------------ evaluation and serving
    def _texts(self, matrix: np.ndarray, i: int) -> list[str]:
        """Attribute ``i``'s answers of a target-layout matrix as text ("" when unanswered)."""
        sub = self.parts[i][1]
        cols = np.asarray(matrix)[:, self.target_slices[i]]
        if sub.name in SINGLE:
            return [sub.classes[v] if v >= 0 else "" for v in cols[:, 0]]
        names = np.asarray(sub.classes, dtype=object)
        return [LABEL_SEP.join(names[row == 1]) for row in cols]

    def _image_text(self, per_attribute: list[list[str]], row: int) -> str:
        """``tone=3-medium | hand=no | tags=[smile, wink]`` (unanswered attributes left out)."""
        words = []
        for (attribute, sub), texts in zip(self.parts, per_attribute, strict=True):
            text = texts[row]
            if sub.name in SINGLE:
                if text:
                    words.append(f"{attribute}={text}")
            else:
                words.append(f"{attribute}=[{', '.join(split_labels(text))}]")
        return " | ".join(words)

    def evaluate(self, probs: np.ndarray, target: np.ndarray, decision: Decision) -> Evaluation:
        """Each attribute's sub-task evaluation (on its answered rows), prefixed ``<attribute>/``,
        plus ``f1_macro`` and ``acc_mean`` (means over the attributes) and ``exact_match`` (the
        share of images with every attribute right)."""
        per_metrics: dict[str, float] = {}
        tables, confusions, curves = [], {}, {}
        f1s, accs = [], []
        wrong = np.zeros(len(probs), dtype=np.int64)
        pred = self.decide(probs, decision)
        for i, (attribute, sub) in enumerate(self.parts):
            t, keep = self._sub_target(target, i)
            result = sub.evaluate(self._sub_probs(probs, i)[keep], t[keep], self._part(decision, attribute))
            per_metrics.update({f"{attribute}/{k}": v for k, v in result.metrics.items()})
            f1s.append(result.metrics[sub.primary_test.removeprefix("test/")])
            accs.append(result.metrics[ACC_KEY[sub.name]])
            table = result.per_class.copy()
            table["class"] = [f"{attribute}{ATTRIBUTE_SEP}{c}" for c in table["class"]]
            table.insert(0, "attribute", attribute)
            tables.append(table)
            for matrix, names in result.confusions.values():
                confusions[f"confusion_{attribute}"] = (matrix, names)
            curves.update({f"{name}_{attribute}": frame for name, frame in result.curves.items()})
            p, _ = self._sub_target(pred, i)
            differs = (p != t) if sub.name in SINGLE else (p != t).any(axis=1)
            wrong += (differs & keep).astype(np.int64)
        metrics = rounded(
            {"f1_macro": np.mean(f1s), "acc_mean": np.mean(accs), "exact_match": float((wrong == 0).mean())}
        )
        metrics.update(per_metrics)
        actual = [self._texts(target, i) for i in range(len(self.parts))]
        predicted = [self._texts(pred, i) for i in range(len(self.parts))]
        columns: dict[str, Any] = {
            "actual": [self._image_text(actual, r) for r in range(len(probs))],
            "predicted": [self._image_text(predicted, r) for r in range(len(probs))],
            "wrong_attributes": wrong,
        }
        for attribute, a, p in zip(self.attributes, actual, predicted, strict=True):
            columns[f"actual_{attribute}"] = a
            columns[f"predicted_{attribute}"] = p
        return Evaluation(
            metrics,
            pd.concat(tables, ignore_index=True),
            pd.DataFrame(columns),
            confusions,
            curves,
            worst_first(np.flatnonzero(wrong > 0), wrong, kind="stable"),
        )

    def answer(self, probs: np.ndarray, decision: Decision) -> pd.DataFrame:
        """One column per attribute (a value, or a list for a multi-label attribute) and one
        ``prob_<attribute>=<value>`` column per value."""
        answers: dict[str, list[Any]] = {}
        prob_parts = []
        for i, (attribute, sub) in enumerate(self.parts):
            p = self._sub_probs(probs, i)
            picked = sub.decide(p, self._part(decision, attribute))
            names = np.asarray(sub.classes, dtype=object)
            if sub.name in SINGLE:
                answers[attribute] = [sub.classes[int(j)] for j in picked]
            else:
                answers[attribute] = [list(names[row]) for row in picked]
            if isinstance(sub, BinaryTask):
                p = np.stack([1.0 - p, p], axis=1)
            prob_parts.append(([f"{attribute}{ATTRIBUTE_SEP}{c}" for c in sub.classes], p))
        frame = pd.DataFrame(answers)
        for names, p in prob_parts:
            frame = with_prob_columns(frame, names, p)
        return frame

    def answer_text(self, row: pd.Series) -> str:
        """``tone=3-medium, hand=no, tags=[smile]``."""
        words = []
        for attribute, sub in self.parts:
            value = row[attribute]
            words.append(
                f"{attribute}={value}" if sub.name in SINGLE else f"{attribute}=[{', '.join(map(str, value))}]"
            )
        return ", ".join(words)
