"""The classification tasks: each is one module with one registered :class:`Task` class.

- :mod:`.base`: the :class:`Task` interface, :class:`Decision`, and helpers most tasks share.
- :mod:`.registry`: ``@register``, :func:`get_task` (by name), :func:`task_of` (a config's task),
  :func:`load_task` (a task object from ``labels.json``).
- :mod:`.binary`, :mod:`.multiclass`, :mod:`.multilabel`, :mod:`.hierarchical`, :mod:`.ordinal`,
  :mod:`.multiattribute`: the tasks.
- :mod:`.taxonomy`: taxonomy files and label-path resolution (hierarchical).
- :mod:`.nn`: the torch side (losses, metrics torchmetrics lacks), imported only by training
  and evaluation, so the served model needs no torch.

Adding a task: a module here with a ``@register``-ed :class:`Task` subclass, its import below,
and ``conf/task/<name>.yaml``.
"""

from taxonomist.tasks import (  # noqa: F401  (importing a task module registers it)
    binary,
    hierarchical,
    multiattribute,
    multiclass,
    multilabel,
    ordinal,
)
from taxonomist.tasks.base import Decision, Task
from taxonomist.tasks.registry import get_task, load_task, task_names, task_of

__all__ = ["Decision", "Task", "get_task", "load_task", "task_names", "task_of"]
