"""Atomic writes and hashes (taxonomist.files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from taxonomist import files
from taxonomist.files import (
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    sha256_bytes,
    sha256_file,
)


def siblings(path: Path) -> list[str]:
    """Names in the folder holding ``path`` (to spot leftover temp folders/files)."""
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_directory_swaps_in_on_success(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp != target
        assert tmp.parent == target.parent
        (tmp / "new.txt").write_text("new")
        # The old content is still in place while the block runs.
        assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
    assert siblings(target) == ["raw"]  # no temp or .old folders left behind


def test_atomic_directory_leaves_target_untouched_when_block_raises(tmp_path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        (target / "old.txt").write_text("old")  # untouched
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert siblings(target) == ["raw"]


def test_atomic_directory_creates_missing_target_and_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with atomic_directory(target) as tmp:
        (tmp / "f").write_bytes(b"x")
    assert (target / "f").read_bytes() == b"x"


def test_atomic_directory_failure_without_existing_target_creates_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "f").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_replaces_stale_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    stale = tmp_path / ".out.old"
    stale.mkdir()
    (stale / "junk").write_text("junk")
    with atomic_directory(target) as tmp:
        (tmp / "f").write_text("new")
    assert (target / "f").read_text() == "new"
    assert not stale.exists()


def test_atomic_write_bytes_creates_parents_and_overwrites(tmp_path):
    path = tmp_path / "x" / "y" / "data.bin"
    assert atomic_write_bytes(path, b"one") == path
    assert path.read_bytes() == b"one"
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert siblings(path) == ["data.bin"]


def test_atomic_write_bytes_failure_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert siblings(path) == ["data.bin"]


def test_atomic_write_text_is_utf8(tmp_path):
    path = atomic_write_text(tmp_path / "t.txt", "héllo – ✓\n")
    assert path.read_bytes() == "héllo – ✓\n".encode()


def test_atomic_write_json_round_trip(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"nested": "é"}, "n": True}
    path = atomic_write_json(tmp_path / "o.json", obj)
    text = path.read_text()
    assert text.endswith("\n")
    assert text.index('"b"') < text.index('"a"')  # key order preserved, not sorted
    assert read_json(path) == obj


def test_sha256_bytes_known_vectors():
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("size", [0, 1, 10_500, 3 << 20])
def test_sha256_file_matches_hashlib(tmp_path, size):
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest() == sha256_bytes(data)


def test_write_back_hands_each_full_window_to_the_disk_once(monkeypatch, tmp_path):
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(files, "_sync_file_range", lambda: lambda *args: calls.append(args) or 0)
    monkeypatch.setattr(files, "WRITE_BACK_WINDOW", 100)
    write_back = files.WriteBack(7)
    for end in (40, 99, 130, 180, 231, 250):
        write_back.written(end)
    assert calls == [(7, 0, 130, 2), (7, 130, 101, 2)]  # [0, 130) then [130, 231): SYNC_FILE_RANGE_WRITE


@pytest.mark.skipif(files._sync_file_range() is None, reason="sync_file_range is Linux's")
def test_write_back_starts_real_writes_without_changing_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(files, "WRITE_BACK_WINDOW", 4096)
    data = os.urandom(3 * 4096 + 5)
    with open(tmp_path / "f", "wb") as fh:
        write_back = files.WriteBack(fh.fileno())
        for start in range(0, len(data), 1000):
            fh.write(data[start : start + 1000])
            fh.flush()
            write_back.written(fh.tell())
        assert write_back.started == 10_000  # [0, 5000) and [5000, 10000) were accepted by the kernel
    assert (tmp_path / "f").read_bytes() == data


def test_write_back_does_nothing_where_the_call_is_missing(monkeypatch):
    monkeypatch.setattr(files, "_sync_file_range", lambda: None)
    write_back = files.WriteBack(-1)  # (a bad descriptor: it must not be used)
    write_back.written(10 * files.WRITE_BACK_WINDOW)
    assert write_back.started == 0


def test_read_text_csv_reads_what_pandas_reads_as_text(tmp_path):
    """Every column text, empty fields empty text (not missing), numbers-as-text kept as written,
    and quoting (commas, quotes, newlines, non-ASCII) undone, as ``pd.read_csv(dtype=str,
    keep_default_na=False)`` does; ``usecols`` picks columns; an empty file fails the same way."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "path": ["images/a,b.png", 'images/say "hi".png', "images/two\nlines.png", "images/café.png"],
            "labels": ["cat", "", "NA", "dog|cat"],
            "group": ["007", "", "1e3", "nan"],
        }
    )
    path = tmp_path / "table.csv"
    files.atomic_write_csv(path, frame)
    expected = pd.read_csv(path, dtype=str, keep_default_na=False)
    read = files.read_text_csv(path)
    pd.testing.assert_frame_equal(read, expected)
    assert read["group"].tolist() == ["007", "", "1e3", "nan"]
    pd.testing.assert_frame_equal(files.read_text_csv(path, usecols=["group", "path"]), expected[["path", "group"]])
    header_only = tmp_path / "header.csv"
    header_only.write_text("path,labels\n")
    assert files.read_text_csv(header_only).columns.tolist() == ["path", "labels"]
    assert len(files.read_text_csv(header_only)) == 0
    with pytest.raises(ValueError, match="no column"):
        files.read_text_csv(path, usecols=["absent"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(pd.errors.EmptyDataError):
        files.read_text_csv(tmp_path / "empty.csv")
