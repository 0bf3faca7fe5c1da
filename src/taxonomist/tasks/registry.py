"""The registry of tasks: ``@register`` on a :class:`~taxonomist.tasks.base.Task` subclass adds it
under its ``name`` (as timm registers models); everything else asks :func:`get_task`.

A new task is one module under ``tasks/`` with a registered class, its import in
``tasks/__init__.py``, and a ``conf/task/<name>.yaml``.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from taxonomist.errors import ConfigError, DataError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from taxonomist.tasks.base import Task

_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` the task named ``cls.name``."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``; a :class:`ConfigError` listing them otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), task_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(task_names())
        raise ConfigError(f"task.name={name!r} is not a registered task{hint}; the tasks are: {known}") from None


def task_of(cfg: DictConfig) -> type[Task]:
    """The task class of a pipeline config (``task.name``)."""
    return get_task(str(cfg.task.name))


def tasks_taking(key: str) -> list[str]:
    """The names of the tasks that take the task-specific config key ``key``."""
    return [name for name in task_names() if key in _TASKS[name].keys]


def load_task(data: dict[str, Any]) -> Task:
    """The task object of a ``labels.json`` dict (:meth:`Task.to_dict` output)."""
    try:
        cls = get_task(str(data["task"]))
    except ConfigError as err:
        raise DataError(f"labels written for an unknown task: {err}") from None
    return cls.from_dict(data)
