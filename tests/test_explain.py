"""Explanations (taxonomist.evaluation.explain) and ``taxonomist explain``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import draw_shape, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from taxonomist.cli import main
from taxonomist.config import compose
from taxonomist.evaluation.explain import (
    GRAD_CAM,
    INTEGRATED_GRADIENTS,
    cam_layer,
    explanation_grid,
    heatmaps,
    output_names,
    overlay,
    pick_examples,
)
from taxonomist.models import zoo  # noqa: F401  (registers resnet10_native)
from taxonomist.models.inference import MODEL_PREFIX, Classifier
from taxonomist.models.tta import with_tta
from taxonomist.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
SPACE = {"task": "multiclass", "classes": CLASSES, "nodes": []}


def tiny_vit(num_classes: int = 3, size: int = 32) -> nn.Module:
    """A two-block ViT on 8 px patches, random weights (nothing is downloaded)."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=size, patch_size=8, depth=2
    ).eval()


def quadrant_share(maps: np.ndarray, rows: slice, cols: slice) -> np.ndarray:
    """The part of each heatmap's mass inside ``[rows, cols]``."""
    return maps[:, rows, cols].sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)


class TopLeftOnly(nn.Module):
    """``net`` that sees only the top-left quadrant of its input: its logits do not depend on
    the other three quadrants at all."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net = net
        mask = torch.zeros(1, 1, size, size)
        mask[..., : size // 2, : size // 2] = 1
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.mask)


class BrightDark(nn.Module):
    """A CNN whose class 0 logit is the mean of a "bright here" feature map and class 1 logit
    the mean of a "dark here" map (3 x 3 box filters of opposite sign, then ReLU)."""

    def __init__(self, timm_like: bool):
        super().__init__()
        conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0] = 1 / 9
            conv.weight[1] = -1 / 9
        self.features = nn.Sequential(conv, nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if timm_like:  # as timm models describe their stages
            self.feature_info = [{"num_chs": 2, "reduction": 1, "module": "features"}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize(
    ("name", "size", "channels", "layer"), [("test_resnet", 32, 3, "layer2"), ("resnet10_native", 28, 1, "layer3")]
)
def test_grad_cam_of_timm_cnns_is_one_unit_map_per_image_without_leaking_gradients(name, size, channels, layer):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, in_chans=channels)
    model.train()  # the caller's mode comes back afterwards
    x = torch.randn(5, channels, size, size)
    # The deepest stage of at least 4 px a side: layer4 is 1 x 1 / 2 x 2 at these sizes.
    assert cam_layer(model, x) == layer
    with torch.inference_mode():  # as in evaluate: Grad-CAM turns gradients back on for itself
        maps, method = heatmaps(model, x, [0, 1, 2, 0, 1])
    assert method == GRAD_CAM
    assert maps.shape == (5, size, size) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert all(m.max() in (0.0, 1.0) for m in maps)  # each map scaled to its own maximum (or all zero)
    assert (maps.reshape(5, -1).max(axis=1) == 1.0).sum() >= 3
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_integrated_gradients_for_a_vit_with_tokens_instead_of_a_feature_map():
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    assert cam_layer(model, x) is None  # its patch embedding is a Conv2d, but the blocks output tokens
    maps, method = heatmaps(model, x, [2, 1, 0])
    assert method == INTEGRATED_GRADIENTS
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and np.allclose(maps.reshape(3, -1).max(axis=1), 1.0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("timm_like", [True, False])
def test_grad_cam_shows_the_evidence_for_the_class_asked_about(timm_like):
    model = BrightDark(timm_like).eval()
    x = torch.full((2, 1, 32, 32), -1.0)  # dark images with one bright square...
    x[0, :, 3:13, 3:13] = 1.0  # ... top left
    x[1, :, 19:29, 19:29] = 1.0  # ... bottom right
    assert cam_layer(model, x) == "features"
    bright, method = heatmaps(model, x, [0, 0])
    assert method == GRAD_CAM
    top, bottom, left, right = slice(0, 16), slice(16, 32), slice(0, 16), slice(16, 32)
    assert quadrant_share(bright[:1], top, left)[0] > 0.9
    assert quadrant_share(bright[1:], bottom, right)[0] > 0.9
    dark, _ = heatmaps(model, x, [1, 1])  # the same images, the other class: everything but the square
    assert quadrant_share(dark[:1], top, left)[0] < 0.2
    assert dark[0, 8, 8] == 0.0 and dark[0, 24, 24] == 1.0


@pytest.mark.parametrize("make", [tiny_vit, lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 3))])
def test_integrated_gradients_stays_in_the_quadrant_the_model_sees(make):
    torch.manual_seed(1)
    model = TopLeftOnly(make(), 32).eval()
    x = torch.randn(4, 3, 32, 32)
    maps, method = heatmaps(model, x, [0, 1, 2, 0])
    assert method == INTEGRATED_GRADIENTS
    share = quadrant_share(maps, slice(0, 16), slice(0, 16))
    assert (share > 0.9).all(), share  # a uniform map would give 0.25
    assert maps[:, 20:, :].max() == 0.0 and maps[:, :, 20:].max() == 0.0  # beyond the smoothing: nothing


def test_overlay_blends_a_colour_map_over_gray_and_colour_images():
    gray = np.full((6, 8, 1), 100, np.uint8)
    heat = np.zeros((6, 8))
    heat[:, 4:] = 1.0
    out = overlay(gray, heat)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[0, 7])  # cold and hot differ
    assert np.array_equal(overlay(np.repeat(gray, 3, axis=2), heat), out)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(gray, np.zeros((5, 5)))


def test_pick_examples_is_seeded_and_about_half_mistakes():
    target = np.arange(100) % 4
    pred = target.copy()
    pred[::5] = (pred[::5] + 1) % 4  # 20 mistakes
    picked = pick_examples(pred, target, 12, seed=3)
    assert len(picked) == 12 and len(set(picked.tolist())) == 12
    assert (pred[picked] != target[picked]).sum() == 6
    assert np.array_equal(picked, pick_examples(pred, target, 12, seed=3))
    assert not np.array_equal(picked, pick_examples(pred, target, 12, seed=4))
    assert len(pick_examples(target, target, 12, seed=0)) == 12  # no mistakes: all correct
    few = pick_examples(pred[:10], target[:10], 8, seed=0)  # 2 mistakes in 10
    assert len(few) == 8 and (pred[few] != target[few]).sum() == 2
    mostly_wrong = pick_examples((target + 1) % 4, target, 6, seed=0)
    assert len(mostly_wrong) == 6  # no correct ones: all mistakes
    rows = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])  # multi-label rows: wrong when any label differs
    picked = pick_examples(rows, np.array([[1, 0], [1, 0], [0, 0], [0, 0]]), 2, seed=0)
    assert picked[0] in (1, 3) and picked[1] in (0, 2)  # one mistake, then one correct
    assert len(pick_examples([], [], 5, seed=0)) == 0


def pipeline_cfg(*extra: str) -> dict:
    cfg = compose(
        [*tiny_overrides(Path("/nonexistent")), "preprocess.resize_mode=squash", *extra], conf_dir=REPO / "conf"
    )
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def test_explanation_grid_of_a_classifier_with_test_time_augmentation(tmp_path):
    torch.manual_seed(0)
    classifier = Classifier(pipeline_cfg(), SPACE, in_chans=3).eval()
    classifier.model = with_tta(classifier.model, "hflip")  # explained without the flip
    rng = random.Random(0)
    images = np.stack([np.asarray(draw_shape(s, 32, rng)) for s in ["circle", "square", "triangle", "circle"]])
    titles = ["true circle / pred circle 0.91", "true square / pred circle 0.52", "a", "b"]
    path = explanation_grid(classifier, images, [0.5] * 3, [0.25] * 3, [0, 0, 2, 1], titles, tmp_path / "x" / "g.png")
    assert path == tmp_path / "x" / "g.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 150
    empty = explanation_grid(classifier, images[:0], [0.5] * 3, [0.25] * 3, [], [], tmp_path / "empty.png")
    assert empty.is_file()


def test_output_names_are_one_per_logit():
    assert output_names(load_task(SPACE)) == CLASSES
    binary = load_task({"task": "binary", "classes": ["cat", "dog"], "nodes": []})
    assert output_names(binary) == ["dog"]  # the one logit is the positive class's


def write_checkpoint(path: Path) -> Path:
    """``models/best.ckpt`` as the train stage writes it (what load_classifier reads), untrained."""
    torch.manual_seed(0)
    cfg = pipeline_cfg()
    classifier = Classifier(cfg, SPACE, in_chans=3)
    state = {f"{MODEL_PREFIX}{k}": v for k, v in classifier.model.state_dict().items()}
    torch.save({"hyper_parameters": {"cfg": cfg, "space": SPACE, "in_chans": 3}, "state_dict": state}, path)
    return path


def test_cli_explain_writes_overlays_and_one_line_per_image(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "best.ckpt")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = random.Random(0)
    draw_shape("circle", 40, rng).save(photos / "a.png")
    draw_shape("square", 57, rng, "L").save(photos / "b.jpg", quality=90)
    (photos / "c.png").write_bytes(b"not an image")
    other = tmp_path / "more"
    other.mkdir()
    draw_shape("triangle", 24, rng, "RGBA").save(other / "a.png")  # the same stem as photos/a.png
    out = tmp_path / "explain"
    args = [str(photos / "a.png"), str(photos / "b.jpg"), str(photos / "c.png"), str(other / "a.png")]

    code = main(["explain", *args, "--checkpoint", str(ckpt), "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1  # one image failed, the others were explained
    assert [line.split("\t")[0] for line in lines] == args  # in the order given
    by_path = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert by_path[args[2]][1].startswith("error: cannot decode")
    for key, written in zip([args[0], args[1], args[3]], ["a.png", "b.png", "a-2.png"], strict=True):
        _, label, score, method, file = by_path[key]
        assert label in CLASSES and 0.0 <= float(score) <= 1.0 and method == GRAD_CAM
        assert Path(file) == out / written
        with Image.open(file) as img:  # image | overlay, enlarged from 32 px
            assert img.mode == "RGB" and img.size == (2 * img.height, img.height) and img.height >= 256
    assert sorted(p.name for p in out.iterdir()) == ["a-2.png", "a.png", "b.png"]

    code = main(["explain", args[0], "--checkpoint", str(ckpt), "--out", str(out), "--target", "triangle"])
    assert code == 0
    assert capsys.readouterr().out.split("\t")[1] == "triangle"
    assert main(["explain", args[0], "--checkpoint", str(ckpt), "--target", "hexagon"]) == 2
    assert "'hexagon' is not one of the model's outputs: circle, square, triangle" in capsys.readouterr().err
    assert main(["explain", args[0], "--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert "run the train stage" in capsys.readouterr().err
