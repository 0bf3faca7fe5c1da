"""A Label Studio export of image classification tasks, in its JSON or JSON_MIN format.

* JSON: a list of tasks, each ``{"id": 17, "data": {"image": <url>}, "annotations": [...]}``;
  an annotation holds ``result`` (a list of regions), ``was_cancelled``, ``created_at`` and
  ``updated_at``. The latest (by ``updated_at``, else ``created_at``, else export order)
  non-cancelled annotation of each task is used; ``predictions`` are ignored.
* JSON_MIN: one flat record per annotation, ``{"id": 17, "image": <url>, "<control name>": ...,
  "annotator": ..., "created_at": ..., ...}``; the latest record of each task id is used.

Labels: a ``choices`` result gives its choices (several for a multi-choice control); a
``taxonomy`` result gives each selected path with its levels joined by ``/`` (a hierarchical
label). Other result types (boxes, text, ...) are ignored. In JSON_MIN a single choice is
plain text, several are ``{"choices": [...]}`` and taxonomies ``[{"taxonomy": [[...]]}]``.
Tasks without a usable annotation are skipped with a warning.

Several controls (e.g. ``<Choices name="weather">`` and ``<Choices name="quality">``): for a
multi-attribute task (``label_form`` ``attributes``) each control is an attribute, named by the
result's ``from_name`` (in JSON_MIN: the record's key), and the image's labels are
``attribute=value`` strings (``weather=sunny``, ``tags=dog``, ...; see
:mod:`taxonomist.data.sources.table`). With a non-empty ``task.attributes`` only those
controls are read (a control left unanswered is no value); without it every control that gives
choices is one, and in JSON_MIN every key that is neither the image nor annotation metadata
(JSON_MIN also copies the task's other data fields, so list the attributes in
``task.attributes`` when the tasks hold more than the image). For the other tasks the
controls' labels are merged into one list as before, except that a single-label task
(``label_form`` ``one``) refuses an image answered in several controls, pointing to
``task=multiattribute``.

Image URLs, resolved against ``data.image_root`` (default: the export's folder):

* ``/data/local-files/?d=<relative path>``: that path below the image root;
* ``/data/upload/<project>/<8 hex>-<name>``: a file named ``<8 hex>-<name>`` (else ``<name>``)
  anywhere below the image root (e.g. Label Studio's ``media/upload`` folder);
* ``http(s)://``, ``s3://``, ... are not downloaded: download the images into a folder and
  set ``data.image_root`` to it, and they are then found by file name the same way;
* any other text is a file path, absolute or relative to the image root.

The image is the task data's ``image`` key, else its only value that looks like an image URL.
Source ids and errors name tasks as ``export.json task 17``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from omegaconf import DictConfig

from taxonomist.data.manifest import PATH_SEP, Record
from taxonomist.data.sources.common import (
    IMAGE_SUFFIXES,
    SourceImage,
    clean_labels,
    copy_images,
    image_root,
    is_hidden,
    report_problems,
    resolve_image,
)
from taxonomist.data.sources.table import attribute_labels, label_form, task_attributes
from taxonomist.errors import DataError, Problems

log = logging.getLogger(__name__)

UPLOAD_PREFIX = re.compile(r"[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names with 8 hex digits
JSON_MIN_META = frozenset({"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "agreement"})
MULTIATTRIBUTE_HINT = (
    "a single-label task takes one label per image; for several questions about each image use "
    "task=multiattribute (each control becomes an attribute)"
)
LOCAL_FILES_PATH = "/data/local-files"
UPLOAD_PATH = "/data/upload/"


def _looks_like_image(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    path = urlparse(value).path
    return value.startswith("/data/") or "://" in value or PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def image_key(mapping: dict[str, Any], where: str) -> str:
    """The key of ``mapping`` (task data or a JSON_MIN record) holding the image URL."""
    if "image" in mapping:
        return "image"
    keys = [key for key, value in mapping.items() if _looks_like_image(value)]
    if len(keys) != 1:
        raise DataError(f"{where}: cannot tell which key holds the image URL (keys: {', '.join(mapping)})")
    return keys[0]


def value_labels(value: Any, where: str) -> list[str]:
    """The labels of a result value: its ``choices``, and its ``taxonomy`` paths joined with ``/``."""
    if not isinstance(value, dict):
        raise DataError(f"{where}: unexpected annotation value {value!r}")
    labels = [str(choice) for choice in value.get("choices") or []]
    for levels in value.get("taxonomy") or []:
        if not isinstance(levels, list) or not all(isinstance(level, str) and level for level in levels):
            raise DataError(f"{where}: taxonomy value {levels!r} is not a list of names")
        if any(PATH_SEP in level for level in levels):
            raise DataError(f"{where}: taxonomy level in {levels!r} contains {PATH_SEP!r}, the path separator")
        labels.append(PATH_SEP.join(levels))
    return labels


def _stamp(item: dict[str, Any]) -> str:
    return str(item.get("updated_at") or item.get("created_at") or "")


def _latest(items: list[dict[str, Any]]) -> dict[str, Any]:
    return max(enumerate(items), key=lambda pair: (_stamp(pair[1]), pair[0]))[1]


def _region_attributes(regions: list[Any], where: str, attributes: Sequence[str]) -> tuple[str, ...]:
    """The ``attribute=value`` labels of a full-JSON annotation: one attribute per ``from_name``."""
    values: dict[str, list[str]] = {}
    for region in regions:
        labels = value_labels(region.get("value"), where)
        if not labels:
            continue
        control = region.get("from_name")
        if not isinstance(control, str) or not control:
            raise DataError(f"{where}: a {region.get('type')!r} result has no 'from_name', so its attribute is unknown")
        if attributes and control not in attributes:
            continue
        values.setdefault(control, []).extend(labels)
    return attribute_labels(values, where)


def _full_task(
    task: dict[str, Any], where: str, form: str, attributes: Sequence[str]
) -> tuple[Any, tuple[str, ...] | None]:
    data = task.get("data")
    if not isinstance(data, dict):
        raise DataError(f"{where}: the task has no 'data' object")
    url = data[image_key(data, where)]
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return url, None
    regions = _latest(annotations).get("result") or []
    if form == "attributes":
        return url, _region_attributes(regions, where, attributes)
    labels, controls = [], []
    for region in regions:
        found = value_labels(region.get("value"), where)
        labels.extend(found)
        if found and region.get("from_name") not in controls:
            controls.append(region.get("from_name"))
    if form == "one" and len(controls) > 1:
        raise DataError(
            f"{where}: the image is answered in several controls ({', '.join(map(str, controls))}); "
            f"{MULTIATTRIBUTE_HINT}"
        )
    return url, clean_labels(labels, where)


def _min_labels(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [label for item in value for label in _min_labels(item, where)]
    return value_labels(value, where)


def _min_attributes(record: dict[str, Any], keys: list[str], where: str, attributes: Sequence[str]) -> tuple[str, ...]:
    """The ``attribute=value`` labels of a JSON_MIN record: one attribute per control key."""
    values = {}
    for key in keys:
        if attributes and key not in attributes:
            continue
        value = record[key]
        if not isinstance(value, str | list | dict):
            raise DataError(
                f"{where}: key {key!r} holds {value!r}, not a control's answer; list the attributes in "
                "task.attributes (or export the project as JSON)"
            )
        values[key] = _min_labels(value, f"{where}, key {key!r}")
    return attribute_labels(values, where)


def _min_task(
    record: dict[str, Any], where: str, form: str, attributes: Sequence[str]
) -> tuple[Any, tuple[str, ...] | None]:
    key = image_key(record, where)
    label_keys = [k for k in record if k != key and k not in JSON_MIN_META]
    if not label_keys:
        return record[key], None
    if form == "attributes":
        return record[key], _min_attributes(record, label_keys, where, attributes)
    if len(label_keys) > 1:
        hint = "; if each is a separate question about the image, use task=multiattribute" if form == "one" else ""
        raise DataError(
            f"{where}: cannot tell which of the keys {', '.join(label_keys)} holds the labels; "
            f"export the project as JSON (not JSON_MIN){hint}"
        )
    return record[key], clean_labels(_min_labels(record[label_keys[0]], where), where)


def _tasks(
    items: list[Any], name: str, *, form: str, attributes: Sequence[str]
) -> dict[str, tuple[Any, tuple[str, ...] | None]]:
    """Task id -> (image URL, labels or None when unannotated), for either export format.

    ``form`` is the task's label form and ``attributes`` the keys of ``task.attributes`` (see the
    module notes).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{name}: item {index} is not a task object")
        groups.setdefault(str(item.get("id", f"#{index}")), []).append(item)
    tasks = {}
    for task_id, group in groups.items():
        where = f"{name} task {task_id}"
        if "data" in group[0]:
            tasks[task_id] = _full_task(_latest(group), where, form, attributes)
        else:  # JSON_MIN: one record per annotation
            tasks[task_id] = _min_task(_latest(group), where, form, attributes)
    return tasks


class _Locator:
    """Resolves Label Studio image URLs to files below an image root."""

    def __init__(self, root: Path, inside: Path | None, remote_ok: bool) -> None:
        self.root, self.inside, self.remote_ok = root, inside, remote_ok
        self._by_name: dict[str, list[Path]] | None = None

    def _index(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            for folder, dirs, files in os.walk(self.root):
                dirs[:] = sorted(d for d in dirs if not is_hidden(d))
                for file in sorted(files):
                    self._by_name.setdefault(file, []).append(Path(folder, file))
        return self._by_name

    def by_name(self, name: str) -> tuple[Path | None, str | None]:
        """Find a file named ``name`` (or, for an upload, ``name`` without its hex prefix) below the root."""
        names = [name, name[9:]] if UPLOAD_PREFIX.match(name) else [name]
        for candidate in names:
            hits = self._index().get(candidate, [])
            if len(hits) > 1:
                return None, f"several files named {candidate!r} below {self.root}: {', '.join(map(str, hits[:3]))}"
            if hits:
                return hits[0], None
        return None, f"no file named {' or '.join(map(repr, names))} below {self.root}"

    def locate(self, url: str) -> tuple[Path | None, str | None, bool]:
        """The file of ``url``, or a problem; the flag says the URL is remote and cannot be used."""
        parsed = urlparse(url)
        basename = PurePosixPath(unquote(parsed.path)).name
        if "://" in url:
            return (*self.by_name(basename), False) if self.remote_ok else (None, None, True)
        if parsed.path.rstrip("/") == LOCAL_FILES_PATH:
            relative = (parse_qs(parsed.query).get("d") or [""])[0]
            if not relative:
                return None, "no 'd=' path in the local-files URL", False
            return (*resolve_image(relative, self.root, self.inside), False)
        if parsed.path.startswith(UPLOAD_PATH):
            return (*self.by_name(basename), False)
        return (*resolve_image(url, self.root, self.inside), False)


def read_export(path: Path) -> list[Any]:
    """The list of items of a Label Studio export file."""
    try:
        with path.open(encoding="utf-8") as fh:
            items = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the Label Studio export ({err})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a Label Studio JSON export (a list of tasks), got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: the export holds no tasks")
    return items


def materialise_label_studio(cfg: DictConfig, path: Path, out_dir: Path, *, inside: Path | None = None) -> list[Record]:
    """Copy the annotated images of a Label Studio export into ``out_dir/images``.

    With ``inside`` (the archive reader's extraction folder) ``data.image_root`` is ignored:
    images are found beside the export and must lie inside ``inside``.
    """
    name = path.name
    configured = None if inside is not None else image_root(cfg)
    locator = _Locator(configured or path.parent, inside, remote_ok=configured is not None)
    images: list[SourceImage] = []
    missing: list[str] = []
    remote: list[str] = []
    unannotated = 0
    form = label_form(cfg)
    attributes = list(task_attributes(cfg)) if form == "attributes" else []
    for task_id, (url, labels) in _tasks(read_export(path), name, form=form, attributes=attributes).items():
        where = f"{name} task {task_id}"
        if labels is None:
            unannotated += 1
            continue
        if not isinstance(url, str) or not url:
            raise DataError(f"{where}: the image URL {url!r} is not text")
        src, problem, is_remote = locator.locate(url)
        if is_remote:
            remote.append(f"{where}: {url!r}")
        elif src is None or problem:
            missing.append(f"{where}: image {url!r}: {problem}")
        else:
            images.append(SourceImage(src, labels, "", where))
    problems = Problems()
    report_problems(
        f"task(s) of {name} have remote image URLs, which are not downloaded; download the images into a folder "
        "and set data.image_root to it (they are then found by file name)",
        remote,
        into=problems,
    )
    report_problems(f"task(s) of {name} name images that cannot be found", missing, into=problems)
    problems.raise_if_any()
    if unannotated:
        log.warning("%s: skipped %d task(s) without a (non-cancelled) annotation", name, unannotated)
    if not images:
        raise DataError(f"{name}: no task has a non-cancelled annotation; label the images and export again")
    return copy_images(images, out_dir, desc=f"ingest {name}")
