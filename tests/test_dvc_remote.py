"""Data and models on a DVC remote: a project pushes raw data, the processed cache and models to
a local path remote; a fresh ``git clone`` pulls them and ``dvc repro`` reruns nothing. Without a
remote, ``taxonomist push`` says in one line the command that configures one.

The remote is a local folder (DVC's ``local`` remote: the same protocol of content-addressed
files as S3, GCS, Azure or SSH remotes, without a server). An SSH/SFTP remote to a loopback
``sshd`` is not tested here: this machine has no openssh-server and the environment no
``dvc-ssh``, and installing either changes the environment shared with other work.
"""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import pytest
from conftest import BIN, make_dvc_project, make_image_folder, run_cmd

from taxonomist.cli import main

pytestmark = pytest.mark.e2e

STAGES = ("ingest", "preprocess", "train", "evaluate", "package")
FAST = [
    "trainer.max_epochs=1",
    "package.int8.enabled=false",
    "evaluate.explain_examples=0",
    "evaluate.misclassified_examples=4",
]


def taxonomist(args: list[str], cwd: Path) -> str:
    """``taxonomist <args>`` with this checkout's code (the inherited PYTHONPATH); its output."""
    proc = run_cmd([sys.executable, "-m", "taxonomist.cli", *args], cwd)
    return proc.stdout + proc.stderr


def test_push_without_a_remote_names_the_command_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    run_cmd(["git", "init", "-q"], tmp_path)
    run_cmd([str(BIN / "dvc"), "init", "-q"], tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["push"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "no DVC remote is configured: run `dvc remote add -d store <url>`" in err
    run_cmd([str(BIN / "dvc"), "remote", "add", "store", str(tmp_path / "remote")], tmp_path)  # not the default
    assert main(["pull"]) == 2
    assert "run `dvc remote default store`" in capsys.readouterr().err
    assert main(["push", "-r", "elsewhere"]) == 2
    assert "DVC remote 'elsewhere' is not configured (configured: store)" in capsys.readouterr().err


def test_a_fresh_clone_pulls_everything_and_reruns_nothing(tmp_path: Path) -> None:
    dvc = str(BIN / "dvc")
    project = make_dvc_project(tmp_path / "project", make_image_folder(tmp_path / "images", per_class=12), FAST)
    run_cmd([dvc, "repro"], project)
    remote = tmp_path / "remote"
    run_cmd([dvc, "remote", "add", "-d", "store", str(remote)], project)
    run_cmd(["git", "add", "-A"], project)
    run_cmd(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "pipeline run"], project)
    pushed = taxonomist(["push"], project)
    assert "pushed" in pushed, pushed
    assert sum(1 for p in (remote / "files").rglob("*") if p.is_file()) > 10

    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models").exists() and not (clone / "data" / "processed").exists()
    taxonomist(["pull"], clone)
    for path in ("data/raw/manifest.csv", "data/processed/splits.csv", "models/best.ckpt", "dist/package.json"):
        assert filecmp.cmp(project / path, clone / path, shallow=False), path
    status = run_cmd([dvc, "status"], clone).stdout
    assert "Data and pipelines are up to date." in status, status
    repro = run_cmd([dvc, "repro"], clone).stdout
    assert "Running stage" not in repro, repro
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro
