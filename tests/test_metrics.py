"""Test-set metrics on hand-made predictions with known answers (taxonomist.evaluation.metrics)."""

from __future__ import annotations

import math

import pytest
import torch

from taxonomist.evaluation.metrics import confusion, per_class_table, summary_metrics

# Six samples, three classes. True labels 0,0,0,1,1,2; predicted 0,0,1,1,2,2.
# Each prediction puts 0.6 on the predicted class and 0.2 on each other class.
TARGET = torch.tensor([0, 0, 0, 1, 1, 2])
PRED = [0, 0, 1, 1, 2, 2]


def probs_for(pred: list[int], n: int = 3, top: float = 0.6) -> torch.Tensor:
    rest = (1.0 - top) / (n - 1)
    p = torch.full((len(pred), n), rest)
    p[torch.arange(len(pred)), torch.tensor(pred)] = top
    return p


PROBS = probs_for(PRED)

# Confusion (rows true, columns predicted):
#   true 0: [2, 1, 0]   true 1: [0, 1, 1]   true 2: [0, 0, 1]
# precision = (2/2, 1/2, 1/2); recall = (2/3, 1/2, 1/1); F1 = (0.8, 0.5, 2/3); support = (3, 2, 1)
PRECISION = (1.0, 0.5, 0.5)
RECALL = (2 / 3, 0.5, 1.0)
F1 = (0.8, 0.5, 2 / 3)
SUPPORT = (3, 2, 1)


def weighted(values) -> float:
    return sum(v * s for v, s in zip(values, SUPPORT, strict=True)) / sum(SUPPORT)


def test_summary_metrics_known_values():
    m = summary_metrics(PROBS, TARGET)
    expected = {
        "acc": 4 / 6,
        "balanced_acc": (2 / 3 + 1 / 2 + 1) / 3,  # 13/18
        "precision_macro": 2 / 3,
        "recall_macro": 13 / 18,
        "f1_macro": (0.8 + 0.5 + 2 / 3) / 3,
        "precision_weighted": 0.75,  # (3*1 + 2*0.5 + 1*0.5) / 6
        "recall_weighted": 4 / 6,  # equals accuracy
        "f1_weighted": (3 * 0.8 + 2 * 0.5 + 2 / 3) / 6,
        # -log p(true): 0.6 for the four right answers, 0.2 for the two wrong ones.
        "nll": -(4 * math.log(0.6) + 2 * math.log(0.2)) / 6,
        # Every confidence is 0.6, so there is one bin: |accuracy - confidence|.
        "ece": abs(4 / 6 - 0.6),
    }
    assert set(m) == set(expected)  # no top-5 accuracy with only 3 classes
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=2e-6), key
    assert m["precision_weighted"] == pytest.approx(weighted(PRECISION), abs=1e-6)
    assert m["f1_weighted"] == pytest.approx(weighted(F1), abs=1e-6)
    assert all(isinstance(v, float) for v in m.values())


def test_summary_metrics_perfect_and_confident():
    target = torch.tensor([0, 1, 2, 1])
    probs = torch.nn.functional.one_hot(target, 3).float()
    m = summary_metrics(probs, target)
    for key in ("acc", "balanced_acc", "f1_macro", "f1_weighted", "precision_macro", "recall_macro"):
        assert m[key] == 1.0, key
    assert m["nll"] == pytest.approx(0.0, abs=1e-6)
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)


def test_top5_accuracy_with_six_classes():
    # Sample 0: the true class 5 has the lowest probability (rank 6) -> a top-5 miss.
    # Sample 1: the true class 0 has the 5th highest probability -> a top-5 hit but a top-1 miss.
    probs = torch.tensor(
        [
            [0.30, 0.25, 0.20, 0.15, 0.07, 0.03],
            [0.05, 0.30, 0.25, 0.20, 0.15, 0.05 - 1e-3],
        ]
    )
    probs = probs / probs.sum(dim=1, keepdim=True)
    m = summary_metrics(probs, torch.tensor([5, 0]))
    assert m["acc_top5"] == pytest.approx(0.5)
    assert m["acc"] == 0.0


def test_per_class_table_known_values():
    table = per_class_table(PROBS, TARGET, ["cat", "dog", "eel"])
    assert table.columns.tolist() == ["class", "precision", "recall", "f1", "support"]
    assert table["class"].tolist() == ["cat", "dog", "eel"]
    assert table["precision"].tolist() == pytest.approx(PRECISION, abs=1e-6)
    assert table["recall"].tolist() == pytest.approx(RECALL, abs=1e-6)
    assert table["f1"].tolist() == pytest.approx(F1, abs=1e-6)
    assert table["support"].tolist() == list(SUPPORT)


def test_per_class_table_counts_support_of_unseen_class():
    probs = probs_for([0, 1, 1], n=4, top=0.7)
    table = per_class_table(probs, torch.tensor([0, 1, 1]), ["a", "b", "c", "d"])
    assert table["support"].tolist() == [1, 2, 0, 0]


def test_confusion_known_matrix():
    matrix = confusion(PROBS, TARGET)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert matrix.sum(dim=1).tolist() == list(SUPPORT)  # rows are true classes
