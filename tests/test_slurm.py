"""Sweeps on SLURM (``hydra/launcher=slurm``, Hydra's submitit launcher).

The checks before submitting run against a stand-in ``sinfo``; the end-to-end test brings up a
real one-node SLURM (Debian's ``slurm-wlm`` and ``munge``, by ``scripts/local_slurm.py``, in a
network namespace of its own: loopback only) and runs an Optuna sweep whose trials are SLURM
jobs: one trial, then the same sweep asked for two (it resumes: one more job), and a sweep on a
partition that does not exist (refused before anything is submitted).
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

import pytest
from conftest import BIN, REPO, make_dvc_project, make_image_folder, run_cmd
from omegaconf import OmegaConf

from taxonomist.errors import ConfigError
from taxonomist.sweeps.preflight import check_sweep
from taxonomist.sweeps.slurm import SLURM_LAUNCHER, check_launcher, partitions, uses_slurm


def fake_slurm(folder: Path, listing: str, monkeypatch: pytest.MonkeyPatch, rc: int = 0) -> None:
    """``sinfo`` printing ``listing`` (and exiting ``rc``) and an ``sbatch``, first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in (("sinfo", f"printf '{listing}'\nexit {rc}\n"), ("sbatch", "exit 1\n")):
        script = folder / name
        script.write_text(f"#!/bin/sh\n{body}")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


def slurm_config(*overrides: str):
    return check_sweep(["hydra/launcher=slurm", *overrides], REPO / "conf")


def test_the_launcher_config_is_hydras_submitit_slurm():
    base = slurm_config()
    assert uses_slurm(base)
    launcher = base.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert launcher.partition is None and launcher.tasks_per_node == 1
    assert OmegaConf.select(base, "hydra.launcher.submitit_folder", throw_on_missing=False) is not None
    assert not uses_slurm(check_sweep([], REPO / "conf"))


def test_a_partition_that_does_not_exist_is_named(tmp_path, monkeypatch):
    fake_slurm(tmp_path / "bin", "debug* 4 8000\\ngpu 32+ 256000\\ngpu 16 128000\\n", monkeypatch)
    assert [(p.name, p.default, p.cpus, p.memory_mb) for p in partitions()] == [
        ("debug", True, 4, 8000),
        ("gpu", False, 32, 256000),  # the most of its node groups
    ]
    check_launcher(slurm_config("hydra.launcher.partition=gpu"))
    check_launcher(slurm_config("hydra.launcher.cpus_per_task=2", "hydra.launcher.mem_gb=4"))  # the default one
    named = r"hydra\.launcher\.partition=nope: no such SLURM partition \(partitions: debug, gpu\)"
    with pytest.raises(ConfigError, match=named):
        check_launcher(slurm_config("hydra.launcher.partition=nope"))


def test_a_trial_larger_than_any_node_is_refused(tmp_path, monkeypatch):
    fake_slurm(tmp_path / "bin", "debug* 4 8000\\n", monkeypatch)
    with pytest.raises(ConfigError, match=r"cpus_per_task=4 x tasks_per_node=2: .* 'debug' have at most 4 CPUs"):
        check_launcher(slurm_config("hydra.launcher.tasks_per_node=2"))  # the config's 4 CPUs each
    with pytest.raises(ConfigError, match=r"mem_gb=16: the nodes of partition 'debug' have at most 7\.8 GB"):
        check_launcher(slurm_config("hydra.launcher.cpus_per_task=1"))  # the config's 16 GB


def test_no_default_partition_or_no_answer(tmp_path, monkeypatch):
    fake_slurm(tmp_path / "a", "gpu 8 64000\\n", monkeypatch)
    with pytest.raises(ConfigError, match=r"no default partition: set hydra\.launcher\.partition"):
        check_launcher(slurm_config())
    fake_slurm(tmp_path / "b", "", monkeypatch, rc=1)
    with pytest.raises(ConfigError, match=r"sinfo failed .* is slurmctld up"):
        check_launcher(slurm_config())


def test_without_slurm_commands(monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    with pytest.raises(ConfigError, match="sinfo and sbatch are not on PATH"):
        check_launcher(slurm_config())


# --- a real SLURM --------------------------------------------------------------------------

SWEEP = "slurm-search"
DRIVER = """set -u
sweep() {{ {taxonomist} sweep --config-name tiny hparams_search=optuna hydra/launcher=slurm \\
    hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=2 sweep.name={sweep} "$@"; }}
sweep hydra.launcher.partition=nope > refused.log 2>&1; echo $? > refused.rc
squeue -h -o %i > queue.txt; ls sweeps > left.txt 2>&1
sweep hydra.sweeper.n_trials=1 > first.log 2>&1 || exit 1
sweep hydra.sweeper.n_trials=2 > second.log 2>&1 || exit 2
"""


@pytest.mark.e2e
def test_an_optuna_sweep_runs_as_slurm_jobs_and_resumes(tmp_path):
    assert os.geteuid() == 0, (
        "the local SLURM cluster needs root (scripts/setup.sh installs slurm-wlm and munge as root)"
    )
    project = make_dvc_project(tmp_path / "project", make_image_folder(tmp_path / "images", per_class=16),
                               ["trainer.max_epochs=2"])  # fmt: skip
    (project / "driver.sh").write_text(DRIVER.format(taxonomist=BIN / "taxonomist", sweep=SWEEP))
    proc = run_cmd([sys.executable, str(REPO / "scripts/local_slurm.py"), "--", "bash", "driver.sh"], project)
    assert "local SLURM: node localhost idle" in proc.stdout

    # A partition that does not exist: refused in one line, before anything was submitted.
    assert (project / "refused.rc").read_text().strip() != "0"
    assert (
        "hydra.launcher.partition=nope: no such SLURM partition (partitions: local)"
        in (project / "refused.log").read_text()
    )
    assert (project / "queue.txt").read_text().strip() == ""
    assert SWEEP not in (project / "left.txt").read_text()  # no sweep folder either

    # The second run resumed the study: one trial done, one more job.
    second = (project / "second.log").read_text()
    assert "resuming Optuna study" in second and "1 of 2 trials finished, 1 to run" in second

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("taxonomist")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.sweep = '{SWEEP}'")
    (parent,) = [r for r in found if r.data.tags.get("taxonomist.role") == "sweep"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    jobs = set()
    for child in children:
        tags = child.data.tags
        assert child.info.status == "FINISHED" and "sweep/objective" in child.data.metrics
        assert re.fullmatch(r"\d+(_\d+)?", tags["slurm.job_id"]) and tags["slurm.node"] == "localhost"
        jobs.add(tags["slurm.job_id"])
        # submitit's folder for the job: its script, and the trial's log
        logs = project / "sweeps" / SWEEP / ".submitit" / tags["slurm.job_id"]
        assert any(logs.glob("*_log.out")), sorted(logs.parent.iterdir())
    assert len(jobs) == 2  # each trial its own SLURM job
    assert sorted(int(c.data.tags["sweep.trial"]) for c in children) == [0, 1]
