"""A Label Studio export of image classification tasks, in its JSON or JSON_MIN format.

* JSON: a list of tasks, each ``{"id": 17, "data": {"image": <url>}, "annotations": [...]}``;
  an annotation holds ``result`` (a list of regions), ``was_cancelled``, ``created_at`` and
  ``updated_at``. The latest (by ``updated_at``, else ``created_at``, else export order)
  non-cancelled annotation of each task is used; ``predictions`` are ignored.
* JSON_MIN: one flat record per annotation, ``{"id": 17, "image": <url>, "<control name>": ...,
  "annotator": ..., "created_at": ..., ...}``; the latest record of each task id is used.

Labels: a ``choices`` result gives its choices (several for a multi-choice control); a
``taxonomy`` result gives each selected path with its levels joined by ``/`` (a hierarchical
label; a single-label task refuses such paths at ingest and names ``task=hierarchical``, see
:func:`taxonomist.tasks.base.check_single_labels`). Other result types (boxes, text, ...) are
ignored. In JSON_MIN a single choice is plain text, several are ``{"choices": [...]}`` and
taxonomies ``[{"taxonomy": [[...]]}]``.
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

* ``/data/local-files/?d=<relative path>``: a file of Label Studio's local storage; the path
  is relative to the server's ``LOCAL_FILES_DOCUMENT_ROOT`` (the environment variable
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``), so ``data.image_root`` should be that folder;
* ``/data/upload/<project>/<8 hex>-<name>``: a file uploaded through the Label Studio UI,
  which Label Studio keeps as ``<data dir>/media/upload/<project>/<8 hex>-<name>`` (the data
  dir is ``~/.local/share/label-studio`` on Linux unless ``label-studio start --data-dir`` or
  ``LABEL_STUDIO_BASE_DATA_DIR`` says otherwise); found by that name (else ``<name>``)
  anywhere below the image root, so ``data.image_root`` is that ``media/upload/<project>``
  folder (or any folder above it);
* ``http(s)://``, ``s3://``, ... are not downloaded: download the images into a folder and
  set ``data.image_root`` to it, and they are then found by file name the same way;
* any other text is a file path, absolute or relative to the image root.

Every image that cannot be found is reported in one error, grouped by kind of reference, each
kind saying where Label Studio keeps such files and which ``data.image_root`` to set, each
image with the path that was tried.

The image is the task data's ``image`` key, else its only value that looks like an image URL.
Source ids and errors name tasks as ``export.json task 17``.

``data.group_by`` may name a field of the task data (``{"data": {"image": ..., "patient":
"p07"}}``; in JSON_MIN a key of the record, then not read as a control): its value, a single
text or number, is the image's group key (``Record.group``), and every annotated task needs
one. When no task has that field, ``data.group_by`` is a regular expression on the source id
(see :func:`taxonomist.data.split.group_keys`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlparse

from omegaconf import DictConfig

from taxonomist.data.manifest import PATH_SEP, Record
from taxonomist.data.sources.common import (
    IMAGE_SUFFIXES,
    SourceImage,
    clean_labels,
    group_by,
    group_value,
    image_root,
    is_hidden,
    missing_group_kind,
    report_problems,
    resolve_image,
    stage_images,
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
# Where Label Studio keeps its files: the data dir (``label-studio start --data-dir``, else the
# environment variable below, else the platform's user data folder: this one on Linux), whose
# ``media/upload/<project>`` holds the uploads; local storage resolves below LOCAL_FILES_ROOT_ENV.
DATA_DIR_ENV = "LABEL_STUDIO_BASE_DATA_DIR"
DEFAULT_DATA_DIR = "~/.local/share/label-studio"
LOCAL_FILES_ROOT_ENV = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
# The kinds of image reference (``_Locator.locate``)
UPLOAD, LOCAL_FILES, REMOTE, FILE_PATH = "upload", "local-files", "remote", "path"


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


class _Task(NamedTuple):
    """One task of an export: its image URL, its labels (None: not annotated) and its data
    fields (the task ``data``; in JSON_MIN the record), where ``data.group_by`` may be one."""

    url: Any
    labels: tuple[str, ...] | None
    fields: dict[str, Any]


def _full_task(task: dict[str, Any], where: str, form: str, attributes: Sequence[str]) -> _Task:
    data = task.get("data")
    if not isinstance(data, dict):
        raise DataError(f"{where}: the task has no 'data' object")
    url = data[image_key(data, where)]
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    if not annotations:
        return _Task(url, None, data)
    regions = _latest(annotations).get("result") or []
    if form == "attributes":
        return _Task(url, _region_attributes(regions, where, attributes), data)
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
    return _Task(url, clean_labels(labels, where), data)


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
    record: dict[str, Any], where: str, form: str, attributes: Sequence[str], group_field: str | None
) -> _Task:
    key = image_key(record, where)
    label_keys = [k for k in record if k not in (key, group_field) and k not in JSON_MIN_META]
    if not label_keys:
        return _Task(record[key], None, record)
    if form == "attributes":
        return _Task(record[key], _min_attributes(record, label_keys, where, attributes), record)
    if len(label_keys) > 1:
        hint = "; if each is a separate question about the image, use task=multiattribute" if form == "one" else ""
        raise DataError(
            f"{where}: cannot tell which of the keys {', '.join(label_keys)} holds the labels; "
            f"export the project as JSON (not JSON_MIN){hint}"
        )
    return _Task(record[key], clean_labels(_min_labels(record[label_keys[0]], where), where), record)


def _has_field(items: list[Any], field: str) -> bool:
    """Whether any task of the export has the data field ``field`` (JSON: in its ``data``;
    JSON_MIN: a key of the record)."""
    for item in items:
        if isinstance(item, dict):
            fields = item["data"] if isinstance(item.get("data"), dict) else item
            if field in fields:
                return True
    return False


def _tasks(
    items: list[Any], name: str, *, form: str, attributes: Sequence[str], group_field: str | None = None
) -> dict[str, _Task]:
    """Task id -> its :class:`_Task` (image URL, labels or None when unannotated, data fields),
    for either export format.

    ``form`` is the task's label form and ``attributes`` the keys of ``task.attributes`` (see the
    module notes); ``group_field`` (the data field ``data.group_by`` names) is not a control.
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
            tasks[task_id] = _min_task(_latest(group), where, form, attributes, group_field)
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

    def locate(self, url: str) -> tuple[Path | None, str | None, str]:
        """The file of ``url`` or a problem (naming the path tried), and the kind of reference:
        :data:`UPLOAD`, :data:`LOCAL_FILES`, :data:`REMOTE` or :data:`FILE_PATH`. A remote URL
        without ``data.image_root`` gives neither file nor problem (it cannot be used)."""
        parsed = urlparse(url)
        basename = PurePosixPath(unquote(parsed.path)).name
        if "://" in url:
            return (*self.by_name(basename), REMOTE) if self.remote_ok else (None, None, REMOTE)
        if parsed.path.rstrip("/") == LOCAL_FILES_PATH:
            relative = (parse_qs(parsed.query).get("d") or [""])[0]
            if not relative:
                return None, "no 'd=' path in the local-files URL", LOCAL_FILES
            return (*resolve_image(relative, self.root, self.inside), LOCAL_FILES)
        if parsed.path.startswith(UPLOAD_PATH):
            return (*self.by_name(basename), UPLOAD)
        return (*resolve_image(url, self.root, self.inside), FILE_PATH)


def upload_project(url: str) -> str | None:
    """The project id of an upload URL (``/data/upload/<project>/<file>``), if it has one."""
    parts = urlparse(url).path[len(UPLOAD_PATH) :].split("/")
    return parts[0] if len(parts) > 1 and parts[0] else None


def missing_kind(kind: str, name: str, root: Path, configured: bool, projects: Sequence[str] = ()) -> str:
    """The header of the missing images of one kind of reference: where Label Studio keeps such
    files and the ``data.image_root`` to set (``projects``: the upload project ids seen)."""
    looked = (
        f"below data.image_root={root}"
        if configured
        else f"below the export's folder {root} (data.image_root is not set)"
    )
    if kind == UPLOAD:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
        folder = f"{data_dir}/media/upload" + (f"/{projects[0]}" if len(set(projects)) == 1 else "")
        return (
            f"task(s) of {name} name uploaded images (/data/upload/<project>/<file>) not found {looked}; Label "
            "Studio keeps uploads in <Label Studio data dir>/media/upload/<project id>/ (the data dir is "
            f"{DEFAULT_DATA_DIR}/ on Linux unless label-studio start --data-dir or {DATA_DIR_ENV} sets another): "
            f"set data.image_root={folder}"
        )
    if kind == LOCAL_FILES:
        document_root = os.environ.get(LOCAL_FILES_ROOT_ENV) or "<the server's LOCAL_FILES_DOCUMENT_ROOT>"
        return (
            f"task(s) of {name} name local-storage images (/data/local-files/?d=<path>) not found {looked}; the d= "
            "path is relative to the Label Studio server's LOCAL_FILES_DOCUMENT_ROOT (its environment variable "
            f"{LOCAL_FILES_ROOT_ENV}): set data.image_root={document_root}"
        )
    if kind == REMOTE:
        return (
            f"task(s) of {name} have remote image URLs whose files are not {looked} (downloaded images are found "
            "by file name): download them into that folder, or set data.image_root to the folder holding them"
        )
    return (
        f"task(s) of {name} name image files not found {looked}: set data.image_root to the folder the paths "
        "are relative to (absolute paths are used as they are)"
    )


def _task_group(task: _Task, field: str, name: str, where: str, problems: Problems) -> str:
    """The group key of an annotated task: its data field ``field`` (``data.group_by``), a
    single text or number; a missing, empty or compound value is added to ``problems``."""
    value = task.fields.get(field)
    if isinstance(value, dict | list | bool):
        kind = f"task(s) of {name} hold a list, object or true/false in data field {field!r}, not a group key"
        problems.add(kind, where)
        return ""
    group = group_value(value)
    if not group:
        problems.add(missing_group_kind(field, name, f"data field {field!r}"), where)
    return group


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
    root = configured or path.parent
    locator = _Locator(root, inside, remote_ok=configured is not None)
    images: list[SourceImage] = []
    missing: dict[str, list[str]] = {}  # reference kind -> "<task>: image <url>: <problem>"
    projects: list[str] = []  # the upload projects of the missing uploads
    remote: list[str] = []
    unannotated = 0
    form = label_form(cfg)
    attributes = list(task_attributes(cfg)) if form == "attributes" else []
    items = read_export(path)
    group_key = group_by(cfg)
    group_field = group_key if group_key and _has_field(items, group_key) else None
    problems = Problems()
    for task_id, task in _tasks(items, name, form=form, attributes=attributes, group_field=group_field).items():
        where = f"{name} task {task_id}"
        if task.labels is None:
            unannotated += 1
            continue
        url = task.url
        if not isinstance(url, str) or not url:
            raise DataError(f"{where}: the image URL {url!r} is not text")
        group = _task_group(task, group_field, name, where, problems) if group_field else ""
        src, problem, kind = locator.locate(url)
        if kind == REMOTE and src is None and problem is None:
            remote.append(f"{where}: {url!r}")
        elif src is None or problem:
            missing.setdefault(kind, []).append(f"{where}: image {url!r}: {problem}")
            if kind == UPLOAD and (project := upload_project(url)):
                projects.append(project)
        else:
            images.append(SourceImage(src, task.labels, "", where, group))
    report_problems(
        f"task(s) of {name} have remote image URLs, which are not downloaded; download the images into a folder "
        "and set data.image_root to it (they are then found by file name)",
        remote,
        into=problems,
    )
    for kind, found in missing.items():
        if inside is not None:
            header = (
                f"task(s) of {name} name images that are not in the archive (data.image_root is not used for "
                "archives: put the images in the archive beside the export)"
            )
        else:
            header = missing_kind(kind, name, root, configured is not None, projects)
        report_problems(header, found, into=problems)
    problems.raise_if_any()
    if unannotated:
        log.warning("%s: skipped %d task(s) without a (non-cancelled) annotation", name, unannotated)
    if not images:
        raise DataError(f"{name}: no task has a non-cancelled annotation; label the images and export again")
    return stage_images(images, out_dir, desc=f"ingest {name}")
