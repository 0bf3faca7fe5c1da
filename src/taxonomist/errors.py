"""The one family of user-facing errors.

Every failure a user can fix (a config key, a data problem, missing weights, a registry
refusal, a stage run before its inputs exist) is a :class:`TaxonomistError`. The CLI prints
``error: <message>`` and exits with code 2, without a traceback unless ``--debug`` is given
(or ``TAXONOMIST_DEBUG=1`` is set). Anything else is a bug and keeps its traceback.

- :class:`ConfigError`: a config key or value (the message names the key).
- :class:`DataError`: the images, labels, manifests, splits or taxonomy (it names the row or file).
- :class:`ModelError`: weights, checkpoints, export and its verification.
- :class:`RegistryError`: MLflow tracking and the model registry.
- :class:`StageOrderError`: a stage's input is missing; the message names the stage to run first.
- :class:`Interrupted`: a stage stopped by a signal (SIGTERM); the message says how to go on.

The domain classes also derive from the built-in exception a caller would expect
(``ValueError``, ``FileNotFoundError``), so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

PROBLEMS_SHOWN = 20  # how many problems one error lists before "... and N more"


class TaxonomistError(Exception):
    """A failure the user can fix; the message says what and where."""


class ConfigError(TaxonomistError, ValueError):
    """A config key or value the pipeline cannot use; the message names the key."""


class DataError(TaxonomistError, ValueError):
    """Images, labels, manifests, splits or taxonomies that do not fit; names the row or file."""


class ModelError(TaxonomistError, ValueError):
    """Weights that cannot be loaded, a checkpoint that does not fit, an export that fails."""


class Interrupted(TaxonomistError):
    """A stage stopped on request (SIGTERM) before it finished; the message says how to go on."""


class RegistryError(TaxonomistError):
    """MLflow tracking or model registry refused or lacks something."""


class StageOrderError(TaxonomistError, FileNotFoundError):
    """A stage's input does not exist yet: the message names the stage to run first."""


def missing_input(path: object, stage: str) -> StageOrderError:
    """The error for a missing stage input: ``<path> not found: run the <stage> stage first``."""
    return StageOrderError(f"{path} not found: run the {stage} stage first (or `dvc repro`)")


def stale_input(problem: str, stage: str) -> StageOrderError:
    """The error for a stage input that exists but is out of date or damaged:
    ``<problem>: run the <stage> stage again``."""
    return StageOrderError(f"{problem}: run the {stage} stage again")


class Problems:
    """Collects every problem of several checks, to report them all in one error.

    ``add(kind, items)`` records the items of one kind of problem (kinds keep the order they
    were first added in; adding to a kind again appends); :meth:`collect` records a raised
    :class:`DataError` as one item instead. :meth:`raise_if_any` raises one ``error`` listing
    each kind with its count and the first items (``PROBLEMS_SHOWN`` in all)::

        problems = Problems()
        for row in rows:
            with problems.collect("row(s) with a bad label"):
                check(row)
        problems.add("image file(s) not found", missing)
        problems.raise_if_any()
    """

    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def add(self, kind: str, items: Iterable[str] | str) -> None:
        """Record the items (rows, files, labels) that show one kind of problem (one text: one item)."""
        items = [items] if isinstance(items, str) else list(items)
        if items:
            self.kinds.setdefault(kind, []).extend(items)

    @contextmanager
    def collect(self, kind: str, error: type[Exception] = DataError) -> Iterator[None]:
        """Record an ``error`` raised in the block as one item of ``kind`` instead of raising it.

        The rest of the block is skipped, so a caller that needs the block's result checks
        whether it was set (or uses a flag)."""
        try:
            yield
        except error as err:
            self.add(kind, str(err))

    def __bool__(self) -> bool:
        return bool(self.kinds)

    def __len__(self) -> int:
        return sum(len(items) for items in self.kinds.values())

    def message(self) -> str:
        """All recorded problems, one block per kind."""
        total = len(self)
        # Share PROBLEMS_SHOWN lines among the kinds (at least one each); what a small kind
        # does not use goes to the larger ones.
        budget = max(PROBLEMS_SHOWN, len(self.kinds))
        shares: dict[str, int] = {}
        for left, kind in enumerate(sorted(self.kinds, key=lambda k: len(self.kinds[k])), start=0):
            shares[kind] = min(len(self.kinds[kind]), max(1, budget // (len(self.kinds) - left)))
            budget -= shares[kind]
        blocks = []
        for kind, items in self.kinds.items():
            shown = items[: shares[kind]]
            more = f"\n  ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            blocks.append(f"{len(items)} {kind}:\n  " + "\n  ".join(shown) + more)
        head = f"{total} problems found" if len(self.kinds) > 1 else ""
        return (head + ":\n" if head else "") + "\n".join(blocks)

    def raise_if_any(self, error: type[TaxonomistError] = DataError) -> None:
        """Raise ``error`` with :meth:`message` when any problem was recorded."""
        if self.kinds:
            raise error(self.message())
