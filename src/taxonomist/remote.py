"""``taxonomist push`` / ``taxonomist pull``: the pipeline's data and models on a DVC remote.

A thin layer over ``dvc push`` / ``dvc pull`` (raw data, the processed cache, the features,
``models/``, ``dist/``: every cached DVC output), which first checks that a remote is configured
and, if not, says in one line the command that configures it; DVC's own message spans lines
and names only a placeholder. Any remote DVC supports works (a local or mounted path, SSH, S3,
GCS, Azure ...): ``dvc remote add -d store <url>``; the README's "Scaling out" section lists them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from taxonomist.errors import ConfigError

EXAMPLE_URLS = "s3://bucket/path, gs://bucket/path, azure://container/path, ssh://host/path or /mnt/shared/dvc-store"


def check_remote(root: str | Path = ".", name: str | None = None) -> str:
    """The remote ``dvc push``/``pull`` would use in the DVC project at ``root`` (``name``, or
    the default remote); :class:`ConfigError` with the configuring command when there is none."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        raise ConfigError(f"{Path(root).resolve()} is not a DVC project: run `dvc init` there first") from None
    try:
        config = repo.config
        remotes = sorted(config.get("remote", {}))
        chosen = name or config.get("core", {}).get("remote")
    finally:
        repo.close()
    if chosen and chosen in remotes:
        return str(chosen)
    if name or chosen:
        known = f" (configured: {', '.join(remotes)})" if remotes else ""
        raise ConfigError(f"DVC remote {chosen!r} is not configured{known}: run `dvc remote add {chosen} <url>`")
    if remotes:
        raise ConfigError(
            f"no default DVC remote (configured: {', '.join(remotes)}): run `dvc remote default {remotes[0]}` "
            "or give -r <name>"
        )
    raise ConfigError(f"no DVC remote is configured: run `dvc remote add -d store <url>` (e.g. {EXAMPLE_URLS})")


def transfer(command: str, remote: str | None = None, targets: list[str] | None = None, root: str | Path = ".") -> int:
    """Run ``dvc push`` or ``dvc pull`` (``command``) against the checked remote; its exit code."""
    if command not in ("push", "pull"):
        raise ValueError(f"command {command!r}: push or pull")
    name = check_remote(root, remote)
    args = [sys.executable, "-m", "dvc", command, "-r", name, *(targets or [])]
    return subprocess.run(args, cwd=root, check=False).returncode
