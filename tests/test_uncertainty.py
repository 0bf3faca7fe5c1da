"""Calibration (temperature / Platt, fitted on validation logits) and split-conformal sets:
fitted values recovered from data made with known miscalibration, coverage on fresh data, the
served columns, and the decision that carries them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_calibration_error

import taxonomist.tasks.multiattribute  # noqa: F401  (registers the task)
from taxonomist.errors import ConfigError
from taxonomist.evaluation.calibration import calibration_report, conformal_thresholds, fit_calibration
from taxonomist.export.serving import answer_frame
from taxonomist.stages.evaluate import fit_decision
from taxonomist.tasks import Decision, get_task
from taxonomist.tasks.base import softmax
from taxonomist.tasks.multiattribute import MultiattributeTask
from taxonomist.tasks.uncertainty import (
    conformal_summary,
    conformal_threshold,
    reliability_bins,
    top_label,
    uncertainty_columns,
)

MULTICLASS = get_task("multiclass")([f"c{i}" for i in range(6)])
BINARY = get_task("binary")(["cat", "dog"])
MULTILABEL = get_task("multilabel")(["a", "b", "c"])
ORDINAL = get_task("ordinal")(["1", "2", "3", "4"])
TREE = get_task("hierarchical").from_labels(["Tops/Shirt", "Tops/Coat", "Footwear/Sneaker", "Bag"])


def softmax_data(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True logits and labels drawn from their softmax: perfectly calibrated at temperature 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, k)) + 2.0 * np.eye(k)[rng.integers(0, k, n)]
    p = softmax(z)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z, y


def test_temperature_scaling_recovers_an_overconfident_network():
    z, y = softmax_data(4000, 6, seed=0)
    scale, bias = fit_calibration(MULTICLASS, 3.0 * z, y)  # logits three times too sharp
    assert scale == pytest.approx([1 / 3] * 6, rel=0.08)
    assert len(set(scale)) == 1 and bias == [0.0] * 6  # one temperature, no bias: argmax kept
    z_test, y_test = softmax_data(4000, 6, seed=1)
    decision = Decision(scale=scale, bias=bias)
    raw, calibrated = (
        MULTICLASS.probabilities(3.0 * z_test),
        MULTICLASS.calibrated_probabilities(3.0 * z_test, decision),
    )
    assert (raw.argmax(1) == calibrated.argmax(1)).all()
    targets = MULTICLASS.question_targets(y_test)
    ece_raw = binary_calibration_error(*map(torch.as_tensor, top_label(MULTICLASS.questions(raw), targets)))
    ece = binary_calibration_error(*map(torch.as_tensor, top_label(MULTICLASS.questions(calibrated), targets)))
    assert ece_raw > 0.08 and ece < 0.03


def test_platt_scaling_per_sigmoid():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(6000, 3))
    a, b = np.array([0.5, 2.0, 1.0]), np.array([-1.0, 0.5, 0.0])
    y = (rng.random((6000, 3)) < 1 / (1 + np.exp(-(a * logits + b)))).astype(np.float32)
    scale, bias = fit_calibration(MULTILABEL, logits, y)
    assert scale == pytest.approx(a.tolist(), rel=0.1)
    assert bias == pytest.approx(b.tolist(), abs=0.12)
    one = fit_calibration(BINARY, logits[:, :1], y[:, 0])
    assert one[0] == pytest.approx([0.5], rel=0.1) and one[1] == pytest.approx([-1.0], abs=0.12)


def test_ordinal_and_tree_calibrate_with_one_temperature():
    rng = np.random.default_rng(3)
    score = rng.normal(0, 2, size=(3000, 1))
    cuts = np.array([-1.5, 0.0, 1.5])
    y = (rng.logistic(size=(3000, 1)) < score - cuts).sum(axis=1)  # a true CORAL model
    scale, bias = fit_calibration(ORDINAL, 2.5 * (score - cuts), y)
    assert scale == pytest.approx([0.4] * 3, rel=0.1) and bias == [0.0] * 3
    z, leaf = softmax_data(3000, len(TREE.classes), seed=4)
    node = np.array([TREE.nodes.index(TREE.classes[i]) for i in leaf])
    t_scale, _ = fit_calibration(TREE, 2.0 * z, node)
    assert t_scale == pytest.approx([0.5] * len(TREE.classes), rel=0.1)


def test_multiattribute_calibrates_each_attribute_in_its_own_columns():
    cells = ["hand=no|tags=smile|tone=1-light", "hand=yes|tags=wink|tags=smile|tone=2-medium", "hand=no|tone=3-dark"]
    space = MultiattributeTask.from_labels(cells, OmegaConf.create({"attributes": {}}))
    groups = space.calibration_groups()
    kinds = {space.attributes[i]: [] for i in range(len(space.parts))}
    for columns, kind in groups:
        owner = next(
            a
            for a, out in zip(space.attributes, space.output_slices, strict=True)
            if columns.start in range(out.start, out.stop)
        )
        kinds[owner].append((columns.stop - columns.start, kind))
    assert kinds == {"hand": [(1, "platt")], "tags": [(1, "platt"), (1, "platt")], "tone": [(3, "temperature")]}
    questions = space.questions(np.full((1, space.num_outputs), 0.5))
    assert [q.name for q in questions] == ["hand", "tags: smile", "tags: wink", "tone"]
    assert questions[1].shown == [None, "tags: smile"]


def test_too_few_images_leave_scores_uncalibrated():
    z, y = softmax_data(10, 6, seed=5)
    assert fit_calibration(MULTICLASS, z, y) == ([1.0] * 6, [0.0] * 6)
    assert conformal_threshold(softmax(z), y, 0.95) == 1.0  # 10 images cannot promise 95 % (needs 19)
    assert conformal_threshold(softmax(z), y, 0.9) < 1.0


def test_conformal_sets_cover_fresh_data_and_flag_what_the_model_never_saw():
    z, y = softmax_data(3000, 6, seed=6)
    qhat = conformal_thresholds(MULTICLASS, softmax(z), y, 0.9)
    z_test, y_test = softmax_data(20000, 6, seed=7)
    test = MULTICLASS.questions(softmax(z_test))
    summary = conformal_summary(test, MULTICLASS.question_targets(y_test), qhat)
    assert 0.89 <= summary["conformal_coverage"] <= 0.92  # the guarantee, and not much more
    assert 1.0 < summary["conformal_set_size"] < 6.0
    assert summary["answered_acc"] > (softmax(z_test).argmax(1) == y_test).mean()  # abstaining drops hard cases
    ood = MULTICLASS.questions(softmax(np.random.default_rng(8).normal(0, 0.3, size=(500, 6))))  # flat scores
    _, abstain = uncertainty_columns(ood, qhat)
    assert abstain.mean() > 0.95


def test_reliability_bins_give_torchmetrics_ece():
    rng = np.random.default_rng(9)
    conf = rng.random(5000) * 0.9 + 0.1
    right = rng.random(5000) < conf**2
    mean_conf, acc, count = reliability_bins(conf, right, 15)
    ours = np.nansum(np.abs(acc - mean_conf) * count) / count.sum()
    theirs = float(binary_calibration_error(torch.as_tensor(conf), torch.as_tensor(right.astype(int)), n_bins=15))
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert count.sum() == 5000


def test_served_answer_is_calibrated_and_carries_the_sets():
    decision = Decision(scale=[0.5] * 3, bias=[0.0] * 3, qhat=[0.6], coverage=0.9)
    space = get_task("multiclass")(["x", "y", "z"])
    frame = answer_frame(np.array([[4.0, 0.0, 0.0], [1.0, 1.0, -4.0]]), space, decision)
    assert frame["prob_x"].tolist() == pytest.approx(softmax(np.array([[2.0, 0.0, 0.0], [0.5, 0.5, -2.0]]))[:, 0])
    assert frame["plausible"].tolist() == [["x"], ["x", "y"]]
    assert frame["abstain"].tolist() == [False, True]
    labels = answer_frame(np.array([[3.0, -3.0, 0.1]]), MULTILABEL, Decision([0.5] * 3, qhat=[0.6] * 3)).iloc[0]
    assert labels["plausible"] == ["a", "c"]  # "c" at 0.52: both yes and no plausible
    assert bool(labels["abstain"]) is True
    plain = answer_frame(np.array([[4.0, 0.0, 0.0]]), space, Decision())
    assert "plausible" not in plain.columns  # no conformal thresholds: no sets


def test_decision_round_trip_keeps_calibration_and_sets():
    decision = Decision([0.4], " / ", {}, [0.7], [-0.2], [0.35], 0.9)
    data = decision.to_dict()
    assert Decision.from_dict(data) == decision
    assert set(Decision([0.5]).to_dict()) == {"thresholds", "path_separator"}


def test_fit_decision_tunes_thresholds_on_calibrated_scores(tmp_path):
    rng = np.random.default_rng(10)
    logits = rng.normal(0, 3, size=(2000, 1))
    y = (rng.random(2000) < 1 / (1 + np.exp(-(0.5 * logits[:, 0] - 1.0)))).astype(np.int64)
    cfg = OmegaConf.create(
        {
            "evaluate": {"calibration": "auto", "coverage": 0.8},
            "task": {"threshold": {"mode": "max_f1", "value": 0.5}, "path_separator": None},
        }
    )
    decision = fit_decision(BINARY, logits, y, cfg)
    assert decision.scale == pytest.approx([0.5], rel=0.15) and decision.coverage == 0.8 and len(decision.qhat) == 1
    raw = fit_decision(BINARY, logits, y, OmegaConf.merge(cfg, {"evaluate": {"calibration": "none"}}))
    assert raw.scale == [] and raw.thresholds != decision.thresholds  # tuned on other scores
    probs = BINARY.calibrated_probabilities(logits, decision)
    metrics = calibration_report(BINARY, BINARY.probabilities(logits), probs, y, decision, tmp_path)
    assert metrics["ece"] < metrics["ece_uncalibrated"]
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    assert list(np.genfromtxt(tmp_path / "calibration.csv", delimiter=",", names=True).dtype.names)[:4] == [
        "confidence",
        "uncalibrated",
        "calibrated",
        "ideal",
    ]
    for bad in ({"calibration": "isotonic"}, {"coverage": 1.5}):
        with pytest.raises(ConfigError):
            fit_decision(BINARY, logits, y, OmegaConf.merge(cfg, {"evaluate": bad}))
