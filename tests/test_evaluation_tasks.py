"""Test-split evaluation and served answers of each task, on hand-checked inputs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO

from taxonomist.evaluation.report import NONE
from taxonomist.export.serving import answer_frame
from taxonomist.tasks import Decision, get_task

BINARY = get_task("binary")(["cat", "dog"])
MULTI = get_task("multilabel")(["a", "b", "c"])
TREE = get_task("hierarchical").from_labels(["Tops/Shirt", "Tops/Coat", "Footwear/Sneaker", "Bag"])


def test_binary_metrics_at_the_tuned_threshold():
    probs = np.array([0.9, 0.6, 0.4, 0.3, 0.8, 0.1])
    target = np.array([1, 1, 1, 0, 0, 0])
    result = BINARY.evaluate(probs, target, Decision([0.5]))
    m = result.metrics
    # predictions at 0.5: 1 1 0 0 1 0 -> tp 2, fp 1, fn 1, tn 2
    assert m["acc"] == pytest.approx(4 / 6, abs=1e-6)
    assert m["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["threshold"] == 0.5
    assert m["roc_auc"] == pytest.approx(7 / 9, abs=1e-6)  # 7 of 9 positive/negative pairs ordered
    assert result.per_class["class"].tolist() == ["cat", "dog"]
    assert result.per_class["support"].tolist() == [3, 3]
    assert result.confusions["confusion_matrix"][0].tolist() == [[2, 1], [1, 2]]
    assert set(result.curves) == {"pr_curve", "roc_curve"}
    assert result.predictions["predicted"].tolist() == ["dog", "dog", "cat", "cat", "dog", "cat"]
    # Mistakes come most confident first: the 0.8 "dog" that is a cat, then the 0.4 dog (cat at 0.6).
    assert result.mistakes.tolist() == [4, 2]
    assert BINARY.evaluate(probs, target, Decision([0.35])).metrics["recall"] == 1.0


def test_multilabel_metrics():
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.8, 0.2], [0.6, 0.6, 0.1], [0.1, 0.1, 0.1]])
    target = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    result = MULTI.evaluate(probs, target, Decision([0.5, 0.5, 0.5]))
    m = result.metrics
    # rows 1 and 2 exact; row 3 has a false b; row 4 misses c -> 2 of 12 cells wrong
    assert m["subset_acc"] == 0.5
    assert m["hamming_loss"] == pytest.approx(2 / 12, abs=1e-6)
    assert m["precision_micro"] == pytest.approx(4 / 5, abs=1e-6)
    assert m["recall_micro"] == pytest.approx(4 / 5, abs=1e-6)
    table = result.per_class.set_index("class")
    assert table.loc["b", "precision"] == 0.5 and table.loc["c", "recall"] == 0.5
    assert table["threshold"].tolist() == [0.5, 0.5, 0.5]
    assert result.predictions["predicted"].tolist() == ["a|c", "b", "a|b", ""]
    assert result.mistakes.tolist() == [2, 3]
    # A per-label threshold changes only that label's decisions.
    low_c = MULTI.evaluate(probs, target, Decision([0.5, 0.5, 0.05]))
    assert low_c.per_class.set_index("class").loc["c", "recall"] == 1.0


def test_hierarchical_metrics_count_ancestors_and_levels():
    nodes = TREE.nodes
    shirt, coat = (TREE.classes.index(c) for c in ("Tops/Shirt", "Tops/Coat"))
    # image 0: Shirt predicted Shirt; image 1: Coat predicted Shirt; image 2: Sneaker predicted Coat
    node_probs = np.zeros((3, len(nodes)))
    for row, leaf in enumerate((shirt, shirt, coat)):
        path = TREE.classes[leaf]
        node_probs[row, nodes.index(path.split("/")[0])] = 0.9
        node_probs[row, nodes.index(path)] = 0.9
    target = np.array([nodes.index(p) for p in ("Tops/Shirt", "Tops/Coat", "Footwear/Sneaker")])
    result = TREE.evaluate(node_probs, target, Decision([0.0], " > "))
    m = result.metrics
    assert m["acc"] == pytest.approx(1 / 3, abs=1e-6)
    # ancestor sets: overlap 2 + 1 + 0 = 3 of 6 predicted and 6 true nodes
    assert m["hprecision"] == pytest.approx(0.5) and m["hrecall"] == pytest.approx(0.5)
    assert m["acc_level1"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["acc_level2"] == pytest.approx(1 / 3, abs=1e-6)
    assert result.predictions["predicted"].tolist() == ["Tops > Shirt", "Tops > Shirt", "Tops > Coat"]
    matrix, names = result.confusions["confusion_level1"]
    assert names[-1] == NONE and matrix.sum() == 3
    # With a high descend threshold nothing is predicted: every level counts as missed.
    none = TREE.evaluate(node_probs, target, Decision([0.95]))
    assert none.metrics["hprecision"] == 0.0 and none.predictions["predicted"].tolist() == [NONE] * 3


@pytest.mark.parametrize(
    ("space", "logits", "decision", "columns"),
    [
        (BINARY, np.array([[2.0], [-2.0]]), Decision([0.5]), ["label", "score", "prob_cat", "prob_dog"]),
        (MULTI, np.array([[3.0, -3.0, 3.0], [-3.0, -3.0, -3.0]]), Decision([0.5] * 3), ["labels", "prob_a"]),
        (TREE, np.array([[5.0, 0, 0, 0], [0, 0, 5.0, 0]]), Decision([0.0]), ["label", "path", "score"]),
    ],
)
def test_served_answers_have_the_task_shape(space, logits, decision, columns):
    frame = answer_frame(logits, space, decision)
    assert list(frame.columns[: len(columns)]) == columns
    if space.name == "binary":
        assert frame["label"].tolist() == ["dog", "cat"]
        np.testing.assert_allclose(frame["prob_cat"] + frame["prob_dog"], 1.0)
    elif space.name == "multilabel":
        assert frame["labels"].tolist() == [["a", "c"], []]
    else:
        assert frame["path"].tolist() == ["Bag", "Tops > Coat"]
        assert frame["label"].tolist() == ["Bag", "Coat"]
        assert frame[f"prob_{'Tops'}"].iloc[1] > 0.9
    assert answer_frame(logits[:0], space, decision).columns.tolist() == frame.columns.tolist()


def test_cli_prints_each_kind_of_answer():
    binary = answer_frame(np.array([[2.0]]), BINARY, Decision([0.5])).iloc[0]
    assert BINARY.answer_text(binary) == f"dog\t{binary['score']:.4f}"
    multi = answer_frame(np.array([[3.0, -3.0, 2.0]]), MULTI, Decision([0.5] * 3)).iloc[0]
    assert MULTI.answer_text(multi) == "a (0.95), c (0.88)"
    nothing = answer_frame(np.array([[-3.0, -3.0, -3.0]]), MULTI, Decision([0.5] * 3)).iloc[0]
    assert MULTI.answer_text(nothing) == "(no label)"
    tree = answer_frame(np.array([[0.0, 0.0, 5.0, 0.0]]), TREE, Decision([0.0])).iloc[0]
    assert TREE.answer_text(tree).startswith("Tops > Coat\t0.9")


def test_cli_predict_names_missing_files(tmp_path, capsys):
    from taxonomist.cli import main

    code = main(["predict", str(tmp_path / "nope.png"), "--params", str(REPO / "params.yaml")])
    assert code == 2
    assert f"{tmp_path / 'nope.png'}: no such file or folder" in capsys.readouterr().err
