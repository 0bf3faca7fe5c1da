"""Atomic promotion: two real processes gate and promote at once against one MLflow registry;
``@champion`` ends on the better model. Without the lock the same race leaves it on the worse
one, which shows the test can fail."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taxonomist.export import registry

NAME = "taxonomist-race-multiclass"


def worker(uri: str, go: str, score: float, delay: float, locked: bool) -> None:
    """Register a version scored ``score``, wait for ``go``, then gate (read the champion's
    score, take ``delay`` seconds as a real gate does, compare) and promote."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    version = client.create_model_version(NAME, source="file:///nowhere", tags={"score": str(score)}).version
    while not Path(go).exists():
        time.sleep(0.01)

    def decide() -> dict:
        champion = registry.current_champion(client, NAME)
        best = float(champion.tags["score"]) if champion is not None else -1.0
        time.sleep(delay)
        return {"promoted": score > best}

    if locked:
        registry.gate_and_promote(client, NAME, version, decide)
    else:
        registry.promote(client, NAME, version, bool(decide()["promoted"]))


@pytest.mark.parametrize("locked", [True, False])
def test_concurrent_promotions_leave_the_better_champion(tmp_path, locked):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model(NAME)
    first = client.create_model_version(NAME, source="file:///nowhere", tags={"score": "0.5"}).version
    registry.promote(client, NAME, first, True)
    go = tmp_path / "go"
    tests = str(Path(__file__).parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {tests!r}); import test_promotion as t; "
             f"t.worker({uri!r}, {str(go)!r}, {score}, {delay}, {locked})"],
            env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        )
        for score, delay in ((0.9, 1.0), (0.7, 3.0))  # the better one finishes its gate first
    ]  # fmt: skip
    deadline = time.time() + 60
    while len(client.search_model_versions(f"name='{NAME}'")) < 3 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    champion = registry.current_champion(client, NAME)
    if locked:
        assert champion.tags["score"] == "0.9"
    else:  # both compared against 0.5; the slower, worse one moved the alias last
        assert champion.tags["score"] == "0.7"
