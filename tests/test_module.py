"""The LightningModule and checkpoint loading (taxonomist.models.module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from conftest import tiny_overrides
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from taxonomist.config import compose
from taxonomist.errors import ModelError
from taxonomist.models.inference import load_classifier
from taxonomist.models.module import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
SPACE = {"task": "multiclass", "classes": CLASSES, "nodes": []}


def pipeline_cfg(*extra: str) -> dict:
    cfg = compose([*tiny_overrides(Path("/nonexistent")), *extra], conf_dir=REPO / "conf")
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def tiny_loader(n: int = 20, batch_size: int = 4, channels: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, 32, 32, generator=g)
    y = torch.arange(n) % len(CLASSES)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        **kwargs,
    }
    return L.Trainer(**options)


@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shape(channels):
    module = ClassifierModule(pipeline_cfg(), SPACE, in_chans=channels).eval()
    with torch.no_grad():
        out = module(torch.randn(5, channels, 32, 32))
    assert out.shape == (5, 3)
    first_conv = next(v for v in module.model.state_dict().values() if v.ndim == 4)
    assert first_conv.shape[1] == channels
    assert module.classes == CLASSES
    x = torch.randn(2, channels, 32, 32)
    with torch.no_grad():
        logits = module.predict_step((x, torch.zeros(2)), 0)  # raw logits, float32
        torch.testing.assert_close(logits, module(x).float())


def test_training_step_returns_loss_with_label_smoothing():
    module = ClassifierModule(pipeline_cfg("fit.label_smoothing=0.2"), SPACE, in_chans=3)
    module.log = lambda *a, **k: None  # not attached to a trainer
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = module.training_step((x, y), 0)
    expected = torch.nn.functional.cross_entropy(module(x), y, label_smoothing=0.2)
    torch.testing.assert_close(loss, expected)


def test_configure_optimizers_without_scheduler_needs_no_trainer():
    module = ClassifierModule(pipeline_cfg("scheduler=none", "optimizer=sgd"), SPACE, in_chans=3)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    # Biases and norm weights get no weight decay.
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays[0] == 0.0 and decays[-1] == module.cfg.optimizer.weight_decay > 0
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_params == len(list(module.model.parameters()))


def test_onecycle_total_steps_filled_from_trainer(tmp_path):
    module = ClassifierModule(pipeline_cfg(), SPACE, in_chans=3)
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, train_dataloaders=tiny_loader(n=20, batch_size=4))
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert scheduler.total_steps == 10 == fit.estimated_stepping_batches
    assert fit.lr_scheduler_configs[0].interval == "step"
    assert fit.global_step == 10  # OneCycleLR would raise if stepped past total_steps


@pytest.mark.parametrize(("n_batches", "scheduled"), [(1, False), (2, True), (5, True)])
def test_onecycle_survives_very_short_runs(tmp_path, n_batches, scheduled):
    # pct_start=0.2 of 4 steps is 0.8 steps: torch's OneCycleLR divides by zero there unless adjusted.
    module = ClassifierModule(pipeline_cfg("scheduler.pct_start=0.2"), SPACE, in_chans=3)
    fit = trainer(tmp_path, max_epochs=2, limit_train_batches=n_batches)
    fit.fit(module, train_dataloaders=tiny_loader())
    assert fit.global_step == 2 * n_batches
    assert bool(fit.lr_scheduler_configs) is scheduled


def test_cosine_t_max_filled_per_epoch(tmp_path):
    module = ClassifierModule(pipeline_cfg("scheduler=cosine", "scheduler.interval=epoch"), SPACE, in_chans=3)
    fit = trainer(tmp_path, max_epochs=3, limit_train_batches=2)
    fit.fit(module, train_dataloaders=tiny_loader())
    scheduler = fit.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler.T_max == 3
    assert fit.lr_scheduler_configs[0].interval == "epoch"


def test_explicit_total_steps_is_kept(tmp_path):
    module = ClassifierModule(pipeline_cfg("scheduler.total_steps=50"), SPACE, in_chans=3)
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    fit.fit(module, train_dataloaders=tiny_loader())
    assert fit.lr_scheduler_configs[0].scheduler.total_steps == 50


def test_load_classifier_round_trip(tmp_path):
    # The initial weights come from a file that is gone by the time the checkpoint is loaded:
    # load_classifier must rebuild the model from the checkpoint alone.
    init = tmp_path / "init.pth"
    initial = timm.create_model("test_resnet", num_classes=1000).state_dict()
    torch.save(initial, init)
    module = ClassifierModule(pipeline_cfg(f"model.checkpoint={init}"), SPACE, in_chans=3)
    key = next(k for k, v in initial.items() if v.ndim == 4)
    assert torch.equal(module.model.state_dict()[key], initial[key])  # the file was loaded
    fit = trainer(tmp_path, max_epochs=2)
    fit.fit(module, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(n=6))
    ckpt = tmp_path / "best.ckpt"
    fit.save_checkpoint(ckpt)
    init.unlink()

    loaded = load_classifier(ckpt)
    assert not loaded.training
    assert loaded.classes == CLASSES
    assert loaded.cfg.model.checkpoint is None
    trained = {k: v for k, v in module.eval().state_dict().items() if k.startswith("model.")}  # not the losses
    restored = loaded.state_dict()
    assert trained.keys() == restored.keys()
    assert all(torch.equal(trained[k], restored[k]) for k in trained)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))
    # The checkpoint holds the trained weights, not the initial file's.
    assert not torch.equal(restored[f"model.{key}"], initial[key])
    assert "val/f1_macro" in fit.callback_metrics and "train/loss" in fit.callback_metrics


def test_mixup_trains_on_soft_targets_smoothed_once():
    cfg = pipeline_cfg("fit.label_smoothing=0.1", "fit.mixup.mixup_alpha=0.4", "fit.mixup.cutmix_alpha=1.0")
    module = ClassifierModule(cfg, SPACE, in_chans=3)
    assert module.mixup is not None and module.mixup.label_smoothing == 0.1
    logged = {}
    module.log = lambda name, value, **k: logged.setdefault(name, value)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    np_state = np.random.get_state()
    loss = module.training_step((x.clone(), y), 0)
    # Replaying the same draw by hand: timm mixes the images and returns smoothed soft targets,
    # and the loss takes them as they are (no second smoothing).
    np.random.set_state(np_state)
    mixed, soft = module.mixup(x.clone(), y)
    assert soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(module(mixed), soft))
    # An odd batch cannot be paired: it trains unmixed, with the configured smoothing.
    loss = module.training_step((x[:3], y[:3]), 1)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(module(x[:3]), y[:3], label_smoothing=0.1))


def test_no_mixup_by_default():
    assert ClassifierModule(pipeline_cfg(), SPACE, in_chans=3).mixup is None


def test_compile_keeps_the_state_dict_keys(tmp_path):
    module = ClassifierModule(pipeline_cfg("model.compile=true"), SPACE, in_chans=3)
    keys = set(module.state_dict())
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    fit.fit(module, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(n=6))
    assert module.model._compiled_call_impl is not None  # compiled in place, and it ran
    assert set(module.state_dict()) == keys  # checkpoints load into an uncompiled model


class FreezeRecorder(L.Callback):
    """Records, per epoch, whether the body and the head were trainable, and the lrs at the end."""

    def __init__(self) -> None:
        self.trainable: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            params = dict(module.model.named_parameters())
            body = all(params[n].requires_grad for n in module.body_names)
            head = all(p.requires_grad for n, p in params.items() if n not in module.body_names)
            self.trainable.append((body, head))


def test_a_pretrained_body_warms_up_frozen_then_trains_at_a_lower_lr(tmp_path):
    """fit.finetune: the head alone for head_warmup_epochs, then all of it; the body's groups get
    lr x backbone_lr_scale, in the optimizer and in OneCycleLR's peak."""
    cfg = pipeline_cfg("fit.finetune.head_warmup_epochs=1", "fit.finetune.backbone_lr_scale=0.1")
    module = ClassifierModule(cfg, SPACE, in_chans=3)
    assert not module.pretrained  # random weights: one group per decay setting, one lr
    assert {g.get("lr_scale", 1.0) for g in module.param_groups(0.05, 0.003)} == {1.0}
    module.pretrained = True  # as if model.checkpoint had loaded weights
    head_names = {n for n, _ in module.model.named_parameters()} - module.body_names
    assert head_names == {"fc.weight", "fc.bias"}  # the body is everything but timm's classifier
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    recorder = FreezeRecorder()
    fit = trainer(tmp_path, max_epochs=2, callbacks=[recorder])
    fit.fit(module, train_dataloaders=tiny_loader(n=8, batch_size=4))
    assert recorder.trainable == [(False, True), (True, True)]
    optimizer = fit.optimizers[0]
    body_groups = [g for g in optimizer.param_groups if g.get("lr_scale") == 0.1]
    assert body_groups and len(body_groups) < len(optimizer.param_groups)
    peaks = {g.get("lr_scale", 1.0): g["max_lr"] for g in optimizer.param_groups}
    assert peaks[0.1] == pytest.approx(0.1 * peaks[1.0])
    conv = next(n for n in module.body_names if n.endswith("conv1.weight"))
    assert not torch.equal(before[conv], dict(module.model.named_parameters())[conv])  # trained in epoch 2


class _Payload:  # a pickled object: loading it would run code of the file's choosing
    pass


def test_load_classifier_refuses_files_that_are_not_checkpoints(tmp_path):
    pickled = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": _Payload(), "state_dict": {}}, pickled)
    with pytest.raises(ModelError, match=r"evil.ckpt is not a readable Taxonomist training checkpoint \(Unpickling"):
        load_classifier(pickled)
    other = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ModelError, match="KeyError"):
        load_classifier(other)
    truncated = tmp_path / "best.ckpt"  # a copy cut short (a full disk, a killed copy)
    torch.save({"hyper_parameters": {}, "state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    with pytest.raises(ModelError, match=r"best.ckpt is not a readable .*run the train stage again") as err:
        load_classifier(truncated)
    assert "\n" not in str(err.value)


def test_inference_stages_start_without_lightning_or_albumentations():
    """evaluate and package only run the network forward: their imports leave out the
    training libraries (Lightning and albumentations took ~4 s of each stage's start-up)."""
    code = (
        "import sys, taxonomist.stages.evaluate, taxonomist.stages.package, taxonomist.models.inference; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'albumentations'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
