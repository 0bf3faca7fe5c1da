"""The one family of user-facing errors and what the CLI prints for them (and for library chatter)."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from taxonomist import cli, errors
from taxonomist.data.images import InvalidImage
from taxonomist.errors import (
    ConfigError,
    DataError,
    ModelError,
    Problems,
    RegistryError,
    StageOrderError,
    TaxonomistError,
    missing_input,
    stale_input,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder holding only a valid params.yaml (the repository's), as the cwd."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.delenv(cli.LOG_FILE_ENV, raising=False)
    yield tmp_path
    _drop_cli_handlers()


def _drop_cli_handlers() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_taxonomist", False)]:
        root.removeHandler(handler)
        handler.close()
    logging.captureWarnings(False)


# --------------------------------------------------------------------------- the family


def test_every_error_class_is_a_taxonomist_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BaseException)]
    assert {c.__name__ for c in classes} >= {"ConfigError", "DataError", "ModelError", "RegistryError"}
    assert all(issubclass(c, TaxonomistError) for c in classes)
    assert issubclass(InvalidImage, DataError)
    # Generic handlers keep working.
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(ModelError, ValueError) and issubclass(StageOrderError, FileNotFoundError)
    assert issubclass(RegistryError, TaxonomistError)


def test_the_old_error_classes_are_gone():
    import taxonomist.data.sources as sources
    import taxonomist.data.split as split
    import taxonomist.models.backbone as backbone

    assert not hasattr(sources, "SourceError")
    assert not hasattr(split, "SplitError")
    assert not hasattr(backbone, "WeightsError")


def test_stage_order_messages_name_the_stage():
    assert str(missing_input(Path("data/raw/manifest.csv"), "ingest")).startswith(
        "data/raw/manifest.csv not found: run the ingest stage first"
    )
    stale = stale_input("data/raw/images.zip: bad", "ingest")
    assert str(stale) == "data/raw/images.zip: bad: run the ingest stage again"


def test_problems_report_every_kind_within_the_cap():
    problems = Problems()
    assert not problems
    problems.raise_if_any()  # nothing recorded: no error
    problems.add("missing file(s)", [f"row {i}" for i in range(1, 31)])
    problems.add("bad split(s)", "row 40")
    with problems.collect("empty label(s)"):
        raise DataError("row 41: empty label")
    with pytest.raises(DataError) as info:
        problems.raise_if_any()
    message = str(info.value)
    assert message.startswith("32 problems found:\n30 missing file(s):\n  row 1\n")
    assert "\n  row 18\n  ... and 12 more\n" in message  # the small kinds leave their share to the large one
    assert message.endswith("1 bad split(s):\n  row 40\n1 empty label(s):\n  row 41: empty label")
    assert len(problems) == 32


# --------------------------------------------------------------------------- the CLI


def test_preprocess_before_ingest_is_one_line_without_traceback(project, capsys):
    assert cli.main(["preprocess"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/raw/manifest.csv not found: run the ingest stage first")
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    log_text = (project / "logs" / "taxonomist.log").read_text()
    assert "Traceback" in log_text and "StageOrderError" in log_text  # the details are kept in the log


def test_a_full_disk_in_any_stage_is_one_line_and_other_os_errors_keep_their_traceback(capsys):
    import errno

    def full() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "data/.raw.x.tmp/images.zip")

    assert cli._reported(full, debug=False) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device writing data/.raw.x.tmp/images.zip: free some space")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(OSError):
        cli._reported(full, debug=True)

    def denied() -> int:
        raise PermissionError(errno.EACCES, "Permission denied", "x")

    with pytest.raises(PermissionError):
        cli._reported(denied, debug=False)


def test_train_before_preprocess_names_the_preprocess_stage(project, capsys):
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/processed/report.json not found: run the preprocess stage first")
    assert "Traceback" not in err


def test_debug_raises_with_the_traceback(project, capsys, monkeypatch):
    with pytest.raises(StageOrderError, match="run the ingest stage first"):
        cli.main(["--debug", "preprocess"])
    with pytest.raises(StageOrderError):
        cli.main(["preprocess", "--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(StageOrderError):
        cli.main(["preprocess"])


def test_debug_prints_the_traceback_from_the_command_line(project):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop(cli.DEBUG_ENV, None)
    command = [sys.executable, "-m", "taxonomist.cli"]
    quiet = subprocess.run([*command, "preprocess"], capture_output=True, text=True, env=env, cwd=project)
    loud = subprocess.run([*command, "--debug", "preprocess"], capture_output=True, text=True, env=env, cwd=project)
    assert quiet.returncode == 2, quiet.stderr
    assert quiet.stderr.startswith("error: data/raw/manifest.csv not found: run the ingest stage first")
    assert "Traceback" not in quiet.stderr
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr
    assert "StageOrderError: data/raw/manifest.csv not found" in loud.stderr


def test_a_config_error_uses_the_same_prefix(project, capsys):
    params = project / "params.yaml"
    params.write_text(params.read_text() + "\nnosuchsection:\n  key: 1\n")
    assert cli.main(["preprocess"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nosuchsection" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- quiet by default


def _emit() -> None:
    logging.getLogger("taxonomist.stages.demo").info("our progress")
    logging.getLogger("taxonomist.stages.demo").debug("our details")
    logging.getLogger("onnxscript.optimizer").info("Applied 47 rewrite rules")
    logging.getLogger("some.library").warning("a library warning")
    logging.getLogger("mlflow.utils.environment").warning("Failed to resolve installed pip version. pip ...")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("cloudpickle version differs", UserWarning, stacklevel=1)


def test_library_chatter_goes_to_the_log_file_only(tmp_path, capsys):
    try:
        path = cli.setup_logging(verbose=False, log_file=tmp_path / "logs" / "run.log")
        _emit()
    finally:
        _drop_cli_handlers()
    err = capsys.readouterr().err
    assert "our progress" in err and "a library warning" in err
    assert "our details" not in err and "rewrite rules" not in err and "cloudpickle" not in err
    assert "pip version" not in err
    logged = path.read_text()
    for text in ("our progress", "our details", "rewrite rules", "a library warning", "cloudpickle", "pip version"):
        assert text in logged


def test_verbose_shows_the_libraries_on_the_console(tmp_path, capsys):
    try:
        cli.setup_logging(verbose=True, log_file=tmp_path / "run.log")
        cli.setup_logging(verbose=True, log_file=tmp_path / "run.log")  # again: handlers replaced, not doubled
        _emit()
    finally:
        _drop_cli_handlers()
    err = capsys.readouterr().err
    assert err.count("our progress") == 1
    assert "rewrite rules" in err and "cloudpickle" in err and "pip version" in err
    assert "our details" not in err
