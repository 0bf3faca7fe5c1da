"""Settings chosen from the data (taxonomist.data.auto) and the image facts they come from."""

from __future__ import annotations

import io
import json

import imagehash
import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

from taxonomist.config import compose
from taxonomist.data import auto
from taxonomist.data.images import InvalidImage, image_facts, phash_thumbnail, phashes
from taxonomist.errors import StageOrderError

CONF = REPO / "conf"


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise(size: tuple[int, int] = (40, 30), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def facts(rows: list[tuple[int, int, bool]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["width", "height", "gray"])


# --- image facts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("img", "fmt", "gray"),
    [
        (Image.fromarray(noise()[:, :, 0]), "PNG", True),  # L
        (Image.fromarray(noise()), "PNG", False),  # RGB colour
        (Image.fromarray(np.repeat(noise()[:, :, :1], 3, axis=2)), "JPEG", True),  # gray pixels in an RGB JPEG
        (Image.fromarray(noise()).convert("RGBA"), "PNG", False),
        (Image.fromarray(noise()).convert("CMYK"), "JPEG", False),
        (Image.fromarray(noise()[:, :, 0].astype(np.uint16) * 257), "PNG", True),  # 16-bit
    ],
)
def test_facts_tell_gray_from_colour_whatever_the_mode(img, fmt, gray):
    found, thumbnail = image_facts(encode(img, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
    assert found["gray"] is gray
    assert (found["width"], found["height"]) == (40, 30)
    assert found["blank"] is False
    assert thumbnail.shape == (32, 32)


def test_facts_find_blank_images_and_refuse_broken_ones():
    found, _ = image_facts(encode(Image.new("RGB", (50, 20), (200, 30, 30))))
    assert found["blank"] is True and found["gray"] is False and found["mode"] == "RGB"
    with pytest.raises(InvalidImage, match="cannot decode"):
        image_facts(b"not an image")


def test_batched_phash_is_imagehash_phash():
    """The batched hash is the library's hash: same bits for varied images."""
    rng = np.random.default_rng(3)
    images = []
    for i in range(60):
        h, w = rng.integers(8, 90, size=2)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[: h // 2] //= 1 + i % 4  # structure, so the median is not a coin toss
        images.append(Image.fromarray(arr))
    ours = phashes(np.stack([phash_thumbnail(img) for img in images]))
    assert ours == [str(imagehash.phash(img)) for img in images]
    assert phashes(np.zeros((0, 32, 32), np.uint8)) == []


# --- choices -------------------------------------------------------------------------------------


def test_channels_are_gray_only_when_every_image_is():
    assert auto.choose_channels(pd.Series([True, True]))[0] == 1
    channels, why = auto.choose_channels(pd.Series([True, False, True]))
    assert channels == 3 and why == "1 of 3 images have colour"


@pytest.mark.parametrize(
    ("sides", "expected", "words"),
    [
        ([28] * 5, 56, "raised to resnet10_narrow's minimum 56 px"),  # Fashion-MNIST
        ([100, 120, 130], 120, "median short side 120 px"),
        ([4000, 3000, 3500], 160, "lowered to resnet10_narrow's maximum 160 px"),
        ([130, 133, 140], 136, "median short side 133 px"),  # multiples of 8 above 64 px
    ],
)
def test_image_size_is_the_median_within_the_models_range(sides, expected, words):
    model = {"name": "resnet10_narrow", "min_image_size": 56, "max_image_size": 160}
    size, why = auto.choose_image_size(pd.Series(sides), model)
    assert size == expected
    assert words in why


@pytest.mark.parametrize(("sides", "expected"), [([28] * 5, 28), ([8] * 3, 28), ([25, 25], 28), ([43, 45], 44)])
def test_small_images_keep_their_own_size_on_the_native_model(sides, expected):
    """Multiples of 4 up to 64 px: 28 px Fashion-MNIST is not upsampled to 32 px."""
    model = {"name": "resnet10_native", "min_image_size": 28, "max_image_size": 64}
    assert auto.choose_image_size(pd.Series(sides), model)[0] == expected


@pytest.mark.parametrize(
    ("shapes", "mode"),
    [
        ([(28, 28)] * 10, "squash"),
        ([(640, 480)] * 10, "center_crop"),
        ([(300, 100)] * 5 + [(100, 100)] * 5, "pad"),
        ([(100, 100)] * 19 + [(1000, 100)], "squash"),  # one odd image does not decide
    ],
)
def test_resize_mode_follows_the_aspect_ratios(shapes, mode):
    widths, heights = zip(*shapes, strict=True)
    assert auto.choose_resize_mode(pd.Series(widths), pd.Series(heights))[0] == mode


def test_model_auto_transfers_only_for_small_data_and_trains_the_rest_from_scratch():
    cfg = compose([], conf_dir=CONF)
    chosen, why = auto.choose_model(cfg.model, train_images=136)
    assert chosen["name"] == "tf_efficientnet_lite0" and chosen["checkpoint"].startswith("package:")
    assert "136 training images < 500" in why
    chosen, why = auto.choose_model(cfg.model, train_images=1_222)
    assert chosen["name"] == "resnet10_narrow" and chosen["checkpoint"] is None and "from scratch" in why
    chosen, why = auto.choose_model(cfg.model, train_images=1_222, short_side=64)
    assert chosen["name"] == "resnet10_narrow"
    chosen, why = auto.choose_model(cfg.model, train_images=1_222, short_side=28)
    assert chosen["name"] == "resnet10_native" and "own resolution (median short side 28 px <= 48 px)" in why
    assert auto.choose_model(cfg.model, train_images=136, short_side=28)[0]["name"] == "tf_efficientnet_lite0"
    explicit = compose(["model=resnet18"], conf_dir=CONF)
    assert auto.choose_model(explicit.model, 10) == (dict(explicit.model), None)


def test_fashion_mnist_resolves_to_its_own_resolution():
    """The default config on 28x28 grayscale data: 28 px, 1 channel, squash, the native-resolution model."""
    cfg = compose([], conf_dir=CONF)
    choice = auto.choose(cfg, facts([(28, 28, True)] * 54_000))
    assert choice.preprocess == {"image_size": 28, "resize_mode": "squash", "channels": 1}
    assert choice.model["name"] == "resnet10_native"
    assert set(choice.reasons) == {"model", "preprocess.channels", "preprocess.image_size", "preprocess.resize_mode"}


def test_explicit_values_win():
    cfg = compose(
        ["model=resnet18", "preprocess.image_size=40", "preprocess.channels=3", "preprocess.resize_mode=pad"],
        conf_dir=CONF,
    )
    choice = auto.choose(cfg, facts([(28, 28, True)] * 10))
    assert choice.preprocess == {"image_size": 40, "resize_mode": "pad", "channels": 3}
    assert choice.reasons == {}


@pytest.mark.parametrize(
    ("train_images", "batch"), [(54_000, 256), (4_096, 256), (1_448, 64), (1_222, 64), (136, 16), (3, 16)]
)
def test_batch_size_leaves_a_small_set_enough_steps(train_images, batch):
    assert auto.choose_batch_size(train_images)[0] == batch


def test_normalisation_is_measured_per_channel():
    images = np.zeros((10, 4, 4, 3), np.uint8)
    images[..., 0] = 255  # red: mean 1, constant
    images[:5, :, :, 1] = 255  # green: half on, std 0.5
    mean, std = auto.measure_normalisation(images, chunk=3)
    assert mean == [1.0, 0.5, 0.0]
    assert std == [1.0, 0.5, 1.0]  # a constant channel keeps scale 1


# --- resolve -------------------------------------------------------------------------------------


def write_report(folder, cfg, train_facts, images):
    choice = auto.choose(cfg, train_facts)
    auto.add_normalisation(choice, cfg, images)
    (folder / "report.json").write_text(json.dumps({"settings": choice.to_dict(), "per_split": {"train": 30}}))
    return choice


def test_resolve_fills_every_auto_value_and_the_augmentation_size(tmp_path):
    cfg = compose([], conf_dir=CONF)
    assert cfg.augment.train[1].transforms[1].height == "auto"  # ${preprocess.image_size}
    write_report(tmp_path, cfg, facts([(40, 40, False)] * 30), np.full((30, 8, 8, 3), 128, np.uint8))
    out = auto.resolve(cfg, tmp_path)  # 30 images: transfer learning, at EfficientNet-Lite0's minimum size
    assert (out.preprocess.image_size, out.preprocess.channels, out.preprocess.resize_mode) == (64, 3, "squash")
    assert list(out.preprocess.mean) == [0.502] * 3
    assert out.model.name == "tf_efficientnet_lite0"
    assert out.augment.train[1].transforms[1].height == 64
    assert out.fit.batch_size == 16  # 30 training images
    lines = auto.describe(json.loads((tmp_path / "report.json").read_text())["settings"])
    assert "preprocess.channels = 3 (30 of 30 images have colour)" in lines
    assert cfg.preprocess.image_size == "auto"  # the input config is left alone


def test_resolve_keeps_hand_set_normalisation_and_refuses_stale_data(tmp_path):
    cfg = compose([], conf_dir=CONF)
    write_report(tmp_path, cfg, facts([(28, 28, True)] * 30), np.zeros((30, 4, 4, 1), np.uint8))
    hand = compose(["preprocess.channels=1", "preprocess.mean=[0.3]", "preprocess.std=[0.2]"], conf_dir=CONF)
    assert list(auto.resolve(hand, tmp_path).preprocess.mean) == [0.3]
    stale = compose(["preprocess.image_size=96"], conf_dir=CONF)
    with pytest.raises(StageOrderError, match=r"preprocess\.image_size=96 but data/processed was made with 64"):
        auto.resolve(stale, tmp_path)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(StageOrderError, match="records no settings"):
        auto.resolve(cfg, tmp_path)


def test_padding_auto_follows_the_image_size():
    entries = [{"_target_": "Pad", "padding": "auto"}, {"_target_": "Crop", "height": "auto", "width": 7, "padding": 3}]
    assert auto.fill_size(entries, 28) == [
        {"_target_": "Pad", "padding": 2},
        {"_target_": "Crop", "height": 28, "width": 7, "padding": 3},
    ]
    assert auto.fill_size(entries, 224)[0]["padding"] == 16


@pytest.mark.parametrize(
    ("caps", "expected", "words"),
    [
        ({"cpu_name": "AMD EPYC", "avx2": True}, "32-true", "AMD EPYC has no bfloat16 instructions"),
        ({"cpu_name": "Intel Xeon", "amx_bf16": True, "avx512_bf16": True}, "bf16-mixed", "amx_bf16 and avx512_bf16"),
        ({"cpu_name": "AMD EPYC", "avx512_bf16": True}, "bf16-mixed", "has avx512_bf16"),
    ],
)
def test_precision_auto_uses_bf16_only_where_the_cpu_computes_it(monkeypatch, caps, expected, words):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    precision, why = auto.choose_precision("auto")
    assert precision == expected and words in why
    assert auto.choose_precision("mps") == ("32-true", "accelerator mps")


def test_precision_auto_on_a_cuda_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto.choose_precision("auto")[0] == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto.choose_precision("gpu")[0] == "bf16-mixed"
    assert auto.choose_precision("cpu")[0] in ("32-true", "bf16-mixed")  # the CPU asked for: its own rule
