"""Taxonomies for hierarchical classification: a tree of labels, written as paths ``a/b/c``.

A taxonomy file is YAML: nested mappings, with lists (or null) for the last level::

    Tops: [T-shirt_top, Pullover, Shirt, Coat]
    Bottoms: [Trouser]
    Footwear:
      Sandal: null
      Sneaker: null

Data labels may be whole paths (``Footwear/Sneaker``) or, when a name is unique in the
taxonomy, just the name (``Sneaker``), which is resolved to its path.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from taxonomist.data.manifest import PATH_SEP
from taxonomist.errors import DataError


class TaxonomyError(DataError):
    """A taxonomy file or label that does not fit the tree; the message names it."""


def ancestors(path: str) -> list[str]:
    """The path and all its ancestors, root-most first: ``a/b/c`` -> ``[a, a/b, a/b/c]``."""
    parts = path.split(PATH_SEP)
    return [PATH_SEP.join(parts[: i + 1]) for i in range(len(parts))]


def parent(path: str) -> str:
    """The parent path ("" for a top-level node)."""
    return path.rpartition(PATH_SEP)[0]


def depth(path: str) -> int:
    """Number of levels of a path (``a/b`` -> 2)."""
    return path.count(PATH_SEP) + 1


def _walk(tree: Any, prefix: str, out: list[str], origin: str) -> None:
    if tree is None:
        return
    if isinstance(tree, str):
        tree = [tree]
    if isinstance(tree, list):
        for item in tree:
            if isinstance(item, dict):
                _walk(item, prefix, out, origin)
            elif isinstance(item, str | int | float):
                _add(f"{prefix}{item}", out, origin)
            else:
                raise TaxonomyError(f"{origin}: unexpected entry {item!r} under {prefix or 'the root'}")
        return
    if isinstance(tree, dict):
        for key, sub in tree.items():
            node = f"{prefix}{key}"
            _add(node, out, origin)
            _walk(sub, node + PATH_SEP, out, origin)
        return
    raise TaxonomyError(f"{origin}: unexpected entry {tree!r} under {prefix or 'the root'}")


def _add(node: str, out: list[str], origin: str) -> None:
    name = node.rpartition(PATH_SEP)[2]
    if not name.strip() or "|" in name:
        raise TaxonomyError(f"{origin}: invalid label name {name!r} at {node!r}")
    if node in out:
        raise TaxonomyError(f"{origin}: {node!r} appears twice")
    out.append(node)


def load_taxonomy(path: str | Path) -> list[str]:
    """Every node path of a taxonomy YAML file, parents before children."""
    path = Path(path)
    if not path.is_file():
        raise TaxonomyError(f"task.taxonomy: {path} not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TaxonomyError(f"task.taxonomy: {path} is not valid YAML: {err}") from None
    nodes: list[str] = []
    _walk(tree, "", nodes, str(path))
    if not nodes:
        raise TaxonomyError(f"task.taxonomy: {path} holds no labels")
    return nodes


class LabelResolver:
    """Map data labels (paths, or unique names) onto the nodes of a taxonomy."""

    def __init__(self, nodes: list[str], origin: str):
        self.nodes = set(nodes)
        self.origin = origin
        by_name: dict[str, list[str]] = {}
        for node in nodes:
            by_name.setdefault(node.rpartition(PATH_SEP)[2], []).append(node)
        self.by_name = by_name

    def resolve(self, label: str, where: str) -> str:
        """The taxonomy path of ``label``; :class:`TaxonomyError` naming ``where`` if it has none."""
        if label in self.nodes:
            return label
        matches = self.by_name.get(label, [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise TaxonomyError(
                f"{where}: label {label!r} is ambiguous in the taxonomy {self.origin} "
                f"({', '.join(sorted(matches))}); write its whole path"
            )
        close = difflib.get_close_matches(label, sorted(self.nodes | set(self.by_name)), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise TaxonomyError(f"{where}: label {label!r} is not in the taxonomy {self.origin}{hint}")
