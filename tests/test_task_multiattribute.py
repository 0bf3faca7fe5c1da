"""The multiattribute task: binary, multi-class and multi-label sub-tasks side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import taxonomist.tasks.multiattribute  # noqa: F401  (registers the task)
from taxonomist.config import compose
from taxonomist.data.manifest import Record
from taxonomist.errors import ConfigError, DataError
from taxonomist.tasks import Decision, get_task, load_task
from taxonomist.tasks.multiattribute import MultiattributeTask

CELLS = [
    "hand=no|tags=smile|tone=1-light",
    "hand=yes|tags=smile|tags=wink|tone=2-medium",
    "hand=no|tone=3-dark",
    "hand=yes|tags=wink|tone=1-light",
    "hand=no|tags=smile|tone=2-medium",
    "hand=yes|tone=3-dark",
]
TUNE_CFG = OmegaConf.create({"threshold": {"mode": "max_f1", "value": 0.5}, "path_separator": None})


def task_cfg(attributes: dict | None = None) -> DictConfig:
    return OmegaConf.create({"attributes": attributes or {}})


def pipeline_cfg(attributes: dict | None = None, allow_empty: bool = False):
    task = {"name": "multiattribute", "attributes": attributes or {}, "allow_empty": allow_empty}
    return OmegaConf.create({"task": task, "data": {"max_labels": 0}})


def rec(i: int, *labels: str) -> Record:
    return Record(f"images/{i}.png", tuple(labels), "", f"h{i}", f"labels.csv row {i}")


@pytest.fixture
def space() -> MultiattributeTask:
    return MultiattributeTask.from_labels(CELLS, task_cfg())


def perfect_probs(space: MultiattributeTask, target: np.ndarray) -> np.ndarray:
    """Probabilities that put (nearly) everything on the true answers."""
    probs = np.zeros((len(target), space.num_outputs))
    for i, (_, sub) in enumerate(space.parts):
        out, cols = space.output_slices[i], space.target_slices[i]
        if sub.name == "multiclass":
            probs[np.arange(len(target)), out.start + target[:, cols.start]] = 1.0
        else:  # binary: the positive's probability; multilabel: one per label
            probs[:, out] = np.where(target[:, cols] == 1, 0.9, 0.1)
    return probs


# --------------------------------------------------------------------------- label space


def test_auto_kinds_and_outputs(space):
    assert space.kinds == {"hand": "binary", "tags": "multilabel", "tone": "multiclass"}
    assert space.classes == [
        "hand=yes",
        "tags=smile",
        "tags=wink",
        "tone=1-light",
        "tone=2-medium",
        "tone=3-dark",
    ]
    assert space.num_outputs == space.num_backbone_outputs == 6
    assert space.parts[0][1].classes == ["no", "yes"]  # binary: positive = last sorted value
    assert "3 attributes" in space.size_text()


def test_configured_kinds_keep_config_order_and_leave_other_attributes_out():
    space = MultiattributeTask.from_labels(CELLS, task_cfg({"tone": "multiclass", "hand": "multiclass"}))
    assert space.kinds == {"tone": "multiclass", "hand": "multiclass"}
    assert space.classes == ["tone=1-light", "tone=2-medium", "tone=3-dark", "hand=no", "hand=yes"]
    assert space.encode(["hand=yes|tone=3-dark"]).tolist() == [[2, 1]]


def test_round_trip_through_labels_json(space):
    data = space.to_dict()
    assert data["task"] == "multiattribute" and data["nodes"] == []
    assert [a["name"] for a in data["attributes"]] == ["hand", "tags", "tone"]
    assert data["attributes"][0] == {
        "name": "hand",
        "kind": "binary",
        "space": {"task": "binary", "classes": ["no", "yes"], "nodes": []},
    }
    rebuilt = load_task(data)
    assert isinstance(rebuilt, MultiattributeTask) and rebuilt == space
    assert rebuilt.output_slices == space.output_slices and rebuilt.target_slices == space.target_slices


def test_encode(space):
    y = space.encode(CELLS[:3])
    assert y.dtype == np.int64
    # hand (0/1) | tags smile, wink (0/1 each) | tone (class index)
    assert y.tolist() == [[0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 2]]
    assert space.empty_targets().shape == (0, 4)
    with pytest.raises(DataError, match="not one of the model's labels"):
        space.encode(["hand=maybe|tone=1-light"])
    with pytest.raises(DataError, match="single-answer attribute 'tone'"):
        space.encode(["hand=no|tone=1-light|tone=3-dark"])


# --------------------------------------------------------------------------- checks


def test_check_records_reports_every_problem_at_once():
    records = [
        rec(1, "quality=good", "weather=sunny"),
        rec(2, "quality=bad", "quality=good", "weather=rainy"),
        rec(3, "quality=good"),  # no weather
        rec(4, "nonsense", "weather=sunny"),
        rec(5, "quality=bad", "weather=rainy", "mood=happy"),
    ]
    cfg = pipeline_cfg({"quality": "binary", "weather": "auto", "season": "multiclass"})
    with pytest.raises(DataError) as err:
        get_task("multiattribute").check_records(records, cfg)
    message = str(err.value)
    assert "not of the form attribute=value" in message and "'nonsense'" in message
    assert "rows whose attribute `weather` has no value" in message and "labels.csv row 3" in message
    assert "several values for single-answer attribute `quality`" in message and "labels.csv row 2" in message
    assert "task.attributes.season" in message  # configured but absent
    assert "rows whose attribute `quality` has no value" in message  # row 4


def test_check_records_normalises_drops_unlisted_attributes_and_allows_empty():
    records = [rec(1, "tone=b", "hand=no", "extra=x"), rec(2, "hand=yes"), rec(3, "tone=a", "hand=no", "hand=no")]
    cfg = pipeline_cfg({"hand": "auto", "tone": "multiclass"}, allow_empty=True)
    out = get_task("multiattribute").check_records(records, cfg)
    assert [r.labels for r in out] == [("hand=no", "tone=b"), ("hand=yes",), ("hand=no", "tone=a")]
    space = MultiattributeTask.from_labels(["|".join(r.labels) for r in out], cfg.task)
    assert space.encode(["hand=yes"]).tolist() == [[1, -1]]  # unanswered tone


def test_attribute_with_one_value_is_refused():
    with pytest.raises(DataError, match="fewer than 2 values"):
        get_task("multiattribute").check_records([rec(1, "a=x", "b=1"), rec(2, "a=x", "b=2")], pipeline_cfg())


def test_unknown_kind_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"task\.attributes\.tone='ordinalish'"):
        compose(["task=multiattribute", "+task.attributes.tone=ordinalish"])
    cfg = compose(["task=multiattribute", "+task.attributes.tone=multiclass"])
    assert dict(cfg.task.attributes) == {"tone": "multiclass"}
    with pytest.raises(ConfigError, match=r"task\.positive_label is a key of task binary"):
        compose(["task=multiattribute", "task.positive_label=yes"])


# --------------------------------------------------------------------------- training side


def test_loss_is_finite_backpropagates_and_skips_unanswered(space):
    torch.manual_seed(0)
    y = torch.as_tensor(space.encode(CELLS), dtype=torch.float32)  # as the datamodule hands 2-D targets over
    logits = torch.randn(len(CELLS), space.num_outputs, requires_grad=True)
    weights = space.class_weights(space.encode(CELLS))
    assert len(weights) == space.num_outputs
    loss = space.loss(0.1, weights)(logits, y)
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and bool((logits.grad.abs().sum(0) > 0).all())
    # the mean of the sub-losses, each on its own slice
    subs = [sub.loss() for _, sub in space.parts]
    y_long = y.long()
    expected = (
        subs[0](logits[:, 0:1], y_long[:, 0])
        + subs[1](logits[:, 1:3], y_long[:, 1:3])
        + subs[2](logits[:, 3:6], y_long[:, 3])
    ) / 3
    assert torch.allclose(space.loss()(logits, y), expected)
    # an unanswered tone (-1) leaves that row out of the tone loss
    y2 = y.clone()
    y2[0, 3] = -1
    logits2 = logits.detach().clone().requires_grad_(True)
    space.loss()(logits2, y2).backward()
    assert bool((logits2.grad[0, 3:6] == 0).all()) and bool((logits2.grad[0, :3] != 0).any())


def test_loss_module_holds_the_sub_losses_by_attribute():
    space = MultiattributeTask.from_labels(["a.b=x|c=1", "a.b=y|c=2", "a.b=z|c=1"], task_cfg())
    loss = space.loss(0.2)
    assert list(loss.losses) == ["a_b", "c"]
    assert loss.losses["a_b"].label_smoothing == 0.2  # label smoothing reaches the multi-class attribute


def test_metrics_update_and_compute(space):
    y = torch.as_tensor(space.encode(CELLS), dtype=torch.float32)
    logits = torch.randn(len(CELLS), space.num_outputs)
    metrics = space.metrics().clone(prefix="val/")
    metrics.update(*space.metric_inputs(logits, y))
    values = metrics.compute()
    for key in (
        "val/f1_macro",
        "val/acc_mean",
        "val/primary_mean",
        "val/tone/acc",
        "val/hand/auroc",
        "val/tags/ap_macro",
    ):
        assert key in values, key
    assert space.headline in values and space.primary_val in values
    assert {c for c in space.curves if c.startswith("val/")} <= set(values)
    metrics.reset()
    # perfect logits: every attribute's F1 is 1
    perfect = torch.as_tensor(
        np.log(np.clip(perfect_probs(space, space.encode(CELLS)), 1e-6, None)), dtype=torch.float32
    )
    perfect[:, :3] = torch.where(y[:, :3] == 1, 5.0, -5.0)  # sigmoid outputs: large logits
    metrics.update(*space.metric_inputs(perfect, y))
    values = metrics.compute()
    assert float(values["val/f1_macro"]) == pytest.approx(1.0)
    assert float(values["val/tone/acc"]) == pytest.approx(1.0)


def test_torch_and_numpy_probabilities_agree(space):
    logits = np.random.default_rng(0).normal(size=(5, space.num_outputs))
    expected = space.probabilities(logits)
    got = space.torch_probabilities(torch.as_tensor(logits)).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.allclose(expected[:, 3:6].sum(1), 1.0)  # the multi-class slice is a softmax


# --------------------------------------------------------------------------- decision, evaluation, answer


def test_tune_decide_evaluate_perfect_predictions(space):
    target = space.encode(CELLS)
    probs = perfect_probs(space, target)
    decision = space.tune(probs, target, TUNE_CFG)
    assert set(decision.parts) == {"hand", "tags", "tone"}
    assert len(decision.parts["hand"].thresholds) == 1 and len(decision.parts["tags"].thresholds) == 2
    assert Decision.from_dict(decision.to_dict()) == decision
    np.testing.assert_array_equal(space.decide(probs, decision), target)
    result = space.evaluate(probs, target, decision)
    assert result.metrics["f1_macro"] == 1.0 and result.metrics["exact_match"] == 1.0
    for key in ("hand/f1", "tags/f1_macro", "tone/f1_macro", "acc_mean"):
        assert result.metrics[key] == 1.0, key
    assert list(result.per_class["class"][:2]) == ["hand=no", "hand=yes"]
    assert set(result.per_class["attribute"]) == {"hand", "tags", "tone"}
    assert set(result.confusions) == {"confusion_hand", "confusion_tone"}
    assert result.predictions["actual"][1] == "hand=yes | tags=[smile, wink] | tone=2-medium"
    assert (result.predictions["actual"] == result.predictions["predicted"]).all()
    assert len(result.mistakes) == 0


def test_evaluate_counts_wrong_attributes_most_wrong_first(space):
    target = space.encode(CELLS)
    probs = perfect_probs(space, target)
    decision = Decision(parts={"hand": Decision([0.5]), "tags": Decision([0.5, 0.5]), "tone": Decision()})
    probs[2, 3:6] = [1.0, 0.0, 0.0]  # row 2: tone wrong
    probs[4, 3:6] = [0.0, 0.0, 1.0]  # row 4: tone wrong
    probs[4, 0] = 0.9  # and hand wrong
    result = space.evaluate(probs, target, decision)
    assert result.mistakes.tolist() == [4, 2]
    assert result.predictions["wrong_attributes"].tolist() == [0, 0, 1, 0, 2, 0]
    assert result.predictions["predicted_tone"][2] == "1-light"
    assert result.metrics["tone/acc"] == pytest.approx(4 / 6, abs=1e-6)
    assert result.metrics["exact_match"] == pytest.approx(4 / 6, abs=1e-6)


def test_answer_columns_and_text(space):
    target = space.encode(CELLS[:2])
    probs = perfect_probs(space, target)
    decision = Decision(parts={"hand": Decision([0.5]), "tags": Decision([0.5, 0.5]), "tone": Decision()})
    frame = space.answer(probs, decision)
    assert list(frame.columns[:3]) == ["hand", "tags", "tone"]
    assert "prob_hand=no" in frame and "prob_hand=yes" in frame and "prob_tone=3-dark" in frame
    assert frame["hand"].tolist() == ["no", "yes"]
    assert frame["tags"].tolist() == [["smile"], ["smile", "wink"]]
    assert frame["tone"].tolist() == ["1-light", "2-medium"]
    assert frame["prob_hand=no"][0] == pytest.approx(0.9)
    assert space.answer_text(frame.iloc[1]) == "hand=yes, tags=[smile, wink], tone=2-medium"
    assert "hand: `yes` when its probability >= 0.5000" in space.decision_text(decision)
    empty = space.answer(np.zeros((0, space.num_outputs)), decision)
    assert list(empty.columns) == list(frame.columns) and len(empty) == 0
