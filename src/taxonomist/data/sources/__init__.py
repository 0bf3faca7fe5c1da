"""Data sources: each turns its input into image files plus manifest records."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from taxonomist.data.manifest import Record

BUILTIN_PREFIX = "builtin:"


class SourceError(ValueError):
    """A data source that cannot be ingested; the message names the path or key."""


def materialise(data_cfg: DictConfig, out_dir: Path) -> list[Record]:
    """Write the images of ``data.source`` under ``out_dir/images`` and return their records."""
    source = str(data_cfg.source)
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX) :]
        if name == "fashion-mnist":
            from taxonomist.data.sources.fashion_mnist import materialise_fashion_mnist

            return materialise_fashion_mnist(data_cfg, out_dir)
        raise SourceError(f"data.source: unknown built-in dataset {name!r} (known: fashion-mnist)")
    from taxonomist.data.sources.folder import materialise_folder

    return materialise_folder(Path(source).expanduser(), out_dir)
