"""Per-image work on every core: a process pool over chunks of items, with a progress bar.

Preprocess inspects and decodes images with :func:`map_chunks`. Work goes out in small chunks
(:data:`CHUNK` items) to ``workers`` processes started by ``fork`` where the platform has it
(they inherit the imported modules, so starting them costs milliseconds; ``spawn`` elsewhere).
A worker that raises passes its exception on as usual. A worker process that *dies* (a
decoder crash, the out-of-memory killer) would leave a plain pool waiting forever;
:class:`concurrent.futures.ProcessPoolExecutor` notices instead, and :func:`map_chunks` then
reruns the items that were in flight one at a time, each in a fresh process, to name the one
that kills its process (:class:`WorkerDied`).

A stage that maps several times makes one :class:`Workers` pool first, *before* it loads its
tables: forked workers share their parent's memory until either side writes to it, and Python
writes to every object it touches (reference counts, the garbage collector), so workers forked
from a parent holding a large table would each end up with a copy of it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from taxonomist.errors import DataError

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")
CHUNK = 32  # items a worker takes at a time: small enough for a smooth bar and few reruns
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker (bounds what waits in memory)


_LOCAL: dict[tuple[Any, ...], Any] = {}


def local(key: tuple[Any, ...], factory: Callable[[], Any]) -> Any:
    """A per-process object (an open archive, an open output file) made once by ``factory``
    and kept for the process's later chunks; :func:`map_chunks` closes them in this process
    when it ends (workers close theirs by exiting)."""
    if key not in _LOCAL:
        _LOCAL[key] = factory()
    return _LOCAL[key]


def close_local() -> None:
    """Close every object :func:`local` made in this process."""
    while _LOCAL:
        _, obj = _LOCAL.popitem()
        obj.close()


class WorkerDied(DataError):
    """A worker process died (killed, or crashed in native code) instead of returning."""


def default_workers() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(setting: Any) -> int:
    """``auto`` (or 0) means :func:`default_workers`; otherwise the given count, at least 1."""
    if setting in (None, "auto", 0, "0"):
        return default_workers()
    return max(1, int(setting))


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class Rows(Sequence[tuple[Any, ...]]):
    """Items for :func:`map_chunks` kept column by column (NumPy arrays, pandas arrays or lists of
    one length): item ``i`` is the tuple of the columns' values at ``i`` (plain Python values; a
    2-D array column gives a tuple). Many items cost a few bytes each instead of a tuple of
    Python objects (a column of pandas text makes its Python strings only for the items asked)."""

    def __init__(self, *columns: Sequence[Any] | np.ndarray) -> None:
        lengths = {len(column) for column in columns}
        if len(lengths) > 1:
            raise ValueError(f"Rows: columns of different lengths {sorted(lengths)}")
        self.columns = columns
        self.length = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _plain(values: Sequence[Any] | np.ndarray) -> list[Any]:
        if isinstance(values, np.ndarray):
            return [tuple(v) if isinstance(v, list) else v for v in values.tolist()]
        return list(values)

    def __getitem__(self, index: int | slice) -> Any:  # a tuple, or a list of them for a slice
        if isinstance(index, slice):
            return list(zip(*(self._plain(column[index]) for column in self.columns), strict=True))
        position = index + self.length if index < 0 else index
        if not 0 <= position < self.length:
            raise IndexError(f"Rows index {index} out of range for {self.length} items")
        return self[position : position + 1][0]


class Workers:
    """``count`` worker processes, all started when this is made (one process: none; the work
    runs in the caller). Use as a context manager, and pass it to :func:`map_chunks`."""

    def __init__(self, count: int) -> None:
        self.count = max(1, int(count))
        self.executor: ProcessPoolExecutor | None = None
        if self.count > 1:
            self.executor = ProcessPoolExecutor(max_workers=self.count, mp_context=_context())
            wait([self.executor.submit(os.getpid) for _ in range(self.count)])  # fork them all now

    def close(self) -> None:
        """Stop the worker processes (queued work is dropped)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_chunks(
    fn: Callable[[Sequence[Item]], Result],
    items: Sequence[Item],
    *,
    workers: int | Workers,
    desc: str,
    name: Callable[[Item], str] = str,
    chunk: int = CHUNK,
) -> Iterator[tuple[int, Result]]:
    """Apply ``fn`` to consecutive chunks of ``items`` on ``workers`` processes (a count, for a
    pool made for this call, or a :class:`Workers` pool).

    Yields ``(start, result)`` as chunks finish (in any order): ``result`` is what ``fn``
    returned for ``items[start : start + chunk]``. ``fn`` must be picklable (a module-level function or a
    :func:`functools.partial` of one). With one worker, or no more items than one chunk, the
    work runs in this process. When a worker process dies, raises :class:`WorkerDied` naming
    (with ``name``) the item that kills its process, or the items that were in flight.
    """
    starts = range(0, len(items), chunk)
    bar = tqdm(total=len(items), desc=desc, unit="img", mininterval=1, disable=len(items) == 0)
    count = workers.count if isinstance(workers, Workers) else max(1, int(workers))
    owned: Workers | None = None
    try:
        if count <= 1 or len(items) <= chunk:
            for start in starts:
                results = fn(items[start : start + chunk])
                bar.update(min(chunk, len(items) - start))
                yield start, results
            return
        pool = workers if isinstance(workers, Workers) else (owned := Workers(count))
        if pool.executor is None:
            raise RuntimeError("map_chunks: the Workers pool is closed")
        pending = iter(starts)
        running: dict[Future, int] = {}
        try:
            while True:
                while len(running) < count * IN_FLIGHT_PER_WORKER:
                    start = next(pending, None)
                    if start is None:
                        break
                    running[pool.executor.submit(fn, items[start : start + chunk])] = start
                if not running:
                    return
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    results = future.result()  # a dead worker raises here, with the chunk still in `running`
                    start = running.pop(future)
                    bar.update(min(chunk, len(items) - start))
                    yield start, results
        except BrokenProcessPool:
            in_flight = [items[s + k] for s in sorted(running.values()) for k in range(min(chunk, len(items) - s))]
            pool.close()
            raise _died(fn, in_flight, name) from None
        finally:
            for future in running:
                future.cancel()
    finally:
        if owned is not None:
            owned.close()
        bar.close()
        close_local()


def _died(fn: Callable[[Sequence[Item]], Result], in_flight: Sequence[Item], name: Callable[[Item], str]) -> WorkerDied:
    """The error for a dead worker: rerun each in-flight item alone to find the one that kills."""
    log.warning("a worker process died; rerunning the %d images it may have held, one at a time", len(in_flight))
    for item in in_flight:
        with ProcessPoolExecutor(max_workers=1, mp_context=_context()) as alone:
            try:
                alone.submit(fn, [item]).result()
            except BrokenProcessPool:
                return WorkerDied(
                    f"{name(item)}: the process decoding this image died (a crash in the image decoder, "
                    "or killed); remove or re-save the file and run again"
                )
            except Exception:  # an ordinary error is not what killed the worker
                continue
    shown = ", ".join(name(item) for item in in_flight[:8])
    more = f" and {len(in_flight) - 8} more" if len(in_flight) > 8 else ""
    return WorkerDied(
        f"a worker process died (killed, e.g. out of memory) while handling one of: {shown}{more}; "
        "each of them decodes on its own, so run again (with fewer workers if memory is short)"
    )
