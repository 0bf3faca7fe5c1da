"""The ordinal task (CORAL): class order, probabilities, decision, loss, metrics, evaluation,
served answer and ONNX export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import taxonomist.tasks.ordinal  # noqa: F401  (registers the task)
from taxonomist.data.manifest import Record
from taxonomist.errors import ConfigError, DataError
from taxonomist.export.onnx import INPUT_NAME, export_onnx
from taxonomist.tasks.base import UNSET, Decision
from taxonomist.tasks.nn import CoralHead, CoralLoss, coral_rank
from taxonomist.tasks.ordinal import OrdinalTask, natural_key
from taxonomist.tasks.registry import get_task, load_task

GRADES = ["1", "2", "3", "4", "5"]


def task_cfg(**keys: object):
    """A ``task`` section with every key (as conf/config.yaml gives them) plus ``keys``."""
    return OmegaConf.create({**UNSET, "name": "ordinal", "threshold": {"mode": "max_f1", "value": 0.5}, **keys})


def logits_for(above: list[list[float]]) -> np.ndarray:
    """CORAL logits whose sigmoids are the given ``P(y > k)`` rows."""
    p = np.asarray(above, dtype=np.float64)
    return np.log(p / (1 - p))


@pytest.fixture
def task() -> OrdinalTask:
    return OrdinalTask(GRADES)


# --------------------------------------------------------------------------- class order


def test_registered_and_round_trips_through_labels_json(task):
    assert get_task("ordinal") is OrdinalTask
    assert load_task(task.to_dict()) == task
    assert task.num_outputs == 4 and task.num_backbone_outputs == 1
    assert "order" in OrdinalTask.keys and "class_weights" in OrdinalTask.keys


def test_natural_order_compares_numbers_as_numbers():
    cells = ["10", "2", "1", "2", "9"]
    assert OrdinalTask.from_labels(cells, task_cfg()).classes == ["1", "2", "9", "10"]
    tones = ["5-dark", "1-light", "3-medium", "2-medium-light", "4-medium-dark"]
    assert OrdinalTask.from_labels(tones).classes == [
        "1-light",
        "2-medium-light",
        "3-medium",
        "4-medium-dark",
        "5-dark",
    ]
    assert sorted(["grade 10", "Grade 9", "grade 1"], key=natural_key) == ["grade 1", "Grade 9", "grade 10"]


def test_order_from_config_wins_over_the_natural_order():
    cfg = task_cfg(order=["low", "medium", "high"])
    assert OrdinalTask.from_labels(["high", "low", "medium", "low"], cfg).classes == ["low", "medium", "high"]
    numbers = task_cfg(order=[3, 2, 1])  # YAML numbers are class names too
    assert OrdinalTask.from_labels(["1", "2", "3"], numbers).classes == ["3", "2", "1"]


def test_order_must_name_exactly_the_classes_of_the_data():
    with pytest.raises(DataError, match=r"does not list: \['huge'\]"):
        OrdinalTask.from_labels(["low", "high", "huge"], task_cfg(order=["low", "high"]))
    with pytest.raises(DataError, match=r"data does not have: \['medium'\]"):
        OrdinalTask.from_labels(["low", "high"], task_cfg(order=["low", "medium", "high"]))
    with pytest.raises(DataError, match="at least 2 classes"):
        OrdinalTask.from_labels(["low", "low"], task_cfg())


def test_check_records_checks_the_order_at_ingest():
    records = [Record(f"{i}.png", (lbl,), "", f"h{i}", f"row {i}") for i, lbl in enumerate(["a", "b", "c"])]
    cfg = OmegaConf.create({"task": task_cfg(order=["a", "b"]), "data": {"max_labels": 0}})
    with pytest.raises(DataError, match=r"\['c'\]"):
        OrdinalTask.check_records(records, cfg)
    cfg.task.order = ["c", "b", "a"]
    assert OrdinalTask.check_records(records, cfg) == records


def test_check_config_refuses_bad_orders_and_threshold_keys_stay_shared():
    OrdinalTask.check_config(task_cfg(order=["a", "b", "c"]), OmegaConf.create({}), "test")
    with pytest.raises(ConfigError, match=r"\['a'\] more than once"):
        OrdinalTask.check_config(task_cfg(order=["a", "b", "a"]), OmegaConf.create({}), "test")
    with pytest.raises(ConfigError, match="must be a list"):
        OrdinalTask.check_config(task_cfg(order="a,b"), OmegaConf.create({}), "test")
    with pytest.raises(ConfigError, match="positive_label"):
        OrdinalTask.check_config(task_cfg(positive_label="a"), OmegaConf.create({}), "test")


# --------------------------------------------------------------------------- probabilities and decision


def test_probabilities_are_a_distribution_even_with_unordered_biases(task):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (200, 4))  # random: often not decreasing in k
    probs = task.probabilities(logits)
    assert probs.shape == (200, 5)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    torch_probs = task.torch_probabilities(torch.from_numpy(logits).float()).double().numpy()
    np.testing.assert_allclose(torch_probs, probs, atol=1e-6)


def test_probabilities_of_ordered_logits_are_the_coral_differences(task):
    above = [[0.9, 0.7, 0.4, 0.1]]
    np.testing.assert_allclose(task.probabilities(logits_for(above)), [[0.1, 0.2, 0.3, 0.3, 0.1]], atol=1e-12)


def test_decision_counts_thresholds_above_one_half(task):
    above = [
        [0.1, 0.05, 0.02, 0.01],  # -> 0
        [0.9, 0.7, 0.4, 0.1],  # -> 2
        [0.99, 0.98, 0.97, 0.96],  # -> 4
        [0.6, 0.4, 0.3, 0.2],  # -> 1: the median (p = .4 .2 .1 .1 .2: the mode is 0)
        [0.9, 0.3, 0.8, 0.1],  # unordered: the running minimum makes it 1 (CORAL's count would say 2)
    ]
    logits = logits_for(above)
    probs = task.probabilities(logits)
    np.testing.assert_array_equal(task.decide(probs, Decision()), [0, 2, 4, 1, 1])
    np.testing.assert_array_equal(coral_rank(torch.from_numpy(logits)).numpy(), [0, 2, 4, 1, 1])


def test_decision_is_the_median_not_the_mode(task):
    probs = np.array([[0.45, 0.0, 0.1, 0.0, 0.45]])  # mode 0 (or 4), median 2
    assert task.decide(probs, Decision()).tolist() == [2]


# --------------------------------------------------------------------------- training (torch)


def test_coral_loss_is_the_sum_of_threshold_bces():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, -0.5, -3.0]])
    target = torch.tensor([2, 0])
    levels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, levels, reduction="none").sum(1)
    assert CoralLoss()(logits, target).item() == pytest.approx(expected.mean().item())
    weighted = CoralLoss([1.0, 2.0, 3.0, 4.0])(logits, target)  # weights of classes 2 and 0: 3 and 1
    assert weighted.item() == pytest.approx(((3 * expected[0] + 1 * expected[1]) / 4).item())


def test_coral_head_starts_at_a_uniform_distribution_and_keeps_the_backbone_score():
    backbone = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(backbone.weight)
    torch.nn.init.zeros_(backbone.bias)
    model = CoralHead(backbone, 5)
    logits = model(torch.randn(4, 3))
    assert logits.shape == (4, 4)
    np.testing.assert_allclose(
        OrdinalTask(GRADES).probabilities(logits.detach().numpy()), np.full((4, 5), 0.2), atol=1e-6
    )


def test_loss_decreases_on_a_tiny_ordinal_problem(task):
    torch.manual_seed(0)
    x = torch.rand(256, 2)
    y = torch.clamp((x[:, 0] * 5).long(), max=4)  # the grade is a monotone function of the first feature
    model = task.wrap_model(torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)))
    criterion = task.loss(0.1, task.class_weights(y.numpy()))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = criterion(model(x), y).item()
    for _ in range(150):
        opt.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    metrics = task.metrics()
    metrics.update(*task.metric_inputs(model(x).detach(), y))
    values = metrics.compute()
    assert values["acc"] > 0.7 and values["qwk"] > 0.9 and values["mae"] < 0.3


def test_metrics_with_known_answers(task):
    target = torch.tensor([0, 1, 2, 3, 4, 2, 1])
    metrics = task.metrics()
    metrics.update(target.clone(), target)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values == pytest.approx({"acc": 1.0, "mae": 0.0, "qwk": 1.0, "f1_macro": 1.0})
    metrics.reset()
    off = torch.tensor([1, 0, 3, 2, 3, 1, 2])  # every prediction one grade away
    metrics.update(off, target)
    values = {k: float(v) for k, v in metrics.compute().items()}
    assert values["acc"] == 0.0 and values["mae"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- evaluation and serving


def one_hot_probs(pred: list[int], k: int = 5, sure: float = 0.9) -> np.ndarray:
    """Class probabilities whose median is ``pred`` (``sure`` on it, the rest spread evenly)."""
    probs = np.full((len(pred), k), (1 - sure) / (k - 1))
    probs[np.arange(len(pred)), pred] = sure
    return probs


def test_evaluate_perfect_and_off_by_one(task):
    target = np.array([0, 1, 2, 3, 4, 2])
    perfect = task.evaluate(one_hot_probs(target.tolist()), target, Decision())
    assert perfect.metrics["acc"] == 1.0 and perfect.metrics["mae"] == 0.0 and perfect.metrics["qwk"] == 1.0
    assert perfect.metrics["off_by_one"] == 1.0 and len(perfect.mistakes) == 0

    pred = [1, 0, 3, 4, 3, 1]
    result = task.evaluate(one_hot_probs(pred), target, Decision())
    m = result.metrics
    assert m["acc"] == 0.0 and m["off_by_one"] == 1.0 and m["mae"] == pytest.approx(1.0)
    assert m["mean_error"] == pytest.approx(0.0)
    expected_keys = {"acc", "balanced_acc", "f1_macro", "f1_weighted", "mae", "mean_error", "qwk", "off_by_one", "nll"}
    assert expected_keys <= set(m)
    matrix, names = result.confusions["confusion_matrix"]
    assert matrix.shape == (5, 5) and names == GRADES
    assert matrix[0, 1] == 1 and matrix[2, 3] == 1 and matrix[2, 1] == 1 and matrix.sum() == 6  # rows true
    assert list(result.predictions.columns) == ["actual", "predicted", "confidence", "error"]
    assert result.predictions["error"].tolist() == [1, -1, 1, 1, -1, -1]
    assert list(result.per_class["class"]) == GRADES and "mae" in result.per_class


def test_mistakes_are_sorted_by_error_size_then_confidence(task):
    target = np.array([0, 0, 0, 0])
    probs = np.vstack([one_hot_probs([1], sure=0.6), one_hot_probs([4], sure=0.55), one_hot_probs([1], sure=0.9)])
    probs = np.vstack([probs, one_hot_probs([0])])
    result = task.evaluate(probs, target, Decision())
    assert result.mistakes.tolist() == [1, 2, 0]


def test_qwk_penalises_far_mistakes_more(task):
    target = np.array([0, 1, 2, 3, 4] * 4)
    near = np.clip(target + np.tile([1, -1], 10), 0, 4)
    far = np.clip(target + np.tile([3, -3], 10), 0, 4)
    near_qwk = task.evaluate(one_hot_probs(near.tolist()), target, Decision()).metrics["qwk"]
    far_qwk = task.evaluate(one_hot_probs(far.tolist()), target, Decision()).metrics["qwk"]
    assert near_qwk > far_qwk


def test_answer_columns_and_text(task):
    logits = logits_for([[0.9, 0.7, 0.4, 0.1], [0.1, 0.05, 0.02, 0.01]])
    frame = task.answer(task.probabilities(logits), Decision())
    assert list(frame.columns) == ["label", "rank", "score"] + [f"prob_{g}" for g in GRADES]
    assert frame["label"].tolist() == ["3", "1"] and frame["rank"].tolist() == [2, 0]
    assert frame["score"].tolist() == pytest.approx([0.3, 0.9])
    assert task.answer_text(frame.iloc[0]) == "3\t0.3000\t(level 3 of 5)"
    empty = task.answer(task.probabilities(np.zeros((0, 4))), Decision())
    assert isinstance(empty, pd.DataFrame) and len(empty) == 0 and list(empty.columns) == list(frame.columns)
    assert "median" in task.decision_text(Decision()) and "`rank`" in task.output_text
    assert task.size_text() == "5 ordered classes (1 < 2 < 3 < 4 < 5)"


def test_coral_model_exports_to_onnx_and_runtime_matches_torch(task, tmp_path):
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model("test_resnet", num_classes=task.num_backbone_outputs, in_chans=3)
    model = task.wrap_model(backbone).eval()
    with torch.no_grad():
        model.bias.add_(torch.linspace(0.3, -0.3, 4))  # not the initial values
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, task.num_outputs)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_array_equal(
            task.decide(task.probabilities(got), Decision()), coral_rank(torch.from_numpy(expected)).numpy()
        )
