"""Where ``taxonomist predict`` writes: a CSV, Parquet or JSON Lines file that a rerun resumes.

Beside the output, ``<output>.run.json`` records which model wrote it (its URI, resolved to a
version, and the SHA-256 of its ONNX graph) and, once done, how the run went. A rerun of the
same command reads the keys already in the output and classifies only the others. An output
written by another model, or with no record beside it, is never overwritten silently:
``--overwrite`` replaces it, or choose another ``--output``.

CSV and JSON Lines are appended batch by batch (a line cut short by a crash is dropped on
resume). Parquet cannot be appended to: batches go to ``<output>.parts/`` and are joined into
the output when the run ends.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from taxonomist.errors import DataError
from taxonomist.files import atomic_write_json, read_json

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
KEY = "path"
PART_ROWS = 4096  # Parquet rows per part file


def output_format(path: Path, given: str | None) -> str:
    """``given``, or the format the output's suffix names."""
    if given:
        return given
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"--output {path}: cannot tell the format from {path.suffix!r}; use .csv, .parquet or .jsonl")
    return fmt


def _cut_to_last_line(path: Path) -> None:
    """Drop a last line a crash left without its newline."""
    size = path.stat().st_size
    if size == 0:
        return
    with open(path, "rb+") as fh:
        step = min(size, 1 << 16)
        position = size
        while position > 0:
            start = max(0, position - step)
            fh.seek(start)
            chunk = fh.read(position - start)
            if position == size and chunk.endswith(b"\n"):
                return
            at = chunk.rfind(b"\n")
            if at >= 0:
                fh.truncate(start + at + 1)
                return
            position = start
        fh.truncate(0)


class ResultWriter:
    """Appends result rows to the output (see the module docstring)."""

    def __init__(self, path: Path, fmt: str, model: dict[str, Any], overwrite: bool = False) -> None:
        self.path, self.fmt, self.model = Path(path), fmt, model
        self.record = self.path.with_name(self.path.name + ".run.json")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        exists = self.path.exists() or self.parts.exists()
        if exists and overwrite:
            self._remove()
            exists = False
        if exists:
            self._check_resumable()
        self.done: set[str] = self._done_keys() if exists else set()
        self._pending: list[pd.DataFrame] = []
        atomic_write_json(self.record, {**model, "format": fmt, "complete": False})

    def _remove(self) -> None:
        for target in (self.path, self.record):
            target.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)

    def _check_resumable(self) -> None:
        if not self.record.is_file():
            raise DataError(
                f"{self.path} exists and no {self.record.name} beside it says what wrote it: "
                "give --overwrite to replace it, or another --output"
            )
        earlier = read_json(self.record)
        if earlier.get("model") != self.model["model"] or earlier.get("onnx_sha256") != self.model["onnx_sha256"]:
            raise DataError(
                f"{self.path} holds predictions of {earlier.get('model')}, this run uses {self.model['model']}: "
                "give --overwrite to replace them, or another --output"
            )
        if earlier.get("format", self.fmt) != self.fmt:
            raise DataError(f"{self.path} was written as {earlier.get('format')}, not {self.fmt}")

    def _done_keys(self) -> set[str]:
        if self.fmt == "parquet":
            frames = [pd.read_parquet(p, columns=[KEY]) for p in sorted(self.parts.glob("*.parquet"))]
            if self.path.is_file():
                frames.append(pd.read_parquet(self.path, columns=[KEY]))
            return set(pd.concat(frames)[KEY]) if frames else set()
        if not self.path.is_file():
            return set()
        _cut_to_last_line(self.path)
        if self.path.stat().st_size == 0:
            return set()
        if self.fmt == "csv":
            return set(pd.read_csv(self.path, usecols=[KEY], dtype=str, keep_default_na=False)[KEY])
        with open(self.path) as fh:
            return {json.loads(line)[KEY] for line in fh if line.strip()}

    def write(self, rows: pd.DataFrame) -> None:
        """Add ``rows`` (with a ``path`` column) to the output."""
        if rows.empty:
            return
        if self.fmt == "parquet":
            self._pending.append(rows)
            if sum(len(f) for f in self._pending) >= PART_ROWS:
                self._flush_part()
            return
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as fh:
            if self.fmt == "csv":
                flat = rows.apply(lambda c: c.map(_cell)) if len(rows.columns) else rows
                fh.write(flat.to_csv(index=False, header=new))
            else:
                for record in rows.to_dict(orient="records"):
                    fh.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _flush_part(self) -> None:
        if not self._pending:
            return
        self.parts.mkdir(exist_ok=True)
        number = len(list(self.parts.glob("*.parquet")))
        tmp = self.parts / f".part-{number:06d}.tmp"
        pd.concat(self._pending, ignore_index=True).to_parquet(tmp, index=False)
        os.replace(tmp, self.parts / f"part-{number:06d}.parquet")
        self._pending.clear()

    def finish(self, summary: dict[str, Any]) -> None:
        """Complete the output (Parquet: join the parts) and record how the run went."""
        if self.fmt == "parquet":
            self._flush_part()
            frames = [pd.read_parquet(p) for p in sorted(self.parts.glob("*.parquet"))]
            if self.path.is_file():
                frames.insert(0, pd.read_parquet(self.path))
            if frames:
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)
                os.replace(tmp, self.path)
            shutil.rmtree(self.parts, ignore_errors=True)
        atomic_write_json(self.record, {**self.model, "format": self.fmt, **summary, "complete": True})


def _plain(value: Any) -> Any:
    """A JSON-ready cell: NumPy scalars and arrays as Python values, NaN as null."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None
    return value


def _cell(value: Any) -> Any:
    """A CSV cell: a list of labels joined with ``|`` (as in manifests)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return "|".join(str(v) for v in value)
    return value
