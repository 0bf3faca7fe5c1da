"""Sweeps without training: names, trial identity, shared data keys, and the checks that run
before any trial (each bad override is named)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from taxonomist.config import compose
from taxonomist.errors import ConfigError
from taxonomist.sweeps import launch, trial
from taxonomist.sweeps.preflight import check_sweep


def test_split_args_keeps_hydra_flags_and_drops_multirun() -> None:
    flags, overrides = launch.split_args(["-m", "a=1,2", "--config-name", "tiny", "hydra/launcher=joblib", "--info"])
    assert flags == ["--config-name", "tiny", "--info"]
    assert overrides == ["a=1,2", "hydra/launcher=joblib"]


def test_default_name_is_stable_and_ignores_hydra_settings() -> None:
    a = launch.default_name(["optimizer.lr=1e-3,3e-3", "model.name=resnet18"])
    b = launch.default_name(["model.name=resnet18", "optimizer.lr=1e-3,3e-3", "hydra.sweeper.n_trials=5"])
    c = launch.default_name(["optimizer.lr=1e-3,1e-2", "model.name=resnet18"])
    assert a == b != c
    assert a.startswith("grid-")
    assert launch.default_name(["hparams_search=optuna"]).startswith("optuna-")


def test_trial_key_ignores_sweep_and_hydra_overrides() -> None:
    one = trial.trial_key(["optimizer.lr=0.001", "model.name=x", "sweep.name=a", "hydra.sweeper.n_trials=3"])
    two = trial.trial_key(["model.name=x", "optimizer.lr=0.001", "sweep.storage='s'"])
    assert one == two != trial.trial_key(["optimizer.lr=0.003", "model.name=x"])


def test_short_values_for_run_names() -> None:
    assert trial.short("0.0011155792840695788") == "0.001116"
    assert trial.short("3") == "3"
    assert trial.short("resnet18") == "resnet18"
    assert trial.trial_overrides(["a.b=1", "c=x", "d=2"], ["c", "a.b"]) == {"c": "x", "a.b": "1"}


def test_data_key_changes_only_with_what_ingest_and_preprocess_read() -> None:
    keys = trial.data_params(REPO)
    assert "preprocess.image_size" in keys and "data" in keys and "optimizer" not in keys
    base = compose([], conf_dir=REPO / "conf")
    lr = compose(["optimizer.lr=0.01", "fit.batch_size=32"], conf_dir=REPO / "conf")
    size = compose(["preprocess.image_size=64"], conf_dir=REPO / "conf")
    assert trial.data_key(base, keys) == trial.data_key(lr, keys) != trial.data_key(size, keys)
    # image_size: auto (and model=auto) are chosen with the model: another model, other data.
    model = compose(["model.name=resnet18"], conf_dir=REPO / "conf")
    assert "model.name" in keys and trial.data_key(model, keys) != trial.data_key(base, keys)


def test_objective_is_read_from_the_kept_epoch() -> None:
    kept = {"val/f1_macro": 0.8, "val/acc": 0.7}
    assert trial.objective_value(kept, "val/acc") == 0.7
    with pytest.raises(ConfigError, match="val/auroc"):
        trial.objective_value(kept, "val/auroc")


def test_joblib_trials_share_the_cores() -> None:
    cfg = compose([], conf_dir=REPO / "conf")
    trial.limit_threads(cfg, OmegaConf.create({"launcher": {"_target_": "hydra._internal.BasicLauncher"}}))
    assert cfg.fit.num_threads == 0
    joblib = OmegaConf.create(
        {"launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.JoblibLauncher", "n_jobs": 2}}
    )
    trial.limit_threads(cfg, joblib)
    assert cfg.fit.num_threads >= 1


def test_relative_paths_are_taken_from_the_project_root(tmp_path: Path) -> None:
    cfg = compose(["data.source=images", "data=folder"], conf_dir=REPO / "conf")
    out = trial.pipeline_config(cfg, tmp_path)
    assert out.data.source == str(tmp_path / "images")
    assert out.tracking.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    builtin = trial.pipeline_config(compose([], conf_dir=REPO / "conf"), tmp_path)
    assert builtin.data.source == "builtin:fashion-mnist"


# --- checks before any training -----------------------------------------------------------


def test_a_valid_grid_and_the_optuna_search_pass() -> None:
    base = check_sweep(["optimizer.lr=1e-3,3e-3", "model.name=resnet10_narrow,resnet18"], REPO / "conf")
    assert base.optimizer.lr == 0.003  # the fixed config; sweeps are not applied
    optuna = check_sweep(["hparams_search=optuna", "sweep.name=x"], REPO / "conf")
    assert "optimizer.lr" in optuna.hydra.sweeper.params


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["optimizer.lrr=1e-3,3e-3"], "optimizer.lrr"),  # an unknown key
        (["optimizer.lr=1e-3,fast"], "optimizer.lr=fast"),  # an invalid sweep value
        (["model.name=resnet18,resnet_does_not_exist"], "model.name=resnet_does_not_exist"),
        (["trainer.max_epochs=2,many"], "trainer.max_epochs=many"),
        (["model=resnet18,no_such_model_config"], "model=no_such_model_config"),
        (["hparams_search=no_such_search"], "no_such_search"),
        (["optimizer.lr=1e-3,3e-3", "optimizer.betaz=[0.9,0.99]"], "optimizer.betaz"),
        (["sweep.objective=val/loss", "hparams_search=optuna"], "maximize"),
        (["optimizer.lr=1e-3,,"], "optimizer.lr=1e-3,,"),
        (["scheduler._target_=torch.optim.lr_scheduler.NoSuchSchedule"], "NoSuchSchedule"),
        (["scheduler._target_=os.system"], "execution whitelist"),
    ],
)
def test_bad_overrides_fail_naming_the_override(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_sweep(overrides, REPO / "conf")
    assert named in str(err.value)


@pytest.fixture
def conf_with_search(tmp_path: Path):
    """A copy of conf/ to which a test adds a search space."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)

    def write(params: dict[str, str]) -> Path:
        body = {
            "defaults": [{"override /hydra/sweeper": "optuna"}],
            "hydra": {"sweeper": {"direction": "maximize", "n_trials": 2, "params": params}},
        }
        (conf / "hparams_search" / "bad.yaml").write_text("# @package _global_\n" + OmegaConf.to_yaml(body))
        return conf

    return write


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"optimizer.lrr": "interval(1e-4, 1e-2)"}, "optimizer.lrr"),  # a key no config has
        ({"model": "choice(resnet18, no_such_model_config)"}, "model=no_such_model_config"),  # no such option
        ({"optimizer.lr": "interval(-1.0, 1e-2)"}, "optimizer.lr=-1.0"),  # an end torch refuses
        ({"model.name": "choice(resnet18, not_a_timm_model)"}, "model.name=not_a_timm_model"),
    ],
)
def test_a_search_space_that_matches_no_config_fails(conf_with_search, params: dict, named: str) -> None:
    conf = conf_with_search(params)
    with pytest.raises(ConfigError) as err:
        check_sweep(["hparams_search=bad"], conf)
    assert named in str(err.value)
    assert "search space" in str(err.value)


def test_the_sweep_modules_import_each_other_in_one_direction():
    """No import cycle among taxonomist.sweeps.* (counting imports inside functions too)."""
    folder = REPO / "src" / "taxonomist" / "sweeps"
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        name = f"taxonomist.sweeps.{path.stem}" if path.stem != "__init__" else "taxonomist.sweeps"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("taxonomist.sweeps"):
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("taxonomist.sweeps")}
        graph[name] = targets
    graph = {k: {t for t in v if t in graph and t != "taxonomist.sweeps"} for k, v in graph.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(t == goal or (t not in seen and reaches(t, goal, seen | {t})) for t in graph[start])

    assert [m for m in graph if reaches(m, m, set())] == []
