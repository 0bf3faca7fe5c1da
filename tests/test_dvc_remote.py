"""Data and models on a DVC remote: a project pushes raw data, the processed cache and models to
a local path remote; a fresh ``git clone`` pulls them and ``dvc repro`` reruns nothing. Without a
remote, ``taxonomist push`` says in one line the command that configures one.

The remotes: a local folder (DVC's ``local`` remote: the same content-addressed files as S3,
GCS or Azure remotes, without a server), and an SSH/SFTP remote (``dvc-ssh``) served by
OpenSSH's ``sshd``, started by the test on loopback with a throwaway host key and one client key.
"""

from __future__ import annotations

import filecmp
import sys
from pathlib import Path

import pytest
from conftest import BIN, make_dvc_project, make_image_folder, run_cmd, running_sshd

from taxonomist.cli import main

pytestmark = pytest.mark.e2e

STAGES = ("ingest", "preprocess", "train", "evaluate", "package")
FAST = [
    "trainer.max_epochs=1",
    "package.int8.enabled=false",
    "evaluate.explain_examples=0",
    "evaluate.misclassified_examples=4",
]


def taxonomist(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """``taxonomist <args>`` with this checkout's code (the inherited PYTHONPATH); its output."""
    proc = run_cmd([sys.executable, "-m", "taxonomist.cli", *args], cwd, env=env)
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


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after ``dvc repro``, committed."""
    root = tmp_path_factory.mktemp("remote-project")
    project = make_dvc_project(root / "project", make_image_folder(root / "images", per_class=12), FAST)
    run_cmd([str(BIN / "dvc"), "repro"], project)
    commit(project, "pipeline run")
    return project


def commit(root: Path, message: str) -> None:
    run_cmd(["git", "add", "-A"], root)
    run_cmd(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message], root)


def push_clone_pull(
    project: Path, clone: Path, name: str, url: str, local: dict[str, str], env: dict[str, str] | None = None
) -> None:
    """Add remote ``name`` at ``url`` (``local``: its settings kept out of git, as credentials
    are, set again in the clone), push, clone fresh with git, pull (DVC with ``env``); the clone
    must hold the same files, be up to date and rerun nothing."""
    dvc = str(BIN / "dvc")
    run_cmd([dvc, "remote", "add", name, url], project)
    for key, value in local.items():
        run_cmd([dvc, "remote", "modify", "--local", name, key, value], project)
    commit(project, f"remote {name}")
    pushed = taxonomist(["push", "-r", name], project, env)
    assert "pushed" in pushed, pushed

    run_cmd(["git", "clone", "-q", str(project), str(clone)], clone.parent)
    assert not (clone / "models").exists() and not (clone / "data" / "processed").exists()
    for key, value in local.items():
        run_cmd([dvc, "remote", "modify", "--local", name, key, value], clone)
    taxonomist(["pull", "-r", name], clone, env)
    for path in ("data/raw/manifest.csv", "data/processed/splits.csv", "models/best.ckpt", "dist/package.json"):
        assert filecmp.cmp(project / path, clone / path, shallow=False), path
    status = run_cmd([dvc, "status", "-c", "-r", name], clone, env=env).stdout
    assert f"Cache and remote '{name}' are in sync." in status, status
    status = run_cmd([dvc, "status"], clone).stdout
    assert "Data and pipelines are up to date." in status, status
    repro = run_cmd([dvc, "repro"], clone).stdout
    assert "Running stage" not in repro, repro
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro


def test_a_fresh_clone_pulls_everything_and_reruns_nothing(project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    push_clone_pull(project, tmp_path / "clone", "store", str(remote), {})
    assert sum(1 for p in (remote / "files").rglob("*") if p.is_file()) > 10


def test_the_same_over_ssh_to_a_real_sshd(project: Path, tmp_path: Path) -> None:
    """An SSH/SFTP remote (``dvc-ssh``) on OpenSSH's ``sshd`` on loopback, key authentication."""
    remote = tmp_path / "ssh-remote"
    with running_sshd() as server:
        # DVC (asyncssh) checks host keys against ~/.ssh/known_hosts: a HOME that trusts this server's
        env = {"HOME": str(server.home)}
        push_clone_pull(project, tmp_path / "clone", "shared", server.url(remote), {"keyfile": str(server.key)}, env)
    assert sum(1 for p in (remote / "files").rglob("*") if p.is_file()) > 10
