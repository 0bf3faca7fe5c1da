"""MLflow model registry: register a version, tag it, and move the aliases.

``candidate`` always points at the newest version; ``champion`` moves to it only when its
champion metric (default test macro-F1) beats the current champion's.
"""

from __future__ import annotations

import logging
import math

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from taxonomist.errors import RegistryError

log = logging.getLogger(__name__)
CANDIDATE = "candidate"
CHAMPION = "champion"


def tag_name(metric: str) -> str:
    """Version tag that stores a metric (``test/f1_macro`` -> ``test_f1_macro``)."""
    return metric.replace("/", "_")


def current_champion(client: MlflowClient, name: str):
    """The version behind ``@champion``, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as err:
        raise RegistryError(f"the model registry refused alias @{alias} on {name} v{version}: {err}") from err


def promote(client: MlflowClient, name: str, version: str, metric: str, score: float) -> dict[str, object]:
    """Set ``candidate`` on ``version``; move ``champion`` if ``score`` beats the champion's.

    A registry that refuses an alias raises :class:`~taxonomist.errors.RegistryError`."""
    _set_alias(client, name, CANDIDATE, version)
    champion = current_champion(client, name)
    previous = None
    if champion is not None and champion.version != version:
        raw = champion.tags.get(tag_name(metric))
        previous = float(raw) if raw is not None else -math.inf
    promoted = champion is None or (previous is not None and score > previous)
    if promoted:
        _set_alias(client, name, CHAMPION, version)
        log.info("%s v%s is the new champion (%s %.4f > %s)", name, version, metric, score, previous)
    else:
        log.info("%s v%s stays candidate (%s %.4f <= champion %s)", name, version, metric, score, previous)
    aliases = [CANDIDATE] + ([CHAMPION] if promoted else [])
    return {
        "name": name,
        "version": version,
        "aliases": aliases,
        "champion_version": version if promoted else champion.version,  # type: ignore[union-attr]
        "previous_champion_score": previous,
        "promoted": promoted,
    }
