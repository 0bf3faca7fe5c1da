"""The task objects: label spaces, decisions, threshold tuning, losses, taxonomies and label checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from taxonomist.data.manifest import Record
from taxonomist.errors import DataError
from taxonomist.tasks import Decision, Task, get_task
from taxonomist.tasks.base import tune_threshold
from taxonomist.tasks.taxonomy import LabelResolver, TaxonomyError, load_taxonomy

TREE = ["Tops/Shirt", "Tops/Coat", "Footwear/Sneaker", "Footwear/Sandal", "Bag"]


def tree_space() -> Task:
    return get_task("hierarchical").from_labels([*TREE, "Footwear"])


def threshold(mode: str, value: float):
    """A task config section with just the threshold settings."""
    return OmegaConf.create({"threshold": {"mode": mode, "value": value}, "path_separator": None})


# --------------------------------------------------------------------------- label spaces


def test_hierarchical_space_has_leaves_as_outputs_and_all_nodes_as_targets():
    space = tree_space()
    assert space.classes == ["Bag", "Footwear/Sandal", "Footwear/Sneaker", "Tops/Coat", "Tops/Shirt"]
    assert space.nodes[:3] == ["Bag", "Footwear", "Tops"]  # parents before children
    assert space.num_outputs == 5
    member = space.membership()
    footwear = space.nodes.index("Footwear")
    assert member[footwear].tolist() == [False, True, True, False, False]
    assert space.encode(["Footwear", "Tops/Coat"]).tolist() == [footwear, space.nodes.index("Tops/Coat")]


def test_binary_space_puts_the_positive_class_last_and_has_one_output():
    space = get_task("binary").from_labels(["face", "non-face", "face"], OmegaConf.create({"positive_label": "face"}))
    assert space.classes == ["non-face", "face"] and space.positive == "face" and space.num_outputs == 1
    assert space.encode(["face", "non-face"]).tolist() == [1, 0]
    with pytest.raises(DataError, match="positive_label='cat'"):
        get_task("binary").from_labels(["face", "non-face"], OmegaConf.create({"positive_label": "cat"}))
    with pytest.raises(DataError, match="exactly 2 classes"):
        get_task("binary").from_labels(["a", "b", "c"])


def test_multilabel_space_encodes_multi_hot_rows_including_empty_ones():
    space = get_task("multilabel").from_labels(["cat|dog", "dog", ""])
    assert space.classes == ["cat", "dog"]
    encoded = space.encode(["cat|dog", "", "dog"])
    assert encoded.dtype == np.uint8 and encoded.tolist() == [[1, 1], [0, 0], [0, 1]]
    assert space.empty_targets().shape == (0, 2)
    with pytest.raises(DataError, match="'bird'"):
        space.encode(["bird"])


def test_label_space_round_trips_through_a_dict():
    space = tree_space()
    assert get_task("hierarchical").from_dict(space.to_dict()) == space


# --------------------------------------------------------------------------- decisions


def test_hierarchical_probabilities_sum_leaves_and_paths_are_consistent():
    space = tree_space()
    logits = np.log(np.array([[0.05, 0.3, 0.35, 0.2, 0.1], [0.9, 0.025, 0.025, 0.025, 0.025]]))
    probs = space.probabilities(logits)
    np.testing.assert_allclose(probs[0, space.nodes.index("Footwear")], 0.65)
    np.testing.assert_allclose(probs[0, space.nodes.index("Tops")], 0.3)
    full = space.decide(probs, Decision([0.0]))
    # Footwear (0.65) wins the top level, then Sneaker (0.35) beats Sandal (0.30).
    assert [space.nodes[i] for i in full] == ["Footwear/Sneaker", "Bag"]
    assert space.path_text(int(full[0]), " > ") == "Footwear > Sneaker"
    # With a 0.5 threshold the first path stops at Footwear: no child is sure enough.
    stopped = space.decide(probs, Decision([0.5]))
    assert [space.nodes[i] for i in stopped] == ["Footwear", "Bag"]
    nothing = space.decide(probs, Decision([0.95]))
    assert nothing.tolist() == [-1, -1] and space.path_text(-1, " > ") == ""


def test_greedy_path_differs_from_the_most_probable_leaf():
    """The top-down path follows the most probable branch, not the single best leaf."""
    space = tree_space()
    leaf_probs = np.array([[0.01, 0.19, 0.21, 0.0, 0.39]])
    assert space.classes[int(leaf_probs.argmax())] == "Tops/Shirt"  # the best single leaf
    probs = space.probabilities(np.log(leaf_probs + 1e-9))  # but Footwear (0.40) beats Tops (0.39)
    assert [space.nodes[i] for i in space.decide(probs, Decision([0.0]))] == ["Footwear/Sneaker"]


def test_binary_and_multilabel_decisions_use_the_thresholds():
    binary = get_task("binary")(["neg", "pos"])
    assert binary.decide(np.array([0.2, 0.6, 0.8]), Decision([0.7])).tolist() == [0, 0, 1]
    multi = get_task("multilabel")(["a", "b"])
    out = multi.decide(np.array([[0.3, 0.3], [0.6, 0.1]]), Decision([0.25, 0.5]))
    assert out.tolist() == [[True, False], [True, False]]


# --------------------------------------------------------------------------- threshold tuning


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    target = rng.random(400) < 0.3
    probs = np.clip(target * 0.35 + rng.random(400) * 0.65, 0, 1)
    return probs, target


def _precision_recall(probs, target, threshold):
    pred = probs >= threshold
    tp = (pred & target).sum()
    return tp / max(pred.sum(), 1), tp / target.sum()


def test_max_f1_threshold_beats_every_other_cut(scores):
    probs, target = scores
    best = tune_threshold(probs, target, "max_f1", 0.0)

    def f1(t):
        p, r = _precision_recall(probs, target, t)
        return 2 * p * r / (p + r) if p + r else 0.0

    assert f1(best) >= max(f1(t) for t in np.linspace(0.01, 0.99, 99)) - 1e-12


@pytest.mark.parametrize("goal", [0.8, 0.9, 0.97])
def test_min_precision_reaches_the_target_with_the_most_recall(scores, goal):
    probs, target = scores
    th = tune_threshold(probs, target, "min_precision", goal)
    precision, recall = _precision_recall(probs, target, th)
    assert precision >= goal
    for t in np.linspace(0.01, 0.99, 197):  # no other cut has the precision and more recall
        p, r = _precision_recall(probs, target, t)
        assert not (p >= goal and r > recall + 1e-12)


@pytest.mark.parametrize("goal", [0.8, 0.95])
def test_min_recall_reaches_the_target(scores, goal):
    probs, target = scores
    th = tune_threshold(probs, target, "min_recall", goal)
    assert _precision_recall(probs, target, th)[1] >= goal
    assert _precision_recall(probs, target, th + 0.02)[1] < goal or th > 0.97


def test_tune_gives_one_threshold_per_label_and_fixed_keeps_the_value(scores):
    probs, target = scores
    multi = get_task("multilabel")(["a", "b"])
    decision = multi.tune(np.stack([probs, 1 - probs], 1), np.stack([target, ~target], 1), threshold("max_f1", 0.5))
    assert len(decision.thresholds) == 2 and decision.thresholds[0] != decision.thresholds[1]
    assert get_task("binary")(["n", "p"]).tune(probs, target, threshold("fixed", 0.3)).thresholds == [0.3]
    assert tune_threshold(probs, np.zeros_like(target), "max_f1", 0.0) == 0.5  # no positives: neutral
    empty = multi.tune(np.zeros((0, 2)), np.zeros((0, 2), np.uint8), threshold("max_f1", 0.5))
    assert empty.thresholds == [0.5, 0.5]  # an empty val split: neutral thresholds


# --------------------------------------------------------------------------- losses and weights


def test_hierarchical_loss_equals_cross_entropy_for_leaf_targets_and_trains_inner_nodes():
    space = tree_space()
    logits = torch.randn(4, 5)
    leaves = torch.tensor([space.nodes.index(c) for c in space.classes[:4]])
    loss = space.loss()(logits, leaves)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, torch.arange(4)))
    footwear = torch.tensor([space.nodes.index("Footwear")])
    inner = space.loss()(logits[:1], footwear)
    expected = -torch.log(torch.softmax(logits[:1], 1)[0, [1, 2]].sum())
    torch.testing.assert_close(inner, expected)


def test_binary_and_multilabel_losses_are_bce_with_pos_weight():
    logits = torch.tensor([[0.3], [-1.0]])
    target = torch.tensor([1, 0])
    loss = get_task("binary")(["n", "p"]).loss(weights=[3.0])(logits, target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[:, 0], target.float(), pos_weight=torch.tensor([3.0])
    )
    torch.testing.assert_close(loss, expected)
    ml = get_task("multilabel")(["a", "b"]).loss()(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(ml, torch.tensor(np.log(2.0), dtype=torch.float32))


def test_balanced_class_weights():
    multi = get_task("multiclass")(["a", "b"])
    assert multi.class_weights(np.array([0, 0, 0, 1])) == pytest.approx([4 / 6, 2.0])
    assert get_task("binary")(["n", "p"]).class_weights(np.array([0, 0, 0, 1])) == pytest.approx([3.0])
    ml = get_task("multilabel")(["a", "b"]).class_weights(np.array([[1, 0], [1, 0], [0, 1], [1, 0]]))
    assert ml == pytest.approx([1 / 3, 3.0])


# --------------------------------------------------------------------------- taxonomy files


def test_taxonomy_file_and_label_resolution(tmp_path):
    path = tmp_path / "tax.yaml"
    path.write_text("Tops: [Shirt, Coat]\nFootwear:\n  Sneaker: null\n  Boots: [Ankle_boot]\n")
    nodes = load_taxonomy(path)
    assert nodes == ["Tops", "Tops/Shirt", "Tops/Coat", "Footwear", "Footwear/Sneaker", "Footwear/Boots",
                     "Footwear/Boots/Ankle_boot"]  # fmt: skip
    resolver = LabelResolver(nodes, str(path))
    assert resolver.resolve("Ankle_boot", "row 1") == "Footwear/Boots/Ankle_boot"
    assert resolver.resolve("Tops/Coat", "row 2") == "Tops/Coat"
    with pytest.raises(TaxonomyError, match=r"row 3: label 'Sneakers' is not in the taxonomy .*did you mean 'Sneaker'"):
        resolver.resolve("Sneakers", "row 3")


def test_taxonomy_errors(tmp_path):
    with pytest.raises(TaxonomyError, match="not found"):
        load_taxonomy(tmp_path / "missing.yaml")
    dup = tmp_path / "dup.yaml"
    dup.write_text("A: [x, x]\n")
    with pytest.raises(TaxonomyError, match="'A/x' appears twice"):
        load_taxonomy(dup)
    ambiguous = LabelResolver(["A", "A/x", "B", "B/x"], "tax.yaml")
    with pytest.raises(TaxonomyError, match="ambiguous"):
        ambiguous.resolve("x", "row 9")


# --------------------------------------------------------------------------- label checks at ingest


def cfg(task: str, **task_keys):
    base = {"name": task, "allow_empty": False, "taxonomy": None, "positive_label": None}
    return OmegaConf.create({"task": {**base, **task_keys}, "data": {"max_labels": task_keys.pop("max_labels", 0)}})


def rec(i: int, *labels: str) -> Record:
    return Record(f"images/{i}.png", tuple(labels), "", f"h{i}", f"labels.csv row {i}")


def test_single_label_tasks_refuse_rows_with_several_labels():
    records = [rec(1, "cat"), rec(2, "cat", "dog"), rec(3, "dog"), rec(4, "dog", "cat")]
    expected = (
        r"^task multiclass: images carry several labels \(e\.g\. labels\.csv row 2: cat, dog; 2 images\): "
        r"use task=multilabel"
    )
    with pytest.raises(DataError, match=expected) as info:
        get_task("multiclass").check_records(records, cfg("multiclass"))
    assert "\n" not in str(info.value)  # one line
    for task in ("binary", "ordinal"):
        with pytest.raises(DataError, match=rf"^task {task}: images carry several labels .*task=multilabel"):
            get_task(task).check_records(records, cfg(task))


def test_single_label_tasks_refuse_images_without_a_label():
    records = [rec(1, "cat"), rec(2), rec(3, "dog")]
    with pytest.raises(
        DataError, match=r"^task multiclass: images have no label \(e\.g\. labels\.csv row 2; 1 image\)"
    ):
        get_task("multiclass").check_records(records, cfg("multiclass"))


@pytest.mark.parametrize("task", ["multiclass", "binary", "ordinal"])
def test_single_label_tasks_refuse_label_paths(task):
    """Taxonomy results or nested folders read as labels: a flat model would be trained silently."""
    labels = ["Digits/Round/zero"] * 3 + ["Digits/Round/six"] * 2
    records = [rec(i, label) for i, label in enumerate(labels)]
    expected = rf"^task {task}: labels are paths \(e\.g\. 'Digits/Round/zero', 5 images\): use task=hierarchical"
    with pytest.raises(DataError, match=expected) as info:
        get_task(task).check_records(records, cfg(task))
    assert str(info.value).endswith("(or flatten the labels)")


def test_label_paths_count_only_when_they_form_a_tree():
    from taxonomist.tasks.base import tree_labels

    assert tree_labels(["cat", "dog", "n/a"]) == set()  # a name with a slash, not a tree
    assert tree_labels(["AC / DC", "Queen", "Abba"]) == set()
    assert tree_labels(["a//b", "c"]) == set()
    assert tree_labels(["Animal/cat", "Animal/dog", "rock"]) == {"Animal/cat", "Animal/dog"}  # a shared root
    assert tree_labels(["Animal", "Animal/cat", "rock"]) == {"Animal/cat"}  # an ancestor is a label
    assert tree_labels(["Animal/cat", "Plant/rose"]) == {"Animal/cat", "Plant/rose"}  # every label is a path
    records = [rec(1, "cat"), rec(2, "dog"), rec(3, "n/a")]
    assert get_task("multiclass").check_records(records, cfg("multiclass")) == records


def test_multilabel_rows_without_labels_need_allow_empty():
    records = [rec(1, "cat", "dog"), rec(2), rec(3, "dog")]
    with pytest.raises(DataError, match=r"task.allow_empty.*\n  labels.csv row 2: no labels"):
        get_task("multilabel").check_records(records, cfg("multilabel"))
    assert [r.labels for r in get_task("multilabel").check_records(records, cfg("multilabel", allow_empty=True))] == [
        ("cat", "dog"),
        (),
        ("dog",),
    ]


def test_max_labels_keeps_the_most_frequent_and_drops_emptied_rows():
    records = [rec(1, "a", "b"), rec(2, "a", "c"), rec(3, "c"), rec(4, "a", "b"), rec(5, "d")]
    conf = cfg("multilabel")
    conf.data.max_labels = 2
    kept = get_task("multilabel").check_records(records, conf)
    assert [(r.source_id, r.labels) for r in kept] == [
        ("labels.csv row 1", ("a", "b")),
        ("labels.csv row 2", ("a",)),
        ("labels.csv row 4", ("a", "b")),
    ]


def test_hierarchical_labels_are_resolved_against_the_taxonomy(tmp_path):
    tax = tmp_path / "tax.yaml"
    tax.write_text("Tops: [Shirt, Coat]\nBottoms: [Trouser]\n")
    records = [rec(1, "Shirt"), rec(2, "Bottoms/Trouser"), rec(3, "Tops")]
    out = get_task("hierarchical").check_records(records, cfg("hierarchical", taxonomy=str(tax)))
    assert [r.labels[0] for r in out] == ["Tops/Shirt", "Bottoms/Trouser", "Tops"]
    with pytest.raises(DataError, match=r"labels.csv row 4: label 'Hat' is not in the taxonomy"):
        get_task("hierarchical").check_records([*records, rec(4, "Hat")], cfg("hierarchical", taxonomy=str(tax)))


def test_binary_needs_two_classes_and_a_known_positive_label():
    with pytest.raises(DataError, match="exactly 2 classes"):
        get_task("binary").check_records([rec(1, "a"), rec(2, "b"), rec(3, "c")], cfg("binary"))
    with pytest.raises(DataError, match="positive_label='z'"):
        get_task("binary").check_records([rec(1, "a"), rec(2, "b")], cfg("binary", positive_label="z"))
